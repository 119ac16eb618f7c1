//! A real Prometheus server for one test, and a minimal HTTP client to read
//! `/metrics` and query Prometheus's HTTP API.
//!
//! [`Prometheus::start`] runs the `prometheus` binary (`$PROMETHEUS_BIN`,
//! else on `PATH`, else `/usr/bin/prometheus`, where Debian's package puts
//! it) with its own config (scrape every second), its own TSDB directory and
//! an OS-chosen port on 127.0.0.1; dropping it kills the process and removes
//! the directory. A missing binary is a test failure that says how to
//! install it, never a silent pass.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Env variable naming the `prometheus` binary to use.
pub const PROMETHEUS_BIN_ENV: &str = "PROMETHEUS_BIN";

/// Where Debian's `prometheus` package installs the server.
const DEFAULT_BIN: &str = "/usr/bin/prometheus";

/// Longest wait for one HTTP exchange.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A private Prometheus scraping given targets every second.
#[derive(Debug)]
pub struct Prometheus {
    child: Option<Child>,
    addr: String,
    dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`, path `/metrics`)
    /// as job `monitor`. Does not wait: see [`wait_ready`](Self::wait_ready).
    ///
    /// # Panics
    ///
    /// If the binary cannot be found or started.
    pub fn start(targets: &[String]) -> Self {
        let bin = find_prometheus();
        let dir = tempfile::Builder::new()
            .prefix("prometheus-")
            .tempdir()
            .expect("create the prometheus temp dir");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: monitor\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write the prometheus config");
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        Self {
            child: Some(child),
            addr,
            dir,
        }
    }

    /// `127.0.0.1:PORT` of its HTTP API.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Waits (at most `timeout`) until `/-/ready` answers 200.
    ///
    /// # Panics
    ///
    /// With the server's log, if it exits or is not ready in time.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = http_get(&self.addr, "/-/ready").await {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("prometheus not ready within {timeout:?}:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs an instant query; returns `data.result`, or an error with
    /// Prometheus's answer when the query failed.
    pub async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, body) = http_get(&self.addr, &path)
            .await
            .map_err(|e| e.to_string())?;
        let json: Value =
            serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
        if json["status"] != "success" {
            return Err(format!("{status}: {json}"));
        }
        Ok(json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The value of a query whose result is one sample, if it has one.
    pub async fn query_scalar(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql).await.ok()?;
        let [sample] = result.as_slice() else {
            return None;
        };
        sample["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Finds `prometheus`: `$PROMETHEUS_BIN`, else on `PATH`, else `/usr/bin/prometheus`.
///
/// # Panics
///
/// If it is nowhere to be found.
fn find_prometheus() -> PathBuf {
    const MISSING: &str = "prometheus not found: install it with `apt-get install prometheus` \
         (.ci/run does when it is missing) or set PROMETHEUS_BIN";
    if let Some(bin) = std::env::var_os(PROMETHEUS_BIN_ENV).filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        assert!(is_file(&bin), "{MISSING} ({} is not a file)", bin.display());
        return bin;
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("prometheus"))
        .chain(std::iter::once(PathBuf::from(DEFAULT_BIN)))
        .find(|bin| is_file(bin))
        .unwrap_or_else(|| panic!("{MISSING}"))
}

fn is_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// A port that was free a moment ago on 127.0.0.1 (for servers that must be
/// told their port, such as Prometheus and its targets).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// `GET path` from `addr` over HTTP/1.0 (the server closes the connection
/// after its answer); returns the status and the body. Bounded by 10 s.
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await?;
        Ok::<_, std::io::Error>(bytes)
    };
    let bytes = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP exchange"))??;
    let text = String::from_utf8_lossy(&bytes);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad answer: {head}"),
            )
        })?;
    Ok((status, body.to_owned()))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::percent_encode;

    #[test]
    fn encodes_promql() {
        assert_eq!(
            percent_encode(r#"sum by (le) (x{a="b"})"#),
            "sum%20by%20%28le%29%20%28x%7Ba%3D%22b%22%7D%29"
        );
    }
}
