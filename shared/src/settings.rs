//! Configuration shared by every service: where NATS is, which subject
//! prefix to use, and how to authenticate. Each value is a command-line flag
//! with an environment variable of the same meaning; the flag wins when both
//! are given.
//!
//! Secrets (passwords, tokens) are held in [`Secret`], whose `Debug` and
//! `Display` print `[redacted]`, so printing a configuration never shows them;
//! `--help` hides their environment values too. Prefer the `*_FILE` forms
//! (a file holding the secret, such as a Docker secret) to variables, which
//! `docker inspect` and `/proc/PID/environ` reveal.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

use crate::subjects::Subjects;

/// A secret string: usable, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for handing to the NATS client and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

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

    /// NATS user name (with NATS_PASSWORD or NATS_PASSWORD_FILE).
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,

    /// NATS password (prefer NATS_PASSWORD_FILE).
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<Secret>,

    /// File holding the NATS password.
    #[arg(long, env = "NATS_PASSWORD_FILE", conflicts_with = "nats_password")]
    pub nats_password_file: Option<PathBuf>,

    /// NATS authentication token (prefer NATS_TOKEN_FILE).
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<Secret>,

    /// File holding the NATS authentication token.
    #[arg(long, env = "NATS_TOKEN_FILE", conflicts_with = "nats_token")]
    pub nats_token_file: Option<PathBuf>,

    /// File holding an nkey seed (`SU…`) to sign the server's challenge with.
    #[arg(long, env = "NATS_NKEY_SEED_FILE")]
    pub nats_nkey_seed_file: Option<PathBuf>,

    /// A `.creds` file (user JWT and nkey seed), for decentralised auth.
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,

    /// PEM file of the CA(s) that signed the server's certificate.
    #[arg(long, env = "NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,

    /// PEM client certificate, when the server verifies clients (with NATS_TLS_KEY).
    #[arg(long, env = "NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,

    /// PEM private key of the client certificate.
    #[arg(long, env = "NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,

    /// Refuse to talk to a server without TLS.
    #[arg(long, env = "NATS_TLS_REQUIRED", default_value_t = false, action = clap::ArgAction::Set)]
    pub nats_tls_required: bool,

    /// Prefix of this client's reply subjects (a server can then let each
    /// user read only its own replies).
    #[arg(long, env = "NATS_INBOX_PREFIX", default_value = "_INBOX")]
    pub nats_inbox_prefix: String,
}

/// How a client proves who it is, read from the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// No authentication.
    None,
    /// User and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: Secret,
    },
    /// A token.
    Token(Secret),
    /// An nkey seed.
    NKey(Secret),
    /// A `.creds` file.
    CredsFile(PathBuf),
}

/// Why the authentication settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// More than one way to authenticate was given.
    #[error("give one way to authenticate, not {0}")]
    Ambiguous(String),
    /// A user without a password, or a password without a user.
    #[error("NATS_USER and NATS_PASSWORD (or NATS_PASSWORD_FILE) go together")]
    Incomplete,
    /// A secret file cannot be read (its contents are never shown).
    #[error("cannot read {path}: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A secret file is empty.
    #[error("{0} is empty")]
    EmptyFile(PathBuf),
}

fn read_secret(path: &Path) -> Result<Secret, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Err(SettingsError::EmptyFile(path.to_owned()));
    }
    Ok(Secret::new(text))
}

impl NatsSettings {
    /// Settings for a server URL with every other value at its default.
    pub fn for_url(url: impl Into<String>) -> Self {
        Self {
            nats_url: url.into(),
            subject_prefix: Subjects::DEFAULT_PREFIX.to_owned(),
            request_timeout: Duration::from_secs(5),
            nats_user: None,
            nats_password: None,
            nats_password_file: None,
            nats_token: None,
            nats_token_file: None,
            nats_nkey_seed_file: None,
            nats_creds: None,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            nats_tls_required: false,
            nats_inbox_prefix: "_INBOX".to_owned(),
        }
    }

    /// The subjects under the configured prefix.
    pub fn subjects(&self) -> Subjects {
        Subjects::new(&self.subject_prefix)
    }

    /// The credentials to present, reading any secret file.
    pub fn credentials(&self) -> Result<Credentials, SettingsError> {
        let password = match (&self.nats_password, &self.nats_password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(path)) => Some(read_secret(path)?),
            (None, None) => None,
        };
        let token = match (&self.nats_token, &self.nats_token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => Some(read_secret(path)?),
            (None, None) => None,
        };
        let user = match (&self.nats_user, password) {
            (Some(user), Some(password)) => Some((user.clone(), password)),
            (None, None) => None,
            _ => return Err(SettingsError::Incomplete),
        };
        let mut given = Vec::new();
        if user.is_some() {
            given.push("a user and password");
        }
        if token.is_some() {
            given.push("a token");
        }
        if self.nats_nkey_seed_file.is_some() {
            given.push("an nkey seed");
        }
        if self.nats_creds.is_some() {
            given.push("a creds file");
        }
        if given.len() > 1 {
            return Err(SettingsError::Ambiguous(given.join(" and ")));
        }
        Ok(if let Some((user, password)) = user {
            Credentials::UserPassword { user, password }
        } else if let Some(token) = token {
            Credentials::Token(token)
        } else if let Some(path) = &self.nats_nkey_seed_file {
            Credentials::NKey(read_secret(path)?)
        } else if let Some(path) = &self.nats_creds {
            Credentials::CredsFile(path.clone())
        } else {
            Credentials::None
        })
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
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        nats: NatsSettings,
    }

    fn parse(args: &[&str]) -> Result<NatsSettings, clap::Error> {
        Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied())).map(|c| c.nats)
    }

    #[test]
    fn durations_parse_with_and_without_units() {
        assert_eq!(parse_duration("60").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let s = parse(&["--nats-user", "svc", "--nats-password", "hunter2-s3cret"]).unwrap();
        let shown = format!("{s:?} {:#?}", s.credentials().unwrap());
        assert!(!shown.contains("hunter2-s3cret"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
        let s = parse(&["--nats-token", "tok-s3cret"]).unwrap();
        assert!(!format!("{s:?}").contains("tok-s3cret"));
        assert_eq!(
            s.credentials().unwrap(),
            Credentials::Token(Secret::new("tok-s3cret"))
        );
    }

    #[test]
    fn secrets_are_read_from_files_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let s = parse(&[
            "--nats-user",
            "svc",
            "--nats-password-file",
            file.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(
            s.credentials().unwrap(),
            Credentials::UserPassword {
                user: "svc".into(),
                password: Secret::new("from-file")
            }
        );
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(s.credentials(), Err(SettingsError::EmptyFile(_))));
        let missing = parse(&["--nats-token-file", "/nonexistent/token"]).unwrap();
        assert!(matches!(
            missing.credentials(),
            Err(SettingsError::Unreadable { .. })
        ));
    }

    #[test]
    fn inconsistent_credentials_are_refused() {
        let s = parse(&["--nats-user", "svc"]).unwrap();
        assert!(matches!(s.credentials(), Err(SettingsError::Incomplete)));
        let s = parse(&["--nats-password", "p"]).unwrap();
        assert!(matches!(s.credentials(), Err(SettingsError::Incomplete)));
        let s = parse(&[
            "--nats-user",
            "u",
            "--nats-password",
            "p",
            "--nats-token",
            "t",
        ])
        .unwrap();
        assert!(matches!(s.credentials(), Err(SettingsError::Ambiguous(_))));
        assert!(
            parse(&["--nats-tls-cert", "c.pem"]).is_err(),
            "a cert needs its key"
        );
        assert_eq!(
            parse(&[]).unwrap().credentials().unwrap(),
            Credentials::None
        );
    }
}
