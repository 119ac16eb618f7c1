//! Configuration shared by every service: where NATS is and which subject
//! prefix to use. Each value is a command-line flag with an environment
//! variable of the same meaning; the flag wins when both are given.

use std::time::Duration;

use clap::Args;

use crate::subjects::Subjects;

/// Connection settings common to all services and to `mlctl`.
#[derive(Debug, Clone, Args)]
pub struct NatsSettings {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://localhost:4222")]
    pub nats_url: String,

    /// Prefix of every subject the platform uses.
    #[arg(long, env = "ML_SUBJECT_PREFIX", default_value = Subjects::DEFAULT_PREFIX)]
    pub subject_prefix: String,

    /// How long a request to another service may wait for its reply.
    #[arg(long, env = "NATS_REQUEST_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub request_timeout: Duration,
}

impl NatsSettings {
    /// Settings for a server URL with every other value at its default.
    pub fn for_url(url: impl Into<String>) -> Self {
        Self {
            nats_url: url.into(),
            subject_prefix: Subjects::DEFAULT_PREFIX.to_owned(),
            request_timeout: Duration::from_secs(5),
        }
    }

    /// The subjects under the configured prefix.
    pub fn subjects(&self) -> Subjects {
        Subjects::new(&self.subject_prefix)
    }
}

/// Parses `250ms`, `10s`, `1m`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("{text:?} is not a non-negative number of seconds"));
    }
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_and_without_units() {
        assert_eq!(parse_duration("60").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
