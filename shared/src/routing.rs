//! Rollouts, phase 1: the routing table that splits traffic between the
//! production model and weighted candidates.
//!
//! The registry holds one table at a time (`ml.registry.route`), checks it
//! with [`RouteTable::check`] plus what only it knows (which versions exist
//! and which is production), and publishes it with the production model.
//! Predictors pick a version per request with [`RouteTable::pick`] from a
//! bucket in `0..100`: a cheap per-request random number ([`bucket_of`]), or
//! with `sticky`, the stable hash of a routing key ([`sticky_bucket`]), so
//! one user sees one version for the table's whole life.
//!
//! The sticky hash is FNV-1a (64 bits) of the key's bytes followed by the
//! `splitmix64` finaliser, scaled to `0..100`: a fixed algorithm, the same
//! on every machine, build and run (unlike std's `DefaultHasher`).

use serde::{Deserialize, Serialize};

/// Most candidates a table may hold (every one is loaded by every predictor).
pub const MAX_CANDIDATES: usize = 8;
/// Buckets a request falls in: weights are whole percents.
pub const BUCKETS: u32 = 100;

/// A version and its share of traffic, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weighted {
    /// The registry version.
    pub version: u64,
    /// Its share, 1 to 99.
    pub percent: u32,
}

/// The routing table: candidates with their weights (production takes the
/// rest), an optional shadow version, and whether the split is sticky.
///
/// No field is skipped when empty: the table also travels in the binary
/// codec, which is not self-describing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTable {
    /// Versions served beside production, each with its share.
    #[serde(default)]
    pub candidates: Vec<Weighted>,
    /// A version run on a share of requests, after their reply is sent,
    /// without answering from it (see [`shadowed`]).
    #[serde(default)]
    pub shadow: Option<Weighted>,
    /// Route by a stable hash of the user (or `routing_key`) instead of at
    /// random.
    #[serde(default)]
    pub sticky: bool,
}

/// What is wrong with a routing request, as a stable machine-readable name
/// (the `problem` of the error reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteProblem {
    /// The JSON is malformed, has unknown fields or wrong types.
    Malformed,
    /// A request mixes `clear` with a table, or sets nothing.
    Conflicting,
    /// A table with neither candidates nor a shadow.
    EmptyTable,
    /// More than [`MAX_CANDIDATES`] candidates.
    TooManyCandidates,
    /// A percent outside 1..=99.
    PercentOutOfRange,
    /// The candidates' percents add up to 100 or more.
    WeightsTooHigh,
    /// A version named twice among the candidates.
    DuplicateVersion,
    /// The shadow is also a candidate.
    ShadowIsCandidate,
    /// A candidate (or the shadow) is the production version.
    IsProduction,
    /// The registry holds no such version.
    UnknownVersion,
    /// The version's artifact is corrupt.
    CorruptVersion,
    /// There is no production model to split traffic with.
    NoProduction,
    /// The reason or actor is empty or too long.
    BadText,
}

impl RouteProblem {
    /// The snake_case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteProblem::Malformed => "malformed",
            RouteProblem::Conflicting => "conflicting",
            RouteProblem::EmptyTable => "empty_table",
            RouteProblem::TooManyCandidates => "too_many_candidates",
            RouteProblem::PercentOutOfRange => "percent_out_of_range",
            RouteProblem::WeightsTooHigh => "weights_too_high",
            RouteProblem::DuplicateVersion => "duplicate_version",
            RouteProblem::ShadowIsCandidate => "shadow_is_candidate",
            RouteProblem::IsProduction => "is_production",
            RouteProblem::UnknownVersion => "unknown_version",
            RouteProblem::CorruptVersion => "corrupt_version",
            RouteProblem::NoProduction => "no_production",
            RouteProblem::BadText => "bad_text",
        }
    }
}

/// A refused routing request: the problem and a sentence naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RouteError {
    /// Which problem.
    pub problem: RouteProblem,
    /// What exactly, for a person.
    pub message: String,
}

impl RouteError {
    /// A refusal for `problem`.
    pub fn new(problem: RouteProblem, message: impl Into<String>) -> Self {
        Self {
            problem,
            message: message.into(),
        }
    }
}

/// Which side of the split answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// The production version.
    Production,
    /// One of the candidates.
    Candidate,
}

impl RouteTable {
    /// Every version the table names (candidates, then the shadow).
    pub fn versions(&self) -> impl Iterator<Item = u64> + '_ {
        self.candidates
            .iter()
            .chain(self.shadow.iter())
            .map(|w| w.version)
    }

    /// The candidates' share of traffic, in percent.
    pub fn candidate_percent(&self) -> u32 {
        self.candidates.iter().map(|c| c.percent).sum()
    }

    /// Checks the table's own consistency (what needs no registry): not
    /// empty, at most [`MAX_CANDIDATES`] candidates, every percent in
    /// 1..=99, the candidates' sum below 100, no version twice, the shadow
    /// not a candidate.
    pub fn check(&self) -> Result<(), RouteError> {
        use RouteProblem as P;
        if self.candidates.is_empty() && self.shadow.is_none() {
            return Err(RouteError::new(
                P::EmptyTable,
                "the table names no candidate and no shadow; send {\"clear\":true} to remove it",
            ));
        }
        if self.candidates.len() > MAX_CANDIDATES {
            return Err(RouteError::new(
                P::TooManyCandidates,
                format!(
                    "{} candidates; at most {MAX_CANDIDATES}",
                    self.candidates.len()
                ),
            ));
        }
        let named = self
            .candidates
            .iter()
            .map(|c| ("candidate", c))
            .chain(self.shadow.iter().map(|s| ("shadow", s)));
        for (role, w) in named {
            if !(1..BUCKETS).contains(&w.percent) {
                return Err(RouteError::new(
                    P::PercentOutOfRange,
                    format!(
                        "{role} v{}: percent {} is out of range 1..=99",
                        w.version, w.percent
                    ),
                ));
            }
        }
        let sum: u64 = self.candidates.iter().map(|c| u64::from(c.percent)).sum();
        if sum >= u64::from(BUCKETS) {
            return Err(RouteError::new(
                P::WeightsTooHigh,
                format!("the candidates' percents add up to {sum}; they must leave production a share (below 100)"),
            ));
        }
        for (i, c) in self.candidates.iter().enumerate() {
            if self.candidates[..i].iter().any(|d| d.version == c.version) {
                return Err(RouteError::new(
                    P::DuplicateVersion,
                    format!("v{} is named twice among the candidates", c.version),
                ));
            }
        }
        if let Some(s) = self
            .shadow
            .filter(|s| self.candidates.iter().any(|c| c.version == s.version))
        {
            return Err(RouteError::new(
                P::ShadowIsCandidate,
                format!("v{} is both the shadow and a candidate", s.version),
            ));
        }
        Ok(())
    }

    /// The candidate (its index) that bucket `bucket` (0..100) falls to, or
    /// `None` for production: candidates take consecutive ranges of
    /// buckets from 0 in table order, production the rest.
    #[inline]
    pub fn pick(&self, bucket: u32) -> Option<usize> {
        let mut upper = 0;
        for (i, c) in self.candidates.iter().enumerate() {
            upper += c.percent;
            if bucket < upper {
                return Some(i);
            }
        }
        None
    }
}

/// FNV-1a, 64 bits.
#[inline]
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The `splitmix64` finaliser: spreads every input bit over the output.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The bucket (0..100) of a uniformly random `u64` (by its high bits).
#[inline]
pub fn bucket_of(random: u64) -> u32 {
    ((u128::from(random) * u128::from(BUCKETS)) >> 64) as u32
}

/// The sticky bucket (0..100) of a routing key: the same for the same key,
/// everywhere and always.
#[inline]
pub fn sticky_bucket(key: &[u8]) -> u32 {
    bucket_of(mix64(fnv1a64(key)))
}

/// Whether the shadow at `percent` runs for the request whose reply has id
/// `request_id`: its sticky bucket is below `percent`. Deterministic, so
/// anyone holding the replies can tell which requests were shadowed.
#[inline]
pub fn shadowed(request_id: &str, percent: u32) -> bool {
    sticky_bucket(request_id.as_bytes()) < percent
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(candidates: &[(u64, u32)], shadow: Option<(u64, u32)>) -> RouteTable {
        RouteTable {
            candidates: candidates
                .iter()
                .map(|&(version, percent)| Weighted { version, percent })
                .collect(),
            shadow: shadow.map(|(version, percent)| Weighted { version, percent }),
            sticky: false,
        }
    }

    fn problem(t: &RouteTable) -> Option<RouteProblem> {
        t.check().err().map(|e| e.problem)
    }

    #[test]
    fn tables_are_checked_for_each_problem() {
        use RouteProblem as P;
        assert_eq!(problem(&table(&[(7, 10)], Some((8, 20)))), None);
        assert_eq!(problem(&table(&[(7, 60), (9, 39)], None)), None);
        assert_eq!(problem(&table(&[], Some((8, 99)))), None);
        assert_eq!(problem(&table(&[], None)), Some(P::EmptyTable));
        assert_eq!(problem(&table(&[(7, 0)], None)), Some(P::PercentOutOfRange));
        assert_eq!(
            problem(&table(&[(7, 100)], None)),
            Some(P::PercentOutOfRange)
        );
        assert_eq!(
            problem(&table(&[(7, 10)], Some((8, 0)))),
            Some(P::PercentOutOfRange)
        );
        assert_eq!(
            problem(&table(&[(7, 50), (9, 50)], None)),
            Some(P::WeightsTooHigh)
        );
        assert_eq!(
            problem(&table(&[(7, 10), (7, 5)], None)),
            Some(P::DuplicateVersion)
        );
        assert_eq!(
            problem(&table(&[(7, 10)], Some((7, 5)))),
            Some(P::ShadowIsCandidate)
        );
        let many: Vec<(u64, u32)> = (1..=9).map(|v| (v, 1)).collect();
        assert_eq!(problem(&table(&many, None)), Some(P::TooManyCandidates));
        let e = table(&[(7, 60), (9, 45)], None).check().unwrap_err();
        assert!(e.message.contains("105"), "{e}");
    }

    #[test]
    fn requests_with_unknown_fields_do_not_parse() {
        assert!(serde_json::from_str::<RouteTable>(r#"{"candidates":[],"bogus":1}"#).is_err());
        assert!(serde_json::from_str::<RouteTable>(
            r#"{"candidates":[{"version":1,"percent":5,"x":1}]}"#
        )
        .is_err());
    }

    #[test]
    fn buckets_fall_to_candidates_in_order_then_production() {
        let t = table(&[(7, 10), (9, 5)], None);
        assert_eq!(t.pick(0), Some(0));
        assert_eq!(t.pick(9), Some(0));
        assert_eq!(t.pick(10), Some(1));
        assert_eq!(t.pick(14), Some(1));
        assert_eq!(t.pick(15), None);
        assert_eq!(t.pick(99), None);
        let shares: Vec<usize> =
            (0..BUCKETS)
                .map(|b| t.pick(b).map_or(2, |i| i))
                .fold(vec![0; 3], |mut n, i| {
                    n[i] += 1;
                    n
                });
        assert_eq!(shares, [10, 5, 85]);
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(u64::MAX), 99);
    }

    /// The hash is fixed: these values must never change, or sticky users
    /// would move between versions across an upgrade.
    #[test]
    fn the_sticky_hash_is_pinned() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        let pinned: Vec<u32> = ["", "a", "user-1", "2d734d8e-aaa0-443b-8d1a-e30efff00d60"]
            .iter()
            .map(|k| sticky_bucket(k.as_bytes()))
            .collect();
        assert_eq!(pinned, PINNED_BUCKETS);
    }

    const PINNED_BUCKETS: [u32; 4] = [95, 1, 76, 61];

    #[test]
    fn sticky_buckets_are_stable_and_evenly_spread() {
        let mut counts = [0u32; BUCKETS as usize];
        let n = 100_000;
        for i in 0..n {
            let key = format!("user-{i}");
            let b = sticky_bucket(key.as_bytes());
            assert_eq!(b, sticky_bucket(key.as_bytes()));
            counts[b as usize] += 1;
        }
        // 1,000 expected per bucket; a binomial's sd is about 31.
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*lo > 850 && *hi < 1150, "bucket counts {lo}..{hi}");
        let t = table(&[(7, 10)], None);
        let canary = (0..n)
            .filter(|i| t.pick(sticky_bucket(format!("user-{i}").as_bytes())) == Some(0))
            .count();
        let share = canary as f64 / n as f64;
        assert!((share - 0.10).abs() < 0.005, "canary share {share}");
    }
}
