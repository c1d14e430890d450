//! Command-line flags and their environment variables, parsed and validated.
//!
//! Every flag is documented here, where it is defined: `echod --help` prints these doc
//! comments, and the README's flag table is written from them. Every flag can also be set
//! through an `ECHOD_*` environment variable, so containers and systemd units configure echod
//! without a wrapper script; a flag on the command line wins over the environment.
//!
//! Validation happens in clap's value parsers, so a bad value is reported by clap itself: a
//! message naming the flag and the value, and exit status 2.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// The default echo address: every IPv4 interface, port 8080.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

/// The default address of the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`).
///
/// Port 9007: "9" as Prometheus exporters' ports go, "007" for echo (RFC 862's port 7).
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9007";

/// A production TCP echo server: every byte a client sends comes back, in order, exactly once.
///
/// echod serves each client from its own task, applies connection limits and idle timeouts,
/// exports Prometheus metrics, and drains gracefully on SIGINT/SIGTERM (ctrl-c on Windows).
#[derive(Debug, Clone, Parser)]
#[command(name = "echod", version, about, long_about = None, max_term_width = 100)]
pub struct Config {
    /// Address to accept echo clients on; repeat the flag for several listeners.
    ///
    /// IPv4 or IPv6 (`0.0.0.0:8080`, `[::1]:7007`); port 0 picks a free port, and the bound
    /// address is logged. In the environment, separate several addresses with commas.
    #[arg(
        long = "listen",
        value_name = "ADDR",
        env = "ECHOD_LISTEN",
        value_delimiter = ',',
        default_value = DEFAULT_LISTEN
    )]
    pub listen: Vec<SocketAddr>,

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

    /// Close a connection after no bytes moved in either direction for this long (`30s`,
    /// `5m`; `off` disables).
    #[arg(
        long,
        value_name = "DURATION",
        env = "ECHOD_IDLE_TIMEOUT",
        default_value = "off",
        value_parser = parse_optional_duration
    )]
    pub idle_timeout: OptionalDuration,

    /// Idle time before TCP keepalive probes start on a client socket, so peers that vanished
    /// without a FIN or RST are found and freed (`off` disables).
    #[arg(
        long,
        value_name = "DURATION",
        env = "ECHOD_TCP_KEEPALIVE",
        default_value = "60s",
        value_parser = parse_optional_duration
    )]
    pub tcp_keepalive: OptionalDuration,

    /// Length of each listener's queue of connections the kernel completed but echod has not
    /// yet accepted (the kernel may cap it, e.g. at net.core.somaxconn).
    #[arg(long, value_name = "N", env = "ECHOD_BACKLOG", default_value_t = 1024, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub backlog: u32,

    /// On SIGINT/SIGTERM, how long clients already connected may keep echoing before echod
    /// closes them and exits. A little under Kubernetes' default 30 s grace period.
    #[arg(
        long,
        value_name = "DURATION",
        env = "ECHOD_SHUTDOWN_TIMEOUT",
        default_value = "25s",
        value_parser = humantime::parse_duration
    )]
    pub shutdown_timeout: Duration,

    /// On SIGINT/SIGTERM, keep accepting new clients for this long while `/readyz` already
    /// answers 503, so load balancers stop sending before the listeners close.
    #[arg(
        long,
        value_name = "DURATION",
        env = "ECHOD_SHUTDOWN_DELAY",
        default_value = "0s",
        value_parser = humantime::parse_duration
    )]
    pub shutdown_delay: Duration,

    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz (`off` disables).
    #[arg(
        long,
        value_name = "ADDR|off",
        env = "ECHOD_METRICS_LISTEN",
        default_value = DEFAULT_METRICS_LISTEN,
        value_parser = parse_optional_addr
    )]
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

/// A duration that can be switched off (`off`); a newtype because clap treats a bare
/// `Option<T>` field as "the flag may be absent", not as a value of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalDuration(pub Option<Duration>);

/// An address that can be switched off (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

fn parse_optional_duration(s: &str) -> Result<OptionalDuration, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(OptionalDuration(None));
    }
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 30s, 5m or off)"))?;
    if d.is_zero() {
        return Err("must be greater than zero (use `off` to disable)".into());
    }
    Ok(OptionalDuration(Some(d)))
}

fn parse_optional_addr(s: &str) -> Result<OptionalAddr, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(OptionalAddr(None));
    }
    s.parse()
        .map(|a| OptionalAddr(Some(a)))
        .map_err(|e| format!("{e} (expected e.g. 0.0.0.0:9007, [::1]:9007 or off)"))
}

impl Config {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_documented_values() {
        let c = Config::parse_from(["echod"]);
        assert_eq!(c.listen, vec![DEFAULT_LISTEN.parse::<SocketAddr>().unwrap()]);
        assert_eq!(c.idle_timeout, OptionalDuration(None));
        assert_eq!(c.tcp_keepalive, OptionalDuration(Some(Duration::from_secs(60))));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(25));
        assert_eq!(c.shutdown_delay, Duration::ZERO);
        assert_eq!(c.backlog, 1024);
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn listen_repeats_and_accepts_ipv6() {
        let c = Config::parse_from(["echod", "--listen", "127.0.0.1:0", "--listen", "[::1]:7007"]);
        assert_eq!(c.listen.len(), 2);
        assert!(c.listen[1].is_ipv6());
    }

    #[test]
    fn durations_use_humantime_and_off() {
        let c = Config::parse_from(["echod", "--idle-timeout", "1m 30s", "--tcp-keepalive", "off"]);
        assert_eq!(c.idle_timeout, OptionalDuration(Some(Duration::from_secs(90))));
        assert_eq!(c.tcp_keepalive, OptionalDuration(None));
        assert!(Config::try_parse_from(["echod", "--idle-timeout", "0s"]).is_err());
        assert!(Config::try_parse_from(["echod", "--idle-timeout", "soon"]).is_err());
    }

    #[test]
    fn metrics_listen_can_be_off() {
        let c = Config::parse_from(["echod", "--metrics-listen", "off"]);
        assert_eq!(c.metrics_listen, OptionalAddr(None));
    }

    #[test]
    fn zero_workers_and_connections_are_rejected() {
        assert!(Config::try_parse_from(["echod", "--workers", "0"]).is_err());
        assert!(Config::try_parse_from(["echod", "--max-connections", "0"]).is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Config::command().debug_assert();
    }
}
