//! The stream accept loop: accept → policy check → slot → spawn the connection's task.
//!
//! The loop does as little as it can per client, so one slow or failing client never holds up
//! the next: everything that reads from a client (a PROXY header, a TLS handshake) runs on the
//! connection's own task. At `--max-connections` the loop stops accepting (one accepted client
//! waits for the next free slot), so newcomers queue in the kernel's backlog.

use std::net::SocketAddr;
use std::sync::Arc;

use metrics::Counter;
use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::access::{Access, RefusalLog};
use crate::config::{Cidr, ListenSpec};
use crate::connection::{Account, Connection};
use crate::context::ConnContext;
use crate::echo::ring::Plain;
use crate::metrics::Rejection;
use crate::net::accept_policy::{self, AcceptPolicy};
use crate::net::{self, ClientOptions, Keepalive, ACCEPTED_SOCKETS_INHERIT_OPTIONS};
use crate::stage::{self, Stack};

/// One bound stream listener and what its connections get.
pub(crate) struct StreamListener {
    pub socket: TcpListener,
    /// The listener as given, with its bound address.
    pub spec: ListenSpec,
    /// Its `listener` metrics label.
    pub label: String,
    /// Its stages; `None` for a plain TCP echo.
    pub stack: Option<Arc<Stack>>,
    /// Peers allowed to send PROXY headers (empty: any).
    pub proxy_from: Vec<Cidr>,
    accepted: Counter,
    /// Whether accepted sockets inherit the client options set on the listening socket.
    inherited: bool,
}

/// What every accept loop shares.
pub(crate) struct AcceptContext {
    pub conn: Arc<ConnContext>,
    /// Access control; `None` when nothing is restricted.
    pub access: Option<Arc<Access>>,
    pub limit: Arc<Semaphore>,
    pub tracker: TaskTracker,
    pub options: ClientOptions,
}

impl StreamListener {
    pub fn new(
        socket: TcpListener,
        spec: ListenSpec,
        stack: Option<Arc<Stack>>,
        proxy_from: Vec<Cidr>,
        accept: &AcceptContext,
    ) -> StreamListener {
        let label = spec.label();
        let accepted = accept.conn.metrics.accepted(&label);
        let inherited = ACCEPTED_SOCKETS_INHERIT_OPTIONS
            && {
                match accept.options.apply(SockRef::from(&socket)) {
                    Ok(()) => true,
                    Err(err) => {
                        debug!(listener = %spec, error = %err, "setting client options on the listener failed; setting them per client");
                        false
                    }
                }
            };
        StreamListener { socket, spec, label, stack, proxy_from, accepted, inherited }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.spec.addr
    }
}

/// Accepts clients on one listener until `stop` is cancelled, spawning one task per client.
/// When the loop returns the listener stays open (the caller owns it); the caller drops it to
/// refuse new connects.
pub(crate) async fn accept_loop(
    listener: Arc<StreamListener>,
    accept: Arc<AcceptContext>,
    stop: CancellationToken,
) {
    let mut policy = AcceptPolicy::new(listener.label.clone());
    loop {
        let result = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            result = listener.socket.accept() => result,
        };
        let (stream, peer) = match result {
            Ok(accepted) => accepted,
            Err(err) => {
                let kind = accept_policy::kind(&err);
                accept.conn.metrics.accept_error(kind);
                if let Some(pause) = policy.on_error(&err) {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
                continue;
            }
        };
        policy.on_success();
        #[cfg(test)]
        tests::maybe_panic(listener.local_addr());
        if !listener.proxy_from.is_empty() && !listener.proxy_from.iter().any(|net| net.contains(peer.ip())) {
            refuse(&stream, peer, &listener, &accept, Rejection::UntrustedProxy);
            continue;
        }
        // The peer is the client unless a PROXY header says otherwise: then the check waits for
        // the header, on the connection's task.
        let mut source = None;
        if let (Some(access), None) = (&accept.access, listener.spec.proxy) {
            match access.admit(peer.ip()) {
                Ok(slot) => source = slot,
                Err(why) => {
                    refuse(&stream, peer, &listener, &accept, why);
                    continue;
                }
            }
        }
        // The slot is taken after the accept: at the limit, this one client waits for a free
        // slot and the loop stops polling accept meanwhile (no listener holds a slot idle).
        let permit = match accept.limit.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => tokio::select! {
                biased;
                () = stop.cancelled() => break,
                permit = accept.limit.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_closed) => break,
                },
            },
        };
        listener.accepted.increment(1);
        let keepalive = accept.options.keepalive.as_ref().map(Keepalive::spread);
        let set = if listener.inherited {
            keepalive.map_or(Ok(()), |k| k.set_times(SockRef::from(&stream)))
        } else {
            ClientOptions { keepalive, ..accept.options }.apply(SockRef::from(&stream))
        };
        if let Err(err) = set {
            warn!(%peer, error = %err, "could not set TCP_NODELAY and keepalive on the client socket");
        }
        debug!(%peer, listener = %listener.spec, "connection accepted");
        let mut account = Account::open(accept.conn.clone(), peer);
        if source.is_some() {
            account.extras().source = source;
        }
        match &listener.stack {
            None => accept.tracker.spawn(Connection::new(account, permit, stream, Plain)),
            Some(stack) => accept.tracker.spawn(stage::serve(stack.clone(), stream, account, permit)),
        };
    }
    debug!(listener = %listener.spec, "accept loop stopped");
}

/// Refuses a connection before serving it: reset at once (no TIME_WAIT under a flood), nothing
/// read, no slot taken, not counted as accepted.
fn refuse(
    stream: &TcpStream,
    peer: SocketAddr,
    listener: &StreamListener,
    accept: &AcceptContext,
    why: Rejection,
) {
    if let Err(err) = net::reset_on_close(stream) {
        debug!(%peer, error = %err, "could not set SO_LINGER for the refusal");
    }
    accept.conn.metrics.rejected(why);
    debug!(%peer, listener = %listener.spec, reason = why.as_str(), "connection refused");
    match &accept.access {
        Some(access) => access.log_refusal(why, peer),
        None => UNTRUSTED_PROXIES.note(why, peer),
    }
}

/// The refusal log of a server without access rules (`--proxy-from` alone).
static UNTRUSTED_PROXIES: std::sync::LazyLock<RefusalLog> = std::sync::LazyLock::new(RefusalLog::default);

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;

    /// Listeners whose accept loop panics after its next accept, once (tests of the supervision).
    pub static PANIC_ON: Mutex<Vec<SocketAddr>> = Mutex::new(Vec::new());

    pub fn maybe_panic(listener: SocketAddr) {
        let mut armed = PANIC_ON.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(at) = armed.iter().position(|&a| a == listener) {
            armed.remove(at);
            drop(armed);
            panic!("injected accept-loop panic");
        }
    }
}
