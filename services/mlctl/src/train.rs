//! `mlctl train`: asks a trainer for a run with progress, prints each
//! progress report on stderr as it comes, and the final reply on stdout.
//!
//! The request is `{"progress":true}` on `ml.train`, answered on one inbox
//! by any number of progress messages and then the reply. `--timeout` is
//! the longest silence allowed: each progress message restarts it, so a
//! long run is waited for as long as it reports.

use std::process::ExitCode;
use std::time::Duration;

use async_nats::{Client, StatusCode};
use futures::StreamExt;
use ml_shared::messages::{ProgressEvent, ProgressReport, TrainProgress, TrainReply, TrainRequest};
use ml_shared::subjects::Subjects;

/// Runs `mlctl train`.
pub async fn train(
    client: &Client,
    subjects: &Subjects,
    timeout: Duration,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    let body = serde_json::to_vec(&TrainRequest { progress: !quiet })?;
    client
        .publish_with_reply(subjects.train.clone(), inbox, body.into())
        .await?;
    client.flush().await?;
    loop {
        let message = tokio::time::timeout(timeout, replies.next())
            .await
            .map_err(|_| anyhow::anyhow!("the trainer sent nothing for {timeout:?} (--timeout)"))?
            .ok_or_else(|| anyhow::anyhow!("the connection closed before the trainer answered"))?;
        if message.status == Some(StatusCode::NO_RESPONDERS) {
            anyhow::bail!(
                "the trainer is unavailable: no responders on {}",
                subjects.train
            );
        }
        match serde_json::from_slice::<TrainProgress>(&message.payload) {
            Ok(p) => eprintln!("{}", describe(&p.progress)),
            Err(_) => return Ok(crate::print_reply::<TrainReply>(message.payload)),
        }
    }
}

/// One line for a person: what the run is doing, how far, how fast.
pub fn describe(p: &ProgressReport) -> String {
    let pass = p.pass.as_deref().unwrap_or("run");
    match p.event {
        ProgressEvent::Reading => {
            let share = if p.total_bytes > 0 {
                format!(" ({:.0}%)", 100.0 * p.bytes as f64 / p.total_bytes as f64)
            } else {
                String::new()
            };
            let eta = p
                .eta_s
                .map_or(String::new(), |s| format!(", {s:.1} s left"));
            format!(
                "pass {} ({pass}): {} rows{share}, {:.0} rows/s, {:.1} MB/s{eta}",
                p.pass_number, p.rows, p.rows_per_s, p.mb_per_s
            )
        }
        ProgressEvent::PassDone => format!(
            "pass {} ({pass}) done: {} rows at {:.1} MB/s, {:.1} s into the run",
            p.pass_number, p.rows, p.mb_per_s, p.elapsed_s
        ),
        ProgressEvent::Submitting => format!(
            "fitted on {} rows in {:.1} s; the registry is evaluating the model",
            p.rows, p.elapsed_s
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(event: ProgressEvent) -> ProgressReport {
        ProgressReport {
            event,
            pass: Some("statistics".into()),
            pass_number: 1,
            rows: 500_000,
            bytes: 35_000_000,
            total_bytes: 70_000_000,
            elapsed_s: 1.25,
            rows_per_s: 400_000.0,
            mb_per_s: 28.0,
            eta_s: Some(1.25),
        }
    }

    #[test]
    fn progress_lines_say_how_far_and_how_fast() {
        assert_eq!(
            describe(&report(ProgressEvent::Reading)),
            "pass 1 (statistics): 500000 rows (50%), 400000 rows/s, 28.0 MB/s, 1.2 s left"
        );
        assert_eq!(
            describe(&report(ProgressEvent::PassDone)),
            "pass 1 (statistics) done: 500000 rows at 28.0 MB/s, 1.2 s into the run"
        );
        assert!(describe(&report(ProgressEvent::Submitting)).starts_with("fitted on 500000 rows"));
    }
}
