//! The monitor and the feature store against hostile or outsized input:
//! forged latency events (wrapping counters, absurd durations and
//! timestamps, ids of no running predictor) are rejected and counted and
//! fire no alert; a flood of 10,000 identities and 10,000 model versions
//! leaves the monitor's memory, its stats reply and its `/metrics` bounded;
//! a large feature file loads into a predictor whose memory stays within a
//! small factor of the file's size.

use std::time::Duration;

use async_nats::service::ServiceExt;
use async_nats::Client;
use futures::StreamExt;
use ml_shared::messages::{ErrorCode, EventBatch, LatencyEvent, Outcome};
use ml_tests::prometheus::{free_port, http_get};
use ml_tests::services::{self, Output, Process};
use ml_tests::{wait_for, NatsServer};
use serde_json::Value;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(30);

/// A stand-in for a running predictor: a micro-service named `predictor`
/// whose metadata names `id` as the id of its latency events, as a
/// predictor's does. The monitor then accepts events from `id`. Dropping
/// the service stops it.
pub async fn running_predictor(client: &Client, id: &str) -> async_nats::service::Service {
    assert_eq!(
        predictor::EVENTS_ID_METADATA,
        monitor::identity::EVENTS_ID_METADATA,
        "predictor and monitor agree on the metadata key"
    );
    client
        .service_builder()
        .description("a test's stand-in predictor")
        .metadata([(predictor::EVENTS_ID_METADATA.to_owned(), id.to_owned())].into())
        .start(predictor::SERVICE_NAME, "0.0.0")
        .await
        .expect("start a stand-in predictor service")
}

fn event(duration_ns: u64, version: u64, outcome: Outcome) -> LatencyEvent {
    LatencyEvent {
        ts_ms: ml_shared::time::now_ms(),
        duration_ns,
        model_version: Some(version),
        outcome,
        sample: None,
        variant: None,
        answer: None,
    }
}

fn batch(predictor: &str, seq: u64, events: Vec<LatencyEvent>) -> EventBatch {
    EventBatch {
        predictor: predictor.into(),
        seq,
        dropped: 0,
        raw_features: Vec::new(),
        events,
        shadow_dropped: 0,
    }
}

async fn publish(client: &Client, body: Vec<u8>) {
    client
        .publish("ml.monitor.events", body.into())
        .await
        .expect("publish");
}

async fn publish_batch(client: &Client, batch: &EventBatch) {
    publish(client, serde_json::to_vec(batch).unwrap()).await;
}

/// Every sample value of an OpenMetrics exposition.
fn sample_values(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_events_are_rejected_counted_and_fire_no_alert() {
    ml_tests::init_logging();
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = ml_tests::temp_dir();
    // Rules that any of the forgeries would fire at once.
    let rules = dir.path().join("alerts.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"LatencyP99High\"\nmetric = \"latency_p99_ms\"\nabove = 50\nfor = \"0s\"\nseverity = \"page\"\n\
         [[rule]]\nname = \"ErrorRateHigh\"\nmetric = \"error_rate\"\nabove = 0.05\nfor = \"0s\"\nseverity = \"page\"\n\
         [[rule]]\nname = \"EventsDropped\"\nmetric = \"dropped_events\"\nabove = 0\nfor = \"0s\"\n\
         [[rule]]\nname = \"EventsLost\"\nmetric = \"lost_events\"\nabove = 0\nfor = \"0s\"\n",
    )
    .unwrap();
    let client = client(&url).await;
    let _honest = running_predictor(&client, "honest").await;
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let out = Output::default();
    let monitor = services::monitor_with(
        &url,
        &[
            "--monitor-interval",
            "200ms",
            "--monitor-format",
            "json",
            "--alerts",
            rules.to_str().unwrap(),
            "--metrics-addr",
            &metrics_addr,
        ],
        out.clone(),
    );
    let mut alerts = client.subscribe("ml.alerts").await.unwrap();
    client.flush().await.unwrap();
    wait_for("the monitor knows the running predictor", WAIT, || async {
        let s = client.request("ml.monitor.stats", "".into()).await.ok()?;
        let s: Value = serde_json::from_slice(&s.payload).ok()?;
        (s["monitor"]["known_predictors"] == 1).then_some(())
    })
    .await;

    let ok = || event(20_000, 1, Outcome::Ok);
    // The honest predictor's first batch: events 0..3.
    publish_batch(&client, &batch("honest", 0, vec![ok(), ok(), ok()])).await;
    // Forgeries under its id, each wrong in one field.
    let forged: Vec<(&str, EventBatch)> = vec![
        ("bad_dropped", {
            let mut b = batch("honest", 3, vec![ok()]);
            b.dropped = u64::MAX - 1;
            b
        }),
        ("bad_seq", batch("honest", u64::MAX - 1, vec![ok()])),
        ("bad_seq", batch("honest", 1_000_000_000_000, vec![ok()])),
        (
            "bad_duration",
            batch("honest", 3, vec![event(u64::MAX / 2, 1, Outcome::Ok)]),
        ),
        ("bad_timestamp", {
            let mut b = batch("honest", 3, vec![ok()]);
            b.events[0].ts_ms = 0;
            b
        }),
        (
            "bad_version",
            batch("honest", 3, vec![event(20_000, 0, Outcome::Ok)]),
        ),
        ("bad_predictor_id", batch("", 0, vec![ok()])),
    ];
    for (_, b) in &forged {
        publish_batch(&client, b).await;
    }
    publish(&client, b"{not json".to_vec()).await;
    publish(
        &client,
        br#"{"predictor":"honest","seq":3,"events":[{"ts_ms":1,"duration_ns":1,"outcome":"no_such_code"}]}"#
            .to_vec(),
    )
    .await;
    // Errors and slow requests from ids no predictor runs under.
    for i in 0..20 {
        let events = vec![event(30_000_000_000, 1, Outcome::Error(ErrorCode::Internal)); 50];
        publish_batch(&client, &batch(&format!("intruder-{i}"), 0, events)).await;
    }
    // The honest predictor goes on: events 3..13.
    publish_batch(&client, &batch("honest", 3, vec![ok(); 10])).await;
    client.flush().await.unwrap();

    let stats = wait_for("every batch judged", WAIT, || async {
        let s = request_json(&client, "ml.monitor.stats", "").await;
        let judged = s["monitor"]["rejected_total"].as_u64()? + s["total"]["count"].as_u64()?;
        let expected = forged.len() as u64 + 2 + 20 + 13;
        (judged == expected && s["monitor"]["quarantined_batches"] == 0).then_some(s)
    })
    .await;
    let health = &stats["monitor"];
    let mut expected: std::collections::BTreeMap<&str, u64> = Default::default();
    for (reason, _) in &forged {
        *expected.entry(reason).or_default() += 1;
    }
    expected.insert("unreadable", 2);
    expected.insert("unknown_predictor", 20);
    for (reason, n) in &expected {
        assert_eq!(health["rejected"][reason], *n, "{reason}: {health}");
    }
    let total = &stats["total"];
    assert_eq!(
        (&total["count"], &total["dropped"], &total["lost"]),
        (&Value::from(13), &Value::from(0), &Value::from(0)),
        "{total}"
    );
    assert!(total["errors"].as_object().unwrap().is_empty(), "{total}");
    assert!(
        total["latency_ms"]["max"].as_f64().unwrap() < 1.0,
        "{total}"
    );

    // Windows go by; no rule fires, none is even pending.
    let windows = |out: &Output| {
        out.lines()
            .iter()
            .filter(|l| l.contains("\"window_s\""))
            .count()
    };
    let seen = windows(&out);
    wait_for("three more windows", WAIT, || {
        let n = windows(&out);
        async move { (n >= seen + 3).then_some(()) }
    })
    .await;
    let stats = request_json(&client, "ml.monitor.stats", "").await;
    assert_eq!(stats["alerts"], Value::Array(Vec::new()), "{stats}");
    let fired = tokio::time::timeout(Duration::from_millis(100), alerts.next()).await;
    assert!(fired.is_err(), "no alert expected: {fired:?}");
    assert!(!out.text().contains("\"alert\""), "{}", out.text());

    // Prometheus sees the rejections, and no counter was poisoned.
    let (status, text) = http_get(&metrics_addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for (reason, n) in &expected {
        let line = format!("ml_monitor_batches_rejected_total{{reason=\"{reason}\"}} {n}");
        assert!(text.contains(&line), "{line}\nnot in\n{text}");
    }
    for line in [
        "ml_monitor_events_dropped_total 0",
        "ml_monitor_events_lost_total 0",
        r#"ml_predict_requests_total{model_version="1"} 13"#,
        r#"ml_alert_firing{alertname="LatencyP99High",severity="page"} 0"#,
        r#"ml_alert_firing{alertname="ErrorRateHigh",severity="page"} 0"#,
    ] {
        assert!(text.contains(line), "{line}\nnot in\n{text}");
    }
    assert!(!text.contains("ml_predict_errors_total{"), "{text}");
    for (name, value) in sample_values(&text) {
        assert!(value < 1e9, "{name} = {value}");
    }
    monitor.stop().await;
}

/// `text` without its ANSI colour sequences.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A field of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in {text}"))
}

/// Publishes `batches` in rounds of `round`, each time waiting until the
/// monitor has judged everything sent (`judged` reads that from a stats
/// reply), so that no message waits in a buffer the test would overflow.
async fn paced(
    client: &Client,
    batches: impl Iterator<Item = EventBatch>,
    round: usize,
    judged: impl Fn(&Value) -> Option<u64>,
) -> Value {
    let batches: Vec<EventBatch> = batches.collect();
    let mut sent = 0u64;
    let mut last = Value::Null;
    for chunk in batches.chunks(round) {
        for b in chunk {
            publish_batch(client, b).await;
        }
        client.flush().await.unwrap();
        sent += chunk.len() as u64;
        last = wait_for("the monitor keeps up", WAIT, || async {
            let s = request_json(client, "ml.monitor.stats", "").await;
            (judged(&s)? >= sent).then_some(s)
        })
        .await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_identities_and_versions_leaves_the_monitor_bounded() {
    ml_tests::init_logging();
    let _heavy = HEAVY.lock().await;
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = ml_tests::temp_dir();
    let client = client(&url).await;
    // 200 running (stand-in) predictors, more than MONITOR_MAX_PREDICTORS.
    let mut running = Vec::new();
    for i in 0..200 {
        running.push(running_predictor(&client, &format!("known-{i}")).await);
    }
    client.flush().await.unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let monitor = Process::start(
        "monitor",
        &[],
        &[
            ("NATS_URL", url.as_str()),
            ("MONITOR_INTERVAL", "1s"),
            ("MONITOR_METRICS_ADDR", metrics_addr.as_str()),
            ("MONITOR_MAX_PREDICTORS", "50"),
            ("MODEL_POLL", "200ms"),
            ("RUST_LOG", "warn"),
        ],
        &dir.path().join("monitor.log"),
    );
    let pid = monitor.pid();
    wait_for("the monitor knows the 200 predictors", WAIT, || async {
        let s = client.request("ml.monitor.stats", "".into()).await.ok()?;
        let s: Value = serde_json::from_slice(&s.payload).ok()?;
        (s["monitor"]["known_predictors"] == 200).then_some(())
    })
    .await;
    // Warm up the paths (histograms, metrics, a reply) before the baseline.
    paced(
        &client,
        (0..200).map(|i| {
            batch(
                &format!("known-{i}"),
                0,
                vec![event(20_000, 1, Outcome::Ok)],
            )
        }),
        200,
        |s| s["total"]["count"].as_u64(),
    )
    .await;
    let _ = http_get(&metrics_addr, "/metrics").await.unwrap();
    let baseline = status_kib(pid, "VmRSS:");

    // 200,000 events from 10,000 ids no predictor runs under, each with its
    // own model version: quarantined, then rejected.
    let stats = paced(
        &client,
        (0..10_000u64).map(|i| {
            batch(
                &format!("forged-{i}"),
                0,
                vec![event(20_000 + i, 1_000 + i, Outcome::Ok); 20],
            )
        }),
        500,
        |s| {
            let m = &s["monitor"];
            Some(m["rejected_total"].as_u64()? + m["quarantined_batches"].as_u64()?)
        },
    )
    .await;
    let after_unknown = status_kib(pid, "VmHWM:");
    eprintln!("unknown ids: {}", stats["monitor"]);

    // 200,000 events from the 200 running predictors carrying 10,000
    // distinct model versions: counted, the state capped.
    let mut next_seq = vec![0u64; 200];
    let stats = paced(
        &client,
        (0..10_000u64).map(|i| {
            let p = (i % 200) as usize;
            let seq = next_seq[p];
            next_seq[p] += 20;
            let events = (0..20)
                .map(|k| {
                    let outcome = if k == 0 {
                        Outcome::Error(ErrorCode::UnknownUser)
                    } else {
                        Outcome::Ok
                    };
                    event(10_000 + i, 100_000 + i, outcome)
                })
                .collect();
            batch(&format!("known-{p}"), seq, events)
        }),
        500,
        |s| Some(s["total"]["count"].as_u64()?.saturating_sub(200) / 20),
    )
    .await;
    drop(stats);
    // Everything judged, nothing waiting.
    let stats = wait_for("every batch judged", WAIT, || async {
        let s = request_json(&client, "ml.monitor.stats", "").await;
        (s["monitor"]["quarantined_batches"] == 0 && s["total"]["count"] == 200_200).then_some(s)
    })
    .await;
    let peak = status_kib(pid, "VmHWM:");
    let rss = status_kib(pid, "VmRSS:");
    let reply = request(&client, "ml.monitor.stats", "").await.payload;
    let (status, text) = http_get(&metrics_addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let health = &stats["monitor"];
    let max_payload = client.server_info().max_payload;
    eprintln!(
        "flood of 10,000 ids and 10,000 versions (400,000 events): monitor RSS {baseline} KiB before, \
         peak {after_unknown} KiB after the unknown ids, peak {peak} KiB and RSS {rss} KiB at the end; \
         stats reply {} bytes, /metrics {} bytes ({} samples); {health}",
        reply.len(),
        text.len(),
        sample_values(&text).len()
    );

    let judged_unknown = health["rejected"]["unknown_predictor"]
        .as_u64()
        .unwrap_or(0)
        + health["rejected"]["quarantine_full"].as_u64().unwrap_or(0);
    assert_eq!(judged_unknown, 10_000, "{health}");
    assert_eq!(stats["total"]["count"], 200 + 200_000, "{}", stats["total"]);
    assert_eq!(stats["total"]["lost"], 0, "{}", stats["total"]);
    assert!(
        health["tracked_predictors"].as_u64().unwrap() <= 50,
        "{health}"
    );
    assert!(
        health["evicted_predictors"].as_u64().unwrap() >= 150,
        "{health}"
    );
    assert!(
        health["tracked_versions"].as_u64().unwrap() <= 16,
        "{health}"
    );
    // Version 1 and the 10,000 of the flood, 16 kept.
    assert_eq!(health["evicted_versions"], 10_001 - 16, "{health}");
    assert!(
        stats["total"]["versions"].as_object().unwrap().len() <= 16,
        "{}",
        stats["total"]
    );
    assert!(
        text.contains(r#"ml_monitor_evictions_total{kind="version"}"#),
        "{text}"
    );
    // Bounded by design: the caps, not the traffic.
    assert!(
        (peak.saturating_sub(baseline)) < 64 * 1024,
        "RSS grew from {baseline} KiB to a peak of {peak} KiB"
    );
    assert!(reply.len() < max_payload.min(1 << 20), "{}", reply.len());
    assert!(
        (text.len() as u64) < 1 << 20,
        "/metrics is {} bytes",
        text.len()
    );
    drop(monitor);
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_feature_file_loads_within_a_small_factor_of_its_size() {
    ml_tests::init_logging();
    let _heavy = HEAVY.lock().await;
    let rows: usize = std::env::var("FEATURE_FILE_ROWS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(500_000);
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = ml_tests::temp_dir();
    let data = dir.path().join("users.csv");
    write_data(&data, rows, 5);
    let file = std::fs::metadata(&data).unwrap().len() / 1024;
    // The same predictor on a file of 10 rows: what it holds without data.
    let small = dir.path().join("small.csv");
    write_data(&small, 10, 5);
    let measure = |path: &std::path::Path, name: &str| {
        let log = dir.path().join(format!("{name}.log"));
        let p = Process::start(
            "predictor",
            &[],
            &[
                ("NATS_URL", url.as_str()),
                ("DATA_PATH", path.to_str().unwrap()),
                ("EVENTS", "off"),
            ],
            &log,
        );
        (p, log)
    };
    let mut figures = Vec::new();
    for (path, name) in [(&small, "empty"), (&data, "large")] {
        let (process, log) = measure(path, name);
        wait_for("the predictor serves", Duration::from_secs(600), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            async move { text.contains("predictor serving").then_some(text) }
        })
        .await;
        let log = plain(&std::fs::read_to_string(&log).unwrap());
        let users = if name == "large" { rows } else { 10 };
        assert!(log.contains(&format!("users={users}")), "{log}");
        figures.push((
            status_kib(process.pid(), "VmHWM:"),
            status_kib(process.pid(), "VmRSS:"),
        ));
        drop(process);
    }
    let [(base_peak, base_rss), (peak, rss)] = figures[..] else {
        unreachable!()
    };
    // The data's own size: 36-byte ids and two 8-byte features per row.
    let own = (rows as u64 * (36 + 16)) / 1024;
    eprintln!(
        "feature file of {rows} rows, {file} KiB (data itself {own} KiB): predictor peak {peak} KiB, \
         steady {rss} KiB; without data: peak {base_peak} KiB, steady {base_rss} KiB; \
         so the store adds {} KiB steady ({:.2} of the file), {} KiB at peak ({:.2} of the file)",
        rss - base_rss,
        (rss - base_rss) as f64 / file as f64,
        peak - base_peak,
        (peak - base_peak) as f64 / file as f64,
    );
    assert!(
        rss - base_rss < file,
        "steady {rss} KiB - {base_rss} KiB is not below the file's {file} KiB"
    );
    assert!(
        peak - base_peak < file * 3 / 2,
        "peak {peak} KiB - {base_peak} KiB is not below 1.5 × the file's {file} KiB"
    );
}
