//! The trainer on NATS: the `trainer` micro service with its `train`
//! endpoint (`ml.train`, queue group `trainer`), and the schedule.
//!
//! A request's body is empty or a [`TrainRequest`]; anything else is
//! refused with `bad_request` and trains nothing. With `"progress":true`
//! the run's [`TrainProgress`] messages go to the request's reply subject,
//! about once a second while a pass reads the file and once at the end of
//! each pass, before the final reply. They are published in order on the
//! connection the final reply uses, so they arrive before it.

use std::future::Future;

use async_nats::service::{endpoint::Endpoint, Request, Service, ServiceExt};
use async_nats::{Client, Subject};
use futures::StreamExt;
use ml_shared::messages::{ErrorCode, ErrorReply, TrainProgress, TrainRequest};
use ml_shared::subjects::Subjects;
use tokio::sync::mpsc;

use crate::runs::{Progress, Trainer};
use crate::{Outcome, RunError, QUEUE_GROUP};

/// Progress reports waiting to be published; more are dropped (the next
/// one says where the run is).
pub const PROGRESS_BUFFER: usize = 64;

/// The running micro service: stopped when dropped.
pub struct Running {
    /// Kept: dropping it stops the service.
    _service: Service,
    /// The `train` endpoint's requests.
    requests: Endpoint,
}

/// Starts the micro service with its `train` endpoint.
pub async fn start(client: &Client, subjects: &Subjects) -> anyhow::Result<Running> {
    let service = client
        .service_builder()
        .description("Trains models and submits them to the registry")
        .queue_group(QUEUE_GROUP)
        .start("trainer", env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("starting the micro-service: {e}"))?;
    let requests = service
        .endpoint_builder()
        .name("train")
        .add(subjects.train.clone())
        .await
        .map_err(|e| anyhow::anyhow!("adding the train endpoint: {e}"))?;
    Ok(Running {
        _service: service,
        requests,
    })
}

/// Waits until the connection is up (a scheduled run needs the registry)
/// or `shutdown`; false when shutting down.
pub async fn connected(client: &Client, shutdown: impl Future<Output = ()>) -> bool {
    tokio::select! {
        () = shutdown => false,
        flushed = client.flush() => {
            if let Err(error) = flushed {
                tracing::warn!(%error, "cannot reach NATS yet; runs are retried");
            }
            true
        }
    }
}

/// Trains on the schedule and on requests until `shutdown`.
pub async fn serve(trainer: &Trainer, mut running: Running, shutdown: impl Future<Output = ()>) {
    let config = trainer.config();
    let scheduled = !config.train_interval.is_zero();
    let period = if scheduled {
        config.train_interval
    } else {
        std::time::Duration::from_secs(3600)
    };
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick(), if scheduled => {
                // A run that failed for its data is retried soon only when
                // an unchanged file would be skipped, not retrained (and
                // logged as failed) every TRAIN_RETRY.
                let retry = match trainer.run_once("schedule", None).await {
                    Err(RunError::RegistryUnavailable(_)) => true,
                    Err(_) => config.skip_unchanged,
                    Ok(_) => false,
                };
                if retry {
                    ticker.reset_after(config.train_retry);
                }
            }
            request = running.requests.next() => {
                let Some(request) = request else { break };
                answer(trainer, request).await;
            }
        }
    }
}

/// Trains for one request and answers it.
async fn answer(trainer: &Trainer, request: Request) {
    let message = &request.message;
    // A request must name an inbox to answer (a reflected reply has none):
    // otherwise it trains nothing.
    let Some(reply) =
        ml_shared::nats::accept_reply("trainer", &message.subject, message.reply.as_ref())
    else {
        return;
    };
    let outcome = match parse(&message.payload) {
        Ok(ask) if ask.progress => {
            let (progress, forwarded) = forward_progress(trainer.client(), reply.clone());
            let outcome = trainer.run_once("request", Some(progress)).await;
            // Every report is published before the final reply.
            forwarded.await.ok();
            outcome
        }
        Ok(_) => trainer.run_once("request", None).await,
        Err(refusal) => Err(refusal),
    };
    let sent = match outcome {
        Ok(Outcome::Registered(reply)) => {
            let body = serde_json::to_vec(&reply).expect("replies serialise");
            request.respond(Ok(body.into())).await
        }
        Ok(Outcome::Skipped) => unreachable!("requests always train"),
        Err(e) => {
            let (body, headers) = ml_shared::nats::error_parts(&e.to_reply());
            request.respond_with_headers(Ok(body), headers).await
        }
    };
    if let Err(error) = sent {
        tracing::warn!(%error, "cannot answer the train request");
    }
}

/// The request's options: an empty body, or a [`TrainRequest`].
fn parse(payload: &[u8]) -> Result<TrainRequest, RunError> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(TrainRequest::default());
    }
    serde_json::from_slice(payload).map_err(|e| {
        RunError::BadRequest(ErrorReply::new(
            ErrorCode::BadRequest,
            format!("a train request is empty or {{\"progress\": true|false}}: {e}"),
        ))
    })
}

/// A progress channel for one run, and the task that publishes what comes
/// through it to `reply`; the task ends when the run drops its sender.
fn forward_progress(client: &Client, reply: Subject) -> (Progress, tokio::task::JoinHandle<()>) {
    let (sender, mut receiver) = mpsc::channel(PROGRESS_BUFFER);
    let client = client.clone();
    let task = tokio::spawn(async move {
        while let Some(report) = receiver.recv().await {
            let body = serde_json::to_vec(&TrainProgress { progress: report })
                .expect("progress serialises");
            if let Err(error) = client.publish(reply.clone(), body.into()).await {
                tracing::debug!(%error, "cannot publish a progress report");
            }
        }
    });
    (sender, task)
}
