//! UDP echo (RFC 862's datagram half): `udp://ADDR` listeners.
//!
//! Every datagram, 1 to 65,507 bytes over IPv4 and up to 65,527 over IPv6, is sent back to its
//! source address and port, unchanged, as one datagram, at most once: one reply per datagram,
//! never larger, so echod amplifies nothing. What it refuses, counted in
//! `echod_udp_datagrams_dropped_total{reason}`:
//!
//! * `reserved_port`: a source port below 1024. Such datagrams come from services (echo,
//!   chargen, daytime, DNS, NTP, ...), and answering one service with another is how endless
//!   loops between two servers start: a spoofed datagram "from" another echo server's port 7
//!   would bounce between the two for ever.
//! * `rate_limited`: more than `--udp-rate-limit` datagrams per second from one source (an IPv4
//!   address, an IPv6 /64); see [`limiter`], whose table is bounded whatever the number of
//!   sources. With source addresses spoofed, this is what keeps echod from flooding a victim.
//! * `denied`: a source outside `--allow` (when any is given) or inside a `--deny`, the same
//!   rules the stream listeners apply (see [`crate::access`]): never answered, and logged at
//!   most once per 5 s. The lookup is a binary search over merged ranges, allocating nothing.
//! * `send_error`: the reply could not be sent; a send that would block is given up at once,
//!   never queued.
//!
//! # Loops
//!
//! Each listener runs one receive loop per runtime worker, and each loop allocates its buffers
//! once ([`socket::Batch`], [`socket::BATCH`] slots of [`socket::SLOT`] bytes): no allocation per
//! datagram. On Linux every loop has a socket of its own, bound to the same address with
//! `SO_REUSEPORT`, and the kernel spreads clients over them by address and port; elsewhere a
//! listener has one socket and one loop (see [`UdpListener::bind`] for why). A loop receives a
//! batch, decides for each datagram, answers the batch and adds the batch's counts to the
//! metrics (counts are per batch, never per datagram).
//!
//! A listener stops answering when the stream listeners close during a drain (UDP has no
//! connections to wait for): its loops are ended and its sockets closed.

pub mod limiter;
pub mod socket;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::access::Rules;
use crate::config::ListenSpec;
use crate::metrics::{ServerMetrics, UdpCounters, UdpDrop, UdpTally};
use limiter::Limiter;
use socket::Batch;

/// Source ports below this are services' ports: their datagrams are never answered.
pub const FIRST_CLIENT_PORT: u16 = 1024;

/// Pause after an unexpected receive error, so a persistent one cannot spin a worker.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// Least time between two logs of receive errors of one loop.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(5);

/// What every UDP loop shares.
pub struct Shared {
    limiter: Option<Limiter>,
    /// `--allow` / `--deny`, when any rule is set.
    rules: Option<Rules>,
    denied_log: DeniedLog,
}

impl Shared {
    /// The state of `--udp-rate-limit` (`None`: off) and of the access rules.
    pub fn new(rate_limit: Option<u32>, rules: Rules) -> Shared {
        Shared {
            limiter: rate_limit.map(Limiter::new),
            rules: rules.any().then_some(rules),
            denied_log: DeniedLog::default(),
        }
    }

    /// Whether datagrams from `source` may be answered by the access rules (an IPv4-mapped IPv6
    /// source matches IPv4 rules). What they refuse is counted as `denied`.
    #[inline]
    pub fn access(&self, source: &SocketAddr) -> bool {
        self.rules.as_ref().is_none_or(|rules| rules.admits(source.ip()))
    }

    /// Sources the rate limiter tracks now (0 with the limit off).
    pub fn tracked_sources(&self) -> usize {
        self.limiter.as_ref().map_or(0, Limiter::tracked)
    }

    /// Decides every datagram of a batch that arrived at `now`: which to answer, and why the
    /// others are dropped. Returns the first source the access rules refused, if any.
    fn judge(&self, batch: &mut Batch, now: Instant, tally: &mut UdpTally) -> Option<SocketAddr> {
        let clock = self.limiter.as_ref().map(|l| l.clock(now));
        let mut denied = None;
        for i in 0..batch.received() {
            tally.received += 1;
            tally.bytes_received += batch.datagram_len(i) as u64;
            if !batch.whole(i) {
                tally.dropped[UdpDrop::SendError as usize] += 1;
                continue;
            }
            let source = batch.source(i);
            let verdict = if source.port() < FIRST_CLIENT_PORT {
                Some(UdpDrop::ReservedPort)
            } else if !self.access(&source) {
                denied = denied.or(Some(source));
                Some(UdpDrop::Denied)
            } else if let (Some(limiter), Some(now)) = (&self.limiter, clock) {
                (!limiter.admit(&source, now)).then_some(UdpDrop::RateLimited)
            } else {
                None
            };
            if let Some(why) = verdict {
                tally.dropped[why as usize] += 1;
                batch.drop_datagram(i);
            }
        }
        denied
    }

    /// Notes a batch's denied datagrams (`first` among them) for the refusal log.
    fn note_denied(&self, first: Option<SocketAddr>, tally: &UdpTally, listener: &str) {
        if let Some(source) = first {
            self.denied_log.note(tally.dropped[UdpDrop::Denied as usize], source, listener);
        }
    }
}

/// At most one log line every [`ERROR_LOG_EVERY`] about denied datagrams, for all loops together,
/// with the count since the last line. Touched once per batch that had denials.
#[derive(Default)]
struct DeniedLog {
    last_ms: AtomicU64,
    since: AtomicU64,
}

impl DeniedLog {
    fn note(&self, count: u64, source: SocketAddr, listener: &str) {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let every = ERROR_LOG_EVERY.as_millis() as u64;
        // Offset by one period, so the first denial is logged at once.
        let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + every;
        let total = self.since.fetch_add(count, Relaxed) + count;
        let last = self.last_ms.load(Relaxed);
        if now >= last + every && self.last_ms.compare_exchange(last, now, Relaxed, Relaxed).is_ok() {
            self.since.store(0, Relaxed);
            warn!(
                reason = "denied",
                client = %source,
                listener,
                refused = total,
                "refusing datagrams (logged at most every 5 s)"
            );
        }
    }
}

/// One bound `udp://` listener: its sockets, one per loop.
pub struct UdpListener {
    /// The listener as given, with its bound address.
    pub spec: ListenSpec,
    sockets: Vec<socket2::Socket>,
    counters: Arc<UdpCounters>,
}

impl UdpListener {
    /// Binds `spec` for `loops` receive loops with `buffer`-byte socket buffers, and registers
    /// its metrics (exported from then on, at 0). A busy address fails here, naming it (through
    /// the caller).
    pub fn bind(
        spec: &ListenSpec,
        loops: usize,
        buffer: usize,
        metrics: &ServerMetrics,
    ) -> io::Result<UdpListener> {
        // Off Linux there is no SO_REUSEPORT to give each loop a socket, and loops sharing one
        // socket measured worse than one loop alone (under Wine: a fifth of the rate, and
        // sends refused as would-block while another loop sends), so there is one loop.
        let loops = if cfg!(target_os = "linux") { loops.max(1) } else { 1 };
        let per_loop = loops > 1;
        let sockets = if per_loop {
            // SO_REUSEPORT would let these sockets join a group another process of this user
            // already bound: a socket without it goes first and fails if the address is busy,
            // and its port is the one the group takes (port 0 resolved).
            let addr = {
                let (probe, _) = socket::bind(spec.addr, buffer, false)?;
                local_addr(&probe)?
            };
            let mut sockets = Vec::with_capacity(loops);
            for _ in 0..loops {
                let (socket, buffers) = socket::bind(addr, buffer, true)?;
                if sockets.is_empty() {
                    log_buffers(spec, &buffers);
                }
                sockets.push(socket);
            }
            sockets
        } else {
            let (socket, buffers) = socket::bind(spec.addr, buffer, false)?;
            log_buffers(spec, &buffers);
            vec![socket]
        };
        let spec = spec.with_addr(local_addr(&sockets[0])?);
        let counters = Arc::new(metrics.udp(&spec.label()));
        Ok(UdpListener { spec, sockets, counters })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.spec.addr
    }

    /// Starts the listener's receive loops. Dropping (or aborting) their tasks closes the
    /// sockets.
    pub fn serve(self, shared: Arc<Shared>) -> io::Result<Vec<JoinHandle<()>>> {
        let counters = self.counters;
        let label: Arc<str> = self.spec.to_string().into();
        let mut tasks = Vec::with_capacity(self.sockets.len());
        for socket in self.sockets {
            let socket = tokio::net::UdpSocket::from_std(socket.into())?;
            tasks.push(tokio::spawn(run(socket, shared.clone(), counters.clone(), label.clone())));
        }
        Ok(tasks)
    }
}

fn local_addr(socket: &socket2::Socket) -> io::Result<SocketAddr> {
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))
}

fn log_buffers(spec: &ListenSpec, buffers: &socket::Buffers) {
    if buffers.capped() {
        warn!(
            listener = %spec,
            requested = buffers.requested,
            receive = buffers.receive,
            send = buffers.send,
            "the kernel capped the UDP socket buffers below --udp-socket-buffer (Linux: raise net.core.rmem_max and net.core.wmem_max)"
        );
    } else {
        debug!(listener = %spec, receive = buffers.receive, send = buffers.send, "UDP socket buffers");
    }
}

/// Rate-limits one loop's logs of receive errors.
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn error(&mut self, listener: &str, err: &io::Error) {
        let now = Instant::now();
        if self.last.is_some_and(|at| now - at < ERROR_LOG_EVERY) {
            self.suppressed += 1;
            return;
        }
        warn!(listener, error = %err, suppressed = self.suppressed, "UDP receive failed; retrying");
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// Whether a receive error is just "nothing more to read" or an interruption.
fn transient(err: &io::Error) -> bool {
    matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

/// One receive loop (Linux): wait for readability, receive a batch, judge it, answer it, count
/// it. Ends only when its task is aborted.
#[cfg(target_os = "linux")]
async fn run(
    socket: tokio::net::UdpSocket,
    shared: Arc<Shared>,
    counters: Arc<UdpCounters>,
    listener: Arc<str>,
) {
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;

    let mut batch = Batch::new();
    let mut errors = ErrorLog { last: None, suppressed: 0 };
    let fd = socket.as_raw_fd();
    debug!(listener = %listener, "UDP loop started");
    loop {
        // Waiting for readiness does not count against the task's budget: this makes sure the
        // loop yields to the worker's other tasks now and then even under a constant flood.
        tokio::task::consume_budget().await;
        if let Err(err) = socket.readable().await {
            errors.error(&listener, &err);
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        }
        let mut received = 0;
        let result = socket.try_io(Interest::READABLE, || {
            received = batch.recv(fd)?;
            // A short batch emptied the socket's queue: telling the runtime so (as
            // `WouldBlock`, which clears the socket's readiness) makes the loop wait for the
            // next datagram instead of asking the kernel again only to hear there is none. A
            // datagram that came in meanwhile has set the readiness again: nothing is lost.
            if received < socket::BATCH {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        match result {
            Err(err) if received == 0 && !transient(&err) => {
                errors.error(&listener, &err);
                tokio::time::sleep(ERROR_PAUSE).await;
            }
            _ if received > 0 => {
                let mut tally = UdpTally::default();
                let denied = shared.judge(&mut batch, Instant::now(), &mut tally);
                shared.note_denied(denied, &tally, &listener);
                let sent = batch.send(fd);
                sent.add_to(&mut tally);
                counters.add(&tally);
            }
            _ => {}
        }
    }
}

/// The receive loop (other platforms): the same, with a receive and a send per datagram.
#[cfg(not(target_os = "linux"))]
async fn run(
    socket: tokio::net::UdpSocket,
    shared: Arc<Shared>,
    counters: Arc<UdpCounters>,
    listener: Arc<str>,
) {
    let mut batch = Batch::new();
    let mut errors = ErrorLog { last: None, suppressed: 0 };
    debug!(listener = %listener, "UDP loop started");
    loop {
        // Waiting for readiness does not count against the task's budget: this makes sure a
        // socket that stays ready (an error the platform repeats) cannot hold the worker.
        tokio::task::consume_budget().await;
        if let Err(err) = socket.readable().await {
            errors.error(&listener, &err);
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        }
        match batch.recv(&socket) {
            // Readable, yet only errors that were skipped (Windows' reports of unreachable
            // ports): pause rather than spin on them.
            Ok(0) => tokio::time::sleep(ERROR_PAUSE).await,
            Ok(_) => {
                let mut tally = UdpTally::default();
                let denied = shared.judge(&mut batch, Instant::now(), &mut tally);
                shared.note_denied(denied, &tally, &listener);
                let sent = batch.send(&socket);
                sent.add_to(&mut tally);
                counters.add(&tally);
            }
            Err(err) if transient(&err) => {}
            Err(err) => {
                errors.error(&listener, &err);
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
}
