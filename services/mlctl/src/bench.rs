//! `mlctl bench`: a closed-loop load generator for `ml.predict`.
//!
//! `--concurrency` tasks each keep one request in flight for `--duration`
//! (after `--warmup`, whose requests are not counted), sending requests for
//! users drawn from the data file (or raw feature vectors with
//! `--features`). Latency is recorded per request in an HDR histogram; the
//! report gives throughput, p50/p90/p99/p99.9/max, errors by code and the
//! model versions that answered.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::client::RequestErrorKind;
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use ml_shared::data;
use ml_shared::features::FeatureRegistry;
use ml_shared::messages::{ApiReply, PredictReply};
use ml_shared::settings::{parse_duration, NatsSettings};
use rand::Rng;
use serde::Serialize;

/// Options of `mlctl bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured time before it.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// The data file to draw user ids from.
    #[arg(long, env = "DATA_PATH", default_value = "data/user_data.csv")]
    pub data_path: PathBuf,
    /// Draw from the first N users only (0: all).
    #[arg(long, default_value_t = 0)]
    pub users: usize,
    /// Send random raw feature vectors instead of user ids.
    #[arg(long)]
    pub features: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What a bench run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Requests in flight.
    pub concurrency: usize,
    /// Measured seconds.
    pub duration_s: f64,
    /// Requests completed in the measured time.
    pub requests: u64,
    /// Successful predictions.
    pub ok: u64,
    /// Completed requests per second.
    pub throughput_rps: f64,
    /// Latency percentiles in milliseconds.
    pub latency_ms: BTreeMap<String, f64>,
    /// Failures by error code (or `timeout`, `no_responders`, `request_failed`).
    pub errors: BTreeMap<String, u64>,
    /// Successful replies by model version.
    pub versions: BTreeMap<u64, u64>,
}

#[derive(Default)]
struct Tally {
    latency: Option<Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    versions: BTreeMap<u64, u64>,
}

/// Runs the benchmark and prints its report.
pub async fn run(nats: &NatsSettings, args: BenchArgs) -> anyhow::Result<ExitCode> {
    let payloads = Arc::new(payloads(&args)?);
    let client = crate::connect(nats).await?;
    let subject = nats.subjects().predict;
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let mut tasks = Vec::new();
    for worker in 0..args.concurrency.max(1) {
        let (client, subject, payloads) = (client.clone(), subject.clone(), payloads.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally {
                latency: Some(Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("bounds")),
                ..Tally::default()
            };
            let mut i = worker * 7919;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let body = payloads[i % payloads.len()].clone();
                i += 1;
                let result = client.request(subject.clone(), body).await;
                let done = Instant::now();
                if sent < measure_from {
                    continue;
                }
                let hist = tally.latency.as_mut().expect("set");
                hist.saturating_record((done - sent).as_nanos().max(1) as u64);
                match result {
                    Ok(message) => {
                        match serde_json::from_slice::<ApiReply<PredictReply>>(&message.payload) {
                            Ok(ApiReply::Ok(r)) => {
                                *tally.versions.entry(r.model_version).or_default() += 1
                            }
                            Ok(ApiReply::Err(e)) => {
                                *tally.errors.entry(e.error.code.to_string()).or_default() += 1
                            }
                            Err(_) => {
                                *tally.errors.entry("unreadable_reply".into()).or_default() += 1
                            }
                        }
                    }
                    Err(e) => {
                        let kind = match e.kind() {
                            RequestErrorKind::TimedOut => "timeout",
                            RequestErrorKind::NoResponders => "no_responders",
                            _ => "request_failed",
                        };
                        *tally.errors.entry(kind.into()).or_default() += 1;
                        if kind == "no_responders" {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
            tally
        }));
    }
    let mut total = Tally {
        latency: Some(Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("bounds")),
        ..Tally::default()
    };
    for task in tasks {
        let t = task.await.context("bench task failed")?;
        total
            .latency
            .as_mut()
            .expect("set")
            .add(t.latency.as_ref().expect("set"))
            .expect("same bounds");
        for (k, v) in t.errors {
            *total.errors.entry(k).or_default() += v;
        }
        for (k, v) in t.versions {
            *total.versions.entry(k).or_default() += v;
        }
    }
    client.drain().await.ok();
    let report = report(&args, &total);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report);
    }
    Ok(if report.ok > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
    let mut ids: Vec<Bytes> = data.user_ids[..n]
        .iter()
        .map(|id| Bytes::from(serde_json::json!({ "user_id": id }).to_string()))
        .collect();
    // Shuffle so that workers do not walk the store in file order.
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.gen_range(0..=i));
    }
    Ok(ids)
}

fn report(args: &BenchArgs, t: &Tally) -> Report {
    let h = t.latency.as_ref().expect("set");
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
    Report {
        concurrency: args.concurrency,
        duration_s: secs,
        requests: h.len(),
        ok: t.versions.values().sum(),
        throughput_rps: h.len() as f64 / secs,
        latency_ms,
        errors: t.errors.clone(),
        versions: t.versions.clone(),
    }
}

fn print_text(r: &Report) {
    println!(
        "requests={} ok={} concurrency={} duration={:.1}s throughput={:.0} req/s",
        r.requests, r.ok, r.concurrency, r.duration_s, r.throughput_rps
    );
    let l = &r.latency_ms;
    if !l.is_empty() {
        println!(
            "latency ms: mean={:.3} p50={:.3} p90={:.3} p99={:.3} p99.9={:.3} max={:.3}",
            l["mean"], l["p50"], l["p90"], l["p99"], l["p99.9"], l["max"]
        );
    }
    println!("errors: {:?}", r.errors);
    println!("versions: {:?}", r.versions);
}
