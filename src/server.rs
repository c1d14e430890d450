//! The server: binds the listeners, runs the accept loops and the HTTP endpoint, and coordinates
//! the graceful drain.
//!
//! # Shutdown, phase by phase
//!
//! 1. **Draining starts** when the `shutdown` future given to [`Server::run`] completes:
//!    `/readyz` answers 503 and `echod_draining` becomes 1, so load balancers stop routing here.
//! 2. **Delay** (`--shutdown-delay`): listeners keep accepting for a while, for the clients a load
//!    balancer still sends while it catches up (Kubernetes removes endpoints and signals the pod at
//!    the same time).
//! 3. **Listeners close**: new connects are refused. Connections in flight keep echoing.
//! 4. **Drain** until every connection has ended or `--shutdown-timeout` passes; then the rest
//!    are closed (reason `shutdown`) and `run` returns a [`DrainReport`].
//!
//! Two signals reach every task: `stop_accepting` (accept loops) and `force_close` (connections,
//! only after the timeout). Connection tasks are spawned on a [`TaskTracker`], which is how the
//! server counts and awaits them without keeping any per-connection state of its own.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::metrics::{Registry, ServerMetrics};
use crate::{http, listener, rlimit, systemd, Error};

/// After the shutdown timeout, how long connections get to notice the forced close (a copying
/// connection checks once per tick, 1 s) and finish their tasks.
const FORCE_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// State every task of the server can see. Nothing in it belongs to one connection.
pub(crate) struct Shared {
    /// One permit per connection slot (`--max-connections`).
    pub limit: Arc<Semaphore>,
    /// The connection tasks, to count and await them.
    pub tracker: TaskTracker,
    /// Cancelled when the shutdown timeout runs out: connections close at once.
    pub force_close: CancellationToken,
    pub idle_timeout: Option<Duration>,
    pub tcp_keepalive: Option<Duration>,
    pub metrics: ServerMetrics,
    /// True from the moment draining starts (`/readyz` answers 503).
    pub draining: AtomicBool,
    /// Cancelled once every listener is closed (new connects are refused from then on).
    pub listeners_closed: CancellationToken,
}

/// A bound, not yet running, server.
pub struct Server {
    listeners: Vec<(SocketAddr, TcpListener)>,
    http: Option<(SocketAddr, TcpListener)>,
    shared: Arc<Shared>,
    max_connections: usize,
    shutdown_timeout: Duration,
    shutdown_delay: Duration,
}

/// What the drain did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections open when the listeners closed.
    pub draining: usize,
    /// Connections still open at the shutdown timeout, closed by the server.
    pub closed_by_timeout: usize,
}

/// A view of a running server, for tests and embedders.
#[derive(Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

impl ServerHandle {
    /// Connections being served now.
    pub fn active_connections(&self) -> usize {
        self.shared.tracker.len()
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }

    /// Completes once the listeners are closed during shutdown.
    pub async fn listeners_closed(&self) {
        self.shared.listeners_closed.cancelled().await;
    }

    /// The Prometheus text exposition, as `/metrics` serves it (`None` with metrics off).
    pub fn render_metrics(&self) -> Option<String> {
        self.shared.metrics.registry().map(|r| r.render())
    }
}

impl Server {
    /// Binds every listener (or adopts systemd's) and the HTTP endpoint.
    ///
    /// Fails with the address and the operating system's reason if any bind fails. Must be
    /// called within a tokio runtime.
    pub fn bind(config: &Config) -> Result<Server, Error> {
        let open_files = rlimit::raise_open_files_limit();
        let max_connections =
            config.max_connections.map_or_else(|| rlimit::default_max_connections(open_files), |n| n.get());

        let mut listeners = systemd::inherited_listeners()?;
        if listeners.is_empty() {
            for &addr in &config.listen {
                let listener = listener::bind(addr, config.backlog)?;
                let bound = listener.local_addr().map_err(|source| Error::Bind { addr, source })?;
                listeners.push((bound, listener));
            }
        } else {
            info!(count = listeners.len(), "using listeners passed by systemd; --listen is ignored");
        }
        let http = config.metrics_listen.0.map(http::bind).transpose()?;
        let registry = http.as_ref().map(|_| Registry::new());

        let shared = Arc::new(Shared {
            limit: Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS))),
            tracker: TaskTracker::new(),
            force_close: CancellationToken::new(),
            idle_timeout: config.idle_timeout.0,
            tcp_keepalive: config.tcp_keepalive.0,
            metrics: ServerMetrics::new(registry, max_connections),
            draining: AtomicBool::new(false),
            listeners_closed: CancellationToken::new(),
        });
        Ok(Server {
            listeners,
            http,
            shared,
            max_connections,
            shutdown_timeout: config.shutdown_timeout,
            shutdown_delay: config.shutdown_delay,
        })
    }

    /// The addresses the echo listeners are bound to (with ephemeral ports resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|(addr, _)| *addr).collect()
    }

    /// The address of the HTTP endpoint, if metrics are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(addr, _)| *addr)
    }

    /// The connection limit in force.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    pub fn handle(&self) -> ServerHandle {
        ServerHandle { shared: self.shared.clone() }
    }

    /// Serves until `shutdown` completes, then drains (see the module docs) and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> DrainReport {
        let Server { listeners, http, shared, shutdown_timeout, shutdown_delay, .. } = self;

        let http_stop = CancellationToken::new();
        if let Some((_, listener)) = http {
            tokio::spawn(http::serve(listener, shared.clone(), http_stop.clone()));
        }
        let stop_accepting = CancellationToken::new();
        let mut accept_loops = JoinSet::new();
        for (addr, listener) in listeners {
            accept_loops.spawn(listener::accept_loop(listener, addr, shared.clone(), stop_accepting.clone()));
        }
        systemd::notify_ready();

        shutdown.await;
        shared.draining.store(true, Ordering::Relaxed);
        shared.metrics.set_draining(true);
        systemd::notify_stopping();
        info!(
            connections = shared.tracker.len(),
            delay = ?shutdown_delay,
            "shutdown requested: /readyz answers 503; still accepting during the delay"
        );
        if !shutdown_delay.is_zero() {
            tokio::time::sleep(shutdown_delay).await;
        }

        stop_accepting.cancel();
        while accept_loops.join_next().await.is_some() {}
        shared.listeners_closed.cancel();
        shared.tracker.close();
        let draining = shared.tracker.len();
        info!(connections = draining, timeout = ?shutdown_timeout, "listeners closed; draining connections");

        let mut closed_by_timeout = 0;
        if tokio::time::timeout(shutdown_timeout, shared.tracker.wait()).await.is_err() {
            closed_by_timeout = shared.tracker.len();
            warn!(connections = closed_by_timeout, "shutdown timeout reached; closing remaining connections");
            shared.force_close.cancel();
            if tokio::time::timeout(FORCE_CLOSE_GRACE, shared.tracker.wait()).await.is_err() {
                warn!(connections = shared.tracker.len(), "connections still closing at exit");
            }
        }
        http_stop.cancel();
        info!(drained = draining.saturating_sub(closed_by_timeout), closed_by_timeout, "shutdown complete");
        DrainReport { draining, closed_by_timeout }
    }
}
