//! Helpers shared by the end-to-end tests: requests, data files, and an
//! independent least-squares solution to check the trainer against.

use std::path::Path;
use std::time::Duration;

use async_nats::Client;
use serde_json::Value;

/// Held by the tests that measure under load or against a deadline, so
/// that they do not run at the same time as one another on a small machine.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Connects a plain client, as a user would.
pub async fn client(url: &str) -> Client {
    tokio::time::timeout(Duration::from_secs(10), async_nats::connect(url))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Sends `body` to `subject` and returns the reply message (bounded).
pub async fn request(
    client: &Client,
    subject: &str,
    body: impl Into<bytes::Bytes>,
) -> async_nats::Message {
    tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject.to_owned(), body.into()),
    )
    .await
    .expect("reply in time")
    .expect("request succeeds")
}

/// Sends a JSON request and parses the JSON reply.
pub async fn request_json(client: &Client, subject: &str, body: &str) -> Value {
    let reply = request(client, subject, body.to_owned()).await;
    serde_json::from_slice(&reply.payload).expect("JSON reply")
}

/// What most tests start from: a private `nats-server`, a temporary
/// directory, and generated sample data in it (`users.csv`).
pub struct Bed {
    /// The server; dropping it stops the server.
    pub nats: ml_tests::NatsServer,
    /// Its client URL.
    pub url: String,
    /// The test's directory.
    pub dir: tempfile::TempDir,
    /// The data file.
    pub data: std::path::PathBuf,
}

impl Bed {
    /// Starts the server and writes `rows` rows generated from `seed`.
    pub fn new(rows: usize, seed: u64) -> Self {
        let nats = ml_tests::NatsServer::start();
        let url = nats.url();
        let dir = ml_tests::temp_dir();
        let data = dir.path().join("users.csv");
        write_data(&data, rows, seed);
        Self {
            nats,
            url,
            dir,
            data,
        }
    }
}

/// The identity of the registry whose directory is `dir` (its
/// `registry.json`).
pub fn registry_id(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("registry.json")).expect("registry.json");
    let v: Value = serde_json::from_str(&text).expect("registry.json is JSON");
    v["registry_id"].as_str().expect("registry_id").to_owned()
}

/// The model that [`write_exact_data`]'s targets follow exactly:
/// coefficients of `feature_1`, `feature_2`, `feature_3` (= `feature_1²`)
/// and the intercept.
pub const EXACT: ([f64; 3], f64) = ([2.0, -1.5, 0.5], 3.0);

/// Writes `rows` rows whose target is [`EXACT`]'s value with no noise: on
/// them, a model equal to it but for `offset` added to its intercept has an
/// RMSE of exactly `|offset|` (see [`exact_artifact`]), so a test can submit
/// models whose validation RMSE, as the registry computes it, it chooses.
pub fn write_exact_data(path: &Path, rows: usize) {
    let ([a, b, c], intercept) = EXACT;
    let mut text = String::from("user_id,feature_1,feature_2,target\n");
    for i in 0..rows {
        let f1 = ((i * 37) % 101) as f64 / 10.0 - 5.0;
        let f2 = ((i * 53) % 97) as f64 / 7.0 - 6.0;
        let target = intercept + a * f1 + b * f2 + c * (f1 * f1);
        text.push_str(&format!("exact-{i:06},{f1},{f2},{target}\n"));
    }
    std::fs::write(path, text).expect("write the exact data");
}

/// [`EXACT`] as a linear model artifact, its intercept moved by `offset`.
pub fn exact_artifact(offset: f64) -> ml_shared::model::ModelArtifact {
    let (coefficients, intercept) = EXACT;
    ml_shared::model::ModelArtifact {
        kind: ml_shared::model::ModelKind::Linear,
        feature_names: ["feature_1", "feature_2", "feature_3"]
            .map(String::from)
            .into(),
        coefficients: coefficients.into(),
        intercept: intercept + offset,
        scaler: None,
        profile: None,
        onnx: None,
    }
}

/// A submission of [`exact_artifact`]`(rmse)` claiming that RMSE (run
/// `i`): on [`write_exact_data`]'s rows, the registry finds the same figure.
pub fn exact_submission(i: u64, rmse: f64) -> ml_shared::messages::Submission {
    use ml_shared::messages::{Metrics, RunRecord, Submission, TrainParams};
    let names: Vec<String> = vec!["feature_1".into(), "feature_2".into(), "feature_3".into()];
    Submission {
        run: RunRecord {
            run_id: format!("run-test-{i:04}"),
            started_ms: ml_shared::time::now_ms(),
            duration_ms: 1,
            params: TrainParams {
                model: "linear".into(),
                seed: 42,
                validation_fraction: 0.2,
            },
            metrics: Metrics::regression(rmse, rmse * 0.8, 0.99),
            rows_train: 80,
            rows_validation: 20,
            data_path: "users.csv".into(),
            data_fingerprint: format!("sha256:{i:064x}"),
            feature_names: names.clone(),
        },
        // On the exact data the registry's holdout holds, this model's RMSE
        // is `rmse`: the figure claimed is the figure the registry finds.
        artifact: ml_shared::model::ModelArtifact {
            feature_names: names,
            ..exact_artifact(rmse)
        },
    }
}

/// Writes generated sample data.
pub fn write_data(path: &Path, rows: usize, seed: u64) {
    let file = std::fs::File::create(path).expect("data file");
    ml_shared::gen::write_csv(file, rows, seed).expect("write data");
}

/// Rows of a data file: (user_id, feature_1, feature_2, target), read by
/// column name with the `csv` crate (not through the platform's loader).
pub fn read_rows(path: &Path) -> Vec<(String, f64, f64, f64)> {
    let mut reader = csv::Reader::from_path(path).expect("open data");
    let headers = reader.headers().expect("headers").clone();
    let col = |name: &str| headers.iter().position(|h| h == name).expect(name);
    let (id, f1, f2, t) = (
        col("user_id"),
        col("feature_1"),
        col("feature_2"),
        col("target"),
    );
    reader
        .records()
        .map(|r| {
            let r = r.expect("record");
            let num = |i: usize| r[i].parse::<f64>().expect("number");
            (r[id].to_owned(), num(f1), num(f2), num(t))
        })
        .collect()
}

/// Ordinary least squares on `rows` (features feature_1, feature_2,
/// feature_1², plus an intercept), by the normal equations and Gaussian
/// elimination with partial pivoting. Returns `[b1, b2, b3, intercept]`.
#[allow(clippy::needless_range_loop)] // matrix arithmetic reads best with indices
pub fn least_squares(rows: &[(String, f64, f64, f64)], take: &[usize]) -> [f64; 4] {
    let mut a = [[0.0f64; 5]; 4];
    for &i in take {
        let (_, f1, f2, y) = &rows[i];
        let x = [*f1, *f2, f1 * f1, 1.0];
        for r in 0..4 {
            for c in 0..4 {
                a[r][c] += x[r] * x[c];
            }
            a[r][4] += x[r] * y;
        }
    }
    for col in 0..4 {
        let pivot = (col..4)
            .max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
            .expect("rows");
        a.swap(col, pivot);
        for r in 0..4 {
            if r != col {
                let f = a[r][col] / a[col][col];
                for c in col..5 {
                    a[r][c] -= f * a[col][c];
                }
            }
        }
    }
    [0, 1, 2, 3].map(|i| a[i][4] / a[i][i])
}

/// The prediction of `beta` for raw features.
pub fn predict(beta: &[f64; 4], f1: f64, f2: f64) -> f64 {
    beta[0] * f1 + beta[1] * f2 + beta[2] * f1 * f1 + beta[3]
}

/// Asserts `got` is within `rel` relative error of `want`.
pub fn assert_close(got: f64, want: f64, rel: f64) {
    let err = (got - want).abs() / want.abs().max(1e-12);
    assert!(
        err <= rel,
        "got {got}, want {want} (relative error {err:e} > {rel:e})"
    );
}

/// A client that reconnects by itself (as the services do) and gives up on
/// a request after `timeout`.
pub async fn resilient_client(url: &str, timeout: Duration) -> Client {
    let mut settings = ml_shared::settings::NatsSettings::for_url(url);
    settings.request_timeout = timeout;
    let client = ml_shared::nats::connect(&settings, "test-client")
        .await
        .expect("client options");
    ml_tests::wait_for("test client connected", Duration::from_secs(10), || {
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        async move { connected.then_some(()) }
    })
    .await;
    client
}

/// The predict endpoint's request count of every running predictor, by
/// micro-service instance id, gathered from `$SRV.STATS.predictor` for
/// 300 ms.
pub async fn predictor_request_counts(client: &Client) -> std::collections::BTreeMap<String, u64> {
    service_stats(client, "predictor")
        .await
        .into_iter()
        .map(|v| {
            let id = v["id"].as_str().expect("id").to_owned();
            (id, v["endpoints"][0]["num_requests"].as_u64().unwrap_or(0))
        })
        .collect()
}

/// The `$SRV.STATS.<service>` reply of every running instance of a micro
/// service, gathered for 300 ms.
pub async fn service_stats(client: &Client, service: &str) -> Vec<Value> {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish_with_reply(format!("$SRV.STATS.{service}"), inbox, "".into())
        .await
        .expect("publish");
    let mut stats = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, replies.next()).await {
        // A status message (no responders: no instance yet) is not a reply.
        if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
            stats.push(v);
        }
    }
    stats
}

/// A request for user `row` of the data file.
pub fn user_body(data: &Path, row: usize) -> String {
    let rows = read_rows(data);
    format!(r#"{{"user_id":"{}"}}"#, rows[row].0)
}

/// The users of the shipped `deploy/nats/nats.conf`.
pub const USERS: [&str; 7] = [
    "registry",
    "trainer",
    "predictor",
    "monitor",
    "client",
    "admin",
    "gateway",
];

/// A fresh random secret.
pub fn secret(tag: &str) -> String {
    use std::hash::BuildHasher;
    let s = std::collections::hash_map::RandomState::new();
    format!("{tag}-{:016x}{:016x}", s.hash_one(1u8), s.hash_one(2u8))
}

/// The shipped `deploy/nats/nats.conf`, as it is.
pub fn shipped_conf() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/nats.conf");
    std::fs::read_to_string(path).expect("deploy/nats/nats.conf")
}

/// The shipped configuration with a fresh password per user, its bcrypt
/// hash in place of each `$NATS_<USER>_PASSWORD_HASH`.
pub fn shipped_conf_with(passwords: &[(String, String)]) -> String {
    let mut conf = shipped_conf();
    for (user, pw) in passwords {
        let var = format!("$NATS_{}_PASSWORD_HASH", user.to_uppercase());
        assert!(conf.contains(&var), "{var} in nats.conf");
        // Cost 4: the server checks it at every connection of the test.
        let hash = bcrypt::hash(pw, 4).unwrap();
        conf = conf.replace(&var, &format!("\"{hash}\""));
    }
    conf
}

/// A `nats-server` running the shipped configuration (accounts and users),
/// with a fresh password for every user.
pub struct Shipped {
    /// The server; dropping it stops the server.
    pub nats: ml_tests::NatsServer,
    /// Its client URL.
    pub url: String,
    /// (user, password) for every user of [`USERS`].
    pub passwords: Vec<(String, String)>,
}

impl Shipped {
    /// Starts the server.
    pub fn start() -> Self {
        let passwords: Vec<(String, String)> =
            USERS.iter().map(|u| (u.to_string(), secret(u))).collect();
        let nats = ml_tests::NatsServer::start_with_config(&shipped_conf_with(&passwords));
        let url = nats.url();
        Self {
            nats,
            url,
            passwords,
        }
    }

    /// The password of `user`.
    pub fn password(&self, user: &str) -> String {
        let found = self.passwords.iter().find(|(u, _)| u == user);
        found.expect("a shipped user").1.clone()
    }

    /// The environment of a service process running as `user`.
    pub fn env(&self, user: &str) -> Vec<(String, String)> {
        vec![
            ("NATS_URL".into(), self.url.clone()),
            ("NATS_USER".into(), user.into()),
            ("NATS_PASSWORD".into(), self.password(user)),
            ("NATS_INBOX_PREFIX".into(), format!("_INBOX_{user}")),
        ]
    }

    /// A client of `user` (see [`connect_as`]).
    pub async fn connect(
        &self,
        user: &str,
    ) -> (
        Client,
        tokio::sync::mpsc::UnboundedReceiver<async_nats::Event>,
    ) {
        connect_as(&self.url, user, &self.password(user)).await
    }
}

/// A client of `user`, reading replies under its own inbox prefix, whose
/// connection events (permission violations among them) arrive on the
/// returned channel.
pub async fn connect_as(
    url: &str,
    user: &str,
    password: &str,
) -> (
    Client,
    tokio::sync::mpsc::UnboundedReceiver<async_nats::Event>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .custom_inbox_prefix(format!("_INBOX_{user}"))
        .request_timeout(Some(Duration::from_secs(2)))
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e);
            }
        })
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {e}"));
    (client, rx)
}
