//! One client's whole life: from the accepted socket to the close, in one task.
//!
//! # How a connection echoes
//!
//! The echo is `tokio::io::copy_bidirectional` between the client socket and an in-memory loop
//! (`tokio::io::SimplexStream`): whatever the copy writes into the loop it reads back out and
//! writes to the client. The loop is what makes the semantics fall out of the copy for free:
//!
//! * **order and exactly-once**: one byte stream through two FIFO copies;
//! * **half-close**: when the client's FIN arrives the copy shuts the loop down; the loop then
//!   drains what it still holds, reports EOF, and the copy shuts down our side of the socket, so
//!   the client reads everything and then a clean EOF;
//! * **backpressure**: the loop holds at most one buffer's worth. A client that sends but never
//!   reads fills its receive window, our writes stall, the loop fills, the copy stops reading, and
//!   the client's own send window closes. Memory per connection stays bounded.
//!
//! # Phases: no buffers while idle, bigger buffers for bulk traffic
//!
//! `copy_bidirectional` allocates (and zero-fills) its buffers as soon as it first runs and holds
//! them until it ends, so a literal "one copy per connection" pins two buffers and a loop for every
//! idle client. The IOCP servers echod descends from posted zero-byte receives for the same reason.
//! Here a connection alternates between two phases:
//!
//! 1. **waiting**: no buffers; the task sleeps on socket readiness (and the idle deadline);
//! 2. **copying**: a `copy_bidirectional_with_sizes` runs with buffers of the current size.
//!
//! A copy phase ends early only at a point where doing so loses nothing: when every byte received
//! has also been sent (`received == sent`), both copy buffers and the loop are empty. Two things end
//! it there:
//!
//! * a once-a-tick check that finds no traffic since the previous tick: the buffers are freed and
//!   the connection goes back to waiting;
//! * a read that filled the whole buffer (the client sends faster than one buffer per read): the
//!   [`Metered`] reader stops the copy at the next balanced read, and the next phase runs with
//!   buffers four times larger, up to [`MAX_BUFFER`].
//!
//! The same tick publishes the connection's byte counts to the shared metrics, so counters are
//! live (at most a tick stale) without a shared atomic being touched on every read.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, SimplexStream};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::debug;

use crate::metrics::{CloseReason, Published};
use crate::server::Shared;

/// Buffer size a connection starts with: one page, enough for typical request/response sizes.
pub const INITIAL_BUFFER: usize = 4 * 1024;

/// Largest buffer a connection grows to. Large reads and writes cut syscalls per MiB for bulk
/// streams; the loop and two copy buffers bound a connection's echo memory at three times this.
pub const MAX_BUFFER: usize = 256 * 1024;

/// How often a copying connection publishes its byte counts, checks whether it went quiet, and
/// checks for the forced close at the end of a drain.
const TICK: Duration = Duration::from_secs(1);

/// Serves one accepted client until it closes, fails, idles out, or the server forces a close.
///
/// `permit` is this connection's slot under `--max-connections`; it is released when the task
/// ends, which is what lets the listener accept the next client. Everything the connection needs
/// is moved into one struct here, outside the async body, so the task stores each piece once.
pub(crate) fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
) -> impl Future<Output = ()> + Send {
    let started = Instant::now();
    let connection = Connection {
        stream,
        peer,
        _permit: permit,
        shared,
        traffic: Traffic::default(),
        published: Published::default(),
        buffer: INITIAL_BUFFER,
        started,
        last_activity: started,
    };
    connection.run()
}

/// Byte counts and flags of one connection, shared between the copy (which writes them) and
/// the task's tick (which reads them). Only the connection's own task touches them, so the
/// atomics are uncontended: single-writer loads and stores, no read-modify-write.
#[derive(Default)]
struct Traffic {
    received: AtomicU64,
    sent: AtomicU64,
    /// The client's FIN has been read: the copy is finishing and must not be interrupted.
    eof: AtomicBool,
    /// A read filled the whole buffer: grow at the next balanced point.
    grow: AtomicBool,
    /// The loop's reader last returned `Pending` (it is parked, with no waker; see [`Loop`]).
    reader_parked: AtomicBool,
    /// Data or EOF reached the loop while its reader was parked: poll the copy again.
    reader_wanted: AtomicBool,
}

impl Traffic {
    fn add(counter: &AtomicU64, n: usize) {
        counter.store(counter.load(Relaxed) + n as u64, Relaxed);
    }

    fn totals(&self) -> (u64, u64) {
        (self.received.load(Relaxed), self.sent.load(Relaxed))
    }

    /// Every byte received has been echoed: nothing is buffered anywhere in the connection.
    fn balanced(&self) -> bool {
        let (received, sent) = self.totals();
        received == sent
    }
}

/// Why a copy phase ended without an error from the client.
enum PhaseEnd {
    /// Both directions finished: the client closed and got everything back.
    Finished,
    /// A read filled the buffer; start again with bigger buffers.
    Grow,
    /// No traffic for a tick and nothing buffered; free the buffers and wait.
    Quiet,
    /// Closed by the server: idle timeout or shutdown.
    Closed(CloseReason),
    /// The socket failed.
    Failed(io::Error),
}

/// One client's connection and everything its task owns.
struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
    traffic: Traffic,
    published: Published,
    /// Buffer size of the next copy phase.
    buffer: usize,
    started: Instant,
    /// The latest moment traffic was seen (or a tick that noticed it): the idle clock's start.
    last_activity: Instant,
}

impl Connection {
    async fn run(mut self) {
        self.shared.metrics.connection_opened();
        let reason = self.echo().await;
        let (received, sent) = self.traffic.totals();
        let lifetime = self.started.elapsed();
        self.shared.metrics.connection_closed(&mut self.published, reason, received, sent, lifetime);
        debug!(peer = %self.peer, received, sent, duration = ?lifetime, reason = reason.as_str(), "connection closed");
    }

    /// Alternates waiting and copying phases until the connection ends; returns why it ended.
    async fn echo(&mut self) -> CloseReason {
        loop {
            if let Some(reason) = self.wait_for_data().await {
                return reason;
            }
            // Boxed: the copy's state (buffers' headers, loop, timer) exists only while copying,
            // so a waiting connection's task stays small.
            let end = Box::pin(self.copy_phase()).await;
            // A phase can end between ticks (at a growth point); publish what it moved so the
            // counters stay live while the connection waits.
            self.publish();
            match end {
                PhaseEnd::Finished => return CloseReason::Eof,
                PhaseEnd::Grow => self.buffer = (self.buffer * 4).min(MAX_BUFFER),
                PhaseEnd::Quiet => {}
                PhaseEnd::Closed(reason) => return reason,
                PhaseEnd::Failed(err) => return CloseReason::from_io_error(&err),
            }
        }
    }

    fn publish(&mut self) {
        let (received, sent) = self.traffic.totals();
        self.shared.metrics.publish(&mut self.published, received, sent);
    }

    /// The waiting phase: no buffers held. Returns `None` once the socket is readable (data,
    /// FIN or RST: the copy phase will tell which), or the reason to close instead.
    ///
    /// Written with `poll_read_ready`, which parks the task's waker in the socket's own
    /// registration, rather than a `readable()` future carrying a waiter of its own: this state
    /// is what every idle connection holds, so every byte of it counts.
    async fn wait_for_data(&mut self) -> Option<CloseReason> {
        let mut idle =
            self.shared.idle_timeout.map(|t| Box::pin(tokio::time::sleep_until(self.last_activity + t)));
        let mut force_close = std::pin::pin!(self.shared.force_close.cancelled());
        let stream = &self.stream;
        let ready = std::future::poll_fn(|cx| {
            if force_close.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(CloseReason::Shutdown));
            }
            if let Some(idle) = idle.as_mut() {
                if idle.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(CloseReason::IdleTimeout));
                }
            }
            stream.poll_read_ready(cx).map(|ready| ready.map_err(|err| CloseReason::from_io_error(&err)))
        })
        .await;
        match ready {
            Ok(()) => {
                self.last_activity = Instant::now();
                None
            }
            Err(reason) => Some(reason),
        }
    }

    /// The copying phase: `copy_bidirectional` between the socket and the loop, watched by a tick
    /// that publishes counts, enforces the idle timeout and ends the phase when traffic stops.
    async fn copy_phase(&mut self) -> PhaseEnd {
        let Connection { stream, traffic, shared, published, last_activity, buffer, .. } = self;
        let size = *buffer;
        let mut client = Metered::new(stream, traffic, size < MAX_BUFFER);
        let mut echo_loop = Loop { inner: SimplexStream::new_unsplit(size), traffic };
        let copy = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut echo_loop, size, size);
        tokio::pin!(copy);

        let tick = shared.idle_timeout.map_or(TICK, |t| (t / 4).clamp(Duration::from_millis(10), TICK));
        let mut ticker = tokio::time::interval_at(Instant::now() + tick, tick);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut seen = traffic.totals();
        // The forced close at the end of a drain is checked on the tick rather than raced here:
        // a cancellation future locks the token's shared mutex every time it is polled, and
        // this is polled on every wake of every busy connection.
        std::future::poll_fn(|cx| {
            let mut polls = 0;
            loop {
                if let Poll::Ready(result) = copy.as_mut().poll(cx) {
                    return Poll::Ready(match result {
                        Ok(_) => PhaseEnd::Finished,
                        Err(err) if GrowPoint::is(&err) => PhaseEnd::Grow,
                        Err(err) => PhaseEnd::Failed(err),
                    });
                }
                // Bytes reached the loop after its reader parked (see `Loop`): poll again now,
                // which is what a wake would have done, minus the trip through the scheduler.
                if !traffic.reader_wanted.load(Relaxed) {
                    break;
                }
                polls += 1;
                if polls == MAX_REPOLLS {
                    cx.waker().wake_by_ref();
                    break;
                }
            }
            while ticker.poll_tick(cx).is_ready() {
                let now = traffic.totals();
                shared.metrics.publish(published, now.0, now.1);
                if shared.force_close.is_cancelled() {
                    return Poll::Ready(PhaseEnd::Closed(CloseReason::Shutdown));
                }
                if now != seen {
                    seen = now;
                    *last_activity = Instant::now();
                } else if shared.idle_timeout.is_some_and(|t| last_activity.elapsed() >= t) {
                    return Poll::Ready(PhaseEnd::Closed(CloseReason::IdleTimeout));
                } else if traffic.balanced() && !traffic.eof.load(Relaxed) {
                    return Poll::Ready(PhaseEnd::Quiet);
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// Polls of the copy in a row before yielding to the scheduler anyway.
const MAX_REPOLLS: u32 = 8;

/// The in-memory loop (a `SimplexStream`), with its reader parked without a waker.
///
/// The loop's only writer is the copy's client-to-loop direction, in the same task as its reader.
/// Were the reader to park with the task's waker, every write into the loop would wake the very
/// task that is running, and the scheduler would poll it once more for nothing: one extra poll
/// per message. Instead the reader parks with a no-op waker, and a write or EOF that arrives while
/// it is parked sets `reader_wanted`, on which the copy phase polls the copy again at once. The
/// writer side keeps the real waker: when the loop is full, the reader making room must wake it.
struct Loop<'a> {
    inner: SimplexStream,
    traffic: &'a Traffic,
}

impl Loop<'_> {
    fn note_input(&self) {
        if self.traffic.reader_parked.load(Relaxed) {
            self.traffic.reader_wanted.store(true, Relaxed);
        }
    }
}

impl AsyncRead for Loop<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut parked = Context::from_waker(Waker::noop());
        let result = Pin::new(&mut self.inner).poll_read(&mut parked, buf);
        let traffic = self.traffic;
        traffic.reader_parked.store(result.is_pending(), Relaxed);
        traffic.reader_wanted.store(false, Relaxed);
        result
    }
}

impl AsyncWrite for Loop<'_> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.note_input();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_shutdown(cx);
        if result.is_ready() {
            self.note_input();
        }
        result
    }
}

/// The error a [`Metered`] reader returns to stop a copy at a safe point so it can restart with
/// bigger buffers. It never leaves this module.
#[derive(Debug)]
struct GrowPoint;

impl GrowPoint {
    fn error() -> io::Error {
        io::Error::other(GrowPoint)
    }

    fn is(err: &io::Error) -> bool {
        err.get_ref().is_some_and(|inner| inner.is::<GrowPoint>())
    }
}

impl std::fmt::Display for GrowPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("buffer growth point")
    }
}

impl std::error::Error for GrowPoint {}

/// The client socket as the copy sees it: counts bytes in [`Traffic`], notes EOF, and notices
/// reads that fill the whole buffer.
struct Metered<'a> {
    stream: &'a mut TcpStream,
    traffic: &'a Traffic,
    can_grow: bool,
}

impl<'a> Metered<'a> {
    fn new(stream: &'a mut TcpStream, traffic: &'a Traffic, can_grow: bool) -> Self {
        traffic.grow.store(false, Relaxed);
        Metered { stream, traffic, can_grow }
    }
}

impl AsyncRead for Metered<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let traffic = self.traffic;
        // A read with everything echoed is the safe point to end the copy: both buffers and
        // the loop are empty, so dropping the copy loses nothing.
        if traffic.grow.load(Relaxed) && traffic.balanced() {
            return Poll::Ready(Err(GrowPoint::error()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut *self.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let n = buf.filled().len() - before;
            if n == 0 {
                traffic.eof.store(true, Relaxed);
            } else {
                Traffic::add(&traffic.received, n);
                if self.can_grow && buf.remaining() == 0 && before == 0 {
                    traffic.grow.store(true, Relaxed);
                }
            }
        }
        result
    }
}

impl AsyncWrite for Metered<'_> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut *self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            Traffic::add(&self.traffic.sent, n);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use tokio::sync::Semaphore;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::metrics::ServerMetrics;

    /// The task of an idle connection is what every held connection costs (besides the kernel's
    /// socket): keep it small. The copy phase's state is boxed and exists only while copying.
    #[tokio::test]
    async fn a_connection_task_is_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let shared = Arc::new(Shared {
            limit: Arc::new(Semaphore::new(1)),
            tracker: TaskTracker::new(),
            force_close: CancellationToken::new(),
            idle_timeout: None,
            tcp_keepalive: None,
            metrics: ServerMetrics::new(None, 1),
            draining: AtomicBool::new(false),
            listeners_closed: CancellationToken::new(),
        });
        let permit = shared.limit.clone().acquire_owned().await.unwrap();
        let task = serve(stream, peer, permit, shared);
        let size = std::mem::size_of_val(&task);
        println!("connection task future: {size} bytes");
        assert!(size <= 600, "connection task future is {size} bytes");
        drop((task, client));
    }
}
