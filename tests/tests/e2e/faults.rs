//! Faults: NATS killed and restarted under load, services started before
//! NATS, no predictor, a predictor stopped under load, the monitor or the
//! registry down, the registry's disk full. Real `nats-server`, real
//! services (in-process or as processes), real files.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ml_shared::codec;
use ml_shared::messages::{Metrics, RunRecord, Submission, TrainParams};
use ml_shared::model::ModelArtifact;
use ml_tests::services::{self, binary, Process};
use ml_tests::{wait_for, NatsServer};
use serde_json::Value;

use crate::common::*;
use crate::load;

const WAIT: Duration = Duration::from_secs(15);
/// The request timeout of the load's client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Slack on top of a timeout for a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(1);

/// Waits until `client` gets a prediction from version `version`.
async fn wait_served(client: &async_nats::Client, body: &str, version: u64, what: &str) {
    wait_for(what, WAIT, || async {
        let m = client
            .request("ml.predict", body.to_owned().into())
            .await
            .ok()?;
        let v: Value = serde_json::from_slice(&m.payload).ok()?;
        (v["model_version"].as_u64() == Some(version)).then_some(())
    })
    .await;
}

/// Every request of the load succeeded.
fn assert_all_ok(samples: &[load::Sample], what: &str) {
    assert!(!samples.is_empty(), "{what}: no request was sent");
    let errors = load::error_counts(samples);
    assert!(
        errors.is_empty(),
        "{what}: {} of {} requests failed: {errors:?}",
        errors.values().sum::<usize>(),
        samples.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_under_load_every_service_recovers() {
    ml_tests::init_logging();
    let _heavy = HEAVY.lock().await;
    let Bed {
        mut nats,
        url,
        dir,
        data,
    } = Bed::new(500, 11);
    let registry = services::registry(&url, &dir.path().join("registry"), &data);
    let predictors = [
        services::predictor(&url, &data),
        services::predictor(&url, &data),
    ];
    let monitor = services::monitor(&url, "500ms");
    let trainer = services::trainer(&url, &data, "1h");
    let client = resilient_client(&url, REQUEST_TIMEOUT).await;
    let body = user_body(&data, 3);
    wait_served(&client, &body, 1, "version 1 served").await;
    wait_for("both predictors up", WAIT, || async {
        (predictor_request_counts(&client).await.len() == 2).then_some(())
    })
    .await;

    let load = load::start(&client, &body, 4, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = load.elapsed();
    nats.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart();
    let back = load.elapsed();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let samples = load.finish().await;
    let end = samples.last().expect("samples").sent;

    // Every request ended, with a reply or an error, within its timeout.
    let slowest = samples.iter().map(|s| s.took).max().unwrap();
    assert!(
        slowest <= REQUEST_TIMEOUT + SLACK,
        "a request took {slowest:?}"
    );
    let (before, n_before) = load::success_rate(&samples, Duration::ZERO, killed);
    assert!(
        before >= 0.99,
        "success {before:.4} of {n_before} requests before the kill: {:?}",
        load::error_counts(&samples)
    );
    let (after, n_after) = load::success_rate(&samples, back + Duration::from_secs(5), end);
    assert!(n_after > 100, "only {n_after} requests after recovery");
    assert!(
        after >= 0.99,
        "success {after:.4} of {n_after} requests sent from 5 s after NATS returned; errors {:?}",
        load::error_counts(&samples)
    );
    let first_ok = samples
        .iter()
        .find(|s| s.sent >= back && s.error.is_none())
        .map(|s| s.sent + s.took - back);
    let last_failure = samples
        .iter()
        .filter(|s| s.error.is_some())
        .map(|s| s.sent + s.took)
        .max();
    eprintln!(
        "nats restart: {} requests, {} failed, outage {:?}; first success {first_ok:?} after NATS returned, last failure ended {:?} after it; success from +5 s: {after:.4} of {n_after}",
        samples.len(),
        samples.iter().filter(|s| s.error.is_some()).count(),
        back - killed,
        last_failure.map(|t| t.saturating_sub(back)),
    );

    // Every service resubscribed: a model trained now reaches both predictors.
    let train = request_json(&client, "ml.train", "").await;
    assert_eq!(train["version"], 2, "{train}");
    let before = predictor_request_counts(&client).await;
    assert_eq!(
        before.len(),
        2,
        "both predictors answer $SRV after the restart"
    );
    wait_for("both predictors serve version 2", WAIT, || async {
        for _ in 0..40 {
            let m = client
                .request("ml.predict", body.clone().into())
                .await
                .ok()?;
            let v: Value = serde_json::from_slice(&m.payload).ok()?;
            if v["model_version"] != 2 {
                return None;
            }
        }
        let after = predictor_request_counts(&client).await;
        let both_answered = after.len() == 2 && after.iter().all(|(id, n)| *n > before[id]);
        both_answered.then_some(())
    })
    .await;
    let stats = request_json(&client, "ml.monitor.stats", "").await;
    assert!(stats["total"]["count"].as_u64() > Some(0), "{stats}");
    let models = request_json(&client, "ml.registry.models", "").await;
    assert_eq!(models["production"], 2, "{models}");

    let [p1, p2] = predictors;
    for service in [trainer, monitor, p1, p2, registry] {
        service.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_started_before_nats_are_ready_within_5s_of_it() {
    ml_tests::init_logging();
    let _heavy = HEAVY.lock().await;
    let mut nats = NatsServer::start();
    let url = nats.url();
    nats.kill();
    let dir = ml_tests::temp_dir();
    let data = dir.path().join("users.csv");
    write_data(&data, 300, 12);
    let registry = services::registry(&url, &dir.path().join("registry"), &data);
    let predictor = services::predictor(&url, &data);
    let monitor = services::monitor(&url, "500ms");
    let trainer = services::trainer(&url, &data, "1h");
    // Long enough for every client's reconnect delay to reach its maximum.
    tokio::time::sleep(Duration::from_secs(3)).await;

    nats.restart();
    let up = Instant::now();
    let client = client(&url).await;
    let within = |d: Duration| Duration::from_secs(5).saturating_sub(d);
    let body = user_body(&data, 1);
    // The predictor serves the model the trainer trained and the registry
    // published: all of them are connected and subscribed.
    wait_served(&client, &body, 1, "predictor serves version 1").await;
    let served = up.elapsed();
    ml_tests::registry_answers(&client, within(up.elapsed())).await;
    wait_for("monitor answers", within(up.elapsed()), || async {
        client.request("ml.monitor.stats", "".into()).await.ok()
    })
    .await;
    let train = wait_for("trainer answers", within(up.elapsed()), || async {
        let m = client.request("ml.train", "".into()).await.ok()?;
        serde_json::from_slice::<Value>(&m.payload).ok()
    })
    .await;
    let all = up.elapsed();
    assert_eq!(train["version"], 2, "{train}");
    eprintln!("started before NATS: model served {served:?} and every service answering {all:?} after NATS came up");
    assert!(
        served <= Duration::from_secs(5) && all <= Duration::from_secs(5) + SLACK,
        "served after {served:?}, all ready after {all:?}"
    );
    for service in [trainer, monitor, predictor, registry] {
        service.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_predictor_means_no_responders_at_once() {
    ml_tests::init_logging();
    let nats = NatsServer::start();
    let url = nats.url();
    // A long timeout: answering `no responders` is not waiting for it.
    let client = resilient_client(&url, Duration::from_secs(30)).await;
    let started = Instant::now();
    let error = client
        .request("ml.predict", r#"{"user_id":"u"}"#.into())
        .await
        .expect_err("nobody answers");
    assert_eq!(
        error.kind(),
        async_nats::client::RequestErrorKind::NoResponders,
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));

    let out = Command::new(binary("mlctl"))
        .args(["predict", "some-user"])
        .env("NATS_URL", &url)
        .env("NATS_REQUEST_TIMEOUT", "30s")
        .output()
        .expect("run mlctl");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the predictor is unavailable"), "{stderr}");
    assert!(stderr.contains("no responders"), "{stderr}");
}

/// Environment of a predictor process.
fn predictor_env<'a>(url: &'a str, data: &'a Path) -> Vec<(&'a str, &'a str)> {
    vec![
        ("NATS_URL", url),
        ("DATA_PATH", data.to_str().unwrap()),
        ("MODEL_POLL", "200ms"),
        ("EVENT_FLUSH", "50ms"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predictor_stopped_with_sigterm_under_load_loses_no_request() {
    ml_tests::init_logging();
    let _heavy = HEAVY.lock().await;
    let Bed {
        nats: _nats,
        url,
        dir,
        data,
    } = Bed::new(300, 13);
    let registry = services::registry(&url, &dir.path().join("registry"), &data);
    let trainer = services::trainer(&url, &data, "1h");
    let log = |n: usize| dir.path().join(format!("predictor-{n}.log"));
    let env = predictor_env(&url, &data);
    let stopping = Process::start("predictor", &[], &env, &log(1));
    let staying = Process::start("predictor", &[], &env, &log(2));
    let client = resilient_client(&url, REQUEST_TIMEOUT).await;
    let body = user_body(&data, 2);
    wait_served(&client, &body, 1, "version 1 served").await;
    wait_for("both predictors serve", WAIT, || async {
        for _ in 0..20 {
            client
                .request("ml.predict", body.clone().into())
                .await
                .ok()?;
        }
        let counts = predictor_request_counts(&client).await;
        (counts.len() == 2 && counts.values().all(|&n| n > 0)).then_some(())
    })
    .await;

    let load = load::start(&client, &body, 4, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, took) = tokio::task::spawn_blocking(move || {
        let mut stopping = stopping;
        let started = Instant::now();
        let status = stopping.terminate(Duration::from_secs(10));
        (status, started.elapsed())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let samples = load.finish().await;
    let text = std::fs::read_to_string(log(1)).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?} after {took:?}\n{text}"
    );
    assert!(text.contains("in-flight requests answered"), "{text}");
    eprintln!(
        "SIGTERM under load: exit after {took:?}, {} requests, {} failed",
        samples.len(),
        samples.iter().filter(|s| s.error.is_some()).count()
    );
    assert_all_ok(&samples, "requests around the SIGTERM");
    drop(staying);
    for service in [trainer, registry] {
        service.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_are_unaffected_by_a_slow_or_dead_monitor_which_then_resumes() {
    ml_tests::init_logging();
    let _heavy = HEAVY.lock().await;
    let Bed {
        nats: _nats,
        url,
        dir,
        data,
    } = Bed::new(300, 14);
    let registry = services::registry(&url, &dir.path().join("registry"), &data);
    let trainer = services::trainer(&url, &data, "1h");
    let predictor = services::predictor(&url, &data);
    let monitor_env = [("NATS_URL", url.as_str()), ("MONITOR_INTERVAL", "500ms")];
    let monitor_log = |n: usize| dir.path().join(format!("monitor-{n}.log"));
    let monitor = Process::start("monitor", &[], &monitor_env, &monitor_log(1));
    let client = resilient_client(&url, REQUEST_TIMEOUT).await;
    let body = user_body(&data, 4);
    wait_served(&client, &body, 1, "version 1 served").await;
    let total = || async {
        let m = client.request("ml.monitor.stats", "".into()).await.ok()?;
        let v: Value = serde_json::from_slice(&m.payload).ok()?;
        v["total"]["count"].as_u64()
    };

    let load = load::start(&client, &body, 2, Duration::from_millis(5));
    let counted = wait_for("monitor counts", WAIT, || async {
        total().await.filter(|&n| n > 0)
    })
    .await;
    // Slow: the monitor stops reading (SIGSTOP) while predictions go on.
    monitor.signal("STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    monitor.signal("CONT");
    wait_for("monitor counts again after SIGCONT", WAIT, || async {
        total().await.filter(|&n| n > counted + 100)
    })
    .await;
    // Dead: predictions go on; a new monitor counts the new traffic.
    drop(monitor);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let monitor = Process::start("monitor", &[], &monitor_env, &monitor_log(2));
    wait_for("a new monitor counts", WAIT, || async {
        total().await.filter(|&n| n > 0)
    })
    .await;
    let samples = load.finish().await;
    assert_all_ok(&samples, "predictions while the monitor was slow or down");
    drop(monitor);
    for service in [predictor, trainer, registry] {
        service.stop().await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn latency_events_past_the_buffer_are_dropped_and_counted() {
    use futures::StreamExt;
    ml_tests::init_logging();
    let nats = NatsServer::start();
    let client = client(&nats.url()).await;
    let mut batches = client.subscribe("ml.monitor.events").await.unwrap();
    client.flush().await.unwrap();
    let (sink, task) = predictor::events::spawn(
        client.clone(),
        predictor::events::EventSettings {
            subject: "ml.monitor.events".into(),
            predictor: "p".into(),
            capacity: 8,
            batch: 512,
            flush: Duration::from_millis(10),
            sample_rate: 0.0,
            raw_features: Vec::new(),
            sample_max_per_s: 0,
        },
    );
    // On this single-threaded runtime the publishing task cannot run while
    // the loop records: everything past the buffer's 8 slots is dropped.
    for _ in 0..1000 {
        sink.record(ml_shared::messages::LatencyEvent {
            ts_ms: 0,
            duration_ns: 1,
            model_version: Some(1),
            outcome: ml_shared::messages::Outcome::Ok,
            sample: None,
            variant: None,
            answer: None,
        });
    }
    drop(sink);
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    let (mut events, mut dropped) = (0, 0);
    while events + dropped < 1000 {
        let m = tokio::time::timeout(WAIT, batches.next())
            .await
            .expect("a batch")
            .unwrap();
        let batch: ml_shared::messages::EventBatch = serde_json::from_slice(&m.payload).unwrap();
        events += batch.events.len() as u64;
        dropped += batch.dropped;
    }
    assert_eq!((events, dropped), (8, 992));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictors_outlive_the_registry_and_a_late_one_serves_when_it_returns() {
    ml_tests::init_logging();
    let _heavy = HEAVY.lock().await;
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = ml_tests::temp_dir();
    let data = dir.path().join("users.csv");
    let registry_dir = dir.path().join("registry");
    write_data(&data, 300, 15);
    let registry = services::registry(&url, &registry_dir, &data);
    let trainer = services::trainer(&url, &data, "1h");
    // Reconciling often: it asks the registry while it is down, and must
    // keep its model all the same.
    let early = services::predictor_with(&url, &data, &["--model-reconcile", "200ms"]);
    let client = resilient_client(&url, REQUEST_TIMEOUT).await;
    let body = user_body(&data, 5);
    wait_served(&client, &body, 1, "version 1 served").await;

    registry.stop().await;
    let load = load::start(&client, &body, 2, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = load.finish().await;
    assert_all_ok(&samples, "predictions while the registry is down");
    assert!(samples.iter().all(|s| s.version == Some(1)));

    // A predictor started while the registry is down has no model...
    let late = services::predictor(&url, &data);
    early.stop().await;
    let reply = wait_for("late predictor answers", WAIT, || async {
        let m = client
            .request("ml.predict", body.clone().into())
            .await
            .ok()?;
        serde_json::from_slice::<Value>(&m.payload).ok()
    })
    .await;
    assert_eq!(reply["error"]["code"], "no_model", "{reply}");
    // ...and serves as soon as the registry is back.
    let registry = services::registry(&url, &registry_dir, &data);
    let back = Instant::now();
    wait_served(&client, &body, 1, "late predictor serves version 1").await;
    eprintln!(
        "registry back: late predictor served after {:?}",
        back.elapsed()
    );
    for service in [late, trainer, registry] {
        service.stop().await;
    }
}

/// A valid submission whose intercept tells it apart.
fn submission(intercept: f64) -> Submission {
    let names: Vec<String> = ["feature_1", "feature_2", "feature_3"]
        .map(String::from)
        .into();
    Submission {
        run: RunRecord {
            run_id: format!("run-{intercept}"),
            started_ms: 0,
            duration_ms: 1,
            params: TrainParams {
                model: "linear".into(),
                seed: 1,
                validation_fraction: 0.2,
            },
            metrics: Metrics::regression(0.1, 0.1, 0.99),
            rows_train: 8,
            rows_validation: 2,
            data_path: "d.csv".into(),
            data_fingerprint: "sha256:00".into(),
            feature_names: names.clone(),
        },
        // Each submission a different model, better than the one before on
        // the exact holdout (RMSE 1/intercept): the gate promotes each.
        artifact: ModelArtifact {
            feature_names: names,
            intercept: EXACT.1 + 1.0 / intercept,
            ..exact_artifact(0.0)
        },
    }
}

/// Submits and returns the registry's JSON reply.
async fn submit(client: &async_nats::Client, s: &Submission) -> Value {
    let m = request(client, "ml.registry.submit", codec::encode(s)).await;
    serde_json::from_slice(&m.payload).expect("JSON reply")
}

/// Sets the soft file-size limit (bytes) of a running process.
fn set_file_size_limit(pid: u32, soft: &str) {
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--fsize={soft}:unlimited"),
        ])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit failed");
}

fn versions(models: &Value) -> Vec<u64> {
    models["models"]
        .as_array()
        .expect("models")
        .iter()
        .map(|m| m["version"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_the_submission_keeps_earlier_versions_and_recovers() {
    ml_tests::init_logging();
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = ml_tests::temp_dir();
    let store = dir.path().join("registry");
    let holdout = dir.path().join("exact.csv");
    write_exact_data(&holdout, 200);
    let env = [
        ("NATS_URL", url.as_str()),
        ("REGISTRY_DIR", store.to_str().unwrap()),
        ("REGISTRY_HOLDOUT_PATH", holdout.to_str().unwrap()),
    ];
    let log = dir.path().join("registry.log");
    let mut registry = Process::start("registry", &[], &env, &log);
    let client = client(&url).await;
    let first = wait_for("registry acknowledges", WAIT, || async {
        let m = client
            .request("ml.registry.submit", codec::encode(&submission(1.0)).into())
            .await
            .ok()?;
        serde_json::from_slice::<Value>(&m.payload).ok()
    })
    .await;
    assert_eq!(first["version"], 1, "{first}");
    let log_path = store.join("experiments.csv");
    let artifact = store.join("models/model-00000001.bin");
    let snapshot = || {
        (
            std::fs::read(&log_path).unwrap(),
            std::fs::read(&artifact).unwrap(),
            std::fs::read(store.join("production.json")).unwrap(),
        )
    };
    let before = snapshot();

    // 1. No room even for the artifact.
    set_file_size_limit(registry.pid(), "64");
    let reply = client
        .request("ml.registry.submit", codec::encode(&submission(2.0)).into())
        .await;
    let reply: Value = match reply {
        Ok(m) => serde_json::from_slice(&m.payload).unwrap(),
        Err(e) => panic!(
            "{e}: {:?}\n{}",
            registry.child.try_wait(),
            std::fs::read_to_string(&log).unwrap()
        ),
    };
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("File too large"),
        "{reply}"
    );
    assert!(reply.get("version").is_none());
    assert_eq!(snapshot(), before, "earlier state untouched");

    // 2. Room for the artifact but not for the log line: the partial line
    // is cut and the artifact removed.
    let artifact_len = std::fs::metadata(&artifact).unwrap().len();
    let log_len = before.0.len() as u64;
    assert!(
        artifact_len + 64 < log_len + 100,
        "sizes {artifact_len}, {log_len}"
    );
    set_file_size_limit(
        registry.pid(),
        &(log_len.max(artifact_len + 64) + 20).to_string(),
    );
    let reply = submit(&client, &submission(3.0)).await;
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
    assert_eq!(snapshot(), before, "log cut back, production unchanged");
    let files: Vec<String> = std::fs::read_dir(store.join("models"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files,
        ["model-00000001.bin"],
        "no orphan, no temporary file"
    );
    let models = request_json(&client, "ml.registry.models", "").await;
    assert_eq!(
        (versions(&models), models["production"].clone()),
        (vec![1], 1.into())
    );
    assert!(
        registry.child.try_wait().unwrap().is_none(),
        "SIGXFSZ did not kill it"
    );

    // 3. Space returns: the next submission is stored and acknowledged.
    set_file_size_limit(registry.pid(), "unlimited");
    let reply = submit(&client, &submission(4.0)).await;
    let version = reply["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("{reply}"));
    assert!(version >= 2, "{reply}");
    let models = request_json(&client, "ml.registry.models", "").await;
    assert_eq!(versions(&models), [1, version], "{models}");
    assert_eq!(models["production"], version);

    // Restarted, it has exactly what it acknowledged.
    let status = registry.terminate(WAIT);
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let _registry = Process::start("registry", &[], &env, &dir.path().join("registry-2.log"));
    let models = wait_for("restarted registry answers", WAIT, || async {
        let m = client.request("ml.registry.models", "".into()).await.ok()?;
        serde_json::from_slice::<Value>(&m.payload).ok()
    })
    .await;
    assert_eq!(versions(&models), [1, version], "{models}");
    let runs = request_json(&client, "ml.registry.runs", "").await;
    assert_eq!(runs["runs"].as_array().unwrap().len(), 2, "{runs}");
    // (The registry's own log file is past the limit too: those lines are
    // lost, and the registry is not stopped by it.)
}
