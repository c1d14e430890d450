//! The PROXY protocol header (HAProxy's spec, v1 text or v2 binary) sent first on every
//! connection, built with the `ppp` crate. The client address it claims is chosen
//! (`--proxy-source`) or generated, distinct per connection, from the ranges reserved for
//! benchmarking (198.18.0.0/15, 2001:2::/48), which no real client has.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// `--proxy-protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The text header: `PROXY TCP4 src dst sport dport\r\n`.
    V1,
    /// The binary header.
    V2,
}

/// `--proxy-source IP[:PORT]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxySource {
    pub ip: IpAddr,
    /// Fixed port; else one per connection.
    pub port: Option<u16>,
}

pub fn parse_source(s: &str) -> Result<ProxySource, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(ProxySource { ip: addr.ip(), port: Some(addr.port()) });
    }
    let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
    bare.parse::<IpAddr>()
        .map(|ip| ProxySource { ip, port: None })
        .map_err(|_| format!("`{s}` is not IP or IP:PORT (IPv6 as [ip]:port)"))
}

/// Generated addresses: 2^17 IPv4 addresses in 198.18.0.0/15.
const V4_ADDRS: u64 = 1 << 17;
/// Ports for generated client addresses: 1024..=65535.
const PORTS: u64 = 65536 - 1024;

#[derive(Debug, Clone)]
pub struct Proxy {
    pub version: ProxyVersion,
    pub source: Option<ProxySource>,
}

impl Proxy {
    /// Checks that the claimed address's family is the target's (the header carries one family).
    pub fn check(&self, target: SocketAddr) -> Result<(), String> {
        match self.source {
            Some(s) if s.ip.is_ipv4() != target.is_ipv4() => Err(format!(
                "{} and the target {target} are of different address families; a PROXY header carries one",
                s.ip
            )),
            _ => Ok(()),
        }
    }

    /// The client address connection `id` claims.
    pub fn source(&self, id: u64, target: SocketAddr) -> SocketAddr {
        let port = |n: u64| 1024 + (n % PORTS) as u16;
        match self.source {
            Some(ProxySource { ip, port: Some(p) }) => SocketAddr::new(ip, p),
            Some(ProxySource { ip, port: None }) => SocketAddr::new(ip, port(id)),
            None if target.is_ipv4() => {
                let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
                let ip = Ipv4Addr::from(base + (id % V4_ADDRS) as u32);
                SocketAddr::new(IpAddr::V4(ip), port(id / V4_ADDRS))
            }
            None => {
                let base = u128::from(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0));
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(base + u128::from(id))), port(0))
            }
        }
    }

    /// The header of connection `id` to `target`.
    pub fn header(&self, id: u64, target: SocketAddr) -> Result<Vec<u8>, String> {
        let addresses = (self.source(id, target), target);
        match self.version {
            ProxyVersion::V1 => Ok(ppp::v1::Addresses::from(addresses).to_string().into_bytes()),
            ProxyVersion::V2 => {
                use ppp::v2::{Builder, Command, Protocol, Version};
                Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addresses)
                    .build()
                    .map_err(|e| format!("cannot build the PROXY v2 header: {e}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_back_with_the_claimed_address() {
        let target: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let proxy = Proxy { version: ProxyVersion::V1, source: None };
        let h = proxy.header(5, target).unwrap();
        assert_eq!(String::from_utf8(h).unwrap(), "PROXY TCP4 198.18.0.5 127.0.0.1 1024 7000\r\n");
        let proxy =
            Proxy { version: ProxyVersion::V2, source: Some(parse_source("203.0.113.9:4000").unwrap()) };
        let h = proxy.header(5, target).unwrap();
        let parsed = ppp::v2::Header::try_from(&h[..]).unwrap();
        assert_eq!(
            parsed.addresses,
            ppp::v2::Addresses::from(("203.0.113.9:4000".parse::<SocketAddr>().unwrap(), target))
        );
        assert_eq!(parsed.len(), h.len());
    }

    #[test]
    fn generated_addresses_are_distinct_per_connection() {
        let proxy = Proxy { version: ProxyVersion::V1, source: None };
        let v4: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        for target in [v4, v6] {
            let mut seen = std::collections::HashSet::new();
            for id in (0..1000).chain(V4_ADDRS - 5..V4_ADDRS + 5) {
                assert!(seen.insert(proxy.source(id, target)), "{id}");
            }
        }
        let chosen =
            Proxy { version: ProxyVersion::V1, source: Some(parse_source("[2001:db8::1]").unwrap()) };
        assert_ne!(chosen.source(1, v6), chosen.source(2, v6));
        assert!(chosen.check(v4).is_err());
        assert!(chosen.check(v6).is_ok());
        assert!(parse_source("nope").is_err());
    }
}
