//! A deterministic generator of sample user data (`mlctl gen-data`).
//!
//! The target is a known function of the features, so a correct pipeline can
//! be checked against the truth ([`Target`]):
//! - regression: `target = 3 + 2.5·feature_1 − 1.25·feature_2 + 0.8·feature_3 + ε`,
//!   with `feature_3 = feature_1²` and `ε ~ N(0, 0.1²)`;
//! - binary: `target ~ Bernoulli(σ(−1 + 2·feature_1 + 0.25·feature_2 − 0.5·feature_3))`,
//!   written as `0` or `1`.
//!
//! The file is written as pandas writes it: an unnamed index column first,
//! UUID `user_id`s.

use std::io::Write;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Intercept of the generating relation.
pub const TRUE_INTERCEPT: f64 = 3.0;
/// Coefficients of `feature_1`, `feature_2`, `feature_3` in the generating relation.
pub const TRUE_COEFFICIENTS: [f64; 3] = [2.5, -1.25, 0.8];
/// Standard deviation of the noise.
pub const NOISE_SD: f64 = 0.1;

/// Intercept of the binary target's log-odds.
pub const LOGIT_INTERCEPT: f64 = -1.0;
/// Coefficients of `feature_1`, `feature_2`, `feature_3` in the binary target's log-odds.
pub const LOGIT_COEFFICIENTS: [f64; 3] = [2.0, 0.25, -0.5];

/// What the `target` column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// A number: a linear function of the features plus noise.
    #[default]
    Regression,
    /// `0` or `1`, drawn with a logistic probability of the features.
    Binary,
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "regression" => Ok(Target::Regression),
            "binary" => Ok(Target::Binary),
            other => Err(format!(
                "unknown target {other:?}; expected regression or binary"
            )),
        }
    }
}

/// Writes `rows` rows generated from `seed` as CSV, with a regression
/// target. Same seed, same bytes.
pub fn write_csv<W: Write>(out: W, rows: usize, seed: u64) -> std::io::Result<()> {
    write_csv_with(out, rows, seed, Target::Regression)
}

/// Writes `rows` rows generated from `seed` as CSV, with the given target.
/// Same arguments, same bytes. Each line is formatted into one reused
/// buffer (no allocation per row), so ten million rows take seconds.
pub fn write_csv_with<W: Write>(
    out: W,
    rows: usize,
    seed: u64,
    kind: Target,
) -> std::io::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = std::io::BufWriter::with_capacity(1 << 16, out);
    w.write_all(b",user_id,feature_1,feature_2,target\n")?;
    let mut line: Vec<u8> = Vec::with_capacity(128);
    let mut uuid_text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    for i in 0..rows {
        let user_id = uuid::Builder::from_random_bytes(rng.gen()).into_uuid();
        let f1: f64 = rng.gen_range(-2.0..2.0);
        let f2: f64 = rng.gen_range(0.0..10.0);
        line.clear();
        let id = user_id.hyphenated().encode_lower(&mut uuid_text);
        write!(line, "{i},{id},{f1:.6},{f2:.6},")?;
        match kind {
            Target::Regression => {
                let noise = NOISE_SD * standard_normal(&mut rng);
                let target = TRUE_INTERCEPT
                    + TRUE_COEFFICIENTS[0] * f1
                    + TRUE_COEFFICIENTS[1] * f2
                    + TRUE_COEFFICIENTS[2] * f1 * f1
                    + noise;
                write!(line, "{target:.6}")?;
            }
            Target::Binary => {
                // The probability is computed from the rounded features the
                // file holds, so the file alone determines the truth.
                let (f1, f2) = (round6(f1), round6(f2));
                let p = crate::model::sigmoid(
                    LOGIT_INTERCEPT
                        + LOGIT_COEFFICIENTS[0] * f1
                        + LOGIT_COEFFICIENTS[1] * f2
                        + LOGIT_COEFFICIENTS[2] * f1 * f1,
                );
                let u: f64 = rng.gen();
                line.push(if u < p { b'1' } else { b'0' });
            }
        }
        line.push(b'\n');
        w.write_all(&line)?;
    }
    w.flush()
}

fn round6(x: f64) -> f64 {
    format!("{x:.6}")
        .parse()
        .expect("a formatted number parses")
}

/// Box–Muller: one draw from N(0, 1).
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::parse_csv;
    use crate::features::RAW_FEATURES;

    #[test]
    fn same_seed_same_bytes_and_the_file_loads() {
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        write_csv(&mut a, 50, 7).unwrap();
        write_csv(&mut b, 50, 7).unwrap();
        write_csv(&mut c, 50, 8).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let raw: Vec<String> = RAW_FEATURES.iter().map(|s| s.to_string()).collect();
        let d = parse_csv(std::path::Path::new("gen.csv"), &a, &raw).unwrap();
        assert_eq!(d.len(), 50);
        assert_eq!(d.user_ids[0].len(), 36, "UUID text");
    }

    /// The generator as first written, through `csv::Writer`: the fast
    /// writer must produce the same bytes.
    fn reference(rows: usize, seed: u64, kind: Target) -> Vec<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(["", "user_id", "feature_1", "feature_2", "target"])
            .unwrap();
        for i in 0..rows {
            let user_id = uuid::Builder::from_random_bytes(rng.gen()).into_uuid();
            let f1: f64 = rng.gen_range(-2.0..2.0);
            let f2: f64 = rng.gen_range(0.0..10.0);
            let target = match kind {
                Target::Regression => {
                    let noise = NOISE_SD * standard_normal(&mut rng);
                    let t = TRUE_INTERCEPT
                        + TRUE_COEFFICIENTS[0] * f1
                        + TRUE_COEFFICIENTS[1] * f2
                        + TRUE_COEFFICIENTS[2] * f1 * f1
                        + noise;
                    format!("{t:.6}")
                }
                Target::Binary => {
                    let (f1, f2) = (round6(f1), round6(f2));
                    let p = crate::model::sigmoid(
                        LOGIT_INTERCEPT
                            + LOGIT_COEFFICIENTS[0] * f1
                            + LOGIT_COEFFICIENTS[1] * f2
                            + LOGIT_COEFFICIENTS[2] * f1 * f1,
                    );
                    let u: f64 = rng.gen();
                    u8::from(u < p).to_string()
                }
            };
            w.write_record([
                i.to_string(),
                user_id.to_string(),
                format!("{f1:.6}"),
                format!("{f2:.6}"),
                target,
            ])
            .unwrap();
        }
        w.into_inner().unwrap()
    }

    #[test]
    fn the_fast_writer_writes_the_reference_bytes() {
        for kind in [Target::Regression, Target::Binary] {
            let mut fast = Vec::new();
            write_csv_with(&mut fast, 300, 11, kind).unwrap();
            assert_eq!(fast, reference(300, 11, kind), "{kind:?}");
        }
    }

    #[test]
    fn binary_targets_are_zero_or_one_with_both_classes() {
        let mut a = Vec::new();
        write_csv_with(&mut a, 400, 7, Target::Binary).unwrap();
        let text = String::from_utf8(a.clone()).unwrap();
        assert!(text.starts_with(",user_id,feature_1,feature_2,target\n0,"));
        let raw: Vec<String> = RAW_FEATURES.iter().map(|s| s.to_string()).collect();
        let d = parse_csv(std::path::Path::new("gen.csv"), &a, &raw).unwrap();
        let t = d.targets.unwrap();
        assert!(t.iter().all(|&y| y == 0.0 || y == 1.0));
        let ones = t.iter().filter(|&&y| y == 1.0).count();
        assert!((100..300).contains(&ones), "{ones} ones of 400");
        assert_eq!("binary".parse::<Target>(), Ok(Target::Binary));
        assert!("other".parse::<Target>().is_err());
    }
}
