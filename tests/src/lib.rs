//! Test support for the end-to-end tests of the ML platform.
//!
//! * [`NatsServer`] runs a real, private `nats-server` (with JetStream) for one
//!   test: its own temporary directory, an OS-chosen port, a log file, and
//!   `kill`/`restart` on the same port and store for resilience tests. It never
//!   touches a server that may already run on the default port 4222.
//! * [`wait_for`] polls a condition with a deadline: every wait in a test must
//!   be bounded so that no test can hang.
//! * [`temp_dir`] and [`init_logging`] are small conveniences.
//! * [`services`] starts the platform's services in-process (through their
//!   `run`) or as the built binaries.
//! * [`cluster`] runs N `nats-server`s as one JetStream cluster, with kill and
//!   restart of one node by index.
//! * [`prometheus`] runs a real Prometheus server and queries it.
//!
//! The `nats-server` binary is taken from the env variable `NATS_SERVER_BIN`,
//! else from `PATH`, else from `/usr/sbin/nats-server`.
//!
//! The server methods are blocking (they poll the log file with short sleeps,
//! always bounded); they may be called from async tests.

pub mod cluster;
pub mod prometheus;
pub mod services;

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Env variable naming the `nats-server` binary to use.
pub const NATS_SERVER_BIN_ENV: &str = "NATS_SERVER_BIN";

/// Where the Debian/Ubuntu package installs `nats-server`.
const DEFAULT_BIN: &str = "/usr/sbin/nats-server";

/// The log line announcing the client port, e.g.
/// `[123] 2026/01/01 00:00:00.000000 [INF] Listening for client connections on 127.0.0.1:41234`.
const LISTENING: &str = "Listening for client connections on ";

/// How long a (re)started server may take to announce its client port.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the log file is polled while waiting for readiness.
const READY_POLL: Duration = Duration::from_millis(10);

/// How long [`NatsServer::restart`] keeps retrying when the port cannot be bound yet.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between two bind attempts of [`NatsServer::restart`].
const REBIND_PAUSE: Duration = Duration::from_millis(50);

/// A private `nats-server` process (JetStream enabled) for one test.
///
/// Everything it writes lives in its own temporary directory: the JetStream
/// store (`jetstream/`), the log (`nats.log`), the pid file (`nats.pid`), the
/// process' stdout/stderr (`nats.stderr`) and, for
/// [`start_with_config`](Self::start_with_config), the config (`nats.conf`).
///
/// Dropping it kills the process (SIGKILL), reaps it, and removes the directory.
#[derive(Debug)]
pub struct NatsServer {
    /// The running process, `None` after [`kill`](Self::kill).
    child: Option<Child>,
    /// The client port, chosen by the OS at the first start and kept on restarts.
    port: u16,
    /// The `nats-server` binary.
    bin: PathBuf,
    /// Extra command-line arguments, repeated on every (re)start.
    extra_args: Vec<String>,
    /// The config file passed with `-c`, if any.
    config: Option<PathBuf>,
    /// Owns the server's files; declared last so that it is removed after the
    /// process has been killed in `Drop`.
    dir: TempDir,
}

/// Why a spawned server did not become ready.
enum NotReady {
    /// The process exited before announcing its client port.
    Exited(ExitStatus),
    /// The process did not announce its client port in time.
    TimedOut,
}

impl NatsServer {
    /// Starts a server on an OS-chosen port (`-p -1`) with JetStream, and waits
    /// (at most 10 s) until it accepts client connections.
    ///
    /// # Panics
    ///
    /// If `nats-server` cannot be found or does not become ready in time.
    pub fn start() -> Self {
        Self::start_with::<&str>(&[], None)
    }

    /// Like [`start`](Self::start), with extra command-line arguments appended
    /// (they are repeated on [`restart`](Self::restart)).
    ///
    /// # Panics
    ///
    /// If `nats-server` cannot be found or does not become ready in time.
    pub fn start_with_args<S: AsRef<str>>(args: &[S]) -> Self {
        Self::start_with(args, None)
    }

    /// Like [`start`](Self::start), with a config file holding `conf_text`
    /// (passed with `-c`). The command-line options (`-a 127.0.0.1 -p -1 -js
    /// -sd … -l … -P …`) still apply and take precedence over the config, so
    /// the config is meant for what they do not set: authorization, accounts,
    /// limits…
    ///
    /// # Panics
    ///
    /// If `nats-server` cannot be found, the config is rejected, or the server
    /// does not become ready in time.
    pub fn start_with_config(conf_text: &str) -> Self {
        Self::start_with::<&str>(&[], Some(conf_text))
    }

    /// The general form of [`start`](Self::start): extra command-line
    /// arguments and an optional config text.
    ///
    /// # Panics
    ///
    /// If `nats-server` cannot be found, the config is rejected, or the server
    /// does not become ready in time.
    pub fn start_with<S: AsRef<str>>(args: &[S], conf_text: Option<&str>) -> Self {
        Self::start_bin(find_nats_server(), args, conf_text)
    }

    /// Like [`start_with`](Self::start_with), with the `nats-server` binary `bin`.
    ///
    /// # Panics
    ///
    /// If the config is rejected or the server does not become ready in time.
    pub fn start_bin<S: AsRef<str>>(bin: PathBuf, args: &[S], conf_text: Option<&str>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nats-server-")
            .tempdir()
            .expect("create the nats-server temp dir");
        let config = conf_text.map(|text| {
            let path = dir.path().join("nats.conf");
            std::fs::write(&path, text).expect("write the nats-server config");
            path
        });
        let mut server = NatsServer {
            child: None,
            port: 0,
            bin,
            extra_args: args.iter().map(|a| a.as_ref().to_owned()).collect(),
            config,
            dir,
        };
        let offset = server.log_len();
        server.spawn(None);
        match server.wait_ready(offset) {
            Ok(port) => server.port = port,
            Err(why) => server.fail("start", &why),
        }
        server
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port (the same across [`restart`](Self::restart)s).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The contents of the server's log file (of all its runs, appended).
    pub fn log(&self) -> String {
        read_lossy(&self.log_path())
    }

    /// The server's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The JetStream store directory given with `-sd` (kept across restarts).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    /// The pid of the running process, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still alive (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(child) => match child.try_wait() {
                Ok(None) => true,
                Ok(Some(_)) | Err(_) => {
                    self.child = None;
                    false
                }
            },
        }
    }

    /// Kills the process with SIGKILL (no graceful shutdown, as in a crash)
    /// and waits for it to exit. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An error means it has already exited; `wait` reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, with the same store
    /// directory, log file, arguments and config, and waits (bounded) until it
    /// accepts client connections. Kills the current process first if it is
    /// still running.
    ///
    /// If the port cannot be bound yet (e.g. still held by the dying process),
    /// binding is retried for up to 5 s.
    ///
    /// # Panics
    ///
    /// If the server does not come back in time.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + REBIND_TIMEOUT;
        loop {
            let offset = self.log_len();
            self.spawn(Some(self.port));
            let why = match self.wait_ready(offset) {
                Ok(port) if port == self.port => return,
                Ok(port) => panic!(
                    "nats-server restarted on port {port} instead of {}\n{}",
                    self.port,
                    self.diagnostics()
                ),
                Err(why) => why,
            };
            let bind_failed = matches!(why, NotReady::Exited(_))
                && read_lossy_from(&self.log_path(), offset).contains("address already in use");
            if !bind_failed || Instant::now() >= deadline {
                self.fail("restart", &why);
            }
            self.child = None;
            std::thread::sleep(REBIND_PAUSE);
        }
    }

    /// Spawns the process: `-p -1` (OS-chosen port) or `-p PORT` (restart).
    fn spawn(&mut self, port: Option<u16>) {
        let dir = self.dir.path();
        let port = port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        let output = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("nats.stderr"))
            .expect("open the nats-server stderr file");
        let mut cmd = Command::new(&self.bin);
        if let Some(config) = &self.config {
            cmd.arg("-c").arg(config);
        }
        cmd.args(["-a", "127.0.0.1", "-p", &port, "-js"])
            .arg("-sd")
            .arg(self.store_dir())
            .arg("-l")
            .arg(self.log_path())
            .arg("-P")
            .arg(dir.join("nats.pid"))
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                output.try_clone().expect("clone the stderr file handle"),
            ))
            .stderr(Stdio::from(output));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// Polls the log written after `offset` until it announces the client port.
    fn wait_ready(&mut self, offset: u64) -> Result<u16, NotReady> {
        let log = self.log_path();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(port) = listening_port(&read_lossy_from(&log, offset)) {
                return Ok(port);
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                // The announcement may have landed just before the exit.
                return listening_port(&read_lossy_from(&log, offset))
                    .ok_or(NotReady::Exited(status));
            }
            if Instant::now() >= deadline {
                return Err(NotReady::TimedOut);
            }
            std::thread::sleep(READY_POLL);
        }
    }

    /// Kills the process and panics with what went wrong and the server's output.
    fn fail(&mut self, what: &str, why: &NotReady) -> ! {
        self.kill();
        let why = match why {
            NotReady::Exited(status) => format!("exited ({status})"),
            NotReady::TimedOut => format!("was not ready within {READY_TIMEOUT:?}"),
        };
        panic!(
            "nats-server {what} failed: it {why}\n{}",
            self.diagnostics()
        );
    }

    /// The last `n` lines of the server's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The binary, the stderr output and the tail of the log, for panic messages.
    fn diagnostics(&self) -> String {
        let tail = self.log_tail(30);
        format!(
            "binary: {}\n--- stderr ---\n{}\n--- log (tail) ---\n{tail}",
            self.bin.display(),
            read_lossy(&self.dir.path().join("nats.stderr")).trim_end(),
        )
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(self.log_path()).map_or(0, |m| m.len())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        // `dir` is dropped (removed) after this, with the process gone.
    }
}

/// Finds `nats-server`: `$NATS_SERVER_BIN`, else on `PATH`, else `/usr/sbin/nats-server`.
///
/// # Panics
///
/// If it is nowhere to be found.
pub fn find_nats_server() -> PathBuf {
    const MISSING: &str =
        "nats-server not found: install it with `apt-get install nats-server` or set NATS_SERVER_BIN";
    if let Some(bin) = std::env::var_os(NATS_SERVER_BIN_ENV).filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        if is_executable(&bin) {
            return bin;
        }
        panic!(
            "{MISSING} (NATS_SERVER_BIN={} is not an executable file)",
            bin.display()
        );
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .chain(std::iter::once(PathBuf::from(DEFAULT_BIN)))
        .find(|bin| is_executable(bin))
        .unwrap_or_else(|| panic!("{MISSING}"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The port of the first complete `Listening for client connections on HOST:PORT` line.
fn listening_port(log: &str) -> Option<u16> {
    // Only complete lines: the last one may still be being written.
    let complete = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
    complete.lines().find_map(|line| {
        let (_, addr) = line.split_once(LISTENING)?;
        let (_, port) = addr.trim().rsplit_once(':')?;
        port.parse().ok()
    })
}

fn read_lossy(path: &Path) -> String {
    read_lossy_from(path, 0)
}

/// The file's contents from byte `offset` (from the start if it has shrunk
/// below `offset`), or "" if it cannot be read.
fn read_lossy_from(path: &Path, offset: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let offset = if len < offset { 0 } else { offset };
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A fresh temporary directory, removed when dropped.
///
/// # Panics
///
/// If it cannot be created.
pub fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("ml-tests-")
        .tempdir()
        .expect("create a temp dir")
}

/// Polls `f` every 20 ms until it yields `Some`, and returns that value.
///
/// Each call of `f` is itself bounded by what remains of `timeout`, so the
/// whole wait never exceeds it (give or take one poll).
///
/// # Panics
///
/// With `what` in the message, if `timeout` elapses first.
pub async fn wait_for<F, Fut, T>(what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_until(timeout, f).await {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Polls `f` every 20 ms until it yields `Some` (that value) or `timeout`
/// elapses (`None`). Each call of `f` is bounded by what remains of `timeout`.
pub async fn poll_until<F, Fut, T>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    const POLL: Duration = Duration::from_millis(20);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Ok(Some(value)) = tokio::time::timeout(remaining, f()).await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::time::sleep(POLL.min(remaining)).await;
    }
}

/// Waits until a registry answers `ml.registry.models` with its listing (a
/// registry still starting answers nothing, or `unavailable`).
///
/// # Panics
///
/// If no registry answers within `timeout`.
pub async fn registry_answers(client: &async_nats::Client, timeout: Duration) {
    wait_for("the registry answers", timeout, || async {
        let reply = client.request("ml.registry.models", "".into()).await.ok()?;
        let listing: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
        listing["models"].is_array().then_some(())
    })
    .await
}

/// Installs a `tracing` subscriber printing to the test output, only when the
/// env variable `TEST_LOG` is set; filtered by `RUST_LOG` (default `info`).
/// Idempotent: later calls (and calls after another subscriber was installed)
/// do nothing.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    if std::env::var_os("TEST_LOG").is_none() {
        return;
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::listening_port;

    #[test]
    fn parses_the_listening_line() {
        let log = "[1] 2026/01/01 00:00:00.000000 [INF] Starting nats-server\n\
                   [1] 2026/01/01 00:00:00.000000 [INF] Listening for client connections on 127.0.0.1:41234\n\
                   [1] 2026/01/01 00:00:00.000000 [INF] Server is ready\n";
        assert_eq!(listening_port(log), Some(41234));
    }

    #[test]
    fn ignores_an_incomplete_line() {
        let log = "[1] 2026/01/01 00:00:00.000000 [INF] Listening for client connections on 127.0.0.1:412";
        assert_eq!(listening_port(log), None);
        assert_eq!(listening_port(""), None);
    }
}
