//! The monitor service: consumes the predictors' latency events
//! (`ml.monitor.events`) and every `MONITOR_INTERVAL` prints one line to
//! standard output — count, requests/s, mean, p50, p95, p99 and max latency,
//! errors by code, predictions by model version — as text or, with
//! `MONITOR_FORMAT=json`, as one JSON object per line. Logs go to standard
//! error, so the output stays easy to tail and to parse.
//!
//! `ml.monitor.stats` answers a request with the current window and the
//! totals since start, as JSON. An unreadable event batch is logged and
//! skipped; the monitor keeps running.

pub mod stats;

use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use ml_shared::messages::EventBatch;
use ml_shared::settings::{parse_duration, NatsSettings};
use serde::Serialize;

use crate::stats::{Aggregate, Snapshot};

/// How the periodic line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `key=value` text.
    Text,
    /// One JSON object per line.
    Json,
}

/// Monitor configuration (flags, or the environment variables named).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "monitor",
    version,
    about = "Prints prediction latency and error statistics"
)]
pub struct Config {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsSettings,

    /// Length of a reporting window.
    #[arg(long, env = "MONITOR_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub monitor_interval: Duration,

    /// Output format of the periodic line.
    #[arg(
        long,
        env = "MONITOR_FORMAT",
        value_enum,
        default_value = "text",
        ignore_case = true
    )]
    pub monitor_format: Format,
}

/// The reply to `ml.monitor.stats`.
#[derive(Debug, Clone, Serialize)]
pub struct StatsReply {
    /// The window in progress.
    pub window: Snapshot,
    /// Everything since the monitor started.
    pub total: Snapshot,
}

/// Runs the monitor until `shutdown` completes, printing to stdout.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with_output(config, shutdown, std::io::stdout()).await
}

/// Runs the monitor, writing the periodic lines to `out`.
pub async fn run_with_output<W: Write>(
    config: Config,
    shutdown: impl Future<Output = ()>,
    mut out: W,
) -> anyhow::Result<()> {
    let client = ml_shared::nats::connect(&config.nats, "monitor").await?;
    let subjects = config.nats.subjects();
    let mut events = client.subscribe(subjects.monitor_events.clone()).await?;
    let mut stats_requests = client.subscribe(subjects.monitor_stats.clone()).await?;
    tracing::info!(
        interval = ?config.monitor_interval,
        format = ?config.monitor_format,
        "monitor started"
    );

    let started = Instant::now();
    let mut window_start = Instant::now();
    let mut window = Aggregate::default();
    let mut total = Aggregate::default();
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + config.monitor_interval,
        config.monitor_interval,
    );
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(message) = events.next() => {
                match serde_json::from_slice::<EventBatch>(&message.payload) {
                    Ok(batch) => {
                        window.add(&batch);
                        total.add(&batch);
                    }
                    Err(error) => tracing::warn!(%error, bytes = message.payload.len(), "unreadable event batch skipped"),
                }
            }
            Some(message) = stats_requests.next() => {
                let reply = StatsReply {
                    window: window.snapshot(window_start.elapsed()),
                    total: total.snapshot(started.elapsed()),
                };
                if let Some(to) = message.reply {
                    let body = serde_json::to_vec(&reply).expect("snapshots serialise");
                    if let Err(error) = client.publish(to, body.into()).await {
                        tracing::warn!(%error, "cannot answer a stats request");
                    }
                }
            }
            _ = ticker.tick() => {
                let snapshot = window.snapshot(window_start.elapsed());
                let line = match config.monitor_format {
                    Format::Text => snapshot.to_text(),
                    Format::Json => serde_json::to_string(&snapshot).expect("snapshots serialise"),
                };
                writeln!(out, "{line}").and_then(|()| out.flush()).context("writing the report")?;
                window = Aggregate::default();
                window_start = Instant::now();
            }
        }
    }
    tracing::info!("monitor stopping");
    client.drain().await.context("draining the NATS client")?;
    Ok(())
}
