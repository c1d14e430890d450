//! Connecting, closing, and the host limits a load client runs into: open files, ephemeral
//! ports and the connection-tracking table.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use echod::net::read_ahead::ReadAhead;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::conn::{read_banner, Conn, ExpectBanner};
use crate::proxy::Proxy;
use crate::run::timed;
use crate::stats::{ErrorKind, Failure, Stats};
use crate::tls::Tls;

/// Opens client connections to one target, and makes each ready for the echo: the PROXY
/// header, the TLS handshake and the banner, as asked.
#[derive(Debug, Clone)]
pub struct Connector {
    target: SocketAddr,
    /// Spread source addresses over 127.0.0.2..=127.0.0.254 (only for a 127.x target on Linux).
    spread: bool,
    timeout: Duration,
    pub proxy: Option<Proxy>,
    pub tls: Option<Tls>,
    pub banner: Option<ExpectBanner>,
}

/// A connection ready for the echo.
pub struct Opened {
    pub conn: Conn,
    /// When the TLS handshake (if any) was done.
    pub handshaken: Instant,
}

/// How many loopback source addresses connections are spread over: 127.0.0.2 ..= 127.0.0.254.
const SPREAD_ADDRS: u64 = 253;

impl Connector {
    pub fn new(target: SocketAddr, spread: bool, timeout: Duration) -> Connector {
        let spread =
            spread && cfg!(target_os = "linux") && matches!(target.ip(), IpAddr::V4(ip) if ip.is_loopback());
        Connector { target, spread, timeout, proxy: None, tls: None, banner: None }
    }

    /// Whether connections get spread source addresses.
    pub fn spreads(&self) -> bool {
        self.spread
    }

    /// The source address connection `id` binds to, if sources are spread.
    fn source(&self, id: u64) -> Option<SocketAddr> {
        self.spread.then(|| {
            let last = 2 + (id % SPREAD_ADDRS) as u8;
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0)
        })
    }

    /// Connects connection `id` (bounded by the I/O timeout), with TCP_NODELAY set.
    pub async fn connect(&self, id: u64) -> io::Result<TcpStream> {
        let fut = async {
            let stream = match self.source(id) {
                Some(source) => {
                    let socket = bound_socket(source)?;
                    socket.connect(self.target).await?
                }
                None => TcpStream::connect(self.target).await?,
            };
            stream.set_nodelay(true)?;
            Ok(stream)
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", self.timeout),
            )),
        }
    }

    /// Connects connection `id` and makes it ready for the echo: sends the PROXY header, makes
    /// the TLS handshake, reads and checks the banner (counted in `stats` whatever it says).
    /// Counts the connection in `stats` once TCP is connected.
    pub async fn open(&self, id: u64, stats: &Stats) -> Result<Opened, Failure> {
        let mut tcp = self
            .connect(id)
            .await
            .map_err(|e| Failure::new(ErrorKind::Connect, format!("connection {id}: connect: {e}")))?;
        stats.connections.fetch_add(1, Relaxed);
        if let Some(proxy) = &self.proxy {
            let header = proxy.header(id, self.target).map_err(|e| Failure::new(ErrorKind::Io, e))?;
            timed(id, "PROXY header", self.timeout, tcp.write_all(&header)).await?;
        }
        let mut conn = match &self.tls {
            None => Conn::Tcp(tcp),
            Some(tls) => {
                let handshake = tls.connector.connect(tls.name.clone(), ReadAhead::new(tcp));
                match tokio::time::timeout(self.timeout, handshake).await {
                    Ok(Ok(stream)) => {
                        stats.tls_version(stream.get_ref().1.protocol_version());
                        Conn::Tls(Box::new(stream))
                    }
                    Ok(Err(e)) => {
                        return Err(Failure::new(
                            ErrorKind::Tls,
                            format!("connection {id}: TLS handshake: {e}"),
                        ));
                    }
                    Err(_) => {
                        return Err(Failure::new(
                            ErrorKind::Timeout,
                            format!("connection {id}: TLS handshake: no progress for {:?}", self.timeout),
                        ));
                    }
                }
            }
        };
        let handshaken = Instant::now();
        if let Some(expect) = &self.banner {
            let (text, verdict) = read_banner(&mut conn, id, self.timeout, expect).await?;
            stats.banner(&text);
            verdict?;
        }
        Ok(Opened { conn, handshaken })
    }
}

/// A non-blocking socket bound to `source` whose port is picked at connect time
/// (IP_BIND_ADDRESS_NO_PORT), so every source address has the whole ephemeral range for each
/// destination instead of reserving a port at bind time.
fn bound_socket(source: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(source), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let one: libc::c_int = 1;
        // SAFETY: a valid socket descriptor and a correctly sized c_int option value.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    socket.bind(&source.into())?;
    Ok(tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket)))
}

/// Files the client keeps for itself besides connections (stdio, epoll, eventfds, …).
pub const FILE_RESERVE: u64 = 64;

/// This client never holds more than this many files, whatever the limit says.
pub const FILE_CEILING: u64 = 20_000;

/// Fails when `connections` sockets (plus the reserve) would not fit under the open-files limit.
pub fn check_open_files(connections: u64, limit: Option<u64>) -> Result<(), String> {
    let needed = connections + FILE_RESERVE;
    if needed > FILE_CEILING {
        return Err(format!(
            "{connections} connections need {needed} open files, over this client's ceiling of {FILE_CEILING}: run several clients"
        ));
    }
    match limit {
        Some(limit) if needed > limit => Err(format!(
            "{connections} connections need {needed} open files but RLIMIT_NOFILE is {limit} (raise the hard limit, e.g. ulimit -Hn)"
        )),
        _ => Ok(()),
    }
}

/// The connection-tracking table's use: (entries, capacity), if the host tracks connections.
pub fn conntrack_usage() -> Option<(u64, u64)> {
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/proc/sys/net/netfilter/{name}")).ok()?.trim().parse().ok()
    };
    let max = read("nf_conntrack_max")?;
    let count = read("nf_conntrack_count")?;
    (max > 0).then_some((count, max))
}

/// Fails when the connection-tracking table is fuller than `limit` (a fraction of capacity).
/// A full table makes the kernel drop new connections on the whole host, not just ours.
pub fn check_conntrack(limit: f64) -> Result<(), String> {
    match conntrack_usage() {
        Some((count, max)) if count as f64 > limit * max as f64 => Err(format!(
            "connection-tracking table at {count} of {max} entries (over {:.0}%): stopping before the kernel starts dropping connections; wait for entries to expire (10 s after a RST, 120 s after a FIN)",
            limit * 100.0
        )),
        _ => Ok(()),
    }
}
