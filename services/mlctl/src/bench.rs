//! `mlctl bench`: a load generator for `ml.predict`.
//!
//! - Closed loop (default): `--concurrency C` requests in flight, each sent as
//!   soon as the previous one is answered.
//! - Open loop (`--rate R`): requests are due at fixed times, R per second,
//!   whatever the server does; a request's latency counts from the moment the
//!   generator woke to send it, and when `--max-in-flight` requests are
//!   already waiting the wait for a slot counts too, so a stalled server
//!   cannot hide its queueing behind a slower generator.
//! - `--batch N` sends `{"user_ids": [N ids]}` and counts N predictions per reply.
//! - `--echo` answers the same requests with a trivial responder on
//!   `<prefix>.bench.echo` (started by this command on its own connection),
//!   which measures the broker's own request-reply floor on this machine.
//!
//! Latency goes into an HDR histogram; the report gives throughput,
//! p50/p90/p99/p99.9/max, errors by code and the model versions that
//! answered. It stops by itself after `--warmup` plus `--duration`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_nats::client::RequestErrorKind;
use async_nats::Client;
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use hdrhistogram::Histogram;
use ml_shared::data;
use ml_shared::features::FeatureRegistry;
use ml_shared::messages::{ApiReply, BatchPredictReply, PredictReply};
use ml_shared::settings::{parse_duration, NatsSettings};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Options of `mlctl bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Closed loop: requests in flight.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Open loop: requests per second (instead of a closed loop).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open loop: most requests in flight; beyond it, sends wait (and the wait counts).
    #[arg(long, default_value_t = 10_000)]
    pub max_in_flight: usize,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured time before it.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// User ids per request (1: `{"user_id": ...}`; more: `{"user_ids": [...]}`).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// The data file to draw user ids from.
    #[arg(long, env = "DATA_PATH", default_value = "data/user_data.csv")]
    pub data_path: PathBuf,
    /// Draw from the first N users only (0: all).
    #[arg(long, default_value_t = 0)]
    pub users: usize,
    /// Send random raw feature vectors instead of user ids.
    #[arg(long, conflicts_with = "batch")]
    pub features: bool,
    /// Measure a trivial responder (the broker's floor) instead of the predictors.
    #[arg(long)]
    pub echo: bool,
    /// Client connections to spread the requests over.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What a bench run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// `closed` or `open`.
    pub mode: String,
    /// The subject measured.
    pub subject: String,
    /// Closed loop: requests in flight.
    pub concurrency: Option<usize>,
    /// Open loop: target requests per second.
    pub rate: Option<f64>,
    /// User ids per request.
    pub batch: usize,
    /// Measured seconds.
    pub duration_s: f64,
    /// Requests completed in the measured time.
    pub requests: u64,
    /// Requests answered with predictions.
    pub ok: u64,
    /// Completed requests per second.
    pub throughput_rps: f64,
    /// Predictions per second (`ok × batch / duration`).
    pub predictions_per_s: f64,
    /// Latency in milliseconds: mean, p50, p90, p99, p99.9, max.
    pub latency_ms: BTreeMap<String, f64>,
    /// Failures by error code (or `timeout`, `no_responders`, `request_failed`).
    pub errors: BTreeMap<String, u64>,
    /// Successful replies by model version.
    pub versions: BTreeMap<u64, u64>,
}

/// Counts of one worker, merged at the end.
struct Tally {
    latency: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    versions: BTreeMap<u64, u64>,
}

impl Tally {
    fn new() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"),
            errors: BTreeMap::new(),
            versions: BTreeMap::new(),
        }
    }

    fn record(
        &mut self,
        latency: Duration,
        result: Result<async_nats::Message, async_nats::RequestError>,
    ) {
        self.latency
            .saturating_record(latency.as_nanos().clamp(1, u64::MAX as u128) as u64);
        let outcome = match result {
            Ok(message) => classify(&message.payload),
            Err(e) => Err(match e.kind() {
                RequestErrorKind::TimedOut => "timeout",
                RequestErrorKind::NoResponders => "no_responders",
                _ => "request_failed",
            }
            .to_owned()),
        };
        match outcome {
            Ok(version) => *self.versions.entry(version).or_default() += 1,
            Err(code) => *self.errors.entry(code).or_default() += 1,
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.latency.add(&other.latency).expect("same bounds");
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.versions {
            *self.versions.entry(*k).or_default() += v;
        }
    }
}

/// The model version of a successful reply, or the error code.
fn classify(payload: &[u8]) -> Result<u64, String> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Any {
        One(PredictReply),
        Many(BatchPredictReply),
    }
    match serde_json::from_slice::<ApiReply<Any>>(payload) {
        Ok(ApiReply::Ok(Any::One(r))) => Ok(r.model_version),
        Ok(ApiReply::Ok(Any::Many(r))) => Ok(r.model_version),
        Ok(ApiReply::Err(e)) => Err(e.error.code.to_string()),
        Err(_) => Err("unreadable_reply".into()),
    }
}

/// Runs the benchmark and prints its report.
pub async fn run(nats: &NatsSettings, args: BenchArgs) -> anyhow::Result<ExitCode> {
    let report = measure(nats, &args).await?;
    let text = if args.json {
        format!("{}\n", serde_json::to_string(&report)?)
    } else {
        text(&report)
    };
    // A closed pipe (`| head`) is not an error of the benchmark.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    Ok(if report.ok > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs the benchmark and returns its report.
pub async fn measure(nats: &NatsSettings, args: &BenchArgs) -> anyhow::Result<Report> {
    let payloads = Arc::new(payloads(args)?);
    let subjects = nats.subjects();
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(crate::connect(nats).await?);
    }
    let (subject, mut echo) = if args.echo {
        let subject = echo_subject(&subjects.prefix);
        (subject, Some(spawn_echo_process(nats, &clients[0]).await?))
    } else {
        (subjects.predict.clone(), None)
    };

    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let total = match args.rate {
        None => {
            closed_loop(
                &clients,
                &subject,
                &payloads,
                args.concurrency,
                measure_from,
                end,
            )
            .await?
        }
        Some(rate) => {
            open_loop(
                &clients,
                &subject,
                &payloads,
                rate,
                args.max_in_flight,
                measure_from,
                end,
            )
            .await?
        }
    };
    for client in clients {
        client.drain().await.ok();
    }
    if let Some(child) = echo.as_mut() {
        let _ = child.kill().await;
    }
    Ok(report(args, subject, &total))
}

/// The subject of the echo responder.
pub fn echo_subject(prefix: &str) -> String {
    format!("{prefix}.bench.echo")
}

/// Starts `mlctl echo` as a separate process, as a predictor would be, and
/// waits (at most 10 s) until it answers.
async fn spawn_echo_process(
    nats: &NatsSettings,
    client: &Client,
) -> anyhow::Result<tokio::process::Child> {
    let child = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "--nats-url",
            &nats.nats_url,
            "--subject-prefix",
            &nats.subject_prefix,
            "echo",
        ])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the echo responder (mlctl echo)")?;
    let subject = echo_subject(&nats.subject_prefix);
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.request(subject.clone(), Bytes::new()).await.is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the echo responder did not answer within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(child)
}

/// `mlctl echo`: replies `{"prediction":0.0,"model_version":0}` to every
/// request on `<prefix>.bench.echo`, as fast as a NATS responder can — the
/// floor a predictor is compared with. Runs until Ctrl-C or SIGTERM.
pub async fn echo(nats: &NatsSettings) -> anyhow::Result<ExitCode> {
    let client = crate::connect(nats).await?;
    let mut requests = client
        .queue_subscribe(echo_subject(&nats.subject_prefix), "bench-echo".into())
        .await?;
    let reply = Bytes::from_static(br#"{"prediction":0.0,"model_version":0}"#);
    let signal = ml_shared::shutdown::shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            message = requests.next() => {
                let Some(message) = message else { break };
                if let Some(to) = message.reply {
                    let _ = client.publish(to, reply.clone()).await;
                }
            }
        }
    }
    client.drain().await.ok();
    Ok(ExitCode::SUCCESS)
}

async fn closed_loop(
    clients: &[Client],
    subject: &str,
    payloads: &Arc<Vec<Bytes>>,
    concurrency: usize,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<Tally> {
    let mut tasks = Vec::new();
    for worker in 0..concurrency.max(1) {
        let client = clients[worker % clients.len()].clone();
        let (subject, payloads) = (subject.to_owned(), payloads.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut i = worker * 7919;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let body = payloads[i % payloads.len()].clone();
                i += 1;
                let result = client.request(subject.clone(), body).await;
                let no_responders =
                    matches!(&result, Err(e) if e.kind() == RequestErrorKind::NoResponders);
                if sent >= measure_from {
                    tally.record(sent.elapsed(), result);
                }
                if no_responders {
                    // Do not spin: nobody is there to answer.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            tally
        }));
    }
    let mut total = Tally::new();
    for task in tasks {
        total.merge(&task.await.context("bench task failed")?);
    }
    Ok(total)
}

async fn open_loop(
    clients: &[Client],
    subject: &str,
    payloads: &Arc<Vec<Bytes>>,
    rate: f64,
    max_in_flight: usize,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<Tally> {
    anyhow::ensure!(
        rate > 0.0 && rate.is_finite(),
        "--rate must be a positive number"
    );
    let tally = Arc::new(Mutex::new(Tally::new()));
    let slots = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let first = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent: u64 = 0;
    loop {
        ticker.tick().await;
        let woke = Instant::now();
        if woke >= end {
            break;
        }
        // Every request due by now; the generator's own timer lag (≤ 1 ms)
        // is not the server's, so latency counts from the wake-up.
        let due = ((woke - first).as_secs_f64() * rate) as u64;
        while sent < due {
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            let client = clients[sent as usize % clients.len()].clone();
            let body = payloads[sent as usize % payloads.len()].clone();
            let (subject, tally) = (subject.to_owned(), tally.clone());
            let measured = woke >= measure_from;
            tokio::spawn(async move {
                let result = client.request(subject, body).await;
                if measured {
                    tally
                        .lock()
                        .expect("not poisoned")
                        .record(woke.elapsed(), result);
                }
                drop(permit);
            });
            sent += 1;
        }
    }
    // Wait for the requests still in flight (each ends within the request timeout).
    let _all = slots
        .acquire_many(max_in_flight.max(1) as u32)
        .await
        .expect("never closed");
    // Every permit is back, so every request was recorded; a finished task
    // may still hold its clone of the Arc for a moment, so take the contents.
    let tally = std::mem::replace(&mut *tally.lock().expect("not poisoned"), Tally::new());
    Ok(tally)
}

fn payloads(args: &BenchArgs) -> anyhow::Result<Vec<Bytes>> {
    let mut rng = rand::thread_rng();
    if args.features {
        return Ok((0..4096)
            .map(|_| {
                let (f1, f2): (f64, f64) = (rng.gen_range(-2.0..2.0), rng.gen_range(0.0..10.0));
                Bytes::from(format!(
                    r#"{{"features":{{"feature_1":{f1},"feature_2":{f2}}}}}"#
                ))
            })
            .collect());
    }
    let registry = FeatureRegistry::default();
    let data = data::load_csv(&args.data_path, registry.raw_names())
        .with_context(|| "loading user ids (use --features to send raw features instead)")?;
    let n = if args.users == 0 {
        data.len()
    } else {
        args.users.min(data.len())
    };
    let mut ids: Vec<&String> = data.user_ids[..n].iter().collect();
    // Shuffle so that workers do not walk the store in file order.
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.gen_range(0..=i));
    }
    let batch = args.batch.max(1);
    Ok(if batch == 1 {
        ids.iter()
            .map(|id| Bytes::from(serde_json::json!({ "user_id": id }).to_string()))
            .collect()
    } else {
        (0..ids.len().clamp(1, 256))
            .map(|i| {
                let batch: Vec<&String> = (0..batch)
                    .map(|j| ids[(i * batch + j) % ids.len()])
                    .collect();
                Bytes::from(serde_json::json!({ "user_ids": batch }).to_string())
            })
            .collect()
    })
}

fn report(args: &BenchArgs, subject: String, t: &Tally) -> Report {
    let h = &t.latency;
    let ms = |ns: u64| ns as f64 / 1e6;
    let mut latency_ms = BTreeMap::new();
    if !h.is_empty() {
        for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)] {
            latency_ms.insert(name.to_owned(), ms(h.value_at_quantile(q)));
        }
        latency_ms.insert("max".into(), ms(h.max()));
        latency_ms.insert("mean".into(), h.mean() / 1e6);
    }
    let secs = args.duration.as_secs_f64();
    let ok: u64 = t.versions.values().sum();
    Report {
        mode: if args.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .into(),
        subject,
        concurrency: args.rate.is_none().then_some(args.concurrency),
        rate: args.rate,
        batch: args.batch.max(1),
        duration_s: secs,
        requests: h.len(),
        ok,
        throughput_rps: h.len() as f64 / secs,
        predictions_per_s: (ok * args.batch.max(1) as u64) as f64 / secs,
        latency_ms,
        errors: t.errors.clone(),
        versions: t.versions.clone(),
    }
}

fn text(r: &Report) -> String {
    let load = match (r.concurrency, r.rate) {
        (Some(c), _) => format!("closed loop, {c} in flight"),
        (_, Some(rate)) => format!("open loop, {rate} req/s"),
        _ => String::new(),
    };
    let mut out = format!(
        "{} ({load}, batch {}): {} requests, {} ok in {:.1}s: {:.0} req/s, {:.0} predictions/s\n",
        r.subject, r.batch, r.requests, r.ok, r.duration_s, r.throughput_rps, r.predictions_per_s
    );
    let l = &r.latency_ms;
    if !l.is_empty() {
        out.push_str(&format!(
            "latency ms: mean={:.3} p50={:.3} p90={:.3} p99={:.3} p99.9={:.3} max={:.3}\n",
            l["mean"], l["p50"], l["p90"], l["p99"], l["p99.9"], l["max"]
        ));
    }
    out.push_str(&format!(
        "errors: {:?}\nversions: {:?}\n",
        r.errors, r.versions
    ));
    out
}
