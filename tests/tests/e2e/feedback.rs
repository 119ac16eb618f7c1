//! Rollouts, phase 2: the shadow and ground truth, against a real
//! `nats-server`, a registry process, a predictor and a monitor (the
//! fixtures of [`crate::rollouts`]). Every figure the monitor reports is
//! recomputed here from the replies the test received and the outcomes it
//! sent.
//!
//! - The shadow at 50% never changes or replaces a reply, and its reported
//!   agreement (mean absolute difference, correlation) equals the one
//!   computed from the two models' predictions on the requests the test
//!   sent (the shadowed ones are known from their `request_id`).
//! - `ml.feedback`: 3,000 predictions over two versions (a 50/50 table),
//!   labels for 90% of them, ids the monitor never held, labels sent twice,
//!   labels past a 8 s horizon: the per-version live RMSE and MAE equal an
//!   independent computation; unknown and expired labels are counted.
//! - A monitor with a cap of 100 awaiting predictions evicts and counts.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use ml_shared::messages::{ApiReply, SubmitReply};
use ml_shared::routing::shadowed;
use ml_tests::services::{self, Output, Service};
use ml_tests::wait_for;
use serde_json::{json, Value};

use crate::common::*;
use crate::rollouts::{
    all_answered, assert_unique_ids, load, user_request, Answered, Rollout, OFFSETS, WAIT,
};

/// The shadow's model: another quadratic in the raw features
/// (`feature_3` = `feature_1`²), so that its predictions differ from
/// production's by more than a constant.
const SHADOW: ([f64; 3], f64) = ([2.2, -1.3, 0.4], 2.5);

fn shadow_prediction(f1: f64, f2: f64) -> f64 {
    let ([a, b, c], intercept) = SHADOW;
    intercept + a * f1 + b * f2 + c * f1 * f1
}

/// Registers [`SHADOW`] as v6 (a candidate: its RMSE is worse).
async fn register_shadow(r: &Rollout) -> u64 {
    let mut submission = exact_submission(5, 1.0);
    let (coefficients, intercept) = SHADOW;
    submission.artifact.coefficients = coefficients.into();
    submission.artifact.intercept = intercept;
    let payload = ml_shared::codec::encode(&submission);
    let m = request(&r.client, "ml.registry.submit", payload).await;
    match serde_json::from_slice::<ApiReply<SubmitReply>>(&m.payload).unwrap() {
        ApiReply::Ok(ack) => {
            assert!(!ack.production, "the shadow model is not promoted");
            ack.version
        }
        ApiReply::Err(e) => panic!("submission refused: {e}"),
    }
}

/// Starts a monitor reporting every second with `extra` flags, and waits
/// until its first discovery has judged whatever the predictors sent
/// before it started: from then on, each request the test sends is one
/// more event counted (`total.count`).
async fn start_monitor(r: &Rollout, extra: &[&str]) -> (Service, Output) {
    let out = Output::default();
    let mut args = vec!["--monitor-interval", "1s"];
    args.extend_from_slice(extra);
    let monitor = services::monitor_with(&r.nats.url(), &args, out.clone());
    wait_for("the monitor has discovered the predictor", WAIT, || async {
        let s = try_stats(&r.client).await?;
        let health = &s["monitor"];
        (health["discoveries"].as_u64()? >= 1
            && health["known_predictors"].as_u64()? >= 1
            && health["quarantined_events"].as_u64()? == 0)
            .then_some(())
    })
    .await;
    (monitor, out)
}

async fn try_stats(client: &async_nats::Client) -> Option<Value> {
    let m = tokio::time::timeout(
        Duration::from_secs(5),
        client.request("ml.monitor.stats", "".into()),
    )
    .await
    .ok()?
    .ok()?;
    serde_json::from_slice(&m.payload).ok()
}

/// Waits until the monitor has counted `n` events in all.
async fn wait_counted(client: &async_nats::Client, n: u64) -> Value {
    wait_for(&format!("the monitor counts {n} events"), WAIT, || async {
        let s = try_stats(client).await?;
        (s["total"]["count"].as_u64()? >= n).then_some(s)
    })
    .await
}

/// `n` requests for the users of rows `rows`, in `lanes` concurrent lanes.
async fn send(r: &Rollout, lanes: usize, n: usize, rows: std::ops::Range<usize>) -> Vec<Answered> {
    let users = r.users.clone();
    let body = Arc::new(move |k: usize| {
        let row = rows.start + k % rows.len();
        (row, user_request(&users[row].0))
    });
    let stop = Arc::new(AtomicBool::new(false));
    all_answered(load(&r.client, &r.users, lanes, n / lanes, stop, body).await)
}

/// Sends requests for row 0 until one is answered with a `variant`;
/// returns every answer (the monitor counts them too).
async fn wait_routed(r: &Rollout) -> Vec<Answered> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut answers = Vec::new();
    loop {
        let a = send(r, 1, 1, 0..1).await;
        let routed = a.iter().any(|a| a.variant.is_some());
        answers.extend(a);
        if routed {
            return answers;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the predictor serves the table within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Mean absolute difference and Pearson correlation of `pairs`, two-pass.
fn agreement(pairs: &[(f64, f64)]) -> (f64, f64) {
    let n = pairs.len() as f64;
    let mad = pairs.iter().map(|(x, y)| (x - y).abs()).sum::<f64>() / n;
    let mx = pairs.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pairs.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in pairs {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
    }
    (mad, sxy / (sxx * syy).sqrt())
}

fn assert_near(got: &Value, want: f64, what: &str) {
    let got = got.as_f64().unwrap_or_else(|| panic!("{what}: {got}"));
    assert!(
        (got - want).abs() <= 1e-9 * want.abs().max(1.0),
        "{what}: monitor {got}, test {want}"
    );
}

/// Checks the monitor's totals for shadow `key` against the test's
/// (served, shadow) `pairs`, out of `answered` routed replies.
fn check_shadow(total: &Value, key: &str, pairs: &[(f64, f64)], answered: usize) {
    let (mad, correlation) = agreement(pairs);
    let reported = &total["shadow"][key];
    assert_near(&reported["mean_abs_diff"], mad, "mean absolute difference");
    assert_near(&reported["correlation"], correlation, "correlation");
    assert!(
        reported["latency_ms"]["p50"].as_f64().unwrap() > 0.0,
        "{reported}"
    );
    assert!(
        reported.get("label_agreement").is_none(),
        "a regressor: {reported}"
    );
    assert_eq!(total["shadow_dropped"], 0, "{total}");
    assert_eq!(
        total["variants"]["production"].as_u64(),
        Some(answered as u64),
        "{total}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shadow_never_changes_a_reply_and_its_agreement_is_reported() {
    ml_tests::init_logging();
    let _heavy = HEAVY.lock().await;
    let r = Rollout::start(1).await;
    let shadow = register_shadow(&r).await;
    let (monitor, _) = start_monitor(&r, &[]).await;
    let rows = read_rows(&r.data);
    let users = 400;

    // What every user gets with no table.
    let plain = send(&r, 4, users, 0..users).await;
    let mut baseline = BTreeMap::new();
    for a in &plain {
        assert_eq!((a.version, a.variant.as_deref()), (1, None), "{a:?}");
        baseline.insert(a.row, a.prediction.to_bits());
    }
    assert_eq!(baseline.len(), users);

    let set = r
        .route(json!({"shadow":{"version":shadow,"percent":50},"reason":"shadow","actor":"alice"}))
        .await;
    assert_eq!(set["table"]["shadow"]["percent"], 50, "{set}");
    let mut answers: Vec<Answered> = wait_routed(&r)
        .await
        .into_iter()
        .filter(|a| a.variant.is_some())
        .collect();
    answers.extend(send(&r, 4, 2000, 0..users).await);
    assert_unique_ids(&answers);

    // Every reply is production's, bit for bit what the user got without a
    // shadow; no shadow answer is ever returned.
    for a in &answers {
        assert_eq!(
            (a.version, a.variant.as_deref()),
            (1, Some("production")),
            "{a:?}"
        );
        assert_eq!(a.prediction.to_bits(), baseline[&a.row], "{a:?}");
    }
    let pairs: Vec<(f64, f64)> = answers
        .iter()
        .filter(|a| shadowed(&a.request_id, 50))
        .map(|a| {
            let (_, f1, f2, _) = rows[a.row];
            (a.prediction, shadow_prediction(f1, f2))
        })
        .collect();
    assert!(
        (800..1200).contains(&pairs.len()),
        "{} of {} shadowed",
        pairs.len(),
        answers.len()
    );

    let key = shadow.to_string();
    let stats = wait_for("the monitor reports every shadow run", WAIT, || async {
        let s = try_stats(&r.client).await?;
        (s["total"]["shadow"][&key]["count"].as_u64()? == pairs.len() as u64).then_some(s)
    })
    .await;
    check_shadow(&stats["total"], &key, &pairs, answers.len());
    monitor.stop().await;
    r.stop().await;
}

/// The outcome the test reports for the `k`-th labelled request: the
/// exact target plus a deterministic error in [−0.5, 0.5).
fn outcome(target: f64, k: usize) -> f64 {
    target + ((k * 7919) % 1000) as f64 / 1000.0 - 0.5
}

/// Sends labels in messages of 250; returns the summed reply.
async fn feedback(client: &async_nats::Client, labels: &[(String, f64)]) -> [u64; 4] {
    let mut sum = [0u64; 4];
    for chunk in labels.chunks(250) {
        let body = json!({"feedback": chunk
            .iter()
            .map(|(id, outcome)| json!({"request_id": id, "outcome": outcome}))
            .collect::<Vec<_>>()});
        let reply = request_json(client, "ml.feedback", &body.to_string()).await;
        for (i, key) in ["matched", "unknown", "expired", "invalid"]
            .iter()
            .enumerate()
        {
            sum[i] += reply[key].as_u64().unwrap_or_else(|| panic!("{reply}"));
        }
    }
    sum
}

/// Sends 3,000 requests in chunks of 250 (users 0 to 2,999), each chunk
/// labelled (9 requests in 10) as soon as the monitor has counted it (it
/// then holds them), well within the horizon. `sent`: the requests counted
/// since `start`. Returns the labelled answers with their outcomes, and the
/// unlabelled ones.
async fn send_and_label(
    r: &Rollout,
    start: u64,
    mut sent: u64,
) -> (Vec<(Answered, f64)>, Vec<Answered>) {
    let mut labelled: Vec<(Answered, f64)> = Vec::new();
    let mut unlabelled = Vec::new();
    let mut k = 0;
    for chunk in 0..12 {
        let answers = send(r, 5, 250, chunk * 250..(chunk + 1) * 250).await;
        sent += answers.len() as u64;
        wait_counted(&r.client, start + sent).await;
        let mut labels = Vec::new();
        for a in answers {
            k += 1;
            if k % 10 == 0 {
                unlabelled.push(a);
                continue;
            }
            let y = outcome(r.users[a.row].1, k);
            labels.push((a.request_id.clone(), y));
            labelled.push((a, y));
        }
        let n = labels.len() as u64;
        assert_eq!(feedback(&r.client, &labels).await, [n, 0, 0, 0]);
    }
    (labelled, unlabelled)
}

/// Checks the monitor's live RMSE and MAE of v1 and v2 against the test's
/// computation from `labelled`; returns each version's RMSE.
fn check_live(total: &Value, labelled: &[(Answered, f64)]) -> Vec<(u64, f64)> {
    let mut rmse_by_version = Vec::new();
    for version in [1u64, 2] {
        let errors: Vec<f64> = labelled
            .iter()
            .filter(|(a, _)| a.version == version)
            .map(|(a, y)| a.prediction - y)
            .collect();
        let m = errors.len() as f64;
        let rmse = (errors.iter().map(|e| e * e).sum::<f64>() / m).sqrt();
        let mae = errors.iter().map(|e| e.abs()).sum::<f64>() / m;
        let live = &total["live"][version.to_string()];
        rmse_by_version.push((version, rmse));
        assert_eq!(
            live["labelled"].as_u64(),
            Some(errors.len() as u64),
            "{live}"
        );
        assert_near(&live["rmse"], rmse, &format!("v{version} RMSE"));
        assert_near(&live["mae"], mae, &format!("v{version} MAE"));
        assert!(live.get("accuracy").is_none(), "{live}");
    }
    rmse_by_version
}

/// Checks `/metrics` on `addr`: each version's `ml_live_rmse`, and the
/// labels counted `unknown` (81) and `expired` (`expired`).
async fn check_metrics(addr: &str, rmse_by_version: &[(u64, f64)], expired: u64) {
    let unknown_line = "ml_feedback_labels_total{result=\"unknown\"} 81";
    let text = wait_for("the live metrics in /metrics", WAIT, || async {
        let (status, text) = ml_tests::prometheus::http_get(addr, "/metrics")
            .await
            .ok()?;
        (status == 200 && text.contains(unknown_line) && text.contains("ml_live_rmse{"))
            .then_some(text)
    })
    .await;
    for (version, rmse) in rmse_by_version {
        let prefix = format!("ml_live_rmse{{model_version=\"{version}\"}} ");
        let line = text.lines().find_map(|l| l.strip_prefix(prefix.as_str()));
        let got: f64 = line
            .unwrap_or_else(|| panic!("{prefix} in {text}"))
            .parse()
            .unwrap();
        assert!(
            (got - rmse).abs() <= 1e-9 * rmse.max(1.0),
            "v{version}: {got} vs {rmse}"
        );
    }
    let expired_line = format!("ml_feedback_labels_total{{result=\"expired\"}} {expired}");
    assert!(text.contains(&expired_line), "{text}");
}

/// Bad feedback is refused whole with `bad_request`, counted, and the
/// monitor keeps serving.
async fn check_bad_feedback(client: &async_nats::Client) {
    for bad in [
        "",
        "{}",
        r#"{"feedback":[]}"#,
        r#"{"feedback":[{"request_id":"a","outcome":"NaN"}]}"#,
    ] {
        let reply = request_json(client, "ml.feedback", bad).await;
        assert_eq!(reply["error"]["code"], "bad_request", "{bad}: {reply}");
    }
    let stats = try_stats(client).await.unwrap();
    assert_eq!(stats["monitor"]["feedback_rejected"], 4);
}

/// Labels for ids never held, for a batch's id and labels sent twice are
/// `unknown`; once every prediction has expired, the labels of `late` and
/// `unlabelled` are `expired`. Returns how many were.
async fn unknown_and_expired(
    r: &Rollout,
    labelled: &[(Answered, f64)],
    late: &[Answered],
    unlabelled: &[Answered],
) -> u64 {
    // Ids never held, and labels sent a second time: unknown.
    let mut unknown: Vec<(String, f64)> = (0..50).map(|i| (format!("nobody-{i}"), 1.0)).collect();
    unknown.extend(
        labelled[..30]
            .iter()
            .map(|(a, y)| (a.request_id.clone(), *y)),
    );
    // A batch's reply has a request_id, but no single prediction to join.
    let ids: Vec<&str> = r.users[..3].iter().map(|(id, _)| id.as_str()).collect();
    let batch = request_json(
        &r.client,
        "ml.predict",
        &json!({ "user_ids": ids }).to_string(),
    )
    .await;
    let batch_id = batch["request_id"].as_str().expect("a batch's request_id");
    unknown.push((batch_id.to_owned(), 1.0));
    assert_eq!(feedback(&r.client, &unknown).await, [0, 81, 0, 0]);

    // Past the horizon: expired.
    wait_for(
        "every prediction expires",
        Duration::from_secs(30),
        || async {
            let s = try_stats(&r.client).await?;
            (s["monitor"]["awaiting"].as_u64()? == 0).then_some(())
        },
    )
    .await;
    let expired: Vec<(String, f64)> = late
        .iter()
        .chain(unlabelled)
        .map(|a| (a.request_id.clone(), OFFSETS[0]))
        .collect();
    let n = expired.len() as u64;
    assert_eq!(feedback(&r.client, &expired).await, [0, 0, n, 0]);

    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_gives_live_rmse_and_mae_per_version_and_counts_unknown_and_expired() {
    ml_tests::init_logging();
    let _heavy = HEAVY.lock().await;
    let r = Rollout::start(1).await;
    let metrics_addr = format!("127.0.0.1:{}", ml_tests::prometheus::free_port());
    let (monitor, out) = start_monitor(
        &r,
        &["--feedback-horizon", "8s", "--metrics-addr", &metrics_addr],
    )
    .await;
    let set = r
        .route(json!({"candidates":[{"version":2,"percent":50}],"reason":"ab","actor":"alice"}))
        .await;
    assert_eq!(set["table"]["candidates"][0]["version"], 2, "{set}");
    let start = try_stats(&r.client).await.unwrap()["total"]["count"]
        .as_u64()
        .unwrap();
    let mut sent = wait_routed(&r).await.len() as u64;

    // Late: labelled only once they are past the horizon.
    let late = send(&r, 4, 200, 0..200).await;
    sent += late.len() as u64;
    let (labelled, unlabelled) = send_and_label(&r, start, sent).await;
    assert!(
        labelled.iter().any(|(a, _)| a.version == 1)
            && labelled.iter().any(|(a, _)| a.version == 2)
    );

    let n = unknown_and_expired(&r, &labelled, &late, &unlabelled).await;
    // Live RMSE and MAE per version, as the test computes them.
    let stats = try_stats(&r.client).await.unwrap();
    let total = &stats["total"];
    let rmse_by_version = check_live(total, &labelled);
    let counts = &total["feedback"];
    assert_eq!(
        (
            counts["matched"].as_u64(),
            counts["unknown"].as_u64(),
            counts["expired"].as_u64()
        ),
        (Some(labelled.len() as u64), Some(81), Some(n)),
        "{counts}"
    );
    let health = &stats["monitor"];
    assert!(
        health["expired_awaiting"].as_u64().unwrap() >= n,
        "{health}"
    );
    assert_eq!(health["evicted_awaiting"], 0, "{health}");
    // The window lines carry the live metrics too.
    wait_for("a window line with live metrics", WAIT, || async {
        out.lines()
            .iter()
            .any(|l| l.contains(" live=v1:n=") && l.contains("feedback=matched:"))
            .then_some(())
    })
    .await;
    // And in /metrics, once a window has ended after the last label.
    check_metrics(&metrics_addr, &rmse_by_version, n).await;
    check_bad_feedback(&r.client).await;
    let stats = try_stats(&r.client).await.unwrap();
    assert_eq!(
        stats["total"]["feedback"]["matched"].as_u64(),
        Some(labelled.len() as u64)
    );
    monitor.stop().await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_cap_on_awaiting_predictions_evicts_and_counts() {
    ml_tests::init_logging();
    let _heavy = HEAVY.lock().await;
    let r = Rollout::start(1).await;
    let (monitor, _) = start_monitor(&r, &["--feedback-max", "100"]).await;
    let start = try_stats(&r.client).await.unwrap()["total"]["count"]
        .as_u64()
        .unwrap();
    // One lane: the monitor receives the events in the order sent.
    let answers = send(&r, 1, 300, 0..300).await;
    let stats = wait_counted(&r.client, start + 300).await;
    let health = &stats["monitor"];
    assert_eq!(health["awaiting"], 100, "{health}");
    assert_eq!(health["feedback_max"], 100, "{health}");
    assert!(
        health["evicted_awaiting"].as_u64().unwrap() >= 200,
        "{health}"
    );
    let label = |a: &Answered| (a.request_id.clone(), r.users[a.row].1);
    // The newest 100 are held; of the 200 evicted, the ids of the newest
    // 100 are remembered (expired), the older ones no longer (unknown).
    let newest: Vec<_> = answers[200..].iter().map(label).collect();
    assert_eq!(feedback(&r.client, &newest).await, [100, 0, 0, 0]);
    let evicted: Vec<_> = answers[..200].iter().map(label).collect();
    assert_eq!(feedback(&r.client, &evicted).await, [0, 100, 100, 0]);
    let metrics_text = stats["monitor"].to_string();
    assert!(metrics_text.contains("evicted_awaiting"), "{metrics_text}");
    monitor.stop().await;
    r.stop().await;
}
