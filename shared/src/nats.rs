//! Connecting to NATS the same way in every service: credentials and TLS
//! from [`NatsSettings`], a bounded reconnect delay, and connection events
//! (including permission violations, which NATS reports as events rather
//! than as errors of the call that caused them) logged; and the one rule
//! every service applies to a request's reply subject ([`accept_reply`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, HeaderMap, ServerError, Subject};

use crate::messages::{ErrorReply, SERVICE_ERROR_CODE_HEADER, SERVICE_ERROR_HEADER};
use crate::settings::{Credentials, NatsSettings};

/// The longest pause between two reconnection attempts, so a service is
/// back within about this long of the server's return.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Delay before reconnection attempt `attempts` (1-based): 0 for the first,
/// then 100 ms more per attempt up to [`MAX_RECONNECT_DELAY`], plus up to
/// 10% jitter so that many clients do not reconnect in lockstep.
pub fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let base = Duration::from_millis(100)
        .saturating_mul(u32::try_from(attempts - 1).unwrap_or(u32::MAX))
        .min(MAX_RECONNECT_DELAY);
    base + base.mul_f64(rand::random::<f64>() * 0.1)
}

/// The client options for `settings`: name, request timeout, inbox prefix,
/// credentials, TLS, reconnect delay and event logging. Reading a secret
/// file or a `.creds` file may fail; the error names the file, never its
/// contents.
pub async fn options(settings: &NatsSettings, name: &str) -> anyhow::Result<ConnectOptions> {
    let service = name.to_owned();
    let mut options = ConnectOptions::new()
        .name(name)
        .request_timeout(Some(settings.request_timeout))
        .custom_inbox_prefix(&settings.nats_inbox_prefix)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let service = service.clone();
            async move { log_event(&service, event) }
        });
    options = match settings.credentials()? {
        Credentials::None => options,
        Credentials::UserPassword { user, password } => {
            options.user_and_password(user, password.expose().to_owned())
        }
        Credentials::Token(token) => options.token(token.expose().to_owned()),
        Credentials::NKey(seed) => options.nkey(seed.expose().to_owned()),
        Credentials::CredsFile(path) => options.credentials_file(&path).await.map_err(|e| {
            anyhow::anyhow!("cannot use the creds file {}: {}", path.display(), e.kind())
        })?,
    };
    if let Some(ca) = &settings.nats_tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&settings.nats_tls_cert, &settings.nats_tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let tls = settings.nats_tls_required
        || settings.nats_tls_ca.is_some()
        || settings.nats_tls_cert.is_some();
    Ok(options.require_tls(tls))
}

fn log_event(service: &str, event: Event) {
    match event {
        Event::Connected => tracing::info!(%service, "connected to NATS"),
        Event::Disconnected => tracing::warn!(%service, "disconnected from NATS"),
        Event::Draining | Event::Closed => {
            tracing::debug!(%service, event = %event, "NATS connection closing")
        }
        Event::SlowConsumer(sid) => {
            tracing::warn!(%service, sid, "slow consumer: NATS dropped messages")
        }
        Event::ServerError(ServerError::AuthorizationViolation) => tracing::error!(
            %service,
            "NATS refused the credentials (authorization violation); check NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_NKEY_SEED_FILE or NATS_CREDS"
        ),
        Event::ServerError(ServerError::Other(message))
            if message
                .to_ascii_lowercase()
                .contains("permissions violation") =>
        {
            tracing::error!(%service, %message, "NATS permission violation: this user may not use that subject")
        }
        Event::ServerError(error) => tracing::error!(%service, %error, "NATS server error"),
        Event::ClientError(error) => tracing::warn!(%service, %error, "NATS client error"),
        other => tracing::warn!(%service, event = %other, "NATS event"),
    }
}

/// Connects with `retry_on_initial_connect`, so a service may start before the
/// server: the call returns at once and the client connects (and reconnects,
/// resubscribing) in the background, retrying at least every
/// [`MAX_RECONNECT_DELAY`]. Connection events are logged.
pub async fn connect(settings: &NatsSettings, name: &str) -> anyhow::Result<Client> {
    connect_with(settings, name, |o| o).await
}

/// As [`connect`], with further options (e.g. a subscription capacity).
pub async fn connect_with(
    settings: &NatsSettings,
    name: &str,
    customise: impl FnOnce(ConnectOptions) -> ConnectOptions,
) -> anyhow::Result<Client> {
    let options = customise(options(settings, name).await?.retry_on_initial_connect());
    // NATS_URL may name several servers (a cluster), comma-separated.
    let urls: Vec<&str> = settings.nats_url.split(',').map(str::trim).collect();
    Ok(options.connect(urls).await?)
}

/// Requests refused since start because their reply subject was missing or
/// not an inbox.
static REFUSED_REPLIES: AtomicU64 = AtomicU64::new(0);

/// Whether `reply` is a subject a reply may be sent to: a client's inbox
/// (`_INBOX…`, whatever the user's `NATS_INBOX_PREFIX` after it) or a
/// response subject the server made for a request that crossed accounts
/// (`_R_.…`). A request whose reply subject names anything else (`ml.train`,
/// `ml.model.production`) is an attempt to make the service publish there
/// under its own permissions.
pub fn is_reply_inbox(reply: &str) -> bool {
    reply.starts_with("_INBOX") || reply.starts_with("_R_.")
}

/// The reply subject of a request on `subject`, when it is an inbox; `None`
/// (the request is refused unanswered, counted, and logged at the first
/// refusal and every 1,000th) when it is missing or names anything else.
/// Every service calls this before it acts on a request: a message with no
/// reply subject is also what a reply reflected through an import looks
/// like, so it is never acted on either.
pub fn accept_reply<'a>(
    service: &str,
    subject: &str,
    reply: Option<&'a Subject>,
) -> Option<&'a Subject> {
    match reply {
        Some(r) if is_reply_inbox(r) => Some(r),
        other => {
            let refused = REFUSED_REPLIES.fetch_add(1, Ordering::Relaxed) + 1;
            if refused == 1 || refused.is_multiple_of(1000) {
                tracing::warn!(
                    %service,
                    %subject,
                    reply = other.map_or("", |r| r.as_str()),
                    refused_total = refused,
                    "request refused: its reply subject is not an inbox"
                );
            }
            None
        }
    }
}

/// The body and micro-service error headers (`Nats-Service-Error`,
/// `Nats-Service-Error-Code`) of an error reply: every service's error
/// replies go through here.
pub fn error_parts(error: &ErrorReply) -> (bytes::Bytes, HeaderMap) {
    let body = serde_json::to_vec(error).expect("replies serialise");
    let code = error.error.code;
    let mut headers = HeaderMap::new();
    headers.insert(SERVICE_ERROR_HEADER, code.as_str());
    headers.insert(
        SERVICE_ERROR_CODE_HEADER,
        code.status().to_string().as_str(),
    );
    (body.into(), headers)
}

/// How many requests [`accept_reply`] refused since start.
pub fn refused_replies() -> u64 {
    REFUSED_REPLIES.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_inboxes_are_reply_subjects() {
        for ok in ["_INBOX.abc", "_INBOX_client.x.y", "_R_.abc.def"] {
            assert!(is_reply_inbox(ok), "{ok}");
        }
        for bad in [
            "ml.train",
            "ml.model.production",
            "_R_",
            "INBOX.x",
            "",
            "ml.alerts",
        ] {
            assert!(!is_reply_inbox(bad), "{bad}");
        }
        let before = refused_replies();
        let train = Subject::from("ml.train");
        assert!(accept_reply("test", "ml.predict", Some(&train)).is_none());
        assert!(accept_reply("test", "ml.predict", None).is_none());
        let inbox = Subject::from("_INBOX.1");
        assert!(accept_reply("test", "ml.predict", Some(&inbox)).is_some());
        assert!(refused_replies() >= before + 2);
    }

    #[test]
    fn reconnect_delays_grow_and_stay_bounded() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        let second = reconnect_delay(2);
        assert!(second >= Duration::from_millis(100) && second <= Duration::from_millis(110));
        for attempts in [11, 50, usize::MAX] {
            let d = reconnect_delay(attempts);
            assert!(
                d >= MAX_RECONNECT_DELAY && d <= MAX_RECONNECT_DELAY.mul_f64(1.1),
                "{attempts}: {d:?}"
            );
        }
    }
}
