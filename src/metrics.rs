//! Metric names, their help texts, the Prometheus recorder, and the handles the server updates.
//!
//! The names below are a public contract: dashboards, alert rules and users' queries depend on
//! them. Change one only as a breaking change.
//!
//! Each server owns its own [`PrometheusRecorder`] rather than installing a process-global one:
//! handles are registered against it with `metrics::with_local_recorder`, so several servers (and
//! the tests that start them) can live in one process, each with exact counts of its own. With
//! `--metrics-listen off` no recorder exists and every handle is a no-op.
//!
//! Hot paths never look a metric up by name: the server resolves every handle once, and a
//! connection batches its byte counts and publishes them once per tick (see `connection`).

use std::io;
use std::time::Duration;

use ::metrics::{
    describe_counter, describe_gauge, describe_histogram, with_local_recorder, Counter, Gauge, Histogram,
    Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

pub const CONNECTIONS_ACCEPTED: &str = "echod_connections_accepted_total";
pub const CONNECTIONS_ACTIVE: &str = "echod_connections_active";
pub const CONNECTIONS_CLOSED: &str = "echod_connections_closed_total";
pub const BYTES_RECEIVED: &str = "echod_bytes_received_total";
pub const BYTES_SENT: &str = "echod_bytes_sent_total";
pub const CONNECTION_DURATION: &str = "echod_connection_duration_seconds";
pub const ACCEPT_ERRORS: &str = "echod_accept_errors_total";
pub const CONNECTIONS_REJECTED: &str = "echod_connections_rejected_total";
pub const HANDSHAKE_FAILURES: &str = "echod_handshake_failures_total";
pub const LISTENER_RESTARTS: &str = "echod_listener_restarts_total";
pub const LISTENERS_ACCEPTING: &str = "echod_listeners_accepting";
pub const CONNECTIONS_COPYING: &str = "echod_connections_copying";
pub const BUFFER_MEMORY: &str = "echod_buffer_memory_bytes";
pub const BUFFER_MEMORY_LIMIT: &str = "echod_buffer_memory_limit_bytes";
pub const TLS_RELOADS: &str = "echod_tls_reloads_total";
pub const TLS_CERTIFICATE_EXPIRY: &str = "echod_tls_certificate_expiry_timestamp_seconds";
pub const MAX_CONNECTIONS: &str = "echod_max_connections";
pub const DRAINING: &str = "echod_draining";
pub const BUILD_INFO: &str = "echod_build_info";
pub const RUNTIME_WORKERS: &str = "echod_runtime_workers";
pub const RUNTIME_ALIVE_TASKS: &str = "echod_runtime_alive_tasks";
pub const RUNTIME_GLOBAL_QUEUE_DEPTH: &str = "echod_runtime_global_queue_depth";
pub const RUNTIME_BUSY: &str = "echod_runtime_busy_seconds_total";
pub const UDP_DATAGRAMS_RECEIVED: &str = "echod_udp_datagrams_received_total";
pub const UDP_DATAGRAMS_SENT: &str = "echod_udp_datagrams_sent_total";
pub const UDP_BYTES_RECEIVED: &str = "echod_udp_bytes_received_total";
pub const UDP_BYTES_SENT: &str = "echod_udp_bytes_sent_total";
pub const UDP_DATAGRAMS_DROPPED: &str = "echod_udp_datagrams_dropped_total";
pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
pub const PROCESS_VIRTUAL_MEMORY: &str = "process_virtual_memory_bytes";
pub const PROCESS_START_TIME: &str = "process_start_time_seconds";
pub const PROCESS_THREADS: &str = "process_threads";

/// Upper bounds of the connection-duration histogram: 1 ms to 1 h.
pub const DURATION_BUCKETS: [f64; 16] =
    [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

/// How a connection ended: the `reason` label of `echod_connections_closed_total`. The
/// discriminants index [`CloseReason::ALL`] and the server's per-reason counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed its side and received everything back.
    Eof,
    /// The client reset the connection or vanished mid-stream.
    Reset,
    /// No traffic in either direction for `--idle-timeout`.
    IdleTimeout,
    /// Still open when the shutdown timeout ran out.
    Shutdown,
    /// Any other socket error (or a panic in the connection's task).
    Error,
    /// A stage before the echo failed: a missing, malformed or late PROXY header, a failed TLS
    /// handshake.
    HandshakeFailed,
    /// Refused after its stages by access control (the PROXY header's client address).
    Rejected,
    /// Closed (FIN) on purpose by a `close_after` fault.
    InjectedClose,
    /// Reset (RST) on purpose by a `reset_after` or `reset_probability` fault.
    InjectedReset,
}

impl CloseReason {
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Eof,
        CloseReason::Reset,
        CloseReason::IdleTimeout,
        CloseReason::Shutdown,
        CloseReason::Error,
        CloseReason::HandshakeFailed,
        CloseReason::Rejected,
        CloseReason::InjectedClose,
        CloseReason::InjectedReset,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Eof => "eof",
            CloseReason::Reset => "reset",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Error => "error",
            CloseReason::HandshakeFailed => "handshake_failed",
            CloseReason::Rejected => "rejected",
            CloseReason::InjectedClose => "injected_close",
            CloseReason::InjectedReset => "injected_reset",
        }
    }

    /// Classifies a socket error: the peer going away is a reset, anything else an error.
    ///
    /// `NotConnected` is the peer going away too: an accepted socket only stops being connected
    /// when the peer aborted it, and some stacks (Wine's) report that peer's RST as a clean end
    /// of stream first, so the error surfaces only at the `shutdown` that follows.
    pub fn from_io_error(err: &io::Error) -> CloseReason {
        match err.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::TimedOut => CloseReason::Reset,
            _ => CloseReason::Error,
        }
    }
}

/// The stage before the echo that failed: the `stage` label of `echod_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Proxy,
    Tls,
}

impl Stage {
    pub const ALL: [Stage; 2] = [Stage::Proxy, Stage::Tls];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Proxy => "proxy",
            Stage::Tls => "tls",
        }
    }
}

/// Why a connection was refused before being served: the `reason` label of
/// `echod_connections_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The client's address is outside `--allow` or inside `--deny`.
    Denied,
    /// The client already has `--max-connections-per-source` connections open.
    PerSourceLimit,
    /// The client opened more than `--connect-rate-per-source` connections per second.
    ConnectRate,
    /// A PROXY listener's peer outside `--proxy-from`.
    UntrustedProxy,
}

impl Rejection {
    pub const ALL: [Rejection; 4] =
        [Rejection::Denied, Rejection::PerSourceLimit, Rejection::ConnectRate, Rejection::UntrustedProxy];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Denied => "denied",
            Rejection::PerSourceLimit => "per_source_limit",
            Rejection::ConnectRate => "connect_rate",
            Rejection::UntrustedProxy => "untrusted_proxy",
        }
    }
}

/// Why a UDP datagram was not answered: the `reason` label of
/// `echod_udp_datagrams_dropped_total`. The discriminants index [`UdpDrop::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpDrop {
    /// The source port is below 1024: a service's, never a client's.
    ReservedPort,
    /// Over `--udp-rate-limit` for its source.
    RateLimited,
    /// The reply could not be sent (the send would have blocked, or failed).
    SendError,
    /// Refused by access control.
    Denied,
}

impl UdpDrop {
    pub const ALL: [UdpDrop; 4] =
        [UdpDrop::ReservedPort, UdpDrop::RateLimited, UdpDrop::SendError, UdpDrop::Denied];

    pub fn as_str(self) -> &'static str {
        match self {
            UdpDrop::ReservedPort => "reserved_port",
            UdpDrop::RateLimited => "rate_limited",
            UdpDrop::SendError => "send_error",
            UdpDrop::Denied => "denied",
        }
    }
}

/// The counters of one UDP listener (the unlabelled ones and the drops are shared by all).
pub struct UdpCounters {
    received: Counter,
    sent: Counter,
    bytes_received: Counter,
    bytes_sent: Counter,
    dropped: [Counter; UdpDrop::ALL.len()],
}

impl UdpCounters {
    /// Adds one batch's counts (each counter is touched once per batch, and only if it moved).
    pub fn add(&self, t: &UdpTally) {
        let add = |counter: &Counter, n: u64| {
            if n > 0 {
                counter.increment(n);
            }
        };
        add(&self.received, t.received);
        add(&self.bytes_received, t.bytes_received);
        add(&self.sent, t.sent);
        add(&self.bytes_sent, t.bytes_sent);
        for (counter, &n) in self.dropped.iter().zip(&t.dropped) {
            add(counter, n);
        }
    }
}

/// What one batch of datagrams did, counted locally by the loop.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UdpTally {
    pub received: u64,
    pub bytes_received: u64,
    pub sent: u64,
    pub bytes_sent: u64,
    pub dropped: [u64; UdpDrop::ALL.len()],
}

/// Figures sampled when `/metrics` is rendered (not kept in the recorder: read where they live).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sampled {
    pub buffer_memory: usize,
    pub buffer_memory_limit: usize,
    pub copying: usize,
    pub listeners_accepting: usize,
}

/// The recorder of one server and the handle that renders it.
pub struct Registry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Registry {
    /// Builds a recorder with echod's histogram buckets and registers every description.
    pub fn new() -> Registry {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(CONNECTION_DURATION.to_string()), &DURATION_BUCKETS)
            .expect("DURATION_BUCKETS is not empty")
            .build_recorder();
        let handle = recorder.handle();
        with_local_recorder(&recorder, describe);
        Registry { recorder, handle }
    }

    /// Renders the Prometheus text exposition: the recorded metrics, then the process and
    /// runtime figures sampled now.
    ///
    /// Sampled figures are written directly rather than through the recorder because the
    /// `metrics` counter type is an integer: CPU and busy seconds would lose their fractions.
    pub fn render(&self, sampled: &Sampled) -> String {
        let mut out = self.handle.render();
        render_sampled(&mut out, sampled);
        render_process(&mut out);
        render_runtime(&mut out);
        out
    }

    /// Housekeeping the exporter needs now and then (drains histogram buffers).
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        with_local_recorder(&self.recorder, f)
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

fn describe() {
    describe_counter!(CONNECTIONS_ACCEPTED, Unit::Count, "Client connections accepted, by listener address.");
    describe_gauge!(CONNECTIONS_ACTIVE, Unit::Count, "Client connections open now.");
    describe_counter!(
        CONNECTIONS_CLOSED,
        Unit::Count,
        "Client connections closed, by reason: eof, reset, idle_timeout, shutdown, error, handshake_failed, rejected, injected_close, injected_reset."
    );
    describe_counter!(
        CONNECTIONS_REJECTED,
        Unit::Count,
        "Connections refused before being served, by reason: denied, per_source_limit, connect_rate, untrusted_proxy."
    );
    describe_counter!(
        HANDSHAKE_FAILURES,
        Unit::Count,
        "Connections closed because a stage before the echo failed, by stage: proxy, tls."
    );
    describe_counter!(
        LISTENER_RESTARTS,
        Unit::Count,
        "Accept loops that ended unexpectedly and were restarted, by listener."
    );
    describe_counter!(BYTES_RECEIVED, Unit::Bytes, "Bytes received from clients.");
    describe_counter!(BYTES_SENT, Unit::Bytes, "Bytes echoed back to clients.");
    describe_histogram!(CONNECTION_DURATION, Unit::Seconds, "Lifetime of closed client connections.");
    describe_counter!(ACCEPT_ERRORS, Unit::Count, "Failed accepts, by kind of error.");
    describe_gauge!(
        MAX_CONNECTIONS,
        Unit::Count,
        "Most client connections served at once (--max-connections)."
    );
    describe_counter!(
        TLS_RELOADS,
        Unit::Count,
        "Reloads of the TLS certificate, key and client CA files (SIGHUP or a change on disk), by result."
    );
    describe_gauge!(
        TLS_CERTIFICATE_EXPIRY,
        Unit::Seconds,
        "When the certificate new TLS handshakes present expires (its notAfter), in seconds since the Unix epoch."
    );
    describe_gauge!(DRAINING, "1 while the server drains for shutdown, else 0.");
    describe_gauge!(BUILD_INFO, "Always 1; the version label says which echod this is.");
    describe_counter!(UDP_DATAGRAMS_RECEIVED, Unit::Count, "UDP datagrams received, by listener.");
    describe_counter!(UDP_DATAGRAMS_SENT, Unit::Count, "UDP datagrams echoed back to their source.");
    describe_counter!(UDP_BYTES_RECEIVED, Unit::Bytes, "Bytes of the UDP datagrams received.");
    describe_counter!(UDP_BYTES_SENT, Unit::Bytes, "Bytes of the UDP datagrams echoed back.");
    describe_counter!(
        UDP_DATAGRAMS_DROPPED,
        Unit::Count,
        "UDP datagrams not answered, by reason: reserved_port, rate_limited, send_error, denied."
    );
    describe_gauge!(RUNTIME_WORKERS, Unit::Count, "Worker threads of the async runtime.");
    describe_gauge!(RUNTIME_ALIVE_TASKS, Unit::Count, "Tasks alive in the async runtime.");
    describe_gauge!(RUNTIME_GLOBAL_QUEUE_DEPTH, Unit::Count, "Tasks waiting in the runtime's global queue.");
    describe_counter!(RUNTIME_BUSY, Unit::Seconds, "Time runtime workers spent busy, summed over workers.");
}

/// Appends one sampled metric (HELP, TYPE and value) in the text exposition format.
fn sample(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    use std::fmt::Write;
    // Writing to a String cannot fail.
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n");
}

fn render_sampled(out: &mut String, s: &Sampled) {
    let gauges = [
        (
            BUFFER_MEMORY,
            "Bytes of echo buffers held by copying connections (leased from the budget).",
            s.buffer_memory,
        ),
        (BUFFER_MEMORY_LIMIT, "The echo buffer budget (--max-buffer-memory).", s.buffer_memory_limit),
        (CONNECTIONS_COPYING, "Connections in a copy phase (holding echo buffers) now.", s.copying),
        (LISTENERS_ACCEPTING, "Echo listeners whose accept loop is running.", s.listeners_accepting),
    ];
    for (name, help, value) in gauges {
        sample(out, name, "gauge", help, value as f64);
    }
}

/// Process figures under the standard names every Prometheus client library uses, gathered by
/// `metrics-process` for each platform.
fn render_process(out: &mut String) {
    let p = metrics_process::collector::collect();
    if let Some(v) = p.cpu_seconds_total {
        sample(out, PROCESS_CPU, "counter", "Total user and system CPU time spent in seconds.", v);
    }
    let gauges = [
        (PROCESS_OPEN_FDS, "Number of open file descriptors.", p.open_fds),
        (PROCESS_MAX_FDS, "Maximum number of open file descriptors.", p.max_fds),
        (PROCESS_RESIDENT_MEMORY, "Resident memory size in bytes.", p.resident_memory_bytes),
        (PROCESS_VIRTUAL_MEMORY, "Virtual memory size in bytes.", p.virtual_memory_bytes),
        (PROCESS_START_TIME, "Start time of the process since unix epoch in seconds.", p.start_time_seconds),
        (PROCESS_THREADS, "Number of OS threads in the process.", p.threads),
    ];
    for (name, help, value) in gauges {
        if let Some(v) = value {
            sample(out, name, "gauge", help, v as f64);
        }
    }
}

/// The stable tokio runtime metrics of the runtime this is called on.
fn render_runtime(out: &mut String) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let m = runtime.metrics();
    let busy: Duration = (0..m.num_workers()).map(|w| m.worker_total_busy_duration(w)).sum();
    sample(out, RUNTIME_WORKERS, "gauge", "Worker threads of the async runtime.", m.num_workers() as f64);
    sample(
        out,
        RUNTIME_ALIVE_TASKS,
        "gauge",
        "Tasks alive in the async runtime.",
        m.num_alive_tasks() as f64,
    );
    sample(
        out,
        RUNTIME_GLOBAL_QUEUE_DEPTH,
        "gauge",
        "Tasks waiting in the runtime's global queue.",
        m.global_queue_depth() as f64,
    );
    sample(
        out,
        RUNTIME_BUSY,
        "counter",
        "Time runtime workers spent busy in seconds, summed over workers.",
        busy.as_secs_f64(),
    );
}

/// The handles the server updates, resolved once at start.
pub struct ServerMetrics {
    registry: Option<Registry>,
    active: Gauge,
    closed: [Counter; CloseReason::ALL.len()],
    handshake_failures: [Counter; Stage::ALL.len()],
    rejected: [Counter; Rejection::ALL.len()],
    bytes_received: Counter,
    bytes_sent: Counter,
    duration: Histogram,
    draining: Gauge,
}

impl ServerMetrics {
    /// Handles on `registry`, or no-op handles when metrics are off.
    pub fn new(registry: Option<Registry>, max_connections: usize) -> ServerMetrics {
        let register = || ServerMetrics {
            registry: None,
            active: ::metrics::gauge!(CONNECTIONS_ACTIVE),
            closed: CloseReason::ALL.map(|r| ::metrics::counter!(CONNECTIONS_CLOSED, "reason" => r.as_str())),
            handshake_failures: Stage::ALL
                .map(|s| ::metrics::counter!(HANDSHAKE_FAILURES, "stage" => s.as_str())),
            rejected: Rejection::ALL
                .map(|r| ::metrics::counter!(CONNECTIONS_REJECTED, "reason" => r.as_str())),
            bytes_received: ::metrics::counter!(BYTES_RECEIVED),
            bytes_sent: ::metrics::counter!(BYTES_SENT),
            duration: ::metrics::histogram!(CONNECTION_DURATION),
            draining: ::metrics::gauge!(DRAINING),
        };
        let build_info = || {
            ::metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            ::metrics::gauge!(MAX_CONNECTIONS).set(max_connections as f64);
        };
        match registry {
            Some(registry) => {
                let mut metrics = registry.with(|| {
                    build_info();
                    register()
                });
                metrics.draining.set(0.0);
                metrics.active.set(0.0);
                metrics.registry = Some(registry);
                metrics
            }
            None => register(),
        }
    }

    pub fn registry(&self) -> Option<&Registry> {
        self.registry.as_ref()
    }

    /// The accepted-connections counter of one listener.
    pub fn accepted(&self, listener: &str) -> Counter {
        let label = listener.to_string();
        self.with(|| ::metrics::counter!(CONNECTIONS_ACCEPTED, "listener" => label))
    }

    /// The counters of the UDP listener labelled `listener`.
    pub fn udp(&self, listener: &str) -> UdpCounters {
        let label = listener.to_string();
        self.with(|| UdpCounters {
            received: ::metrics::counter!(UDP_DATAGRAMS_RECEIVED, "listener" => label),
            sent: ::metrics::counter!(UDP_DATAGRAMS_SENT),
            bytes_received: ::metrics::counter!(UDP_BYTES_RECEIVED),
            bytes_sent: ::metrics::counter!(UDP_BYTES_SENT),
            dropped: UdpDrop::ALL.map(|r| ::metrics::counter!(UDP_DATAGRAMS_DROPPED, "reason" => r.as_str())),
        })
    }

    /// Counts one failed accept of the given kind (rare: looked up by name).
    pub fn accept_error(&self, kind: &'static str) {
        self.with(|| ::metrics::counter!(ACCEPT_ERRORS, "kind" => kind).increment(1));
    }

    /// Counts an accept loop that ended unexpectedly and was restarted (rare: looked up by name).
    pub fn listener_restarted(&self, listener: &str) {
        let label = listener.to_string();
        self.with(|| ::metrics::counter!(LISTENER_RESTARTS, "listener" => label).increment(1));
    }

    /// Counts a connection closed because a stage before the echo failed.
    pub fn handshake_failed(&self, stage: Stage) {
        self.handshake_failures[stage as usize].increment(1);
    }

    /// Counts a connection refused before being served.
    pub fn rejected(&self, why: Rejection) {
        self.rejected[why as usize].increment(1);
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.set(if draining { 1.0 } else { 0.0 });
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.registry {
            Some(registry) => registry.with(f),
            None => f(),
        }
    }
}

/// The TLS handles, registered only by a server with a `tls://` listener (a server without one
/// exports no TLS series: an expiry of 0 would look like an expired certificate).
pub struct TlsMetrics {
    pub reloads_ok: Counter,
    pub reloads_error: Counter,
    pub expiry: Gauge,
}

impl ServerMetrics {
    /// Registers the TLS metrics; every series exists from start (reload counters at 0).
    pub fn tls(&self) -> TlsMetrics {
        self.with(|| TlsMetrics {
            reloads_ok: ::metrics::counter!(TLS_RELOADS, "result" => "ok"),
            reloads_error: ::metrics::counter!(TLS_RELOADS, "result" => "error"),
            expiry: ::metrics::gauge!(TLS_CERTIFICATE_EXPIRY),
        })
    }
}

/// What one connection has already added to the shared byte counters. Kept by the connection
/// (not a reference into the server) so a connection's task stays small and self-contained.
#[derive(Debug, Default, Clone, Copy)]
pub struct Published {
    pub received: u64,
    pub sent: u64,
}

impl ServerMetrics {
    /// A connection was accepted and its task started.
    pub fn connection_opened(&self) {
        self.active.increment(1.0);
    }

    /// Adds what a connection moved since its last call to the shared byte counters.
    pub fn publish(&self, published: &mut Published, received: u64, sent: u64) {
        if received > published.received {
            self.bytes_received.increment(received - published.received);
            published.received = received;
        }
        if sent > published.sent {
            self.bytes_sent.increment(sent - published.sent);
            published.sent = sent;
        }
    }

    /// Records how and after how long a connection ended (its bytes are already published).
    pub fn connection_closed(&self, reason: CloseReason, lifetime: Duration) {
        self.closed[reason as usize].increment(1);
        self.duration.record(lifetime.as_secs_f64());
        self.active.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_going_away_is_a_reset_and_anything_else_an_error() {
        use io::ErrorKind::*;
        for kind in [ConnectionReset, ConnectionAborted, BrokenPipe, NotConnected, UnexpectedEof, TimedOut] {
            assert_eq!(CloseReason::from_io_error(&io::Error::from(kind)), CloseReason::Reset, "{kind:?}");
        }
        for kind in [PermissionDenied, InvalidInput, OutOfMemory, Other] {
            assert_eq!(CloseReason::from_io_error(&io::Error::from(kind)), CloseReason::Error, "{kind:?}");
        }
    }
}
