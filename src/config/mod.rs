//! Command-line flags and their environment variables, parsed and validated.
//!
//! Every flag is documented here, where it is defined: `echod --help` prints these doc
//! comments, and the README's flag table is written from them. Every flag can also be set
//! through an `ECHOD_*` environment variable, so containers and systemd units configure echod
//! without a wrapper script; a flag on the command line wins over the environment.
//!
//! Validation happens in clap's value parsers ([`values`]), so a bad value is reported by clap
//! itself: a message naming the flag and the value, and exit status 2. What only the flags
//! together can tell (a `tls://` listener without a certificate) is checked by
//! [`Config::check`], with the same message shape and exit status.
//!
//! The typed descriptions flags parse into live in submodules: [`listen_spec`] (`--listen`),
//! [`banner`] (`--banner`), [`cidr`] (address prefixes).

pub mod banner;
pub mod cidr;
pub mod listen_spec;
#[cfg(test)]
mod proptests;
pub mod values;

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, ValueEnum};

use crate::net::Keepalive;

pub use banner::{BannerPart, BannerTemplate};
pub use cidr::Cidr;
pub use listen_spec::{ByteCount, FaultSpec, ListenSpec, ProxyVersion, Scheme};
pub use values::{OptionalAddr, OptionalDuration};

/// The default echo listener: TCP on every IPv4 interface, port 8080.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

/// The default address of the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`).
///
/// Port 9007: "9" as Prometheus exporters' ports go, "007" for echo (RFC 862's port 7).
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9007";

/// Linux's limits on the keepalive socket options (`TCP_KEEPIDLE`/`TCP_KEEPINTVL` in seconds,
/// `TCP_KEEPCNT`), applied on every platform so a value that works here works everywhere.
pub const MAX_KEEPALIVE_SECS: u64 = 32_767;
pub const MAX_KEEPALIVE_COUNT: u64 = 127;

/// Longest drain phase (`--shutdown-timeout`, `--shutdown-delay`) and handshake timeout.
const MAX_PHASE: Duration = Duration::from_secs(24 * 3600);

/// A production echo server: every byte a client sends comes back, in order, exactly once.
///
/// echod serves each client from its own task, applies connection limits and idle timeouts,
/// exports Prometheus metrics, and drains gracefully on SIGINT/SIGTERM (ctrl-c on Windows).
#[derive(Debug, Clone, Parser)]
#[command(name = "echod", version, about, long_about = None, max_term_width = 100)]
pub struct Config {
    /// Listener to serve echo clients on, `[SCHEME://]ADDR[?OPTION=VALUE&...]`; repeat the flag
    /// for several.
    ///
    /// `ADDR` or `tcp://ADDR` is a TCP echo (`0.0.0.0:8080`, `[::1]:7007`; port 0 picks a free
    /// port, and the bound address is logged); `tls://ADDR` is the same echo over TLS 1.2 or 1.3
    /// (needs `--tls-cert` and `--tls-key`). Options of tcp and tls listeners:
    /// `proxy=v1|v2|any` requires a PROXY protocol header first on every connection (before the
    /// TLS handshake); faults (per connection):
    /// `delay=DURATION`, `rate=BYTES` (per second), `stall_after=BYTES`, `close_after=BYTES`,
    /// `reset_after=BYTES` (a `MIN-MAX` range draws a point per connection),
    /// `reset_probability=P`. `udp://ADDR` is a UDP echo: every datagram goes back to its
    /// source, once, unchanged (none by default: echod opens no UDP socket unless asked). In
    /// the environment, separate listeners with commas.
    #[arg(
        long = "listen",
        value_name = "SPEC",
        env = "ECHOD_LISTEN",
        value_delimiter = ',',
        default_value = DEFAULT_LISTEN,
        allow_hyphen_values = true,
        value_parser = parse_listen_spec
    )]
    pub listen: Vec<ListenSpec>,

    /// Number of runtime worker threads [default: the number of CPUs available].
    #[arg(long, value_name = "N", env = "ECHOD_WORKERS", allow_negative_numbers = true)]
    pub workers: Option<NonZeroUsize>,

    /// Most clients served at once; at the limit echod stops accepting and newcomers wait in
    /// the kernel's backlog until a slot frees.
    ///
    /// Default: the open-files limit less a reserve for the process's own files, so echod
    /// reaches its own limit before the operating system's.
    #[arg(long, value_name = "N", env = "ECHOD_MAX_CONNECTIONS", allow_negative_numbers = true)]
    pub max_connections: Option<NonZeroUsize>,

    /// Most memory all connections together may hold in echo buffers (`256MiB`, `1GiB`;
    /// `auto`). Buffers grow for bulk traffic only within it; a connection that cannot grow
    /// keeps echoing with the buffers it has.
    ///
    /// `auto`: half the container's memory limit (cgroup) when there is one, else a quarter of
    /// the machine's memory (1 GiB where neither can be read).
    #[arg(long, value_name = "SIZE|auto", env = "ECHOD_MAX_BUFFER_MEMORY", default_value = "auto",
          allow_hyphen_values = true, value_parser = parse_buffer_memory)]
    pub max_buffer_memory: BufferMemory,

    /// Close a connection after no bytes moved in either direction for this long (`30s`,
    /// `5m`; `off` disables).
    #[arg(long, value_name = "DURATION", env = "ECHOD_IDLE_TIMEOUT", default_value = "off",
          allow_hyphen_values = true,
          value_parser = |s: &str| values::optional_duration_in(s, Duration::from_millis(10), values::MAX_DURATION))]
    pub idle_timeout: OptionalDuration,

    /// Idle time before TCP keepalive probes start on a client socket, so peers that vanished
    /// without a FIN or RST are found and freed (whole seconds, 1s to 32767s; `off` disables).
    #[arg(long, value_name = "DURATION", env = "ECHOD_TCP_KEEPALIVE", default_value = "60s",
          allow_hyphen_values = true, value_parser = parse_keepalive)]
    pub tcp_keepalive: OptionalDuration,

    /// Time between keepalive probes once the first went unanswered (whole seconds).
    #[arg(long, value_name = "DURATION", env = "ECHOD_TCP_KEEPALIVE_INTERVAL", default_value = "10s",
          allow_hyphen_values = true,
          value_parser = |s: &str| values::whole_seconds_in(s, 1, MAX_KEEPALIVE_SECS))]
    pub tcp_keepalive_interval: Duration,

    /// Unanswered keepalive probes after which the peer is declared gone (1 to 127).
    #[arg(long, value_name = "N", env = "ECHOD_TCP_KEEPALIVE_COUNT", default_value = "3",
          allow_hyphen_values = true,
          value_parser = |s: &str| values::count_in(s, 1, MAX_KEEPALIVE_COUNT).map(|n| n as u32))]
    pub tcp_keepalive_count: u32,

    /// Longest time sent data may stay unacknowledged before the connection is dropped
    /// (`TCP_USER_TIMEOUT`, Linux): what frees a peer that vanished with data in flight, which
    /// keepalive (it only probes idle connections) never finds.
    ///
    /// `auto`: the keepalive's own detection time, idle + spread + count × longest interval
    /// (each connection's idle time is lengthened by up to half, at least one interval, and its
    /// interval by up to half; 132 s by default), so both cases are freed in the same
    /// bound; `off` leaves the kernel's retransmission limit (about 15 minutes).
    #[arg(long, value_name = "DURATION|auto|off", env = "ECHOD_TCP_USER_TIMEOUT", default_value = "auto",
          allow_hyphen_values = true, value_parser = parse_user_timeout)]
    pub tcp_user_timeout: UserTimeout,

    /// Length of each listener's queue of connections the kernel completed but echod has not
    /// yet accepted (the kernel may cap it, e.g. at net.core.somaxconn).
    #[arg(long, value_name = "N", env = "ECHOD_BACKLOG", default_value_t = 1024, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub backlog: u32,

    /// On SIGINT/SIGTERM, how long clients with data in flight may keep echoing before echod
    /// closes them and exits (idle clients are closed when the listeners close). A little under
    /// Kubernetes' default 30 s grace period.
    #[arg(long, value_name = "DURATION", env = "ECHOD_SHUTDOWN_TIMEOUT", default_value = "25s",
          allow_hyphen_values = true, value_parser = |s: &str| values::duration_in(s, Duration::ZERO, MAX_PHASE))]
    pub shutdown_timeout: Duration,

    /// On SIGINT/SIGTERM, keep accepting new clients for this long while `/readyz` already
    /// answers 503, so load balancers stop sending before the listeners close.
    #[arg(long, value_name = "DURATION", env = "ECHOD_SHUTDOWN_DELAY", default_value = "0s",
          allow_hyphen_values = true, value_parser = |s: &str| values::duration_in(s, Duration::ZERO, MAX_PHASE))]
    pub shutdown_delay: Duration,

    /// How long a client of a `proxy=` listener has to send its PROXY header; then it is
    /// closed.
    #[arg(long, value_name = "DURATION", env = "ECHOD_PROXY_HEADER_TIMEOUT", default_value = "5s",
          allow_hyphen_values = true,
          value_parser = |s: &str| values::duration_in(s, Duration::from_millis(1), MAX_PHASE))]
    pub proxy_header_timeout: Duration,

    /// Peers allowed to send PROXY headers (`10.0.0.0/8`, a bare address for one host);
    /// repeatable, comma-separated in the environment. A connection to a `proxy=` listener from
    /// any other peer is reset at once, unread. Unset: any peer (echod warns at start).
    #[arg(long, value_name = "CIDR", env = "ECHOD_PROXY_FROM", value_delimiter = ',')]
    pub proxy_from: Vec<Cidr>,

    /// Serve only clients inside these prefixes (`10.0.0.0/8`, `2001:db8::/32`, a bare address
    /// for one host); repeatable, comma-separated in the environment. The client is the PROXY
    /// header's on PROXY listeners, else the socket's peer; UDP datagrams by their source.
    #[arg(long, value_name = "CIDR", env = "ECHOD_ALLOW", value_delimiter = ',')]
    pub allow: Vec<Cidr>,

    /// Refuse clients inside these prefixes, whatever `--allow` says; repeatable.
    #[arg(long, value_name = "CIDR", env = "ECHOD_DENY", value_delimiter = ',')]
    pub deny: Vec<Cidr>,

    /// Most connections open at once from one client address (IPv6: one /64); more are
    /// refused with a reset [default: no limit].
    #[arg(long, value_name = "N", env = "ECHOD_MAX_CONNECTIONS_PER_SOURCE", allow_hyphen_values = true,
          value_parser = |s: &str| values::count_in(s, 1, u64::from(u32::MAX)).map(|n| n as u32))]
    pub max_connections_per_source: Option<u32>,

    /// Most new connections per second from one client address (IPv6: one /64; a token bucket
    /// with a burst of as many); more are refused with a reset [default: no limit].
    #[arg(long, value_name = "PER_SECOND", env = "ECHOD_CONNECT_RATE_PER_SOURCE", allow_hyphen_values = true,
          value_parser = parse_rate)]
    pub connect_rate_per_source: Option<f64>,

    /// A line sent to every stream client before the echo (after any PROXY header):
    /// placeholders `{hostname}`, `{client}`, `{peer}`, `{server}`, `{listener}`, `{version}`,
    /// `{client_cert}`; `{{` and `}}` for braces. Tells a tester which backend answered and
    /// which client address it saw.
    #[arg(long, value_name = "TEXT", env = "ECHOD_BANNER", allow_hyphen_values = true)]
    pub banner: Option<BannerTemplate>,

    /// Certificate chain of the `tls://` listeners (PEM, the server's certificate first, then
    /// any intermediates). Re-read on SIGHUP and when it changes on disk; a file that does not
    /// load then is logged and the previous certificate stays in use.
    #[arg(long, value_name = "FILE", env = "ECHOD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key of `--tls-cert` (PEM: PKCS#8, PKCS#1 or SEC1). Re-read with the certificate.
    #[arg(long, value_name = "FILE", env = "ECHOD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: clients of the `tls://` listeners must present a certificate that chains to
    /// one of these CA certificates (PEM bundle); re-read with the certificate. The client
    /// certificate's subject is logged at debug and fills the banner's `{client_cert}`.
    #[arg(long, value_name = "FILE", env = "ECHOD_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// How long a client of a `tls://` listener has to complete its TLS handshake (after any
    /// PROXY header); then it is closed.
    #[arg(long, value_name = "DURATION", env = "ECHOD_TLS_HANDSHAKE_TIMEOUT", default_value = "10s",
          allow_hyphen_values = true,
          value_parser = |s: &str| values::duration_in(s, Duration::from_millis(1), MAX_PHASE))]
    pub tls_handshake_timeout: Duration,

    /// How often the TLS files (certificate, key, client CA) are checked for changes, which
    /// are then loaded for new handshakes (`off`: only on SIGHUP). Replacing the files, as
    /// Kubernetes does when it updates a mounted Secret, is a change.
    #[arg(long, value_name = "DURATION", env = "ECHOD_TLS_RELOAD_INTERVAL", default_value = "10s",
          allow_hyphen_values = true,
          value_parser = |s: &str| values::optional_duration_in(s, Duration::from_millis(100), MAX_PHASE))]
    pub tls_reload_interval: OptionalDuration,

    /// Receive and send buffer of each UDP socket (`4MiB`, `256KiB`), room for bursts while a
    /// worker is busy; datagrams arriving at a full buffer are lost. The kernel may cap it
    /// (Linux: net.core.rmem_max and wmem_max), which echod logs at start.
    #[arg(long, value_name = "SIZE", env = "ECHOD_UDP_SOCKET_BUFFER", default_value = "4MiB",
          allow_hyphen_values = true, value_parser = parse_udp_socket_buffer)]
    pub udp_socket_buffer: usize,

    /// Datagrams per second each client may send to the UDP listeners, a token bucket with a
    /// burst of the same size, per IPv4 address or IPv6 /64 (`off` disables). What exceeds it is
    /// dropped unanswered, so echod cannot be used to flood a spoofed victim.
    #[arg(long, value_name = "N|off", env = "ECHOD_UDP_RATE_LIMIT", default_value = "1000",
          allow_hyphen_values = true, value_parser = parse_udp_rate_limit)]
    pub udp_rate_limit: UdpRateLimit,

    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz (`off` disables).
    #[arg(long, value_name = "ADDR|off", env = "ECHOD_METRICS_LISTEN", default_value = DEFAULT_METRICS_LISTEN,
          allow_hyphen_values = true, value_parser = values::optional_addr)]
    pub metrics_listen: OptionalAddr,

    /// Log format on stderr; the level comes from RUST_LOG (default `info`).
    #[arg(long, value_name = "FORMAT", env = "ECHOD_LOG_FORMAT", value_enum,
          default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Write the man page (`man`) or a shell completion script (`complete-bash`, `complete-zsh`,
    /// `complete-fish`, `complete-powershell`) to stdout and exit, without serving.
    #[arg(long, value_name = "KIND", value_enum)]
    pub generate: Option<crate::generate::Generate>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The files TLS is configured from: `--tls-cert`, `--tls-key`, `--tls-client-ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// `--max-buffer-memory`: a size, or derived from the machine at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferMemory {
    Auto,
    Bytes(u64),
}

/// `--udp-rate-limit`: datagrams per second per source, or no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpRateLimit(pub Option<u32>);

/// Largest `--udp-rate-limit`: far above what one socket can answer, and small enough that the
/// limiter's arithmetic (nanoseconds per datagram) stays exact.
pub const MAX_UDP_RATE_LIMIT: u64 = 100_000_000;

/// `--tcp-user-timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserTimeout {
    Auto,
    Off,
    Fixed(Duration),
}

fn parse_listen_spec(s: &str) -> Result<ListenSpec, String> {
    s.parse()
}

fn parse_udp_socket_buffer(s: &str) -> Result<usize, String> {
    // At least one largest datagram; at most what the socket option's int can say.
    values::size_in(s, 64 << 10, 1 << 30).map(|n| n as usize)
}

fn parse_udp_rate_limit(s: &str) -> Result<UdpRateLimit, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(UdpRateLimit(None));
    }
    values::count_in(s, 1, MAX_UDP_RATE_LIMIT).map(|n| UdpRateLimit(Some(n as u32)))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !(r.is_finite() && (0.001..=1e9).contains(&r)) {
        return Err(format!("`{s}` must be between 0.001 and 1000000000"));
    }
    Ok(r)
}

fn parse_keepalive(s: &str) -> Result<OptionalDuration, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(OptionalDuration(None));
    }
    values::whole_seconds_in(s, 1, MAX_KEEPALIVE_SECS).map(|d| OptionalDuration(Some(d)))
}

fn parse_user_timeout(s: &str) -> Result<UserTimeout, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(UserTimeout::Auto),
        "off" => Ok(UserTimeout::Off),
        _ => values::duration_in(s, Duration::from_secs(1), MAX_PHASE).map(UserTimeout::Fixed),
    }
}

fn parse_buffer_memory(s: &str) -> Result<BufferMemory, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        return Ok(BufferMemory::Auto);
    }
    values::size_in(s, 1 << 20, 1 << 40).map(BufferMemory::Bytes)
}

impl Config {
    /// Parses the process's arguments and environment, then [`check`](Config::check)s them;
    /// on any error prints it and exits 2.
    pub fn parse_checked() -> Config {
        let config = Config::parse();
        if let Err(err) = config.check() {
            err.exit();
        }
        config
    }

    /// [`Config::parse_checked`] for a given argument list, returning the error instead.
    pub fn try_parse_checked_from<I, T>(args: I) -> Result<Config, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let config = Config::try_parse_from(args)?;
        config.check()?;
        Ok(config)
    }

    /// What only the flags together can tell.
    pub fn check(&self) -> Result<(), clap::Error> {
        let fail = |message: String| Err(Config::command().error(ErrorKind::ArgumentConflict, message));
        if !self.proxy_from.is_empty() && !self.listen.iter().any(|l| l.proxy.is_some()) {
            return fail("--proxy-from is given but no --listen has a proxy= option".into());
        }
        let tls_listener = self.listen.iter().find(|l| l.scheme == Scheme::Tls);
        match (tls_listener, &self.tls_cert, &self.tls_key) {
            (_, Some(cert), None) => {
                return fail(format!("--tls-cert {} is given without --tls-key", cert.display()))
            }
            (_, None, Some(key)) => {
                return fail(format!("--tls-key {} is given without --tls-cert", key.display()))
            }
            (Some(listener), None, None) => {
                return fail(format!(
                    "the listener {listener} needs a certificate and its key: give --tls-cert FILE and --tls-key FILE"
                ))
            }
            _ => {}
        }
        if tls_listener.is_none() {
            let given = [
                ("--tls-cert", &self.tls_cert),
                ("--tls-key", &self.tls_key),
                ("--tls-client-ca", &self.tls_client_ca),
            ];
            if let Some((flag, Some(path))) = given.into_iter().find(|(_, path)| path.is_some()) {
                return fail(format!("{flag} {} is given but no --listen is tls://", path.display()));
            }
        }
        Ok(())
    }

    /// The TLS files, when a listener speaks TLS.
    pub fn tls_files(&self) -> Option<TlsFiles> {
        if !self.listen.iter().any(|l| l.scheme == Scheme::Tls) {
            return None;
        }
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// A configuration for tests and embedders: one listener on an ephemeral loopback port,
    /// metrics off, every other setting at its default.
    pub fn loopback() -> Config {
        let mut config = Config::parse_from(["echod", "--listen", "127.0.0.1:0"]);
        config.metrics_listen = OptionalAddr(None);
        config
    }

    /// The worker-thread count: the flag, or the number of CPUs available to this process.
    pub fn worker_threads(&self) -> usize {
        self.workers.or_else(|| std::thread::available_parallelism().ok()).map_or(1, NonZeroUsize::get)
    }

    /// The keepalive the flags ask for (before each connection's spread), if it is on.
    pub fn keepalive(&self) -> Option<Keepalive> {
        self.tcp_keepalive.0.map(|idle| Keepalive {
            idle,
            interval: self.tcp_keepalive_interval,
            count: self.tcp_keepalive_count,
        })
    }

    /// The `TCP_USER_TIMEOUT` in force: `auto` is the keepalive's whole detection time
    /// ([`Keepalive::detection_time`]), so a vanished peer is freed in the same bound whether or
    /// not data was in flight; with keepalive off, `auto` is off too.
    pub fn user_timeout(&self) -> Option<Duration> {
        match self.tcp_user_timeout {
            UserTimeout::Off => None,
            UserTimeout::Fixed(d) => Some(d),
            UserTimeout::Auto => self.keepalive().map(|k| k.detection_time()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_checked_from(std::iter::once("echod").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn error(args: &[&str]) -> String {
        Config::try_parse_checked_from(std::iter::once("echod").chain(args.iter().copied()))
            .expect_err("should be refused")
            .to_string()
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = parse(&[]);
        assert_eq!(c.listen, vec![DEFAULT_LISTEN.parse::<ListenSpec>().unwrap()]);
        assert_eq!(c.idle_timeout, OptionalDuration(None));
        assert_eq!(c.tcp_keepalive, OptionalDuration(Some(Duration::from_secs(60))));
        assert_eq!(c.tcp_keepalive_interval, Duration::from_secs(10));
        assert_eq!(c.tcp_keepalive_count, 3);
        assert_eq!(c.user_timeout(), Some(Duration::from_secs(132)));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(25));
        assert_eq!(c.shutdown_delay, Duration::ZERO);
        assert_eq!(c.proxy_header_timeout, Duration::from_secs(5));
        assert_eq!(c.max_buffer_memory, BufferMemory::Auto);
        assert_eq!(c.backlog, 1024);
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(c.banner.is_none());
        assert_eq!(c.udp_socket_buffer, 4 << 20);
        assert_eq!(c.udp_rate_limit, UdpRateLimit(Some(1000)));
    }

    #[test]
    fn listen_repeats_and_takes_specs() {
        let c = parse(&["--listen", "127.0.0.1:0", "--listen", "tcp://[::1]:7007?proxy=v2"]);
        assert_eq!(c.listen.len(), 2);
        assert!(c.listen[1].addr.is_ipv6());
        assert_eq!(c.listen[1].proxy, Some(ProxyVersion::V2));
        let c =
            parse(&["--listen", "tls://127.0.0.1:0?proxy=v1", "--tls-cert", "c.pem", "--tls-key", "k.pem"]);
        assert_eq!(c.listen[0].scheme, Scheme::Tls);
        assert_eq!(c.listen[0].proxy, Some(ProxyVersion::V1));
        let c = parse(&["--listen", "udp://127.0.0.1:7", "--listen", "udp://[::1]:0"]);
        assert_eq!(c.listen[0].scheme, Scheme::Udp);
        assert!(c.listen[1].addr.is_ipv6());
    }

    #[test]
    fn udp_values_are_range_checked() {
        let c = parse(&["--udp-socket-buffer", "256KiB", "--udp-rate-limit", "off"]);
        assert_eq!(c.udp_socket_buffer, 256 << 10);
        assert_eq!(c.udp_rate_limit, UdpRateLimit(None));
        assert_eq!(parse(&["--udp-rate-limit", "5"]).udp_rate_limit, UdpRateLimit(Some(5)));
        for (flag, value) in [
            ("--udp-socket-buffer", "1KiB"),
            ("--udp-socket-buffer", "2GiB"),
            ("--udp-socket-buffer", "-1MiB"),
            ("--udp-socket-buffer", "lots"),
            ("--udp-rate-limit", "0"),
            ("--udp-rate-limit", "-5"),
            ("--udp-rate-limit", "100000001"),
            ("--udp-rate-limit", "fast"),
        ] {
            let message = error(&[flag, value]);
            assert!(message.contains(flag), "{flag} {value}: {message}");
        }
    }

    #[test]
    fn durations_use_humantime_off_and_ranges() {
        let c = parse(&["--idle-timeout", "1m 30s", "--tcp-keepalive", "off"]);
        assert_eq!(c.idle_timeout, OptionalDuration(Some(Duration::from_secs(90))));
        assert_eq!(c.tcp_keepalive, OptionalDuration(None));
        assert_eq!(c.user_timeout(), None, "auto follows keepalive off");
        for (flag, value) in [
            ("--idle-timeout", "0s"),
            ("--idle-timeout", "soon"),
            ("--idle-timeout", "1000years"),
            ("--tcp-keepalive", "10h"),
            ("--tcp-keepalive", "0s"),
            ("--tcp-keepalive-interval", "1500ms"),
            ("--tcp-keepalive-count", "0"),
            ("--tcp-keepalive-count", "128"),
            ("--tcp-user-timeout", "0s"),
            ("--shutdown-timeout", "-5s"),
            ("--shutdown-delay", "2d"),
            ("--proxy-header-timeout", "0s"),
            ("--max-buffer-memory", "1KiB"),
            ("--max-buffer-memory", "-1MiB"),
        ] {
            let message = error(&[flag, value]);
            assert!(message.contains(flag), "{flag} {value}: {message}");
        }
        let c = parse(&["--tcp-user-timeout", "30s", "--max-buffer-memory", "64MiB"]);
        assert_eq!(c.user_timeout(), Some(Duration::from_secs(30)));
        assert_eq!(c.max_buffer_memory, BufferMemory::Bytes(64 << 20));
    }

    #[test]
    fn metrics_listen_can_be_off() {
        let c = parse(&["--metrics-listen", "off"]);
        assert_eq!(c.metrics_listen, OptionalAddr(None));
    }

    #[test]
    fn zero_workers_and_connections_are_rejected() {
        assert!(Config::try_parse_from(["echod", "--workers", "0"]).is_err());
        assert!(Config::try_parse_from(["echod", "--max-connections", "0"]).is_err());
    }

    #[test]
    fn proxy_from_needs_a_proxy_listener() {
        assert!(error(&["--proxy-from", "10.0.0.0/8"]).contains("--proxy-from"));
        let c = parse(&["--listen", "127.0.0.1:0?proxy=v1", "--proxy-from", "10.0.0.0/8,127.0.0.1"]);
        assert_eq!(c.proxy_from.len(), 2);
        assert!(error(&["--listen", "127.0.0.1:0?proxy=v1", "--proxy-from", "10.0.0.0/40"])
            .contains("--proxy-from"));
    }

    #[test]
    fn tls_listeners_need_a_certificate_and_key_and_tls_flags_a_tls_listener() {
        let tls = ["--listen", "tls://127.0.0.1:0"];
        let message = error(&tls);
        assert!(message.contains("--tls-cert") && message.contains("tls://127.0.0.1:0"), "{message}");
        assert!(error(&[&tls[..], &["--tls-cert", "c.pem"]].concat()).contains("without --tls-key"));
        assert!(error(&[&tls[..], &["--tls-key", "k.pem"]].concat()).contains("without --tls-cert"));
        for flag in ["--tls-cert", "--tls-key", "--tls-client-ca"] {
            let message = error(&[flag, "x.pem"]);
            assert!(message.contains(flag) && message.contains("x.pem"), "{message}");
        }
        let c = parse(
            &[&tls[..], &["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"]].concat(),
        );
        let files = c.tls_files().expect("a tls listener");
        assert_eq!(files.client_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(c.tls_handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.tls_reload_interval, OptionalDuration(Some(Duration::from_secs(10))));
        assert!(parse(&[]).tls_files().is_none());
        for (flag, value) in [
            ("--tls-handshake-timeout", "0s"),
            ("--tls-handshake-timeout", "-1s"),
            ("--tls-reload-interval", "1ms"),
        ] {
            let message = error(&[flag, value]);
            assert!(message.contains(flag), "{flag} {value}: {message}");
        }
    }

    #[test]
    fn access_flags() {
        let c = parse(&[
            "--allow",
            "10.0.0.0/8,127.0.0.1",
            "--deny",
            "10.9.0.0/16",
            "--max-connections-per-source",
            "4",
        ]);
        assert_eq!((c.allow.len(), c.deny.len(), c.max_connections_per_source), (2, 1, Some(4)));
        assert!(error(&["--allow", "10.0.0.0/40"]).contains("--allow"));
        assert!(error(&["--deny", "nope"]).contains("--deny"));
        assert!(error(&["--max-connections-per-source", "0"]).contains("--max-connections-per-source"));
        assert!(error(&["--connect-rate-per-source", "-1"]).contains("--connect-rate-per-source"));
        assert_eq!(parse(&["--connect-rate-per-source", "2.5"]).connect_rate_per_source, Some(2.5));
    }

    #[test]
    fn banner_templates_are_checked() {
        let c = parse(&["--banner", "{hostname} {client}"]);
        assert_eq!(c.banner.unwrap().parts.len(), 3);
        assert!(error(&["--banner", "{nope}"]).contains("--banner"));
    }

    #[test]
    fn clap_definition_is_consistent() {
        Config::command().debug_assert();
    }
}
