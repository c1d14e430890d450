//! Sockets: binding listeners (the echo listeners and the HTTP endpoint alike), the options of
//! client sockets, the policy for accept errors ([`accept_policy`]), and a read-ahead for TLS
//! sessions ([`read_ahead`]).

pub mod accept_policy;
pub mod read_ahead;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};

/// Binds a listening TCP socket the way a server should: `SO_REUSEADDR` on Unix so a restart
/// does not wait out TIME_WAIT (on Windows that option would let another process steal the port,
/// so it is left alone), IPv6 sockets IPv6-only so `0.0.0.0:P` and `[::]:P` can both be listened
/// on, and the requested backlog.
pub fn bind_tcp(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    TcpListener::from_std(socket.into())
}

/// TCP keepalive: idle time before the first probe, time between probes, probes before the peer
/// is declared gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

impl Keepalive {
    /// How long after its last sign of life an idle peer that vanished is found, at most: the
    /// idle time, the spread of up to one interval ([`ClientOptions::spread_idle`]), then
    /// `count` unanswered probes an interval apart.
    pub fn detection_time(&self) -> Duration {
        self.idle + self.interval * (self.count + 1)
    }
}

/// The options every client socket gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    pub keepalive: Option<Keepalive>,
    /// `TCP_USER_TIMEOUT`: longest time sent data may stay unacknowledged (Linux only; other
    /// platforms have no equivalent that applies per socket, see `docs/deploy.md`).
    pub user_timeout: Option<Duration>,
}

impl ClientOptions {
    /// The keepalive idle time for one connection: the configured one plus a random part of one
    /// probe interval (whole seconds). Connections accepted together go idle together; without the
    /// spread their probes leave in bursts, and a burst lost at a full queue (loopback drops
    /// beyond its 1,000-packet backlog) aborts healthy connections. Seen: 9,000 of 18,000 idle
    /// connections lost at once.
    pub fn spread_idle(&self) -> Option<Duration> {
        self.keepalive.map(|k| {
            let spread = k.interval.as_secs().max(1);
            k.idle + Duration::from_secs(crate::random::random_u64() % spread)
        })
    }

    /// Sets one accepted socket's keepalive idle time to `idle` (its other options are inherited
    /// from the listener, or were set by [`ClientOptions::apply`]).
    pub fn set_idle(socket: SockRef<'_>, idle: Duration) -> io::Result<()> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            use std::os::fd::AsRawFd;
            let secs = libc::c_int::try_from(idle.as_secs()).unwrap_or(libc::c_int::MAX);
            // SAFETY: setsockopt reads one c_int from a pointer to a live c_int.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_KEEPIDLE,
                    (&secs as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            socket.set_tcp_keepalive(&TcpKeepalive::new().with_time(idle))
        }
    }

    /// Applies the options: `TCP_NODELAY`, because an echo is latency-bound and Nagle's
    /// algorithm would hold small replies back; keepalive, so a vanished idle peer is found;
    /// the user timeout, so a vanished peer with data in flight is found too.
    pub fn apply(&self, socket: SockRef<'_>) -> io::Result<()> {
        socket.set_tcp_nodelay(true)?;
        if let Some(k) = self.keepalive {
            let keepalive = TcpKeepalive::new().with_time(k.idle);
            #[cfg(not(any(target_os = "openbsd", target_os = "haiku")))]
            let keepalive = keepalive.with_interval(k.interval);
            #[cfg(any(
                target_os = "linux",
                target_os = "android",
                target_os = "macos",
                target_os = "freebsd",
                windows
            ))]
            let keepalive = keepalive.with_retries(k.count);
            #[cfg(not(windows))]
            socket.set_tcp_keepalive(&keepalive)?;
            // Windows before 10 (1703), and Wine, lack TCP_KEEPCNT: there the idle time and the
            // interval are kept, with the platform's own probe count.
            #[cfg(windows)]
            if socket.set_tcp_keepalive(&keepalive).is_err() {
                socket.set_tcp_keepalive(&TcpKeepalive::new().with_time(k.idle).with_interval(k.interval))?;
            }
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Some(timeout) = self.user_timeout {
            socket.set_tcp_user_timeout(Some(timeout))?;
        }
        Ok(())
    }
}

/// Whether an accepted socket starts with its listener's `TCP_NODELAY`, keepalive and user
/// timeout. Linux copies them (the new socket is cloned from the listener); elsewhere they are
/// set on each accepted socket.
pub const ACCEPTED_SOCKETS_INHERIT_OPTIONS: bool = cfg!(target_os = "linux");

/// Makes the socket's close send a reset (RST) instead of a FIN: `SO_LINGER` with a zero
/// timeout. Used to refuse a connection without leaving a TIME_WAIT behind, and for injected
/// resets.
pub fn reset_on_close(stream: &TcpStream) -> io::Result<()> {
    SockRef::from(stream).set_linger(Some(Duration::ZERO))
}

/// Bytes sent on `stream` that the peer has not yet acknowledged (`SIOCOUTQ`, Linux), or
/// `None` where the platform does not tell.
pub fn unacknowledged_bytes(stream: &TcpStream) -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let mut pending: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int through the pointer, which points at a live c_int.
        let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut pending) };
        (rc == 0).then_some(pending.max(0) as usize)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = stream;
        None
    }
}

/// Resets `stream` once the peer has acknowledged everything sent (a reset discards unsent
/// data, and an injected reset must come after exactly the bytes it promised): waits for the
/// send queue to empty (polled every millisecond, for at most two seconds; where the platform
/// does not tell, a fixed 100 ms), then arms the reset that dropping the stream sends.
pub async fn reset_after_delivery(stream: &TcpStream) {
    const MOST: Duration = Duration::from_secs(2);
    let deadline = tokio::time::Instant::now() + MOST;
    loop {
        match unacknowledged_bytes(stream) {
            Some(0) => break,
            Some(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(1)).await
            }
            Some(_) => break,
            None => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                break;
            }
        }
    }
    if let Err(err) = reset_on_close(stream) {
        tracing::debug!(error = %err, "could not arm the injected reset");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every accepted client gets TCP_NODELAY, the configured keepalive and user timeout,
    /// whichever way the platform gets them there.
    #[tokio::test]
    async fn accepted_clients_get_nodelay_keepalive_and_user_timeout() {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let keepalive =
            Keepalive { idle: Duration::from_secs(77), interval: Duration::from_secs(7), count: 4 };
        let options =
            ClientOptions { keepalive: Some(keepalive), user_timeout: Some(Duration::from_secs(105)) };
        if ACCEPTED_SOCKETS_INHERIT_OPTIONS {
            options.apply(SockRef::from(&listener)).unwrap();
        }
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        if !ACCEPTED_SOCKETS_INHERIT_OPTIONS {
            options.apply(SockRef::from(&stream)).unwrap();
        }
        let socket = SockRef::from(&stream);
        assert!(socket.tcp_nodelay().unwrap(), "TCP_NODELAY");
        assert!(socket.keepalive().unwrap(), "SO_KEEPALIVE");
        #[cfg(target_os = "linux")]
        {
            assert_eq!(socket.tcp_keepalive_time().unwrap(), keepalive.idle);
            assert_eq!(socket.tcp_keepalive_interval().unwrap(), keepalive.interval);
            assert_eq!(socket.tcp_keepalive_retries().unwrap(), keepalive.count);
            assert_eq!(socket.tcp_user_timeout().unwrap(), Some(Duration::from_secs(105)));
        }
        assert_eq!(keepalive.detection_time(), Duration::from_secs(112));
        for _ in 0..100 {
            let idle = options.spread_idle().unwrap();
            assert!(idle >= keepalive.idle && idle < keepalive.idle + keepalive.interval, "{idle:?}");
        }
        ClientOptions::set_idle(SockRef::from(&stream), Duration::from_secs(80)).unwrap();
        #[cfg(target_os = "linux")]
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(80));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn unacknowledged_bytes_are_read_on_linux() {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        assert_eq!(unacknowledged_bytes(&client), Some(0));
    }
}
