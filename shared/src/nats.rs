//! Connecting to NATS the same way in every service.

use async_nats::{Client, ConnectOptions, Event};

use crate::settings::NatsSettings;

/// Connects with `retry_on_initial_connect`, so a service may start before the
/// server: the call returns at once and the client connects (and reconnects,
/// resubscribing) in the background. Connection events are logged.
pub async fn connect(settings: &NatsSettings, name: &str) -> anyhow::Result<Client> {
    let service = name.to_owned();
    let client = ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .request_timeout(Some(settings.request_timeout))
        .event_callback(move |event| {
            let service = service.clone();
            async move {
                match event {
                    Event::Connected => tracing::info!(%service, "connected to NATS"),
                    Event::Disconnected => tracing::warn!(%service, "disconnected from NATS"),
                    Event::Draining | Event::Closed => {
                        tracing::debug!(%service, event = %event, "NATS connection closing")
                    }
                    Event::SlowConsumer(sid) => {
                        tracing::warn!(%service, sid, "slow consumer: NATS dropped messages")
                    }
                    other => tracing::warn!(%service, event = %other, "NATS event"),
                }
            }
        })
        .connect(settings.nats_url.as_str())
        .await?;
    Ok(client)
}
