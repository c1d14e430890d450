//! The small shared pieces the server's tasks need, each given only what it uses: connection
//! tasks get a [`ConnContext`], the HTTP endpoint an [`HttpContext`]. Nothing here belongs to one
//! connection.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::budget::Budget;
use crate::metrics::{Sampled, ServerMetrics};

/// What every connection task sees.
pub struct ConnContext {
    pub(crate) metrics: Arc<ServerMetrics>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) budget: Budget,
    /// Cancelled when the listeners have closed during a drain: connections with nothing in
    /// flight close at once (waiting ones watch this token).
    pub(crate) listeners_closed: CancellationToken,
    /// The same moment, readable without a lock (copying connections check it on every poll).
    closing_idle: AtomicBool,
    /// Cancelled when the shutdown timeout runs out: every connection closes.
    pub(crate) force_close: CancellationToken,
}

impl ConnContext {
    pub(crate) fn new(
        metrics: Arc<ServerMetrics>,
        idle_timeout: Option<Duration>,
        budget: Budget,
    ) -> ConnContext {
        ConnContext {
            metrics,
            idle_timeout,
            budget,
            listeners_closed: CancellationToken::new(),
            closing_idle: AtomicBool::new(false),
            force_close: CancellationToken::new(),
        }
    }

    /// Whether the drain is closing connections that have nothing in flight.
    pub(crate) fn closing_idle(&self) -> bool {
        self.closing_idle.load(Relaxed)
    }

    /// The listeners have closed: close connections as soon as they have nothing in flight.
    pub(crate) fn close_idle(&self) {
        self.closing_idle.store(true, Relaxed);
        self.listeners_closed.cancel();
    }
}

/// The server's state as readiness sees it.
pub struct ServerState {
    /// True from the moment draining starts (`/readyz` answers 503).
    pub(crate) draining: AtomicBool,
    /// Listeners whose accept loop is running now.
    pub(crate) accepting: AtomicUsize,
    /// UDP listeners answering datagrams now.
    pub(crate) udp_serving: AtomicUsize,
}

impl ServerState {
    pub(crate) fn new() -> ServerState {
        ServerState {
            draining: AtomicBool::new(false),
            accepting: AtomicUsize::new(0),
            udp_serving: AtomicUsize::new(0),
        }
    }

    /// Draining, or no listener accepting: a load balancer should send clients elsewhere.
    pub(crate) fn not_ready(&self) -> Option<&'static str> {
        if self.draining.load(Relaxed) {
            Some("draining")
        } else if self.accepting.load(Relaxed) == 0 && self.udp_serving.load(Relaxed) == 0 {
            Some("no listener is accepting")
        } else {
            None
        }
    }
}

/// What the HTTP endpoint sees: the metrics to render (with the budget's figures) and the
/// server's readiness.
pub(crate) struct HttpContext {
    pub conn: Arc<ConnContext>,
    pub state: Arc<ServerState>,
}

/// `/metrics`: the recorder's metrics and the figures sampled now (`None` with metrics off).
pub(crate) fn render(conn: &ConnContext, state: &ServerState) -> Option<String> {
    let sampled = Sampled {
        buffer_memory: conn.budget.used(),
        buffer_memory_limit: conn.budget.limit(),
        copying: conn.budget.copying(),
        listeners_accepting: state.accepting.load(Relaxed),
    };
    conn.metrics.registry().map(|r| r.render(&sampled))
}
