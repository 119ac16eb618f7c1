//! The binary codec for model artifacts and the messages that carry them.
//!
//! This is the only module that knows the wire and disk format, so it can be
//! swapped. An encoded value is an envelope:
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `MLMODEL\0` |
//! | 2 | format version, little-endian (currently 2) |
//! | 8 | payload length, little-endian |
//! | 32 | SHA-256 of the payload |
//! | n | payload: `bincode` 2 (standard config) of the value, through serde |
//!
//! Decoding checks every field, and refuses a payload that claims more than
//! [`MAX_PAYLOAD`] bytes, so a truncated, bit-flipped or foreign file is an
//! error, never a wrong model.
//!
//! Format history: version 1 had regression-only metrics and no scaler in
//! the artifact; version 2 (this build) adds the logistic family, the
//! scaler, and metrics for classifiers. `bincode` is not self-describing, so
//! new fields cannot decode from old bytes: a reader that must accept files
//! written by version 1 (the registry's store) uses [`decode_or_legacy`] with
//! the old shape. Messages on the wire are decoded with [`decode`] only, so
//! the services of a deployment move to a new format together.

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The first bytes of every encoded value.
pub const MAGIC: &[u8; 8] = b"MLMODEL\0";
/// The format version written by this build.
pub const FORMAT_VERSION: u16 = 2;
/// The previous format version, readable through [`decode_or_legacy`].
pub const LEGACY_VERSION: u16 = 1;
/// Largest payload accepted by [`decode`] (64 MiB).
pub const MAX_PAYLOAD: usize = 64 << 20;
const HEADER: usize = 8 + 2 + 8 + 32;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Fewer bytes than the header or the declared payload needs.
    #[error("truncated: {got} bytes, expected {expected}")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        expected: usize,
    },
    /// Not an envelope of ours.
    #[error("not a model envelope (bad magic bytes)")]
    BadMagic,
    /// Written by a format this build does not read (here).
    #[error("unsupported format version {0} (this build writes {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    /// The payload is larger than allowed.
    #[error("payload of {0} bytes exceeds the limit")]
    TooLarge(u64),
    /// Extra bytes after the payload.
    #[error("{0} trailing bytes after the payload")]
    TrailingBytes(usize),
    /// The payload does not match its checksum.
    #[error("checksum mismatch: the payload is corrupt")]
    ChecksumMismatch,
    /// The payload is not a valid encoding of the expected type.
    #[error("cannot decode payload: {0}")]
    Payload(String),
}

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_PAYLOAD>,
> {
    bincode::config::standard().with_limit::<MAX_PAYLOAD>()
}

/// Encodes `value` in the envelope.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    encode_as(value, FORMAT_VERSION)
}

fn encode_as<T: Serialize>(value: &T, version: u16) -> Vec<u8> {
    let payload = bincode::serde::encode_to_vec(value, config())
        .expect("serialising plain data to memory cannot fail");
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    out
}

/// Decodes an envelope written by [`encode`], verifying its checksum.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match open(bytes)? {
        (FORMAT_VERSION, payload) => decode_payload(payload),
        (version, _) => Err(CodecError::UnsupportedVersion(version)),
    }
}

/// Like [`decode`], and also reads an envelope of [`LEGACY_VERSION`] as its
/// old shape `L`, converted.
pub fn decode_or_legacy<T, L>(bytes: &[u8]) -> Result<T, CodecError>
where
    T: DeserializeOwned,
    L: DeserializeOwned + Into<T>,
{
    match open(bytes)? {
        (FORMAT_VERSION, payload) => decode_payload(payload),
        (LEGACY_VERSION, payload) => decode_payload::<L>(payload).map(Into::into),
        (version, _) => Err(CodecError::UnsupportedVersion(version)),
    }
}

/// Checks the envelope and returns its version and verified payload.
fn open(bytes: &[u8]) -> Result<(u16, &[u8]), CodecError> {
    if bytes.len() < HEADER {
        return Err(CodecError::Truncated {
            got: bytes.len(),
            expected: HEADER,
        });
    }
    if &bytes[..8] != MAGIC {
        return Err(CodecError::BadMagic);
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION && version != LEGACY_VERSION {
        return Err(CodecError::UnsupportedVersion(version));
    }
    let len = u64::from_le_bytes(bytes[10..18].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD as u64 {
        return Err(CodecError::TooLarge(len));
    }
    let expected = HEADER + len as usize;
    if bytes.len() < expected {
        return Err(CodecError::Truncated {
            got: bytes.len(),
            expected,
        });
    }
    if bytes.len() > expected {
        return Err(CodecError::TrailingBytes(bytes.len() - expected));
    }
    let payload = &bytes[HEADER..];
    if Sha256::digest(payload).as_slice() != &bytes[18..50] {
        return Err(CodecError::ChecksumMismatch);
    }
    Ok((version, payload))
}

fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| CodecError::Payload(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::Payload(format!(
            "{} unused payload bytes",
            payload.len() - used
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelArtifact, ModelKind};

    fn artifact() -> ModelArtifact {
        ModelArtifact {
            kind: ModelKind::Linear,
            feature_names: vec!["feature_1".into(), "feature_3".into()],
            coefficients: vec![1.5, -0.25],
            intercept: 3.0,
            scaler: Some(crate::model::Scaler {
                mean: vec![0.1, 2.0],
                scale: vec![1.0, 3.5],
            }),
        }
    }

    #[test]
    fn round_trips() {
        let bytes = encode(&artifact());
        assert_eq!(decode::<ModelArtifact>(&bytes).unwrap(), artifact());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode(&artifact());
        for n in 0..bytes.len() {
            assert!(
                decode::<ModelArtifact>(&bytes[..n]).is_err(),
                "prefix of {n} bytes"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = encode(&artifact());
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(decode::<ModelArtifact>(&b).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn the_legacy_version_reads_only_through_its_old_shape() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Old {
            kind: ModelKind,
            feature_names: Vec<String>,
            coefficients: Vec<f64>,
            intercept: f64,
        }
        impl From<Old> for ModelArtifact {
            fn from(o: Old) -> Self {
                ModelArtifact {
                    kind: o.kind,
                    feature_names: o.feature_names,
                    coefficients: o.coefficients,
                    intercept: o.intercept,
                    scaler: None,
                }
            }
        }
        let old = Old {
            kind: ModelKind::Linear,
            feature_names: vec!["feature_1".into()],
            coefficients: vec![2.0],
            intercept: 1.0,
        };
        let bytes = encode_as(&old, LEGACY_VERSION);
        assert_eq!(
            decode::<ModelArtifact>(&bytes),
            Err(CodecError::UnsupportedVersion(LEGACY_VERSION))
        );
        let new = decode_or_legacy::<ModelArtifact, Old>(&bytes).unwrap();
        assert_eq!((new.intercept, new.scaler), (1.0, None));
        let current = decode_or_legacy::<ModelArtifact, Old>(&encode(&artifact())).unwrap();
        assert_eq!(current, artifact());
    }

    #[test]
    fn foreign_versions_and_trailing_bytes_are_refused() {
        let mut b = encode(&artifact());
        b[8] = 9;
        assert_eq!(
            decode::<ModelArtifact>(&b),
            Err(CodecError::UnsupportedVersion(9))
        );
        let mut b = encode(&artifact());
        b.push(0);
        assert_eq!(
            decode::<ModelArtifact>(&b),
            Err(CodecError::TrailingBytes(1))
        );
    }
}

/// Property tests (a bounded fuzz run in every `cargo test`): whatever the
/// bytes, decoding returns an error or a value, never panics; and no
/// truncation or single-byte corruption of a valid encoding gets through.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::messages::{ModelRelease, Submission};
    use crate::model::{ModelArtifact, ModelKind};
    use proptest::prelude::*;

    fn artifacts() -> impl Strategy<Value = ModelArtifact> {
        (
            prop_oneof![Just(ModelKind::Linear), Just(ModelKind::Logistic)],
            proptest::collection::vec("[a-z_0-9]{1,12}", 0..8),
            proptest::collection::vec(any::<f64>(), 0..8),
            any::<f64>(),
            proptest::option::of((
                proptest::collection::vec(any::<f64>(), 0..8),
                proptest::collection::vec(any::<f64>(), 0..8),
            )),
        )
            .prop_map(|(kind, feature_names, coefficients, intercept, scaler)| {
                ModelArtifact {
                    kind,
                    feature_names,
                    coefficients,
                    intercept,
                    scaler: scaler.map(|(mean, scale)| crate::model::Scaler { mean, scale }),
                }
            })
    }

    /// An envelope with a correct header and checksum around `payload`, so
    /// that the payload decoder itself is exercised.
    fn envelope(payload: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&Sha256::digest(payload));
        out.extend_from_slice(payload);
        out
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<ModelArtifact>(&bytes);
            let _ = decode::<ModelRelease>(&bytes);
            let _ = decode::<Submission>(&bytes);
        }

        #[test]
        fn arbitrary_payloads_with_a_valid_checksum_never_panic(
            payload in proptest::collection::vec(any::<u8>(), 0..512)
        ) {
            let bytes = envelope(&payload);
            if let Ok(artifact) = decode::<ModelArtifact>(&bytes) {
                let _ = artifact.validate();
            }
            if let Ok(release) = decode::<ModelRelease>(&bytes) {
                let _ = release.artifact.validate();
            }
            let _ = decode::<Submission>(&bytes);
        }

        #[test]
        fn artifacts_round_trip_bit_for_bit(artifact in artifacts()) {
            let back: ModelArtifact = decode(&encode(&artifact)).unwrap();
            prop_assert_eq!(encode(&back), encode(&artifact));
        }

        #[test]
        fn any_corruption_or_truncation_is_an_error(
            artifact in artifacts(),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
            cut in any::<prop::sample::Index>(),
        ) {
            let good = encode(&artifact);
            let mut bad = good.clone();
            bad[at.index(good.len())] ^= xor;
            prop_assert!(decode::<ModelArtifact>(&bad).is_err());
            prop_assert!(decode::<ModelArtifact>(&good[..cut.index(good.len())]).is_err());
        }
    }
}
