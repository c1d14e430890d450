//! Listening sockets: binding them (or adopting systemd's), and the accept loop that turns each
//! accepted client into a connection task under the connection limit.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
    let inherited = set_inherited_options(&listener, addr, shared.tcp_keepalive);
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
                if !inherited {
                    configure(&stream, &shared, peer);
                }
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

/// Whether an accepted socket starts with its listener's `TCP_NODELAY` and keepalive settings.
/// Linux copies them (the new socket is cloned from the listener); elsewhere they are set on each
/// accepted socket.
const ACCEPTED_SOCKETS_INHERIT_OPTIONS: bool = cfg!(target_os = "linux");

/// Sets the client socket options on the listener itself where accepted sockets inherit them,
/// which saves up to four system calls per connection. Returns whether that worked; if not, the
/// accept loop sets them on each client instead.
fn set_inherited_options(listener: &TcpListener, addr: SocketAddr, keepalive: Option<Duration>) -> bool {
    if !ACCEPTED_SOCKETS_INHERIT_OPTIONS {
        return false;
    }
    match set_client_options(SockRef::from(listener), keepalive) {
        Ok(()) => true,
        Err(err) => {
            debug!(listener = %addr, error = %err, "setting client options on the listener failed; setting them per client");
            false
        }
    }
}

/// Socket options of an accepted client: `TCP_NODELAY`, because an echo is latency-bound and
/// Nagle's algorithm would hold small replies back; TCP keepalive, so a peer that vanished without
/// a FIN or RST is eventually found and its connection freed.
fn set_client_options(socket: SockRef<'_>, keepalive: Option<Duration>) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    if let Some(idle) = keepalive {
        let keepalive = TcpKeepalive::new().with_time(idle);
        #[cfg(not(any(target_os = "openbsd", target_os = "haiku")))]
        let keepalive = keepalive.with_interval(KEEPALIVE_INTERVAL);
        socket.set_tcp_keepalive(&keepalive)?;
    }
    Ok(())
}

/// Time between keepalive probes once the first went unanswered.
#[cfg(not(any(target_os = "openbsd", target_os = "haiku")))]
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Sets the client options on one accepted socket. A failure is logged, not fatal: the client can
/// still be served.
fn configure(stream: &TcpStream, shared: &Shared, peer: SocketAddr) {
    if let Err(err) = set_client_options(SockRef::from(stream), shared.tcp_keepalive) {
        warn!(%peer, error = %err, "could not set TCP_NODELAY and keepalive on the client socket");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every accepted client gets TCP_NODELAY and the configured keepalive, whichever way the
    /// platform gets them there.
    #[tokio::test]
    async fn accepted_clients_get_nodelay_and_keepalive() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let listener = bind(addr, 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let keepalive = Duration::from_secs(77);
        let inherited = set_inherited_options(&listener, addr, Some(keepalive));
        assert_eq!(inherited, ACCEPTED_SOCKETS_INHERIT_OPTIONS);
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        if !inherited {
            set_client_options(SockRef::from(&stream), Some(keepalive)).unwrap();
        }
        let socket = SockRef::from(&stream);
        assert!(socket.tcp_nodelay().unwrap(), "TCP_NODELAY");
        assert!(socket.keepalive().unwrap(), "SO_KEEPALIVE");
        #[cfg(target_os = "linux")]
        {
            assert_eq!(socket.tcp_keepalive_time().unwrap(), keepalive);
            assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        }
    }
}
