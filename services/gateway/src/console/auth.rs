//! Console operators and their sessions, without server-side state (so any
//! replica accepts a session another one opened):
//!
//! * operators are `name:password` pairs from `GATEWAY_OPERATORS` or
//!   `GATEWAY_OPERATORS_FILE`; passwords are compared in constant time;
//! * a session is a cookie `mlp_session=<name hex>.<expiry ms>.<MAC>`, the
//!   MAC an HMAC-SHA256 under a key derived from the operator list (every
//!   replica with the same configuration derives the same key; changing a
//!   password ends every session); `HttpOnly`, `SameSite=Strict`;
//! * every form that changes something carries a CSRF token, the HMAC of
//!   the session cookie, and is refused without it, and when its `Origin`
//!   header names another host.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::Config;

/// The session cookie's name.
pub const COOKIE: &str = "mlp_session";

/// Most operators a configuration may list.
pub const MAX_OPERATORS: usize = 1000;

/// The configured operators and the session key.
#[derive(Clone)]
pub struct Operators {
    operators: Vec<(String, [u8; 32])>,
    key: [u8; 32],
    ttl: Duration,
}

impl std::fmt::Debug for Operators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operators")
            .field("count", &self.operators.len())
            .finish_non_exhaustive()
    }
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// HMAC-SHA256 (RFC 2104) with a 32-byte key.
pub fn hmac(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let inner = sha256(&[&ipad, message]);
    sha256(&[&opad, &inner])
}

/// Equality whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 512 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Parses `name:password` entries separated by commas or new lines.
pub fn parse_operators(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for entry in text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        if entry.starts_with('#') {
            continue;
        }
        let (name, password) = entry
            .split_once(':')
            .filter(|(n, p)| !n.trim().is_empty() && !p.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "an operator entry is not name:password (entry {})",
                    out.len() + 1
                )
            })?;
        let name = name.trim();
        if name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_alphanumeric() || "-_.@".contains(c))
        {
            anyhow::bail!("operator name {name:?}: at most 64 letters, digits, '-', '_', '.', '@'");
        }
        out.push((name.to_owned(), password.to_owned()));
    }
    anyhow::ensure!(
        out.len() <= MAX_OPERATORS,
        "more than {MAX_OPERATORS} operators"
    );
    Ok(out)
}

impl Operators {
    /// Reads the operators from the configuration.
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let text = match (&config.operators, &config.operators_file) {
            (Some(secret), _) => secret.expose().to_owned(),
            (None, Some(path)) => read(path)?,
            (None, None) => String::new(),
        };
        Ok(Self::new(parse_operators(&text)?, config.session_ttl))
    }

    /// Operators from `(name, password)` pairs.
    pub fn new(pairs: Vec<(String, String)>, ttl: Duration) -> Self {
        let mut material: Vec<u8> = b"mlplatform gateway session key v1\0".to_vec();
        for (name, password) in &pairs {
            material.extend_from_slice(name.as_bytes());
            material.push(0);
            material.extend_from_slice(password.as_bytes());
            material.push(0);
        }
        let key = sha256(&[&material]);
        let operators = pairs
            .into_iter()
            .map(|(n, p)| {
                let digest = sha256(&[p.as_bytes()]);
                (n, digest)
            })
            .collect();
        Self {
            operators,
            key,
            ttl,
        }
    }

    /// How many operators.
    pub fn count(&self) -> usize {
        self.operators.len()
    }

    /// Checks a name and password; every entry is compared, in constant time.
    pub fn check(&self, name: &str, password: &str) -> bool {
        let digest = sha256(&[password.as_bytes()]);
        let mut found = false;
        for (n, d) in &self.operators {
            let same =
                constant_time_eq(n.as_bytes(), name.as_bytes()) & constant_time_eq(d, &digest);
            found |= same;
        }
        found
    }

    /// A session cookie value for `name`, valid until `now_ms + ttl`.
    pub fn session(&self, name: &str, now_ms: u64) -> String {
        let expiry = now_ms.saturating_add(self.ttl.as_millis() as u64);
        let body = format!("{}.{expiry}", hex(name.as_bytes()));
        let mac = hmac(&self.key, format!("session|{body}").as_bytes());
        format!("{body}.{}", hex(&mac))
    }

    /// The operator a cookie value names, if its MAC holds, it has not
    /// expired and the operator still exists.
    pub fn verify(&self, cookie: &str, now_ms: u64) -> Option<String> {
        let (body, mac) = cookie.rsplit_once('.')?;
        let (name_hex, expiry) = body.split_once('.')?;
        let want = hmac(&self.key, format!("session|{body}").as_bytes());
        if !constant_time_eq(&unhex(mac)?, &want) {
            return None;
        }
        if expiry.parse::<u64>().ok()? < now_ms {
            return None;
        }
        let name = String::from_utf8(unhex(name_hex)?).ok()?;
        self.operators
            .iter()
            .any(|(n, _)| *n == name)
            .then_some(name)
    }

    /// The CSRF token that goes with a session cookie.
    pub fn csrf(&self, cookie: &str) -> String {
        hex(&hmac(&self.key, format!("csrf|{cookie}").as_bytes()))
    }

    /// Whether `token` is the CSRF token of `cookie`.
    pub fn csrf_ok(&self, cookie: &str, token: &str) -> bool {
        constant_time_eq(self.csrf(cookie).as_bytes(), token.as_bytes())
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    // The contents are secret: the error names the file only.
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The session cookie's value in a request, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// Whether the request's `Origin` (when sent) is the host it was sent to.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
        return true;
    };
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let origin = origin.to_str().unwrap_or("");
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    !host.is_empty() && origin_host == host
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_style_vector() {
        // HMAC-SHA256 with a 32-byte key of 0x0b and "Hi There" (computed
        // with Python's hmac module).
        let mac = hmac(&[0x0b; 32], b"Hi There");
        assert_eq!(
            hex(&mac),
            "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"
        );
    }

    #[test]
    fn sessions_verify_expire_and_resist_tampering() {
        let ops = Operators::new(
            vec![("alice".into(), "pw1".into()), ("bob".into(), "pw2".into())],
            Duration::from_secs(60),
        );
        assert!(ops.check("alice", "pw1"));
        assert!(!ops.check("alice", "pw2"));
        assert!(!ops.check("carol", "pw1"));
        let cookie = ops.session("alice", 1_000);
        assert_eq!(ops.verify(&cookie, 2_000).as_deref(), Some("alice"));
        assert_eq!(ops.verify(&cookie, 1_000 + 61_000), None);
        let forged = cookie.replace(&hex(b"alice"), &hex(b"bob"));
        assert_eq!(ops.verify(&forged, 2_000), None);
        let other = Operators::new(
            vec![("alice".into(), "changed".into())],
            Duration::from_secs(60),
        );
        assert_eq!(other.verify(&cookie, 2_000), None);
        let token = ops.csrf(&cookie);
        assert!(ops.csrf_ok(&cookie, &token));
        assert!(!ops.csrf_ok(&ops.session("bob", 1_000), &token));
    }

    #[test]
    fn operator_lists_parse() {
        let ops = parse_operators("alice:pw1, bob:p:w2\n# comment\n").unwrap();
        assert_eq!(
            ops,
            vec![
                ("alice".into(), "pw1".into()),
                ("bob".into(), "p:w2".into())
            ]
        );
        assert!(parse_operators("alice").is_err());
        assert!(parse_operators("al ice:pw").is_err());
    }
}
