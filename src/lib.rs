//! echod: a production echo server.
//!
//! The binary (`src/main.rs`) parses flags and calls [`run`]; everything else lives here so that
//! tests and embedders drive the same code. Start with `ARCHITECTURE.md` for the map; in short:
//!
//! * [`config`]: flags and environment, validated; `--listen` specs, banner templates, prefixes;
//! * [`server`]: binds, composes the shared [`context`]s, supervises accept loops, drains;
//! * [`net`]: socket binding and options, and what to do when accept fails;
//! * [`listener`]: the stream accept loop;
//! * [`stage`]: what runs before the echo (PROXY header, banner);
//! * [`connection`]: one client's echo and its accounting; [`udp`]: the UDP echo;
//! * [`echo`]: the copy phases, the loop between the copies, faults, the buffer budget;
//! * [`shutdown`]: the platform's stop requests; [`systemd`]: socket activation and notify;
//! * [`metrics`]: names, recorder, handles; `http`: the /metrics, /healthz, /readyz endpoint;
//! * [`telemetry`]: logs; [`rlimit`]: the open-files limit; [`memory`]: the binary's allocator,
//!   chosen for what idle connections cost.

use std::io;
use std::net::SocketAddr;

use tracing::{error, info, warn};

pub mod config;
pub mod connection;
pub mod context;
pub mod echo;
mod http;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod rlimit;
pub mod server;
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
}

/// Runs echod as the binary does: installs signal handlers, binds, serves until SIGINT/SIGTERM
/// (ctrl-c and friends on Windows), drains, returns. A second stop request exits the process at
/// once with status 130 (SIGINT) or 143 (SIGTERM).
pub async fn run(config: Config) -> Result<DrainReport, Error> {
    let mut signals = shutdown::Signals::install().map_err(Error::Signals)?;
    let server = Server::bind(&config)?;
    for spec in server.listeners() {
        info!(address = %spec.addr, listener = %spec, "listening");
        if spec.proxy.is_some() && config.proxy_from.is_empty() {
            warn!(
                listener = %spec,
                "PROXY headers are trusted from any peer: anyone who reaches this port can claim any client address (restrict with --proxy-from)"
            );
        }
    }
    if let Some(addr) = server.metrics_addr() {
        info!(address = %addr, "serving /metrics, /healthz, /readyz");
    }
    let (budget, source) = server.buffer_budget();
    info!(
        version = env!("CARGO_PKG_VERSION"),
        workers = config.worker_threads(),
        listeners = ?server.local_addrs(),
        udp_listeners = ?server.udp_addrs(),
        udp_rate_limit = ?config.udp_rate_limit.0,
        max_connections = server.max_connections(),
        max_buffer_memory = %config::values::format_size(budget as u64),
        max_buffer_memory_from = ?source,
        idle_timeout = ?config.idle_timeout.0,
        tcp_keepalive = ?config.tcp_keepalive.0,
        tcp_user_timeout = ?config.user_timeout(),
        shutdown_timeout = ?config.shutdown_timeout,
        metrics = ?server.metrics_addr(),
        "echod started"
    );
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
