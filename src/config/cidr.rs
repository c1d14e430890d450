//! Address prefixes as flags take them: `10.0.0.0/8`, `2001:db8::/32`, or a bare address for a
//! single host.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// An IPv4 or IPv6 prefix. Host bits below the prefix length are cleared (`10.1.2.3/8` is
/// `10.0.0.0/8`), as routers read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr(pub IpNet);

impl Cidr {
    /// Whether `ip` lies inside this prefix. IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`)
    /// match IPv4 prefixes (and IPv6 prefixes that cover them).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip) || self.0.contains(&ip.to_canonical())
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let t = s.trim();
        let net = if t.contains('/') {
            t.parse::<IpNet>().map_err(|_| {
                format!(
                    "`{s}` is not an address prefix (expected e.g. 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7)"
                )
            })?
        } else {
            let ip: IpAddr = t.parse().map_err(|_| {
                format!("`{s}` is not an address or prefix (expected e.g. 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7)")
            })?;
            IpNet::from(ip)
        };
        // A mapped IPv4 prefix means the IPv4 one.
        let net = match net {
            IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
                Some(v4) => {
                    IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).map_err(|e| format!("`{s}`: {e}"))?
                }
                None => net,
            },
            _ => net,
        };
        Ok(Cidr(net.trunc()))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_hosts() {
        let net: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(net.to_string(), "10.0.0.0/8");
        assert!(net.contains("10.200.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.0.0.9".parse().unwrap()), "mapped IPv4 matches IPv4 rules");
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let host: Cidr = "127.0.0.3".parse().unwrap();
        assert_eq!(host.to_string(), "127.0.0.3/32");
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert_eq!("::ffff:10.0.0.0/104".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("banana".parse::<Cidr>().unwrap_err().contains("`banana`"));
    }
}
