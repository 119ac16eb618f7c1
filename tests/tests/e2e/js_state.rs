//! The registry's state on JetStream (`REGISTRY_STATE=jetstream`), with real
//! servers and real registries: two registries on one server both serve,
//! and concurrent promotions and rollbacks through them give one linear
//! history with no lost update and no reused version; on a 3-node cluster
//! (the `NATS_SERVER_CLUSTER_BIN` binary) a registered version and an alias
//! move survive `kill -9` of the history stream's leader and a restart of
//! the whole cluster from its store directories, and without a quorum a
//! write fails with `no_quorum` while reads are still answered.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use ml_shared::lifecycle::{Alias, AliasMove, MoveAction, MoveReply};
use ml_tests::cluster::{cluster_bin, NatsCluster};
use ml_tests::services::{registry_with, Service};
use ml_tests::{temp_dir, wait_for, NatsServer};
use rand::{Rng, SeedableRng};
use registry::jetstream::{JsError, JsSettings, JsState};
use registry::store::{Store, StoreError};
use serde_json::Value;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(60);

/// An error reply's code and message, or what kept the reply from coming.
type Refusal = (String, String);

/// Sends a request and returns the JSON reply, or the error's code.
async fn call(client: &Client, subject: &str, body: impl Into<Bytes>) -> Result<Value, Refusal> {
    let request = client.request(subject.to_owned(), body.into());
    let message = tokio::time::timeout(Duration::from_secs(15), request)
        .await
        .map_err(|_| ("no_reply".to_owned(), "no reply in 15 s".to_owned()))?
        .map_err(|e| ("no_reply".to_owned(), e.to_string()))?;
    let v: Value = serde_json::from_slice(&message.payload)
        .map_err(|e| ("not_json".to_owned(), e.to_string()))?;
    match v["error"]["code"].as_str() {
        Some(code) => Err((code.to_owned(), v["error"]["message"].to_string())),
        None => Ok(v),
    }
}

/// [`call`] again while the reply is `conflict`, or while it is one of
/// `transient` (a cluster electing leaders), at most `attempts` times.
/// Returns the last outcome and the number of conflicts met.
async fn call_retrying(
    client: &Client,
    subject: &str,
    body: Bytes,
    transient: &[&str],
    attempts: usize,
) -> (Result<Value, Refusal>, usize) {
    let mut conflicts = 0;
    for _ in 1..attempts {
        match call(client, subject, body.clone()).await {
            Err((code, _)) if code == "conflict" => conflicts += 1,
            Err((code, _)) if transient.contains(&code.as_str()) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            outcome => return (outcome, conflicts),
        }
    }
    (call(client, subject, body).await, conflicts)
}

fn submit_body(i: u64, rmse: f64) -> Bytes {
    ml_shared::codec::encode(&exact_submission(i, rmse)).into()
}

fn promote_body(version: u64, actor: &str) -> Bytes {
    format!(r#"{{"version":{version},"reason":"test move","actor":"{actor}"}}"#).into()
}

/// A registry on the JetStream state of `url` (`replicas` replicas).
fn js_registry(url: &str, holdout: &Path, replicas: &str) -> Service {
    let unused = holdout.with_file_name("no-registry-dir");
    registry_with(
        url,
        &unused,
        holdout,
        &[
            "--state",
            "jetstream",
            "--replicas",
            replicas,
            "--js-timeout",
            "2s",
        ],
    )
}

/// The whole history, every page of it.
async fn history(client: &Client) -> Vec<AliasMove> {
    let mut moves: Vec<AliasMove> = Vec::new();
    loop {
        let body = format!(r#"{{"limit":500,"offset":{}}}"#, moves.len());
        let v = call(client, "ml.registry.history", body)
            .await
            .expect("history");
        let mut page: Vec<AliasMove> = serde_json::from_value(v["moves"].clone()).expect("moves");
        let total = v["total"].as_u64().expect("total") as usize;
        page.append(&mut moves);
        moves = page;
        if moves.len() >= total {
            return moves;
        }
    }
}

/// The stored versions and the production version.
async fn models(client: &Client) -> (BTreeSet<u64>, Option<u64>) {
    let v = call(client, "ml.registry.models", r#"{"limit":500}"#)
        .await
        .expect("models");
    let versions = v["models"]
        .as_array()
        .expect("models")
        .iter()
        .map(|m| m["version"].as_u64().expect("version"))
        .collect();
    (versions, v["production"].as_u64())
}

/// Checks that `moves` are one linear history: sequence numbers 1, 2, 3…,
/// and every production move starts where the one before ended (no lost
/// update), its epoch one above. Returns the production moves by epoch.
fn check_linear(moves: &[AliasMove]) -> BTreeMap<u64, AliasMove> {
    let mut production: Option<u64> = None;
    let mut epoch = 0;
    let mut by_epoch = BTreeMap::new();
    for (i, m) in moves.iter().enumerate() {
        assert_eq!(m.seq, i as u64 + 1, "sequence numbers in order: {m:?}");
        if m.alias != Alias::Production {
            continue;
        }
        assert_eq!(m.from, production, "a move lost the one before it: {m:?}");
        let e = m.epoch.expect("a production move has an epoch");
        assert_eq!(e, epoch + 1, "epochs one apart: {m:?}");
        (production, epoch) = (Some(m.to), e);
        by_epoch.insert(e, m.clone());
    }
    by_epoch
}

/// Promotes and rolls back at random, `moves` times, retrying conflicts;
/// returns the replies that moved production and the conflicts met.
async fn mover(url: String, seed: u64, versions: Vec<u64>, moves: usize) -> (Vec<Value>, usize) {
    let client = client(&url).await;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut moved, mut conflicts) = (Vec::new(), 0);
    for _ in 0..moves {
        let actor = format!("mover-{seed}");
        let (subject, body) = if rng.gen_bool(0.3) {
            let body = format!(r#"{{"reason":"test rollback","actor":"{actor}"}}"#);
            ("ml.registry.rollback", Bytes::from(body))
        } else {
            let v = versions[rng.gen_range(0..versions.len())];
            ("ml.registry.promote", promote_body(v, &actor))
        };
        let (outcome, c) = call_retrying(&client, subject, body, &[], 200).await;
        conflicts += c;
        match outcome {
            Ok(v) if v["moved"] == true => moved.push(v),
            Ok(_) => {}
            // A rollback with nothing to roll back to.
            Err((code, message)) if code == "bad_request" && message.contains("previous") => {}
            Err(e) => panic!("{subject} failed: {e:?}"),
        }
    }
    (moved, conflicts)
}

/// A JetStream registry (see [`js_registry`]) once it answers.
async fn serving_registry(c: &Client, url: &str, holdout: &Path, replicas: &str) -> Service {
    let service = js_registry(url, holdout, replicas);
    wait_for("the registry answering", WAIT, || async {
        call(c, "ml.registry.models", "{}").await.ok()
    })
    .await;
    service
}

/// A temporary directory with exact data (the registry's holdout) in it.
fn holdout_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = temp_dir();
    let holdout = dir.path().join("exact.csv");
    write_exact_data(&holdout, 200);
    (dir, holdout)
}

/// `n` submissions at once, retrying conflicts: their versions.
async fn submit_at_once(c: &Client, n: u64) -> Vec<u64> {
    let submissions = (1..=n).map(|i| {
        let c = c.clone();
        tokio::spawn(async move {
            let rmse = 1.0 + i as f64 / 100.0;
            call_retrying(&c, "ml.registry.submit", submit_body(i, rmse), &[], 50).await
        })
    });
    let mut versions = Vec::new();
    for s in submissions {
        let (outcome, _) = s.await.expect("submitter");
        versions.push(outcome.expect("registered")["version"].as_u64().unwrap());
    }
    versions
}

/// Every acknowledged move is the history's move of its epoch, and the
/// history holds no other promotion or rollback.
fn check_acknowledged(moves: &[AliasMove], moved: &[Value]) {
    let by_epoch = check_linear(moves);
    let manual = by_epoch
        .values()
        .filter(|m| matches!(m.action, MoveAction::Promote | MoveAction::Rollback))
        .count();
    assert_eq!(
        manual,
        moved.len(),
        "one history move per acknowledged move"
    );
    for reply in moved {
        let m = &by_epoch[&reply["epoch"].as_u64().expect("epoch")];
        assert_eq!(
            Some(m.to),
            reply["to"].as_u64(),
            "the reply's move is in the history"
        );
        assert_eq!(m.from, reply["from"].as_u64(), "from as acknowledged");
    }
}

/// The requests each running registry has answered.
async fn requests_per_registry(c: &Client) -> Vec<u64> {
    let stats = service_stats(c, "registry").await;
    stats
        .iter()
        .map(|s| {
            let endpoints = s["endpoints"].as_array().expect("endpoints");
            endpoints
                .iter()
                .filter_map(|e| e["num_requests"].as_u64())
                .sum()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_registries_on_jetstream_serve_one_linear_history_under_concurrent_moves() {
    // async-nats 0.51's JetStream buckets need nats-server 2.10 or later.
    let nats = NatsServer::start_bin(cluster_bin(), &[] as &[&str], None);
    let (_dir, holdout) = holdout_dir();
    let c = client(&nats.url()).await;
    let a = serving_registry(&c, &nats.url(), &holdout, "1").await;
    let b = serving_registry(&c, &nats.url(), &holdout, "1").await;

    let versions = submit_at_once(&c, 8).await;
    let distinct: BTreeSet<u64> = versions.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        8,
        "a version number given twice: {versions:?}"
    );
    assert_eq!(
        models(&c).await.0,
        distinct,
        "every acknowledged version listed"
    );

    // Four movers, 80 moves each, through both registries.
    let movers = (0..4u64).map(|seed| {
        let (url, versions) = (nats.url(), versions.clone());
        tokio::spawn(mover(url, seed, versions, 80))
    });
    let (mut moved, mut conflicts) = (Vec::new(), 0);
    for m in movers {
        let (mut replies, c) = m.await.expect("mover");
        moved.append(&mut replies);
        conflicts += c;
    }
    let moves = history(&c).await;
    check_acknowledged(&moves, &moved);
    let served = requests_per_registry(&c).await;
    assert!(
        served.len() == 2 && served.iter().all(|&n| n > 0),
        "both registries answered requests: {served:?}"
    );
    eprintln!(
        "js_state: {} moves in the history, {} acknowledged moves, {conflicts} conflicts retried, requests per registry {served:?}",
        moves.len(),
        moved.len()
    );
    a.stop().await;
    b.stop().await;
}

/// The leader of stream `name`, as `$JS.API.STREAM.INFO` names it.
async fn stream_leader(client: &Client, name: &str) -> Option<String> {
    let subject = format!("$JS.API.STREAM.INFO.{name}");
    let m = tokio::time::timeout(Duration::from_secs(3), client.request(subject, "".into()))
        .await
        .ok()?
        .ok()?;
    let v: Value = serde_json::from_slice(&m.payload).ok()?;
    v["cluster"]["leader"].as_str().map(str::to_owned)
}

/// Waits until every bucket and stream of the registry has a leader.
async fn wait_leaders(client: &Client) {
    for name in [
        "KV_ml_registry",
        "OBJ_ml_registry_models",
        "ML_REGISTRY_HISTORY",
        "ML_REGISTRY_RUNS",
    ] {
        wait_for(&format!("a leader for {name}"), WAIT, || {
            stream_leader(client, name)
        })
        .await;
    }
}

const TRANSIENT: [&str; 3] = ["no_quorum", "unavailable", "no_reply"];

/// A test's cluster, its client and the registry's holdout.
struct Bench {
    cluster: NatsCluster,
    c: Client,
    url: String,
    holdout: PathBuf,
    _dir: tempfile::TempDir,
}

impl Bench {
    async fn registry(&self) -> Service {
        serving_registry(&self.c, &self.url, &self.holdout, "3").await
    }

    async fn promote(&self, version: u64) -> Result<Value, Refusal> {
        let body = promote_body(version, "op");
        call_retrying(&self.c, "ml.registry.promote", body, &TRANSIENT, 50)
            .await
            .0
    }
}

/// v1 (production) and v2 (held by the gate) registered, then v2 promoted.
async fn register_and_promote(bench: &Bench) {
    let c = &bench.c;
    let v1 = call(c, "ml.registry.submit", submit_body(1, 1.0))
        .await
        .expect("v1");
    let v2 = call(c, "ml.registry.submit", submit_body(2, 2.0))
        .await
        .expect("v2");
    assert_eq!(
        (v1["version"].as_u64(), v1["production"].as_bool()),
        (Some(1), Some(true))
    );
    assert_eq!(
        (v2["version"].as_u64(), v2["production"].as_bool()),
        (Some(2), Some(false))
    );
    assert_eq!(
        bench.promote(2).await.expect("promote")["to"].as_u64(),
        Some(2)
    );
}

/// Kills the history stream's leader; a fresh registry reads v1, v2 and
/// production v2 from the two nodes left, and promotes v1 through them.
async fn kill_the_leader(bench: &mut Bench) -> (String, usize) {
    let leader = stream_leader(&bench.c, "ML_REGISTRY_HISTORY")
        .await
        .expect("a leader");
    let killed = bench.cluster.index_of(&leader).expect("a node of ours");
    bench.cluster.kill(killed);
    wait_leaders(&bench.c).await;
    let fresh = bench.registry().await;
    // A registry that starts while leaders are elected fetches what it
    // could not yet at its next requests.
    let want = (BTreeSet::from([1, 2]), Some(2));
    wait_for(
        &format!("v1, v2 and production v2 after {leader} died"),
        WAIT,
        || async { (models(&bench.c).await == want).then_some(()) },
    )
    .await;
    assert_eq!(
        bench.promote(1).await.expect("promote after the kill")["to"].as_u64(),
        Some(1)
    );
    fresh.stop().await;
    (leader, killed)
}

/// After a restart of the whole cluster, a fresh registry holds both
/// versions, production v1 and both promotions, and gives out v3.
async fn restart_everything(bench: &mut Bench, killed: usize) -> Service {
    bench.cluster.restart(killed);
    bench.cluster.restart_all();
    bench.cluster.wait_jetstream(3, WAIT).await;
    wait_leaders(&bench.c).await;
    let fresh = bench.registry().await;
    let want = (BTreeSet::from([1, 2]), Some(1));
    wait_for(
        "v1, v2 and production v1 after the restart",
        WAIT,
        || async { (models(&bench.c).await == want).then_some(()) },
    )
    .await;
    let moves = history(&bench.c).await;
    check_linear(&moves);
    let promotes: Vec<u64> = moves
        .iter()
        .filter(|m| m.action == MoveAction::Promote)
        .map(|m| m.to)
        .collect();
    assert_eq!(
        promotes,
        [2, 1],
        "both acknowledged promotions kept: {moves:?}"
    );
    let body = submit_body(3, 2.0);
    let (v3, _) = call_retrying(&bench.c, "ml.registry.submit", body, &TRANSIENT, 50).await;
    assert_eq!(
        v3.expect("v3")["version"].as_u64(),
        Some(3),
        "no version reused"
    );
    fresh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_cluster_acknowledged_state_survives_a_leader_kill_and_a_full_restart() {
    let mut cluster = NatsCluster::start(3);
    cluster.wait_jetstream(3, WAIT).await;
    let url = cluster.url();
    let (_dir, holdout) = holdout_dir();
    let c = resilient_client(&url, Duration::from_secs(15)).await;
    let mut bench = Bench {
        cluster,
        c,
        url,
        holdout,
        _dir,
    };
    let first = bench.registry().await;
    register_and_promote(&bench).await;
    first.stop().await;
    let (leader, killed) = kill_the_leader(&mut bench).await;
    let last = restart_everything(&mut bench, killed).await;

    // No quorum: two nodes of three gone. A write fails with `no_quorum`,
    // a read is answered from what the registry holds.
    let survivor = (killed + 1) % 3;
    for i in (0..3).filter(|&i| i != survivor) {
        bench.cluster.kill(i);
    }
    let body = promote_body(2, "op");
    let refused = call_retrying(&bench.c, "ml.registry.promote", body, &["no_reply"], 10).await;
    let (code, message) = refused.0.expect_err("no write without a quorum");
    assert_eq!(code, "no_quorum", "{message}");
    assert_eq!(
        models(&bench.c).await.1,
        Some(1),
        "reads answered without a quorum"
    );
    eprintln!(
        "js_state cluster: {} (sync_interval always: {}), killed leader {leader}; no-quorum refusal: {message}",
        bench.cluster.version(),
        bench.cluster.synced()
    );
    drop(last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_fixture_kills_and_restarts_a_node() {
    let mut cluster = NatsCluster::start(3);
    cluster.wait_jetstream(3, WAIT).await;
    cluster.kill(1);
    assert!(cluster.node(0).pid().is_some() && cluster.node(1).pid().is_none());
    cluster.wait_jetstream(2, WAIT).await;
    cluster.restart(1);
    cluster.wait_jetstream(3, WAIT).await;
    let ports: BTreeSet<u16> = (0..3).map(|i| cluster.node(i).port()).collect();
    assert_eq!(ports.len(), 3);
}

/// Two stores on one state, both caught up: the first promotes v2, the
/// second (behind) tries to, catches up, and promotes v1.
async fn race_two_stores(url: &str) -> [Result<MoveReply, StoreError>; 3] {
    let settings = JsSettings {
        replicas: 1,
        timeout: Duration::from_secs(2),
    };
    let a = JsState::open(client(url).await, settings)
        .await
        .expect("state a");
    let b = JsState::open(client(url).await, settings)
        .await
        .expect("state b");
    tokio::task::spawn_blocking(move || {
        let mut a = Store::open_jetstream(a, 0.05).expect("store a");
        let mut b = Store::open_jetstream(b, 0.05).expect("store b");
        let won = a.promote(2, "first writer", "a");
        // b has not seen a's commit: its move is refused, nothing applied.
        let lost = b.promote(2, "second writer", "b");
        b.refresh().expect("catch up");
        [won, lost, b.promote(1, "second writer, caught up", "b")]
    })
    .await
    .expect("store task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_behind_the_history_loses_the_compare_and_set_with_a_conflict() {
    let nats = NatsServer::start_bin(cluster_bin(), &[] as &[&str], None);
    let (_dir, holdout) = holdout_dir();
    let c = client(&nats.url()).await;
    let service = serving_registry(&c, &nats.url(), &holdout, "1").await;
    for (i, rmse) in [(1, 1.0), (2, 2.0)] {
        let body = submit_body(i, rmse);
        call(&c, "ml.registry.submit", body)
            .await
            .expect("registered");
    }
    service.stop().await;

    let [won, lost, retried] = race_two_stores(&nats.url()).await;
    let won = won.expect("the first writer wins");
    assert_eq!((won.from, won.to, won.moved), (Some(1), 2, true));
    assert!(
        matches!(lost, Err(StoreError::Js(JsError::Conflict(_)))),
        "{lost:?}"
    );
    let retried = retried.expect("the retry after catching up wins");
    assert_eq!((retried.from, retried.to), (Some(2), 1));

    let service = serving_registry(&c, &nats.url(), &holdout, "1").await;
    let moves = history(&c).await;
    service.stop().await;
    check_linear(&moves);
    let manual: Vec<(&str, u64)> = moves
        .iter()
        .filter(|m| m.action == MoveAction::Promote)
        .map(|m| (m.actor.as_str(), m.to))
        .collect();
    assert_eq!(manual, [("a", 2), ("b", 1)], "the lost write left no trace");
}
