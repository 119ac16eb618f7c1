//! Message shapes exchanged over NATS.
//!
//! Public subjects (`ml.predict`, `ml.train`, the registry listings, the
//! monitor) speak JSON so any NATS client can use them; the model-carrying
//! internal subjects use [`crate::codec`].

use std::collections::BTreeMap;

use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};

use crate::lifecycle::GateReport;
use crate::model::ModelArtifact;
use crate::profile::FeatureSample;
use crate::routing::{RouteError, RouteTable, Variant};

/// Header the NATS micro-service protocol uses for an error description.
pub const SERVICE_ERROR_HEADER: &str = "Nats-Service-Error";
/// Header the NATS micro-service protocol uses for a numeric error code.
pub const SERVICE_ERROR_CODE_HEADER: &str = "Nats-Service-Error-Code";

/// A prediction request: exactly one of `user_id`, `user_ids` or `features`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    /// An entity in the feature store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// A batch of entities in the feature store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_ids: Option<Vec<String>>,
    /// Raw features of an entity that is not in the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<BTreeMap<String, f64>>,
    /// What a sticky routing table hashes to pick a version (by default
    /// the `user_id`, or a batch's first id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
}

/// A successful prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictReply {
    /// The entity, when the request named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The model's output: the value for a regression model, the
    /// probability of class 1 for a classifier.
    pub prediction: f64,
    /// A classifier's label (`1` when the probability is at least 0.5);
    /// absent for a regression model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<u8>,
    /// The registry version of the model that answered.
    pub model_version: u64,
    /// Which side of the routing table answered (only while one is in force).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<Variant>,
    /// This reply's unique id (the join key for later feedback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// A successful batch prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchPredictReply {
    /// One per requested user, in order; `null` for a user not in the store.
    pub predictions: Vec<Option<f64>>,
    /// A classifier's labels, one per prediction (absent for a regression model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<Option<u8>>>,
    /// The registry version of the model that answered.
    pub model_version: u64,
    /// The requested ids that are not in the store.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unknown_user_ids: Vec<String>,
    /// Which side of the routing table answered (only while one is in force).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<Variant>,
    /// This reply's unique id (the join key for later feedback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Machine-readable error codes, stable across releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed; the message says how.
    BadRequest,
    /// The `user_id` is not in the feature store.
    UnknownUser,
    /// No model has been published yet (or none could be loaded).
    NoModel,
    /// The service could not complete the operation; retrying may help.
    Unavailable,
    /// A bug or an unexpected failure.
    Internal,
    /// Too many requests in flight: this one was refused unread; retry,
    /// preferably after a short pause (another replica may take it).
    Busy,
    /// Another writer changed the state first (a lost compare-and-set):
    /// nothing was applied; retry.
    Conflict,
    /// The state store (JetStream) has no quorum or does not answer: the
    /// write failed; retry once it is back.
    NoQuorum,
}

impl ErrorCode {
    /// The snake_case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownUser => "unknown_user",
            ErrorCode::NoModel => "no_model",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Busy => "busy",
            ErrorCode::Conflict => "conflict",
            ErrorCode::NoQuorum => "no_quorum",
        }
    }

    /// The HTTP-like number sent in the `Nats-Service-Error-Code` header.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::UnknownUser => 404,
            ErrorCode::NoModel | ErrorCode::Unavailable | ErrorCode::Busy | ErrorCode::NoQuorum => {
                503
            }
            ErrorCode::Conflict => 409,
            ErrorCode::Internal => 500,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of an error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What kind of error.
    pub code: ErrorCode,
    /// A sentence for a person.
    pub message: String,
    /// Which problem, by a stable name, where a subject documents them
    /// (`ml.registry.route`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// An error reply: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// The error.
    pub error: ErrorBody,
}

impl ErrorReply {
    /// An error reply with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorBody {
                code,
                message: message.into(),
                problem: None,
            },
        }
    }

    /// A `bad_request` naming a routing problem.
    pub fn route(error: &RouteError) -> Self {
        let mut reply = Self::new(ErrorCode::BadRequest, error.message.clone());
        reply.error.problem = Some(error.problem.as_str().to_owned());
        reply
    }
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error.code, self.error.message)
    }
}

impl std::error::Error for ErrorReply {}

/// A JSON reply that is either an error or a `T`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ApiReply<T> {
    /// `{"error": {...}}`.
    Err(ErrorReply),
    /// The successful reply.
    Ok(T),
}

impl<T> ApiReply<T> {
    /// As a `Result`.
    pub fn into_result(self) -> Result<T, ErrorReply> {
        match self {
            ApiReply::Ok(v) => Ok(v),
            ApiReply::Err(e) => Err(e),
        }
    }
}

/// Outcome of one prediction, as the monitor counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answered with a prediction.
    Ok,
    /// Answered with an error of this code.
    #[serde(untagged)]
    Error(ErrorCode),
}

/// One prediction's latency, from request received to reply sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyEvent {
    /// When the request was answered, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Time spent in the predictor, in nanoseconds.
    pub duration_ns: u64,
    /// Model that answered, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<u64>,
    /// Success or the error code.
    pub outcome: Outcome,
    /// For a sampled successful request: its raw features (named by
    /// [`EventBatch::raw_features`]) and the prediction, for drift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<FeatureSample>,
    /// Which side of the routing table answered (only with a table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<Variant>,
    /// For a successful single prediction (`user_id` or `features`): what
    /// the monitor joins with later feedback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<AnswerRecord>,
}

/// What a predictor answered to one request, and what the shadow computed
/// for it, for the monitor to join with feedback (`ml.feedback`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerRecord {
    /// The reply's `request_id` (at most [`MAX_REQUEST_ID_BYTES`]).
    pub request_id: String,
    /// The served prediction (a classifier's: the probability of class 1).
    pub prediction: f64,
    /// A classifier's served label; absent for a regressor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<u8>,
    /// The shadow's answer, when this request was shadowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowRun>,
}

/// Longest `request_id` an event may carry, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 200;

/// What the shadow version computed for a request, after its reply was sent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowRun {
    /// The shadow version.
    pub version: u64,
    /// Time the shadow's computation took, in nanoseconds.
    pub duration_ns: u64,
    /// Its prediction (a classifier's: the probability of class 1).
    pub prediction: f64,
    /// A classifier's label; absent for a regressor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<u8>,
}

/// A batch of latency events from one predictor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBatch {
    /// Which predictor instance sent it.
    pub predictor: String,
    /// Number of this batch's first event among all the events this
    /// predictor has sent (0 for its first): a gap tells the monitor that
    /// events were lost in transit.
    #[serde(default)]
    pub seq: u64,
    /// Events this predictor dropped (monitor path full) since the last batch.
    #[serde(default)]
    pub dropped: u64,
    /// Shadow runs this predictor skipped (its shadow queue full) since the
    /// last batch.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shadow_dropped: u64,
    /// Names of the raw features in the events' samples, in order (empty
    /// when no event is sampled).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub raw_features: Vec<String>,
    /// The events.
    pub events: Vec<LatencyEvent>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Training parameters, recorded with each run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainParams {
    /// Model family.
    pub model: String,
    /// Seed of the train/validation split.
    pub seed: u64,
    /// Share of rows held out for validation.
    pub validation_fraction: f64,
}

/// Validation metrics of a run: RMSE, MAE and R² for a regression model;
/// accuracy, log-loss and ROC AUC for a classifier. The others are absent,
/// and left out of the JSON: `{"rmse":0.1,"mae":0.08,"r2":0.99}`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
pub struct Metrics {
    /// Root mean squared error.
    #[serde(default)]
    pub rmse: Option<f64>,
    /// Mean absolute error.
    #[serde(default)]
    pub mae: Option<f64>,
    /// Coefficient of determination.
    #[serde(default)]
    pub r2: Option<f64>,
    /// Share of labels predicted right (threshold 0.5).
    #[serde(default)]
    pub accuracy: Option<f64>,
    /// Mean negative log-likelihood of the true labels.
    #[serde(default)]
    pub log_loss: Option<f64>,
    /// Area under the ROC curve.
    #[serde(default)]
    pub roc_auc: Option<f64>,
}

impl Metrics {
    /// Every metric name, in column order.
    pub const NAMES: [&'static str; 6] = ["rmse", "mae", "r2", "accuracy", "log_loss", "roc_auc"];

    /// The metrics of a regression model.
    pub fn regression(rmse: f64, mae: f64, r2: f64) -> Self {
        Self {
            rmse: Some(rmse),
            mae: Some(mae),
            r2: Some(r2),
            ..Self::default()
        }
    }

    /// The metrics of a classifier.
    pub fn classification(accuracy: f64, log_loss: f64, roc_auc: f64) -> Self {
        Self {
            accuracy: Some(accuracy),
            log_loss: Some(log_loss),
            roc_auc: Some(roc_auc),
            ..Self::default()
        }
    }

    /// Each metric by name, in [`Metrics::NAMES`] order.
    pub fn fields(&self) -> [(&'static str, Option<f64>); 6] {
        [
            ("rmse", self.rmse),
            ("mae", self.mae),
            ("r2", self.r2),
            ("accuracy", self.accuracy),
            ("log_loss", self.log_loss),
            ("roc_auc", self.roc_auc),
        ]
    }

    /// One metric by name.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.fields()
            .into_iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v)
    }

    /// Whether at least one metric is present and every present one is finite.
    pub fn all_finite(&self) -> bool {
        let present: Vec<f64> = self.fields().into_iter().filter_map(|(_, v)| v).collect();
        !present.is_empty() && present.iter().all(|v| v.is_finite())
    }

    /// The first metric outside its range of possible values, described:
    /// an error or a loss below 0, an R² above 1, an accuracy or AUC outside
    /// [0, 1]. NaN is out of range too (use [`Metrics::all_finite`] to
    /// require every metric).
    pub fn range_error(&self) -> Option<String> {
        self.fields().into_iter().find_map(|(name, value)| {
            let v = value?;
            let ok = match name {
                "rmse" | "mae" | "log_loss" => v >= 0.0,
                "r2" => v <= 1.0,
                _ => (0.0..=1.0).contains(&v),
            };
            (!ok || v.is_nan()).then(|| format!("{name} {v} is outside its possible range"))
        })
    }
}

impl Serialize for Metrics {
    /// JSON leaves absent metrics out; the binary codec, which is not
    /// self-describing, writes every field.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let human = serializer.is_human_readable();
        let fields = self.fields();
        let len = if human {
            fields.iter().filter(|(_, v)| v.is_some()).count()
        } else {
            fields.len()
        };
        let mut out = serializer.serialize_struct("Metrics", len)?;
        for (name, value) in fields {
            if !human || value.is_some() {
                out.serialize_field(name, &value)?;
            }
        }
        out.end()
    }
}

/// What a trainer knows of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Unique id of the run.
    pub run_id: String,
    /// When the run started, ms since the Unix epoch.
    pub started_ms: u64,
    /// How long loading, fitting and scoring took.
    pub duration_ms: u64,
    /// The parameters.
    pub params: TrainParams,
    /// Validation metrics.
    pub metrics: Metrics,
    /// Rows used to fit.
    pub rows_train: usize,
    /// Rows held out.
    pub rows_validation: usize,
    /// The data file.
    pub data_path: String,
    /// Fingerprint of the data file.
    pub data_fingerprint: String,
    /// Feature names, in model order.
    pub feature_names: Vec<String>,
}

/// A trainer's submission to the registry (binary, through [`crate::codec`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submission {
    /// The run.
    pub run: RunRecord,
    /// The trained model.
    pub artifact: ModelArtifact,
}

/// An operator's import of an ONNX model (binary, through [`crate::codec`]):
/// the file and its lineage. The registry checks and evaluates the model
/// itself; the reply is a [`SubmitReply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportRequest {
    /// The ONNX graph and the SHA-256 of the file as the importer read it.
    pub graph: crate::model::OnnxGraph,
    /// The declared kind ([`crate::model::ModelKind::OnnxRegressor`] or
    /// [`crate::model::ModelKind::OnnxClassifier`]); `None` to take the
    /// model's outputs' word.
    pub kind: Option<crate::model::ModelKind>,
    /// The model's input features (raw or derived), in input order.
    pub feature_names: Vec<String>,
    /// The file's name, for the run record.
    pub file_name: String,
    /// Who imports it.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// When the importer read the file, ms since the Unix epoch.
    pub read_ms: u64,
}

/// The registry's reply to a submission (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitReply {
    /// The version assigned.
    pub version: u64,
    /// Whether it became the production model.
    pub production: bool,
    /// The promotion gate's decision, with the metric and the tolerance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateReport>,
}

/// A production model as published to predictors (binary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRelease {
    /// Registry version of the model.
    pub version: u64,
    /// Number of production changes so far; a predictor never goes back to
    /// a smaller epoch, whatever order messages arrive in.
    pub epoch: u64,
    /// The identity of the registry directory that published it: epochs
    /// compare only between releases of one registry (see
    /// [`crate::production::compare`]).
    pub registry_id: String,
    /// The model.
    pub artifact: ModelArtifact,
    /// The routing table in force with it, and the models it names.
    pub routing: Option<Box<RoutingRelease>>,
}

/// A routing table as published with the production model (binary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingRelease {
    /// The table.
    pub table: RouteTable,
    /// The model of every version the table names, in the table's order
    /// (candidates, then the shadow).
    pub models: Vec<VersionedArtifact>,
}

/// A model and its version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionedArtifact {
    /// Registry version.
    pub version: u64,
    /// The model.
    pub artifact: ModelArtifact,
}

/// Reply to a predictor asking for the production model (binary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ProductionReply {
    /// No model is in production yet.
    NoModel,
    /// The caller's epoch is current.
    Current,
    /// The production model.
    Release(ModelRelease),
}

/// A predictor's question: "the production model, if newer than this epoch".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProductionQuery {
    /// The epoch the predictor holds (0 when it holds none).
    pub after_epoch: u64,
    /// The registry whose model the asker holds, if any: a registry that
    /// hears of another registry's model, or of a later epoch of its own,
    /// knows its state is not what is being served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_id: Option<String>,
    /// The version the asker holds, if any (for the registry's log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// One stored model version, as listed by the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// The version.
    pub version: u64,
    /// When it was registered (RFC 3339).
    pub created_at: String,
    /// Model family.
    pub kind: String,
    /// Whether it is the production model.
    pub production: bool,
    /// The aliases that name it (`production`, `candidate`).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The production version when it was registered, if any.
    #[serde(default)]
    pub parent: Option<u64>,
    /// Validation metrics of its run.
    pub metrics: Metrics,
    /// Its features, in order.
    pub feature_names: Vec<String>,
    /// Fingerprint of its training data.
    pub data_fingerprint: String,
    /// The run that produced it.
    pub run_id: String,
    /// The artifact file, relative to the registry directory.
    pub artifact: String,
}

/// The registry's list of models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelsReply {
    /// The production version, if any.
    pub production: Option<u64>,
    /// Every alias and the version it names.
    #[serde(default)]
    pub aliases: BTreeMap<String, u64>,
    /// The stored versions of the page asked for, oldest first.
    pub models: Vec<ModelSummary>,
    /// How many versions the registry stores in all.
    #[serde(default)]
    pub total: usize,
    /// Versions whose artifact file is unreadable or fails its checksum:
    /// never served.
    #[serde(default)]
    pub corrupt: Vec<CorruptVersion>,
}

/// A version whose artifact cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorruptVersion {
    /// The version.
    pub version: u64,
    /// What is wrong with its file.
    pub reason: String,
}

/// One row of the experiments log (`experiments.csv`), also sent as JSON.
/// Empty cells (absent values) are `null` in JSON. The default is a row of
/// empty cells (its header is the log's header).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ExperimentRow {
    /// When the registry recorded it (RFC 3339).
    pub timestamp: String,
    /// The version assigned (none for a failed run).
    pub version: Option<u64>,
    /// The run id.
    pub run_id: String,
    /// `production` or `candidate` (where the promotion gate put it),
    /// `registered` (stored, gate not run), or `failed`.
    #[serde(default)]
    pub status: String,
    /// Model family.
    pub model: String,
    /// Split seed.
    pub seed: u64,
    /// Validation share.
    pub validation_fraction: f64,
    /// Validation RMSE (regression).
    #[serde(default)]
    pub rmse: Option<f64>,
    /// Validation MAE (regression).
    #[serde(default)]
    pub mae: Option<f64>,
    /// Validation R² (regression).
    #[serde(default)]
    pub r2: Option<f64>,
    /// Validation accuracy (classification).
    #[serde(default)]
    pub accuracy: Option<f64>,
    /// Validation log-loss (classification).
    #[serde(default)]
    pub log_loss: Option<f64>,
    /// Validation ROC AUC (classification).
    #[serde(default)]
    pub roc_auc: Option<f64>,
    /// Rows used to fit.
    #[serde(default)]
    pub rows_train: Option<usize>,
    /// Rows held out.
    #[serde(default)]
    pub rows_validation: Option<usize>,
    /// Fingerprint of the data.
    pub data_fingerprint: String,
    /// Features, `;`-separated, in model order.
    pub features: String,
    /// Training time.
    pub duration_ms: u64,
    /// Artifact file, relative to the registry directory.
    pub artifact: String,
    /// The production version when it was registered.
    #[serde(default)]
    pub parent: Option<u64>,
    /// Why it has its status: the gate's comparison, or the failure.
    #[serde(default)]
    pub reason: String,
}

impl ExperimentRow {
    /// The row's metrics.
    pub fn metrics(&self) -> Metrics {
        Metrics {
            rmse: self.rmse,
            mae: self.mae,
            r2: self.r2,
            accuracy: self.accuracy,
            log_loss: self.log_loss,
            roc_auc: self.roc_auc,
        }
    }
}

/// The registry's experiments log, one page of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunsReply {
    /// The runs of the page asked for, oldest first.
    pub runs: Vec<ExperimentRow>,
    /// How many runs the log holds in all.
    #[serde(default)]
    pub total: usize,
}

/// Which part of a listing to send (`ml.registry.models`, `ml.registry.runs`;
/// an empty payload means the newest [`Page::DEFAULT_LIMIT`] entries). The
/// newest entries come first in paging order: `offset` skips that many of
/// the most recent ones, so `{"limit":100,"offset":100}` is the page before
/// the newest hundred. Within a page, entries are listed oldest first. No
/// reply outgrows the server's payload limit, whatever the registry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    /// At most this many entries (default [`Page::DEFAULT_LIMIT`], at most
    /// [`Page::MAX_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Skip this many of the most recent entries first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<usize>,
}

impl Page {
    /// Entries in a page when the request names no limit.
    pub const DEFAULT_LIMIT: usize = 100;
    /// The largest page: with every entry's text fields bounded, this many
    /// fit well within a 1 MB reply.
    pub const MAX_LIMIT: usize = 500;

    /// The range of indices (into a list of `total` entries, oldest first)
    /// this page covers; an error names a limit out of range.
    pub fn range(&self, total: usize) -> Result<std::ops::Range<usize>, String> {
        let limit = self.limit.unwrap_or(Self::DEFAULT_LIMIT);
        if limit == 0 || limit > Self::MAX_LIMIT {
            return Err(format!(
                "limit {limit} is out of range: 1 to {}",
                Self::MAX_LIMIT
            ));
        }
        let end = total.saturating_sub(self.offset.unwrap_or(0));
        Ok(end.saturating_sub(limit)..end)
    }
}

/// A trainer's answer to a training request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReply {
    /// The version the registry assigned.
    pub version: u64,
    /// Whether it became the production model.
    pub production: bool,
    /// The promotion gate's decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateReport>,
    /// The run.
    pub run: RunRecord,
}

/// A request on `ml.train` (JSON; an empty body is the default, `{}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainRequest {
    /// Send progress messages ([`TrainProgress`]) to the reply subject
    /// before the final reply.
    #[serde(default)]
    pub progress: bool,
}

/// What a progress message reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressEvent {
    /// A pass over the data file is under way (sent about once a second).
    Reading,
    /// A pass over the data file is done.
    PassDone,
    /// The model is fitted and scored; the registry is evaluating it. The
    /// report's `pass_number` is then the number of passes made, `bytes` the
    /// file's size, and its rates those of all passes together.
    Submitting,
}

/// A progress message of a run asked for with `{"progress":true}`: sent to
/// the request's reply subject before the final reply, which is a
/// [`TrainReply`] or an error. Its one key, `progress`, tells them apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainProgress {
    /// The report.
    pub progress: ProgressReport,
}

/// Where a run is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressReport {
    /// What happened.
    pub event: ProgressEvent,
    /// The pass (`statistics`, `newton`, `scoring`), while reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass: Option<String>,
    /// The pass's number, from 1.
    pub pass_number: u32,
    /// Rows read in this pass so far.
    pub rows: u64,
    /// Bytes read in this pass so far.
    pub bytes: u64,
    /// Size of the data file in bytes.
    pub total_bytes: u64,
    /// Seconds since the run started.
    pub elapsed_s: f64,
    /// Read rate of this pass, rows per second.
    pub rows_per_s: f64,
    /// Read rate of this pass, MB (10⁶ bytes) per second.
    pub mb_per_s: f64,
    /// Seconds left in this pass at its rate so far (a logistic fit makes
    /// as many passes as its solver needs, so no run-wide estimate exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_accept_either_form_and_refuse_unknown_fields() {
        let r: PredictRequest = serde_json::from_str(r#"{"user_id":"u1"}"#).unwrap();
        assert_eq!(r.user_id.as_deref(), Some("u1"));
        let r: PredictRequest =
            serde_json::from_str(r#"{"features":{"feature_1":0.3,"feature_2":1.5}}"#).unwrap();
        assert_eq!(r.features.unwrap()["feature_2"], 1.5);
        assert!(serde_json::from_str::<PredictRequest>(r#"{"user":"u1"}"#).is_err());
    }

    #[test]
    fn error_replies_have_the_documented_shape() {
        let json = serde_json::to_string(&ErrorReply::new(ErrorCode::UnknownUser, "no such user"))
            .unwrap();
        assert_eq!(
            json,
            r#"{"error":{"code":"unknown_user","message":"no such user"}}"#
        );
        let parsed: ApiReply<PredictReply> = serde_json::from_str(&json).unwrap();
        assert!(parsed.into_result().is_err());
        let ok: ApiReply<PredictReply> =
            serde_json::from_str(r#"{"prediction":1.0,"model_version":2}"#).unwrap();
        assert_eq!(ok.into_result().unwrap().model_version, 2);
    }

    #[test]
    fn metrics_leave_absent_values_out_of_json_but_not_out_of_the_codec() {
        let m = Metrics::regression(0.1, 0.08, 0.99);
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"rmse":0.1,"mae":0.08,"r2":0.99}"#
        );
        let c = Metrics::classification(0.9, 0.3, 0.95);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, r#"{"accuracy":0.9,"log_loss":0.3,"roc_auc":0.95}"#);
        assert_eq!(serde_json::from_str::<Metrics>(&json).unwrap(), c);
        let bytes = crate::codec::encode(&c);
        assert_eq!(crate::codec::decode::<Metrics>(&bytes).unwrap(), c);
        assert_eq!(c.get("roc_auc"), Some(0.95));
        assert_eq!(c.get("rmse"), None);
        assert!(c.all_finite());
        assert!(!Metrics::regression(0.1, 0.1, f64::NAN).all_finite());
        assert!(!Metrics::default().all_finite());
    }

    #[test]
    fn outcomes_serialise_as_plain_strings() {
        assert_eq!(serde_json::to_string(&Outcome::Ok).unwrap(), r#""ok""#);
        assert_eq!(
            serde_json::to_string(&Outcome::Error(ErrorCode::NoModel)).unwrap(),
            r#""no_model""#
        );
        let o: Outcome = serde_json::from_str(r#""bad_request""#).unwrap();
        assert_eq!(o, Outcome::Error(ErrorCode::BadRequest));
    }

    #[test]
    fn train_requests_default_to_no_progress_and_refuse_unknown_fields() {
        let r: TrainRequest = serde_json::from_str("{}").unwrap();
        assert!(!r.progress);
        let r: TrainRequest = serde_json::from_str(r#"{"progress":true}"#).unwrap();
        assert!(r.progress);
        assert!(serde_json::from_str::<TrainRequest>(r#"{"progres":true}"#).is_err());
        let p = TrainProgress {
            progress: ProgressReport {
                event: ProgressEvent::PassDone,
                pass: Some("statistics".into()),
                pass_number: 1,
                rows: 10,
                bytes: 100,
                total_bytes: 100,
                elapsed_s: 0.5,
                rows_per_s: 20.0,
                mb_per_s: 0.0002,
                eta_s: None,
            },
        };
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.starts_with(r#"{"progress":{"event":"pass_done","pass":"statistics""#));
        assert_eq!(serde_json::from_str::<TrainProgress>(&json).unwrap(), p);
    }
}
