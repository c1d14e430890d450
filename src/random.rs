//! Random numbers for what needs no cryptographic quality (fault points, the keepalive spread):
//! std's randomly keyed hasher, fresh per call, so no dependency.

use std::hash::{BuildHasher, Hasher};

/// A uniformly distributed 64-bit number.
pub fn random_u64() -> u64 {
    std::hash::RandomState::new().build_hasher().finish()
}

/// `true` with probability `p`.
pub fn chance(p: f64) -> bool {
    p > 0.0 && (p >= 1.0 || ((random_u64() >> 11) as f64 / (1u64 << 53) as f64) < p)
}
