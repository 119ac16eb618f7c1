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
//! * [`validate`], [`identity`], [`tracked`]: what the monitor accepts and
//!   keeps. Every field of a batch is checked; only running predictors (found
//!   through the micro-service discovery API) may send; per-predictor and
//!   per-version state is capped (`MONITOR_MAX_PREDICTORS`,
//!   `MONITOR_MAX_VERSIONS`). Rejected batches and evictions are counted.
//!
//! `ml.monitor.stats` answers a request with the current window, the totals
//! since start, the active alerts and the monitor's own health (rejections,
//! evictions, quarantine), as JSON; the reply is bounded by the caps, and
//! never exceeds the server's `max_payload`. A rejected event batch is
//! counted and skipped; the monitor keeps running. On shutdown it prints
//! the window in progress.

pub mod alerts;
pub mod drift;
pub mod identity;
pub mod metrics;
pub mod stats;
pub mod tracked;
pub mod validate;

use std::collections::BTreeMap;
use std::future::Future;

use async_nats::service::ServiceExt;
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
use crate::identity::Identities;
use crate::metrics::Metrics;
use crate::stats::{Aggregate, Snapshot};
use crate::tracked::{Predictors, Versions};
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
}

/// Runs the monitor until `shutdown` completes, printing to stdout.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with_output(config, shutdown, std::io::stdout()).await
}

/// What the monitor keeps between windows.
struct State {
    started: Instant,
    window_start: Instant,
    /// Number of the window in progress.
    generation: u64,
    window: Aggregate,
    total: Aggregate,
    predictors: Predictors,
    versions: Versions,
    identities: Identities,
    rejected: BTreeMap<RejectReason, u64>,
    /// Rejections in the window in progress, logged at its end.
    window_rejected: BTreeMap<RejectReason, u64>,
    drift: Option<DriftWindow>,
    drift_min_samples: u64,
    registry: FeatureRegistry,
}

/// What became of a message on `ml.monitor.events`.
#[derive(Debug, PartialEq, Eq)]
enum Intake {
    /// Counted, or rejected.
    Done,
    /// From an id not known as a running predictor: a discovery is due.
    Unknown,
}

impl State {
    /// Reads, checks and counts (or quarantines, or rejects) one message.
    fn receive(&mut self, payload: &[u8], metrics: &Metrics) -> Intake {
        let batch = match serde_json::from_slice::<EventBatch>(payload) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::debug!(%error, bytes = payload.len(), "unreadable event batch rejected");
                self.reject(RejectReason::Unreadable, metrics);
                return Intake::Done;
            }
        };
        if let Err(reason) = validate::check(&batch, ml_shared::time::now_ms()) {
            tracing::debug!(predictor = %batch.predictor.escape_debug(), %reason, "event batch rejected");
            self.reject(reason, metrics);
            return Intake::Done;
        }
        if self.identities.is_known(&batch.predictor, Instant::now()) {
            self.add(batch, metrics);
            return Intake::Done;
        }
        if self.identities.hold(batch, Instant::now()).is_err() {
            self.reject(RejectReason::QuarantineFull, metrics);
        }
        metrics.set_identity(self.identities.quarantined().1, self.identities.known());
        Intake::Unknown
    }

    /// Takes the ids a discovery started at `started` found and judges the
    /// quarantined batches that arrived before it started; returns whether
    /// batches still wait (for another discovery).
    fn discovered(&mut self, ids: Vec<String>, started: Instant, metrics: &Metrics) -> bool {
        let now = Instant::now();
        let found = ids.len();
        let released = self.identities.learn(ids, started, now);
        let (mut accepted, mut refused) = (0u64, 0u64);
        for batch in released {
            if self.identities.is_known(&batch.predictor, now) {
                accepted += 1;
                self.add(batch, metrics);
            } else {
                refused += 1;
                self.reject(RejectReason::UnknownPredictor, metrics);
            }
        }
        let (waiting, events) = self.identities.quarantined();
        metrics.set_identity(events, self.identities.known());
        tracing::debug!(
            found,
            known = self.identities.known(),
            accepted,
            refused,
            waiting,
            "predictors discovered"
        );
        waiting > 0
    }

    fn reject(&mut self, reason: RejectReason, metrics: &Metrics) {
        for counts in [&mut self.rejected, &mut self.window_rejected] {
            let n = counts.entry(reason).or_default();
            *n = n.saturating_add(1);
        }
        metrics.rejected(reason);
    }

    /// Counts a batch from a known predictor, after the checks against its
    /// history.
    fn add(&mut self, batch: EventBatch, metrics: &Metrics) {
        let evicted_before = self.predictors.evicted;
        let lost = match self
            .predictors
            .observe(&batch, Instant::now(), self.generation)
        {
            Ok(lost) => lost,
            Err(reason) => {
                tracing::debug!(predictor = %batch.predictor, %reason, "event batch rejected");
                self.reject(reason, metrics);
                return;
            }
        };
        metrics.evicted("predictor", self.predictors.evicted - evicted_before);
        if lost > 0 {
            tracing::warn!(predictor = %batch.predictor, lost, "latency events lost in transit");
        }
        let mut last = None;
        for version in batch.events.iter().filter_map(|e| e.model_version) {
            if last == Some(version) {
                continue;
            }
            last = Some(version);
            if let Some(old) = self.versions.touch(version) {
                tracing::debug!(
                    version = old,
                    "model version evicted (MONITOR_MAX_VERSIONS)"
                );
                self.window.forget_version(old);
                self.total.forget_version(old);
                metrics.forget_version(old);
            }
        }
        let versions = &self.versions;
        self.window.add(&batch, lost, |v| versions.contains(v));
        self.total.add(&batch, lost, |v| versions.contains(v));
        metrics.record(&batch, lost, |v| versions.contains(v));
        if let Some(drift) = &mut self.drift {
            drift.add(&batch);
        }
    }

    fn health(&self) -> Health {
        let (quarantined_batches, quarantined_events) = self.identities.quarantined();
        Health {
            rejected: self.rejected.clone(),
            rejected_total: self
                .rejected
                .values()
                .fold(0u64, |a, b| a.saturating_add(*b)),
            evicted_predictors: self.predictors.evicted,
            evicted_versions: self.versions.evicted,
            predictor_restarts: self.predictors.restarts,
            tracked_predictors: self.predictors.len(),
            max_predictors: self.predictors.max(),
            tracked_versions: self.versions.len(),
            max_versions: self.versions.max(),
            known_predictors: self.identities.known(),
            discoveries: self.identities.discoveries,
            quarantined_batches,
            quarantined_events,
        }
    }

    fn total_snapshot(&self) -> Snapshot {
        self.total
            .snapshot(self.started.elapsed(), self.predictors.len())
    }

    fn window_snapshot(&self) -> Snapshot {
        let mut s = self.window.snapshot(
            self.window_start.elapsed(),
            self.predictors.heard_in(self.generation),
        );
        s.drift = self
            .drift
            .as_ref()
            .and_then(|d| d.report(self.drift_min_samples));
        s
    }

    fn new_release(&mut self, release: &ModelRelease) {
        if self
            .drift
            .as_ref()
            .is_some_and(|d| d.reference().is_for(release))
        {
            tracing::debug!(
                version = release.version,
                epoch = release.epoch,
                "same production model republished (routing table changed); drift window kept"
            );
            return;
        }
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
        if !self.window_rejected.is_empty() {
            let rejected: Vec<String> = self
                .window_rejected
                .iter()
                .map(|(reason, n)| format!("{reason}:{n}"))
                .collect();
            tracing::warn!(rejected = %rejected.join(","), "latency event batches rejected in this window");
            self.window_rejected.clear();
        }
        self.window = Aggregate::default();
        self.window_start = Instant::now();
        self.generation += 1;
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

    // Bounded: at most this many unread messages (each at most the
    // server's max_payload) wait for the monitor.
    let client = ml_shared::nats::connect_with(&config.nats, "monitor", |o| {
        o.subscription_capacity(SUBSCRIPTION_CAPACITY)
    })
    .await?;
    let subjects = config.nats.subjects();
    let mut events = client.subscribe(subjects.monitor_events.clone()).await?;
    // `ml.monitor.stats` as the endpoint of the `monitor` micro service, so
    // that discovery (`$SRV.PING.monitor`) finds it.
    let service = client
        .service_builder()
        .description("Latency, errors, drift and alerts of the predictors")
        .start("monitor", env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("starting the micro-service: {e}"))?;
    let mut stats_requests = service
        .endpoint_builder()
        .name("stats")
        .add(subjects.monitor_stats.clone())
        .await
        .map_err(|e| anyhow::anyhow!("adding the stats endpoint: {e}"))?;

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
        generation: 0,
        window: Aggregate::default(),
        total: Aggregate::default(),
        predictors: Predictors::new(config.max_predictors as usize, Instant::now()),
        versions: Versions::new(config.max_versions as usize),
        identities: Identities::new(
            2 * config.discovery_interval + config.discovery_wait,
            config.quarantine,
        ),
        rejected: BTreeMap::new(),
        window_rejected: BTreeMap::new(),
        drift: None,
        drift_min_samples: config.drift_min_samples,
        registry: FeatureRegistry::default(),
    };
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + config.monitor_interval,
        config.monitor_interval,
    );
    // Discovery of the running predictors: one at a time, at start, every
    // MONITOR_DISCOVERY, and when an unknown id sends events (at most once
    // per DISCOVERY_MIN_GAP).
    let (discovered_tx, mut discovered) =
        mpsc::channel::<(Instant, Result<Vec<String>, String>)>(1);
    let mut discovery_ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + config.discovery_interval,
        config.discovery_interval.max(DISCOVERY_MIN_GAP),
    );
    discovery_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut discovery_wanted = true;
    let mut discovery_running = false;
    let mut next_discovery = tokio::time::Instant::now();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(message) = events.next() => {
                if state.receive(&message.payload, &metrics) == Intake::Unknown {
                    discovery_wanted = true;
                }
            }
            () = tokio::time::sleep_until(next_discovery), if discovery_wanted && !discovery_running => {
                discovery_wanted = false;
                discovery_running = true;
                next_discovery = tokio::time::Instant::now() + DISCOVERY_MIN_GAP;
                let (client, tx, wait) = (client.clone(), discovered_tx.clone(), config.discovery_wait);
                let started = Instant::now();
                tokio::spawn(async move {
                    let found = identity::discover(client, wait).await.map_err(|e| e.to_string());
                    let _ = tx.send((started, found)).await;
                });
            }
            Some((started, found)) = discovered.recv() => {
                discovery_running = false;
                match found {
                    Ok(ids) => {
                        if state.discovered(ids, started, &metrics) {
                            discovery_wanted = true;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot discover the running predictors; retrying");
                        discovery_wanted = true;
                    }
                }
            }
            _ = discovery_ticker.tick() => discovery_wanted = true,
            Some(release) = releases.recv() => state.new_release(&release),
            Some(request) = stats_requests.next() => {
                let message = &request.message;
                if ml_shared::nats::accept_reply("monitor", &message.subject, message.reply.as_ref()).is_none() {
                    continue;
                }
                let mut window = state.window_snapshot();
                window.alerts = alerts.firing();
                let reply = StatsReply {
                    window,
                    total: state.total_snapshot(),
                    alerts: alerts.active(),
                    monitor: state.health(),
                };
                let body = serde_json::to_vec(&reply).expect("snapshots serialise");
                let limit = client.server_info().max_payload;
                let sent = if body.len() > limit {
                    // Bounded by design (the caps); this guards the rest
                    // (thousands of alert rules, say).
                    tracing::error!(bytes = body.len(), limit, "stats reply larger than the server's max_payload");
                    let (body, headers) = ml_shared::nats::error_parts(&ml_shared::messages::ErrorReply::new(
                        ml_shared::messages::ErrorCode::Internal,
                        format!("the stats reply ({} bytes) exceeds the server's max_payload ({limit})", body.len()),
                    ));
                    request.respond_with_headers(Ok(body), headers).await
                } else {
                    request.respond(Ok(body.into())).await
                };
                if let Err(error) = sent {
                    tracing::warn!(%error, "cannot answer a stats request");
                }
            }
            _ = ticker.tick() => {
                let mut snapshot = state.window_snapshot();
                let notices = alerts.evaluate(&snapshot, ml_shared::time::now_ms());
                snapshot.alerts = alerts.firing();
                metrics.end_window(snapshot.predictors, snapshot.drift.as_ref());
                metrics.set_identity(state.identities.quarantined().1, state.identities.known());
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
