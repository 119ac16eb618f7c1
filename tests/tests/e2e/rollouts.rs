//! Rollouts, phase 1: the routing table against a real `nats-server`, a
//! registry process and two predictors. A weighted split and a sticky one
//! over 20,000 requests each, the table changed under load, bad tables
//! refused with the problem named, and the table surviving a `kill -9` of
//! the registry and reaching a predictor started afterwards.
//!
//! Every version is the exact model with its own intercept offset
//! (see [`write_exact_data`]), so a reply's prediction says which version
//! computed it, independently of its `model_version`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ml_shared::messages::{ApiReply, SubmitReply};
use ml_shared::routing::sticky_bucket;
use ml_tests::services::{self, Process, Service};
use ml_tests::{wait_for, NatsServer};
use serde_json::{json, Value};

use crate::common::*;

pub(crate) const WAIT: Duration = Duration::from_secs(20);
/// Users in the data (the registry's holdout is a fifth of them).
const ROWS: usize = 5000;
/// The intercept offset (and so the RMSE) of v1, v2, …: v1 is production,
/// the gate holds the others as candidates.
pub(crate) const OFFSETS: [f64; 5] = [0.1, 1.0, 2.0, 3.0, 4.0];

/// A registry process, predictors, and the users with their exact targets.
pub(crate) struct Rollout {
    pub(crate) nats: NatsServer,
    dir: tempfile::TempDir,
    pub(crate) data: PathBuf,
    registry: Process,
    predictors: Vec<Service>,
    pub(crate) client: async_nats::Client,
    /// (user_id, exact target) per row.
    pub(crate) users: Arc<Vec<(String, f64)>>,
}

fn start_registry(url: &str, dir: &Path, data: &Path, log: &Path) -> Process {
    Process::start(
        "registry",
        &[],
        &[
            ("NATS_URL", url),
            ("REGISTRY_DIR", dir.to_str().unwrap()),
            ("REGISTRY_HOLDOUT_PATH", data.to_str().unwrap()),
        ],
        log,
    )
}

impl Rollout {
    /// Registers v1 (production) to v5 (candidates) and starts `predictors`.
    pub(crate) async fn start(predictors: usize) -> Self {
        let nats = NatsServer::start();
        let url = nats.url();
        let dir = ml_tests::temp_dir();
        let data = dir.path().join("exact.csv");
        write_exact_data(&data, ROWS);
        let registry = start_registry(
            &url,
            &dir.path().join("registry"),
            &data,
            &dir.path().join("registry.log"),
        );
        let client = client(&url).await;
        for (i, offset) in OFFSETS.iter().enumerate() {
            let payload = ml_shared::codec::encode(&exact_submission(i as u64, *offset));
            let ack = wait_for("the registry registers", WAIT, || async {
                let m = client
                    .request("ml.registry.submit", payload.clone().into())
                    .await
                    .ok()?;
                match serde_json::from_slice::<ApiReply<SubmitReply>>(&m.payload).ok()? {
                    ApiReply::Ok(ack) => Some(ack),
                    ApiReply::Err(e) => panic!("submission refused: {e}"),
                }
            })
            .await;
            assert_eq!((ack.version, ack.production), (i as u64 + 1, i == 0));
        }
        let users: Vec<(String, f64)> = read_rows(&data)
            .into_iter()
            .map(|(id, _, _, target)| (id, target))
            .collect();
        let mut rollout = Self {
            nats,
            dir,
            data,
            registry,
            predictors: Vec::new(),
            client,
            users: Arc::new(users),
        };
        for _ in 0..predictors {
            rollout.add_predictor().await;
        }
        rollout
    }

    /// Starts one more predictor and waits until every one answers.
    async fn add_predictor(&mut self) {
        let url = self.nats.url();
        self.predictors.push(services::predictor(&url, &self.data));
        let n = self.predictors.len();
        wait_for("every predictor serves", WAIT, || async {
            let serving = predictor_request_counts(&self.client).await.len();
            let m = self
                .client
                .request("ml.predict", user_request(&self.users[0].0).into())
                .await
                .ok()?;
            let v: Value = serde_json::from_slice(&m.payload).ok()?;
            (serving == n && v["model_version"].is_u64()).then_some(())
        })
        .await;
    }

    /// Waits until 40 requests in a row are answered with a `variant`:
    /// every predictor serves the table.
    async fn wait_routed(&self) {
        wait_for("every predictor serves the table", WAIT, || async {
            for row in 0..40 {
                let body = user_request(&self.users[row].0);
                let m = self.client.request("ml.predict", body.into()).await.ok()?;
                let v: Value = serde_json::from_slice(&m.payload).ok()?;
                v["variant"].as_str()?;
            }
            Some(())
        })
        .await;
    }

    pub(crate) async fn route(&self, body: Value) -> Value {
        request_json(&self.client, "ml.registry.route", &body.to_string()).await
    }

    pub(crate) async fn stop(self) {
        for p in self.predictors {
            p.stop().await;
        }
        drop(self.registry);
    }
}

pub(crate) fn user_request(user: &str) -> String {
    json!({ "user_id": user }).to_string()
}

/// One answered request.
#[derive(Debug, Clone)]
pub(crate) struct Answered {
    sent: Instant,
    received: Instant,
    /// The row of the user it was for.
    pub(crate) row: usize,
    pub(crate) version: u64,
    pub(crate) variant: Option<String>,
    pub(crate) request_id: String,
    /// The prediction.
    pub(crate) prediction: f64,
}

/// The version whose offset a prediction for `target` shows.
fn version_by_prediction(prediction: f64, target: f64) -> Option<u64> {
    OFFSETS
        .iter()
        .position(|o| (prediction - target - o).abs() < 1e-6)
        .map(|i| i as u64 + 1)
}

/// Reads a reply: the version that answered, checked against the version
/// its prediction shows, or why it is not a good reply.
pub(crate) fn read_reply(payload: &[u8], row: usize, target: f64) -> Result<Answered, String> {
    let v: Value = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let version = v["model_version"]
        .as_u64()
        .ok_or_else(|| format!("no model_version: {v}"))?;
    let prediction = v["prediction"]
        .as_f64()
        .or_else(|| v["predictions"][0].as_f64())
        .ok_or_else(|| format!("no prediction: {v}"))?;
    if version_by_prediction(prediction, target) != Some(version) {
        return Err(format!("the prediction is not v{version}'s: {v}"));
    }
    let request_id = v["request_id"]
        .as_str()
        .ok_or_else(|| format!("no request_id: {v}"))?
        .to_owned();
    let now = Instant::now();
    Ok(Answered {
        sent: now,
        received: now,
        row,
        version,
        variant: v["variant"].as_str().map(str::to_owned),
        request_id,
        prediction,
    })
}

/// What a lane sends for its `k`-th request: the user's row and the body.
pub(crate) type Body = dyn Fn(usize) -> (usize, String) + Send + Sync;

/// Sends requests in `lanes` concurrent lanes (each waits for its reply
/// before the next) until `per_lane` each are answered or `stop` is set.
pub(crate) async fn load(
    client: &async_nats::Client,
    users: &Arc<Vec<(String, f64)>>,
    lanes: usize,
    per_lane: usize,
    stop: Arc<AtomicBool>,
    body: Arc<Body>,
) -> Vec<Result<Answered, String>> {
    let tasks: Vec<_> = (0..lanes)
        .map(|lane| {
            let (client, users, stop, body) =
                (client.clone(), users.clone(), stop.clone(), body.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                for k in 0..per_lane {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (row, text) = body(lane * per_lane + k);
                    let sent = Instant::now();
                    let reply = client.request("ml.predict", text.into()).await;
                    out.push(
                        reply
                            .map_err(|e| e.to_string())
                            .and_then(|m| read_reply(&m.payload, row, users[row].1))
                            .map(|a| Answered { sent, ..a }),
                    );
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        let lane = tokio::time::timeout(Duration::from_secs(300), task)
            .await
            .expect("a lane ends")
            .expect("a lane does not panic");
        all.extend(lane);
    }
    all
}

/// The answers, or a failure naming the first failed request.
pub(crate) fn all_answered(results: Vec<Result<Answered, String>>) -> Vec<Answered> {
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failed.len(),
        results.len(),
        failed.first()
    );
    results.into_iter().map(Result::unwrap).collect()
}

/// Every request id is unique.
pub(crate) fn assert_unique_ids(answers: &[Answered]) {
    let ids: HashSet<&str> = answers.iter().map(|a| a.request_id.as_str()).collect();
    assert_eq!(ids.len(), answers.len(), "request ids repeat");
}

/// The canary's share of `answers` (answered by `canary`), with every
/// reply's variant agreeing with the table (production v1, candidate
/// `canary`) and both predictors having answered.
async fn canary_share(r: &Rollout, answers: &[Answered], canary: u64) -> f64 {
    for a in answers {
        let expected = match a.version {
            1 => "production",
            v if v == canary => "candidate",
            v => panic!("v{v} is not in the table"),
        };
        assert_eq!(a.variant.as_deref(), Some(expected), "{a:?}");
    }
    assert_unique_ids(answers);
    let counts = predictor_request_counts(&r.client).await;
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(
        counts.values().all(|&n| n > 1000),
        "both predictors answer: {counts:?}"
    );
    let canary_n = answers.iter().filter(|a| a.version == canary).count();
    canary_n as f64 / answers.len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_table_sends_ten_percent_to_the_canary_across_two_predictors() {
    ml_tests::init_logging();
    let _heavy = HEAVY.lock().await;
    let r = Rollout::start(2).await;
    let set = r
        .route(json!({"candidates":[{"version":2,"percent":10}],"reason":"canary","actor":"alice"}))
        .await;
    assert_eq!(set["changed"], true, "{set}");
    assert_eq!(set["table"]["candidates"][0]["percent"], 10, "{set}");
    r.wait_routed().await;

    let answers = all_answered(
        load(
            &r.client,
            &r.users,
            16,
            1250,
            Arc::new(AtomicBool::new(false)),
            spread_users(r.users.len()),
        )
        .await,
    );
    assert_eq!(answers.len(), 20_000);
    let share = canary_share(&r, &answers, 2).await;
    println!(
        "weighted 90/10: canary share {:.2}% of {} requests",
        share * 100.0,
        answers.len()
    );
    assert!((share - 0.10).abs() <= 0.015, "canary share {share}");
    r.stop().await;
}

/// Requests spread over every user, one user id each.
fn spread_users(users: usize) -> Arc<Body> {
    Arc::new(move |k: usize| {
        let row = k.wrapping_mul(7919) % users;
        (row, format!(r#"{{"user_id":"exact-{row:06}"}}"#))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_table_keeps_every_user_on_one_version() {
    ml_tests::init_logging();
    let _heavy = HEAVY.lock().await;
    let r = Rollout::start(2).await;
    let set = r
        .route(json!({"candidates":[{"version":3,"percent":10}],"sticky":true,"actor":"alice"}))
        .await;
    assert_eq!(set["table"]["sticky"], true, "{set}");
    // The sticky rule, computed here independently: a user's version.
    let expected = |row: usize| {
        let id = format!("exact-{row:06}");
        if sticky_bucket(id.as_bytes()) < 10 {
            3
        } else {
            1
        }
    };
    r.wait_routed().await;

    // 2,000 users, 10 requests each; one in ten a batch led by the user, one
    // in ten raw features carrying the user as routing_key.
    const USERS: usize = 2000;
    let users = r.users.clone();
    let body: Arc<Body> = Arc::new(move |k: usize| {
        let row = (k * 7919) % USERS;
        let id = &users[row].0;
        let text = match k % 10 {
            0 => json!({"user_ids": [id, "exact-004999"]}).to_string(),
            1 => {
                let (f1, f2) = exact_features(row);
                json!({"features": {"feature_1": f1, "feature_2": f2}, "routing_key": id})
                    .to_string()
            }
            _ => json!({"user_id": id}).to_string(),
        };
        (row, text)
    });
    let answers = all_answered(
        load(
            &r.client,
            &r.users,
            16,
            1250,
            Arc::new(AtomicBool::new(false)),
            body,
        )
        .await,
    );
    assert_eq!(answers.len(), 20_000);
    let mut seen: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
    for a in &answers {
        seen.entry(a.row).or_default().insert(a.version);
    }
    assert_eq!(seen.len(), USERS);
    let moved: Vec<_> = seen.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(moved.is_empty(), "users seeing two versions: {moved:?}");
    for (row, versions) in &seen {
        assert_eq!(versions.first(), Some(&expected(*row)), "user {row}");
    }
    let share = canary_share(&r, &answers, 3).await;
    let users_share = seen.values().filter(|v| v.contains(&3)).count() as f64 / USERS as f64;
    println!(
        "sticky 90/10: canary share {:.2}% of {} requests, {:.2}% of {USERS} users",
        share * 100.0,
        answers.len(),
        users_share * 100.0
    );
    assert!((share - 0.10).abs() <= 0.015, "canary share {share}");
    r.stop().await;
}

/// The raw features of row `row` of [`write_exact_data`].
fn exact_features(row: usize) -> (f64, f64) {
    let f1 = ((row * 37) % 101) as f64 / 10.0 - 5.0;
    let f2 = ((row * 53) % 97) as f64 / 7.0 - 6.0;
    (f1, f2)
}

/// The versions a table (or none) may answer with, and which side each is.
#[derive(Debug, Clone)]
struct Served {
    production: u64,
    candidates: BTreeSet<u64>,
    routed: bool,
}

impl Served {
    fn from_reply(reply: &Value) -> Self {
        let candidates = reply["table"]["candidates"]
            .as_array()
            .map(|c| c.iter().filter_map(|w| w["version"].as_u64()).collect())
            .unwrap_or_default();
        Self {
            production: reply["production"].as_u64().expect("production"),
            candidates,
            routed: reply["table"].is_object(),
        }
    }

    /// Whether this table can have given `a`.
    fn allows(&self, a: &Answered) -> bool {
        match (a.variant.as_deref(), self.routed) {
            (None, false) => a.version == self.production,
            (Some("production"), true) => a.version == self.production,
            (Some("candidate"), true) => self.candidates.contains(&a.version),
            _ => false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_table_under_load_fails_no_request_and_serves_only_its_versions() {
    ml_tests::init_logging();
    let _heavy = HEAVY.lock().await;
    let r = Rollout::start(2).await;
    let before = r.route(json!({})).await;
    // (when the change was sent, the table after it)
    let mut tables: Vec<(Instant, Served)> = vec![(Instant::now(), Served::from_reply(&before))];
    let stop = Arc::new(AtomicBool::new(false));
    let users = r.users.len();
    let load = {
        let (client, all, stop) = (r.client.clone(), r.users.clone(), stop.clone());
        tokio::spawn(
            async move { load(&client, &all, 8, 1_000_000, stop, spread_users(users)).await },
        )
    };
    let changes = [
        json!({"candidates":[{"version":2,"percent":10}],"actor":"alice"}),
        json!({"candidates":[{"version":2,"percent":30},{"version":3,"percent":20}],"actor":"alice"}),
        json!({"candidates":[{"version":3,"percent":50}],"shadow":{"version":5,"percent":10},"sticky":true,"actor":"alice"}),
        json!({"clear":true,"actor":"alice","reason":"done"}),
        json!({"candidates":[{"version":5,"percent":40}],"actor":"alice"}),
    ];
    for change in changes {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let sent = Instant::now();
        let reply = r.route(change).await;
        assert_eq!(reply["changed"], true, "{reply}");
        tables.push((sent, Served::from_reply(&reply)));
    }
    // A promotion clears the table.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let sent = Instant::now();
    let promoted = request_json(
        &r.client,
        "ml.registry.promote",
        r#"{"version":4,"reason":"rollout","actor":"alice"}"#,
    )
    .await;
    assert_eq!(promoted["route_cleared"], true, "{promoted}");
    let now = r.route(json!({})).await;
    assert!(now["table"].is_null() && now["production"] == 4, "{now}");
    tables.push((sent, Served::from_reply(&now)));
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let answers = all_answered(load.await.unwrap());
    assert!(answers.len() > 2000, "only {} requests", answers.len());
    assert_unique_ids(&answers);

    // A request sent while table j was the last one changed to is answered
    // by table j, by table j-1 (the fleet may still hold it while the
    // publication travels), or by the next table if it was changed to
    // before the reply arrived.
    let index = |t: Instant| tables.iter().rposition(|(s, _)| *s <= t).unwrap_or(0);
    let mut by_table = vec![0usize; tables.len()];
    for a in &answers {
        let (first, last) = (index(a.sent).saturating_sub(1), index(a.received));
        let Some(j) = (first..=last).rev().find(|&j| tables[j].1.allows(a)) else {
            panic!(
                "{a:?} is outside tables {first}..={last}: {:?}",
                &tables[first..=last]
            );
        };
        by_table[j] += 1;
    }
    println!(
        "table changes under load: {} requests, per table (the latest that allows each reply) {by_table:?}",
        answers.len()
    );
    assert!(
        answers.iter().any(|a| a.version == 3) && answers.iter().any(|a| a.version == 5),
        "the candidates answered"
    );
    let history = request_json(&r.client, "ml.registry.history", r#"{"limit":6}"#).await;
    let actions: Vec<&str> = history["moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "route_set",
            "route_set",
            "route_set",
            "route_clear",
            "route_set",
            "promote"
        ]
    );
    assert_eq!(history["moves"][5]["route_cleared"], true, "{history}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tables_are_refused_with_the_problem_named_and_change_nothing() {
    ml_tests::init_logging();
    let r = Rollout::start(1).await;
    let good = r
        .route(json!({"candidates":[{"version":2,"percent":10}],"shadow":{"version":3,"percent":20},"sticky":true,"actor":"alice","reason":"canary"}))
        .await;
    assert_eq!(good["changed"], true, "{good}");
    let history = |r: &Rollout| {
        let client = r.client.clone();
        async move { request_json(&client, "ml.registry.history", "").await["total"].clone() }
    };
    let moves = history(&r).await;
    // Corrupt v5's artifact on disk: the registry reads it again before use.
    let artifact = r.dir.path().join("registry/models/model-00000005.bin");
    let mut bytes = std::fs::read(&artifact).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&artifact, bytes).unwrap();
    let cases = [
        (
            json!({"candidates":[{"version":2,"percent":0}],"actor":"a"}),
            "percent_out_of_range",
            "percent 0",
        ),
        (
            json!({"candidates":[{"version":2,"percent":100}],"actor":"a"}),
            "percent_out_of_range",
            "percent 100",
        ),
        (
            json!({"candidates":[{"version":2,"percent":5}],"shadow":{"version":3,"percent":120},"actor":"a"}),
            "percent_out_of_range",
            "shadow v3",
        ),
        (
            json!({"candidates":[{"version":2,"percent":60},{"version":3,"percent":40}],"actor":"a"}),
            "weights_too_high",
            "add up to 100",
        ),
        (
            json!({"candidates":[{"version":9,"percent":10}],"actor":"a"}),
            "unknown_version",
            "v9",
        ),
        (
            json!({"candidates":[{"version":5,"percent":10}],"actor":"a"}),
            "corrupt_version",
            "v5",
        ),
        (
            json!({"candidates":[{"version":1,"percent":10}],"actor":"a"}),
            "is_production",
            "v1",
        ),
        (
            json!({"candidates":[{"version":2,"percent":10},{"version":2,"percent":5}],"actor":"a"}),
            "duplicate_version",
            "v2",
        ),
        (
            json!({"candidates":[{"version":2,"percent":10}],"shadow":{"version":2,"percent":5},"actor":"a"}),
            "shadow_is_candidate",
            "v2",
        ),
        (
            json!({"candidates":[{"version":2,"percent":10}],"actor":"a","weight":3}),
            "malformed",
            "unknown field `weight`",
        ),
        (
            json!({"candidates":[{"version":2,"percent":10,"extra":1}],"actor":"a"}),
            "malformed",
            "unknown field `extra`",
        ),
        (
            json!({"clear":true,"candidates":[{"version":2,"percent":10}],"actor":"a"}),
            "conflicting",
            "clear",
        ),
        (
            json!({"candidates":[{"version":2,"percent":10}]}),
            "bad_text",
            "actor",
        ),
        (
            json!({"candidates":[],"actor":"a"}),
            "empty_table",
            "no candidate",
        ),
    ];
    for (body, problem, names) in cases {
        let m = request(&r.client, "ml.registry.route", body.to_string()).await;
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["error"]["code"], "bad_request", "{body}: {v}");
        assert_eq!(v["error"]["problem"], problem, "{body}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{body}: {message}");
        let header = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"));
        assert_eq!(header.map(|h| h.as_str()), Some("400"), "{body}");
    }
    let after = r.route(json!({})).await;
    assert_eq!(after["table"], good["table"]);
    assert_eq!(after["epoch"], good["epoch"]);
    assert_eq!(after["changed"], false);
    assert_eq!(history(&r).await, moves, "nothing recorded");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_survives_a_registry_kill_and_a_predictor_started_later_serves_it() {
    ml_tests::init_logging();
    let mut r = Rollout::start(0).await;
    let set = r
        .route(json!({"candidates":[{"version":2,"percent":20}],"shadow":{"version":3,"percent":5},"sticky":true,"actor":"alice"}))
        .await;
    assert_eq!(set["changed"], true, "{set}");
    r.registry.child.kill().expect("SIGKILL the registry");
    r.registry.child.wait().unwrap();
    r.registry = start_registry(
        &r.nats.url(),
        &r.dir.path().join("registry"),
        &r.data,
        &r.dir.path().join("registry-2.log"),
    );
    let read = wait_for("the registry is back", WAIT, || async {
        let m = r
            .client
            .request("ml.registry.route", "{}".into())
            .await
            .ok()?;
        serde_json::from_slice::<Value>(&m.payload).ok()
    })
    .await;
    assert_eq!(read["table"], set["table"]);
    assert_eq!(read["epoch"], set["epoch"]);

    // A predictor started now gets the table from the registry.
    r.add_predictor().await;
    let users = r.users.clone();
    let answers = all_answered(
        load(
            &r.client,
            &r.users,
            4,
            250,
            Arc::new(AtomicBool::new(false)),
            spread_users(users.len()),
        )
        .await,
    );
    for a in &answers {
        let id = format!("exact-{:06}", a.row);
        let (version, variant) = if sticky_bucket(id.as_bytes()) < 20 {
            (2, "candidate")
        } else {
            (1, "production")
        };
        assert_eq!(
            (a.version, a.variant.as_deref()),
            (version, Some(variant)),
            "{a:?}"
        );
    }
    assert!(answers.iter().any(|a| a.version == 2));
    r.stop().await;
}
