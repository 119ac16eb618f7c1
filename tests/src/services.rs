//! Starting the platform's services in-process, each through its own
//! `run(config, shutdown)`, and starting the built binaries as processes.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use clap::Parser;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The shutdown future handed to a service's `run`.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A service running as a task of the test's runtime.
pub struct Service {
    name: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Service {
    /// Spawns `run(shutdown)` as a task.
    pub fn spawn<F, Fut>(name: &str, run: F) -> Self
    where
        F: FnOnce(Shutdown) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown: Shutdown = Box::pin(async move {
            let _ = rx.await;
        });
        Self {
            name: name.to_owned(),
            stop: Some(tx),
            task: Some(tokio::spawn(run(shutdown))),
        }
    }

    /// Signals shutdown and waits (at most 15 s) for `run` to return `Ok`.
    pub async fn stop(mut self) {
        self.stop.take().map(|tx| tx.send(()));
        let task = self.task.take().expect("not stopped twice");
        match tokio::time::timeout(Duration::from_secs(15), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("{} failed: {e:#}", self.name),
            Ok(Err(e)) => panic!("{} panicked: {e}", self.name),
            Err(_) => panic!("{} did not stop within 15 s", self.name),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn parse<C: Parser>(name: &str, args: &[&str]) -> C {
    C::try_parse_from(std::iter::once(name).chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{name} flags: {e}"))
}

/// Starts a registry storing into `dir`, evaluating submissions on the
/// holdout rows of `data`.
pub fn registry(url: &str, dir: &Path, data: &Path) -> Service {
    registry_with(url, dir, data, &[])
}

/// Starts a registry with extra flags (e.g. `--state jetstream`).
pub fn registry_with(url: &str, dir: &Path, data: &Path, extra: &[&str]) -> Service {
    let mut args = vec![
        "--nats-url",
        url,
        "--registry-dir",
        path(dir),
        "--holdout-path",
        path(data),
    ];
    args.extend_from_slice(extra);
    let config: registry::Config = parse("registry", &args);
    Service::spawn("registry", |s| registry::run(config, s))
}

/// Starts a predictor serving users from `data` (refreshed every 200 ms).
pub fn predictor(url: &str, data: &Path) -> Service {
    predictor_with(url, data, &[])
}

/// Starts a predictor with extra flags.
pub fn predictor_with(url: &str, data: &Path, extra: &[&str]) -> Service {
    let mut args = vec![
        "--nats-url",
        url,
        "--data-path",
        path(data),
        "--features-refresh",
        "200ms",
        "--model-poll",
        "200ms",
        "--event-flush",
        "50ms",
    ];
    args.extend_from_slice(extra);
    let config: predictor::Config = parse("predictor", &args);
    Service::spawn("predictor", |s| predictor::run(config, s))
}

/// Starts a trainer on `data`: it trains at once, then every `interval`.
pub fn trainer(url: &str, data: &Path, interval: &str) -> Service {
    let config: trainer::Config = parse(
        "trainer",
        &[
            "--nats-url",
            url,
            "--data-path",
            path(data),
            "--train-interval",
            interval,
            "--train-retry",
            "200ms",
        ],
    );
    Service::spawn("trainer", |s| trainer::run(config, s))
}

/// Starts a monitor reporting every `interval`, its lines going nowhere.
pub fn monitor(url: &str, interval: &str) -> Service {
    monitor_with(url, &["--monitor-interval", interval], Output::default())
}

/// Starts a monitor with extra flags, its lines going to `out`.
pub fn monitor_with(url: &str, extra: &[&str], out: Output) -> Service {
    let mut args = vec!["--nats-url", url, "--model-poll", "200ms"];
    args.extend_from_slice(extra);
    let config: monitor::Config = parse("monitor", &args);
    Service::spawn("monitor", |s| monitor::run_with_output(config, s, out))
}

/// What a service writes, kept in memory for the test to read.
#[derive(Debug, Clone, Default)]
pub struct Output(Arc<Mutex<Vec<u8>>>);

impl Output {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("output lock")).into_owned()
    }

    /// The complete lines written so far.
    pub fn lines(&self) -> Vec<String> {
        let text = self.text();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete.lines().map(str::to_owned).collect()
    }
}

impl std::io::Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("output lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// The path of a workspace binary, building the workspace's binaries once
/// per test process (a no-op when they are current).
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // target/<profile>/deps/<test-binary> -> target/<profile>
        let exe = std::env::current_exe().expect("test binary path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary is in target/<profile>/deps")
            .to_owned();
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--workspace", "--bins", "--quiet"]);
        if release {
            build.arg("--release");
        }
        let status = build
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build --bins failed");
        dir
    });
    dir.join(name)
}

/// A child process that is killed when dropped.
pub struct Process {
    /// The child.
    pub child: Child,
}

impl Process {
    /// Starts workspace binary `name` with `env` (`RUST_LOG` defaults to
    /// `info`), output to `log`.
    pub fn start(name: &str, args: &[&str], env: &[(&str, &str)], log: &Path) -> Self {
        let out = std::fs::File::create(log).expect("log file");
        let child = Command::new(binary(name))
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self { child }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`STOP`, `CONT`, `KILL`, …) with `kill(1)`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Sends SIGTERM and waits (at most `timeout`) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
