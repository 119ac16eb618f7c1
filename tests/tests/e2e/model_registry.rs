//! The registry as the system of record, with real processes and a real
//! `nats-server`: repeated `kill -9` while models stream in, concurrent
//! trainers, corrupt artifacts and torn logs, the promotion gate, promotion
//! and rollback under load, the history, the classifier workload of the
//! reference blog, and scheduled runs that skip unchanged data.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ml_shared::lifecycle::{AliasMove, HistoryReply};
use ml_shared::messages::{
    ApiReply, ExperimentRow, ModelsReply, RunsReply, Submission, SubmitReply,
};
use ml_tests::services::{binary, Process};
use ml_tests::{wait_for, NatsServer};
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(20);

fn submission(i: u64, rmse: f64) -> Submission {
    exact_submission(i, rmse)
}

/// Submits and returns the acknowledgement, or why there was none.
async fn submit(client: &async_nats::Client, s: &Submission) -> Result<SubmitReply, String> {
    let payload = ml_shared::codec::encode(s);
    let request = client.request("ml.registry.submit", payload.into());
    // Bounded, with room for a loaded machine: the registry evaluates the
    // model on its holdout and fsyncs before it answers.
    let message = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .map_err(|_| "no reply in time".to_owned())?
        .map_err(|e| e.to_string())?;
    match serde_json::from_slice::<ApiReply<SubmitReply>>(&message.payload) {
        Ok(ApiReply::Ok(ack)) => Ok(ack),
        Ok(ApiReply::Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Starts a registry process storing into `dir` and evaluating submissions
/// on the holdout rows of `holdout`.
fn start_registry(url: &str, dir: &Path, holdout: &Path, log: &Path) -> Process {
    Process::start(
        "registry",
        &[],
        &[
            ("NATS_URL", url),
            ("REGISTRY_DIR", dir.to_str().unwrap()),
            ("REGISTRY_HOLDOUT_PATH", holdout.to_str().unwrap()),
            ("PROMOTE_TOLERANCE", "0.05"),
        ],
        log,
    )
}

/// Writes exact data (see [`write_exact_data`]) next to `dir` and returns
/// its path: the holdout of a test that submits hand-made models.
fn exact_holdout(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("exact.csv");
    write_exact_data(&path, 200);
    path
}

/// The registry's model list, every page of it, once it answers.
async fn models(client: &async_nats::Client) -> ModelsReply {
    let page = |offset: usize| async move {
        let body = format!(r#"{{"limit":500,"offset":{offset}}}"#);
        let m = client
            .request("ml.registry.models", body.into())
            .await
            .ok()?;
        serde_json::from_slice::<ModelsReply>(&m.payload).ok()
    };
    let mut listed = wait_for("the registry lists its models", WAIT, || page(0)).await;
    while listed.models.len() < listed.total {
        let mut older = page(listed.models.len()).await.expect("an older page");
        assert!(!older.models.is_empty(), "a page in the middle is empty");
        older.models.append(&mut listed.models);
        listed.models = older.models;
    }
    listed
}

fn sigkill(p: &mut Process) {
    // Child::kill sends SIGKILL: no handler runs, as in a crash.
    p.child.kill().expect("SIGKILL the registry");
    p.child.wait().expect("reap the registry");
}

fn mlctl(url: &str, user: &str, args: &[&str]) -> Output {
    Command::new(binary("mlctl"))
        .args(args)
        .env("NATS_URL", url)
        .env("USER", user)
        .output()
        .expect("run mlctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every row of the experiments log, parsed strictly (a torn or interleaved
/// line fails: wrong field count or unparseable cells).
fn experiments(dir: &Path) -> Vec<ExperimentRow> {
    let path = dir.join("experiments.csv");
    let text = std::fs::read_to_string(&path).expect("experiments.csv");
    assert!(text.ends_with('\n'), "last line complete:\n{text}");
    csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(text.as_bytes())
        .deserialize::<ExperimentRow>()
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("experiments.csv does not parse: {e}\n{text}"))
}

/// Every alias move in `history.jsonl`, checking the sequence has no gap.
fn history(dir: &Path) -> Vec<AliasMove> {
    let text = std::fs::read_to_string(dir.join("history.jsonl")).expect("history.jsonl");
    assert!(text.ends_with('\n'), "last line complete");
    let moves: Vec<AliasMove> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    for (i, m) in moves.iter().enumerate() {
        assert_eq!(m.seq, i as u64 + 1, "history sequence");
    }
    moves
}

/// A log file without the terminal colour codes of the services' logs.
fn read_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-letter
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

fn model_path(dir: &Path, version: u64) -> PathBuf {
    dir.join(format!("models/model-{version:08}.bin"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_registry_loses_no_acknowledged_version() {
    ml_tests::init_logging();
    // Eleven registry process starts, each awaited within WAIT: not alongside
    // the load-generating tests, which can starve them on a 2-core machine.
    let _heavy = HEAVY.lock().await;
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = ml_tests::temp_dir();
    let registry_dir = dir.path().join("registry");
    let holdout = exact_holdout(dir.path());
    let client = client(&url).await;

    // A client streams submissions and remembers what was acknowledged.
    let acked: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let streamer = {
        let (client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                // Some better, some worse: the gate both promotes and holds.
                let s = submission(i, 0.1 + 0.01 * (i % 4) as f64);
                match submit(&client, &s).await {
                    Ok(ack) => acked.lock().unwrap().push((ack.version, s.run.run_id)),
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        })
    };

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    const CYCLES: usize = 10;
    for cycle in 0..CYCLES {
        let log = dir.path().join(format!("registry-{cycle}.log"));
        let mut registry = start_registry(&url, &registry_dir, &holdout, &log);
        models(&client).await;
        // Let some submissions through, then kill at a random moment.
        let before = acked.lock().unwrap().len();
        wait_for("a submission acknowledged", WAIT, || {
            let n = acked.lock().unwrap().len();
            async move { (n > before).then_some(()) }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..250))).await;
        sigkill(&mut registry);
    }
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(WAIT, streamer)
        .await
        .expect("the streamer stops")
        .unwrap();

    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= CYCLES, "{} acknowledged", acked.len());
    let versions: BTreeSet<u64> = acked.iter().map(|a| a.0).collect();
    assert_eq!(
        versions.len(),
        acked.len(),
        "a version number was given twice"
    );

    let _registry = start_registry(
        &url,
        &registry_dir,
        &holdout,
        &dir.path().join("registry-final.log"),
    );
    let listed = models(&client).await;
    let stored: BTreeMap<u64, String> = listed
        .models
        .iter()
        .map(|m| (m.version, m.run_id.clone()))
        .collect();
    assert!(listed.corrupt.is_empty(), "{:?}", listed.corrupt);
    for (version, run_id) in &acked {
        assert_eq!(stored.get(version), Some(run_id), "acknowledged v{version}");
        let on_disk = registry::store::read_model(&model_path(&registry_dir, *version))
            .unwrap_or_else(|e| panic!("v{version} does not load: {e}"));
        assert_eq!(&on_disk.run.run_id, run_id);
    }
    assert!(listed.production.is_some());

    // One row per stored version, none torn, none twice.
    let rows = experiments(&registry_dir);
    let mut logged: Vec<u64> = rows.iter().filter_map(|r| r.version).collect();
    let n = logged.len();
    logged.sort();
    logged.dedup();
    assert_eq!(logged.len(), n, "a version logged twice");
    assert_eq!(logged, stored.keys().copied().collect::<Vec<_>>());
    let moves = history(&registry_dir);
    assert!(moves.iter().all(|m| stored.contains_key(&m.to)));
    eprintln!(
        "kill -9 × {CYCLES}: {} acknowledged, {} stored, {} alias moves",
        acked.len(),
        stored.len(),
        moves.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trainer_processes_submitting_at_once_get_distinct_versions() {
    ml_tests::init_logging();
    let Bed {
        nats: _nats,
        url,
        dir,
        data,
    } = Bed::new(400, 3);
    let registry_dir = dir.path().join("registry");
    let _registry = start_registry(&url, &registry_dir, &data, &dir.path().join("registry.log"));
    let client = client(&url).await;
    models(&client).await;

    // Each trainer trains at start (two submissions at once), then on
    // requests sent concurrently.
    let log = |i: usize| dir.path().join(format!("trainer-{i}.log"));
    // Both train at start even when the other's run is already recorded
    // (a trainer otherwise skips data the registry's newest run trained on).
    let env = [
        ("NATS_URL", url.as_str()),
        ("DATA_PATH", data.to_str().unwrap()),
        ("TRAIN_INTERVAL", "1h"),
        ("TRAIN_SKIP_UNCHANGED", "false"),
    ];
    let _trainers: Vec<Process> = (0..2)
        .map(|i| Process::start("trainer", &[], &env, &log(i)))
        .collect();
    let replies = futures::future::join_all((0..6).map(|_| {
        let client = client.clone();
        async move {
            wait_for("a trainer answers", WAIT, || async {
                let m = client.request("ml.train", "".into()).await.ok()?;
                serde_json::from_slice::<Value>(&m.payload).ok()
            })
            .await
        }
    }))
    .await;
    let mut versions: Vec<u64> = replies
        .iter()
        .map(|r| r["version"].as_u64().unwrap_or_else(|| panic!("{r}")))
        .collect();
    // The two start-up runs.
    let registered = |i: usize| {
        let text = read_log(&log(i));
        text.lines()
            .filter(|l| l.contains("model registered"))
            .filter_map(|l| {
                l.split("version=")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .collect::<Vec<_>>()
    };
    wait_for("both trainers registered at start", WAIT, || {
        let (a, b) = (registered(0), registered(1));
        async move { (!a.is_empty() && !b.is_empty()).then_some(()) }
    })
    .await;
    let all: Vec<u64> = registered(0).into_iter().chain(registered(1)).collect();
    versions.extend(all.iter().copied());
    versions.sort();
    versions.dedup();
    assert_eq!(
        versions,
        (1..=8).collect::<Vec<_>>(),
        "from the logs: {all:?}"
    );
    let listed = models(&client).await;
    assert_eq!(listed.models.len(), 8);
    assert_eq!(experiments(&registry_dir).len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_artifact_is_reported_and_never_served_and_torn_lines_are_cut() {
    ml_tests::init_logging();
    let Bed {
        nats: _nats,
        url,
        dir,
        data,
    } = Bed::new(100, 1);
    let registry_dir = dir.path().join("registry");
    let holdout = exact_holdout(dir.path());
    let client = client(&url).await;
    let mut registry = start_registry(
        &url,
        &registry_dir,
        &holdout,
        &dir.path().join("registry-1.log"),
    );
    models(&client).await;
    assert!(
        submit(&client, &submission(1, 0.10))
            .await
            .unwrap()
            .production
    );
    assert!(
        submit(&client, &submission(2, 0.09))
            .await
            .unwrap()
            .production
    );
    let _predictor = Process::start(
        "predictor",
        &[],
        &[
            ("NATS_URL", url.as_str()),
            ("DATA_PATH", data.to_str().unwrap()),
            ("MODEL_RECONCILE", "1s"),
        ],
        &dir.path().join("predictor.log"),
    );
    let body = r#"{"features":{"feature_1":1.0,"feature_2":2.0}}"#;
    let served = |want: u64| {
        let client = client.clone();
        async move {
            wait_for(&format!("v{want} served"), WAIT, || async {
                let m = client.request("ml.predict", body.into()).await.ok()?;
                let v: Value = serde_json::from_slice(&m.payload).ok()?;
                (v["model_version"].as_u64() == Some(want)).then_some(v)
            })
            .await
        }
    };
    served(2).await;

    // A crash, then damage: v2's artifact flipped, half lines at both logs' ends.
    sigkill(&mut registry);
    let path = model_path(&registry_dir, 2);
    let mut bytes = std::fs::read(&path).unwrap();
    let i = bytes.len() - 5;
    bytes[i] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
    let append = |name: &str, text: &str| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(registry_dir.join(name))
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    };
    append(
        "experiments.csv",
        "2026-01-01T00:00:00.000Z,3,run-torn,candid",
    );
    append("history.jsonl", r#"{"seq":9,"timestamp":"2026-01-01T"#);

    let log2 = dir.path().join("registry-2.log");
    let mut registry = start_registry(&url, &registry_dir, &holdout, &log2);
    let listed = models(&client).await;
    let versions: Vec<u64> = listed.models.iter().map(|m| m.version).collect();
    assert_eq!(versions, [1], "{listed:?}");
    assert_eq!(listed.corrupt.len(), 1);
    assert_eq!(listed.corrupt[0].version, 2);
    assert!(listed.corrupt[0].reason.contains("checksum"), "{listed:?}");
    assert_eq!(listed.production, Some(1));
    let text = std::fs::read_to_string(&log2).unwrap();
    assert_eq!(text.matches("torn line").count(), 2, "{text}");
    assert!(text.contains("corrupt artifact, not served"), "{text}");
    assert_eq!(experiments(&registry_dir).len(), 2);
    let moves = history(&registry_dir);
    assert_eq!(moves.last().unwrap().action.as_str(), "recovery");
    // The predictor leaves the corrupt model for the good one.
    served(1).await;

    // Nobody can promote it.
    let out = mlctl(&url, "alice", &["promote", "2", "--reason", "try it"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("corrupt"),
        "{out:?}"
    );

    // An artifact damaged while the registry runs is caught before serving.
    let ack = submit(&client, &submission(3, 0.5)).await.unwrap();
    assert_eq!(
        (ack.version, ack.production),
        (3, false),
        "2 is not reused; the gate holds 3"
    );
    let out = mlctl(&url, "alice", &["promote", "3", "--reason", "try it"]);
    assert!(out.status.success(), "{out:?}");
    served(3).await;
    std::fs::write(model_path(&registry_dir, 1), b"garbage").unwrap();
    let out = mlctl(&url, "alice", &["rollback"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("corrupt"),
        "{out:?}"
    );
    assert_eq!(models(&client).await.production, Some(3));
    sigkill(&mut registry);
}

/// One reply of the load: when, and the version or the error.
type Observation = (Instant, Result<u64, String>);

/// A load of prediction requests; every reply is recorded.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Observation>>>,
}

impl Load {
    fn start(client: &async_nats::Client, concurrency: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..concurrency)
            .map(|_| {
                let (client, stop) = (client.clone(), stop.clone());
                tokio::spawn(async move {
                    let body = r#"{"features":{"feature_1":0.5,"feature_2":3.0}}"#;
                    let mut seen = Vec::new();
                    // Bounded by the stop flag and by a count.
                    for _ in 0..200_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let outcome = match tokio::time::timeout(
                            Duration::from_secs(5),
                            client.request("ml.predict", body.into()),
                        )
                        .await
                        {
                            Err(_) => Err("timeout".to_owned()),
                            Ok(Err(e)) => Err(e.to_string()),
                            Ok(Ok(m)) => {
                                let v: Value =
                                    serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                                v["model_version"].as_u64().ok_or_else(|| v.to_string())
                            }
                        };
                        seen.push((Instant::now(), outcome));
                    }
                    seen
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Each task's replies, in the order it received them.
    async fn stop(self) -> Vec<Vec<Observation>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.push(
                tokio::time::timeout(WAIT, t)
                    .await
                    .expect("load stops")
                    .unwrap(),
            );
        }
        all
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_holds_a_worse_model_and_promotion_and_rollback_switch_predictors_under_load() {
    ml_tests::init_logging();
    let Bed {
        nats: _nats,
        url,
        dir,
        data,
    } = Bed::new(100, 1);
    let registry_dir = dir.path().join("registry");
    let holdout = exact_holdout(dir.path());
    let client = client(&url).await;
    let _registry = start_registry(
        &url,
        &registry_dir,
        &holdout,
        &dir.path().join("registry.log"),
    );
    models(&client).await;

    let first = submit(&client, &submission(1, 0.10)).await.unwrap();
    assert!(first.production);
    let worse = submit(&client, &submission(2, 0.20)).await.unwrap();
    assert!(!worse.production);
    let gate = worse.gate.expect("the gate reports");
    // The registry's own figures on the exact holdout: the offsets, to the
    // last bits of floating-point rounding.
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert_eq!((gate.metric.as_str(), gate.tolerance), ("rmse", 0.05));
    assert!(
        close(gate.candidate, 0.20) && gate.production.is_some_and(|p| close(p, 0.10)),
        "{gate:?}"
    );
    assert!(
        gate.reason.contains("beyond the 5.00% tolerance"),
        "{}",
        gate.reason
    );
    let runs = experiments(&registry_dir);
    assert_eq!(runs[1].status, "candidate");
    assert_eq!(runs[1].reason, gate.reason);

    let _predictor = Process::start(
        "predictor",
        &[],
        &[
            ("NATS_URL", url.as_str()),
            ("DATA_PATH", data.to_str().unwrap()),
        ],
        &dir.path().join("predictor.log"),
    );
    wait_for("v1 served", WAIT, || async {
        let m = client
            .request(
                "ml.predict",
                r#"{"features":{"feature_1":0,"feature_2":0}}"#.into(),
            )
            .await
            .ok()?;
        let v: Value = serde_json::from_slice(&m.payload).ok()?;
        (v["model_version"] == 1).then_some(())
    })
    .await;

    let load = Load::start(&client, 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Promotion through the subject, so that the acknowledgement is timed.
    let sent = Instant::now();
    let reply = request_json(
        &client,
        "ml.registry.promote",
        r#"{"version":2,"reason":"manual override","actor":"alice"}"#,
    )
    .await;
    let promoted_at = Instant::now();
    assert_eq!(reply["to"], 2, "{reply}");
    assert_eq!(reply["epoch"], 2, "{reply}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mlctl_started = Instant::now();
    let out = mlctl(&url, "bob", &["rollback", "--reason", "v2 regressed"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).trim(), "production: v2 -> v1 (epoch 3)");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let per_task = load.stop().await;

    let seen: Vec<&Observation> = per_task.iter().flatten().collect();
    let failures: Vec<&String> = seen.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Each client saw v1, then v2, then v1 again, never going back in between.
    // (A client stalled by a loaded machine may miss a phase, never reorder.)
    let mut complete = 0;
    for replies in &per_task {
        let mut phases: Vec<u64> = replies.iter().map(|(_, r)| *r.as_ref().unwrap()).collect();
        phases.dedup();
        assert!(
            [1, 2, 1]
                .windows(phases.len())
                .any(|w| w == phases.as_slice()),
            "versions seen by one client, in order: {phases:?}"
        );
        complete += usize::from(phases == [1, 2, 1]);
    }
    assert!(complete > 0, "no client saw the promotion and the rollback");
    // Measured, not asserted: when the last reply from the old version came,
    // after the promotion's acknowledgement and after `mlctl rollback` started.
    let last = |version: u64, from: Instant, until: Instant| {
        seen.iter()
            .filter(|(t, r)| *t >= from && *t < until && r.as_ref().ok() == Some(&version))
            .map(|(t, _)| *t)
            .max()
    };
    let v1_after_ack = last(1, sent, mlctl_started)
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(promoted_at));
    let v2_after_mlctl = last(2, mlctl_started, Instant::now()).map_or(Duration::ZERO, |t| {
        t.saturating_duration_since(mlctl_started)
    });
    eprintln!(
        "{} requests from 8 clients, 0 failed; last v1 reply {v1_after_ack:?} after the promotion was acknowledged; \
         last v2 reply {v2_after_mlctl:?} after `mlctl rollback` was started",
        seen.len()
    );

    // The history says who moved what, when and why.
    let out = mlctl(&url, "alice", &["history", "--json"]);
    let history: HistoryReply = serde_json::from_slice(&out.stdout).expect("history JSON");
    type Move = (
        String,
        Option<u64>,
        u64,
        Option<u64>,
        String,
        String,
        String,
    );
    let moves: Vec<Move> = history
        .moves
        .iter()
        .map(|m| {
            (
                m.alias.as_str().to_owned(),
                m.from,
                m.to,
                m.epoch,
                m.action.as_str().to_owned(),
                m.actor.clone(),
                m.reason.clone(),
            )
        })
        .collect();
    let s = |x: &str| x.to_owned();
    assert_eq!(
        moves[3],
        (
            s("production"),
            Some(1),
            2,
            Some(2),
            s("promote"),
            s("alice"),
            s("manual override")
        )
    );
    assert_eq!(
        moves[4],
        (
            s("production"),
            Some(2),
            1,
            Some(3),
            s("rollback"),
            s("bob"),
            s("v2 regressed")
        )
    );
    assert_eq!(moves.len(), 5, "{moves:?}");
    assert_eq!(
        (moves[1].4.as_str(), moves[2].4.as_str()),
        ("gate", "register")
    );
    let table = stdout(&mlctl(&url, "alice", &["history"]));
    assert!(
        table.contains("manual override") && table.contains("bob"),
        "{table}"
    );

    let out = mlctl(&url, "alice", &["models"]);
    let table = stdout(&out);
    let line = |v: &str| {
        table
            .lines()
            .find(|l| l.trim_start().starts_with(v))
            .unwrap_or_else(|| panic!("no v{v} in\n{table}"))
            .to_owned()
    };
    assert!(line("1 ").contains("production"), "{table}");
    assert!(
        line("2 ").contains("candidate") && line("2 ").contains("rmse=0.20000"),
        "{table}"
    );

    // Nothing left to roll back to.
    let out = mlctl(&url, "alice", &["rollback"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no previous production"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_classifier_workload_trains_serves_and_reports_accuracy() {
    ml_tests::init_logging();
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = ml_tests::temp_dir();
    let data = dir.path().join("users.csv");
    let out = mlctl(
        &url,
        "alice",
        &[
            "gen-data",
            "--rows",
            "3000",
            "--seed",
            "11",
            "--target",
            "binary",
            "--out",
            data.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&data).unwrap();
    assert!(
        text.starts_with(",user_id,feature_1,feature_2,target\n0,"),
        "pandas shape"
    );

    let registry_dir = dir.path().join("registry");
    let env = [
        ("NATS_URL", url.as_str()),
        ("DATA_PATH", data.to_str().unwrap()),
        ("REGISTRY_DIR", registry_dir.to_str().unwrap()),
        ("TRAIN_INTERVAL", "1h"),
    ];
    let _procs: Vec<Process> = ["registry", "predictor", "trainer"]
        .into_iter()
        .map(|name| Process::start(name, &[], &env, &dir.path().join(format!("{name}.log"))))
        .collect();
    let client = client(&url).await;
    let rows: Vec<(String, f64)> = read_rows(&data).into_iter().map(|r| (r.0, r.3)).collect();
    let ask = |user: String| {
        let client = client.clone();
        async move {
            let m = client
                .request("ml.predict", format!(r#"{{"user_id":"{user}"}}"#).into())
                .await
                .ok()?;
            let v: Value = serde_json::from_slice(&m.payload).ok()?;
            v["model_version"].as_u64().map(|_| v)
        }
    };
    let first = wait_for("the classifier is served", WAIT, || ask(rows[0].0.clone())).await;
    let p = first["prediction"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p), "{first}");
    assert_eq!(
        first["label"].as_u64(),
        Some(u64::from(p >= 0.5)),
        "{first}"
    );

    let listed = models(&client).await;
    assert_eq!(listed.models[0].kind, "logistic");
    let runs: RunsReply =
        serde_json::from_slice(&mlctl(&url, "alice", &["runs", "--json"]).stdout).unwrap();
    let run = &runs.runs[0];
    assert_eq!(
        (run.model.as_str(), run.status.as_str()),
        ("logistic", "production")
    );
    let reported = run.accuracy.expect("accuracy reported");
    assert!(
        run.log_loss.is_some() && run.roc_auc.is_some() && run.rmse.is_none(),
        "{run:?}"
    );

    // Ask the predictor about every validation user: its labels give the
    // accuracy the trainer reported, and its probabilities the log-loss.
    let (_, validation) = trainer::pipeline::split(rows.iter().map(|r| r.0.as_str()), 0.2, 42);
    let (mut correct, mut loss) = (0usize, 0.0);
    for &i in &validation {
        let (user, target) = rows[i].clone();
        let reply = ask(user).await.expect("a prediction");
        let p = reply["prediction"].as_f64().unwrap();
        if reply["label"].as_u64() == Some(target as u64) {
            correct += 1;
        }
        let p = p.clamp(1e-15, 1.0 - 1e-15);
        loss -= if target == 1.0 {
            p.ln()
        } else {
            (1.0 - p).ln()
        };
    }
    let served_accuracy = correct as f64 / validation.len() as f64;
    assert_eq!(
        served_accuracy, reported,
        "the served model is the one scored"
    );
    assert_close(loss / validation.len() as f64, run.log_loss.unwrap(), 1e-9);
    eprintln!(
        "blog-shaped data (3000 rows, index column, UUID ids, 0/1 target): accuracy {reported:.4}, log-loss {:.4}, ROC AUC {:.4}",
        run.log_loss.unwrap(),
        run.roc_auc.unwrap()
    );

    // The log filters and sorts.
    let out = mlctl(
        &url,
        "alice",
        &[
            "runs",
            "--where",
            "accuracy > 0.5",
            "--sort",
            "accuracy",
            "--desc",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("accuracy="), "{out:?}");
    let out = mlctl(&url, "alice", &["runs", "--json", "--where", "r2 > 0.9"]);
    let none: RunsReply = serde_json::from_slice(&out.stdout).unwrap();
    assert!(none.runs.is_empty(), "a classifier has no r2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_runs_skip_unchanged_data_and_failed_runs_are_logged_once() {
    ml_tests::init_logging();
    let Bed {
        nats: _nats,
        url,
        dir,
        data,
    } = Bed::new(300, 1);
    let registry_dir = dir.path().join("registry");
    let client = client(&url).await;
    let _registry = start_registry(&url, &registry_dir, &data, &dir.path().join("registry.log"));
    models(&client).await;
    let trainer_log = dir.path().join("trainer.log");
    let _trainer = Process::start(
        "trainer",
        &[],
        &[
            ("NATS_URL", url.as_str()),
            ("DATA_PATH", data.to_str().unwrap()),
            ("TRAIN_INTERVAL", "200ms"),
            ("TRAIN_RETRY", "200ms"),
        ],
        &trainer_log,
    );
    let skips = || {
        std::fs::read_to_string(&trainer_log)
            .unwrap_or_default()
            .matches("unchanged since the last run; skipping")
            .count()
    };
    wait_for("three skipped runs", WAIT, || {
        let n = skips();
        async move { (n >= 3).then_some(()) }
    })
    .await;
    assert_eq!(
        models(&client).await.models.len(),
        1,
        "one run for unchanged data"
    );

    // New data: trained again. Files are replaced by a rename, so that the
    // trainer never reads one half written.
    let replace = |write: &dyn Fn(&Path)| {
        let tmp = data.with_extension("tmp");
        write(&tmp);
        std::fs::rename(&tmp, &data).unwrap();
    };
    replace(&|p| write_data(p, 300, 2));
    wait_for("v2 from the new data", WAIT, || async {
        experiments(&registry_dir)
            .iter()
            .any(|r| r.version == Some(2))
            .then_some(())
    })
    .await;

    // Bad data: one failed run, logged with its reason, nothing registered;
    // the unchanged bad file is not retried.
    replace(&|p| {
        std::fs::write(
            p,
            "user_id,feature_1,feature_2,target\na,1,2,3\nb,1,2,4\nc,2,oops,5\nd,3,1,2\ne,1,1,1\n",
        )
        .unwrap()
    });
    let failed = wait_for("the failed run logged", WAIT, || async {
        experiments(&registry_dir)
            .into_iter()
            .find(|r| r.status == "failed")
    })
    .await;
    assert_eq!(failed.version, None);
    assert!(
        failed.reason.contains("users.csv:4") && failed.reason.contains("feature_2"),
        "{failed:?}"
    );
    let skipped_before = skips();
    wait_for("the bad file skipped twice", WAIT, || {
        let n = skips();
        async move { (n >= skipped_before + 2).then_some(()) }
    })
    .await;
    let rows = experiments(&registry_dir);
    assert_eq!(
        rows.iter().filter(|r| r.status == "failed").count(),
        1,
        "{rows:?}"
    );
    assert_eq!(models(&client).await.models.len(), 2);
    let out = mlctl(&url, "alice", &["runs", "--where", "status == failed"]);
    assert!(stdout(&out).contains("oops"), "{out:?}");
}
