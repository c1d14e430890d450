//! The byte pattern every connection sends and expects back.
//!
//! Byte `i` of a connection's stream is a function of the connection's id and `i` alone, so an
//! echoed chunk can be checked without keeping a copy of what was sent, and data that comes back
//! stale (an earlier offset), crossed (another connection's stream) or altered fails the check.
//! The stream is built from 64-bit words, each a strong mix of (seed, word index).

/// The pattern of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Pattern {
    seed: u64,
}

/// SplitMix64's finaliser: a bijective mix of 64 bits.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Pattern {
    /// The pattern of connection `id`; every id gives an unrelated stream.
    pub fn new(id: u64) -> Pattern {
        Pattern { seed: mix(id.wrapping_add(0x9e37_79b9_7f4a_7c15)) }
    }

    #[inline]
    fn word(&self, index: u64) -> [u8; 8] {
        mix(self.seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes()
    }

    /// Fills `buf` with the stream's bytes starting at `offset`.
    ///
    /// Whole words are written in a tight loop (this runs at several GB/s, so the client can
    /// drive a server at full speed); only a ragged head and tail go byte by byte.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let head = (((8 - offset % 8) % 8) as usize).min(buf.len());
        for (k, b) in buf[..head].iter_mut().enumerate() {
            *b = self.byte(offset + k as u64);
        }
        let body_offset = offset + head as u64;
        let mut words = buf[head..].chunks_exact_mut(8);
        let mut index = body_offset / 8;
        for chunk in &mut words {
            chunk.copy_from_slice(&self.word(index));
            index += 1;
        }
        let tail = words.into_remainder();
        let tail_offset = index * 8;
        for (k, b) in tail.iter_mut().enumerate() {
            *b = self.byte(tail_offset + k as u64);
        }
    }

    /// Checks that `buf` holds the stream's bytes starting at `offset`; on a mismatch, returns
    /// the index in `buf` of the first wrong byte.
    pub fn check(&self, offset: u64, buf: &[u8]) -> Result<(), usize> {
        let head = (((8 - offset % 8) % 8) as usize).min(buf.len());
        if let Some(k) = (0..head).find(|&k| buf[k] != self.byte(offset + k as u64)) {
            return Err(k);
        }
        let mut index = (offset + head as u64) / 8;
        let mut pos = head;
        let mut words = buf[head..].chunks_exact(8);
        for chunk in &mut words {
            let got = u64::from_le_bytes(chunk.try_into().expect("8-byte chunk"));
            let want = u64::from_le_bytes(self.word(index));
            if got != want {
                let wrong = (0..8).find(|&k| chunk[k] != self.word(index)[k]).unwrap_or(0);
                return Err(pos + wrong);
            }
            index += 1;
            pos += 8;
        }
        let tail_offset = index * 8;
        match words.remainder().iter().enumerate().find(|&(k, b)| *b != self.byte(tail_offset + k as u64)) {
            Some((k, _)) => Err(pos + k),
            None => Ok(()),
        }
    }

    /// The single byte at `offset`.
    pub fn byte(&self, offset: u64) -> u8 {
        self.word(offset / 8)[(offset % 8) as usize]
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
}
