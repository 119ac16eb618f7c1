//! `mlctl secrets`: a `.env` file for docker compose with a fresh random
//! password for every NATS user, and the bcrypt hash of each for the server.
//!
//! The server's `nats.conf` reads only the hashes
//! (`NATS_<USER>_PASSWORD_HASH`); each service gets its own plain password
//! (`NATS_<USER>_PASSWORD`). Hash values hold `$`, so they are written in
//! single quotes, which docker compose (v1 and v2) reads literally.

use std::fmt::Write as _;

use rand::distributions::Alphanumeric;
use rand::Rng;

/// The users of the shipped `deploy/nats/nats.conf`.
pub const USERS: [&str; 7] = [
    "registry",
    "trainer",
    "predictor",
    "monitor",
    "client",
    "admin",
    "gateway",
];

/// bcrypt cost of the hashes: the server checks a password once per
/// connection, so a slow hash costs little and slows guessing a lot.
pub const COST: u32 = 11;

/// A random password of 32 letters and digits (about 190 bits).
pub fn password() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// The bcrypt hash of `password`, in the `$2b$` form the server reads.
pub fn hash(password: &str, cost: u32) -> anyhow::Result<String> {
    Ok(bcrypt::hash(password, cost)?)
}

/// The `.env` text: a password and its hash per user.
pub fn env_file() -> anyhow::Result<String> {
    let mut out = String::from(
        "# Made by `mlctl secrets`: one random password per NATS user and its bcrypt hash.\n\
         # Keep this file private; docker compose reads it from the project directory.\n",
    );
    for user in USERS {
        let upper = user.to_uppercase();
        let password = password();
        let hash = hash(&password, COST)?;
        writeln!(out, "NATS_{upper}_PASSWORD={password}")?;
        writeln!(out, "NATS_{upper}_PASSWORD_HASH='{hash}'")?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_user_gets_a_password_that_verifies_against_its_hash() {
        let text = env_file().unwrap();
        for user in USERS {
            let upper = user.to_uppercase();
            let value = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{key}=")))
                    .unwrap_or_else(|| panic!("{key} in {text}"))
                    .to_owned()
            };
            let password = value(&format!("NATS_{upper}_PASSWORD"));
            let hash = value(&format!("NATS_{upper}_PASSWORD_HASH"));
            let hash = hash.trim_matches('\'');
            assert_eq!(password.len(), 32);
            assert!(hash.starts_with("$2"), "{hash}");
            assert!(bcrypt::verify(&password, hash).unwrap());
        }
        assert_ne!(password(), password());
    }
}
