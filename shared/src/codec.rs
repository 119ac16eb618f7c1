//! The binary codec for model artifacts and the messages that carry them.
//!
//! This is the only module that knows the wire and disk format, so it can be
//! swapped. An encoded value is an envelope:
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `MLMODEL\0` |
//! | 2 | format version, little-endian (currently 4) |
//! | 8 | payload length, little-endian |
//! | 32 | SHA-256 of the payload |
//! | n | payload: `bincode` 2 (standard config) of the value, through serde |
//!
//! Decoding checks every field, and refuses a payload that claims more than
//! [`MAX_PAYLOAD`] bytes, so a truncated, bit-flipped or foreign file is an
//! error, never a wrong model.
//!
//! Format history: version 1 had regression-only metrics and no scaler in
//! the artifact; version 2 added the logistic family, the scaler, and
//! metrics for classifiers; version 3 added the training data's reference
//! profile to the artifact, for drift monitoring; version 4 (this build)
//! adds the graph of an imported ONNX model to the artifact (and the ONNX
//! model kinds, which go last in their enum). `bincode` is not
//! self-describing, so new fields cannot decode from old bytes: a reader
//! that must accept files written by older versions (the registry's store)
//! uses [`decode_or_legacy`] with the old shapes. Messages on the wire are
//! decoded with [`decode`] only, so the services of a deployment move to a
//! new format together.

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The first bytes of every encoded value.
pub const MAGIC: &[u8; 8] = b"MLMODEL\0";
/// The format version written by this build.
pub const FORMAT_VERSION: u16 = 4;
/// The oldest format version readable through [`decode_or_legacy`].
pub const OLDEST_VERSION: u16 = 1;
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

/// Encodes `value` in the envelope of an older format `version` (`value`
/// must have that version's shape): for the tests of readers that must still
/// read files written by older builds.
#[doc(hidden)]
pub fn encode_as_version<T: Serialize>(value: &T, version: u16) -> Vec<u8> {
    encode_as(value, version)
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

/// A verified envelope of an older format version, for a reader that knows
/// that version's shapes.
#[derive(Debug, Clone, Copy)]
pub struct Legacy<'a> {
    version: u16,
    payload: &'a [u8],
}

impl Legacy<'_> {
    /// The envelope's format version (from [`OLDEST_VERSION`], below
    /// [`FORMAT_VERSION`]).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Decodes the payload as the old shape `L`.
    pub fn decode<L: DeserializeOwned>(&self) -> Result<L, CodecError> {
        decode_payload(self.payload)
    }
}

/// Like [`decode`], and also reads an envelope of an older version through
/// `legacy`, which decodes the version's old shape and converts it.
pub fn decode_or_legacy<T, F>(bytes: &[u8], legacy: F) -> Result<T, CodecError>
where
    T: DeserializeOwned,
    F: FnOnce(Legacy<'_>) -> Result<T, CodecError>,
{
    match open(bytes)? {
        (FORMAT_VERSION, payload) => decode_payload(payload),
        (version, payload) => legacy(Legacy { version, payload }),
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
    if !(OLDEST_VERSION..=FORMAT_VERSION).contains(&version) {
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
    use crate::profile::ReferenceProfile;

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
            profile: None,
            onnx: None,
        }
    }

    #[test]
    fn round_trips() {
        let bytes = encode(&artifact());
        assert_eq!(decode::<ModelArtifact>(&bytes).unwrap(), artifact());
    }

    #[test]
    fn round_trips_an_artifact_with_its_profile() {
        let names = vec!["feature_1".to_owned(), "feature_3".to_owned()];
        let column: Vec<f64> = (0..50).map(f64::from).collect();
        let mut with = artifact();
        with.profile =
            ReferenceProfile::from_columns(&names, &[column.clone(), column.clone()], &column, 10)
                .map(Box::new);
        assert!(with.profile.is_some());
        let bytes = encode(&with);
        assert_eq!(decode::<ModelArtifact>(&bytes).unwrap(), with);
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
    fn older_versions_read_only_through_their_old_shapes() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct V1 {
            kind: ModelKind,
            feature_names: Vec<String>,
            coefficients: Vec<f64>,
            intercept: f64,
        }
        #[derive(serde::Serialize, serde::Deserialize)]
        struct V2 {
            kind: ModelKind,
            feature_names: Vec<String>,
            coefficients: Vec<f64>,
            intercept: f64,
            scaler: Option<crate::model::Scaler>,
        }
        let read = |bytes: &[u8]| {
            decode_or_legacy::<ModelArtifact, _>(bytes, |old| {
                let (v1, v2) = match old.version() {
                    1 => (old.decode::<V1>()?, None),
                    2 => {
                        let v2 = old.decode::<V2>()?;
                        let v1 = V1 {
                            kind: v2.kind,
                            feature_names: v2.feature_names,
                            coefficients: v2.coefficients,
                            intercept: v2.intercept,
                        };
                        (v1, v2.scaler)
                    }
                    v => return Err(CodecError::UnsupportedVersion(v)),
                };
                Ok(ModelArtifact {
                    kind: v1.kind,
                    feature_names: v1.feature_names,
                    coefficients: v1.coefficients,
                    intercept: v1.intercept,
                    scaler: v2,
                    profile: None,
                    onnx: None,
                })
            })
        };
        let v1 = V1 {
            kind: ModelKind::Linear,
            feature_names: vec!["feature_1".into()],
            coefficients: vec![2.0],
            intercept: 1.0,
        };
        let bytes = encode_as(&v1, 1);
        assert_eq!(
            decode::<ModelArtifact>(&bytes),
            Err(CodecError::UnsupportedVersion(1))
        );
        let new = read(&bytes).unwrap();
        assert_eq!((new.intercept, new.scaler, new.profile), (1.0, None, None));
        let a = artifact();
        let v2 = V2 {
            kind: a.kind,
            feature_names: a.feature_names.clone(),
            coefficients: a.coefficients.clone(),
            intercept: a.intercept,
            scaler: a.scaler.clone(),
        };
        let bytes = encode_as(&v2, 2);
        assert_eq!(
            decode::<ModelArtifact>(&bytes),
            Err(CodecError::UnsupportedVersion(2))
        );
        assert_eq!(read(&bytes).unwrap(), artifact());
        // A version-2 payload is not a version-3 one: the version decides.
        assert!(decode_payload::<ModelArtifact>(&bytes[HEADER..]).is_err());
        assert_eq!(read(&encode(&artifact())).unwrap(), artifact());
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
                    profile: None,
                    onnx: None,
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
