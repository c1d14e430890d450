//! echod: a production echo server.
//!
//! The binary (`src/main.rs`) parses flags and calls [`run`]; everything else lives here so that
//! tests and embedders drive the same code. Start with `ARCHITECTURE.md` for the map; in short:
//!
//! * [`config`]: flags and environment, validated; `--listen` specs, banner templates, prefixes;
//! * [`server`]: binds, composes the shared [`context`]s, supervises accept loops, drains;
//! * [`net`]: socket binding and options, and what to do when accept fails;
//! * [`listener`]: the stream accept loop;
//! * [`stage`]: what runs before the echo (PROXY header, banner); [`access`]: who may connect;
//! * [`connection`]: one client's echo and its accounting; [`udp`]: the UDP echo;
//! * [`echo`]: the copy phases, the loop between the copies, faults; [`budget`]: the limit on
//!   all echo buffers together;
//! * [`shutdown`]: the platform's stop requests; [`systemd`]: socket activation and notify;
//! * [`metrics`]: names, recorder, handles; `http`: the /metrics, /healthz, /readyz endpoint;
//! * [`telemetry`]: logs; [`rlimit`]: the open-files limit; [`memory`]: the binary's allocator,
//!   chosen for what idle connections cost.

use std::io;
use std::net::SocketAddr;

use tracing::{error, info, warn};

pub mod access;
pub mod budget;
pub mod config;
pub mod connection;
pub mod context;
pub mod echo;
pub mod generate;
mod http;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod random;
pub mod rlimit;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod stage;
pub mod systemd;
pub mod telemetry;
pub mod udp;

pub use config::Config;
pub use server::{DrainReport, Server, ServerHandle};

/// Why echod could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot serve metrics on {addr} (--metrics-listen): {source}")]
    MetricsBind { addr: SocketAddr, source: io::Error },
    #[error("socket activation: {0}")]
    SocketActivation(String),
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("TLS: {0}")]
    Tls(stage::tls::LoadError),
    #[error("the listener {0} needs a certificate and its key: give --tls-cert FILE and --tls-key FILE")]
    TlsFlags(String),
}

impl Error {
    /// The process's exit status for this error: 2 for what the flags name (a TLS file that
    /// does not load), 1 for what the system refused.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Tls(_) | Error::TlsFlags(_) => 2,
            _ => 1,
        }
    }
}

/// Runs echod as the binary does: installs signal handlers, binds, serves until SIGINT/SIGTERM
/// (ctrl-c and friends on Windows), drains, returns. A second stop request exits the process at
/// once with status 130 (SIGINT) or 143 (SIGTERM).
pub async fn run(config: Config) -> Result<DrainReport, Error> {
    let mut signals = shutdown::Signals::install().map_err(Error::Signals)?;
    // SIGHUP reloads the TLS files; without TLS it keeps its default action.
    let reloads = match config.tls_files() {
        Some(_) => Some(shutdown::ReloadRequests::install().map_err(Error::Signals)?),
        None => None,
    };
    let server = Server::bind(&config)?;
    if let Some(mut reloads) = reloads {
        let handle = server.handle();
        tokio::spawn(async move {
            while reloads.recv().await {
                info!("reload requested: re-reading the TLS files");
                // The outcome is logged and counted by the reload itself.
                let _ = handle.reload_tls().await;
            }
        });
    }
    log_start(&config, &server);
    let report = server
        .run(async move {
            let signal = signals.recv().await;
            info!(signal = signal.name(), "stop requested; send it again to exit at once");
            tokio::spawn(async move {
                let signal = signals.recv().await;
                error!(signal = signal.name(), "second stop request: exiting now");
                std::process::exit(signal.forced_exit_code());
            });
        })
        .await;
    Ok(report)
}

/// The start-up log lines: each listener in `--listen` syntax with its bound address, warnings
/// about what the flags leave open, and one summary line.
/// A duration as the flags take it (`1m 40s`), or `off`.
fn duration_or_off(d: Option<std::time::Duration>) -> String {
    d.map_or_else(|| "off".to_string(), |d| humantime::format_duration(d).to_string())
}

pub fn log_start(config: &Config, server: &Server) {
    if let Some(tls) = server.handle().tls_certificate() {
        info!(serial = %tls.serial, subject = %tls.subject, not_after = %tls.expires(), "TLS certificate loaded");
    }
    for spec in server.listeners() {
        info!(address = %spec.addr, listener = %spec, "listening");
        if spec.proxy.is_some() && config.proxy_from.is_empty() {
            warn!(
                listener = %spec,
                "PROXY headers are trusted from any peer: anyone who reaches this port can claim any client address (restrict with --proxy-from)"
            );
        }
    }
    if !config.allow.is_empty() || !config.deny.is_empty() {
        let list = |c: &[crate::config::Cidr]| c.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",");
        info!(allow = %list(&config.allow), deny = %list(&config.deny), "access rules");
        if access::Rules::new(&config.allow, &config.deny).unreachable() {
            warn!("--allow and --deny leave no client address that may be served");
        }
    }
    if let Some(addr) = server.metrics_addr() {
        info!(address = %addr, "serving /metrics, /healthz, /readyz");
    }
    let (budget, source) = server.buffer_budget();
    let listeners = server.listeners().iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",");
    let per_source = |v: Option<String>| v.unwrap_or_else(|| "off".to_string());
    info!(
        version = env!("CARGO_PKG_VERSION"),
        workers = config.worker_threads(),
        listeners = %listeners,
        udp_rate_limit = %config.udp_rate_limit.0.map_or_else(|| "off".to_string(), |n| format!("{n}/s")),
        max_connections = server.max_connections(),
        max_buffer_memory = %crate::config::values::format_size(budget as u64),
        max_buffer_memory_from = %source,
        idle_timeout = %duration_or_off(config.idle_timeout.0),
        tcp_keepalive = %duration_or_off(config.tcp_keepalive.0),
        tcp_user_timeout = %duration_or_off(config.user_timeout()),
        shutdown_timeout = %duration_or_off(Some(config.shutdown_timeout)),
        max_connections_per_source = %per_source(config.max_connections_per_source.map(|n| n.to_string())),
        connect_rate_per_source = %per_source(config.connect_rate_per_source.map(|r| format!("{r}/s"))),
        metrics = %server.metrics_addr().map_or_else(|| "off".to_string(), |a| a.to_string()),
        "echod started"
    );
}
