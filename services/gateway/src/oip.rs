//! The Open Inference Protocol (KServe V2) REST endpoints: health, server
//! and model metadata, readiness, and inference, translated to `ml.predict`.
//!
//! The platform serves one model, under the name `GATEWAY_MODEL_NAME`
//! (default `mlplatform`); its versions are the registry's. The predictors
//! hold only the production version, so a request for another version is
//! refused (400) rather than answered by a different model; an unknown
//! model or version is 404. Errors are `{"error": "..."}`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{StreamExt, TryStreamExt};
use ml_shared::messages::{
    ApiReply, BatchPredictReply, ModelSummary, ModelsReply, PredictReply, PredictRequest,
};
use serde_json::{json, Map, Value};

use crate::platform::PlatformError;
use crate::tensor::{
    self, wants_binary, Rows, TensorError, FEATURES_INPUT, LABEL_OUTPUT, PREDICTION_OUTPUT,
    USER_ID_INPUT,
};
use crate::AppState;

/// The header of the binary tensor data extension.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// An Open Inference Protocol error: a status and `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OipError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The message.
    pub message: String,
}

impl OipError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl From<TensorError> for OipError {
    fn from(e: TensorError) -> Self {
        OipError::new(StatusCode::BAD_REQUEST, e.0)
    }
}

impl From<PlatformError> for OipError {
    fn from(e: PlatformError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
        OipError::new(status, e.message())
    }
}

impl IntoResponse for OipError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// `GET /v2/health/live`: the process answers.
pub async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

/// `GET /v2/health/ready`: NATS connected and a production model exists.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let ready = state.platform.connected()
        && matches!(state.platform.models().await, Ok(m) if m.production.is_some());
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "ready": ready }))).into_response()
}

/// `GET /v2`: server metadata.
pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "mlplatform-gateway",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

fn check_name(state: &AppState, name: &str) -> Result<(), OipError> {
    if name == state.config.model_name {
        Ok(())
    } else {
        Err(OipError::new(
            StatusCode::NOT_FOUND,
            format!(
                "unknown model '{name}': this server serves '{}'",
                state.config.model_name
            ),
        ))
    }
}

fn parse_version(version: &str) -> Result<u64, OipError> {
    version.parse::<u64>().map_err(|_| {
        OipError::new(
            StatusCode::NOT_FOUND,
            format!("unknown version '{version}': versions are the registry's numbers"),
        )
    })
}

/// The summary of `version`, or of production when `None`.
fn find<'a>(
    state: &AppState,
    models: &'a ModelsReply,
    version: Option<u64>,
) -> Result<&'a ModelSummary, OipError> {
    let wanted = match version.or(models.production) {
        Some(v) => v,
        None => {
            return Err(OipError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no model has been published yet",
            ))
        }
    };
    models
        .models
        .iter()
        .find(|m| m.version == wanted)
        .ok_or_else(|| {
            OipError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "model '{}' has no version {wanted}",
                    state.config.model_name
                ),
            )
        })
}

fn tensor_meta(name: &str, datatype: &str, shape: &[i64]) -> Value {
    json!({ "name": name, "datatype": datatype, "shape": shape })
}

/// Whether a model family has a label output.
pub fn is_classifier(kind: &str) -> bool {
    kind == "logistic" || kind == "onnx_classifier"
}

fn metadata(state: &AppState, models: &ModelsReply, model: &ModelSummary) -> Value {
    let raw = &state.raw_features;
    let mut inputs: Vec<Value> = raw.iter().map(|f| tensor_meta(f, "FP64", &[-1])).collect();
    inputs.push(tensor_meta(USER_ID_INPUT, "BYTES", &[-1]));
    let mut outputs = vec![tensor_meta(PREDICTION_OUTPUT, "FP64", &[-1])];
    if is_classifier(&model.kind) {
        outputs.push(tensor_meta(LABEL_OUTPUT, "INT64", &[-1]));
    }
    let mut parameters = Map::new();
    parameters.insert("version".into(), json!(model.version.to_string()));
    parameters.insert("kind".into(), json!(model.kind));
    parameters.insert("feature_names".into(), json!(model.feature_names.join(",")));
    parameters.insert(
        "production_version".into(),
        json!(models.production.map(|v| v.to_string()).unwrap_or_default()),
    );
    parameters.insert("aliases".into(), json!(model.aliases.join(",")));
    parameters.insert("data_fingerprint".into(), json!(model.data_fingerprint));
    parameters.insert(
        "inputs".into(),
        json!(format!(
            "either one BYTES input '{USER_ID_INPUT}', or the FP32/FP64 inputs {}, or one input '{FEATURES_INPUT}' of shape [N, {}]",
            raw.join(", "),
            raw.len()
        )),
    );
    json!({
        "name": state.config.model_name,
        "versions": models.models.iter().map(|m| m.version.to_string()).collect::<Vec<_>>(),
        "platform": format!("mlplatform_{}", model.kind),
        "inputs": inputs,
        "outputs": outputs,
        "parameters": parameters,
    })
}

/// `GET /v2/models/{name}`: metadata of the production version.
pub async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, OipError> {
    check_name(&state, &name)?;
    let models = state.platform.models().await?;
    let model = find(&state, &models, None)?;
    Ok(Json(metadata(&state, &models, model)))
}

/// `GET /v2/models/{name}/versions/{version}`: metadata of one version.
pub async fn version_metadata(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, OipError> {
    check_name(&state, &name)?;
    let version = parse_version(&version)?;
    let models = state.platform.models().await?;
    let model = find(&state, &models, Some(version))?;
    Ok(Json(metadata(&state, &models, model)))
}

async fn readiness(state: &AppState, version: Option<u64>) -> Result<Response, OipError> {
    let models = state.platform.models().await?;
    let model = find(state, &models, version)?;
    let ready = state.platform.connected() && models.production == Some(model.version);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({ "name": state.config.model_name, "ready": ready });
    if !ready {
        body["error"] = json!(format!(
            "version {} is not served: the predictors serve the production version only",
            model.version
        ));
    }
    Ok((status, Json(body)).into_response())
}

/// `GET /v2/models/{name}/ready`: a production model exists and NATS is up.
pub async fn model_ready(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response, OipError> {
    check_name(&state, &name)?;
    readiness(&state, None).await
}

/// `GET /v2/models/{name}/versions/{version}/ready`: that version is production.
pub async fn version_ready(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response, OipError> {
    check_name(&state, &name)?;
    let version = parse_version(&version)?;
    readiness(&state, Some(version)).await
}

/// `POST /v2/models/{name}/infer`.
pub async fn infer(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OipError> {
    check_name(&state, &name)?;
    infer_version(&state, None, &headers, body).await
}

/// `POST /v2/models/{name}/versions/{version}/infer`.
pub async fn infer_versioned(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OipError> {
    check_name(&state, &name)?;
    let version = parse_version(&version)?;
    infer_version(&state, Some(version), &headers, body).await
}

/// Reads a body up to the configured limit; 413 beyond it.
pub async fn read_body(state: &AppState, body: Body) -> Result<Bytes, OipError> {
    axum::body::to_bytes(body, state.config.max_body)
        .await
        .map_err(|_| {
            OipError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is larger than {} bytes (GATEWAY_MAX_BODY)",
                    state.config.max_body
                ),
            )
        })
}

/// Predictions for `rows`, all from one model version.
struct Predictions {
    values: Vec<f64>,
    labels: Option<Vec<i64>>,
    model_version: u64,
}

fn predictor_error(payload: &[u8], status: Option<u16>) -> Option<OipError> {
    match serde_json::from_slice::<ml_shared::messages::ErrorReply>(payload) {
        Ok(e) => {
            let status = status.unwrap_or_else(|| e.error.code.status());
            Some(OipError::new(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                e.error.message,
            ))
        }
        Err(_) => None,
    }
}

fn unusable(e: impl std::fmt::Display) -> OipError {
    OipError::new(
        StatusCode::BAD_GATEWAY,
        format!("the predictor gave an unusable answer: {e}"),
    )
}

/// Sends one `ml.predict` request and reads its reply as `T`, or as the
/// predictor's structured error.
async fn ask<T: serde::de::DeserializeOwned>(
    state: &AppState,
    request: &PredictRequest,
) -> Result<T, OipError> {
    let body = serde_json::to_vec(request).expect("requests serialise");
    let reply = state.platform.predict(body.into()).await?;
    if let Some(e) = predictor_error(&reply.payload, reply.error_status) {
        return Err(e);
    }
    serde_json::from_slice::<ApiReply<T>>(&reply.payload)
        .map_err(unusable)?
        .into_result()
        .map_err(unusable)
}

/// A `PredictRequest` with every field empty, to fill one of.
fn empty_request() -> PredictRequest {
    PredictRequest {
        user_id: None,
        user_ids: None,
        features: None,
        routing_key: None,
    }
}

async fn predict_rows(state: &AppState, rows: &Rows) -> Result<Predictions, OipError> {
    match rows {
        Rows::UserIds(ids) if ids.len() == 1 => predict_user(state, &ids[0]).await,
        Rows::UserIds(ids) => predict_users(state, ids).await,
        Rows::Features(rows) => predict_features(state, rows).await,
    }
}

/// One user: one `ml.predict` request by `user_id`.
async fn predict_user(state: &AppState, id: &str) -> Result<Predictions, OipError> {
    let request = PredictRequest {
        user_id: Some(id.to_owned()),
        ..empty_request()
    };
    let r: PredictReply = ask(state, &request).await?;
    Ok(Predictions {
        values: vec![r.prediction],
        labels: r.label.map(|l| vec![i64::from(l)]),
        model_version: r.model_version,
    })
}

/// Several users: one batch `ml.predict` request by `user_ids`; every user
/// must be known.
async fn predict_users(state: &AppState, ids: &[String]) -> Result<Predictions, OipError> {
    let request = PredictRequest {
        user_ids: Some(ids.to_vec()),
        ..empty_request()
    };
    let batch: BatchPredictReply = ask(state, &request).await?;
    if !batch.unknown_user_ids.is_empty() {
        return Err(unknown_users(&batch.unknown_user_ids));
    }
    let values = batch
        .predictions
        .iter()
        .map(|p| p.ok_or_else(|| unusable("a null prediction for a known user")))
        .collect::<Result<Vec<_>, _>>()?;
    let labels = batch
        .labels
        .map(|ls| {
            ls.iter()
                .map(|l| l.map(i64::from).ok_or_else(|| unusable("a null label")))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(Predictions {
        values,
        labels,
        model_version: batch.model_version,
    })
}

/// 404 naming (the first five of) the users the feature store lacks.
fn unknown_users(unknown: &[String]) -> OipError {
    let shown: Vec<&str> = unknown.iter().take(5).map(String::as_str).collect();
    OipError::new(
        StatusCode::NOT_FOUND,
        format!(
            "{} user_id(s) not in the feature store: {}{}",
            unknown.len(),
            shown.join(", "),
            if unknown.len() > 5 { ", …" } else { "" }
        ),
    )
}

/// Rows of features: `ml.predict` takes one row per request, so the rows go
/// out concurrently, at most `GATEWAY_ROW_CONCURRENCY` at a time, and come
/// back in order, all from one model version (409 otherwise).
async fn predict_features(
    state: &AppState,
    rows: &[BTreeMap<String, f64>],
) -> Result<Predictions, OipError> {
    let replies: Vec<PredictReply> = futures::stream::iter(rows.iter().cloned())
        .map(|row| async move {
            let request = PredictRequest {
                features: Some(row),
                ..empty_request()
            };
            ask::<PredictReply>(state, &request).await
        })
        .buffered(state.config.row_concurrency.max(1))
        .try_collect()
        .await?;
    let model_version = replies[0].model_version;
    if replies.iter().any(|r| r.model_version != model_version) {
        return Err(OipError::new(
            StatusCode::CONFLICT,
            "the production model changed while the batch was answered; send it again",
        ));
    }
    let labels = replies
        .iter()
        .map(|r| r.label.map(i64::from))
        .collect::<Option<Vec<_>>>();
    Ok(Predictions {
        values: replies.iter().map(|r| r.prediction).collect(),
        labels,
        model_version,
    })
}

async fn infer_version(
    state: &AppState,
    version: Option<u64>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, OipError> {
    let header_len = header_length(headers)?;
    let bytes = read_body(state, body).await?;
    let decoded = tensor::decode(
        &bytes,
        header_len,
        &state.raw_features,
        state.config.max_batch,
    )?;
    let request = &decoded.request;
    check_outputs(request)?;
    if let Some(wanted) = version {
        // Refused before anything is predicted when the registry already
        // says so; checked again against the version that answers.
        let models = state.platform.models().await?;
        if models.production != Some(wanted) {
            let served = models.production.unwrap_or(0);
            return Err(not_served(state, wanted, served).await);
        }
    }
    let predictions = predict_rows(state, &decoded.rows).await?;
    state.metrics.rows(decoded.rows.len() as u64);
    if let Some(wanted) = version {
        if predictions.model_version != wanted {
            return Err(not_served(state, wanted, predictions.model_version).await);
        }
    }
    let outputs = output_tensors(request, &predictions)?;
    let mut response = json!({
        "model_name": state.config.model_name,
        "model_version": predictions.model_version.to_string(),
        "outputs": outputs.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(),
    });
    if let Some(id) = &request.id {
        response["id"] = json!(id);
    }
    Ok(encode_response(&response, outputs))
}

/// The `Inference-Header-Content-Length` header, when present.
fn header_length(headers: &HeaderMap) -> Result<Option<usize>, OipError> {
    headers
        .get(HEADER_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    OipError::new(
                        StatusCode::BAD_REQUEST,
                        "Inference-Header-Content-Length is not a number",
                    )
                })
        })
        .transpose()
}

/// The requested outputs exist: checked before anything is predicted.
fn check_outputs(request: &tensor::InferRequest) -> Result<(), OipError> {
    for o in request.outputs.iter().flatten() {
        if o.name != PREDICTION_OUTPUT && o.name != LABEL_OUTPUT {
            return Err(OipError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown output '{}': the outputs are '{PREDICTION_OUTPUT}' and, for a classifier, '{LABEL_OUTPUT}'",
                    o.name
                ),
            ));
        }
    }
    Ok(())
}

/// An output tensor's JSON, and its bytes when it is sent in binary.
type Output = (Value, Option<Vec<u8>>);

/// Each requested output (all of them by default) as a tensor, with its
/// bytes when it is asked for in binary.
fn output_tensors(
    request: &tensor::InferRequest,
    predictions: &Predictions,
) -> Result<Vec<Output>, OipError> {
    let n = predictions.values.len();
    let wanted: Vec<(String, bool)> = match &request.outputs {
        Some(list) => list
            .iter()
            .map(|o| (o.name.clone(), wants_binary(request, Some(o))))
            .collect(),
        None => {
            let binary = wants_binary(request, None);
            let mut all = vec![(PREDICTION_OUTPUT.to_owned(), binary)];
            if predictions.labels.is_some() {
                all.push((LABEL_OUTPUT.to_owned(), binary));
            }
            all
        }
    };
    let mut outputs = Vec::with_capacity(wanted.len());
    for (name, binary) in wanted {
        let (datatype, data, raw): (&str, Value, Vec<u8>) = if name == PREDICTION_OUTPUT {
            let raw = predictions.values.iter().flat_map(|v| v.to_le_bytes());
            ("FP64", json!(predictions.values), raw.collect())
        } else {
            let Some(labels) = &predictions.labels else {
                return Err(OipError::new(
                    StatusCode::BAD_REQUEST,
                    format!("output '{LABEL_OUTPUT}' exists for a classifier only; this model is a regression"),
                ));
            };
            let raw = labels.iter().flat_map(|v| v.to_le_bytes());
            ("INT64", json!(labels), raw.collect())
        };
        let mut tensor = json!({ "name": name, "datatype": datatype, "shape": [n] });
        if binary {
            tensor["parameters"] = json!({ "binary_data_size": raw.len() });
            outputs.push((tensor, Some(raw)));
        } else {
            tensor["data"] = data;
            outputs.push((tensor, None));
        }
    }
    Ok(outputs)
}

/// The response: JSON alone, or JSON followed by the binary outputs with
/// the JSON's length in `Inference-Header-Content-Length`.
fn encode_response(response: &Value, outputs: Vec<Output>) -> Response {
    let json_bytes = serde_json::to_vec(response).expect("responses serialise");
    let binary: Vec<u8> = outputs
        .into_iter()
        .filter_map(|(_, b)| b)
        .flatten()
        .collect();
    if binary.is_empty() {
        return (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            json_bytes,
        )
            .into_response();
    }
    let json_len = json_bytes.len();
    let mut body = json_bytes;
    body.extend_from_slice(&binary);
    let mut response = (
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response();
    response.headers_mut().insert(
        HEADER_LENGTH,
        HeaderValue::from_str(&json_len.to_string()).expect("a number"),
    );
    response
}

/// The error for a version that did not answer: 404 when the registry does
/// not hold it, 400 when it does but is not production.
async fn not_served(state: &AppState, wanted: u64, served: u64) -> OipError {
    let known = match state.platform.models().await {
        Ok(models) => models.models.iter().any(|m| m.version == wanted),
        Err(_) => true,
    };
    if known {
        OipError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "version {wanted} is in the registry but not served: the predictors serve the production version only (now {served})"
            ),
        )
    } else {
        OipError::new(
            StatusCode::NOT_FOUND,
            format!(
                "model '{}' has no version {wanted}",
                state.config.model_name
            ),
        )
    }
}
