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
    /// How much later than `idle` one connection's first probe may go: half the idle time, at
    /// least one interval (whole seconds; each connection adds 0 to this minus 1).
    fn idle_spread(&self) -> u64 {
        (self.idle.as_secs() / 2).max(self.interval.as_secs()).max(1)
    }

    /// How much longer than `interval` one connection's probe interval may be: half of it (whole
    /// seconds; each connection adds 0 to this minus 1, so intervals under 2 s are not spread).
    fn interval_spread(&self) -> u64 {
        (self.interval.as_secs() / 2).max(1)
    }

    /// How long after its last sign of life an idle peer that vanished is found, at most: the
    /// idle time and its spread, then `count` unanswered probes at the longest interval
    /// ([`Keepalive::spread`]).
    pub fn detection_time(&self) -> Duration {
        let longest_interval = self.interval + Duration::from_secs(self.interval_spread() - 1);
        self.idle + Duration::from_secs(self.idle_spread()) + longest_interval * self.count
    }

    /// The keepalive of one connection: the idle time and the probe interval each lengthened by
    /// a random part of their spread (whole seconds, as the socket options take them).
    ///
    /// Connections accepted together go idle together, and the kernel's coarse timers (seconds
    /// apart at these lengths) fire their probes in one burst; a burst larger than a queue on
    /// the way loses most of it. On loopback that queue is one CPU's 1,000-packet input
    /// backlog. Worse, connections that once probe together stay in step, because each timer
    /// is re-armed from the moment it fired, and steps only ever merge. With every connection's
    /// idle time drawn from one interval (10 values), 18,000 idle connections still fell into
    /// bursts of several thousand after a few minutes and lost 3,343 healthy peers in a 10-minute
    /// soak. Drawn from a quarter of the idle time, with the interval drawn too, it lost 45.
    /// Drawn from half of it (30 values by default), the bursts are half as large again. The
    /// interval's spread has the probes a burst lost retried at different moments rather than
    /// in the same burst again, which is what lost peers for good.
    pub fn spread(&self) -> Keepalive {
        self.spread_by(crate::random::random_u64())
    }

    /// [`Keepalive::spread`] for one random draw: its low 32 bits pick the idle time's part of
    /// its spread, its high 32 bits the interval's.
    fn spread_by(&self, random: u64) -> Keepalive {
        let idle = self.idle + Duration::from_secs(random % self.idle_spread());
        let interval = self.interval + Duration::from_secs((random >> 32) % self.interval_spread());
        Keepalive { idle, interval, count: self.count }
    }

    /// Sets one accepted socket's keepalive idle time and probe interval to `self`'s (its other
    /// options are inherited from the listener).
    pub fn set_times(&self, socket: SockRef<'_>) -> io::Result<()> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            set_seconds(&socket, libc::TCP_KEEPIDLE, self.idle)?;
            set_seconds(&socket, libc::TCP_KEEPINTVL, self.interval)
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            socket.set_tcp_keepalive(&TcpKeepalive::new().with_time(self.idle).with_interval(self.interval))
        }
    }
}

/// One `IPPROTO_TCP` socket option in whole seconds: one system call (socket2's keepalive call
/// sets every keepalive option at once).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_seconds(socket: &SockRef<'_>, option: libc::c_int, value: Duration) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let secs = libc::c_int::try_from(value.as_secs()).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads one c_int from a pointer to a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            option,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
        // 77 s + 38 s of spread (a half), then 4 probes at up to 7 + 2 s.
        assert_eq!(keepalive.detection_time(), Duration::from_secs(77 + 38 + 4 * 9));
        let spread = keepalive.spread();
        spread.set_times(SockRef::from(&stream)).unwrap();
        #[cfg(target_os = "linux")]
        {
            assert_eq!(socket.tcp_keepalive_time().unwrap(), spread.idle);
            assert_eq!(socket.tcp_keepalive_interval().unwrap(), spread.interval);
        }
    }

    /// Each connection's idle time and probe interval can take every value of their spread (so
    /// connections accepted together do not probe in step), and never pass the detection bound.
    /// The draws are enumerated, not sampled, so the test cannot miss a value by chance.
    #[test]
    fn keepalive_times_are_spread_within_the_detection_bound() {
        let cases = [(60, 10, 3), (2, 1, 3), (77, 7, 4), (1, 1, 1), (600, 30, 5)];
        for (idle, interval, count) in cases {
            let k =
                Keepalive { idle: Duration::from_secs(idle), interval: Duration::from_secs(interval), count };
            let idle_spread = (idle / 2).max(interval).max(1);
            let interval_spread = (interval / 2).max(1);
            let mut idles = std::collections::BTreeSet::new();
            let mut intervals = std::collections::BTreeSet::new();
            let draws = (0..idle_spread)
                .flat_map(|low| (0..interval_spread).map(move |high| (high << 32) | low))
                .chain([0, u64::MAX, u64::from(u32::MAX), u64::MAX << 32]);
            for random in draws {
                let s = k.spread_by(random);
                assert!(s.idle >= k.idle && s.interval >= k.interval && s.count == count, "{s:?}");
                assert!(
                    s.idle + s.interval * count <= k.detection_time(),
                    "{s:?} past {:?}",
                    k.detection_time()
                );
                idles.insert(s.idle.as_secs() - idle);
                intervals.insert(s.interval.as_secs() - interval);
            }
            assert_eq!(idles, (0..idle_spread).collect(), "idle {idle} s");
            assert_eq!(intervals, (0..interval_spread).collect(), "interval {interval} s");
            for _ in 0..1_000 {
                let s = k.spread();
                assert!(s.idle >= k.idle && s.idle + s.interval * count <= k.detection_time(), "{s:?}");
            }
        }
        let defaults =
            Keepalive { idle: Duration::from_secs(60), interval: Duration::from_secs(10), count: 3 };
        assert_eq!(defaults.detection_time(), Duration::from_secs(132), "the documented default bound");
        let chaos = Keepalive { idle: Duration::from_secs(2), interval: Duration::from_secs(1), count: 3 };
        assert_eq!(chaos.detection_time(), Duration::from_secs(6), "the chaos suite's bound");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn unacknowledged_bytes_are_read_on_linux() {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        assert_eq!(unacknowledged_bytes(&client), Some(0));
    }
}
