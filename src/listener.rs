//! Listening sockets: binding them (or adopting systemd's), and the accept loop that turns each
//! accepted client into a connection task under the connection limit.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::accept_policy::AcceptPolicy;
use crate::server::Shared;
use crate::{connection, Error};

/// Binds a listening socket the way a server should: `SO_REUSEADDR` on Unix so a restart does not
/// wait out TIME_WAIT (on Windows that option would let another process steal the port, so it
/// is left alone), IPv6 sockets IPv6-only so `0.0.0.0:P` and `[::]:P` can both be listened on,
/// and the requested backlog.
pub fn bind(addr: SocketAddr, backlog: u32) -> Result<TcpListener, Error> {
    let fail = |source: io::Error| Error::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(fail)?;
    #[cfg(unix)]
    socket.set_reuse_address(true).map_err(fail)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(fail)?;
    }
    socket.set_nonblocking(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    socket.listen(backlog.min(i32::MAX as u32) as i32).map_err(fail)?;
    TcpListener::from_std(socket.into()).map_err(fail)
}

/// Accepts clients on one listener until `stop` is cancelled, spawning one task per client.
///
/// Before each accept the loop takes a slot of the shared connection limit; at the limit it
/// simply stops accepting, and the kernel's backlog holds newcomers until a connection ends. When
/// the loop returns, the listener is dropped: the port closes and new connects are refused.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut policy = AcceptPolicy::new(addr);
    let accepted = shared.metrics.accepted(&addr.to_string());
    loop {
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            permit = shared.limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break,
            },
        };
        let result = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            result = listener.accept() => result,
        };
        match result {
            Ok((stream, peer)) => {
                policy.on_success();
                accepted.increment(1);
                configure(&stream, &shared, peer);
                debug!(%peer, listener = %addr, "connection accepted");
                shared.tracker.spawn(connection::serve(stream, peer, permit, shared.clone()));
            }
            Err(err) => {
                drop(permit);
                shared.metrics.accept_error(crate::accept_policy::kind(&err));
                if let Some(pause) = policy.on_error(&err) {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }
    debug!(listener = %addr, "listener closed");
}

/// Socket options of an accepted client: `TCP_NODELAY`, because an echo is latency-bound and
/// Nagle's algorithm would hold small replies back; TCP keepalive, so a peer that vanished without
/// a FIN or RST is eventually found and its connection freed. Failures are logged, not fatal: the
/// client can still be served.
fn configure(stream: &TcpStream, shared: &Shared, peer: SocketAddr) {
    if let Err(err) = stream.set_nodelay(true) {
        warn!(%peer, error = %err, "could not set TCP_NODELAY");
    }
    if let Some(idle) = shared.tcp_keepalive {
        let keepalive = TcpKeepalive::new().with_time(idle);
        #[cfg(not(any(target_os = "openbsd", target_os = "haiku")))]
        let keepalive = keepalive.with_interval(std::time::Duration::from_secs(10));
        if let Err(err) = SockRef::from(stream).set_tcp_keepalive(&keepalive) {
            warn!(%peer, error = %err, "could not enable TCP keepalive");
        }
    }
}
