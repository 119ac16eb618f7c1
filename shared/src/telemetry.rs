//! Logging setup: `tracing` with an `EnvFilter` read from `RUST_LOG`, lines
//! on stderr as text (coloured only on a terminal) or as JSON
//! (`LOG_FORMAT=json`, one object per line, for log shippers).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is not set (or empty): our own `info`
/// events, and only warnings from the libraries that log (the NATS client's
/// connection chatter, the HTTP server of the monitor's metrics).
pub const DEFAULT_FILTER: &str = "info,async_nats=warn,hyper=warn,axum=warn,tower=warn,rustls=warn";

/// The environment variable that picks the log format.
pub const LOG_FORMAT_VAR: &str = "LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, with ANSI colours only when stderr is a terminal.
    Text,
    /// One JSON object per line (timestamp, level, target, fields, spans).
    Json,
}

/// A `LOG_FORMAT` value that is neither `text` nor `json`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("LOG_FORMAT must be `text` or `json`, not `{0}`")]
pub struct UnknownLogFormat(pub String);

impl std::str::FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(UnknownLogFormat(value.to_owned())),
        }
    }
}

/// Installs the global subscriber: lines on stderr, filtered by `RUST_LOG`
/// (default [`DEFAULT_FILTER`]), in the format of `LOG_FORMAT`. Safe to call
/// more than once (later calls are no-ops), which lets tests start several
/// services in one process.
pub fn init() {
    init_with_default(DEFAULT_FILTER);
}

/// As [`init`], with another default filter (`mlctl` prints warnings only).
///
/// An unknown `LOG_FORMAT` or an invalid `RUST_LOG` does not stop the
/// program: it logs in text with the default filter and says so in a warning.
pub fn init_with_default(default_filter: &str) {
    let (format, format_error) = match std::env::var(LOG_FORMAT_VAR) {
        Ok(value) => match value.parse::<LogFormat>() {
            Ok(format) => (format, None),
            Err(error) => (LogFormat::Text, Some(error)),
        },
        Err(_) => (LogFormat::Text, None),
    };
    let (filter, filter_error) = filter_from(std::env::var("RUST_LOG").ok(), default_filter);
    // Colour codes only for a person at a terminal: not in `docker compose
    // logs`, files or pipes, and never with NO_COLOR set (no-color.org).
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    // A log line that cannot be written (stderr on a full disk or past a
    // file-size limit) is lost; reporting it with `eprintln!` would panic
    // and take the service down with its logs.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let installed = match format {
        LogFormat::Text => builder.with_ansi(ansi).try_init().is_ok(),
        LogFormat::Json => builder.json().with_current_span(false).try_init().is_ok(),
    };
    if installed {
        if let Some(error) = format_error {
            tracing::warn!(%error, "logging as text");
        }
        if let Some(error) = filter_error {
            tracing::warn!(%error, default = default_filter, "invalid RUST_LOG, using the default filter");
        }
    }
}

/// The filter of a `RUST_LOG` value: the default when it is unset or blank,
/// and the default with the parse error when it is invalid.
fn filter_from(
    rust_log: Option<String>,
    default_filter: &str,
) -> (EnvFilter, Option<tracing_subscriber::filter::ParseError>) {
    match rust_log {
        Some(directives) if !directives.trim().is_empty() => {
            match EnvFilter::builder().parse(directives.trim()) {
                Ok(filter) => (filter, None),
                Err(error) => (EnvFilter::new(default_filter), Some(error)),
            }
        }
        _ => (EnvFilter::new(default_filter), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_parses_text_and_json_and_names_a_bad_value() {
        assert_eq!("".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert_eq!(" JSON ".parse::<LogFormat>(), Ok(LogFormat::Json));
        let error = "yaml".parse::<LogFormat>().unwrap_err();
        assert_eq!(error, UnknownLogFormat("yaml".to_owned()));
        assert!(error.to_string().contains("`yaml`"));
    }

    #[test]
    fn blank_or_missing_rust_log_takes_the_default_and_a_bad_one_says_why() {
        for value in [None, Some(String::new()), Some("  ".to_owned())] {
            let (filter, error) = filter_from(value, DEFAULT_FILTER);
            assert!(error.is_none());
            assert_eq!(
                filter.to_string(),
                EnvFilter::new(DEFAULT_FILTER).to_string()
            );
        }
        let (filter, error) = filter_from(Some("debug,async_nats=trace".to_owned()), "warn");
        assert!(error.is_none());
        assert!(filter.to_string().contains("async_nats=trace"));
        let (filter, error) = filter_from(Some("info,foo=notalevel".to_owned()), "warn");
        assert!(error.is_some());
        assert_eq!(filter.to_string(), "warn");
    }
}
