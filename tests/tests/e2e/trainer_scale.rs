//! The trainer at scale, as a real process: a large file trains in bounded
//! memory (peak RSS read from `/proc`), a corrupt row in the middle of a
//! large file fails the run with its line and promotes nothing, and a
//! restarted trainer on unchanged data registers no new version.
//!
//! The large file has [`DEFAULT_SCALE_ROWS`] rows (`TRAINER_SCALE_ROWS`
//! overrides it: the benchmark runs this test at 10⁷ rows with release
//! binaries, `bench/trainer.sh`).

use std::path::Path;
use std::time::Duration;

use ml_tests::services::{self, Process};
use ml_tests::wait_for;
use serde_json::Value;

use crate::common::*;

/// Rows of the large file in CI (debug binaries on 2 cores).
const DEFAULT_SCALE_ROWS: usize = 2_000_000;

/// Peak resident memory the trainer may reach on the large file.
const RSS_LIMIT_KB: u64 = 100 * 1024;

/// Generous: debug binaries on a shared 2-core machine.
const LONG: Duration = Duration::from_secs(600);

fn scale_rows() -> usize {
    std::env::var("TRAINER_SCALE_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SCALE_ROWS)
}

/// A field of `/proc/<pid>/status`, in kB.
fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// The trainer binary on `data`, training at start and then hourly, its log
/// in `log`.
fn trainer_process(url: &str, data: &Path, log: &Path, extra_env: &[(&str, &str)]) -> Process {
    let mut env = vec![
        ("NATS_URL", url),
        ("DATA_PATH", data.to_str().unwrap()),
        ("TRAIN_INTERVAL", "1h"),
        ("TRAIN_RETRY", "200ms"),
        ("SUBMIT_TIMEOUT", "60s"),
    ];
    env.extend_from_slice(extra_env);
    Process::start("trainer", &[], &env, log)
}

/// The registered versions; none while the registry does not answer yet.
async fn versions(client: &async_nats::Client) -> Vec<u64> {
    let Ok(reply) = client.request("ml.registry.models", "".into()).await else {
        return Vec::new();
    };
    let models: Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
    models["models"]
        .as_array()
        .map(|m| m.iter().filter_map(|v| v["version"].as_u64()).collect())
        .unwrap_or_default()
}

fn log_text(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_trains_in_bounded_memory() {
    ml_tests::init_logging();
    let _heavy = HEAVY.lock().await;
    let bed = Bed::new(10, 1);
    let rows = scale_rows();
    let data = bed.dir.path().join("large.csv");
    let started = std::time::Instant::now();
    let file = std::io::BufWriter::new(std::fs::File::create(&data).unwrap());
    ml_shared::gen::write_csv(file, rows, 77).unwrap();
    let size = std::fs::metadata(&data).unwrap().len();
    eprintln!(
        "generated {rows} rows ({:.0} MB) in {:.1} s",
        size as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    let registry = services::registry(&bed.url, &bed.dir.path().join("registry"), &data);
    let client = client(&bed.url).await;
    ml_tests::registry_answers(&client, LONG).await;
    let log = bed.dir.path().join("trainer.log");
    let started = std::time::Instant::now();
    let mut trainer = trainer_process(&bed.url, &data, &log, &[]);
    let pid = trainer.pid();
    let versions = wait_for("the large file's model registered", LONG, || async {
        let v = versions(&client).await;
        (!v.is_empty()).then_some(v)
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let peak_kb = proc_status_kb(pid, "VmHWM:");
    eprintln!(
        "trainer on {rows} rows ({:.0} MB): registered in {seconds:.1} s, peak RSS {:.1} MiB (VmHWM)",
        size as f64 / 1e6,
        peak_kb as f64 / 1024.0
    );
    assert_eq!(versions, [1]);
    assert!(
        peak_kb < RSS_LIMIT_KB,
        "peak RSS {peak_kb} kB on {rows} rows, limit {RSS_LIMIT_KB} kB"
    );
    let runs = request_json(&client, "ml.registry.runs", "").await;
    let run = &runs["runs"][0];
    let counted = run["rows_train"].as_u64().unwrap() + run["rows_validation"].as_u64().unwrap();
    assert_eq!(counted, rows as u64, "{run}");
    assert!(run["r2"].as_f64().unwrap() > 0.99, "{run}");
    let text = log_text(&log);
    assert!(text.contains("model fitted"), "{text}");
    assert!(text.contains("parse_mb_per_s"), "{text}");
    trainer.terminate(Duration::from_secs(10));
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_row_in_the_middle_fails_the_run_with_its_line_and_promotes_nothing() {
    ml_tests::init_logging();
    let bed = Bed::new(200_000, 3);
    // Line 100,001 (row 100,000) gets a feature that is not a number.
    let text = std::fs::read_to_string(&bed.data).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    let mut fields: Vec<&str> = lines[100_000].split(',').collect();
    fields[3] = "12..5";
    let corrupt = fields.join(",");
    lines[100_000] = &corrupt;
    std::fs::write(&bed.data, lines.join("\n") + "\n").unwrap();

    let registry = services::registry(&bed.url, &bed.dir.path().join("registry"), &bed.data);
    let trainer = services::trainer(&bed.url, &bed.data, "0");
    let client = client(&bed.url).await;
    ml_tests::registry_answers(&client, LONG).await;
    let reply: Value = wait_for("the trainer answers", LONG, || async {
        let m = client.request("ml.train", "".into()).await.ok()?;
        serde_json::from_slice(&m.payload).ok()
    })
    .await;
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("users.csv:100001"), "{message}");
    assert!(message.contains("feature_2"), "{message}");
    assert!(message.contains("12..5"), "{message}");
    let models = request_json(&client, "ml.registry.models", "").await;
    assert_eq!(models["models"], Value::Array(vec![]), "{models}");
    assert_eq!(models["production"], Value::Null, "{models}");
    let runs = request_json(&client, "ml.registry.runs", "").await;
    assert_eq!(runs["runs"][0]["status"], "failed", "{runs}");
    trainer.stop().await;
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_trainer_on_unchanged_data_registers_no_new_version() {
    ml_tests::init_logging();
    let bed = Bed::new(2000, 4);
    let registry = services::registry(&bed.url, &bed.dir.path().join("registry"), &bed.data);
    let client = client(&bed.url).await;

    let first_log = bed.dir.path().join("trainer-1.log");
    let mut trainer = trainer_process(&bed.url, &bed.data, &first_log, &[]);
    wait_for("version 1", LONG, || async {
        (versions(&client).await == [1]).then_some(())
    })
    .await;
    trainer.terminate(Duration::from_secs(10));

    // Restarted on the same file: the registry's newest run has its
    // fingerprint and parameters, so the scheduled run is skipped.
    let second_log = bed.dir.path().join("trainer-2.log");
    let mut trainer = trainer_process(&bed.url, &bed.data, &second_log, &[]);
    wait_for("the restarted trainer skips", LONG, || async {
        log_text(&second_log)
            .contains("skipping the scheduled run")
            .then_some(())
    })
    .await;
    assert_eq!(versions(&client).await, [1]);
    let text = log_text(&second_log);
    assert!(text.contains("the registry's newest run"), "{text}");
    // A request still trains.
    let reply = request_json(&client, "ml.train", "").await;
    assert_eq!(reply["version"], 2, "{reply}");
    trainer.terminate(Duration::from_secs(10));

    // Other parameters, or other data: the restarted trainer trains.
    let third_log = bed.dir.path().join("trainer-3.log");
    let mut trainer = trainer_process(&bed.url, &bed.data, &third_log, &[("TRAIN_SEED", "7")]);
    wait_for("version 3 for a new seed", LONG, || async {
        (versions(&client).await.len() == 3).then_some(())
    })
    .await;
    trainer.terminate(Duration::from_secs(10));
    write_data(&bed.data, 2000, 5);
    let fourth_log = bed.dir.path().join("trainer-4.log");
    let mut trainer = trainer_process(&bed.url, &bed.data, &fourth_log, &[("TRAIN_SEED", "7")]);
    wait_for("version 4 for new data", LONG, || async {
        (versions(&client).await.len() == 4).then_some(())
    })
    .await;
    trainer.terminate(Duration::from_secs(10));
    registry.stop().await;
}

/// `mlctl train` through the shipped configuration, as the operator: the
/// run's progress reports (each pass as it reads, each pass's end, the
/// submission) arrive before the reply, on the operator's inbox across
/// accounts; a malformed request trains nothing and the trainer serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_run_reports_its_progress_before_its_reply() {
    ml_tests::init_logging();
    const ROWS: usize = 200_000;
    let shipped = Shipped::start();
    let dir = ml_tests::temp_dir();
    let data = dir.path().join("users.csv");
    write_data(&data, ROWS, 5);
    let start = |name: &str, user: &str, extra: &[(&str, &str)]| {
        let mut env = shipped.env(user);
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Process::start(name, &[], &env, &dir.path().join(format!("{name}.log")))
    };
    let (registry_dir, data_path) = (dir.path().join("registry"), data.display().to_string());
    let _registry = start(
        "registry",
        "registry",
        &[
            ("REGISTRY_DIR", registry_dir.to_str().unwrap()),
            ("REGISTRY_HOLDOUT_PATH", &data_path),
        ],
    );
    let _trainer = start(
        "trainer",
        "trainer",
        &[
            ("DATA_PATH", &data_path),
            ("TRAIN_INTERVAL", "0"),
            ("TRAIN_PROGRESS_INTERVAL", "10ms"),
        ],
    );
    let (admin, _) = shipped.connect("admin").await;
    ml_tests::registry_answers(&admin, LONG).await;

    // The protocol itself: progress messages, then the reply, one inbox.
    let (progress, reply) = wait_for("a run with progress", LONG, || async {
        let (p, r) = train_with_progress(&admin).await;
        (r["version"].as_u64().is_some()).then_some((p, r))
    })
    .await;
    assert_eq!(reply["version"], 1, "{reply}");
    let done: Vec<&Value> = progress
        .iter()
        .filter(|p| p["event"] == "pass_done")
        .collect();
    assert!(!done.is_empty(), "{progress:?}");
    for (i, pass) in done.iter().enumerate() {
        assert_eq!(pass["pass_number"], i as u64 + 1, "{progress:?}");
        assert_eq!(pass["rows"], ROWS as u64, "{pass}");
        assert_eq!(pass["bytes"], pass["total_bytes"], "{pass}");
    }
    assert_eq!(done[0]["pass"], "statistics");
    let reading = progress.iter().filter(|p| p["event"] == "reading");
    assert!(
        reading
            .clone()
            .all(|p| p["rows"].as_u64() < Some(ROWS as u64)),
        "{progress:?}"
    );
    assert_eq!(
        progress.last().unwrap()["event"],
        "submitting",
        "{progress:?}"
    );
    assert_eq!(progress.last().unwrap()["rows"], ROWS as u64);

    // A malformed request: a structured refusal, nothing trained.
    let refused = request(&admin, "ml.train", r#"{"progres":true}"#).await;
    let body: Value = serde_json::from_slice(&refused.payload).unwrap();
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    let headers = refused.headers.expect("error headers");
    assert_eq!(
        headers.get("Nats-Service-Error-Code").unwrap().as_str(),
        "400"
    );

    // mlctl as a person runs it: progress lines on stderr, the reply on
    // stdout; with --quiet only the reply.
    let mlctl = |args: &[&str]| {
        let out = std::process::Command::new(services::binary("mlctl"))
            .args(args)
            .envs(shipped.env("admin"))
            .output()
            .expect("run mlctl");
        assert!(out.status.success(), "{out:?}");
        let stdout: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
        (stdout, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (reply, stderr) = mlctl(&["train"]);
    assert_eq!(reply["version"], 2, "{reply}");
    assert!(
        stderr.contains(&format!("pass 1 (statistics) done: {ROWS} rows")),
        "{stderr}"
    );
    assert!(stderr.contains("the registry is evaluating"), "{stderr}");
    let (reply, stderr) = mlctl(&["train", "--quiet"]);
    assert_eq!(reply["version"], 3, "{reply}");
    assert!(!stderr.contains("pass 1"), "{stderr}");
}

/// Sends `{"progress":true}` on `ml.train`; returns the progress reports
/// and the final reply (the first message that is not a report; every
/// later message would be a failure, checked by a short wait).
async fn train_with_progress(admin: &async_nats::Client) -> (Vec<Value>, Value) {
    use futures::StreamExt;
    let inbox = admin.new_inbox();
    let mut replies = admin.subscribe(inbox.clone()).await.unwrap();
    admin
        .publish_with_reply("ml.train", inbox, r#"{"progress":true}"#.into())
        .await
        .unwrap();
    let mut progress = Vec::new();
    loop {
        let m = tokio::time::timeout(LONG, replies.next())
            .await
            .expect("the trainer answers")
            .expect("subscribed");
        let v: Value = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
        if v["progress"].is_object() {
            progress.push(v["progress"].clone());
            continue;
        }
        let late = tokio::time::timeout(Duration::from_millis(300), replies.next()).await;
        assert!(late.is_err(), "a message after the reply: {late:?}");
        return (progress, v);
    }
}
