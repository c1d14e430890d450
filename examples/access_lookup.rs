//! Benchmark of the access-control lookup: 10,000 random prefixes, lookups of random addresses,
//! echod's merged-range binary search against a linear scan of the rules (the baseline), in the
//! same run. Prints one JSON line.
//!
//!     cargo run --release --example access_lookup [RULES] [LOOKUPS]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use echod::access::PrefixSet;
use echod::config::Cidr;

fn main() {
    let mut args = std::env::args().skip(1);
    let rules: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let lookups: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let prefixes: Vec<Cidr> = (0..rules)
        .map(|i| {
            let r = next();
            let text = if i % 2 == 0 {
                format!("{}/{}", Ipv4Addr::from(r as u32), 8 + (r >> 32) % 25)
            } else {
                format!(
                    "{}/{}",
                    Ipv6Addr::from(u128::from(r) << 64 | u128::from(next())),
                    16 + (r >> 32) % 49
                )
            };
            text.parse().expect("a generated prefix parses")
        })
        .collect();
    let built = Instant::now();
    let set = PrefixSet::new(&prefixes);
    let build_ms = built.elapsed().as_secs_f64() * 1e3;
    let probes: Vec<IpAddr> = (0..4096)
        .map(|i| {
            let r = next();
            if i % 2 == 0 {
                IpAddr::V4(Ipv4Addr::from(r as u32))
            } else {
                IpAddr::V6(Ipv6Addr::from(u128::from(r) << 64))
            }
        })
        .collect();

    let time = |f: &dyn Fn(IpAddr) -> bool, n: usize| {
        let started = Instant::now();
        let mut hits = 0usize;
        for i in 0..n {
            hits += usize::from(f(black_box(probes[i % probes.len()])));
        }
        (started.elapsed().as_secs_f64() * 1e9 / n as f64, hits)
    };
    let (set_ns, set_hits) = time(&|ip| set.contains(ip), lookups);
    let scan_lookups = (lookups / 100).max(1000);
    let (scan_ns, _) = time(&|ip| prefixes.iter().any(|c| c.contains(ip)), scan_lookups);
    println!(
        "{{\"rules\": {rules}, \"build_ms\": {build_ms:.2}, \"lookup_ns\": {set_ns:.1}, \"linear_scan_ns\": {scan_ns:.1}, \"speedup\": {:.0}, \"hits\": {set_hits}}}",
        scan_ns / set_ns
    );
}
