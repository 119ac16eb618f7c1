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
        // Read to the end of the body (some servers keep the connection
        // open despite `Connection: close`).
        let mut bytes = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&buf[..n]);
            if complete(&bytes) {
                break;
            }
        }
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

/// Whether `bytes` hold a whole response (by Content-Length, or the last chunk).
fn complete(bytes: &[u8]) -> bool {
    let Some(split) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&bytes[..split]).to_ascii_lowercase();
    let body = &bytes[split + 4..];
    if let Some(len) = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == "content-length")
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
    {
        return body.len() >= len;
    }
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    false
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
            services::registry(&bed.url, &registry_dir, &bed.data),
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
        // Each reply has its own request_id; everything else is the same.
        let (mut via_http, mut direct) = (r.json(), direct);
        let ids = [&mut via_http, &mut direct].map(|v| {
            v.as_object_mut()
                .and_then(|o| o.remove("request_id"))
                .and_then(|id| id.as_str().map(str::to_owned))
                .expect("a request_id")
        });
        assert_ne!(ids[0], ids[1], "request ids are unique");
        assert_eq!(via_http, direct, "{body}");
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

    // With GATEWAY_CONSOLE_PRIVATE the read-only pages want a session too;
    // the APIs stay as they are.
    let (private, private_addr) = gateway(
        &platform.bed.url,
        &["--console-private", "true", "--operators", "bob:pw"],
    )
    .await;
    let r = http(&private_addr, "GET", "/models", &[], b"").await;
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/login"));
    let signed = sign_in(&private_addr, "bob", "pw").await;
    let cookie = signed
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let r = http(
        &private_addr,
        "GET",
        "/runs",
        &[("Cookie", cookie.as_str())],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("signed in as <b>bob</b>"));
    private.stop().await;

    // Requests in progress are bounded (503 busy at once beyond), and one
    // that does not finish in GATEWAY_REQUEST_TIMEOUT is answered 504: a
    // client that sends a head and only part of its body holds a request.
    let (small, small_addr) = gateway(
        &platform.bed.url,
        &["--max-requests", "1", "--http-timeout", "1s"],
    )
    .await;
    // The held request and the probe race to the one permit: when the
    // probe wins, the held request is the one refused; try again.
    let mut attempts = 0;
    let (mut stalled, busy) = loop {
        attempts += 1;
        assert!(attempts <= 20, "the held request never held the permit");
        let mut stalled = tokio::net::TcpStream::connect(&small_addr).await.unwrap();
        stalled
            .write_all(
                format!(
                    "POST /v1/predict HTTP/1.1\r\nHost: {small_addr}\r\nContent-Length: 100\r\n\r\n{{\"user"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = http(&small_addr, "GET", "/v1/models", &[], b"").await;
        if r.status == 503 {
            break (stalled, r);
        }
        // (hyper may keep the connection open: one read, not to the end)
        let mut refused = vec![0u8; 4096];
        let n = tokio::time::timeout(WAIT, stalled.read(&mut refused))
            .await
            .expect("the refused request is answered")
            .unwrap();
        assert!(
            refused[..n].starts_with(b"HTTP/1.1 503"),
            "{}",
            String::from_utf8_lossy(&refused[..n])
        );
    };
    assert_eq!(busy.json()["error"]["code"], "busy", "{}", busy.text());
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stalled.read_to_end(&mut answer))
        .await
        .expect("the stalled request is answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("GATEWAY_REQUEST_TIMEOUT"), "{answer}");
    let r = http(&small_addr, "GET", "/v1/models", &[], b"").await;
    assert_eq!(r.status, 200, "free again: {}", r.text());
    small.stop().await;

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

// ---------------------------------------------------------------------------
// The console in headless Chromium, driven over the W3C WebDriver protocol
// (Debian's `chromium` and `chromium-driver`; scripts/ci-browser-deps.sh).

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session.
struct Browser {
    driver: std::process::Child,
    addr: String,
    session: String,
    shots: PathBuf,
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

impl Browser {
    async fn start() -> Self {
        let install = "the console tests need Chromium and its WebDriver: \
                       apt-get install chromium chromium-driver (or run scripts/ci-browser-deps.sh)";
        let driver_bin = std::env::var_os("CHROMEDRIVER")
            .map(PathBuf::from)
            .or_else(|| which("chromedriver"))
            .unwrap_or_else(|| panic!("chromedriver not found; {install}"));
        let chromium = std::env::var_os("CHROMIUM")
            .map(PathBuf::from)
            .or_else(|| which("chromium"))
            .or_else(|| which("chromium-browser"))
            .unwrap_or_else(|| panic!("chromium not found; {install}"));
        let port = ml_tests::prometheus::free_port();
        let driver = std::process::Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr = format!("127.0.0.1:{port}");
        wait_for("chromedriver ready", WAIT, || async {
            let connected = tokio::net::TcpStream::connect(&addr).await.is_ok();
            if !connected {
                return None;
            }
            let r = http(&addr, "GET", "/status", &[], b"").await;
            (r.json()["value"]["ready"] == true).then_some(())
        })
        .await;
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000"]
            }
        }}});
        let r = http(
            &addr,
            "POST",
            "/session",
            &[("Content-Type", "application/json")],
            caps.to_string().as_bytes(),
        )
        .await;
        let session = r.json()["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {}", r.text()))
            .to_owned();
        let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
        std::fs::create_dir_all(&shots).expect("screenshot directory");
        Self {
            driver,
            addr,
            session,
            shots,
        }
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let (status, v) = self.call_status(method, path, body).await;
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    /// A WebDriver call's status and whole reply.
    async fn call_status(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let path = format!("/session/{}{path}", self.session);
        let body = if method == "GET" {
            String::new()
        } else {
            body.to_string()
        };
        let r = http(
            &self.addr,
            method,
            &path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await;
        (r.status, r.json())
    }

    /// Calls `action` on the element `css` names, finding it again
    /// when a page update replaced it in between ("stale element
    /// reference": the live panels re-render).
    async fn on_element(&self, css: &str, method: &str, action: &str, body: Value) -> Value {
        for _ in 0..10 {
            let id = self.find(css).await;
            let path = format!("/element/{id}{action}");
            let (status, v) = self.call_status(method, &path, body.clone()).await;
            if status == 200 {
                return v["value"].clone();
            }
            assert_eq!(
                v["value"]["error"], "stale element reference",
                "{method} {path}: {v}"
            );
        }
        panic!("{css}: the element kept being replaced");
    }

    async fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url })).await;
    }

    async fn eval(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                "POST",
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        v[ELEMENT].as_str().expect("an element id").to_owned()
    }

    async fn text(&self, css: &str) -> String {
        self.on_element(css, "GET", "/text", Value::Null)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn click(&self, css: &str) {
        self.on_element(css, "POST", "/click", json!({})).await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call("POST", &format!("/element/{id}/clear"), json!({}))
            .await;
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn screenshot(&self, name: &str) {
        let data = self.call("GET", "/screenshot", Value::Null).await;
        let png = base64_decode(data.as_str().expect("base64 PNG"));
        std::fs::write(self.shots.join(format!("{name}.png")), png).expect("write screenshot");
    }

    async fn stop(mut self) {
        let path = format!("/session/{}", self.session);
        let _ = http(&self.addr, "DELETE", &path, &[], b"").await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let digits: Vec<u32> = text.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, d)| acc | (d << (18 - 6 * i)));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    out
}

/// Signs in over plain HTTP; returns the session cookie (`name=value`).
async fn sign_in(addr: &str, name: &str, password: &str) -> HttpReply {
    let body = format!("name={name}&password={password}");
    http(
        addr,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    )
    .await
}

#[test]
fn the_console_in_chromium_lists_filters_traces_lineage_and_lets_only_an_operator_promote() {
    // On a thread with a large stack: the scenario's poll function, in a
    // debug build, needs more than a test thread's 2 MiB.
    std::thread::Builder::new()
        .name("console-scenario".into())
        .stack_size(64 << 20)
        .spawn(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(console_scenario())
        })
        .expect("spawn the scenario")
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
}

async fn console_scenario() {
    let platform = Platform::start().await;
    let (gw, addr) = gateway(
        &platform.bed.url,
        &[
            "--operators",
            "alice:open-sesame",
            "--live-interval",
            "200ms",
        ],
    )
    .await;
    let base = format!("http://{addr}");
    let browser = Browser::start().await;
    let models: Value = http(&addr, "GET", "/v1/models", &[], b"").await.json();
    let v1_run = models["models"][0]["run_id"].as_str().unwrap().to_owned();

    // Models: both versions, v2 production, no action for an anonymous viewer.
    browser.goto(&format!("{base}/models")).await;
    let versions = browser
        .eval("return Array.from(document.querySelectorAll('#models tbody tr')).map(r => r.dataset.version)")
        .await;
    assert_eq!(versions, json!(["2", "1"]));
    assert_eq!(browser.text("#production").await, "v2");
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('form.promote').length")
            .await,
        0
    );
    assert!(browser
        .text("#models tbody tr.production")
        .await
        .contains("production"));
    browser.screenshot("models").await;

    // Compare a metric across versions.
    browser.goto(&format!("{base}/models?compare=rmse")).await;
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('#chart rect').length")
            .await,
        2
    );
    browser.screenshot("models-compare-rmse").await;

    // Runs: sorting by a header, filtering like `mlctl runs --where`, CSV.
    browser.goto(&format!("{base}/runs")).await;
    let column =
        "Array.from(document.querySelectorAll('#runs tbody tr')).map(r => r.cells[1].textContent)";
    browser.click("#runs thead th:nth-child(2)").await;
    assert_eq!(
        browser.eval(&format!("return {column}")).await,
        json!(["v1", "v2"])
    );
    browser.click("#runs thead th:nth-child(2)").await;
    assert_eq!(
        browser.eval(&format!("return {column}")).await,
        json!(["v2", "v1"])
    );
    browser.type_into("#where", "version == 1").await;
    browser.click("#runs-filter button").await;
    wait_for("filtered runs", WAIT, || async {
        (browser.text("#run-count").await == "1").then_some(())
    })
    .await;
    assert_eq!(
        browser.eval(&format!("return {column}")).await,
        json!(["v1"])
    );
    browser.screenshot("runs-filtered").await;
    let csv = http(
        &addr,
        "GET",
        "/runs.csv?where=version%20%3D%3D%201",
        &[],
        b"",
    )
    .await;
    assert_eq!(csv.status, 200);
    assert!(csv.header("content-type").unwrap().starts_with("text/csv"));
    let lines: Vec<&str> = csv
        .body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{}", csv.text());
    assert!(lines[0].starts_with("timestamp,version,run_id,status"));
    assert!(lines[1].contains(&v1_run));
    let bad = http(
        &addr,
        "GET",
        "/runs.csv?where=nosuchcolumn%20%3E%201",
        &[],
        b"",
    )
    .await;
    assert_eq!(bad.status, 400);

    // Lineage of v1: its run, its data, the alias moves naming it.
    browser.goto(&format!("{base}/versions/1")).await;
    assert!(browser.text("#lineage-run").await.contains(&v1_run));
    assert!(browser.text("#lineage-data").await.contains("sha256:"));
    let moves = browser.text("#moves").await;
    assert!(
        moves.contains("gate") && moves.contains("register"),
        "{moves}"
    );
    browser.screenshot("lineage-v1").await;

    // An anonymous action is refused; so is a signed-in one without the
    // form's CSRF token, or from another origin.
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let r = http(
        &addr,
        "POST",
        "/console/promote",
        &form,
        b"version=1&reason=x&csrf=x",
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    let wrong = sign_in(&addr, "alice", "wrong").await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.header("set-cookie").is_none());
    let ok = sign_in(&addr, "alice", "open-sesame").await;
    assert_eq!(ok.status, 303);
    let cookie = ok
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(ok
        .header("set-cookie")
        .unwrap()
        .contains("HttpOnly; SameSite=Strict"));
    let with_cookie = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Cookie", cookie.as_str()),
    ];
    let r = http(
        &addr,
        "POST",
        "/console/promote",
        &with_cookie,
        b"version=1&reason=x&csrf=forged",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let page = http(&addr, "GET", "/models", &[("Cookie", cookie.as_str())], b"")
        .await
        .text();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    let foreign = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Cookie", cookie.as_str()),
        ("Origin", "http://evil.example"),
    ];
    let r = http(
        &addr,
        "POST",
        "/console/promote",
        &foreign,
        format!("version=1&reason=x&csrf={csrf}").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let history: Value = http(&addr, "GET", "/v1/history", &[], b"").await.json();
    assert!(
        history["moves"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["action"] != "promote"),
        "a refused action moved nothing: {history}"
    );

    // The operator signs in in the browser and promotes v1; predictions switch.
    browser.goto(&format!("{base}/login")).await;
    browser.type_into("#name", "alice").await;
    browser.type_into("#password", "open-sesame").await;
    browser.click("#login-button").await;
    wait_for("signed in", WAIT, || async {
        browser
            .text("#operator")
            .await
            .contains("alice")
            .then_some(())
    })
    .await;
    browser.screenshot("models-operator").await;
    browser
        .type_into(
            "tr[data-version='1'] form.promote input[name='reason']",
            "canary looked better",
        )
        .await;
    browser
        .click("tr[data-version='1'] form.promote button")
        .await;
    wait_for("promoted", WAIT, || async {
        let moved = browser
            .eval("return document.getElementById('moved')?.textContent ?? ''")
            .await;
        moved
            .as_str()
            .filter(|t| t.contains("v2 → v1"))
            .map(str::to_owned)
    })
    .await;
    browser.screenshot("promoted").await;
    let probe = user_body(&platform.bed.data, 0);
    wait_for("v1 served again", WAIT, || async {
        let m = platform
            .client
            .request("ml.predict", probe.clone().into())
            .await
            .ok()?;
        let v: Value = serde_json::from_slice(&m.payload).ok()?;
        (v["model_version"] == 1).then_some(())
    })
    .await;
    browser.goto(&format!("{base}/history")).await;
    let latest = browser.text("#history tbody tr:first-child").await;
    assert!(
        latest.contains("promote")
            && latest.contains("alice")
            && latest.contains("canary looked better"),
        "{latest}"
    );
    browser.screenshot("history").await;

    // The live panel follows the monitor under load.
    let load = {
        let client = platform.client.clone();
        let body = probe.clone();
        tokio::spawn(async move {
            loop {
                let _ = client.request("ml.predict", body.clone().into()).await;
            }
        })
    };
    browser.goto(&format!("{base}/live")).await;
    wait_for("live panel updated under load", WAIT, || async {
        let v = browser
            .eval("return [Number(document.body.dataset.updates ?? 0), document.getElementById('count').textContent, document.querySelector('#versions tbody')?.textContent ?? '']")
            .await;
        let updates = v[0].as_u64().unwrap_or(0);
        let count: u64 = v[1].as_str().and_then(|c| c.parse().ok()).unwrap_or(0);
        (updates >= 3 && count > 0 && v[2].as_str().unwrap_or("").contains("v1")).then_some(())
    })
    .await;
    browser.screenshot("live").await;
    load.abort();

    browser.stop().await;
    gw.stop().await;
    platform.stop().await;
}

// ---------------------------------------------------------------------------
// `mlctl top` in a real terminal: tmux, 80×24.

fn tmux(socket: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("tmux")
        .arg("-L")
        .arg(socket)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run tmux ({e}): apt-get install tmux"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlctl_top_shows_throughput_and_the_serving_version_under_load_and_quits_on_q() {
    let platform = Platform::start().await;
    let mlctl = ml_tests::services::binary("mlctl");
    let socket = format!("mlctl-top-{}", std::process::id());
    let command = format!(
        "env NATS_URL={} {} top --interval 200ms",
        platform.bed.url,
        mlctl.display()
    );
    let started = tmux(
        &socket,
        &[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "80",
            "-y",
            "24",
            &command,
        ],
    );
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let load = {
        let client = platform.client.clone();
        let body = user_body(&platform.bed.data, 0);
        tokio::spawn(async move {
            loop {
                let _ = client.request("ml.predict", body.clone().into()).await;
            }
        })
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let screen = loop {
        let out = tmux(&socket, &["capture-pane", "-p", "-t", "top"]);
        let screen = String::from_utf8_lossy(&out.stdout).into_owned();
        let rps = screen
            .lines()
            .find_map(|l| l.strip_prefix("│requests/s"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0);
        if rps > 0.0 && screen.contains("v2 ") && screen.contains("p99") {
            break screen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "top did not show the load; last screen:\n{screen}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(screen.lines().count(), 24, "{screen}");
    assert!(screen.lines().all(|l| l.chars().count() <= 80), "{screen}");
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    std::fs::write(shots.join("mlctl-top.txt"), &screen).unwrap();

    // `w` switches to the totals; `q` quits.
    tmux(&socket, &["send-keys", "-t", "top", "w"]);
    wait_for("totals shown", WAIT, || async {
        let out = tmux(&socket, &["capture-pane", "-p", "-t", "top"]);
        String::from_utf8_lossy(&out.stdout)
            .contains("since the monitor started")
            .then_some(())
    })
    .await;
    tmux(&socket, &["send-keys", "-t", "top", "q"]);
    wait_for("top quit", WAIT, || async {
        (!tmux(&socket, &["has-session", "-t", "top"])
            .status
            .success())
        .then_some(())
    })
    .await;
    load.abort();
    tmux(&socket, &["kill-server"]);
    platform.stop().await;
}
