//! Who may use echod, and how much of it: allow and deny lists of address prefixes
//! (`--allow`, `--deny`), and per-source limits on open connections and on new connections per
//! second (`--max-connections-per-source`, `--connect-rate-per-source`).
//!
//! Rules apply to the *client address*: the PROXY header's on PROXY listeners (checked after the
//! header, so the check is of the client, not of the load balancer), else the socket's peer
//! (checked right after accept, before the connection takes a slot or is counted), and every
//! datagram's source on UDP listeners.
//!
//! * **Prefix sets** are merged into sorted, non-overlapping ranges per address family and
//!   searched by binary search: a lookup among 10,000 rules is ~14 comparisons.
//! * **Per-source state** (IPv4: one address; IPv6: one /64, which one host can fill at will) is
//!   kept only for sources with open connections or recent connects, in one table bounded at
//!   `--max-connections` + [`IDLE_SOURCES`] entries: when it is full, entries of sources with no
//!   open connection are forgotten (first those whose rate bucket has refilled, then any), so a
//!   flood from millions of addresses cannot grow it. A forgotten source starts again with a full
//!   bucket.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::Cidr;
use crate::metrics::Rejection;

/// Entries kept for sources without open connections, beyond one per possible open connection.
pub const IDLE_SOURCES: usize = 65_536;

/// A set of address prefixes, for fast membership tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl PrefixSet {
    pub fn new<'a>(prefixes: impl IntoIterator<Item = &'a Cidr>) -> PrefixSet {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for cidr in prefixes {
            match cidr.0 {
                ipnet::IpNet::V4(net) => v4.push((u32::from(net.network()), u32::from(net.broadcast()))),
                ipnet::IpNet::V6(net) => v6.push((u128::from(net.network()), u128::from(net.broadcast()))),
            }
        }
        PrefixSet { v4: merge(v4), v6: merge(v6) }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Whether `ip` lies in one of the prefixes. IPv4-mapped IPv6 addresses match IPv4 prefixes
    /// (and IPv6 prefixes that cover them).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => within(&self.v4, u32::from(v4)),
            IpAddr::V6(v6) => {
                within(&self.v6, u128::from(v6))
                    || v6.to_ipv4_mapped().is_some_and(|v4| within(&self.v4, u32::from(v4)))
            }
        }
    }

    /// Whether every address of `other` is in this set.
    pub fn covers(&self, other: &PrefixSet) -> bool {
        other.v4.iter().all(|&r| covered(&self.v4, r)) && other.v6.iter().all(|&r| covered(&self.v6, r))
    }

    /// Whether the set holds every IPv4 and every IPv6 address.
    pub fn is_everything(&self) -> bool {
        self.v4 == [(0, u32::MAX)] && self.v6 == [(0, u128::MAX)]
    }
}

/// Sorts ranges and merges the ones that overlap or touch.
fn merge<T: Copy + Ord + num_like::Step>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut merged: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1.next_or_max() => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged.shrink_to_fit();
    merged
}

fn within<T: Copy + Ord>(ranges: &[(T, T)], x: T) -> bool {
    // The last range starting at or before x.
    let at = ranges.partition_point(|&(start, _)| start <= x);
    at > 0 && x <= ranges[at - 1].1
}

fn covered<T: Copy + Ord>(ranges: &[(T, T)], (start, end): (T, T)) -> bool {
    let at = ranges.partition_point(|&(s, _)| s <= start);
    at > 0 && end <= ranges[at - 1].1
}

mod num_like {
    /// The next value, saturating: what "touching" ranges need.
    pub trait Step {
        fn next_or_max(self) -> Self;
    }
    impl Step for u32 {
        fn next_or_max(self) -> Self {
            self.saturating_add(1)
        }
    }
    impl Step for u128 {
        fn next_or_max(self) -> Self {
            self.saturating_add(1)
        }
    }
}

/// `--allow` and `--deny`.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    allow: Option<PrefixSet>,
    deny: PrefixSet,
}

impl Rules {
    pub fn new(allow: &[Cidr], deny: &[Cidr]) -> Rules {
        Rules { allow: (!allow.is_empty()).then(|| PrefixSet::new(allow)), deny: PrefixSet::new(deny) }
    }

    /// Whether any rule is set.
    pub fn any(&self) -> bool {
        self.allow.is_some() || !self.deny.is_empty()
    }

    /// Whether `ip` may be served: inside an allow (when there are any), and in no deny.
    pub fn admits(&self, ip: IpAddr) -> bool {
        self.allow.as_ref().is_none_or(|allow| allow.contains(ip)) && !self.deny.contains(ip)
    }

    /// Whether the rules leave no address at all that may be served.
    pub fn unreachable(&self) -> bool {
        match &self.allow {
            Some(allow) => self.deny.covers(allow),
            None => self.deny.is_everything(),
        }
    }
}

/// The key of a source: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceKey(u128);

impl SourceKey {
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => SourceKey(u128::from(u32::from(v4)) | 1 << 127),
            IpAddr::V6(v6) => SourceKey(u128::from(v6) & !((1u128 << 64) - 1)),
        }
    }
}

/// `--max-connections-per-source` and `--connect-rate-per-source`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceLimitSpec {
    pub max_open: Option<u32>,
    pub connects_per_second: Option<f64>,
}

struct Entry {
    open: u32,
    tokens: f64,
    refilled: Instant,
}

/// Per-source counts, bounded in memory.
pub struct SourceLimits {
    spec: SourceLimitSpec,
    capacity: usize,
    table: Mutex<HashMap<SourceKey, Entry>>,
}

impl SourceLimits {
    pub fn new(spec: SourceLimitSpec, max_connections: usize) -> Arc<SourceLimits> {
        let capacity = max_connections.saturating_add(IDLE_SOURCES);
        Arc::new(SourceLimits { spec, capacity, table: Mutex::new(HashMap::new()) })
    }

    /// Admits one new connection from `ip`, or says why not. The slot returned counts the
    /// connection as open until it is dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<SourceSlot, Rejection> {
        let key = SourceKey::of(ip);
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if table.len() >= self.capacity && !table.contains_key(&key) {
            self.forget_idle(&mut table, now);
        }
        let burst = self.spec.connects_per_second.unwrap_or(0.0);
        let entry = table.entry(key).or_insert(Entry { open: 0, tokens: burst, refilled: now });
        if self.spec.max_open.is_some_and(|max| entry.open >= max) {
            return Err(Rejection::PerSourceLimit);
        }
        if let Some(rate) = self.spec.connects_per_second {
            entry.tokens =
                (entry.tokens + now.saturating_duration_since(entry.refilled).as_secs_f64() * rate).min(rate);
            entry.refilled = now;
            if entry.tokens < 1.0 {
                return Err(Rejection::ConnectRate);
            }
            entry.tokens -= 1.0;
        }
        entry.open += 1;
        Ok(SourceSlot { limits: self.clone(), key })
    }

    /// Makes room: forgets sources with no open connection, those whose bucket is full again
    /// first (nothing is lost by forgetting them), then any, down to 3/4 of the capacity.
    fn forget_idle(&self, table: &mut HashMap<SourceKey, Entry>, now: Instant) {
        let rate = self.spec.connects_per_second;
        table.retain(|_, e| {
            e.open > 0
                || rate.is_some_and(|r| {
                    e.tokens + now.saturating_duration_since(e.refilled).as_secs_f64() * r < r
                })
        });
        let target = self.capacity / 4 * 3;
        if table.len() > target {
            let mut excess = table.len() - target;
            table.retain(|_, e| {
                if e.open == 0 && excess > 0 {
                    excess -= 1;
                    false
                } else {
                    true
                }
            });
        }
    }

    fn release(&self, key: SourceKey) {
        let mut table = self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(entry) = table.get_mut(&key) {
            entry.open = entry.open.saturating_sub(1);
            if entry.open == 0 && self.spec.connects_per_second.is_none() {
                table.remove(&key);
            }
        }
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }
}

/// One open connection of a source, counted until dropped.
pub struct SourceSlot {
    limits: Arc<SourceLimits>,
    key: SourceKey,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.limits.release(self.key);
    }
}

impl fmt::Debug for SourceSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceSlot").field("key", &self.key).finish()
    }
}

/// Access control as the listeners apply it.
pub struct Access {
    pub rules: Rules,
    pub limits: Option<Arc<SourceLimits>>,
    log: RefusalLog,
}

impl Access {
    /// The access control of the flags, or `None` when nothing is restricted.
    pub fn new(rules: Rules, limits: Option<SourceLimitSpec>, max_connections: usize) -> Option<Arc<Access>> {
        let limits = limits
            .filter(|l| l.max_open.is_some() || l.connects_per_second.is_some())
            .map(|spec| SourceLimits::new(spec, max_connections));
        (rules.any() || limits.is_some())
            .then(|| Arc::new(Access { rules, limits, log: RefusalLog::default() }))
    }

    /// Admits a connection from `ip` (a slot when per-source limits are on), or says why not.
    pub fn admit(&self, ip: IpAddr) -> Result<Option<SourceSlot>, Rejection> {
        if !self.rules.admits(ip) {
            return Err(Rejection::Denied);
        }
        self.limits.as_ref().map(|limits| limits.admit(ip)).transpose()
    }

    /// Logs a refusal, at most once per [`RefusalLog::EVERY_MS`] per reason.
    pub fn log_refusal(&self, why: Rejection, client: std::net::SocketAddr) {
        self.log.note(why, client);
    }
}

/// At most one log line per reason every five seconds, with the count since the last one.
#[derive(Default)]
pub struct RefusalLog {
    last_ms: [AtomicU64; Rejection::ALL.len()],
    since: [AtomicU64; Rejection::ALL.len()],
}

impl RefusalLog {
    const EVERY_MS: u64 = 5_000;

    pub fn note(&self, why: Rejection, client: std::net::SocketAddr) {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + Self::EVERY_MS;
        let i = why as usize;
        let count = self.since[i].fetch_add(1, Relaxed) + 1;
        let last = self.last_ms[i].load(Relaxed);
        if now >= last + Self::EVERY_MS
            && self.last_ms[i].compare_exchange(last, now, Relaxed, Relaxed).is_ok()
        {
            self.since[i].store(0, Relaxed);
            tracing::warn!(reason = why.as_str(), %client, refused = count, "refusing connections (logged at most every 5 s per reason)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefix_sets_merge_and_match() {
        let set = PrefixSet::new(&cidrs(&[
            "10.0.0.0/9",
            "10.128.0.0/9",
            "192.0.2.7",
            "2001:db8::/32",
            "10.1.0.0/16",
        ]));
        assert_eq!(set.v4.len(), 2, "adjacent and nested prefixes merge: {:?}", set.v4);
        assert!(set.contains(ip("10.255.255.255")));
        assert!(set.contains(ip("192.0.2.7")));
        assert!(!set.contains(ip("192.0.2.8")));
        assert!(set.contains(ip("::ffff:10.3.4.5")), "mapped IPv4 matches IPv4 rules");
        assert!(set.contains(ip("2001:db8:ffff::1")));
        assert!(!set.contains(ip("2001:db9::1")));
        assert!(!PrefixSet::default().contains(ip("1.2.3.4")));
    }

    #[test]
    fn deny_beats_allow_and_unreachable_rules_are_spotted() {
        let rules = Rules::new(&cidrs(&["127.0.0.0/8"]), &cidrs(&["127.0.0.3"]));
        assert!(rules.admits(ip("127.0.0.2")));
        assert!(!rules.admits(ip("127.0.0.3")), "deny wins");
        assert!(!rules.admits(ip("::1")), "outside every allow");
        assert!(!rules.unreachable());
        assert!(Rules::new(&[], &cidrs(&["0.0.0.0/0", "::/0"])).unreachable());
        assert!(Rules::new(&cidrs(&["10.1.0.0/16"]), &cidrs(&["10.0.0.0/8"])).unreachable());
        assert!(!Rules::new(&[], &cidrs(&["0.0.0.0/0"])).unreachable(), "IPv6 still reachable");
        assert!(!Rules::default().any());
    }

    #[test]
    fn ten_thousand_rules_match_like_a_linear_scan() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let rules: Vec<Cidr> = (0..10_000)
            .map(|_| {
                let r = next();
                format!("{}/{}", std::net::Ipv4Addr::from(r as u32), 8 + (r >> 32) % 25).parse().unwrap()
            })
            .collect();
        let set = PrefixSet::new(&rules);
        for _ in 0..20_000 {
            let probe = IpAddr::V4(std::net::Ipv4Addr::from(next() as u32));
            assert_eq!(set.contains(probe), rules.iter().any(|c| c.contains(probe)), "{probe}");
        }
    }

    #[test]
    fn per_source_limits_count_open_connections_and_connect_rate() {
        let limits = SourceLimits::new(SourceLimitSpec { max_open: Some(2), connects_per_second: None }, 10);
        let a = limits.admit(ip("127.0.0.2")).unwrap();
        let _b = limits.admit(ip("127.0.0.2")).unwrap();
        assert_eq!(limits.admit(ip("127.0.0.2")).unwrap_err(), Rejection::PerSourceLimit);
        let _other = limits.admit(ip("127.0.0.3")).unwrap();
        drop(a);
        let _c = limits.admit(ip("127.0.0.2")).expect("a freed slot admits the next");
        // IPv6 sources are counted per /64.
        let _d = limits.admit(ip("2001:db8::1")).unwrap();
        let _e = limits.admit(ip("2001:db8::2")).unwrap();
        assert_eq!(limits.admit(ip("2001:db8::ffff:3")).unwrap_err(), Rejection::PerSourceLimit);
        assert!(limits.admit(ip("2001:db8:0:1::1")).is_ok());

        let rate = SourceLimits::new(SourceLimitSpec { max_open: None, connects_per_second: Some(3.0) }, 10);
        let slots: Vec<_> = (0..3).map(|_| rate.admit(ip("10.0.0.1")).unwrap()).collect();
        drop(slots);
        assert_eq!(rate.admit(ip("10.0.0.1")).unwrap_err(), Rejection::ConnectRate, "burst spent");
        assert!(rate.admit(ip("10.0.0.2")).is_ok(), "another source has its own bucket");
    }

    #[test]
    fn the_source_table_stays_bounded_under_a_flood_of_addresses() {
        let limits =
            SourceLimits::new(SourceLimitSpec { max_open: Some(1), connects_per_second: Some(1.0) }, 100);
        let held = limits.admit(ip("192.0.2.1")).unwrap();
        for i in 0..300_000u32 {
            let _ = limits.admit(IpAddr::V4(std::net::Ipv4Addr::from(0x0A00_0000 + i)));
            assert!(limits.tracked() <= 100 + IDLE_SOURCES);
        }
        // The source with an open connection is never forgotten: still at its limit.
        assert_eq!(limits.admit(ip("192.0.2.1")).unwrap_err(), Rejection::PerSourceLimit);
        drop(held);
    }
}
