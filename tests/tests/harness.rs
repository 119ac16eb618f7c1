//! Tests of the test harness itself, against real `nats-server` processes.
//!
//! Every test starts its own server on an OS-chosen port (never the default
//! 4222) and every wait is bounded.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use async_nats::jetstream;
use futures::StreamExt;
use ml_tests::{init_logging, temp_dir, wait_for, NatsServer};

/// Bound on any single network step (connect, flush, receive…).
const STEP: Duration = Duration::from_secs(5);

async fn connect(url: &str) -> Result<async_nats::Client> {
    tokio::time::timeout(STEP, async_nats::connect(url))
        .await
        .with_context(|| format!("connecting to {url} timed out"))?
        .with_context(|| format!("connecting to {url}"))
}

/// Subscribes, publishes one message and checks it comes back.
async fn round_trip(
    client: &async_nats::Client,
    subject: &str,
    payload: &'static str,
) -> Result<()> {
    let mut sub = client.subscribe(subject.to_owned()).await?;
    tokio::time::timeout(STEP, client.flush())
        .await
        .context("flush after subscribe timed out")??;
    client.publish(subject.to_owned(), payload.into()).await?;
    tokio::time::timeout(STEP, client.flush())
        .await
        .context("flush after publish timed out")??;
    let msg = tokio::time::timeout(STEP, sub.next())
        .await
        .with_context(|| format!("no message on {subject} within {STEP:?}"))?
        .context("subscription closed")?;
    ensure!(msg.subject.as_str() == subject, "subject {}", msg.subject);
    ensure!(
        msg.payload == payload.as_bytes(),
        "payload {:?}",
        msg.payload
    );
    Ok(())
}

#[tokio::test]
async fn server_starts_and_round_trips_a_message() -> Result<()> {
    init_logging();
    let mut server = NatsServer::start();
    assert!(server.is_running());
    assert_ne!(server.port(), 0);
    assert_ne!(server.port(), 4222, "must never use the default port");
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));

    let client = connect(&server.url()).await?;
    round_trip(&client, "harness.hello", "hello").await
}

#[tokio::test]
async fn concurrent_servers_get_different_ports() -> Result<()> {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(NatsServer::start);
        let b = s.spawn(NatsServer::start);
        (a.join().expect("server a"), b.join().expect("server b"))
    });
    assert_ne!(a.port(), b.port());
    assert_ne!(a.dir(), b.dir());

    let client_a = connect(&a.url()).await?;
    let client_b = connect(&b.url()).await?;
    round_trip(&client_a, "harness.a", "a").await?;
    round_trip(&client_b, "harness.b", "b").await
}

#[tokio::test]
async fn kill_then_restart_on_the_same_port() -> Result<()> {
    let mut server = NatsServer::start();
    let port = server.port();
    let old_client = connect(&server.url()).await?;
    round_trip(&old_client, "harness.before", "before").await?;

    server.kill();
    assert!(!server.is_running());
    assert!(server.pid().is_none());
    let refused = tokio::time::timeout(STEP, async_nats::connect(server.url()))
        .await
        .context("connect to a killed server should fail fast, not hang")?;
    assert!(refused.is_err(), "connected to a killed server");
    server.kill(); // a second kill is a no-op

    server.restart();
    assert!(server.is_running());
    assert_eq!(server.port(), port, "restart must keep the port");
    assert_eq!(server.url(), format!("nats://127.0.0.1:{port}"));

    let new_client = connect(&server.url()).await?;
    round_trip(&new_client, "harness.after", "after").await?;

    // A client of the first run reconnects on its own to the same address.
    wait_for(
        "the old client to reconnect",
        Duration::from_secs(15),
        || {
            let connected =
                old_client.connection_state() == async_nats::connection::State::Connected;
            async move { connected.then_some(()) }
        },
    )
    .await;
    round_trip(&old_client, "harness.reconnected", "again").await?;

    // A second restart works too (the log holds several runs by now).
    server.restart();
    assert_eq!(server.port(), port);
    let third = connect(&server.url()).await?;
    round_trip(&third, "harness.third", "third").await
}

#[tokio::test]
async fn jetstream_data_survives_a_restart() -> Result<()> {
    let mut server = NatsServer::start();
    {
        let js = jetstream::new(connect(&server.url()).await?);
        tokio::time::timeout(
            STEP,
            js.create_stream(jetstream::stream::Config {
                name: "HARNESS".into(),
                subjects: vec!["harness.js.>".into()],
                ..Default::default()
            }),
        )
        .await??;
        let ack = js.publish("harness.js.one", "kept".into()).await?;
        tokio::time::timeout(STEP, ack).await??;
    }
    assert!(server.store_dir().exists());

    server.kill();
    server.restart();

    let js = jetstream::new(connect(&server.url()).await?);
    let mut stream = tokio::time::timeout(STEP, js.get_stream("HARNESS")).await??;
    let info = tokio::time::timeout(STEP, stream.info()).await??;
    assert_eq!(info.state.messages, 1);
    let msg = tokio::time::timeout(STEP, stream.get_raw_message(1)).await??;
    assert_eq!(msg.payload, "kept".as_bytes());
    Ok(())
}

#[test]
fn log_contains_the_port() {
    let server = NatsServer::start();
    let log = server.log();
    assert!(log.contains("Listening for client connections on"), "{log}");
    assert!(
        log.contains(&format!("127.0.0.1:{}", server.port())),
        "log does not mention port {}:\n{log}",
        server.port()
    );
    assert!(log.contains("Starting JetStream"), "{log}");
}

#[tokio::test]
async fn start_with_config_applies_authorization() -> Result<()> {
    let server = NatsServer::start_with_config(
        r#"
        authorization {
            user: alice
            password: s3cret
        }
        "#,
    );
    assert!(server.dir().join("nats.conf").exists());

    let anonymous = tokio::time::timeout(STEP, async_nats::connect(server.url()))
        .await
        .context("anonymous connect should be rejected, not hang")?;
    assert!(anonymous.is_err(), "anonymous client was let in");

    let client = tokio::time::timeout(
        STEP,
        async_nats::ConnectOptions::with_user_and_password("alice".into(), "s3cret".into())
            .connect(server.url()),
    )
    .await??;
    round_trip(&client, "harness.auth", "authorized").await
}

#[tokio::test]
async fn start_with_args_passes_them_on() -> Result<()> {
    let server = NatsServer::start_with_args(&["--server_name", "harness-test"]);
    let client = connect(&server.url()).await?;
    assert_eq!(client.server_info().server_name, "harness-test");
    Ok(())
}

#[tokio::test]
async fn drop_kills_the_server_and_removes_its_dir() -> Result<()> {
    let server = NatsServer::start();
    let url = server.url();
    let dir = server.dir().to_path_buf();
    let pid = server.pid().context("a pid")?;
    assert!(dir.exists());
    drop(server);

    assert!(!dir.exists(), "temp dir {} left behind", dir.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} still exists"
    );
    let refused = tokio::time::timeout(STEP, async_nats::connect(url))
        .await
        .context("connect to a dropped server should fail fast, not hang")?;
    assert!(refused.is_err(), "connected to a dropped server");
    Ok(())
}

#[tokio::test]
async fn wait_for_returns_the_value_once_ready() {
    let mut calls = 0;
    let value = wait_for("the third call", Duration::from_secs(5), || {
        calls += 1;
        let n = calls;
        async move { (n >= 3).then_some(n * 10) }
    })
    .await;
    assert_eq!(value, 30);
}

#[tokio::test]
#[should_panic(expected = "waiting for something that never happens")]
async fn wait_for_panics_after_the_timeout() {
    wait_for(
        "something that never happens",
        Duration::from_millis(100),
        || async { None::<()> },
    )
    .await;
}

#[tokio::test]
#[should_panic(expected = "waiting for a hanging check")]
async fn wait_for_bounds_a_hanging_check() {
    wait_for("a hanging check", Duration::from_millis(100), || {
        std::future::pending::<Option<()>>()
    })
    .await;
}

#[test]
fn temp_dir_is_created_and_removed() {
    let dir = temp_dir();
    let path = dir.path().to_path_buf();
    assert!(path.is_dir());
    drop(dir);
    assert!(!path.exists());
}

#[tokio::test]
async fn restart_retries_while_the_port_is_busy() -> Result<()> {
    let mut server = NatsServer::start();
    let port = server.port();
    server.kill();

    // Hold the port for a while, as a slow-dying process would.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port))?;
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        drop(squatter);
    });
    server.restart();
    releaser.join().expect("releaser thread");

    assert_eq!(server.port(), port);
    assert!(server.log().contains("address already in use"));
    let client = connect(&server.url()).await?;
    round_trip(&client, "harness.rebound", "rebound").await
}

#[test]
#[should_panic(expected = "nats-server start failed")]
fn a_bad_config_fails_fast_with_diagnostics() {
    NatsServer::start_with_config("authorization { user: ");
}
