//! Bounded resources: a burst of 10,000 requests at one predictor is
//! answered (a prediction or `busy`), and the predictor's memory stays
//! bounded by its limits, not by the burst.

use std::time::Duration;

use ml_tests::services::{self, Process};
use ml_tests::wait_for;
use serde_json::Value;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(15);

/// A field of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_in_flight_get_answers_or_busy_in_bounded_memory() {
    ml_tests::init_logging();
    let _heavy = HEAVY.lock().await;
    let Bed {
        nats: _nats,
        url,
        dir,
        data,
    } = Bed::new(200, 31);
    let registry = services::registry(&url, &dir.path().join("registry"), &data);
    let trainer = services::trainer(&url, &data, "1h");
    let log = dir.path().join("predictor.log");
    let predictor = Process::start(
        "predictor",
        &[],
        &[
            ("NATS_URL", url.as_str()),
            ("DATA_PATH", data.to_str().unwrap()),
            ("MODEL_POLL", "200ms"),
            ("MAX_IN_FLIGHT", "8"),
        ],
        &log,
    );
    let client = resilient_client(&url, Duration::from_secs(20)).await;
    let body = user_body(&data, 0);
    wait_for("version 1 served", WAIT, || async {
        let m = client
            .request("ml.predict", body.clone().into())
            .await
            .ok()?;
        let v: Value = serde_json::from_slice(&m.payload).ok()?;
        v["model_version"].as_u64()
    })
    .await;

    // 4 KiB requests (valid JSON padded with spaces): 10,000 of them are
    // 40 MiB, far more than the predictor's limits let it hold.
    let mut padded = body.clone().into_bytes();
    padded.resize(4096, b' ');
    let padded = bytes::Bytes::from(padded);
    let pid = predictor.pid();
    let before = status_kib(pid, "VmRSS:");
    let mut peaks = Vec::new();
    for burst in 1..=2 {
        let started = std::time::Instant::now();
        let replies = futures::future::join_all((0..10_000).map(|_| {
            let (client, padded) = (client.clone(), padded.clone());
            async move { client.request("ml.predict", padded).await }
        }))
        .await;
        let took = started.elapsed();
        peaks.push(status_kib(pid, "VmHWM:"));
        let (mut ok, mut busy, mut other) = (0, 0, Vec::new());
        for reply in replies {
            match reply {
                Ok(m) => {
                    let v: Value = serde_json::from_slice(&m.payload).unwrap();
                    if v["model_version"] == 1 {
                        ok += 1;
                    } else if v["error"]["code"] == "busy" {
                        busy += 1;
                        let headers = m.headers.expect("error headers");
                        assert_eq!(
                            headers.get("Nats-Service-Error-Code").map(|v| v.as_str()),
                            Some("503")
                        );
                    } else {
                        other.push(v.to_string());
                    }
                }
                Err(e) => other.push(format!("{:?}", e.kind())),
            }
        }
        eprintln!(
            "burst {burst} of 10,000 requests of 4 KiB in {took:?}: {ok} predictions, {busy} busy, {} other; predictor RSS {before} KiB before, peak {} KiB",
            other.len(),
            peaks[burst - 1]
        );
        assert!(
            other.is_empty(),
            "{} not answered: {:?}",
            other.len(),
            &other[..other.len().min(5)]
        );
        assert!(ok > 0 && busy > 0, "{ok} ok, {busy} busy");
    }
    // Bounded by the limits: at most PREDICT_BUFFER + MAX_IN_FLIGHT
    // requests held, 64 MiB of 4 KiB messages with the default buffer.
    assert!(
        peaks[1].saturating_sub(before) < 64 * 1024,
        "RSS grew from {before} KiB to a peak of {} KiB",
        peaks[1]
    );
    // And it goes on serving.
    let v = request_json(&client, "ml.predict", &body).await;
    assert_eq!(v["model_version"], 1, "{v}");
    drop(predictor);
    for service in [trainer, registry] {
        service.stop().await;
    }
}
