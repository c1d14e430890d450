//! The byte pattern every connection sends and expects back.
//!
//! Byte `i` of a connection's stream is a function of the connection's id and `i` alone, so an
//! echoed chunk can be checked without keeping a copy of what was sent, and data that comes back
//! stale (an earlier offset), crossed (another connection's stream) or altered fails the check.
//!
//! The bytes come from one table of pseudo-random bytes, computed once per process and shared by
//! every connection: connection `id`'s stream is the table read cyclically from a start that a
//! strong mix of `id` picks. Sending is then a slice of the table (no per-byte work at all) and
//! checking is a `memcmp` against it, so one client core can drive a server at full loopback
//! speed. The table repeats every [`PERIOD`] bytes; data stale by an exact multiple of that (a
//! mebibyte) or crossed from a connection whose start happens to line up would go unnoticed,
//! which no echo server fault produces by accident.

use std::sync::OnceLock;

/// The length of the pattern's cycle.
pub const PERIOD: usize = 1 << 20;

/// SplitMix64's finaliser: a bijective mix of 64 bits.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The cycle twice over, so that any run of up to [`PERIOD`] bytes is one contiguous slice.
fn table() -> &'static [u8] {
    static TABLE: OnceLock<Box<[u8]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut bytes = vec![0u8; 2 * PERIOD];
        for (index, word) in bytes[..PERIOD].chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&mix(index as u64 ^ 0x5851_f42d_4c95_7f2d).to_le_bytes());
        }
        bytes.copy_within(..PERIOD, PERIOD);
        bytes.into_boxed_slice()
    })
}

/// The pattern of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Pattern {
    start: usize,
}

impl Pattern {
    /// The pattern of connection `id`; ids start at unrelated places of the cycle.
    pub fn new(id: u64) -> Pattern {
        Pattern { start: (mix(id.wrapping_add(0x9e37_79b9_7f4a_7c15)) % PERIOD as u64) as usize }
    }

    /// The stream's bytes from `offset`, as one slice of at most `len` bytes (and at most
    /// [`PERIOD`]); call again from where it ends for more.
    fn slice(&self, offset: u64, len: usize) -> &'static [u8] {
        let at = (self.start + (offset % PERIOD as u64) as usize) % PERIOD;
        &table()[at..at + len.min(PERIOD)]
    }

    /// The `len` bytes of the stream from `offset`, as consecutive slices of the table (more
    /// than one only where the run is longer than [`PERIOD`]).
    pub fn parts(&self, offset: u64, len: usize) -> impl Iterator<Item = &'static [u8]> + Send + use<> {
        let pattern = *self;
        let mut done = 0;
        std::iter::from_fn(move || {
            (done < len).then(|| {
                let part = pattern.slice(offset + done as u64, len - done);
                done += part.len();
                part
            })
        })
    }

    /// Fills `buf` with the stream's bytes starting at `offset`.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut done = 0;
        for part in self.parts(offset, buf.len()) {
            buf[done..done + part.len()].copy_from_slice(part);
            done += part.len();
        }
    }

    /// Checks that `buf` holds the stream's bytes starting at `offset`; on a mismatch, returns
    /// the index in `buf` of the first wrong byte.
    pub fn check(&self, offset: u64, buf: &[u8]) -> Result<(), usize> {
        let mut done = 0;
        for want in self.parts(offset, buf.len()) {
            let got = &buf[done..done + want.len()];
            if got != want {
                let wrong = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                return Err(done + wrong);
            }
            done += want.len();
        }
        Ok(())
    }

    /// The single byte at `offset`.
    pub fn byte(&self, offset: u64) -> u8 {
        self.slice(offset, 1)[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_and_check_agree_at_any_alignment() {
        let p = Pattern::new(7);
        let mut whole = vec![0u8; 100];
        p.fill(0, &mut whole);
        for start in 0..20u64 {
            for len in 0..40usize {
                let mut part = vec![0u8; len];
                p.fill(start, &mut part);
                assert_eq!(&part[..], &whole[start as usize..start as usize + len]);
                assert_eq!(p.check(start, &part), Ok(()));
            }
        }
        assert_eq!(p.byte(13), whole[13]);
    }

    #[test]
    fn check_finds_the_first_wrong_byte() {
        let p = Pattern::new(1);
        let mut buf = vec![0u8; 64];
        p.fill(5, &mut buf);
        buf[37] ^= 0x01;
        assert_eq!(p.check(5, &buf), Err(37));
        // Another connection's bytes, or this one's from another offset, do not pass.
        let mut other = vec![0u8; 64];
        Pattern::new(2).fill(5, &mut other);
        assert!(p.check(5, &other).is_err());
        p.fill(6, &mut other);
        assert!(p.check(5, &other).is_err());
    }

    #[test]
    fn runs_longer_than_the_cycle_wrap_around_it() {
        let p = Pattern::new(3);
        let offset = PERIOD as u64 - 5;
        let mut long = vec![0u8; 2 * PERIOD + 11];
        p.fill(offset, &mut long);
        assert_eq!(p.check(offset, &long), Ok(()));
        assert_eq!(long[5], p.byte(PERIOD as u64));
        assert_eq!(long[5], long[5 + PERIOD]);
        long[PERIOD + 7] ^= 0x80;
        assert_eq!(p.check(offset, &long), Err(PERIOD + 7));
    }
}
