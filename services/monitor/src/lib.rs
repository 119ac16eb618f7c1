//! The monitor service: consumes the predictors' latency events
//! (`ml.monitor.events`) and every `MONITOR_INTERVAL` prints one line to
//! standard output — count, requests/s, latency percentiles (HDR
//! histograms), errors by code, predictions by model version, events dropped
//! and lost, data drift, firing alerts — as text or, with
//! `MONITOR_FORMAT=json`, as one JSON object per line. Logs go to standard
//! error, so the output stays easy to tail and to parse.
//!
//! * [`stats`]: the histograms and counts, per window and since start,
//!   overall and per model version; lost events from the predictors'
//!   numbering.
//! * [`drift`]: the PSI of sampled traffic against the production model's
//!   reference profile, which the monitor follows like a predictor does.
//! * [`alerts`]: rules with pending, firing and resolved states; firing and
//!   resolved alerts print a marked line and go out on `ml.alerts`.
//! * [`metrics`]: Prometheus metrics on `MONITOR_METRICS_ADDR`.
//!
//! * `service` (the micro service, the event subscription, discovery, the
//!   loop and the lines it writes) and `state` (what is kept between
//!   windows).
//! * [`validate`], [`identity`], [`tracked`]: what the monitor accepts and
//!   keeps. Every field of a batch is checked; only running predictors (found
//!   through the micro-service discovery API) may send; per-predictor and
//!   per-version state is capped (`MONITOR_MAX_PREDICTORS`,
//!   `MONITOR_MAX_VERSIONS`). Rejected batches and evictions are counted.
//!
//! * [`feedback`]: ground truth on `ml.feedback`, joined by `request_id`
//!   to what each version predicted (served and shadow), held in bounded
//!   memory (`MONITOR_FEEDBACK_MAX`, `MONITOR_FEEDBACK_HORIZON`); live
//!   accuracy and log-loss, or RMSE and MAE, per version; the shadow's
//!   latency and agreement with what was served.
//!
//! `ml.monitor.stats` answers a request with the current window, the totals
//! since start, the active alerts and the monitor's own health (rejections,
//! evictions, quarantine), as JSON; the reply is bounded by the caps, and
//! never exceeds the server's `max_payload`. A rejected event batch is
//! counted and skipped; the monitor keeps running. On shutdown it prints
//! the window in progress.

pub mod alerts;
pub mod drift;
pub mod feedback;
pub mod identity;
pub mod metrics;
mod service;
mod state;
pub mod stats;
pub mod tracked;
pub mod validate;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use ml_shared::settings::{parse_duration, NatsSettings};
use serde::Serialize;

use crate::alerts::{ActiveAlert, Alerts};
use crate::metrics::Metrics;
use crate::service::Monitor;
use crate::state::State;
use crate::stats::Snapshot;
use crate::validate::RejectReason;

/// Unread messages the NATS client holds for each of the monitor's
/// subscriptions (each at most the server's `max_payload`).
pub const SUBSCRIPTION_CAPACITY: usize = 1024;
/// Shortest time between the starts of two discoveries.
const DISCOVERY_MIN_GAP: Duration = Duration::from_secs(1);

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
    about = "Prints prediction latency, error, drift and alert statistics"
)]
pub struct Config {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsSettings,

    /// Length of a reporting window (and how often alert rules are evaluated).
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

    /// Address to serve Prometheus metrics on (`/metrics`), e.g.
    /// `0.0.0.0:9464`; none by default.
    #[arg(long, env = "MONITOR_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Alert rules (TOML); the built-in rules when not given.
    #[arg(long, env = "MONITOR_ALERTS")]
    pub alerts: Option<PathBuf>,

    /// Fewest samples in a window for its drift to be computed.
    #[arg(long, env = "DRIFT_MIN_SAMPLES", default_value_t = 100)]
    pub drift_min_samples: u64,

    /// How often to ask the registry for the production model while none is known.
    #[arg(long, env = "MODEL_POLL", default_value = "1s", value_parser = parse_duration)]
    pub model_poll: Duration,

    /// How often to check with the registry that the known production model is current.
    #[arg(long, env = "MODEL_RECONCILE", default_value = "30s", value_parser = parse_duration)]
    pub model_reconcile: Duration,

    /// Most predictors whose state (numbering, last heard) is kept; past it
    /// the least recently heard is forgotten.
    #[arg(long, env = "MONITOR_MAX_PREDICTORS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_predictors: u32,

    /// Most model versions whose latency and counts are kept apart; past it
    /// the least recently seen is forgotten and its events count in the
    /// totals only.
    #[arg(long, env = "MONITOR_MAX_VERSIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_versions: u32,

    /// Most events (plus one per batch) from ids not yet known as running
    /// predictors held until the next discovery; past it they are rejected.
    #[arg(long, env = "MONITOR_QUARANTINE", default_value_t = 65_536)]
    pub quarantine: usize,

    /// Most predictions held awaiting their outcome (`ml.feedback`); past
    /// it the oldest is evicted and counted.
    #[arg(long, env = "MONITOR_FEEDBACK_MAX", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub feedback_max: u32,

    /// How long a prediction awaits its outcome; later labels are answered
    /// `expired`.
    #[arg(long, env = "MONITOR_FEEDBACK_HORIZON", default_value = "1h", value_parser = parse_duration)]
    pub feedback_horizon: Duration,

    /// How often to ask `$SRV.INFO.predictor` which predictors run (also at
    /// start, and when an unknown id sends events, at most once a second).
    #[arg(long, env = "MONITOR_DISCOVERY", default_value = "30s", value_parser = parse_duration)]
    pub discovery_interval: Duration,

    /// How long a discovery gathers replies.
    #[arg(long, env = "MONITOR_DISCOVERY_WAIT", default_value = "500ms", value_parser = parse_duration)]
    pub discovery_wait: Duration,
}

/// The reply to `ml.monitor.stats`.
#[derive(Debug, Clone, Serialize)]
pub struct StatsReply {
    /// The window in progress.
    pub window: Snapshot,
    /// Everything since the monitor started.
    pub total: Snapshot,
    /// Alerts pending or firing.
    pub alerts: Vec<ActiveAlert>,
    /// The monitor's own health: what it refused, forgot and holds.
    pub monitor: Health,
}

/// What the monitor refused, forgot and holds, since it started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Health {
    /// Event batches rejected, by reason.
    pub rejected: BTreeMap<RejectReason, u64>,
    /// Their sum.
    pub rejected_total: u64,
    /// Predictors forgotten at `MONITOR_MAX_PREDICTORS`.
    pub evicted_predictors: u64,
    /// Model versions forgotten at `MONITOR_MAX_VERSIONS`.
    pub evicted_versions: u64,
    /// Batches whose numbering went backwards (a predictor restarted).
    pub predictor_restarts: u64,
    /// Predictors whose state is kept, at most `max_predictors`.
    pub tracked_predictors: usize,
    /// `MONITOR_MAX_PREDICTORS`.
    pub max_predictors: usize,
    /// Versions kept apart, at most `max_versions`.
    pub tracked_versions: usize,
    /// `MONITOR_MAX_VERSIONS`.
    pub max_versions: usize,
    /// Predictors found running by the discoveries.
    pub known_predictors: usize,
    /// Discoveries completed.
    pub discoveries: u64,
    /// Batches from unknown ids waiting for the next discovery.
    pub quarantined_batches: usize,
    /// Their events.
    pub quarantined_events: usize,
    /// Predictions awaiting their outcome, at most `feedback_max`.
    pub awaiting: usize,
    /// `MONITOR_FEEDBACK_MAX`.
    pub feedback_max: usize,
    /// `MONITOR_FEEDBACK_HORIZON`, seconds.
    pub feedback_horizon_s: f64,
    /// Predictions forgotten unlabelled at `feedback_max`.
    pub evicted_awaiting: u64,
    /// Predictions forgotten unlabelled past the horizon.
    pub expired_awaiting: u64,
    /// `ml.feedback` messages refused (unreadable, too many labels, …).
    pub feedback_rejected: u64,
}

/// Runs the monitor until `shutdown` completes, printing to stdout.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with_output(config, shutdown, std::io::stdout()).await
}

/// Runs the monitor, writing the periodic lines to `out`.
pub async fn run_with_output<W: Write>(
    config: Config,
    shutdown: impl Future<Output = ()>,
    out: W,
) -> anyhow::Result<()> {
    let rules = alerts::load_rules(config.alerts.as_deref())?;
    let metrics = Arc::new(Metrics::new(&rules));
    let metrics_server = match config.metrics_addr {
        Some(addr) => Some(metrics::Server::start(addr, metrics.clone()).await?),
        None => None,
    };
    // Bounded: at most this many unread messages (each at most the
    // server's max_payload) wait for the monitor.
    let client = ml_shared::nats::connect_with(&config.nats, "monitor", |o| {
        o.subscription_capacity(SUBSCRIPTION_CAPACITY)
    })
    .await?;
    let subjects = config.nats.subjects();
    let inputs = service::start(&client, &subjects, &config).await?;
    let alerts = Alerts::new(rules);
    tracing::info!(
        interval = ?config.monitor_interval,
        format = ?config.monitor_format,
        rules = alerts.rules().count(),
        "monitor started"
    );
    let mut monitor = Monitor {
        config: &config,
        client: client.clone(),
        subjects,
        state: State::new(&config),
        alerts,
        metrics,
        out,
    };
    let ran = monitor.run(inputs, shutdown).await;
    if let Some(server) = metrics_server {
        server.stop().await;
    }
    client.drain().await.context("draining the NATS client")?;
    ran
}
