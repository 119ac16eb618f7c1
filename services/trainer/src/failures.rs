//! Failed runs, reported to the registry's experiments log at least once.
//!
//! A run that produces no model is reported on `ml.registry.run_failed`.
//! When the registry does not answer (down, restarting, no reply in time)
//! the report is kept and sent again before the next run and after the next
//! failure, oldest first; the registry logs a run id once, so a report sent
//! twice is harmless. Bounded: past [`MAX_PENDING`] reports the oldest is
//! dropped with a warning. A report the registry refuses (malformed) is not
//! retried.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::{Client, Subject};
use ml_shared::lifecycle::{FailedRun, RecordedReply};
use ml_shared::messages::{ApiReply, ErrorCode};

/// Most failed runs waiting for the registry.
pub const MAX_PENDING: usize = 64;

/// What became of one report.
enum Sent {
    Recorded,
    /// Refused for what it is: sending it again cannot help.
    Refused(String),
    /// No answer, or the registry could not write: try again later.
    Unanswered(String),
}

/// The reports not yet acknowledged by the registry.
pub struct FailureReports {
    client: Client,
    subject: Subject,
    timeout: Duration,
    pending: Mutex<VecDeque<FailedRun>>,
    /// Held while sending, so reports go out one at a time, in order.
    sending: tokio::sync::Mutex<()>,
}

impl FailureReports {
    /// Reports go to `subject`, each waiting at most `timeout` for its reply.
    pub fn new(client: Client, subject: Subject, timeout: Duration) -> Self {
        Self {
            client,
            subject,
            timeout,
            pending: Mutex::new(VecDeque::new()),
            sending: tokio::sync::Mutex::new(()),
        }
    }

    /// Reports `failed`, after any report still pending.
    pub async fn report(&self, failed: FailedRun) {
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.len() == MAX_PENDING {
                if let Some(dropped) = pending.pop_front() {
                    tracing::warn!(
                        run_id = %dropped.run_id, max = MAX_PENDING,
                        "too many failed runs waiting for the registry: the oldest is not reported"
                    );
                }
            }
            pending.push_back(failed);
        }
        self.flush().await;
    }

    /// Sends the pending reports, oldest first, until one goes unanswered.
    pub async fn flush(&self) {
        let _one_at_a_time = self.sending.lock().await;
        loop {
            let next = self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .front()
                .cloned();
            let Some(failed) = next else { return };
            match self.send(&failed).await {
                Sent::Recorded => {
                    tracing::info!(run_id = %failed.run_id, "failed run recorded by the registry");
                }
                Sent::Refused(error) => tracing::warn!(
                    run_id = %failed.run_id, %error,
                    "the registry refused the failed run's report; not sending it again"
                ),
                Sent::Unanswered(error) => {
                    tracing::warn!(
                        run_id = %failed.run_id, %error,
                        "the registry did not record the failed run; it will be sent again"
                    );
                    return;
                }
            }
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
        }
    }

    /// Reports waiting for the registry.
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    async fn send(&self, failed: &FailedRun) -> Sent {
        let body = serde_json::to_vec(failed).expect("serialisable");
        let request = self.client.request(self.subject.clone(), body.into());
        match tokio::time::timeout(self.timeout, request).await {
            Err(_) => Sent::Unanswered("no reply in time".to_owned()),
            Ok(Err(e)) => Sent::Unanswered(e.to_string()),
            Ok(Ok(m)) => match serde_json::from_slice::<ApiReply<RecordedReply>>(&m.payload) {
                Ok(ApiReply::Ok(_)) => Sent::Recorded,
                Ok(ApiReply::Err(e)) if e.error.code == ErrorCode::Unavailable => {
                    Sent::Unanswered(e.to_string())
                }
                Ok(ApiReply::Err(e)) => Sent::Refused(e.to_string()),
                Err(e) => Sent::Unanswered(format!("unreadable reply: {e}")),
            },
        }
    }
}
