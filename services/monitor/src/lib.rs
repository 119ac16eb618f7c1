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
//! `ml.monitor.stats` answers a request with the current window, the totals
//! since start and the active alerts, as JSON. An unreadable event batch is
//! logged and skipped; the monitor keeps running. On shutdown it prints the
//! window in progress.

pub mod alerts;
pub mod drift;
pub mod metrics;
pub mod stats;

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use ml_shared::features::FeatureRegistry;
use ml_shared::messages::{EventBatch, ModelRelease};
use ml_shared::production::{self, FollowSettings};
use ml_shared::settings::{parse_duration, NatsSettings};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::alerts::{ActiveAlert, AlertNotice, Alerts};
use crate::drift::{DriftReference, DriftWindow};
use crate::metrics::Metrics;
use crate::stats::{Aggregate, Sequences, Snapshot};

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
}

/// Runs the monitor until `shutdown` completes, printing to stdout.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with_output(config, shutdown, std::io::stdout()).await
}

/// What the monitor keeps between windows.
struct State {
    started: Instant,
    window_start: Instant,
    window: Aggregate,
    total: Aggregate,
    sequences: Sequences,
    drift: Option<DriftWindow>,
    drift_min_samples: u64,
    registry: FeatureRegistry,
}

impl State {
    fn add(&mut self, batch: &EventBatch, metrics: &Metrics) {
        let lost = self.sequences.observe(batch);
        if lost > 0 {
            tracing::warn!(predictor = %batch.predictor, lost, "latency events lost in transit");
        }
        self.window.add(batch, lost);
        self.total.add(batch, lost);
        metrics.record(batch, lost);
        if let Some(drift) = &mut self.drift {
            drift.add(batch);
        }
    }

    fn window_snapshot(&self) -> Snapshot {
        let mut s = self.window.snapshot(self.window_start.elapsed());
        s.drift = self
            .drift
            .as_ref()
            .and_then(|d| d.report(self.drift_min_samples));
        s
    }

    fn new_release(&mut self, release: &ModelRelease) {
        match DriftReference::new(release, &self.registry) {
            Ok(reference) => {
                tracing::info!(
                    version = release.version,
                    "drift measured against this production model's training data"
                );
                self.drift = Some(DriftWindow::new(Arc::new(reference)));
            }
            Err(why) => {
                tracing::warn!(version = release.version, %why, "no drift check for this production model");
                self.drift = None;
            }
        }
    }

    fn next_window(&mut self) {
        if let Some(d) = &self.drift {
            if d.unmatched > 0 {
                tracing::warn!(
                    samples = d.unmatched,
                    "samples with raw features the monitor does not know were ignored"
                );
            }
        }
        self.window = Aggregate::default();
        self.window_start = Instant::now();
        self.drift = self.drift.as_ref().map(DriftWindow::fresh);
    }
}

fn line(format: Format, snapshot: &Snapshot) -> String {
    match format {
        Format::Text => snapshot.to_text(),
        Format::Json => serde_json::to_string(snapshot).expect("snapshots serialise"),
    }
}

fn alert_line(format: Format, notice: &AlertNotice) -> String {
    match format {
        Format::Text => notice.to_text(),
        Format::Json => serde_json::to_string(notice).expect("notices serialise"),
    }
}

/// Runs the monitor, writing the periodic lines to `out`.
pub async fn run_with_output<W: Write>(
    config: Config,
    shutdown: impl Future<Output = ()>,
    mut out: W,
) -> anyhow::Result<()> {
    let rules = alerts::load_rules(config.alerts.as_deref())?;
    let metrics = Arc::new(Metrics::new(&rules));
    let mut alerts = Alerts::new(rules);
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_server = match config.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics address {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "serving Prometheus metrics on /metrics");
            let served = metrics::serve(listener, metrics.clone(), async move {
                let _ = metrics_stopped.await;
            });
            Some(tokio::spawn(served))
        }
        None => None,
    };

    let client = ml_shared::nats::connect(&config.nats, "monitor").await?;
    let subjects = config.nats.subjects();
    let mut events = client.subscribe(subjects.monitor_events.clone()).await?;
    let mut stats_requests = client.subscribe(subjects.monitor_stats.clone()).await?;

    // The production model, followed as a predictor does; releases reach
    // the loop below through a channel.
    let (release_tx, mut releases) = mpsc::unbounded_channel::<ModelRelease>();
    let held: Arc<Mutex<Option<production::Held>>> = Arc::default();
    let follower = {
        let asked = held.clone();
        tokio::spawn(production::follow(
            client.clone(),
            subjects.clone(),
            FollowSettings {
                poll: config.model_poll,
                reconcile: config.model_reconcile,
                timeout: config.nats.request_timeout,
            },
            move || asked.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            move |release, _source| {
                let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
                if production::compare(held.as_ref(), &release) != production::Comparison::NotNewer
                {
                    *held = Some(production::Held {
                        registry_id: release.registry_id.clone(),
                        epoch: release.epoch,
                        version: release.version,
                    });
                    let _ = release_tx.send(release);
                }
            },
        ))
    };
    tracing::info!(
        interval = ?config.monitor_interval,
        format = ?config.monitor_format,
        rules = alerts.rules().count(),
        "monitor started"
    );

    let mut state = State {
        started: Instant::now(),
        window_start: Instant::now(),
        window: Aggregate::default(),
        total: Aggregate::default(),
        sequences: Sequences::default(),
        drift: None,
        drift_min_samples: config.drift_min_samples,
        registry: FeatureRegistry::default(),
    };
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
                    Ok(batch) => state.add(&batch, &metrics),
                    Err(error) => tracing::warn!(%error, bytes = message.payload.len(), "unreadable event batch skipped"),
                }
            }
            Some(release) = releases.recv() => state.new_release(&release),
            Some(message) = stats_requests.next() => {
                if ml_shared::nats::accept_reply("monitor", &message.subject, message.reply.as_ref()).is_none() {
                    continue;
                }
                let mut window = state.window_snapshot();
                window.alerts = alerts.firing();
                let reply = StatsReply {
                    window,
                    total: state.total.snapshot(state.started.elapsed()),
                    alerts: alerts.active(),
                };
                if let Some(to) = message.reply {
                    let body = serde_json::to_vec(&reply).expect("snapshots serialise");
                    if let Err(error) = client.publish(to, body.into()).await {
                        tracing::warn!(%error, "cannot answer a stats request");
                    }
                }
            }
            _ = ticker.tick() => {
                let mut snapshot = state.window_snapshot();
                let notices = alerts.evaluate(&snapshot, ml_shared::time::now_ms());
                snapshot.alerts = alerts.firing();
                metrics.end_window(snapshot.predictors, snapshot.drift.as_ref());
                for rule in alerts.rules() {
                    metrics.set_alert(rule, alerts.is_firing(&rule.name));
                }
                writeln!(out, "{}", line(config.monitor_format, &snapshot)).context("writing the report")?;
                for notice in &notices {
                    writeln!(out, "{}", alert_line(config.monitor_format, notice)).context("writing an alert")?;
                    tracing::info!(alert = %notice.alert, state = ?notice.state, value = notice.value, "alert");
                    let body = serde_json::to_vec(notice).expect("notices serialise");
                    if let Err(error) = client.publish(subjects.alerts.clone(), body.into()).await {
                        tracing::warn!(%error, "cannot publish an alert");
                    }
                }
                out.flush().context("writing the report")?;
                state.next_window();
            }
        }
    }
    tracing::info!("monitor stopping");
    let mut snapshot = state.window_snapshot();
    snapshot.alerts = alerts.firing();
    writeln!(out, "{}", line(config.monitor_format, &snapshot))
        .and_then(|()| out.flush())
        .context("writing the last report")?;
    follower.abort();
    let _ = stop_metrics.send(());
    if let Some(server) = metrics_server {
        match tokio::time::timeout(Duration::from_secs(5), server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "metrics server failed"),
            Ok(Err(error)) => tracing::warn!(%error, "metrics server panicked"),
            Err(_) => tracing::warn!("metrics server did not stop in time"),
        }
    }
    client.drain().await.context("draining the NATS client")?;
    Ok(())
}
