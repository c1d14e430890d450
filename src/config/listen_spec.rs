//! `--listen` specifications: `[SCHEME://]ADDR[?OPTION=VALUE&...]`, parsed into a typed
//! [`ListenSpec`].
//!
//! * `ADDR` or `tcp://ADDR`: TCP echo. `tls://ADDR`: TLS echo. `udp://ADDR`: UDP echo.
//! * Options (stream listeners, tcp and tls):
//!   - `proxy=v1|v2|any`: every connection must start with a PROXY protocol header;
//!   - faults, each applied per connection: `delay=DURATION`, `rate=BYTES` (per second),
//!     `stall_after=BYTES`, `close_after=BYTES|MIN-MAX`, `reset_after=BYTES|MIN-MAX`,
//!     `reset_probability=P` (0 to 1).
//!
//! A spec prints back in the same syntax ([`fmt::Display`]), canonically: scheme always written,
//! options in the order above. That is how listeners are logged, and `parse(display(spec)) ==
//! spec` for every spec (unit- and property-tested).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use super::values::{duration_in, format_size, size, MAX_DURATION};

/// The protocol a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Tcp,
    Tls,
    Udp,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Tcp => "tcp",
            Scheme::Tls => "tls",
            Scheme::Udp => "udp",
        }
    }

    /// Whether the listener accepts connections (tcp, tls) rather than datagrams.
    pub fn is_stream(self) -> bool {
        !matches!(self, Scheme::Udp)
    }
}

/// Which PROXY protocol header a listener requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyVersion {
    V1,
    V2,
    /// Either version, told apart by the header's first bytes.
    Any,
}

impl ProxyVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
            ProxyVersion::Any => "any",
        }
    }
}

/// A byte count, or a range from which each connection draws its own count uniformly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ByteCount {
    pub min: u64,
    pub max: u64,
}

impl fmt::Display for ByteCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", format_size(self.min))
        } else {
            write!(f, "{}-{}", format_size(self.min), format_size(self.max))
        }
    }
}

/// Faults injected into every connection of a listener (all off by default).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FaultSpec {
    /// Every byte is echoed no sooner than this after it was received.
    pub delay: Option<Duration>,
    /// The echo direction is capped to this many bytes per second.
    pub rate: Option<u64>,
    /// After echoing this many bytes, stop reading and writing; keep the connection open.
    pub stall_after: Option<u64>,
    /// After echoing this many bytes, close (FIN).
    pub close_after: Option<ByteCount>,
    /// After echoing this many bytes, reset (RST).
    pub reset_after: Option<ByteCount>,
    /// Each new connection is reset at once with this probability.
    pub reset_probability: Option<f64>,
}

impl FaultSpec {
    /// Whether any fault is configured.
    pub fn any(&self) -> bool {
        *self != FaultSpec::default()
    }

    /// Whether a fault acts on the echo itself (not only on the connection's start).
    pub fn shapes_echo(&self) -> bool {
        self.delay.is_some()
            || self.rate.is_some()
            || self.stall_after.is_some()
            || self.close_after.is_some()
            || self.reset_after.is_some()
    }
}

/// One `--listen` value.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenSpec {
    pub scheme: Scheme,
    pub addr: SocketAddr,
    pub proxy: Option<ProxyVersion>,
    pub faults: FaultSpec,
}

/// The options a stream listener takes, in canonical order.
const STREAM_OPTIONS: [&str; 7] =
    ["proxy", "delay", "rate", "stall_after", "close_after", "reset_after", "reset_probability"];

impl ListenSpec {
    /// A plain TCP listener on `addr`.
    pub fn tcp(addr: SocketAddr) -> ListenSpec {
        ListenSpec { scheme: Scheme::Tcp, addr, proxy: None, faults: FaultSpec::default() }
    }

    /// The same listener on another address (the bound one, once port 0 is resolved).
    pub fn with_addr(&self, addr: SocketAddr) -> ListenSpec {
        ListenSpec { addr, ..self.clone() }
    }

    /// Whether this is a plain TCP echo: no stage before the echo and no fault in it.
    pub fn is_plain_tcp(&self) -> bool {
        self.scheme == Scheme::Tcp && self.proxy.is_none() && !self.faults.any()
    }

    /// The `listener` label of the connection metrics: the address for plain-scheme TCP (as
    /// before listener specs existed), `SCHEME://ADDR` for the others; options left out.
    pub fn label(&self) -> String {
        match self.scheme {
            Scheme::Tcp => self.addr.to_string(),
            other => format!("{}://{}", other.as_str(), self.addr),
        }
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.addr)?;
        let mut sep = '?';
        let mut option = |f: &mut fmt::Formatter<'_>, name: &str, value: &dyn fmt::Display| {
            let result = write!(f, "{sep}{name}={value}");
            sep = '&';
            result
        };
        let faults = &self.faults;
        if let Some(proxy) = self.proxy {
            option(f, "proxy", &proxy.as_str())?;
        }
        if let Some(delay) = faults.delay {
            option(f, "delay", &humantime::format_duration(delay))?;
        }
        if let Some(rate) = faults.rate {
            option(f, "rate", &format_size(rate))?;
        }
        if let Some(n) = faults.stall_after {
            option(f, "stall_after", &format_size(n))?;
        }
        if let Some(n) = faults.close_after {
            option(f, "close_after", &n)?;
        }
        if let Some(n) = faults.reset_after {
            option(f, "reset_after", &n)?;
        }
        if let Some(p) = faults.reset_probability {
            option(f, "reset_probability", &p)?;
        }
        Ok(())
    }
}

impl FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<ListenSpec, String> {
        let t = s.trim();
        let (scheme, rest) = match t.split_once("://") {
            Some((scheme, rest)) => {
                let scheme = match scheme.to_ascii_lowercase().as_str() {
                    "tcp" => Scheme::Tcp,
                    "tls" => Scheme::Tls,
                    "udp" => Scheme::Udp,
                    other => {
                        return Err(format!("unknown scheme `{other}://` (use tcp://, tls:// or udp://)"))
                    }
                };
                (scheme, rest)
            }
            None => (Scheme::Tcp, t),
        };
        let (addr, query) = match rest.split_once('?') {
            Some((addr, query)) => (addr, Some(query)),
            None => (rest, None),
        };
        let addr: SocketAddr = addr.parse().map_err(|_| {
            format!("`{addr}` is not an IP address with a port (expected e.g. 0.0.0.0:8080 or [::]:8080)")
        })?;
        let mut spec = ListenSpec { scheme, addr, proxy: None, faults: FaultSpec::default() };
        let Some(query) = query else {
            return Ok(spec);
        };
        let mut seen: Vec<&str> = Vec::new();
        for pair in query.split('&') {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("option `{pair}` has no value (expected OPTION=VALUE)"))?;
            if !STREAM_OPTIONS.contains(&name) {
                return Err(format!("unknown option `{name}` (options: {})", STREAM_OPTIONS.join(", ")));
            }
            if !scheme.is_stream() {
                return Err(format!("option `{name}` does not apply to {}:// listeners", scheme.as_str()));
            }
            if seen.contains(&name) {
                return Err(format!("option `{name}` given twice"));
            }
            seen.push(name);
            let bad = |why: String| format!("option `{name}={value}`: {why}");
            let faults = &mut spec.faults;
            match name {
                "proxy" => {
                    spec.proxy = Some(match value {
                        "v1" => ProxyVersion::V1,
                        "v2" => ProxyVersion::V2,
                        "any" => ProxyVersion::Any,
                        _ => return Err(bad("expected v1, v2 or any".into())),
                    })
                }
                "delay" => {
                    faults.delay =
                        Some(duration_in(value, Duration::from_millis(1), MAX_DURATION).map_err(bad)?)
                }
                "rate" => faults.rate = Some(positive_size(value).map_err(bad)?),
                "stall_after" => faults.stall_after = Some(size(value).map_err(bad)?),
                "close_after" => faults.close_after = Some(byte_count(value).map_err(bad)?),
                "reset_after" => faults.reset_after = Some(byte_count(value).map_err(bad)?),
                "reset_probability" => faults.reset_probability = Some(probability(value).map_err(bad)?),
                _ => unreachable!("every name in STREAM_OPTIONS is handled"),
            }
        }
        Ok(spec)
    }
}

fn positive_size(s: &str) -> Result<u64, String> {
    match size(s)? {
        0 => Err("must be greater than zero".into()),
        n => Ok(n),
    }
}

fn byte_count(s: &str) -> Result<ByteCount, String> {
    // A range is `MIN-MAX`; sizes never contain '-' themselves (negative sizes are refused).
    match s.split_once('-') {
        Some((min, max)) if !min.trim().is_empty() => {
            let (min, max) = (size(min)?, size(max)?);
            if min > max {
                return Err(format!("range `{s}` is empty: MIN must not exceed MAX"));
            }
            Ok(ByteCount { min, max })
        }
        _ => size(s).map(|n| ByteCount { min: n, max: n }),
    }
}

fn probability(s: &str) -> Result<f64, String> {
    let p: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !(0.0..=1.0).contains(&p) {
        return Err(format!("`{s}` must be between 0 and 1"));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ListenSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn bare_addresses_and_tcp_scheme_are_plain_tcp() {
        let plain = parse("127.0.0.1:8080");
        assert_eq!(plain, ListenSpec::tcp("127.0.0.1:8080".parse().unwrap()));
        assert!(plain.is_plain_tcp());
        assert_eq!(parse("tcp://127.0.0.1:8080"), plain);
        assert_eq!(parse("TCP://[::1]:7").addr, "[::1]:7".parse().unwrap());
        assert_eq!(plain.label(), "127.0.0.1:8080");
        assert_eq!(plain.to_string(), "tcp://127.0.0.1:8080");
    }

    #[test]
    fn schemes_and_labels() {
        assert_eq!(parse("tls://0.0.0.0:8443").scheme, Scheme::Tls);
        assert_eq!(parse("tls://0.0.0.0:8443?proxy=v2").label(), "tls://0.0.0.0:8443");
        assert_eq!(parse("udp://[::]:7").label(), "udp://[::]:7");
        assert_eq!(parse("tcp://127.0.0.1:1?proxy=any").label(), "127.0.0.1:1");
    }

    #[test]
    fn options_parse_into_types() {
        let s = parse(
            "tcp://127.0.0.1:0?proxy=v1&delay=50ms&rate=64KiB&stall_after=1MiB&close_after=100-200&reset_after=10&reset_probability=0.25",
        );
        assert_eq!(s.proxy, Some(ProxyVersion::V1));
        assert_eq!(s.faults.delay, Some(Duration::from_millis(50)));
        assert_eq!(s.faults.rate, Some(64 * 1024));
        assert_eq!(s.faults.stall_after, Some(1 << 20));
        assert_eq!(s.faults.close_after, Some(ByteCount { min: 100, max: 200 }));
        assert_eq!(s.faults.reset_after, Some(ByteCount { min: 10, max: 10 }));
        assert_eq!(s.faults.reset_probability, Some(0.25));
        assert!(!s.is_plain_tcp());
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "tcp://127.0.0.1:8080",
            "tls://[::1]:8443?proxy=v2",
            "udp://0.0.0.0:7",
            "tcp://127.0.0.1:9?proxy=any&delay=1s 500ms&rate=3MiB&stall_after=7B&close_after=1KiB-2KiB&reset_after=5B&reset_probability=0.5",
        ] {
            let spec = parse(text);
            assert_eq!(spec.to_string(), text);
            assert_eq!(parse(&spec.to_string()), spec);
        }
    }

    #[test]
    fn bad_specs_name_the_offending_part() {
        let err = |s: &str| s.parse::<ListenSpec>().unwrap_err();
        assert!(err("http://1.2.3.4:80").contains("unknown scheme `http://`"));
        assert!(err("nonsense").contains("`nonsense`"));
        assert!(err("localhost:80").contains("`localhost:80`"));
        assert!(err("tcp://127.0.0.1:1?color=red").contains("unknown option `color`"));
        assert!(err("tcp://127.0.0.1:1?proxy=v3").contains("proxy=v3"));
        assert!(err("tcp://127.0.0.1:1?proxy").contains("no value"));
        assert!(err("tcp://127.0.0.1:1?proxy=v1&proxy=v2").contains("twice"));
        assert!(err("udp://127.0.0.1:1?proxy=v1").contains("does not apply to udp://"));
        assert!(err("tcp://127.0.0.1:1?rate=0").contains("rate=0"));
        assert!(err("tcp://127.0.0.1:1?delay=-1s").contains("negative"));
        assert!(err("tcp://127.0.0.1:1?close_after=9-3").contains("empty"));
        assert!(err("tcp://127.0.0.1:1?reset_probability=1.5").contains("between 0 and 1"));
    }
}
