//! The server: binds every listener, composes the contexts its tasks share, supervises the
//! accept loops, and coordinates the graceful drain.
//!
//! # Shutdown, phase by phase
//!
//! 1. **Draining starts** when the `shutdown` future given to [`Server::run`] completes:
//!    `/readyz` answers 503 and `echod_draining` becomes 1, so load balancers stop routing here.
//! 2. **Delay** (`--shutdown-delay`): listeners keep accepting for a while, for the clients a load
//!    balancer still sends while it catches up (Kubernetes removes endpoints and signals the pod at
//!    the same time).
//! 3. **Listeners close**: new connects are refused. Connections with nothing in flight (waiting
//!    for input, everything echoed) are closed at once, with a FIN: closing them loses nothing.
//!    Connections mid-transfer keep echoing, and close as soon as they have nothing in flight.
//! 4. **Drain** until every connection has ended or `--shutdown-timeout` passes; then the rest
//!    are closed (reason `shutdown`) and `run` returns a [`DrainReport`].
//!
//! UDP listeners (`udp://`) are bound with the others and answer datagrams until the stream
//! listeners close in step 3; then their loops end and their sockets close (no datagram is
//! waited for: UDP has no connections).
//!
//! Connection tasks are spawned on a [`TaskTracker`], which is how the server counts and awaits
//! them without keeping any per-connection state of its own.
//!
//! # Supervision
//!
//! Each accept loop runs in a task of its own under a supervisor. If it ends for any reason but
//! shutdown (a panic), the supervisor logs it, counts it (`echod_listener_restarts_total`),
//! marks the listener not accepting (`/readyz` answers 503 while no listener accepts) and
//! restarts it after a pause; the listening socket stays open throughout.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::access::{Access, Rules, SourceLimitSpec};
use crate::budget::{self, Budget, LimitSource};
use crate::config::{BufferMemory, Config, ListenSpec, Scheme};
use crate::context::{ConnContext, HttpContext, ServerState};
use crate::echo::INITIAL_BUFFER;
use crate::listener::{self, AcceptContext, StreamListener};
use crate::metrics::{Registry, ServerMetrics};
use crate::net::ClientOptions;
use crate::stage::banner::{self, Banner};
use crate::stage::tls::{CertificateInfo, Certificates, LoadError, TlsStage};
use crate::stage::{ProxyStage, Stack};
use crate::udp::{self, UdpListener};
use crate::{http, net, rlimit, systemd, Error};

/// After the shutdown timeout, how long connections get to notice the forced close (a copying
/// connection checks once per tick, 1 s) and finish their tasks.
const FORCE_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How long the UDP loops get to end once told to (they end at their next await).
const UDP_STOP_GRACE: Duration = Duration::from_secs(2);

/// Pause before a failed accept loop is restarted.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// A bound, not yet running, server.
pub struct Server {
    listeners: Vec<Arc<StreamListener>>,
    udp: Vec<UdpListener>,
    udp_shared: Arc<udp::Shared>,
    http: Option<(SocketAddr, TcpListener)>,
    accept: Arc<AcceptContext>,
    state: Arc<ServerState>,
    max_connections: usize,
    budget_source: LimitSource,
    shutdown_timeout: Duration,
    shutdown_delay: Duration,
    tls: Option<Arc<Certificates>>,
    tls_reload_interval: Option<Duration>,
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
    conn: Arc<ConnContext>,
    state: Arc<ServerState>,
    tracker: TaskTracker,
    tls: Option<Arc<Certificates>>,
    udp: Arc<udp::Shared>,
}

impl ServerHandle {
    /// Connections being served now.
    pub fn active_connections(&self) -> usize {
        self.tracker.len()
    }

    /// Connections in a copy phase (holding echo buffers) now.
    pub fn copying_connections(&self) -> usize {
        self.conn.budget.copying()
    }

    /// Bytes of echo buffers leased now, and the budget.
    pub fn buffer_memory(&self) -> (usize, usize) {
        (self.conn.budget.used(), self.conn.budget.limit())
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.state.draining.load(Ordering::Relaxed)
    }

    /// Listeners whose accept loop is running.
    pub fn listeners_accepting(&self) -> usize {
        self.state.accepting.load(Ordering::Relaxed)
    }

    /// UDP listeners answering datagrams now.
    pub fn udp_listeners_serving(&self) -> usize {
        self.state.udp_serving.load(Ordering::Relaxed)
    }

    /// Sources the UDP rate limiter tracks now.
    pub fn udp_tracked_sources(&self) -> usize {
        self.udp.tracked_sources()
    }

    /// Completes once the listeners are closed during shutdown.
    pub async fn listeners_closed(&self) {
        self.conn.listeners_closed.cancelled().await;
    }

    /// Whether the server has TLS material (a `tls://` listener).
    pub fn has_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The certificate new TLS handshakes present (`None` without a `tls://` listener).
    pub fn tls_certificate(&self) -> Option<CertificateInfo> {
        self.tls.as_ref().map(|tls| tls.info())
    }

    /// Re-reads the TLS files now, as SIGHUP does: new handshakes use them if they load; if not,
    /// the error (also logged and counted) and the old material stays. `None` without TLS.
    pub async fn reload_tls(&self) -> Option<Result<CertificateInfo, LoadError>> {
        let tls = self.tls.clone()?;
        match tokio::task::spawn_blocking(move || tls.reload()).await {
            Ok(result) => Some(result),
            Err(err) => {
                error!(error = %err, "the TLS reload failed");
                None
            }
        }
    }

    /// The Prometheus text exposition, as `/metrics` serves it (`None` with metrics off).
    pub fn render_metrics(&self) -> Option<String> {
        crate::context::render(&self.conn, &self.state)
    }
}

impl Server {
    /// Binds every listener (or adopts systemd's) and the HTTP endpoint.
    ///
    /// Fails with the address and the operating system's reason if any bind fails. Must be
    /// called within a tokio runtime.
    pub fn bind(config: &Config) -> Result<Server, Error> {
        let open_files = rlimit::raise_open_files_limit();
        let max_connections = match config.max_connections {
            Some(n) => n.get(),
            None => {
                let n = rlimit::default_max_connections(open_files);
                if n < rlimit::FEW_CONNECTIONS {
                    warn!(
                        open_files = ?open_files,
                        max_connections = n,
                        "the open-files limit leaves room for very few clients; raise it (ulimit -n, LimitNOFILE=) or set --max-connections"
                    );
                }
                n
            }
        };
        let (budget_limit, budget_source) = match config.max_buffer_memory {
            BufferMemory::Bytes(n) => (n, LimitSource::Flag),
            BufferMemory::Auto => budget::default_limit(),
        };

        let registry = config.metrics_listen.0.map(|_| Registry::new());
        let metrics = Arc::new(ServerMetrics::new(registry, max_connections));
        // The TLS files first: a file that does not load is the operator's to fix (exit 2), and
        // is reported before any socket is bound.
        let tls = match config.tls_files() {
            Some(files) => Some(Arc::new(Certificates::load(files, metrics.tls()).map_err(Error::Tls)?)),
            None => None,
        };
        let http = config.metrics_listen.0.map(http::bind).transpose()?;
        let budget = Budget::new(usize::try_from(budget_limit).unwrap_or(usize::MAX), INITIAL_BUFFER);
        let conn = Arc::new(ConnContext::new(metrics, config.idle_timeout.0, budget));
        let keepalive = config.keepalive();
        let access = Access::new(
            Rules::new(&config.allow, &config.deny),
            Some(SourceLimitSpec {
                max_open: config.max_connections_per_source,
                connects_per_second: config.connect_rate_per_source,
            }),
            max_connections,
        );
        let accept = Arc::new(AcceptContext {
            conn,
            access: access.clone(),
            limit: Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS))),
            tracker: TaskTracker::new(),
            options: ClientOptions { keepalive, user_timeout: config.user_timeout() },
        });

        let mut sockets: Vec<(ListenSpec, TcpListener)> = Vec::new();
        let inherited = systemd::inherited_listeners()?;
        if inherited.is_empty() {
            for spec in config.listen.iter().filter(|s| s.scheme.is_stream()) {
                let socket = net::bind_tcp(spec.addr, config.backlog)
                    .map_err(|source| Error::Bind { addr: spec.addr, source })?;
                let bound = socket.local_addr().map_err(|source| Error::Bind { addr: spec.addr, source })?;
                sockets.push((spec.with_addr(bound), socket));
            }
        } else {
            info!(
                count = inherited.len(),
                "using listeners passed by systemd; --listen only lends them its options"
            );
            for (addr, socket) in inherited {
                // A passed socket takes the scheme and options of the --listen with its address.
                let spec = config
                    .listen
                    .iter()
                    .find(|s| s.scheme.is_stream() && s.addr == addr)
                    .map_or_else(|| ListenSpec::tcp(addr), |s| s.clone());
                sockets.push((spec.with_addr(addr), socket));
            }
        }
        // UDP listeners always come from --listen (systemd passes stream sockets only).
        let udp = config
            .listen
            .iter()
            .filter(|s| !s.scheme.is_stream())
            .map(|spec| {
                UdpListener::bind(
                    spec,
                    config.worker_threads(),
                    config.udp_socket_buffer,
                    &accept.conn.metrics,
                )
                .map_err(|source| Error::Bind { addr: spec.addr, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let udp_shared =
            Arc::new(udp::Shared::new(config.udp_rate_limit.0, Rules::new(&config.allow, &config.deny)));
        let hostname = banner::hostname();
        let mut listeners = Vec::with_capacity(sockets.len());
        for (spec, socket) in sockets {
            let tls = match (spec.scheme, &tls) {
                (Scheme::Tls, Some(certificates)) => Some(TlsStage {
                    certificates: certificates.clone(),
                    timeout: config.tls_handshake_timeout,
                }),
                (Scheme::Tls, None) => return Err(Error::TlsFlags(spec.to_string())),
                _ => None,
            };
            let stack = Stack {
                listener: spec.to_string(),
                proxy: spec.proxy.map(|version| ProxyStage { version, timeout: config.proxy_header_timeout }),
                tls,
                banner: config.banner.as_ref().map(|t| Banner::compile(t, &hostname, &spec.to_string())),
                faults: spec.faults.shapes_echo().then_some(spec.faults),
                reset_probability: spec.faults.reset_probability.filter(|&p| p > 0.0),
                access: spec.proxy.and(access.clone()),
            };
            let stack = (!stack.is_empty()).then(|| Arc::new(stack));
            let proxy_from = if spec.proxy.is_some() { config.proxy_from.clone() } else { Vec::new() };
            listeners.push(Arc::new(StreamListener::new(socket, spec, stack, proxy_from, &accept)));
        }

        Ok(Server {
            listeners,
            udp,
            udp_shared,
            http,
            accept,
            state: Arc::new(ServerState::new()),
            max_connections,
            budget_source,
            shutdown_timeout: config.shutdown_timeout,
            shutdown_delay: config.shutdown_delay,
            tls,
            tls_reload_interval: config.tls_reload_interval.0,
        })
    }

    /// The addresses the stream (tcp, tls) echo listeners are bound to (with ephemeral ports
    /// resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.local_addr()).collect()
    }

    /// The addresses the UDP listeners are bound to (with ephemeral ports resolved).
    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.udp.iter().map(|l| l.local_addr()).collect()
    }

    /// The listeners as `--listen` spells them, with their bound addresses: the stream
    /// listeners first, then the UDP ones.
    pub fn listeners(&self) -> Vec<ListenSpec> {
        self.listeners.iter().map(|l| l.spec.clone()).chain(self.udp.iter().map(|l| l.spec.clone())).collect()
    }

    /// The address of the HTTP endpoint, if metrics are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(addr, _)| *addr)
    }

    /// The connection limit in force.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// The echo buffer budget in bytes, and where its value came from.
    pub fn buffer_budget(&self) -> (usize, &LimitSource) {
        (self.accept.conn.budget.limit(), &self.budget_source)
    }

    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            conn: self.accept.conn.clone(),
            state: self.state.clone(),
            tracker: self.accept.tracker.clone(),
            tls: self.tls.clone(),
            udp: self.udp_shared.clone(),
        }
    }

    /// Serves until `shutdown` completes, then drains (see the module docs) and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> DrainReport {
        let Server {
            listeners,
            udp,
            udp_shared,
            http,
            accept,
            state,
            shutdown_timeout,
            shutdown_delay,
            tls,
            tls_reload_interval,
            ..
        } = self;
        let conn = accept.conn.clone();
        let tracker = accept.tracker.clone();

        let tls_watch = CancellationToken::new();
        if let (Some(certificates), Some(every)) = (tls, tls_reload_interval) {
            tokio::spawn(certificates.watch(every, tls_watch.clone()));
        }

        let stop_accepting = CancellationToken::new();
        let mut supervisors = JoinSet::new();
        for listener in listeners {
            state.accepting.fetch_add(1, Ordering::Relaxed);
            supervisors.spawn(supervise(listener, accept.clone(), state.clone(), stop_accepting.clone()));
        }
        let mut udp_loops = Vec::new();
        for listener in udp {
            let spec = listener.spec.clone();
            match listener.serve(udp_shared.clone()) {
                Ok(loops) => {
                    state.udp_serving.fetch_add(1, Ordering::Relaxed);
                    udp_loops.push((spec, loops));
                }
                Err(err) => error!(listener = %spec, error = %err, "cannot serve the UDP listener"),
            }
        }
        // After the listeners are counted as accepting: a probe that arrives the moment the
        // endpoint serves must not see "no listener is accepting".
        let http_stop = CancellationToken::new();
        if let Some((_, socket)) = http {
            let context = Arc::new(HttpContext { conn: conn.clone(), state: state.clone() });
            tokio::spawn(http::serve(socket, context, http_stop.clone()));
        }
        drop(accept);
        systemd::notify_ready();

        shutdown.await;
        state.draining.store(true, Ordering::Relaxed);
        conn.metrics.set_draining(true);
        systemd::notify_stopping();
        info!(
            connections = tracker.len(),
            delay = ?shutdown_delay,
            "shutdown requested: /readyz answers 503; still accepting during the delay"
        );
        if !shutdown_delay.is_zero() {
            tokio::time::sleep(shutdown_delay).await;
        }

        stop_accepting.cancel();
        // Each supervisor owns its listener: when they have all returned, every listening socket
        // is closed and new connects are refused.
        while supervisors.join_next().await.is_some() {}
        stop_udp(udp_loops, &state).await;
        conn.close_idle();
        tracker.close();
        let draining = tracker.len();
        info!(
            connections = draining,
            timeout = ?shutdown_timeout,
            "listeners closed; idle connections closed, connections with data in flight draining"
        );

        let mut closed_by_timeout = 0;
        if tokio::time::timeout(shutdown_timeout, tracker.wait()).await.is_err() {
            closed_by_timeout = tracker.len();
            warn!(connections = closed_by_timeout, "shutdown timeout reached; closing remaining connections");
            conn.force_close.cancel();
            if tokio::time::timeout(FORCE_CLOSE_GRACE, tracker.wait()).await.is_err() {
                warn!(connections = tracker.len(), "connections still closing at exit");
            }
        }
        http_stop.cancel();
        tls_watch.cancel();
        info!(drained = draining.saturating_sub(closed_by_timeout), closed_by_timeout, "shutdown complete");
        DrainReport { draining, closed_by_timeout }
    }
}

/// Ends the UDP listeners' loops, which closes their sockets: datagrams are no longer answered.
async fn stop_udp(listeners: Vec<(ListenSpec, Vec<tokio::task::JoinHandle<()>>)>, state: &ServerState) {
    for (spec, loops) in listeners {
        for task in &loops {
            task.abort();
        }
        for task in loops {
            if tokio::time::timeout(UDP_STOP_GRACE, task).await.is_err() {
                warn!(listener = %spec, "a UDP loop did not stop in time");
            }
        }
        state.udp_serving.fetch_sub(1, Ordering::Relaxed);
        info!(listener = %spec, "UDP listener closed");
    }
}

/// Runs one listener's accept loop, restarting it if it ends for any reason but `stop`.
async fn supervise(
    listener: Arc<StreamListener>,
    accept: Arc<AcceptContext>,
    state: Arc<ServerState>,
    stop: CancellationToken,
) {
    loop {
        let run = tokio::spawn(listener::accept_loop(listener.clone(), accept.clone(), stop.clone()));
        let ended = run.await;
        if stop.is_cancelled() {
            state.accepting.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        state.accepting.fetch_sub(1, Ordering::Relaxed);
        match ended {
            Ok(()) => error!(listener = %listener.spec, "accept loop ended unexpectedly; restarting it"),
            Err(err) => error!(listener = %listener.spec, error = %err, "accept loop failed; restarting it"),
        }
        accept.conn.metrics.listener_restarted(&listener.label);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RESTART_PAUSE) => {}
        }
        state.accepting.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// An accept loop that panics is logged, counted, reported not ready while down, and
    /// restarted on the same socket: the listener serves again.
    #[tokio::test]
    async fn a_panicking_accept_loop_is_restarted() {
        use clap::Parser;
        let config =
            Config::parse_from(["echod", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]);
        let server = Server::bind(&config).unwrap();
        let addr = server.local_addrs()[0];
        let handle = server.handle();
        crate::listener::tests::PANIC_ON.lock().unwrap().push(addr);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));

        // This connect is accepted by the loop that panics, and dropped with it.
        let _lost = TcpStream::connect(addr).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !handle.render_metrics().unwrap().contains("echod_listener_restarts_total{listener=") {
            assert!(tokio::time::Instant::now() < deadline, "restart not counted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Served again after the restart.
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"again").await.unwrap();
        let mut back = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(&back, b"again");
        assert_eq!(handle.listeners_accepting(), 1);
        drop(client);
        stop.send(()).unwrap();
        task.await.unwrap();
    }
}
