//! The per-source rate limit of the UDP listeners: a token bucket per client, in a table of
//! fixed size.
//!
//! # The bucket
//!
//! Each source may send `rate` datagrams per second with a burst of `rate`: a token bucket of
//! `rate` tokens refilled at `rate` per second. It is kept as one number per source, the
//! *theoretical arrival time* of the generic cell rate algorithm (GCRA, equivalent to the
//! bucket): every admitted datagram pushes it one emission interval (`1 s / rate`) later, and a
//! datagram is refused while it lies more than `rate - 1` intervals ahead of now. A source whose
//! time lies in the past has a full bucket.
//!
//! A source is an IPv4 address, or an IPv6 /64 (the smallest block a site is given; one host
//! can use every address in it).
//!
//! # The bound
//!
//! The table holds at most [`SOURCES`] sources whatever the traffic: [`SETS`] sets of [`WAYS`]
//! entries, a source's set picked by a keyed hash (random per process, so no sender can aim at
//! one set). Its memory is allocated once, at start. When a new source arrives at a full set, it
//! takes the place of the entry whose bucket is fullest, that is the source that has sent least
//! lately for its rate; a full bucket carries no state, so evicting one changes nothing. A
//! source held at its limit is therefore evicted only when every other source of its set is
//! held too: a flood from millions of (spoofed) addresses, each sending a little, cannot free a
//! flooding source from its limit, it only evicts its own kind. When every entry of a set is at
//! its limit, a newcomer evicts the one closest to being let through, which then starts again
//! with a full bucket: then, and only then, a source gets more than its rate.
//!
//! The table is shared by the receive loops of every UDP listener, so a source's limit holds
//! across workers and listeners; each set has its own lock, taken for a few dozen nanoseconds
//! per datagram, so sources in different sets never wait for each other.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// Sets of the table (a power of two).
pub const SETS: usize = 4096;
/// Entries per set.
pub const WAYS: usize = 8;
/// Most sources tracked at once.
pub const SOURCES: usize = SETS * WAYS;

/// One tracked source. `tat == 0` marks an empty entry (times start at 1).
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    key: [u64; 2],
    /// Theoretical arrival time, nanoseconds since the limiter started.
    tat: u64,
}

type Set = [Entry; WAYS];

/// The per-source rate limit.
pub struct Limiter {
    sets: Box<[Mutex<Set>]>,
    hasher: RandomState,
    /// Nanoseconds between datagrams at the limit.
    interval: u64,
    /// How far ahead of now a source's time may be and its datagram still be admitted.
    tolerance: u64,
    epoch: Instant,
}

impl Limiter {
    /// A limiter admitting `rate` datagrams per second per source, in bursts of up to `rate`.
    pub fn new(rate: u32) -> Limiter {
        let rate = u64::from(rate.max(1));
        let interval = (1_000_000_000 / rate).max(1);
        Limiter {
            sets: (0..SETS).map(|_| Mutex::new([Entry::default(); WAYS])).collect(),
            hasher: RandomState::new(),
            interval,
            tolerance: interval * (rate - 1),
            epoch: Instant::now(),
        }
    }

    /// The limiter's clock for `now` (at least 1, so that 0 can mark empty entries).
    pub fn clock(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_nanos() as u64 + 1
    }

    /// Whether a datagram from `source` arriving at `now` (from [`Limiter::clock`]) is within
    /// its source's rate; if so, it is counted against it.
    pub fn admit(&self, source: &SocketAddr, now: u64) -> bool {
        let key = key(source);
        let mut h = self.hasher.build_hasher();
        h.write_u64(key[0]);
        h.write_u64(key[1]);
        let mut set = self.lock(h.finish() as usize & (SETS - 1));
        if let Some(entry) = set.iter_mut().find(|e| e.tat != 0 && e.key == key) {
            let tat = entry.tat.max(now);
            if tat - now > self.tolerance {
                return false;
            }
            entry.tat = tat + self.interval;
            return true;
        }
        // A newcomer: it takes the place of the fullest bucket (an empty entry first).
        let victim = set.iter_mut().min_by_key(|e| e.tat).expect("a set has entries");
        *victim = Entry { key, tat: now + self.interval };
        true
    }

    /// How many sources the table tracks now (for tests; takes every lock in turn).
    pub fn tracked(&self) -> usize {
        (0..SETS).map(|i| self.lock(i).iter().filter(|e| e.tat != 0).count()).sum()
    }

    fn lock(&self, set: usize) -> MutexGuard<'_, Set> {
        // A set is plain data, valid whatever a panicking holder left in it.
        self.sets[set].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The source a datagram is counted against: the IPv4 address (as its IPv4-mapped IPv6 form),
/// or the IPv6 /64.
fn key(source: &SocketAddr) -> [u64; 2] {
    match source.ip() {
        IpAddr::V4(ip) => [0, 0xffff_0000_0000 | u64::from(u32::from(ip))],
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => [0, 0xffff_0000_0000 | u64::from(u32::from(v4))],
            None => [(u128::from(ip) >> 64) as u64, 0],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([a, b, c, d], port))
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let limiter = Limiter::new(10);
        let src = v4(127, 0, 0, 2, 5000);
        let t = 1;
        assert_eq!((0..20).filter(|_| limiter.admit(&src, t)).count(), 10, "burst of 10");
        assert!(!limiter.admit(&src, t + SECOND / 20), "half an interval later: still empty");
        assert!(limiter.admit(&src, t + SECOND / 10), "one interval later: one token");
        assert!(!limiter.admit(&src, t + SECOND / 10));
        // Over ten seconds at a thousand attempts a second, it gets ten a second.
        let admitted = (0..10_000u64).filter(|i| limiter.admit(&src, t + SECOND + i * SECOND / 1000)).count();
        assert!((99..=111).contains(&admitted), "{admitted}");
        // After a quiet second the bucket is full again.
        let later = t + 12 * SECOND;
        assert_eq!((0..20).filter(|_| limiter.admit(&src, later)).count(), 10);
    }

    #[test]
    fn ports_share_an_address_and_ipv6_shares_a_64() {
        let limiter = Limiter::new(2);
        assert!(limiter.admit(&v4(10, 0, 0, 1, 1), 1));
        assert!(limiter.admit(&v4(10, 0, 0, 1, 2), 1));
        assert!(!limiter.admit(&v4(10, 0, 0, 1, 3), 1), "same address, other port");
        assert!(limiter.admit(&v4(10, 0, 0, 2, 3), 1), "other address");
        let a: SocketAddr = "[2001:db8:1:2::1]:7000".parse().unwrap();
        let b: SocketAddr = "[2001:db8:1:2:ffff::9]:7001".parse().unwrap();
        let c: SocketAddr = "[2001:db8:1:3::1]:7000".parse().unwrap();
        assert!(limiter.admit(&a, 1));
        assert!(limiter.admit(&b, 1));
        assert!(!limiter.admit(&a, 1), "same /64");
        assert!(limiter.admit(&c, 1), "next /64");
        let mapped: SocketAddr = "[::ffff:10.0.0.2]:9".parse().unwrap();
        assert!(limiter.admit(&mapped, 1));
        assert!(!limiter.admit(&v4(10, 0, 0, 2, 4), 1), "an IPv4-mapped address is its IPv4 address");
    }

    #[test]
    fn the_table_stays_bounded_and_keeps_limited_sources() {
        let limiter = Limiter::new(5);
        let flooder = v4(192, 0, 2, 1, 4000);
        assert_eq!((0..100).filter(|_| limiter.admit(&flooder, 1)).count(), 5);
        // Four times the table's size in distinct sources, one datagram each.
        for i in 0..(4 * SOURCES) as u32 {
            let [_, b, c, d] = (0x0a00_0000 | i).to_be_bytes();
            assert!(limiter.admit(&v4(10, b, c, d, 1234), 2), "a newcomer is always admitted");
        }
        assert_eq!(limiter.tracked(), SOURCES);
        // The limited source was never evicted: it is still held to its rate.
        assert!(!limiter.admit(&flooder, 3), "the flood of newcomers must not reset a limited source");
        assert!(limiter.admit(&flooder, 1 + SECOND / 5 + 1));
    }
}
