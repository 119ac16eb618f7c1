//! The platform as the gateway sees it: request-reply over NATS, with the
//! failures of the transport (no responder, timeout, a broken connection)
//! told apart from the services' own structured error replies, and a short
//! cache of the registry's model list for metadata and readiness.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::client::RequestErrorKind;
use async_nats::Client;
use bytes::Bytes;
use ml_shared::messages::{ErrorReply, ModelsReply, SERVICE_ERROR_CODE_HEADER};
use ml_shared::subjects::Subjects;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, Semaphore};

/// Why a request over NATS got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// Nobody subscribes to the subject (the service is not running).
    #[error("the {0} is unavailable (no responder)")]
    NoResponders(&'static str),
    /// No reply within the NATS request timeout.
    #[error("the {0} did not answer in time")]
    Timeout(&'static str),
    /// More requests in flight than `GATEWAY_MAX_IN_FLIGHT`.
    #[error("the gateway is busy: too many requests in flight; retry")]
    Busy,
    /// The request is larger than the NATS server's `max_payload`.
    #[error("the request is larger than the NATS server's max_payload")]
    TooLarge,
    /// The service answered with a structured error.
    #[error("{0}")]
    Reply(ErrorReply, u16),
    /// The reply could not be read, or the transport failed otherwise.
    #[error("the {0} gave an unusable answer: {1}")]
    Bad(&'static str, String),
}

impl PlatformError {
    /// The HTTP status that fits.
    pub fn status(&self) -> u16 {
        match self {
            PlatformError::NoResponders(_) | PlatformError::Busy => 503,
            PlatformError::Timeout(_) => 504,
            PlatformError::TooLarge => 413,
            PlatformError::Reply(_, status) => *status,
            PlatformError::Bad(..) => 502,
        }
    }

    /// The platform's error code (`unavailable`, `busy`, … or the reply's own).
    pub fn code(&self) -> &'static str {
        match self {
            PlatformError::NoResponders(_) | PlatformError::Timeout(_) => "unavailable",
            PlatformError::Busy => "busy",
            PlatformError::TooLarge => "bad_request",
            PlatformError::Reply(reply, _) => reply.error.code.as_str(),
            PlatformError::Bad(..) => "internal",
        }
    }

    /// A sentence for a person.
    pub fn message(&self) -> String {
        match self {
            PlatformError::Reply(reply, _) => reply.error.message.clone(),
            other => other.to_string(),
        }
    }
}

/// A raw reply: the payload and, for an error reply, its status.
#[derive(Debug, Clone)]
pub struct RawReply {
    /// The JSON payload as the service sent it.
    pub payload: Bytes,
    /// `Nats-Service-Error-Code` when the reply is an error.
    pub error_status: Option<u16>,
}

/// The NATS side of the gateway.
#[derive(Debug)]
pub struct Platform {
    client: Client,
    subjects: Subjects,
    in_flight: Arc<Semaphore>,
    models_ttl: Duration,
    models: Mutex<Option<(Instant, Arc<ModelsReply>)>>,
}

impl Platform {
    /// Wraps a connected client.
    pub fn new(
        client: Client,
        subjects: Subjects,
        max_in_flight: usize,
        models_ttl: Duration,
    ) -> Self {
        Self {
            client,
            subjects,
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
            models_ttl,
            models: Mutex::new(None),
        }
    }

    /// The subjects in use.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// The NATS client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Whether the NATS connection is up.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Sends `body` to `subject` and returns the reply as it came.
    pub async fn request_raw(
        &self,
        service: &'static str,
        subject: &str,
        body: Bytes,
    ) -> Result<RawReply, PlatformError> {
        let _permit = self
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| PlatformError::Busy)?;
        let message = self
            .client
            .request(subject.to_owned(), body)
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::NoResponders => PlatformError::NoResponders(service),
                RequestErrorKind::TimedOut => PlatformError::Timeout(service),
                RequestErrorKind::MaxPayloadExceeded => PlatformError::TooLarge,
                _ => PlatformError::Bad(service, e.to_string()),
            })?;
        let error_status = message
            .headers
            .as_ref()
            .and_then(|h| h.get(SERVICE_ERROR_CODE_HEADER))
            .and_then(|v| v.as_str().parse::<u16>().ok());
        Ok(RawReply {
            payload: message.payload,
            error_status,
        })
    }

    /// Sends `body` and parses the reply as `T`, or as the service's error.
    pub async fn request_json<T: DeserializeOwned>(
        &self,
        service: &'static str,
        subject: &str,
        body: Bytes,
    ) -> Result<T, PlatformError> {
        let reply = self.request_raw(service, subject, body).await?;
        if let Ok(error) = serde_json::from_slice::<ErrorReply>(&reply.payload) {
            let status = reply
                .error_status
                .unwrap_or_else(|| error.error.code.status());
            return Err(PlatformError::Reply(error, status));
        }
        serde_json::from_slice(&reply.payload)
            .map_err(|e| PlatformError::Bad(service, format!("unexpected JSON: {e}")))
    }

    /// An `ml.predict` request.
    pub async fn predict(&self, body: Bytes) -> Result<RawReply, PlatformError> {
        self.request_raw("predictor", &self.subjects.predict, body)
            .await
    }

    /// The registry's model list, at most `GATEWAY_METADATA_TTL` old.
    pub async fn models(&self) -> Result<Arc<ModelsReply>, PlatformError> {
        let mut cached = self.models.lock().await;
        if let Some((at, models)) = cached.as_ref() {
            if at.elapsed() < self.models_ttl {
                return Ok(models.clone());
            }
        }
        let fresh: Arc<ModelsReply> = Arc::new(
            self.request_json("registry", &self.subjects.registry_models, Bytes::new())
                .await?,
        );
        *cached = Some((Instant::now(), fresh.clone()));
        Ok(fresh)
    }

    /// Forgets the cached model list (after a promotion or rollback).
    pub async fn forget_models(&self) {
        *self.models.lock().await = None;
    }

    /// A registry or monitor request answered as JSON, kept as a value so
    /// that fields added later pass through.
    pub async fn value(
        &self,
        service: &'static str,
        subject: &str,
        body: Bytes,
    ) -> Result<serde_json::Value, PlatformError> {
        self.request_json(service, subject, body).await
    }
}
