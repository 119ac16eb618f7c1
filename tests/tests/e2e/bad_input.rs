//! Bad input over NATS: every malformed request, model artifact or data
//! file gets a structured error with a reason, and the next valid request
//! succeeds.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ml_shared::codec;
use ml_shared::messages::{ModelRelease, Submission};
use ml_shared::model::{ModelArtifact, ModelKind};
use ml_tests::services::{self, Process};
use ml_tests::{wait_for, NatsServer};
use serde_json::Value;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(15);

/// Sends `body` and returns the reply's JSON.
async fn ask(client: &async_nats::Client, body: Vec<u8>) -> Value {
    let m = request(client, "ml.predict", body).await;
    serde_json::from_slice(&m.payload).expect("JSON reply")
}

fn nested(depth: usize) -> Vec<u8> {
    let mut body = br#"{"user_id":"#.to_vec();
    body.extend(std::iter::repeat_n(b'[', depth));
    body.extend(std::iter::repeat_n(b']', depth));
    body.push(b'}');
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_predict_request_gets_a_structured_error_and_the_next_succeeds() {
    ml_tests::init_logging();
    let Bed {
        nats: _nats,
        url,
        dir,
        data,
    } = Bed::new(200, 21);
    let registry = services::registry(&url, &dir.path().join("registry"), &data);
    let trainer = services::trainer(&url, &data, "1h");
    let predictor = services::predictor_with(&url, &data, &["--predict-max-bytes", "262144"]);
    let client = client(&url).await;
    let good = user_body(&data, 0);
    wait_for("version 1 served", WAIT, || async {
        let m = client
            .request("ml.predict", good.clone().into())
            .await
            .ok()?;
        let v: Value = serde_json::from_slice(&m.payload).ok()?;
        v["model_version"].as_u64()
    })
    .await;

    let mut over_limit = br#"{"user_id":""#.to_vec();
    over_limit.extend(std::iter::repeat_n(b'a', 300_000));
    over_limit.extend(br#""}"#);
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "invalid JSON",
            b"{not json".to_vec(),
            "bad_request",
            "invalid request",
        ),
        ("empty", Vec::new(), "bad_request", "empty request"),
        ("blank", b" \n ".to_vec(), "bad_request", "empty request"),
        (
            "non-UTF-8",
            b"{\"user_id\":\"\xff\xfe\"}".to_vec(),
            "bad_request",
            "invalid request",
        ),
        (
            "raw non-UTF-8",
            b"\xc3\x28\xa0\xa1".to_vec(),
            "bad_request",
            "invalid request",
        ),
        (
            "missing fields",
            b"{}".to_vec(),
            "bad_request",
            "exactly one",
        ),
        (
            "both forms",
            br#"{"user_id":"a","features":{}}"#.to_vec(),
            "bad_request",
            "exactly one",
        ),
        (
            "extra field",
            br#"{"user_id":"a","x":1}"#.to_vec(),
            "bad_request",
            "unknown field",
        ),
        (
            "wrong type of user_id",
            br#"{"user_id":5}"#.to_vec(),
            "bad_request",
            "invalid type",
        ),
        (
            "wrong type of features",
            br#"{"features":[1,2]}"#.to_vec(),
            "bad_request",
            "invalid type",
        ),
        (
            "string feature",
            br#"{"features":{"feature_1":"1","feature_2":2}}"#.to_vec(),
            "bad_request",
            "invalid type",
        ),
        ("array body", b"[]".to_vec(), "bad_request", "exactly one"),
        (
            "array of values",
            br#"["a", 1]"#.to_vec(),
            "bad_request",
            "invalid",
        ),
        (
            "missing feature",
            br#"{"features":{"feature_1":1}}"#.to_vec(),
            "bad_request",
            "missing feature",
        ),
        (
            "unknown feature",
            br#"{"features":{"feature_1":1,"feature_2":2,"zzz":3}}"#.to_vec(),
            "bad_request",
            "unknown feature",
        ),
        (
            "derived feature",
            br#"{"features":{"feature_1":1,"feature_2":2,"feature_3":1}}"#.to_vec(),
            "bad_request",
            "derived",
        ),
        (
            "NaN as a string",
            br#"{"features":{"feature_1":"NaN","feature_2":2}}"#.to_vec(),
            "bad_request",
            "invalid type",
        ),
        (
            "NaN bare",
            br#"{"features":{"feature_1":NaN,"feature_2":2}}"#.to_vec(),
            "bad_request",
            "invalid request",
        ),
        (
            "infinity as a string",
            br#"{"features":{"feature_1":"inf","feature_2":2}}"#.to_vec(),
            "bad_request",
            "invalid type",
        ),
        (
            "huge number",
            br#"{"features":{"feature_1":1e999,"feature_2":2}}"#.to_vec(),
            "bad_request",
            "",
        ),
        (
            "huge negative number",
            br#"{"features":{"feature_1":-1e999,"feature_2":2}}"#.to_vec(),
            "bad_request",
            "",
        ),
        (
            "overflowing prediction",
            br#"{"features":{"feature_1":1e300,"feature_2":2}}"#.to_vec(),
            "bad_request",
            "non-finite",
        ),
        (
            "unknown user",
            br#"{"user_id":"nobody"}"#.to_vec(),
            "unknown_user",
            "nobody",
        ),
        (
            "deeply nested JSON",
            nested(100_000),
            "bad_request",
            "invalid",
        ),
        (
            "deeply nested top level",
            "[".repeat(100_000).into_bytes(),
            "bad_request",
            "invalid",
        ),
        (
            "nested under an unknown key",
            format!(r#"{{"x":{}1{}}}"#, "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
            "bad_request",
            "invalid request",
        ),
        (
            "payload over the predictor's limit",
            over_limit,
            "bad_request",
            "exceeds the limit",
        ),
    ];
    for (what, body, code, reason) in cases {
        let reply = ask(&client, body).await;
        assert_eq!(reply["error"]["code"], code, "{what}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(reason),
            "{what}: {message:?} lacks {reason:?}"
        );
        let next = ask(&client, good.clone().into_bytes()).await;
        assert_eq!(next["model_version"], 1, "after {what}: {next}");
    }

    // Past NATS' max_payload (1 MiB here): the client refuses to send it...
    let huge = vec![b' '; 2 << 20];
    let error = client
        .request("ml.predict", huge.into())
        .await
        .expect_err("over max_payload");
    assert!(error.to_string().contains("payload"), "{error}");
    // ...and the server refuses it from a client that tries anyway.
    let refused = raw_publish_over_limit(&url, 2 << 20);
    assert!(refused.contains("Maximum Payload"), "{refused}");
    let next = ask(&client, good.clone().into_bytes()).await;
    assert_eq!(next["model_version"], 1, "after oversized payloads: {next}");

    for service in [predictor, trainer, registry] {
        service.stop().await;
    }
}

/// Speaks the NATS protocol by hand to publish `size` bytes, and returns
/// what the server answered.
fn raw_publish_over_limit(url: &str, size: usize) -> String {
    let addr = url.trim_start_matches("nats://");
    let mut tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).expect("INFO");
    assert!(
        buf[..n].starts_with(b"INFO"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let mut out =
        format!("CONNECT {{\"verbose\":false}}\r\nPUB ml.predict {size}\r\n").into_bytes();
    out.extend(std::iter::repeat_n(b'x', size));
    out.extend(b"\r\n");
    // The server may close the connection before it has read everything.
    let _ = tcp.write_all(&out);
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn artifact() -> ModelArtifact {
    ModelArtifact {
        kind: ModelKind::Linear,
        feature_names: ["feature_1", "feature_2", "feature_3"]
            .map(String::from)
            .into(),
        coefficients: vec![1.0, 2.0, 3.0],
        intercept: 0.5,
        scaler: None,
        profile: None,
        onnx: None,
    }
}

/// Bad encodings of a message carrying an artifact (`encode` wraps and
/// encodes it), each with the reason it must be refused for.
fn bad_encodings(
    encode: impl Fn(ModelArtifact) -> Vec<u8>,
) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let good = encode(artifact());
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x10;
    let mut version = good.clone();
    version[8] = 7;
    let mut wrong_count = artifact();
    wrong_count.coefficients.pop();
    let mut nan = artifact();
    nan.coefficients[1] = f64::NAN;
    let mut infinite = artifact();
    infinite.intercept = f64::INFINITY;
    vec![
        ("truncated", good[..good.len() - 5].to_vec(), "truncated"),
        ("bit-flipped", flipped, "checksum mismatch"),
        (
            "unknown format version",
            version,
            "unsupported format version 7",
        ),
        (
            "foreign bytes",
            b"definitely not a model".to_vec(),
            "truncated",
        ),
        (
            "wrong feature count",
            encode(wrong_count),
            "2 coefficients for 3 features",
        ),
        (
            "NaN weight",
            encode(nan),
            "coefficient of feature_2 is not finite",
        ),
        (
            "infinite intercept",
            encode(infinite),
            "intercept is not finite",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_model_artifacts_are_refused_by_the_registry_and_by_predictors() {
    ml_tests::init_logging();
    let Bed {
        nats: _nats,
        url,
        dir,
        data,
    } = Bed::new(200, 22);
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
        ],
        &log,
    );
    let client = client(&url).await;
    let body = user_body(&data, 0);
    let served = || async {
        let m = client
            .request("ml.predict", body.clone().into())
            .await
            .ok()?;
        let v: Value = serde_json::from_slice(&m.payload).ok()?;
        v["model_version"].as_u64()
    };
    wait_for("version 1 served", WAIT, || async {
        served().await.filter(|&v| v == 1)
    })
    .await;
    let run = request_json(&client, "ml.registry.runs", "").await;
    assert_eq!(run["runs"].as_array().unwrap().len(), 1);

    // At the registry: each is refused with its reason; nothing is stored.
    let submission = |artifact: ModelArtifact| {
        let mut run: ml_shared::messages::RunRecord = trainer_run(&artifact);
        run.feature_names = artifact.feature_names.clone();
        Submission { run, artifact }
    };
    for (what, bytes, reason) in bad_encodings(|a| codec::encode(&submission(a))) {
        let m = request(&client, "ml.registry.submit", bytes).await;
        let reply: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(reply["error"]["code"], "bad_request", "{what}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(reason),
            "{what}: {message:?} lacks {reason:?}"
        );
    }
    let models = request_json(&client, "ml.registry.models", "").await;
    assert_eq!(models["models"].as_array().unwrap().len(), 1, "{models}");
    assert_eq!(models["production"], 1);

    // At the predictor: published directly (as a faulty or hostile
    // publisher would), each under a higher epoch than anything served.
    // Published under the serving registry's identity: a release of
    // another registry would be taken whatever its epoch.
    let registry_id = registry_id(&dir.path().join("registry"));
    let release = |artifact: ModelArtifact| ModelRelease {
        version: 66,
        epoch: 100,
        registry_id: registry_id.clone(),
        artifact,
        routing: None,
    };
    for (_, bytes, _) in bad_encodings(|a| codec::encode(&release(a))) {
        client
            .publish("ml.model.production", bytes.into())
            .await
            .unwrap();
    }
    // A good release with a lower epoch than the bad ones: served only if
    // none of them was installed, and, being later on the same subject, it
    // shows they have all been handled.
    let marker = ModelRelease {
        version: 99,
        epoch: 50,
        registry_id: registry_id.clone(),
        artifact: artifact(),
        routing: None,
    };
    assert_eq!(served().await, Some(1), "still version 1");
    client
        .publish("ml.model.production", codec::encode(&marker).into())
        .await
        .unwrap();
    wait_for("the marker model served", WAIT, || async {
        served().await.filter(|&v| v == 99)
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    for reason in [
        "truncated",
        "checksum mismatch",
        "unsupported format version 7",
        "2 coefficients for 3 features",
        "coefficient of feature_2 is not finite",
        "intercept is not finite",
    ] {
        assert!(
            text.contains(reason),
            "predictor log lacks {reason:?}:\n{text}"
        );
    }
    drop(predictor);
    for service in [trainer, registry] {
        service.stop().await;
    }
}

/// A plausible run record for `artifact`.
fn trainer_run(artifact: &ModelArtifact) -> ml_shared::messages::RunRecord {
    ml_shared::messages::RunRecord {
        run_id: "run-bad".into(),
        started_ms: 0,
        duration_ms: 1,
        params: ml_shared::messages::TrainParams {
            model: "linear".into(),
            seed: 1,
            validation_fraction: 0.2,
        },
        metrics: ml_shared::messages::Metrics::regression(0.1, 0.1, 0.9),
        rows_train: 8,
        rows_validation: 2,
        data_path: "d.csv".into(),
        data_fingerprint: "sha256:00".into(),
        feature_names: artifact.feature_names.clone(),
    }
}

/// The trainer's failed runs on bad data. When failed runs are recorded by
/// the registry, this is the test to extend with that record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_data_file_fails_the_run_with_line_and_reason_and_promotes_nothing() {
    ml_tests::init_logging();
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = ml_tests::temp_dir();
    let data = dir.path().join("users.csv");
    let registry = services::registry(&url, &dir.path().join("registry"), &data);
    let trainer = services::trainer(&url, &data, "0");
    let client = client(&url).await;
    let header = "user_id,feature_1,feature_2,target\n";
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "missing column",
            "user_id,feature_1,target\na,1,2\n".into(),
            &["users.csv", "missing column \"feature_2\""],
        ),
        (
            "bad number",
            format!("{header}a,1,2,3\nb,1,x2,4\n"),
            &["users.csv:3", "feature_2"],
        ),
        (
            "duplicate user id",
            format!("{header}a,1,2,3\nb,1,2,4\na,2,2,2\n"),
            &["users.csv:4", "duplicate", "line 2"],
        ),
        (
            "empty file",
            String::new(),
            &["users.csv", "missing column \"user_id\""],
        ),
        ("header only", header.into(), &["users.csv", "no data rows"]),
        (
            "NaN feature",
            format!("{header}a,NaN,2,3\nb,1,2,4\n"),
            &["users.csv:2", "feature_1"],
        ),
    ];
    ml_tests::registry_answers(&client, WAIT).await;
    wait_for("trainer subscribed", WAIT, || async {
        client.request("ml.train", "".into()).await.ok()
    })
    .await;
    for (what, text, expected) in cases {
        std::fs::write(&data, text).unwrap();
        let reply = request_json(&client, "ml.train", "").await;
        assert_eq!(reply["error"]["code"], "bad_request", "{what}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        for part in expected {
            assert!(message.contains(part), "{what}: {message:?} lacks {part:?}");
        }
        let models = request_json(&client, "ml.registry.models", "").await;
        assert_eq!(models["models"], Value::Array(vec![]), "{what}: {models}");
        assert_eq!(models["production"], Value::Null, "{what}");
    }
    // The same trainer trains once the data is good.
    write_data(&data, 100, 23);
    let reply = request_json(&client, "ml.train", "").await;
    assert_eq!(reply["version"], 1, "{reply}");
    for service in [trainer, registry] {
        service.stop().await;
    }
}

/// A run that fails while no registry runs is reported once one does: the
/// trainer keeps the report and sends it before its next run, and the
/// experiments log holds it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_fails_while_the_registry_is_down_is_logged_when_it_is_back() {
    ml_tests::init_logging();
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = ml_tests::temp_dir();
    let data = dir.path().join("users.csv");
    let trainer = services::trainer(&url, &data, "0");
    let client = client(&url).await;
    std::fs::write(&data, "user_id,feature_1,feature_2,target\na,1,x,3\n").unwrap();
    let failed = wait_for("the trainer answers", WAIT, || async {
        let reply = client.request("ml.train", "".into()).await.ok()?;
        serde_json::from_slice::<Value>(&reply.payload).ok()
    })
    .await;
    assert_eq!(failed["error"]["code"], "bad_request", "{failed}");

    let registry = services::registry(&url, &dir.path().join("registry"), &data);
    ml_tests::registry_answers(&client, WAIT).await;
    write_data(&data, 100, 23);
    let reply = request_json(&client, "ml.train", "").await;
    assert_eq!(reply["version"], 1, "{reply}");
    let runs = wait_for("the failed run in the log", WAIT, || async {
        let runs = request_json(&client, "ml.registry.runs", "").await;
        (runs["runs"].as_array()?.len() == 2).then_some(runs)
    })
    .await;
    let failed: Vec<&Value> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{runs}");
    let reason = failed[0]["reason"].as_str().unwrap();
    assert!(reason.contains("users.csv:2"), "{reason}");
    for service in [trainer, registry] {
        service.stop().await;
    }
}
