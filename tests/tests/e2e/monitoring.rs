//! The monitor as an on-call engineer uses it: percentiles it prints and a
//! real Prometheus agree, drift of shifted traffic fires an alert and
//! unshifted traffic does not, alert rules from a file fire and resolve, and
//! events lost in transit are counted.

use std::time::Duration;

use async_nats::Client;
use futures::StreamExt;
use ml_shared::messages::{ErrorCode, EventBatch, LatencyEvent, Outcome};
use ml_tests::prometheus::{free_port, http_get, Prometheus};
use ml_tests::services::{self, Output};
use ml_tests::{wait_for, NatsServer};
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::common::*;

const PREDICT: &str = "ml.predict";
const WAIT: Duration = Duration::from_secs(20);

/// Sends `bodies` to the predictors, 32 at a time; returns how many were
/// answered.
pub(crate) async fn send_all(client: &Client, bodies: Vec<String>) -> usize {
    futures::stream::iter(bodies)
        .map(|body| {
            let client = client.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    client.request(PREDICT, body.into()),
                )
                .await
                .is_ok_and(|r| r.is_ok())
            }
        })
        .buffer_unordered(32)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await
}

/// `n` raw-feature requests with feature_1 uniform in `[f1, f1 + 4)` and
/// feature_2 in `[f2, f2 + 10)` (the training data has f1 = -2, f2 = 0).
pub(crate) fn feature_requests(rng: &mut impl Rng, n: usize, f1: f64, f2: f64) -> Vec<String> {
    (0..n)
        .map(|_| {
            format!(
                r#"{{"features":{{"feature_1":{},"feature_2":{}}}}}"#,
                f1 + 4.0 * rng.gen::<f64>(),
                f2 + 10.0 * rng.gen::<f64>()
            )
        })
        .collect()
}

/// Sends rounds of 300 requests drawn as [`feature_requests`] does until an
/// alert notice arrives on `alerts` (bounded by [`WAIT`]); returns it.
pub(crate) async fn traffic_until_alert(
    client: &Client,
    alerts: &mut async_nats::Subscriber,
    rng: &mut impl Rng,
    (f1, f2): (f64, f64),
    out: &Output,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no alert within {WAIT:?}:\n{}",
            out.text()
        );
        send_all(client, feature_requests(rng, 300, f1, f2)).await;
        // A short look only: the traffic should not pause, or windows may
        // hold too few samples to judge.
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(20), alerts.next()).await {
            return serde_json::from_slice(&m.payload).expect("a JSON notice");
        }
    }
}

/// Waits until a model is served.
async fn wait_served(client: &Client) {
    wait_for("a model served", WAIT, || async {
        let m = client
            .request(
                PREDICT,
                r#"{"features":{"feature_1":0,"feature_2":1}}"#.into(),
            )
            .await
            .ok()?;
        let v: Value = serde_json::from_slice(&m.payload).ok()?;
        v["model_version"].as_u64()
    })
    .await;
}

/// The monitor's JSON lines (periodic windows; alerts have an `alert` key).
fn json_lines(out: &Output) -> Vec<Value> {
    out.lines()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The `[lower, upper]` latency-bucket bounds around `seconds`, widened by
/// HDR's 0.1% precision.
fn bucket_around(seconds: f64) -> (f64, f64) {
    let bounds = monitor::metrics::latency_buckets();
    let lower = bounds
        .iter()
        .rev()
        .find(|b| **b < seconds * (1.0 - 1e-3))
        .copied()
        .unwrap_or(0.0);
    let upper = bounds
        .iter()
        .find(|b| **b >= seconds * (1.0 + 1e-3))
        .copied()
        .unwrap_or(f64::INFINITY);
    (lower, upper)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_monitor_and_agrees_on_p99() {
    ml_tests::init_logging();
    // Load with timing-dependent windows: not alongside the other heavy tests.
    let _heavy = HEAVY.lock().await;
    let Bed {
        nats: _nats,
        url,
        dir,
        data,
    } = Bed::new(1000, 3);

    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut prometheus = Prometheus::start(std::slice::from_ref(&metrics_addr));
    let registry = services::registry(&url, &dir.path().join("registry"), &data);
    let trainer = services::trainer(&url, &data, "1h");
    let predictor = services::predictor(&url, &data);
    let out = Output::default();
    // One window for the whole test: the line printed at shutdown covers
    // exactly the traffic Prometheus saw.
    let monitor = services::monitor_with(
        &url,
        &[
            "--monitor-interval",
            "1h",
            "--monitor-format",
            "json",
            "--metrics-addr",
            &metrics_addr,
        ],
        out.clone(),
    );
    let client = client(&url).await;
    prometheus.wait_ready(WAIT).await;
    wait_for("Prometheus scrapes the monitor", WAIT, || async {
        (prometheus.query_scalar(r#"up{job="monitor"}"#).await == Some(1.0)).then_some(())
    })
    .await;
    wait_served(&client).await;

    // Traffic: known users, raw features, and 25 unknown users.
    let users: Vec<String> = read_rows(&data).into_iter().map(|r| r.0).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let mut bodies: Vec<String> = (0..1500)
        .map(|i| format!(r#"{{"user_id":"{}"}}"#, users[i % users.len()]))
        .collect();
    bodies.extend(feature_requests(&mut rng, 475, -2.0, 0.0));
    bodies.extend((0..25).map(|i| format!(r#"{{"user_id":"nobody-{i}"}}"#)));
    assert_eq!(send_all(&client, bodies).await, 2000);

    // Every request reached the monitor (with those of wait_served: the
    // count settles), and then Prometheus.
    let previous = std::cell::Cell::new(0u64);
    let stats = wait_for("the monitor counts every request", WAIT, || async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = request_json(&client, "ml.monitor.stats", "").await;
        let count = s["total"]["count"].as_u64()?;
        let settled = count >= 2001 && count == previous.replace(count);
        settled.then_some(s)
    })
    .await;
    let total = stats["total"]["count"].as_u64().unwrap();
    assert_eq!(stats["total"]["lost"], 0, "{stats}");
    assert_eq!(stats["total"]["errors"]["unknown_user"], 25, "{stats}");
    wait_for("Prometheus has every request", WAIT, || async {
        let n = prometheus
            .query_scalar("sum(ml_predict_requests_total)")
            .await?;
        (n as u64 == total).then_some(())
    })
    .await;
    assert_eq!(
        prometheus
            .query_scalar(r#"sum(ml_predict_errors_total{code="unknown_user"})"#)
            .await,
        Some(25.0)
    );
    assert_eq!(
        prometheus
            .query_scalar("sum(ml_predict_latency_seconds_count)")
            .await,
        Some(total as f64)
    );
    let prom_p99 = prometheus
        .query_scalar("histogram_quantile(0.99, sum by (le) (ml_predict_latency_seconds_bucket))")
        .await
        .expect("a p99 from Prometheus");

    // The dashboard's queries are valid PromQL for this Prometheus.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/grafana/dashboards/mlplatform.json"),
        )
        .expect("the Grafana dashboard"),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| {
            t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
        })
        .collect();
    assert!(exprs.len() >= 8, "{exprs:?}");
    for expr in &exprs {
        if let Err(e) = prometheus.query(expr).await {
            panic!("dashboard query {expr:?} fails: {e}");
        }
    }

    // The monitor's own exposition, read directly.
    let (status, text) = http_get(&metrics_addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        text.contains(r#"ml_predict_errors_total{code="unknown_user",model_version="1"} 25"#),
        "{text}"
    );

    // Stop the monitor: it prints the window in progress, all the traffic.
    monitor.stop().await;
    let lines = json_lines(&out);
    let last = lines.last().expect("the monitor printed its last window");
    assert_eq!(last["count"].as_u64(), Some(total), "{last}");
    let printed_p99 = last["latency_ms"]["p99"].as_f64().unwrap() / 1e3;
    let (lower, upper) = bucket_around(printed_p99);
    assert!(
        lower <= prom_p99 && prom_p99 <= upper,
        "Prometheus p99 {prom_p99} s, monitor p99 {printed_p99} s: not in the same bucket [{lower}, {upper}]"
    );
    eprintln!(
        "p99: monitor {printed_p99:e} s, Prometheus {prom_p99:e} s (bucket [{lower:e}, {upper:e}])"
    );

    for service in [predictor, trainer, registry] {
        service.stop().await;
    }
}

/// A monitor with 0.5 s windows, drift from 200 samples, and one alert
/// rule (written into `dir`): `DataDrift` when the PSI is above 0.2; its
/// text lines go to the returned output.
pub(crate) fn drift_monitor(url: &str, dir: &std::path::Path) -> (services::Service, Output) {
    let rules = dir.join("alerts.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"DataDrift\"\nmetric = \"drift_psi\"\nabove = 0.2\nfor = \"0s\"\n",
    )
    .unwrap();
    let out = Output::default();
    let monitor = services::monitor_with(
        url,
        &[
            "--monitor-interval",
            "500ms",
            "--drift-min-samples",
            "200",
            "--alerts",
            rules.to_str().unwrap(),
        ],
        out.clone(),
    );
    (monitor, out)
}

/// The drift of each window measured so far: the monitor's text lines whose
/// drift is not "-".
fn drift_values(out: &Output) -> Vec<f64> {
    out.lines()
        .iter()
        .filter_map(|l| l.split(" drift=").nth(1))
        .filter_map(|d| d.split('(').next()?.parse().ok())
        .collect()
}

/// With a monitor writing text lines to `out` (drift alert rule: PSI above
/// 0.2) and a production model profiled on the generated data: four
/// windows of unshifted traffic measure drift below 0.2 and raise no alert,
/// then shifted traffic (feature_1 in [0, 4) instead of [-2, 2), feature_2
/// in [4, 14) instead of [0, 10)) fires `DataDrift`, whose notice is
/// returned.
pub(crate) async fn drift_fires_on_shifted_traffic_only(
    client: &Client,
    alerts: &mut async_nats::Subscriber,
    rng: &mut impl Rng,
    out: &Output,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    while drift_values(out).len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no drift measured:\n{}",
            out.text()
        );
        send_all(client, feature_requests(rng, 300, -2.0, 0.0)).await;
    }
    let unshifted = drift_values(out);
    assert!(
        unshifted.iter().all(|psi| *psi < 0.2),
        "{unshifted:?}\n{}",
        out.text()
    );
    assert!(!out.text().contains("ALERT"), "{}", out.text());
    let early = tokio::time::timeout(Duration::from_millis(100), alerts.next()).await;
    assert!(early.is_err(), "no alert expected: {early:?}");

    let notice = traffic_until_alert(client, alerts, rng, (0.0, 4.0), out).await;
    assert_eq!(notice["alert"], "DataDrift", "{notice}");
    assert_eq!(notice["state"], "firing", "{notice}");
    assert_eq!(notice["metric"], "drift_psi", "{notice}");
    assert!(notice["value"].as_f64().unwrap() > 0.2, "{notice}");
    let detail = notice["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("feature_1="), "{notice}");
    notice
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shifted_traffic_fires_the_drift_alert_and_unshifted_does_not() {
    ml_tests::init_logging();
    // Load with timing-dependent windows: not alongside the other heavy tests.
    let _heavy = HEAVY.lock().await;
    let Bed {
        nats: _nats,
        url,
        dir,
        data,
    } = Bed::new(3000, 7);
    let registry = services::registry(&url, &dir.path().join("registry"), &data);
    let trainer = services::trainer(&url, &data, "1h");
    let predictor = services::predictor(&url, &data);
    let (monitor, out) = drift_monitor(&url, dir.path());
    let client = client(&url).await;
    let mut alerts = client.subscribe("ml.alerts").await.unwrap();
    client.flush().await.unwrap();
    wait_served(&client).await;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);

    let notice = drift_fires_on_shifted_traffic_only(&client, &mut alerts, &mut rng, &out).await;
    let detail = notice["detail"].as_str().unwrap_or_default();
    // The predictor sends at most EVENT_SAMPLE_MAX (1,000) samples a
    // second, however many requests it serves: about 500 in a 0.5 s window.
    let samples: u64 = detail
        .split("samples=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("samples in {detail:?}"));
    assert!((200..=600).contains(&samples), "{notice}");
    let stats = request_json(&client, "ml.monitor.stats", "").await;
    assert_eq!(stats["alerts"][0]["alert"], "DataDrift", "{stats}");
    assert_eq!(stats["alerts"][0]["state"], "firing", "{stats}");
    wait_for("the marked line", WAIT, || {
        let found = out.text().contains("ALERT FIRING DataDrift");
        async move { found.then_some(()) }
    })
    .await;

    // Back to the training distribution: the alert resolves.
    let resolved = traffic_until_alert(&client, &mut alerts, &mut rng, (-2.0, 0.0), &out).await;
    assert_eq!(
        (&resolved["alert"], &resolved["state"]),
        (&Value::from("DataDrift"), &Value::from("resolved")),
        "{resolved}"
    );
    for service in [monitor, predictor, trainer, registry] {
        service.stop().await;
    }
}

fn event(outcome: Outcome) -> LatencyEvent {
    LatencyEvent {
        ts_ms: ml_shared::time::now_ms(),
        duration_ns: 20_000,
        model_version: Some(1),
        outcome,
        sample: None,
        variant: None,
        answer: None,
    }
}

async fn publish(client: &Client, seq: u64, events: Vec<LatencyEvent>) {
    let batch = EventBatch {
        predictor: "p-test".into(),
        seq,
        dropped: 0,
        raw_features: Vec::new(),
        events,
        shadow_dropped: 0,
    };
    client
        .publish(
            "ml.monitor.events",
            serde_json::to_vec(&batch).unwrap().into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_from_a_file_fire_and_resolve_and_gaps_count_as_lost() {
    ml_tests::init_logging();
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = ml_tests::temp_dir();
    let rules = dir.path().join("alerts.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"ErrorRateHigh\"\nmetric = \"error_rate\"\nabove = 0.5\nfor = \"0s\"\nseverity = \"page\"\n\
         [[rule]]\nname = \"EventsLost\"\nmetric = \"lost_events\"\nabove = 0\n",
    )
    .unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let out = Output::default();
    let monitor = services::monitor_with(
        &url,
        &[
            "--monitor-interval",
            "300ms",
            "--monitor-format",
            "json",
            "--alerts",
            rules.to_str().unwrap(),
            "--metrics-addr",
            &metrics_addr,
        ],
        out.clone(),
    );
    let client = client(&url).await;
    // The monitor counts events only from running predictors' ids.
    let _running = crate::monitor_bounds::running_predictor(&client, "p-test").await;
    let mut alerts = client.subscribe("ml.alerts").await.unwrap();
    client.flush().await.unwrap();
    wait_for("the monitor answers", WAIT, || async {
        client.request("ml.monitor.stats", "".into()).await.ok()
    })
    .await;

    // A predictor's batches as it numbers them: events 0..3, 3..6, then
    // 10..12, so 6..10 were lost; most requests failed.
    let bad = || event(Outcome::Error(ErrorCode::BadRequest));
    publish(&client, 0, vec![bad(), bad(), event(Outcome::Ok)]).await;
    publish(&client, 3, vec![bad(), bad(), bad()]).await;
    publish(&client, 10, vec![bad(), event(Outcome::Ok)]).await;

    let mut fired = Vec::new();
    while fired.len() < 2 {
        let m = tokio::time::timeout(WAIT, alerts.next())
            .await
            .expect("alerts fire in time")
            .unwrap();
        fired.push(serde_json::from_slice::<Value>(&m.payload).unwrap());
    }
    fired.sort_by_key(|n| n["alert"].as_str().unwrap().to_owned());
    assert_eq!(fired[0]["alert"], "ErrorRateHigh");
    assert_eq!(fired[0]["state"], "firing");
    assert_eq!(fired[0]["severity"], "page");
    assert!(fired[0]["value"].as_f64().unwrap() > 0.5, "{}", fired[0]);
    assert_eq!(fired[1]["alert"], "EventsLost");
    assert_eq!(fired[1]["value"], 4.0);

    let stats = request_json(&client, "ml.monitor.stats", "").await;
    assert_eq!(stats["total"]["lost"], 4, "{stats}");
    assert_eq!(stats["total"]["count"], 8, "{stats}");
    let (_, text) = http_get(&metrics_addr, "/metrics").await.unwrap();
    assert!(text.contains("ml_monitor_events_lost_total 4"), "{text}");

    // Successes only: the error-rate alert resolves.
    publish(&client, 12, vec![event(Outcome::Ok); 10]).await;
    let resolved = loop {
        let m = tokio::time::timeout(WAIT, alerts.next())
            .await
            .expect("the error-rate alert resolves in time")
            .unwrap();
        let n: Value = serde_json::from_slice(&m.payload).unwrap();
        if n["alert"] == "ErrorRateHigh" {
            break n;
        }
    };
    assert_eq!(resolved["state"], "resolved");

    // The printed lines: windows and the alerts as JSON, one per line.
    let lines = json_lines(&out);
    assert!(
        lines
            .iter()
            .any(|l| l["alert"] == "ErrorRateHigh" && l["state"] == "firing"),
        "{}",
        out.text()
    );
    let windows = lines.iter().filter(|l| l.get("alert").is_none());
    let lost: u64 = windows.clone().filter_map(|l| l["lost"].as_u64()).sum();
    let count: u64 = windows.filter_map(|l| l["count"].as_u64()).sum();
    assert_eq!((lost, count), (4, 18), "{}", out.text());
    monitor.stop().await;
}
