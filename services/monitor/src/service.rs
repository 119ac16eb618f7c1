//! The monitor on NATS: the `monitor` micro service (its `stats` endpoint),
//! the event subscription, the production model followed like a predictor
//! follows it, the discovery of running predictors, and the loop that ties
//! them to the [`State`] and writes a line per window.

use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use async_nats::service::{endpoint::Endpoint, Request, Service, ServiceExt};
use async_nats::{Client, Subscriber};
use futures::StreamExt;
use ml_shared::messages::{ErrorCode, ErrorReply, ModelRelease};
use ml_shared::production::{self, FollowSettings};
use ml_shared::subjects::Subjects;
use tokio::sync::mpsc;
use tokio::time::{Instant as TokioInstant, Interval};

use crate::alerts::{AlertNotice, Alerts};
use crate::identity;
use crate::metrics::Metrics;
use crate::state::{Intake, State};
use crate::stats::Snapshot;
use crate::{Config, Format, StatsReply, DISCOVERY_MIN_GAP};

/// What the loop listens to.
pub struct Inputs {
    /// Kept: dropping it stops the micro service.
    _service: Service,
    stats: Endpoint,
    feedback: Endpoint,
    events: Subscriber,
    releases: mpsc::UnboundedReceiver<ModelRelease>,
    follower: tokio::task::JoinHandle<()>,
}

/// Subscribes to the events, starts the micro service with its `stats`
/// endpoint, and follows the production model.
pub async fn start(
    client: &Client,
    subjects: &Subjects,
    config: &Config,
) -> anyhow::Result<Inputs> {
    let events = client.subscribe(subjects.monitor_events.clone()).await?;
    // `ml.monitor.stats` as the endpoint of the `monitor` micro service, so
    // that discovery (`$SRV.PING.monitor`) finds it.
    let service = client
        .service_builder()
        .description("Latency, errors, drift, alerts, shadow and live metrics of the predictors")
        .start("monitor", env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("starting the micro-service: {e}"))?;
    let stats = service
        .endpoint_builder()
        .name("stats")
        .add(subjects.monitor_stats.clone())
        .await
        .map_err(|e| anyhow::anyhow!("adding the stats endpoint: {e}"))?;
    let feedback = service
        .endpoint_builder()
        .name("feedback")
        .add(subjects.feedback.clone())
        .await
        .map_err(|e| anyhow::anyhow!("adding the feedback endpoint: {e}"))?;
    let (releases, follower) = follow_production(client, subjects, config);
    Ok(Inputs {
        _service: service,
        stats,
        feedback,
        events,
        releases,
        follower,
    })
}

/// Follows the production model as a predictor does; each newer release
/// comes through the returned channel.
fn follow_production(
    client: &Client,
    subjects: &Subjects,
    config: &Config,
) -> (
    mpsc::UnboundedReceiver<ModelRelease>,
    tokio::task::JoinHandle<()>,
) {
    let (release_tx, releases) = mpsc::unbounded_channel::<ModelRelease>();
    let held: Arc<Mutex<Option<production::Held>>> = Arc::default();
    let asked = held.clone();
    let settings = FollowSettings {
        poll: config.model_poll,
        reconcile: config.model_reconcile,
        timeout: config.nats.request_timeout,
    };
    let follower = tokio::spawn(production::follow(
        client.clone(),
        subjects.clone(),
        settings,
        move || asked.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        move |release, _source| {
            let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
            if production::compare(held.as_ref(), &release) != production::Comparison::NotNewer {
                *held = Some(production::Held {
                    registry_id: release.registry_id.clone(),
                    epoch: release.epoch,
                    version: release.version,
                });
                let _ = release_tx.send(release);
            }
        },
    ));
    (releases, follower)
}

/// Discovery of the running predictors: one at a time, at start, every
/// `MONITOR_DISCOVERY`, and when an unknown id sends events (at most once
/// per [`DISCOVERY_MIN_GAP`]).
struct Discovery {
    wanted: bool,
    running: bool,
    next: TokioInstant,
    ticker: Interval,
    done_tx: mpsc::Sender<(Instant, Result<Vec<String>, String>)>,
    done: mpsc::Receiver<(Instant, Result<Vec<String>, String>)>,
}

impl Discovery {
    fn new(config: &Config) -> Self {
        let (done_tx, done) = mpsc::channel(1);
        let mut ticker = tokio::time::interval_at(
            TokioInstant::now() + config.discovery_interval,
            config.discovery_interval.max(DISCOVERY_MIN_GAP),
        );
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            wanted: true,
            running: false,
            next: TokioInstant::now(),
            ticker,
            done_tx,
            done,
        }
    }

    /// Starts a discovery in the background.
    fn start(&mut self, client: &Client, wait: std::time::Duration) {
        self.wanted = false;
        self.running = true;
        self.next = TokioInstant::now() + DISCOVERY_MIN_GAP;
        let (client, tx, started) = (client.clone(), self.done_tx.clone(), Instant::now());
        tokio::spawn(async move {
            let found = identity::discover(client, wait)
                .await
                .map_err(|e| e.to_string());
            let _ = tx.send((started, found)).await;
        });
    }

    /// A discovery ended: its ids to the state; another is wanted when it
    /// failed or left batches waiting.
    fn finished(
        &mut self,
        started: Instant,
        found: Result<Vec<String>, String>,
        state: &mut State,
        metrics: &Metrics,
    ) {
        self.running = false;
        match found {
            Ok(ids) => self.wanted |= state.discovered(ids, started, metrics),
            Err(error) => {
                tracing::warn!(%error, "cannot discover the running predictors; retrying");
                self.wanted = true;
            }
        }
    }
}

/// The monitor's loop and what it writes to.
pub struct Monitor<'a, W: Write> {
    /// Configuration.
    pub config: &'a Config,
    /// The NATS connection.
    pub client: Client,
    /// Subjects.
    pub subjects: Subjects,
    /// Counts and caps.
    pub state: State,
    /// The alert rules and their states.
    pub alerts: Alerts,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Where the lines go.
    pub out: W,
}

impl<W: Write> Monitor<'_, W> {
    /// Runs until `shutdown`, then writes the window in progress.
    pub async fn run(
        &mut self,
        mut inputs: Inputs,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let interval = self.config.monitor_interval;
        let mut ticker = tokio::time::interval_at(TokioInstant::now() + interval, interval);
        let mut discovery = Discovery::new(self.config);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(message) = inputs.events.next() => {
                    if self.state.receive(&message.payload, &self.metrics) == Intake::Unknown {
                        discovery.wanted = true;
                    }
                }
                () = tokio::time::sleep_until(discovery.next), if discovery.wanted && !discovery.running => {
                    discovery.start(&self.client, self.config.discovery_wait);
                }
                Some((started, found)) = discovery.done.recv() => {
                    discovery.finished(started, found, &mut self.state, &self.metrics);
                }
                _ = discovery.ticker.tick() => discovery.wanted = true,
                Some(release) = inputs.releases.recv() => self.state.new_release(&release),
                Some(request) = inputs.stats.next() => self.answer_stats(request).await,
                Some(request) = inputs.feedback.next() => self.answer_feedback(request).await,
                _ = ticker.tick() => self.end_window().await?,
            }
        }
        tracing::info!("monitor stopping");
        inputs.follower.abort();
        let snapshot = self.window();
        let format = self.config.monitor_format;
        writeln!(self.out, "{}", line(format, &snapshot))
            .and_then(|()| self.out.flush())
            .context("writing the last report")
    }

    /// The window in progress, with the alerts firing.
    fn window(&self) -> Snapshot {
        let mut window = self.state.window_snapshot();
        window.alerts = self.alerts.firing();
        window
    }

    /// Answers `ml.monitor.stats`: never more than the server's
    /// `max_payload` (bounded by design by the caps; this guards the rest,
    /// thousands of alert rules, say).
    async fn answer_stats(&self, request: Request) {
        let message = &request.message;
        if ml_shared::nats::accept_reply("monitor", &message.subject, message.reply.as_ref())
            .is_none()
        {
            return;
        }
        let reply = StatsReply {
            window: self.window(),
            total: self.state.total_snapshot(),
            alerts: self.alerts.active(),
            monitor: self.state.health(),
        };
        let body = serde_json::to_vec(&reply).expect("snapshots serialise");
        let limit = self.client.server_info().max_payload;
        let sent = if body.len() > limit {
            tracing::error!(
                bytes = body.len(),
                limit,
                "stats reply larger than the server's max_payload"
            );
            let error = ErrorReply::new(
                ErrorCode::Internal,
                format!(
                    "the stats reply ({} bytes) exceeds the server's max_payload ({limit})",
                    body.len()
                ),
            );
            let (body, headers) = ml_shared::nats::error_parts(&error);
            request.respond_with_headers(Ok(body), headers).await
        } else {
            request.respond(Ok(body.into())).await
        };
        if let Err(error) = sent {
            tracing::warn!(%error, "cannot answer a stats request");
        }
    }

    /// Answers `ml.feedback`: the labels joined, and how many matched,
    /// were unknown, expired or invalid; a refused message gets
    /// `bad_request` and nothing in it is counted.
    async fn answer_feedback(&mut self, request: Request) {
        let message = &request.message;
        if ml_shared::nats::accept_reply("monitor", &message.subject, message.reply.as_ref())
            .is_none()
        {
            return;
        }
        let sent = match self.state.feedback(&message.payload, &self.metrics) {
            Ok(reply) => {
                tracing::debug!(
                    matched = reply.matched,
                    unknown = reply.unknown,
                    expired = reply.expired,
                    invalid = reply.invalid,
                    "feedback joined"
                );
                let body = serde_json::to_vec(&reply).expect("replies serialise");
                request.respond(Ok(body.into())).await
            }
            Err(why) => {
                tracing::debug!(%why, "feedback refused");
                let (body, headers) =
                    ml_shared::nats::error_parts(&ErrorReply::new(ErrorCode::BadRequest, why));
                request.respond_with_headers(Ok(body), headers).await
            }
        };
        if let Err(error) = sent {
            tracing::warn!(%error, "cannot answer a feedback request");
        }
    }

    /// The end of a window: alerts evaluated, metrics set, the line and
    /// the alert notices written (and published on `ml.alerts`).
    async fn end_window(&mut self) -> anyhow::Result<()> {
        let mut snapshot = self.state.window_snapshot();
        let notices = self.alerts.evaluate(&snapshot, ml_shared::time::now_ms());
        snapshot.alerts = self.alerts.firing();
        self.metrics
            .end_window(snapshot.predictors, snapshot.drift.as_ref());
        self.metrics
            .set_routed(&snapshot, &self.state.total_snapshot());
        self.state.expire_awaiting(&self.metrics);
        self.state.report_identity(&self.metrics);
        for rule in self.alerts.rules() {
            self.metrics
                .set_alert(rule, self.alerts.is_firing(&rule.name));
        }
        let format = self.config.monitor_format;
        writeln!(self.out, "{}", line(format, &snapshot)).context("writing the report")?;
        for notice in &notices {
            writeln!(self.out, "{}", alert_line(format, notice)).context("writing an alert")?;
            tracing::info!(alert = %notice.alert, state = ?notice.state, value = notice.value, "alert");
            let body = serde_json::to_vec(notice).expect("notices serialise");
            if let Err(error) = self
                .client
                .publish(self.subjects.alerts.clone(), body.into())
                .await
            {
                tracing::warn!(%error, "cannot publish an alert");
            }
        }
        self.out.flush().context("writing the report")?;
        self.state.next_window();
        Ok(())
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
