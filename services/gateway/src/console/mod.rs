//! The web console, server-rendered from the registry's and the monitor's
//! replies (no JavaScript build step: a small ES module, shipped in the
//! binary, sorts tables and feeds the live panel from server-sent events).
//!
//! | page | what |
//! |---|---|
//! | `/`, `/models` | versions, aliases, kind, parent, metrics, features, data fingerprint; `?compare=rmse` charts a metric across versions; promote and rollback forms for an operator |
//! | `/runs` | the experiments log, `?where=r2 > 0.9&sort=rmse&desc=1` as `mlctl runs`; `/runs.csv` the same rows as CSV |
//! | `/versions/{v}` | lineage: run → data fingerprint → version → every alias move naming it, with who and why |
//! | `/history` | every alias move |
//! | `/live` | throughput, latency, errors, versions, drift and alerts, updated every `GATEWAY_LIVE_INTERVAL` |
//! | `/login`, `/logout` | an operator signs in and out (see [`auth`]) |
//!
//! `POST /console/promote` and `POST /console/rollback` take a form with the
//! CSRF token and send the registry's request with the operator's name as
//! `actor`; without a session they are refused (401), with a wrong token or
//! a foreign `Origin` too (403).

pub mod auth;
mod pages;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::header::{CONTENT_TYPE, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use ml_shared::lifecycle::{HistoryReply, MoveReply, PromoteRequest, RollbackRequest};
use ml_shared::messages::{ModelsReply, RunsReply};
use serde::Deserialize;

pub use auth::Operators;

use crate::platform::PlatformError;
use crate::AppState;

/// The console's ES module.
pub const SCRIPT: &str = include_str!("console.js");
/// The console's style sheet.
pub const STYLE: &str = include_str!("console.css");

/// The console's routes.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(models_page))
        .route("/models", get(models_page))
        .route("/runs", get(runs_page))
        .route("/runs.csv", get(runs_csv))
        .route("/versions/{version}", get(lineage_page))
        .route("/history", get(history_page))
        .route("/live", get(live_page))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/console/promote", post(promote))
        .route("/console/rollback", post(rollback))
        .route("/static/console.js", get(script))
        .route("/static/console.css", get(style))
}

/// Who is looking at a page.
#[derive(Debug, Clone, Default)]
pub struct Viewer {
    /// The signed-in operator, if any.
    pub operator: Option<String>,
    /// The CSRF token for forms, when signed in.
    pub csrf: Option<String>,
    /// Whether promote and rollback are configured at all.
    pub operators_configured: bool,
}

fn viewer(state: &AppState, headers: &HeaderMap) -> Viewer {
    let cookie = auth::session_cookie(headers);
    let operator = cookie
        .as_deref()
        .and_then(|c| state.operators.verify(c, ml_shared::time::now_ms()));
    Viewer {
        csrf: operator
            .as_ref()
            .and(cookie.as_deref())
            .map(|c| state.operators.csrf(c)),
        operator,
        operators_configured: state.operators.count() > 0,
    }
}

/// A page that could not be made: the status and a sentence.
#[derive(Debug)]
pub struct PageError(StatusCode, String);

impl From<PlatformError> for PageError {
    fn from(e: PlatformError) -> Self {
        PageError(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY),
            e.message(),
        )
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let body = pages::layout(
            "Error",
            &Viewer::default(),
            &format!(
                "<h1>{}</h1><p class=\"error\">{}</p>",
                self.0.as_u16(),
                pages::esc(&self.1)
            ),
        );
        (self.0, Html(body)).into_response()
    }
}

fn guard(state: &AppState, viewer: &Viewer) -> Result<(), Box<Response>> {
    if state.config.console_private && viewer.operator.is_none() {
        return Err(Box::new(
            (StatusCode::SEE_OTHER, [(LOCATION, "/login")]).into_response(),
        ));
    }
    Ok(())
}

async fn registry<T: serde::de::DeserializeOwned>(
    state: &AppState,
    subject: &str,
) -> Result<T, PageError> {
    Ok(state
        .platform
        .request_json("registry", subject, Bytes::new())
        .await?)
}

#[derive(Debug, Deserialize)]
struct ModelsQuery {
    compare: Option<String>,
}

async fn models_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ModelsQuery>,
) -> Result<Response, PageError> {
    let viewer = viewer(&state, &headers);
    if let Err(r) = guard(&state, &viewer) {
        return Ok(*r);
    }
    let models: ModelsReply = registry(&state, &state.platform.subjects().registry_models).await?;
    let metric = q
        .compare
        .filter(|m| ml_shared::messages::Metrics::NAMES.contains(&m.as_str()));
    Ok(Html(pages::models(&viewer, &models, metric.as_deref())).into_response())
}

async fn runs_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let viewer = viewer(&state, &headers);
    if let Err(r) = guard(&state, &viewer) {
        return Ok(*r);
    }
    let runs: RunsReply = registry(&state, &state.platform.subjects().registry_runs).await?;
    let selection = pages::RunSelection::from_query(&q);
    Ok(Html(pages::runs(&viewer, runs.runs, &selection)).into_response())
}

async fn runs_csv(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let viewer = viewer(&state, &headers);
    if let Err(r) = guard(&state, &viewer) {
        return Ok(*r);
    }
    let runs: RunsReply = registry(&state, &state.platform.subjects().registry_runs).await?;
    let selection = pages::RunSelection::from_query(&q);
    let rows = selection
        .apply(runs.runs)
        .map_err(|e| PageError(StatusCode::BAD_REQUEST, e))?;
    Ok((
        [
            (CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                axum::http::header::CONTENT_DISPOSITION,
                "attachment; filename=\"runs.csv\"",
            ),
        ],
        pages::csv(&rows),
    )
        .into_response())
}

async fn lineage_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(version): Path<String>,
) -> Result<Response, PageError> {
    let viewer = viewer(&state, &headers);
    if let Err(r) = guard(&state, &viewer) {
        return Ok(*r);
    }
    let version: u64 = version
        .parse()
        .map_err(|_| PageError(StatusCode::NOT_FOUND, format!("no version {version:?}")))?;
    let subjects = state.platform.subjects().clone();
    let models: ModelsReply = registry(&state, &subjects.registry_models).await?;
    let runs: RunsReply = registry(&state, &subjects.registry_runs).await?;
    let history: HistoryReply = registry(&state, &subjects.registry_history).await?;
    let Some(model) = models.models.iter().find(|m| m.version == version) else {
        return Err(PageError(
            StatusCode::NOT_FOUND,
            format!("the registry holds no version {version}"),
        ));
    };
    Ok(Html(pages::lineage(
        &viewer,
        &models,
        model,
        &runs.runs,
        &history.moves,
    ))
    .into_response())
}

async fn history_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let viewer = viewer(&state, &headers);
    if let Err(r) = guard(&state, &viewer) {
        return Ok(*r);
    }
    let history: HistoryReply =
        registry(&state, &state.platform.subjects().registry_history).await?;
    Ok(Html(pages::history(&viewer, &history.moves)).into_response())
}

async fn live_page(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let viewer = viewer(&state, &headers);
    if let Err(r) = guard(&state, &viewer) {
        return *r;
    }
    Html(pages::live(&viewer)).into_response()
}

async fn login_page(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    Html(pages::login(&viewer(&state, &headers), None)).into_response()
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    name: String,
    password: String,
}

async fn login(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if !auth::same_origin(&headers) {
        return (StatusCode::FORBIDDEN, "cross-origin sign-in refused").into_response();
    }
    if !state.operators.check(&form.name, &form.password) {
        tracing::warn!(operator = %form.name, "console sign-in refused");
        let page = pages::login(&Viewer::default(), Some("wrong name or password"));
        return (StatusCode::UNAUTHORIZED, Html(page)).into_response();
    }
    tracing::info!(operator = %form.name, "operator signed in to the console");
    let cookie = state
        .operators
        .session(&form.name, ml_shared::time::now_ms());
    let max_age = state.config.session_ttl.as_secs();
    (
        StatusCode::SEE_OTHER,
        [
            (LOCATION, "/models".to_owned()),
            (
                SET_COOKIE,
                format!(
                    "{}={cookie}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}",
                    auth::COOKIE
                ),
            ),
        ],
    )
        .into_response()
}

async fn logout() -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (LOCATION, "/models".to_owned()),
            (
                SET_COOKIE,
                format!(
                    "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
                    auth::COOKIE
                ),
            ),
        ],
    )
        .into_response()
}

/// The operator behind a state-changing form, or the refusal.
fn operator_for_action(
    state: &AppState,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<String, Box<Response>> {
    let refuse = |status: StatusCode, why: &str| {
        tracing::warn!(%why, "console action refused");
        let body = pages::layout(
            "Refused",
            &Viewer::default(),
            &format!("<h1>Refused</h1><p class=\"error\">{}</p>", pages::esc(why)),
        );
        Box::new((status, Html(body)).into_response())
    };
    let Some(cookie) = auth::session_cookie(headers) else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "sign in as an operator first",
        ));
    };
    let Some(operator) = state.operators.verify(&cookie, ml_shared::time::now_ms()) else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "the session is not valid: sign in again",
        ));
    };
    if !auth::same_origin(headers) || !state.operators.csrf_ok(&cookie, csrf) {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "the form's CSRF token or origin is wrong",
        ));
    }
    Ok(operator)
}

#[derive(Debug, Deserialize)]
struct PromoteForm {
    version: u64,
    reason: String,
    csrf: String,
}

async fn promote(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(form): Form<PromoteForm>,
) -> Response {
    let operator = match operator_for_action(&state, &headers, &form.csrf) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let request = PromoteRequest {
        version: form.version,
        reason: form.reason.trim().to_owned(),
        actor: operator.clone(),
    };
    let body = serde_json::to_vec(&request).expect("requests serialise");
    let subject = state.platform.subjects().registry_promote.clone();
    let result: Result<MoveReply, _> = state
        .platform
        .request_json("registry", &subject, body.into())
        .await;
    state.platform.forget_models().await;
    action_result(&state, &headers, "promote", &operator, result)
}

#[derive(Debug, Deserialize)]
struct RollbackForm {
    #[serde(default)]
    reason: String,
    csrf: String,
}

async fn rollback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(form): Form<RollbackForm>,
) -> Response {
    let operator = match operator_for_action(&state, &headers, &form.csrf) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let reason = form.reason.trim();
    let request = RollbackRequest {
        reason: (!reason.is_empty()).then(|| reason.to_owned()),
        actor: operator.clone(),
    };
    let body = serde_json::to_vec(&request).expect("requests serialise");
    let subject = state.platform.subjects().registry_rollback.clone();
    let result: Result<MoveReply, _> = state
        .platform
        .request_json("registry", &subject, body.into())
        .await;
    state.platform.forget_models().await;
    action_result(&state, &headers, "rollback", &operator, result)
}

fn action_result(
    state: &AppState,
    headers: &HeaderMap,
    action: &str,
    operator: &str,
    result: Result<MoveReply, PlatformError>,
) -> Response {
    let viewer = viewer(state, headers);
    match result {
        Ok(reply) => {
            tracing::info!(%operator, action, from = ?reply.from, to = reply.to, "console action");
            Html(pages::moved(&viewer, action, &reply)).into_response()
        }
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
            let body = pages::layout(
                "Refused",
                &viewer,
                &format!(
                    "<h1>{action} refused</h1><p class=\"error\" id=\"action-error\">{}</p><p><a href=\"/models\">Models</a></p>",
                    pages::esc(&e.message())
                ),
            );
            (status, Html(body)).into_response()
        }
    }
}

async fn script() -> Response {
    ([(CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT).into_response()
}

async fn style() -> Response {
    ([(CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}
