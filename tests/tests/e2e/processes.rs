//! The built binaries as real processes, configured by environment
//! variables as in `docker-compose.yml`, driven with `mlctl`.

use std::process::Command;
use std::time::Duration;

use ml_tests::services::{binary, Process};
use ml_tests::{wait_for, NatsServer};

fn mlctl(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(binary("mlctl"))
        .args(args)
        .env("NATS_URL", url)
        .output()
        .expect("run mlctl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_work_together_and_the_monitor_prints_latency() {
    ml_tests::init_logging();
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = ml_tests::temp_dir();
    let data = dir.path().join("users.csv");
    let out = mlctl(
        &url,
        &[
            "gen-data",
            "--rows",
            "300",
            "--seed",
            "5",
            "--out",
            data.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");

    // No predictor yet: mlctl says so at once rather than timing out.
    let out = mlctl(
        &url,
        &["predict", "--features", "feature_1=0.3,feature_2=1.5"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("predictor is unavailable"), "{stderr}");

    let env = [
        ("NATS_URL", url.as_str()),
        ("DATA_PATH", data.to_str().unwrap()),
        (
            "REGISTRY_DIR",
            dir.path()
                .join("registry")
                .to_str()
                .unwrap()
                .to_owned()
                .leak(),
        ),
        ("TRAIN_INTERVAL", "1h"),
        ("MONITOR_INTERVAL", "500ms"),
        ("MONITOR_FORMAT", "json"),
    ];
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let mut procs: Vec<(&str, Process)> = ["registry", "predictor", "monitor", "trainer"]
        .into_iter()
        .map(|name| (name, Process::start(name, &[], &env, &log(name))))
        .collect();

    let user = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .nth(1)
        .unwrap()
        .to_owned();
    let reply = wait_for("mlctl predict succeeds", Duration::from_secs(20), || {
        let out = mlctl(&url, &["predict", &user]);
        async move {
            out.status
                .success()
                .then(|| String::from_utf8(out.stdout).unwrap())
        }
    })
    .await;
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["user_id"], user.as_str());
    assert_eq!(reply["model_version"], 1);

    let out = mlctl(&url, &["predict", "no-such-user"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_user"));

    let out = mlctl(&url, &["models"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("prod"),
        "{out:?}"
    );

    // The monitor prints one JSON object per interval with the request counted
    // (earlier windows may hold the `no_model` answers of the wait above).
    let line = wait_for("monitor line with traffic", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(log("monitor")).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["count"].as_u64() >= Some(1) && v["errors"]["unknown_user"].is_u64());
        async move { found }
    })
    .await;
    assert!(line["latency_ms"]["p99"].as_f64().is_some(), "{line}");
    assert!(line["errors"]["unknown_user"].as_u64() == Some(1), "{line}");

    // SIGTERM stops every service cleanly.
    for (name, p) in procs.iter_mut().rev() {
        let status = p.terminate(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{name} exit: {status:?}\n{}",
            std::fs::read_to_string(log(name)).unwrap_or_default()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlctl_up_starts_nats_and_the_services_and_ctrl_c_stops_them() {
    ml_tests::init_logging();
    let dir = ml_tests::temp_dir();
    let data = dir.path().join("users.csv");
    let out = Command::new(binary("mlctl"))
        .args(["gen-data", "--rows", "200", "--out", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // A port with no server on it: `mlctl up` must start its own nats-server there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let registry_dir = dir.path().join("registry");
    let mut up = Process::start(
        "mlctl",
        &["up"],
        &[
            ("NATS_URL", url.as_str()),
            ("DATA_PATH", data.to_str().unwrap()),
            ("REGISTRY_DIR", registry_dir.to_str().unwrap()),
            ("TRAIN_INTERVAL", "1h"),
            (
                "PATH",
                &format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default()),
            ),
        ],
        &dir.path().join("up.log"),
    );
    let reply = wait_for(
        "predictions through mlctl up",
        Duration::from_secs(30),
        || {
            let out = mlctl(
                &url,
                &["predict", "--features", "feature_1=0.5,feature_2=2"],
            );
            async move {
                out.status
                    .success()
                    .then(|| String::from_utf8(out.stdout).unwrap())
            }
        },
    )
    .await;
    assert!(reply.contains("\"model_version\":1"), "{reply}");

    let status = up.terminate(Duration::from_secs(30));
    let log = std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "mlctl up exit: {status:?}\n{log}"
    );
    for name in ["registry", "predictor", "monitor", "trainer", "nats-server"] {
        assert!(
            log.contains(&format!("mlctl up: {name} stopped")),
            "{name} not stopped:\n{log}"
        );
    }
    // Nothing listens on the port any more.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}
