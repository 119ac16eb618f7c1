//! `mlctl up`: the whole platform on this machine, without Docker.
//!
//! Uses the NATS server at `NATS_URL` when one answers; otherwise starts
//! `nats-server` from PATH on that URL's port (JetStream on, store in a
//! temporary directory). Then starts `registry`, `predictor`, `monitor` and
//! `trainer` (found beside `mlctl`, or in `--bin-dir`) with their output on
//! this terminal. Ctrl-C or SIGTERM stops them in reverse order with SIGTERM,
//! waiting up to `--stop-timeout` for each before killing it; if one exits by
//! itself, the others are stopped too and `up` fails.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use ml_shared::settings::{parse_duration, NatsSettings};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// The services, in start order.
pub const SERVICES: [&str; 4] = ["registry", "predictor", "monitor", "trainer"];

/// Options of `mlctl up`.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Directory holding the service binaries (default: the one holding mlctl).
    #[arg(long, env = "ML_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// The nats-server binary to start when no server answers at NATS_URL.
    #[arg(long, env = "NATS_SERVER_BIN", default_value = "nats-server")]
    pub nats_server: String,
    /// How long each process may take to stop after SIGTERM.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub stop_timeout: Duration,
}

struct Process {
    name: String,
    child: Child,
}

/// Runs `mlctl up` until a signal or a child's exit.
pub async fn run(nats: &NatsSettings, args: UpArgs) -> anyhow::Result<ExitCode> {
    let bin_dir = match args.bin_dir.clone() {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .context("mlctl has no parent directory")?
            .to_owned(),
    };
    let mut processes = Vec::new();
    // The local server's store, if one is started, lives as long as `up`.
    let _store = match ensure_server(nats, &args, &mut processes).await {
        Ok(store) => store,
        Err(e) => {
            stop_all(&mut processes, args.stop_timeout).await;
            return Err(e);
        }
    };
    for name in SERVICES {
        match start_service(nats, &bin_dir, name) {
            Ok(process) => processes.push(process),
            Err(e) => {
                stop_all(&mut processes, args.stop_timeout).await;
                return Err(e);
            }
        }
    }
    eprintln!(
        "mlctl up: {} running; Ctrl-C stops them",
        SERVICES.join(", ")
    );
    let failed = wait_for_exit(&mut processes).await;
    stop_all(&mut processes, args.stop_timeout).await;
    match failed {
        Some(reason) => bail!("{reason}; stopped the others"),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// Uses the NATS server at `NATS_URL`, or starts one (JetStream on, a
/// temporary store, returned) and waits until it accepts connections.
async fn ensure_server(
    nats: &NatsSettings,
    args: &UpArgs,
    processes: &mut Vec<Process>,
) -> anyhow::Result<Option<tempfile::TempDir>> {
    if crate::connect(nats).await.is_ok() {
        eprintln!("mlctl up: using the NATS server at {}", nats.nats_url);
        return Ok(None);
    }
    let port = port_of(&nats.nats_url);
    let store = tempfile::tempdir()?;
    eprintln!(
        "mlctl up: no NATS server at {}; starting {} on port {port}",
        nats.nats_url, args.nats_server
    );
    let child = Command::new(&args.nats_server)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store.path())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (install nats-server, or set NATS_URL)",
                args.nats_server
            )
        })?;
    processes.push(Process {
        name: "nats-server".into(),
        child,
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while crate::connect(nats).await.is_err() {
        if tokio::time::Instant::now() > deadline {
            bail!("nats-server did not accept connections within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Some(store))
}

/// Starts one of the platform's binaries from `bin_dir`.
fn start_service(nats: &NatsSettings, bin_dir: &Path, name: &str) -> anyhow::Result<Process> {
    let path = bin_dir.join(name);
    let child = Command::new(&path)
        .env("NATS_URL", &nats.nats_url)
        .env("ML_SUBJECT_PREFIX", &nats.subject_prefix)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with `cargo build --release`)",
                path.display()
            )
        })?;
    Ok(Process {
        name: name.into(),
        child,
    })
}

/// Waits for Ctrl-C or SIGTERM (`None`), or for a process to exit (what
/// became of it).
async fn wait_for_exit(processes: &mut [Process]) -> Option<String> {
    let signal = ml_shared::shutdown::shutdown_signal();
    tokio::pin!(signal);
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            () = &mut signal => return None,
            _ = ticker.tick() => {
                if let Some(exited) = processes.iter_mut().find_map(|p| {
                    p.child.try_wait().ok().flatten().map(|status| format!("{} exited ({status})", p.name))
                }) {
                    return Some(exited);
                }
            }
        }
    }
}

/// SIGTERM to each process in reverse start order, then SIGKILL after `timeout`.
async fn stop_all(processes: &mut Vec<Process>, timeout: Duration) {
    while let Some(mut p) = processes.pop() {
        if let Ok(Some(_)) = p.child.try_wait() {
            continue;
        }
        if let Some(pid) = p.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        match tokio::time::timeout(timeout, p.child.wait()).await {
            Ok(_) => eprintln!("mlctl up: {} stopped", p.name),
            Err(_) => {
                eprintln!(
                    "mlctl up: {} did not stop in {timeout:?}; killing it",
                    p.name
                );
                let _ = p.child.kill().await;
            }
        }
    }
}

fn port_of(url: &str) -> u16 {
    let first = url.split(',').next().unwrap_or(url);
    let host_port = first.rsplit("://").next().unwrap_or(first);
    let host_port = host_port.rsplit('@').next().unwrap_or(host_port);
    host_port
        .rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .unwrap_or(4222)
}

#[cfg(test)]
mod tests {
    use super::port_of;

    #[test]
    fn ports_are_read_from_urls() {
        assert_eq!(port_of("nats://localhost:4222"), 4222);
        assert_eq!(port_of("nats://u:p@127.0.0.1:5000"), 5000);
        assert_eq!(port_of("localhost"), 4222);
        assert_eq!(port_of("nats://a:1,nats://b:2"), 1);
    }
}
