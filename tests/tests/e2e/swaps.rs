//! Model swaps under load: 50 promotions while a client sends about 2,000
//! requests per second. No request fails, every reply carries one version,
//! and versions never go backwards on the replica.

use std::sync::Arc;
use std::time::Duration;

use ml_tests::{services, wait_for};
use serde_json::Value;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_promotions_under_load_fail_no_request() {
    ml_tests::init_logging();
    let Bed {
        nats: _nats,
        url,
        dir,
        data,
    } = Bed::new(400, 11);
    let rows = read_rows(&data);
    let registry = services::registry(&url, &dir.path().join("registry"), &data);
    let predictor = services::predictor(&url, &data);
    let trainer = services::trainer(&url, &data, "0");
    let client = client(&url).await;
    wait_for(
        "trainer and predictor up",
        Duration::from_secs(15),
        || async {
            client.request("ml.train", "".into()).await.ok()?;
            let m = client
                .request(
                    "ml.predict",
                    r#"{"features":{"feature_1":1,"feature_2":1}}"#.into(),
                )
                .await
                .ok()?;
            let v: Value = serde_json::from_slice(&m.payload).ok()?;
            v["model_version"].as_u64()
        },
    )
    .await;

    // Load: 8 lanes, each sending its next request when the previous one is
    // answered, paced to 250 requests/s: about 2,000 requests/s in all. In a
    // lane, request k+1 reaches the replica after request k was answered, so
    // its version must not be older.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lanes: Vec<_> = (0..8)
        .map(|lane| {
            let (client, stop) = (client.clone(), stop.clone());
            let bodies: Vec<String> = rows
                .iter()
                .map(|r| format!(r#"{{"user_id":"{}"}}"#, r.0))
                .collect();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(4));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut outcomes: Vec<Result<u64, String>> = Vec::new();
                let mut i = lane * 50;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tick.tick().await;
                    let body = bodies[i % bodies.len()].clone();
                    i += 1;
                    outcomes.push(match client.request("ml.predict", body.into()).await {
                        Ok(m) => {
                            let v: Value =
                                serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                            v["model_version"].as_u64().ok_or_else(|| v.to_string())
                        }
                        Err(e) => Err(e.to_string()),
                    });
                }
                outcomes
            })
        })
        .collect();

    // 50 promotions: each on-demand run registers a new production version.
    let mut last = 0;
    for _ in 0..50 {
        let reply = request_json(&client, "ml.train", "").await;
        let version = reply["version"]
            .as_u64()
            .unwrap_or_else(|| panic!("{reply}"));
        assert!(version > last);
        last = version;
        // Spread the promotions over at least a second of load.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the last publication arrive and be served.
    wait_for("last version served", Duration::from_secs(10), || async {
        let m = client
            .request(
                "ml.predict",
                r#"{"features":{"feature_1":1,"feature_2":1}}"#.into(),
            )
            .await
            .ok()?;
        let v: Value = serde_json::from_slice(&m.payload).ok()?;
        (v["model_version"].as_u64() == Some(last)).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut total = 0;
    let mut seen = std::collections::BTreeSet::new();
    for lane in lanes {
        let outcomes = tokio::time::timeout(Duration::from_secs(15), lane)
            .await
            .expect("lane stops")
            .unwrap();
        let failures: Vec<&String> = outcomes.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failures.is_empty(),
            "{} failed requests, e.g. {:?}",
            failures.len(),
            failures.first()
        );
        let versions: Vec<u64> = outcomes.iter().map(|r| *r.as_ref().unwrap()).collect();
        let backwards = versions.windows(2).filter(|w| w[1] < w[0]).count();
        assert_eq!(
            backwards, 0,
            "versions went backwards {backwards} times in a lane"
        );
        total += versions.len();
        seen.extend(versions);
    }
    assert!(total > 1000, "only {total} requests");
    assert!(seen.len() > 10, "replies saw only versions {seen:?}");

    for service in [trainer, predictor, registry] {
        service.stop().await;
    }
}
