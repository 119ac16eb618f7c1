//! The holdout rule: which entities are kept out of training.
//!
//! A row belongs to the validation holdout when a stable hash of its entity
//! id (`user_id`) and the split seed falls below the validation fraction. The
//! rule depends on nothing but the id, the seed and the fraction, so it gives
//! the same split when a file is re-read, streamed in any order, or read by
//! another process: the trainer fits on the rows outside the holdout, and the
//! registry recomputes a submitted model's validation metrics on the rows
//! inside it, from its own copy of the data, instead of trusting the figure
//! the submitter sends.
//!
//! The hash is 64-bit FNV-1a over the seed's little-endian bytes followed by
//! the id's UTF-8 bytes, finished with a SplitMix64 mix so that ids differing
//! in their last byte still spread evenly. It is part of the platform's
//! contract: changing it changes every split.

/// FNV-1a 64 offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64 prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// A number in `[0, 1)` fixed by `seed` and `entity_id`, uniform over ids.
pub fn bucket(entity_id: &str, seed: u64) -> f64 {
    let mut h = FNV_OFFSET;
    for b in seed.to_le_bytes().iter().chain(entity_id.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    // SplitMix64 finaliser.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    // The top 53 bits as a fraction: exactly representable in an f64.
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether `entity_id` is in the validation holdout for this seed and fraction.
pub fn is_holdout(entity_id: &str, validation_fraction: f64, seed: u64) -> bool {
    bucket(entity_id, seed) < validation_fraction
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_is_stable_and_depends_on_the_seed() {
        // Pinned values: a change here changes every split on every platform.
        assert_eq!(bucket("user-1", 42), bucket("user-1", 42));
        assert_ne!(bucket("user-1", 42), bucket("user-1", 43));
        assert_ne!(bucket("user-1", 42), bucket("user-2", 42));
    }

    #[test]
    fn the_holdout_share_is_close_to_the_fraction() {
        let n = 100_000;
        let held = (0..n)
            .filter(|i| is_holdout(&format!("{i:08x}-id"), 0.2, 7))
            .count();
        let share = held as f64 / n as f64;
        assert!((share - 0.2).abs() < 0.01, "share {share}");
    }

    #[test]
    fn buckets_are_in_the_unit_interval() {
        for i in 0..10_000 {
            let b = bucket(&i.to_string(), i);
            assert!((0.0..1.0).contains(&b), "{b}");
        }
    }
}
