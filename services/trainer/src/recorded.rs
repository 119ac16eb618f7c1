//! What the registry remembers of earlier runs: its newest recorded run,
//! asked for on `ml.registry.runs`, lets a restarted trainer skip data it
//! has already trained on.

use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use ml_shared::messages::{ApiReply, ExperimentRow, RunsReply};
use ml_shared::subjects::Subjects;

use crate::pipeline::{ModelChoice, TrainSpec};

/// How long a scheduled run waits for the registry's newest run before
/// training without knowing it.
pub const LAST_RUN_TIMEOUT: Duration = Duration::from_secs(2);

/// What the registry said about its runs.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordedRuns {
    /// It answered: its newest run, if it has any (boxed: a row is large).
    Newest(Option<Box<ExperimentRow>>),
    /// Nobody answers yet (the registry is not up): ask again next time.
    NotYet,
    /// The request timed out (for instance, not permitted) or the answer
    /// was an error or unreadable: do without.
    Unavailable,
}

/// Asks the registry for its newest recorded runs on `ml.registry.runs`.
///
/// The request asks for one run (`{"limit":1}`); a registry that answers
/// every run, oldest first, is read the same way: the newest is the one
/// with the latest timestamp, the last of equals.
pub async fn newest_recorded_run(
    client: &Client,
    subjects: &Subjects,
    timeout: Duration,
) -> RecordedRuns {
    let request = client.request(
        subjects.registry_runs.clone(),
        Bytes::from_static(br#"{"limit":1}"#),
    );
    let message = match tokio::time::timeout(timeout, request).await {
        Ok(Ok(m)) => m,
        Ok(Err(error)) if error.kind() == async_nats::client::RequestErrorKind::NoResponders => {
            tracing::info!("no registry answers for its runs yet");
            return RecordedRuns::NotYet;
        }
        Ok(Err(error)) => {
            tracing::info!(%error, "the registry's runs are unavailable");
            return RecordedRuns::Unavailable;
        }
        Err(_) => {
            tracing::info!("the registry's runs did not come in time");
            return RecordedRuns::Unavailable;
        }
    };
    match serde_json::from_slice::<ApiReply<RunsReply>>(&message.payload) {
        Ok(ApiReply::Ok(reply)) => RecordedRuns::Newest(
            reply
                .runs
                .into_iter()
                .max_by(|a, b| a.timestamp.cmp(&b.timestamp))
                .map(Box::new),
        ),
        Ok(ApiReply::Err(error)) => {
            tracing::info!(%error, "the registry refused to list its runs");
            RecordedRuns::Unavailable
        }
        Err(error) => {
            tracing::info!(%error, "unreadable list of runs from the registry");
            RecordedRuns::Unavailable
        }
    }
}

/// Whether a recorded run was trained with `spec`'s parameters. A
/// registered run records the family it resolved to, so `auto` matches a
/// `linear` or `logistic` run (on the same data, `auto` resolves the same
/// way).
pub fn same_params(row: &ExperimentRow, spec: &TrainSpec) -> bool {
    let model = match spec.model {
        ModelChoice::Auto => matches!(row.model.as_str(), "auto" | "linear" | "logistic"),
        choice => row.model == choice.to_string(),
    };
    model && row.seed == spec.seed && row.validation_fraction == spec.validation_fraction
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_run_matches_the_parameters_it_was_trained_with() {
        let spec = TrainSpec::default();
        let row = ExperimentRow {
            model: "linear".into(),
            seed: spec.seed,
            validation_fraction: spec.validation_fraction,
            data_fingerprint: "sha256:ab".into(),
            ..ExperimentRow::default()
        };
        assert!(
            same_params(&row, &spec),
            "auto resolves to what it resolved to"
        );
        let linear = TrainSpec {
            model: ModelChoice::Linear,
            ..spec
        };
        assert!(same_params(&row, &linear));
        let logistic = TrainSpec {
            model: ModelChoice::Logistic,
            ..spec
        };
        assert!(!same_params(&row, &logistic));
        assert!(!same_params(&row, &TrainSpec { seed: 7, ..spec }));
        assert!(!same_params(
            &row,
            &TrainSpec {
                validation_fraction: 0.3,
                ..spec
            }
        ));
        let failed = ExperimentRow {
            model: "auto".into(),
            ..row
        };
        assert!(same_params(&failed, &spec));
        assert!(!same_params(&failed, &linear));
    }
}
