//! Access control against a real `nats-server`: the shipped
//! `deploy/nats/nats.conf` (one user per service, per-subject permissions),
//! TLS with certificates made for the test, tokens and nkeys. No secret may
//! appear in any log of the run.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use futures::StreamExt;
use ml_shared::settings::{NatsSettings, Secret};
use ml_tests::services::{binary, Process};
use ml_tests::{wait_for, NatsServer};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(15);
/// How long a message that must not arrive is waited for.
const QUIET: Duration = Duration::from_millis(500);

/// Every secret absent from every file in `dir` and from `extra` output.
fn assert_no_secret_in_logs(dir: &Path, secrets: &[String], extra: &[String]) {
    let mut texts: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "log").then(|| {
                (
                    p.display().to_string(),
                    std::fs::read_to_string(&p).unwrap_or_default(),
                )
            })
        })
        .collect();
    texts.extend(
        extra
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("output {i}"), t.clone())),
    );
    assert!(texts.len() > 1, "logs to search");
    for (name, text) in &texts {
        for s in secrets {
            assert!(!text.contains(s.as_str()), "a secret appears in {name}");
        }
    }
}

/// Who may publish to and subscribe to a subject under the shipped
/// configuration; every other user is refused. Together the rules cover
/// every subject of the README's table, the discovery subjects, other
/// users' inboxes and the server's response subjects.
struct Rule {
    subject: &'static str,
    publish: &'static [&'static str],
    subscribe: &'static [&'static str],
}

const PLATFORM: &[&str] = &["registry", "trainer", "predictor", "monitor"];

const RULES: &[Rule] = &[
    Rule {
        subject: "ml.predict",
        publish: &["client", "admin", "gateway"],
        subscribe: &["predictor"],
    },
    Rule {
        subject: "ml.train",
        publish: &["admin"],
        subscribe: &["trainer"],
    },
    Rule {
        subject: "ml.registry.submit",
        publish: &["trainer"],
        subscribe: &["registry"],
    },
    Rule {
        subject: "ml.registry.production",
        publish: &["predictor", "monitor"],
        subscribe: &["registry"],
    },
    Rule {
        subject: "ml.registry.models",
        publish: &["admin", "gateway"],
        subscribe: &["registry"],
    },
    Rule {
        subject: "ml.registry.runs",
        publish: &["trainer", "admin", "gateway"],
        subscribe: &["registry"],
    },
    Rule {
        subject: "ml.registry.run_failed",
        publish: &["trainer"],
        subscribe: &["registry"],
    },
    Rule {
        subject: "ml.registry.promote",
        publish: &["admin", "gateway"],
        subscribe: &["registry"],
    },
    Rule {
        subject: "ml.registry.rollback",
        publish: &["admin", "gateway"],
        subscribe: &["registry"],
    },
    Rule {
        subject: "ml.registry.history",
        publish: &["admin", "gateway"],
        subscribe: &["registry"],
    },
    Rule {
        subject: "ml.registry.import",
        publish: &["admin"],
        subscribe: &["registry"],
    },
    Rule {
        subject: "ml.registry.route",
        publish: &["admin"],
        subscribe: &["registry"],
    },
    Rule {
        subject: "ml.model.production",
        publish: &["registry"],
        subscribe: &["predictor", "monitor"],
    },
    Rule {
        subject: "ml.monitor.events",
        publish: &["predictor"],
        subscribe: &["monitor"],
    },
    Rule {
        subject: "ml.monitor.stats",
        publish: &["admin", "gateway"],
        subscribe: &["monitor"],
    },
    Rule {
        subject: "ml.feedback",
        publish: &["client", "admin"],
        subscribe: &["monitor"],
    },
    Rule {
        subject: "ml.alerts",
        publish: &["monitor"],
        subscribe: &["admin", "gateway"],
    },
    Rule {
        subject: "$SRV.PING",
        publish: &["admin"],
        subscribe: PLATFORM,
    },
    Rule {
        subject: "$SRV.INFO.predictor",
        publish: &["admin", "monitor"],
        subscribe: PLATFORM,
    },
    Rule {
        subject: "_INBOX_client.stolen",
        publish: &[],
        subscribe: &["client"],
    },
    Rule {
        subject: "_INBOX_admin.stolen",
        publish: &[],
        subscribe: &["admin"],
    },
    Rule {
        subject: "_INBOX_registry.stolen",
        publish: &[],
        subscribe: &["registry"],
    },
    Rule {
        subject: "_R_.abc.def",
        publish: &["predictor"],
        subscribe: &[],
    },
    Rule {
        subject: ">",
        publish: &[],
        subscribe: &[],
    },
];

/// The permission violations a user's events reported within `QUIET`:
/// ("publish" | "subscribe", subject).
async fn violations(events: &mut mpsc::UnboundedReceiver<Event>) -> BTreeSet<(String, String)> {
    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
        let Event::ServerError(e) = event else {
            continue;
        };
        let text = e.to_string();
        let kind = if text.contains("for Publish to") {
            "publish"
        } else if text.contains("for Subscription to") {
            "subscribe"
        } else {
            continue;
        };
        if let Some(subject) = text.split('"').nth(1) {
            seen.insert((kind.to_owned(), subject.to_owned()));
        }
    }
    seen
}

/// The subjects of the README's subjects table (its rows' first cells).
fn readme_subjects() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(path).expect("README.md");
    let table = text
        .split("## Subjects")
        .nth(1)
        .expect("a Subjects section");
    table
        .lines()
        .take_while(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_user_may_use_exactly_the_subjects_the_shipped_config_gives_it() {
    ml_tests::init_logging();
    let covered: BTreeSet<String> = RULES.iter().map(|r| r.subject.to_owned()).collect();
    let documented = readme_subjects();
    assert!(documented.len() >= 14, "{documented:?}");
    let missing: Vec<&String> = documented.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "README subjects without an access rule: {missing:?}"
    );
    let shipped = Shipped::start();
    let (url, password) = (shipped.url.clone(), |user: &str| shipped.password(user));
    for user in USERS {
        let (c, mut events) = connect_as(&url, user, &password(user)).await;
        let mut subscriptions = Vec::new();
        for rule in RULES {
            c.publish(rule.subject, "".into()).await.unwrap();
            subscriptions.push(c.subscribe(rule.subject).await.unwrap());
        }
        c.flush().await.unwrap();
        let refused = violations(&mut events).await;
        let expected: BTreeSet<(String, String)> = RULES
            .iter()
            .flat_map(|r| {
                let publish = (!r.publish.contains(&user)).then_some(("publish", r.subject));
                let subscribe = (!r.subscribe.contains(&user)).then_some(("subscribe", r.subject));
                publish.into_iter().chain(subscribe)
            })
            .map(|(k, s)| (k.to_owned(), s.to_owned()))
            .collect();
        assert_eq!(
            refused, expected,
            "{user}: refused (left) vs expected (right)"
        );
        drop(subscriptions);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nats_config_lets_each_service_do_its_job_and_nothing_more() {
    ml_tests::init_logging();
    let shipped = Shipped::start();
    let (url, password) = (shipped.url.clone(), |user: &str| shipped.password(user));
    let dir = ml_tests::temp_dir();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let data = dir.path().join("users.csv");
    write_data(&data, 200, 41);
    // The predictor reads its password from a file, the others from a variable.
    let predictor_pw = dir.path().join("predictor.password");
    std::fs::write(&predictor_pw, format!("{}\n", password("predictor"))).unwrap();
    let registry_dir = dir.path().join("registry");
    let log = |name: &str| logs.join(format!("{name}.log"));
    let trace = "debug,async_nats=trace";
    let service_env = |user: &'static str| -> Vec<(String, String)> {
        let mut env = vec![
            ("NATS_URL".to_owned(), url.clone()),
            ("NATS_USER".to_owned(), user.to_owned()),
            ("NATS_INBOX_PREFIX".to_owned(), format!("_INBOX_{user}")),
            ("RUST_LOG".to_owned(), trace.to_owned()),
            ("DATA_PATH".to_owned(), data.to_str().unwrap().to_owned()),
            (
                "REGISTRY_DIR".to_owned(),
                registry_dir.to_str().unwrap().to_owned(),
            ),
            ("TRAIN_INTERVAL".to_owned(), "1h".to_owned()),
            ("MODEL_POLL".to_owned(), "200ms".to_owned()),
            ("MONITOR_INTERVAL".to_owned(), "500ms".to_owned()),
        ];
        if user == "predictor" {
            env.push((
                "NATS_PASSWORD_FILE".into(),
                predictor_pw.to_str().unwrap().into(),
            ));
        } else {
            env.push(("NATS_PASSWORD".into(), password(user)));
        }
        env
    };
    let mut procs: Vec<Process> = ["registry", "predictor", "monitor", "trainer"]
        .into_iter()
        .map(|name| {
            let env = service_env(name);
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            Process::start(name, &[], &env, &log(name))
        })
        .collect();

    // The pipeline works with each service under its own user.
    let (client, _client_events) = connect_as(&url, "client", &password("client")).await;
    let (admin, _admin_events) = connect_as(&url, "admin", &password("admin")).await;
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
    let mut outputs = Vec::new();
    let mlctl = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(binary("mlctl"))
            .args(args)
            .env("NATS_URL", &url)
            .env("RUST_LOG", trace)
            .envs(env.iter().copied())
            .output()
            .expect("run mlctl");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let admin_pw = password("admin");
    let as_admin = [
        ("NATS_USER", "admin"),
        ("NATS_PASSWORD", admin_pw.as_str()),
        ("NATS_INBOX_PREFIX", "_INBOX_admin"),
    ];

    // The operator trains, lists, promotes, rolls back and reads the history.
    let (ok, text) = mlctl(&["train"], &as_admin);
    assert!(ok && text.contains("\"version\":2"), "{text}");
    outputs.push(text);
    let (ok, text) = mlctl(
        &[
            "promote",
            "1",
            "--reason",
            "operator check",
            "--actor",
            "olivia",
        ],
        &as_admin,
    );
    assert!(ok, "{text}");
    outputs.push(text);
    let (ok, text) = mlctl(
        &["rollback", "--reason", "operator undo", "--actor", "olivia"],
        &as_admin,
    );
    assert!(ok, "{text}");
    outputs.push(text);
    let (ok, text) = mlctl(&["history"], &as_admin);
    assert!(
        ok && text.contains("olivia") && text.contains("operator undo"),
        "{text}"
    );
    outputs.push(text);
    // The operator sets, reads and clears a routing table.
    let (ok, text) = mlctl(
        &[
            "route", "--canary", "1:10", "--reason", "canary", "--actor", "olivia",
        ],
        &as_admin,
    );
    assert!(
        ok && text.contains("candidate") && text.contains("v1"),
        "{text}"
    );
    outputs.push(text);
    let user = read_rows(&data)[0].0.clone();
    let (ok, text) = wait_for("the table served", WAIT, || {
        let (ok, text) = mlctl(&["predict", &user, "--routing-key", "k-1"], &as_admin);
        async move { (ok && text.contains("\"variant\":")).then_some((ok, text)) }
    })
    .await;
    assert!(ok && text.contains("\"request_id\":"), "{text}");
    outputs.push(text);
    let (ok, text) = mlctl(&["route", "--clear", "--actor", "olivia"], &as_admin);
    assert!(ok && text.contains("no routing table"), "{text}");
    outputs.push(text);
    for args in [
        &["models"][..],
        &["runs"][..],
        &["stats"][..],
        &["route"][..],
    ] {
        let (ok, text) = mlctl(args, &as_admin);
        assert!(ok, "{args:?}: {text}");
        outputs.push(text);
    }
    let production = || async {
        let m = admin
            .request("ml.registry.models", "".into())
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        (v["production"].as_u64(), v["total"].as_u64())
    };
    let before = production().await;
    // Discovery answers the operator from every service.
    for name in ["registry", "trainer", "predictor", "monitor"] {
        let m = admin
            .request(format!("$SRV.PING.{name}"), "".into())
            .await
            .unwrap_or_else(|e| panic!("{name} answers discovery: {e}"));
        let ping: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(ping["name"], name, "{ping}");
    }

    // The trainer records a failed run.
    let (trainer, _) = connect_as(&url, "trainer", &password("trainer")).await;
    let failed = serde_json::json!({
        "run_id": "run-failed-check", "started_ms": 1, "duration_ms": 2,
        "params": {"model": "linear", "seed": 1, "validation_fraction": 0.2},
        "data_path": "users.csv", "reason": "checked by the access test"
    });
    let m = trainer
        .request("ml.registry.run_failed", failed.to_string().into())
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&m.payload).unwrap()["recorded"],
        true
    );

    // Reflection: requests whose reply subject names an internal subject.
    // From a client, the reply has nowhere to go (its account has no such
    // subject); from an operator, it reaches the imported service with no
    // reply subject of its own and is refused there. Either way nothing is
    // trained, submitted, published or moved.
    // The gateway, in an account of its own, reads alerts: nobody else's
    // reflected reply may land there.
    let (gateway, _) = connect_as(&url, "gateway", &password("gateway")).await;
    let mut alerts = gateway.subscribe("ml.alerts").await.unwrap();
    gateway.flush().await.unwrap();
    for target in [
        "ml.train",
        "ml.registry.submit",
        "ml.registry.import",
        "ml.registry.promote",
        "ml.alerts",
        "ml.model.production",
    ] {
        client
            .publish_with_reply("ml.predict", target, body.clone().into())
            .await
            .unwrap();
        admin
            .publish_with_reply("ml.predict", target, body.clone().into())
            .await
            .unwrap();
        admin
            .publish_with_reply("ml.registry.models", target, "".into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    admin.flush().await.unwrap();
    while let Ok(Some(m)) = tokio::time::timeout(QUIET, alerts.next()).await {
        let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        assert!(v["alert"].is_string(), "not an alert on ml.alerts: {v}");
    }
    assert_eq!(production().await, before, "nothing trained or moved");
    assert_eq!(
        served().await,
        before.0,
        "the production model still serves"
    );
    let trainer_log = std::fs::read_to_string(log("trainer")).unwrap();
    assert!(
        trainer_log.contains("its reply subject is not an inbox"),
        "{trainer_log}"
    );

    // Without credentials, or with a wrong password: refused.
    let refused = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url.as_str())
        .await;
    assert!(refused.is_err(), "a client without credentials got in");
    let refused = ConnectOptions::with_user_and_password("client".into(), "wrong".into())
        .connect(url.as_str())
        .await;
    assert!(refused.is_err(), "a wrong password got in");
    let (ok, text) = mlctl(&["models"], &[]);
    assert!(
        !ok && text.to_lowercase().contains("authorization"),
        "{text}"
    );
    outputs.push(text);

    for p in procs.iter_mut() {
        assert!(p.terminate(WAIT).is_some_and(|s| s.success()));
    }
    // Every service did its job without a permission violation.
    for name in ["registry", "predictor", "monitor", "trainer"] {
        let text = std::fs::read_to_string(log(name)).unwrap();
        assert!(
            !text.to_lowercase().contains("permissions violation"),
            "{name}: {text}"
        );
    }
    let monitor_log = std::fs::read_to_string(log("monitor")).unwrap();
    assert!(
        monitor_log.contains("drift measured against this production model"),
        "{monitor_log}"
    );
    // No secret in any log line of the run, at trace level.
    std::fs::copy(
        shipped.nats.dir().join("nats.log"),
        logs.join("nats-server.log"),
    )
    .unwrap();
    let secrets: Vec<String> = shipped.passwords.iter().map(|(_, p)| p.clone()).collect();
    assert_no_secret_in_logs(&logs, &secrets, &outputs);
}
/// A CA, a server certificate for 127.0.0.1 and a client certificate, as
/// PEM files in `dir`: (ca, server cert, server key, client cert, client key).
fn certificates(dir: &Path) -> [PathBuf; 5] {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut server =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server.signed_by(&server_key, &ca, &ca_key).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(vec!["ml-client".to_owned()]).unwrap();
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client.signed_by(&client_key, &ca, &ca_key).unwrap();
    let files = [
        ("ca.pem", ca.pem()),
        ("server.pem", server.pem()),
        ("server-key.pem", server_key.serialize_pem()),
        ("client.pem", client.pem()),
        ("client-key.pem", client_key.serialize_pem()),
    ];
    files.map(|(name, text)| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_required_and_client_certificates_verified() {
    ml_tests::init_logging();
    let dir = ml_tests::temp_dir();
    let [ca, cert, key, client_cert, client_key] = certificates(dir.path());
    let token = secret("token");
    let conf = format!(
        "tls {{\n  cert_file: {cert:?}\n  key_file: {key:?}\n  ca_file: {ca:?}\n  verify: true\n  timeout: 2\n}}\nauthorization {{ token: {token:?} }}\n"
    );
    let nats = NatsServer::start_with_config(&conf);
    let url = nats.url();

    // A plaintext client is refused: the server wants a TLS handshake.
    let mut tcp = TcpStream::connect(url.trim_start_matches("nats://")).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut info = vec![0u8; 4096];
    let n = tcp.read(&mut info).unwrap();
    let info = String::from_utf8_lossy(&info[..n]).into_owned();
    assert!(info.contains("\"tls_required\":true"), "{info}");
    let _ = tcp.write_all(format!("CONNECT {{\"auth_token\":\"{token}\"}}\r\nPING\r\n").as_bytes());
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest);
    assert!(
        !String::from_utf8_lossy(&rest).contains("PONG"),
        "a plaintext client was answered"
    );

    // Through the platform's settings: CA, client certificate, token.
    let mut settings = NatsSettings::for_url(&url);
    settings.nats_token = Some(Secret::new(token.clone()));
    settings.nats_tls_ca = Some(ca.clone());
    settings.nats_tls_cert = Some(client_cert.clone());
    settings.nats_tls_key = Some(client_key.clone());
    let client = ml_shared::nats::options(&settings, "test")
        .await
        .unwrap()
        .connect(url.as_str())
        .await
        .expect("TLS client with a certificate connects");
    let mut sub = client.subscribe("tls.check").await.unwrap();
    client.publish("tls.check", "ok".into()).await.unwrap();
    let m = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.payload, "ok");

    // Without a client certificate, or without the CA: refused.
    let mut no_cert = settings.clone();
    no_cert.nats_tls_cert = None;
    no_cert.nats_tls_key = None;
    let refused = ml_shared::nats::options(&no_cert, "test")
        .await
        .unwrap()
        .connect(url.as_str())
        .await;
    assert!(refused.is_err(), "a client without a certificate got in");
    let mut no_ca = settings.clone();
    no_ca.nats_tls_ca = None;
    let refused = ml_shared::nats::options(&no_ca, "test")
        .await
        .unwrap()
        .connect(url.as_str())
        .await;
    assert!(
        refused.is_err(),
        "a client that cannot verify the server connected"
    );

    // A service configured by environment variables connects and serves.
    let data = dir.path().join("users.csv");
    write_data(&data, 50, 42);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let env = [
        ("NATS_URL", url.as_str()),
        ("DATA_PATH", data.to_str().unwrap()),
        ("NATS_TOKEN_FILE", token_file.to_str().unwrap()),
        ("NATS_TLS_CA", ca.to_str().unwrap()),
        ("NATS_TLS_CERT", client_cert.to_str().unwrap()),
        ("NATS_TLS_KEY", client_key.to_str().unwrap()),
        ("RUST_LOG", "debug,async_nats=trace"),
    ];
    let mut predictor = Process::start("predictor", &[], &env, &logs.join("predictor.log"));
    let reply = wait_for("predictor answers over TLS", WAIT, || async {
        let m = client.request("ml.predict", "{}".into()).await.ok()?;
        serde_json::from_slice::<Value>(&m.payload).ok()
    })
    .await;
    assert_eq!(reply["error"]["code"], "no_model", "{reply}");
    assert!(predictor.terminate(WAIT).is_some_and(|s| s.success()));

    // NATS_TLS_REQUIRED: a client refuses a server without TLS.
    let plain = NatsServer::start();
    let out = Command::new(binary("mlctl"))
        .args(["models"])
        .env("NATS_URL", plain.url())
        .env("NATS_TLS_REQUIRED", "true")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("TLS"), "{stderr}");

    std::fs::copy(nats.dir().join("nats.log"), logs.join("nats-server.log")).unwrap();
    assert_no_secret_in_logs(&logs, &[token], &[stderr.into_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_users_sign_in_with_their_seed_only() {
    ml_tests::init_logging();
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let nats = NatsServer::start_with_config(&format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
        user.public_key()
    ));
    let url = nats.url();
    let dir = ml_tests::temp_dir();
    let seed_file = dir.path().join("user.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).unwrap();
    let mut settings = NatsSettings::for_url(&url);
    settings.nats_nkey_seed_file = Some(seed_file);
    let client = ml_shared::nats::options(&settings, "test")
        .await
        .unwrap()
        .connect(url.as_str())
        .await
        .expect("the nkey user connects");
    client.flush().await.unwrap();
    let other = nkeys::KeyPair::new_user();
    let refused = ConnectOptions::with_nkey(other.seed().unwrap())
        .connect(url.as_str())
        .await;
    assert!(refused.is_err(), "an unknown nkey got in");
    let refused = async_nats::connect(url.as_str()).await;
    assert!(refused.is_err(), "a client without credentials got in");
    assert!(!format!("{settings:?}").contains(&seed));
}
