//! The HTTP gateway against the real platform (registry, trainer, predictor,
//! monitor on a private `nats-server`): Open Inference Protocol conformance
//! checked with a published client (Python `tritonclient[http]`, run as a
//! subprocess: `tests/oip/conformance.py`), `/v1/predict` against
//! `ml.predict`, the OpenAPI document, metrics and limits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ml_tests::services::{self, Service};
use ml_tests::wait_for;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

const WAIT: Duration = Duration::from_secs(30);

/// An HTTP answer: status, headers (lower-case names) and body.
pub struct HttpReply {
    /// The status.
    pub status: u16,
    /// The headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpReply {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 exchange on a fresh connection (`Connection: close`),
/// bounded by 30 s.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpReply {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await?;
        Ok::<_, std::io::Error>(bytes)
    };
    let bytes = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("HTTP exchange in time")
        .expect("HTTP exchange");
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = bytes[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    HttpReply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = eol + 2;
        out.extend_from_slice(&data[start..start + size]);
        data = &data[start + size + 2..];
    }
}

/// Starts the gateway in-process on an ephemeral port; returns it and its address.
pub async fn gateway(url: &str, extra: &[&str]) -> (Service, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let mut args = vec!["gateway", "--nats-url", url, "--metadata-ttl", "100ms"];
    args.extend_from_slice(extra);
    let config = <gateway::Config as clap::Parser>::try_parse_from(args).expect("gateway flags");
    let service = Service::spawn("gateway", |s| gateway::serve(config, listener, s));
    (service, addr)
}

/// The platform with two versions: v1 (trained at start) and v2 (trained on
/// request, same data, promoted by the gate), v2 served.
pub struct Platform {
    /// Server, directory, data.
    pub bed: Bed,
    /// Registry, predictor, trainer, monitor.
    pub services: Vec<Service>,
    /// A plain client.
    pub client: async_nats::Client,
}

impl Platform {
    /// Starts it and waits until v2 is served.
    pub async fn start() -> Self {
        ml_tests::init_logging();
        let bed = Bed::new(2000, 11);
        let registry_dir = bed.dir.path().join("registry");
        let services = vec![
            services::registry(&bed.url, &registry_dir),
            services::predictor(&bed.url, &bed.data),
            services::trainer(&bed.url, &bed.data, "1h"),
            services::monitor(&bed.url, "1s"),
        ];
        let client = client(&bed.url).await;
        let probe = user_body(&bed.data, 0);
        wait_for("v1 served", WAIT, || async {
            let m = client
                .request("ml.predict", probe.clone().into())
                .await
                .ok()?;
            let v: Value = serde_json::from_slice(&m.payload).ok()?;
            (v["model_version"] == 1).then_some(())
        })
        .await;
        let trained = tokio::time::timeout(WAIT, client.request("ml.train", "".into()))
            .await
            .expect("train in time")
            .expect("train");
        let trained: Value = serde_json::from_slice(&trained.payload).unwrap();
        assert_eq!(trained["version"], 2, "{trained}");
        assert_eq!(trained["production"], true, "{trained}");
        wait_for("v2 served", WAIT, || async {
            let m = client
                .request("ml.predict", probe.clone().into())
                .await
                .ok()?;
            let v: Value = serde_json::from_slice(&m.payload).ok()?;
            (v["model_version"] == 2).then_some(())
        })
        .await;
        Self {
            bed,
            services,
            client,
        }
    }

    /// Stops every service.
    pub async fn stop(self) {
        for s in self.services {
            s.stop().await;
        }
    }
}

fn python() -> String {
    std::env::var("OIP_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

fn conformance_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oip/conformance.py")
}

/// Fails with the install command when the client library is missing.
fn require_tritonclient() {
    let out = std::process::Command::new(python())
        .args(["-c", "import numpy, tritonclient.http"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); install Python 3 and then: pip install 'tritonclient[http]'",
                python()
            )
        });
    assert!(
        out.status.success(),
        "the Open Inference Protocol conformance test needs Python's tritonclient: \
         pip install 'tritonclient[http]' (or run scripts/ci-python-deps.sh)\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn predict_features(client: &async_nats::Client, f1: f64, f2: f64) -> Value {
    let body = json!({ "features": { "feature_1": f1, "feature_2": f2 } }).to_string();
    request_json(client, "ml.predict", &body).await
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_oip_client_gets_ml_predicts_answers_and_the_protocols_errors() {
    require_tritonclient();
    let platform = Platform::start().await;
    let (gw, addr) = gateway(&platform.bed.url, &[]).await;
    wait_for("gateway ready", WAIT, || async {
        (http(&addr, "GET", "/v2/health/ready", &[], b"")
            .await
            .status
            == 200)
            .then_some(())
    })
    .await;

    let rows = read_rows(&platform.bed.data);
    let ids: Vec<String> = rows[..5].iter().map(|r| r.0.clone()).collect();
    let features: Vec<[f64; 2]> = vec![
        [0.3, 1.5],
        [-1.25, 7.0],
        [1.9, 0.125],
        [rows[7].1, rows[7].2],
    ];
    let cases = platform.bed.dir.path().join("cases.json");
    std::fs::write(
        &cases,
        json!({ "user_ids": ids, "features": features, "production": 2, "other_version": 1 })
            .to_string(),
    )
    .unwrap();
    let script = conformance_script();
    let output = tokio::process::Command::new(python())
        .arg(&script)
        .arg(&addr)
        .arg("mlplatform")
        .arg(&cases)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("the client finishes")
        .expect("run the client");
    assert!(
        output.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "client output is not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });

    // Health and metadata as the client read them.
    assert_eq!(seen["live"], true);
    assert_eq!(seen["ready"], true);
    assert_eq!(seen["model_ready"], true);
    assert_eq!(seen["version_ready"], true);
    assert_eq!(seen["other_version_ready"], false);
    assert_eq!(seen["server"]["name"], "mlplatform-gateway");
    let model = &seen["model"];
    assert_eq!(model["name"], "mlplatform");
    assert_eq!(model["versions"], json!(["1", "2"]));
    let input_names: Vec<&str> = model["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        input_names,
        ["feature_1", "feature_2", "user_id"],
        "{model}"
    );
    assert_eq!(model["inputs"][0]["datatype"], "FP64");
    assert_eq!(model["inputs"][0]["shape"], json!([-1]));
    assert_eq!(model["inputs"][2]["datatype"], "BYTES");
    assert_eq!(
        model["outputs"],
        json!([{"name":"prediction","datatype":"FP64","shape":[-1]}])
    );
    assert_eq!(model["parameters"]["kind"], "linear");
    assert_eq!(seen["version_metadata"]["parameters"]["version"], "2");

    // Predictions: the same numbers ml.predict gives for the same inputs.
    let client = &platform.client;
    let mut by_features = Vec::new();
    for [f1, f2] in &features {
        let reply = predict_features(client, *f1, *f2).await;
        assert_eq!(reply["model_version"], 2, "{reply}");
        by_features.push(reply["prediction"].as_f64().unwrap());
    }
    let mut by_features_f32 = Vec::new();
    for [f1, f2] in &features {
        let reply = predict_features(client, f64::from(*f1 as f32), f64::from(*f2 as f32)).await;
        by_features_f32.push(reply["prediction"].as_f64().unwrap());
    }
    let batch = request_json(
        client,
        "ml.predict",
        &json!({ "user_ids": ids }).to_string(),
    )
    .await;
    let by_user = floats(&batch["predictions"]);
    let single_user = request_json(
        client,
        "ml.predict",
        &json!({ "user_id": ids[0] }).to_string(),
    )
    .await;

    let infer = &seen["infer"];
    assert_eq!(
        floats(&infer["features_single_binary"]["prediction"]),
        by_features[..1]
    );
    assert_eq!(
        floats(&infer["features_batch_json"]["prediction"]),
        by_features
    );
    assert_eq!(infer["features_batch_json"]["id"], "batch-42");
    assert_eq!(
        floats(&infer["features_matrix_fp32"]["prediction"]),
        by_features_f32
    );
    assert_eq!(
        floats(&infer["user_single_binary"]["prediction"]),
        [single_user["prediction"].as_f64().unwrap()]
    );
    assert_eq!(infer["user_single_binary"]["id"], "u1");
    assert_eq!(floats(&infer["user_batch_json"]["prediction"]), by_user);
    assert_eq!(
        floats(&infer["user_batch_versioned"]["prediction"]),
        by_user
    );
    for case in infer.as_object().unwrap().values() {
        assert_eq!(case["model_version"], "2", "{case}");
        assert!(
            case["label"].is_null(),
            "a regression model has no label: {case}"
        );
    }

    // Errors: the protocol's status and a message that says what is wrong.
    let errors = &seen["errors"];
    for (case, status, needle) in [
        (
            "unknown_model_metadata",
            "404",
            "unknown model 'nosuchmodel'",
        ),
        ("unknown_model_infer", "404", "unknown model"),
        ("unknown_version_metadata", "404", "no version 999"),
        ("unknown_version_infer", "404", "no version 999"),
        ("other_version_infer", "400", "production version only"),
        ("wrong_datatype", "400", "INT32"),
        ("wrong_shape", "400", "expected [N] or [N, 1]"),
        ("mismatched_batches", "400", "different batch sizes"),
        ("matrix_wrong_width", "400", "expected [N, 2]"),
        ("unknown_input", "400", "unknown input 'feature_9'"),
        ("missing_input", "400", "missing input 'feature_2'"),
        ("unknown_user", "404", "nobody"),
        ("unknown_output", "400", "unknown output 'proba'"),
    ] {
        let e = &errors[case];
        assert_eq!(e["status"], status, "{case}: {e}");
        assert!(
            e["message"].as_str().is_some_and(|m| m.contains(needle)),
            "{case}: {e}"
        );
    }
    for (case, needle) in [
        ("raw_invalid_json", "invalid inference request"),
        ("raw_count_mismatch", "1 data elements"),
        ("raw_binary_overrun", "binary_data_size 16"),
    ] {
        let e = &errors[case];
        assert_eq!(e["status"], "400", "{case}: {e}");
        assert!(
            e["body"]["error"]
                .as_str()
                .is_some_and(|m| m.contains(needle)),
            "{case}: {e}"
        );
    }

    // The gateway kept serving through all of it.
    let r = http(&addr, "GET", "/v2/health/ready", &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    gw.stop().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_predict_mirrors_ml_predict_with_http_statuses_and_the_gateway_is_bounded() {
    let platform = Platform::start().await;
    let (gw, addr) = gateway(
        &platform.bed.url,
        &["--max-body", "4096", "--max-batch", "3"],
    )
    .await;
    let client = &platform.client;
    let rows = read_rows(&platform.bed.data);

    // The same JSON in, the same JSON out; errors with their status.
    for body in [
        json!({ "user_id": rows[3].0 }).to_string(),
        json!({ "user_ids": [rows[1].0, "nobody", rows[2].0] }).to_string(),
        json!({ "features": { "feature_1": 0.5, "feature_2": 2.0 } }).to_string(),
    ] {
        let direct = request_json(client, "ml.predict", &body).await;
        let r = http(
            &addr,
            "POST",
            "/v1/predict",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), direct, "{body}");
    }
    for (body, status, code) in [
        (r#"{"user_id":"nobody"}"#, 404, "unknown_user"),
        ("{not json", 400, "bad_request"),
        ("", 400, "bad_request"),
        (r#"{"features":{"feature_1":1}}"#, 400, "bad_request"),
    ] {
        let direct = request_json(client, "ml.predict", body).await;
        let r = http(&addr, "POST", "/v1/predict", &[], body.as_bytes()).await;
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert_eq!(r.json(), direct, "{body}");
        assert_eq!(r.json()["error"]["code"], code);
    }

    // Bounded: a body over GATEWAY_MAX_BODY is 413 with a structured error,
    // on both APIs; a batch over GATEWAY_MAX_BATCH is 400.
    let big = vec![b' '; 5000];
    let r = http(&addr, "POST", "/v1/predict", &[], &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "bad_request");
    let r = http(&addr, "POST", "/v2/models/mlplatform/infer", &[], &big).await;
    assert_eq!(r.status, 413);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("GATEWAY_MAX_BODY"));
    let four = json!({"inputs":[{"name":"user_id","shape":[4],"datatype":"BYTES","data":["a","b","c","d"]}]});
    let r = http(
        &addr,
        "POST",
        "/v2/models/mlplatform/infer",
        &[],
        four.to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"].as_str().unwrap().contains("at most 3"),
        "{}",
        r.text()
    );
    let r = http(&addr, "GET", "/no/such/thing", &[], b"").await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("no such endpoint"));

    // Binary outputs on request, with the extension's header.
    let req = json!({
        "inputs":[{"name":"user_id","shape":[2],"datatype":"BYTES","data":[rows[1].0, rows[2].0]}],
        "parameters":{"binary_data_output":true}
    });
    let r = http(
        &addr,
        "POST",
        "/v2/models/mlplatform/infer",
        &[],
        req.to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let json_len: usize = r
        .header("inference-header-content-length")
        .expect("binary output header")
        .parse()
        .unwrap();
    let head: Value = serde_json::from_slice(&r.body[..json_len]).unwrap();
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 16);
    let values: Vec<f64> = r.body[json_len..]
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let direct = request_json(
        client,
        "ml.predict",
        &json!({ "user_ids": [rows[1].0, rows[2].0] }).to_string(),
    )
    .await;
    assert_eq!(values, floats(&direct["predictions"]));

    // The registry and monitor listings pass through.
    let models = http(&addr, "GET", "/v1/models", &[], b"").await.json();
    assert_eq!(models["production"], 2, "{models}");
    let runs = http(&addr, "GET", "/v1/runs", &[], b"").await.json();
    assert!(runs["runs"].as_array().unwrap().len() >= 2, "{runs}");
    let history = http(&addr, "GET", "/v1/history", &[], b"").await.json();
    assert!(!history["moves"].as_array().unwrap().is_empty());
    let stats = http(&addr, "GET", "/v1/stats", &[], b"").await;
    assert_eq!(stats.status, 200, "{}", stats.text());
    assert!(stats.json()["total"]["count"].as_u64().is_some());

    // The OpenAPI document names every route the gateway serves.
    let doc = http(&addr, "GET", "/openapi.json", &[], b"").await.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let gateway_src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../services/gateway/src");
    let mut routes = Vec::new();
    for file in ["lib.rs", "console/mod.rs"] {
        let text = std::fs::read_to_string(gateway_src.join(file)).unwrap();
        for piece in text.split(".route(").skip(1) {
            let path = piece.trim_start().trim_start_matches('"');
            routes.push(path[..path.find('"').unwrap()].to_owned());
        }
    }
    assert!(routes.len() >= 25, "{routes:?}");
    for route in &routes {
        assert!(
            doc["paths"].get(route).is_some(),
            "{route} is not in /openapi.json"
        );
    }

    // Metrics by route pattern, never by raw path.
    let metrics = http(&addr, "GET", "/metrics", &[], b"").await.text();
    assert!(
        metrics.contains(
            r#"gateway_http_requests_total{route="/v1/predict",method="POST",status="404"}"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"route="/v2/models/{name}/infer""#),
        "{metrics}"
    );
    assert!(metrics.contains("gateway_infer_rows_total 2"), "{metrics}");
    assert!(!metrics.contains("/no/such/thing"));

    // No predictor: 503 at once, not a timeout; readiness holds while a
    // production model exists (the registry says so) and NATS is up.
    let mut services = platform.services;
    let predictor = services.remove(1);
    predictor.stop().await;
    let r = http(
        &addr,
        "POST",
        "/v1/predict",
        &[],
        br#"{"features":{"feature_1":1,"feature_2":1}}"#,
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "unavailable");
    let r = http(
        &addr,
        "POST",
        "/v2/models/mlplatform/infer",
        &[],
        four.to_string()
            .replace("[4]", "[1]")
            .replace(r#","b","c","d""#, "")
            .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("predictor is unavailable"));

    gw.stop().await;
    for s in services {
        s.stop().await;
    }
}
