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

    // The monitor prints one JSON object per interval with the request counted.
    let line = wait_for("monitor line with traffic", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(log("monitor")).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["errors"]["unknown_user"].is_u64());
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
