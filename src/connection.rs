//! One client's whole life: from the accepted socket to the close, in one task.
//!
//! # How a connection echoes
//!
//! The echo is `tokio::io::copy_bidirectional` between the client socket and an in-memory loop
//! (a bounded ring buffer, [`Loop`]): whatever the copy writes into the loop it reads back out and
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

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;
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
/// ends, which is what lets the listener accept the next client.
pub(crate) fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
) -> Connection {
    shared.metrics.connection_opened();
    let started = Instant::now();
    let phase = Phase::waiting(stream, &shared, started);
    Connection {
        shared,
        _permit: permit,
        peer,
        started,
        published: Published::default(),
        buffer: INITIAL_BUFFER,
        phase,
    }
}

pin_project! {
    /// One client's connection: the future its task runs.
    ///
    /// Written by hand rather than as an `async fn` because this is what every held connection
    /// costs in memory (besides the kernel's socket): the task stores exactly these fields, with
    /// the waiting phase's state in place and the copy phase's behind one box. The compiler's
    /// layout of the equivalent `async fn` was twice the size.
    #[project = ConnectionProj]
    pub(crate) struct Connection {
        shared: Arc<Shared>,
        _permit: OwnedSemaphorePermit,
        peer: SocketAddr,
        started: Instant,
        // Bytes received and sent as last published to the metrics. Between copy phases this is
        // the connection's whole total.
        published: Published,
        // Buffer size of the next copy phase.
        buffer: usize,
        #[pin]
        phase: Phase,
    }
}

/// What a copy phase hands back to the connection.
type CopyPhase = Pin<Box<dyn Future<Output = CopyOutcome> + Send>>;

pin_project! {
    #[project = PhaseProj]
    #[project_replace = PhaseTaken]
    enum Phase {
        // No buffers held: asleep on socket readiness, the forced close and the idle deadline.
        Waiting {
            stream: TcpStream,
            #[pin]
            force_close: WaitForCancellationFutureOwned,
            idle: Option<Pin<Box<Sleep>>>,
        },
        // A copy phase owns the socket until it ends.
        Copying { copy: CopyPhase },
        // Between phases, and after the close.
        Done,
    }
}

impl Phase {
    /// The waiting phase, with the idle clock running from `last_activity`.
    fn waiting(stream: TcpStream, shared: &Shared, last_activity: Instant) -> Phase {
        Phase::Waiting {
            stream,
            force_close: shared.force_close.clone().cancelled_owned(),
            idle: shared.idle_timeout.map(|t| Box::pin(tokio::time::sleep_until(last_activity + t))),
        }
    }
}

impl Future for Connection {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            let outcome = match this.phase.as_mut().project() {
                PhaseProj::Waiting { stream, force_close, idle } => {
                    let closing = if force_close.poll(cx).is_ready() {
                        Some(CloseReason::Shutdown)
                    } else if idle.as_mut().is_some_and(|idle| idle.as_mut().poll(cx).is_ready()) {
                        Some(CloseReason::IdleTimeout)
                    } else {
                        match stream.poll_read_ready(cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(Ok(())) => None,
                            Poll::Ready(Err(err)) => Some(CloseReason::from_io_error(&err)),
                        }
                    };
                    if let Some(reason) = closing {
                        return this.close(reason);
                    }
                    // Readable (data, FIN or RST: the copy will tell which): start copying.
                    let PhaseTaken::Waiting { stream, .. } = this.phase.as_mut().project_replace(Phase::Done)
                    else {
                        unreachable!("the phase was Waiting")
                    };
                    let copy = copy_phase(stream, this.shared.clone(), *this.published, *this.buffer);
                    this.phase.set(Phase::Copying { copy });
                    continue;
                }
                PhaseProj::Copying { copy } => match copy.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(outcome) => outcome,
                },
                PhaseProj::Done => return Poll::Ready(()),
            };
            *this.published = outcome.published;
            let last_activity = match outcome.end {
                PhaseEnd::Grow => {
                    *this.buffer = (*this.buffer * 4).min(MAX_BUFFER);
                    Instant::now()
                }
                PhaseEnd::Quiet => outcome.last_activity,
                PhaseEnd::Finished => return this.close(CloseReason::Eof),
                PhaseEnd::Closed(reason) => return this.close(reason),
                PhaseEnd::Failed(err) => return this.close(CloseReason::from_io_error(&err)),
            };
            this.phase.set(Phase::waiting(outcome.stream, this.shared, last_activity));
        }
    }
}

impl ConnectionProj<'_> {
    /// Ends the connection: drops the socket if the phase still holds it (a copy phase's outcome
    /// has already been dropped by then) and records the close.
    fn close(&mut self, reason: CloseReason) -> Poll<()> {
        self.phase.set(Phase::Done);
        let Published { received, sent } = *self.published;
        let lifetime = self.started.elapsed();
        self.shared.metrics.connection_closed(self.published, reason, received, sent, lifetime);
        debug!(peer = %self.peer, received, sent, duration = ?lifetime, reason = reason.as_str(), "connection closed");
        Poll::Ready(())
    }
}

/// Byte counts and flags of one connection, shared between the copy (which writes them) and
/// the task's tick (which reads them). Only the connection's own task touches them, so the
/// atomics are uncontended: single-writer loads and stores, no read-modify-write.
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
    /// The loop's writer last returned `Pending`: the loop was full.
    writer_parked: AtomicBool,
    /// The reader made room while the writer was parked: poll the copy again.
    writer_wanted: AtomicBool,
}

impl Traffic {
    /// Counts continuing from the connection's totals so far.
    fn new(totals: Published) -> Traffic {
        Traffic {
            received: AtomicU64::new(totals.received),
            sent: AtomicU64::new(totals.sent),
            eof: AtomicBool::new(false),
            grow: AtomicBool::new(false),
            reader_parked: AtomicBool::new(false),
            reader_wanted: AtomicBool::new(false),
            writer_parked: AtomicBool::new(false),
            writer_wanted: AtomicBool::new(false),
        }
    }

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

/// A finished copy phase: the socket back, why it ended, and the counts it published.
struct CopyOutcome {
    stream: TcpStream,
    end: PhaseEnd,
    published: Published,
    last_activity: Instant,
}

/// The copying phase: `copy_bidirectional` between the socket and the loop, watched by a tick
/// that publishes counts, enforces the idle timeout and ends the phase when traffic stops.
///
/// The phase owns the socket and everything the copy borrows, in one allocation that exists only
/// while copying, and gives the socket back when it ends.
fn copy_phase(
    mut stream: TcpStream,
    shared: Arc<Shared>,
    mut published: Published,
    size: usize,
) -> CopyPhase {
    Box::pin(async move {
        let traffic = Traffic::new(published);
        let mut last_activity = Instant::now();
        let end = {
            let mut client = Metered::new(&mut stream, &traffic, size < MAX_BUFFER);
            let mut echo_loop = Loop::new(size, &traffic);
            // Pinned in place and handed on by reference: passed by value, the copy's state would
            // be stored twice in this future (once as the argument, once pinned).
            let copy = std::pin::pin!(tokio::io::copy_bidirectional_with_sizes(
                &mut client,
                &mut echo_loop,
                size,
                size
            ));
            let tick = shared.idle_timeout.map_or(TICK, |t| (t / 4).clamp(Duration::from_millis(10), TICK));
            let ticker = std::pin::pin!(tokio::time::sleep_until(Instant::now() + tick));
            let watch = Watch {
                traffic: &traffic,
                shared: &shared,
                published: &mut published,
                last_activity: &mut last_activity,
                tick,
            };
            watch.run(copy, ticker).await
        };
        let (received, sent) = traffic.totals();
        shared.metrics.publish(&mut published, received, sent);
        CopyOutcome { stream, end, published, last_activity }
    })
}

/// What the copy phase's tick reads and updates.
struct Watch<'a> {
    traffic: &'a Traffic,
    shared: &'a Shared,
    published: &'a mut Published,
    last_activity: &'a mut Instant,
    tick: Duration,
}

impl<'a> Watch<'a> {
    /// Drives the copy and, once per tick, publishes the counts and decides whether the phase
    /// ends.
    ///
    /// The tick's timer is polled only when it has fired (`is_elapsed`, one atomic load) rather
    /// than on every wake: a busy connection is woken once per message, and polling a timer
    /// re-registers the task's waker with it each time.
    fn run<F>(
        self,
        mut copy: Pin<&'a mut F>,
        mut ticker: Pin<&'a mut Sleep>,
    ) -> impl Future<Output = PhaseEnd> + 'a
    where
        F: Future<Output = io::Result<(u64, u64)>>,
    {
        let Watch { traffic, shared, published, last_activity, tick } = self;
        let mut armed = false;
        let mut seen = traffic.totals();
        // The forced close at the end of a drain is checked on the tick rather than raced here:
        // a cancellation future locks the token's shared mutex every time it is polled, and
        // this is polled on every wake of every busy connection.
        std::future::poll_fn(move |cx| {
            let mut polls = 0;
            loop {
                if let Poll::Ready(result) = copy.as_mut().poll(cx) {
                    return Poll::Ready(match result {
                        Ok(_) => PhaseEnd::Finished,
                        Err(err) if GrowPoint::is(&err) => PhaseEnd::Grow,
                        Err(err) => PhaseEnd::Failed(err),
                    });
                }
                // One end of the loop unblocked the other, parked, end (see `Loop`): poll again now,
                // which is what a wake would have done, minus the trip through the scheduler.
                if !traffic.reader_wanted.load(Relaxed) && !traffic.writer_wanted.load(Relaxed) {
                    break;
                }
                polls += 1;
                if polls == MAX_REPOLLS {
                    cx.waker().wake_by_ref();
                    break;
                }
            }
            if armed && !ticker.is_elapsed() {
                return Poll::Pending;
            }
            armed = true;
            while ticker.as_mut().poll(cx).is_ready() {
                let now = traffic.totals();
                shared.metrics.publish(published, now.0, now.1);
                if shared.force_close.is_cancelled() {
                    return Poll::Ready(PhaseEnd::Closed(CloseReason::Shutdown));
                }
                let at = Instant::now();
                if now != seen {
                    seen = now;
                    *last_activity = at;
                } else if shared.idle_timeout.is_some_and(|t| at - *last_activity >= t) {
                    return Poll::Ready(PhaseEnd::Closed(CloseReason::IdleTimeout));
                } else if traffic.balanced() && !traffic.eof.load(Relaxed) {
                    return Poll::Ready(PhaseEnd::Quiet);
                }
                ticker.as_mut().reset(at + tick);
            }
            Poll::Pending
        })
    }
}

/// Polls of the copy in a row before yielding to the scheduler anyway.
const MAX_REPOLLS: u32 = 8;

/// The in-memory loop: a ring buffer of at most one copy buffer's worth, both of whose ends
/// belong to this task.
///
/// tokio's `SimplexStream` is the ready-made loop (and what echod started from), but it costs
/// twice on this path. When one end unblocks the other it wakes the task through the scheduler,
/// and that task is always the one running: an extra poll per message. And its `BytesMut`
/// grows on demand and moves unread bytes to the front to make room, copying the same bytes again
/// whenever the client reads slower than it writes (measured: a third more server CPU per MiB with
/// 16 bulk streams). This loop's ring grows to what the traffic needs (doubling, a few times per
/// phase at most) and then never moves its bytes; and it parks either end without a waker: an end
/// that unblocks a parked one sets `reader_wanted` or `writer_wanted` in [`Traffic`], on which the
/// copy phase polls the copy again at once.
struct Loop<'a> {
    ring: VecDeque<u8>,
    limit: usize,
    /// The writing end has shut down: once the ring is empty, the reader gets EOF.
    shut: bool,
    traffic: &'a Traffic,
}

impl<'a> Loop<'a> {
    fn new(limit: usize, traffic: &'a Traffic) -> Self {
        Loop { ring: VecDeque::new(), limit, shut: false, traffic }
    }

    /// Makes room for `n` more bytes (`len + n <= limit`). The ring starts empty and grows
    /// (doubling, capped at the limit) only as far as the traffic needs: a connection that echoes
    /// a few bytes and goes quiet never holds a whole buffer's worth.
    fn reserve(&mut self, n: usize) {
        let needed = self.ring.len() + n;
        if self.ring.capacity() < needed {
            let target = needed.max(self.ring.capacity() * 2).min(self.limit);
            self.ring.reserve_exact(target - self.ring.len());
        }
    }

    /// Input arrived: if the reader is parked, have the copy polled again.
    fn wake_reader(&self) {
        if self.traffic.reader_parked.load(Relaxed) {
            self.traffic.reader_wanted.store(true, Relaxed);
        }
    }
}

impl AsyncRead for Loop<'_> {
    fn poll_read(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let traffic = this.traffic;
        traffic.reader_wanted.store(false, Relaxed);
        if this.ring.is_empty() {
            if this.shut {
                return Poll::Ready(Ok(()));
            }
            traffic.reader_parked.store(true, Relaxed);
            return Poll::Pending;
        }
        traffic.reader_parked.store(false, Relaxed);
        let (front, back) = this.ring.as_slices();
        let mut taken = front.len().min(buf.remaining());
        buf.put_slice(&front[..taken]);
        if taken == front.len() {
            let more = back.len().min(buf.remaining());
            buf.put_slice(&back[..more]);
            taken += more;
        }
        this.ring.drain(..taken);
        if this.ring.is_empty() {
            // Start the next message at the ring's start: the same cache lines every time, and
            // aligned copies.
            this.ring.clear();
        }
        if traffic.writer_parked.load(Relaxed) {
            traffic.writer_wanted.store(true, Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Loop<'_> {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let traffic = this.traffic;
        traffic.writer_wanted.store(false, Relaxed);
        if this.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let room = this.limit - this.ring.len();
        if room == 0 && !buf.is_empty() {
            traffic.writer_parked.store(true, Relaxed);
            return Poll::Pending;
        }
        traffic.writer_parked.store(false, Relaxed);
        let n = room.min(buf.len());
        this.reserve(n);
        this.ring.extend(&buf[..n]);
        if n > 0 {
            this.wake_reader();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.shut = true;
        this.wake_reader();
        Poll::Ready(Ok(()))
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
    use std::task::Waker;

    use tokio::sync::Semaphore;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::metrics::ServerMetrics;

    fn read_all(lp: &mut Loop<'_>, cx: &mut Context<'_>) -> Poll<Vec<u8>> {
        let mut storage = [0u8; 64];
        let mut buf = ReadBuf::new(&mut storage);
        match Pin::new(lp).poll_read(cx, &mut buf) {
            Poll::Ready(result) => {
                result.unwrap();
                Poll::Ready(buf.filled().to_vec())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn write(lp: &mut Loop<'_>, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<usize> {
        Pin::new(lp).poll_write(cx, bytes).map(|result| result.unwrap())
    }

    /// The loop keeps order across the ring's wrap-around, holds at most its limit, parks a
    /// blocked end and flags it when the other end unblocks it, and reports EOF only once drained.
    #[test]
    fn the_loop_is_a_bounded_fifo_that_flags_unblocked_ends() {
        let traffic = Traffic::new(Published::default());
        let mut lp = Loop::new(8, &traffic);
        let mut cx = Context::from_waker(Waker::noop());

        assert!(read_all(&mut lp, &mut cx).is_pending());
        assert!(traffic.reader_parked.load(Relaxed));
        assert_eq!(write(&mut lp, &mut cx, b"abcdef"), Poll::Ready(6));
        assert!(traffic.reader_wanted.load(Relaxed), "input for a parked reader is flagged");
        assert_eq!(read_all(&mut lp, &mut cx), Poll::Ready(b"abcdef".to_vec()));
        assert!(!traffic.reader_wanted.load(Relaxed));

        // Wrap around the ring's end; only the limit is taken.
        assert_eq!(write(&mut lp, &mut cx, b"ghijklmnopq"), Poll::Ready(8));
        assert!(write(&mut lp, &mut cx, b"xyz").is_pending(), "a full loop parks its writer");
        assert!(traffic.writer_parked.load(Relaxed));
        assert_eq!(read_all(&mut lp, &mut cx), Poll::Ready(b"ghijklmn".to_vec()));
        assert!(traffic.writer_wanted.load(Relaxed), "room for a parked writer is flagged");
        assert_eq!(write(&mut lp, &mut cx, b"opq"), Poll::Ready(3));

        // EOF only after what is left has been read.
        assert!(Pin::new(&mut lp).poll_shutdown(&mut cx).is_ready());
        assert_eq!(read_all(&mut lp, &mut cx), Poll::Ready(b"opq".to_vec()));
        assert_eq!(read_all(&mut lp, &mut cx), Poll::Ready(Vec::new()));
    }

    /// The task of an idle connection is what every held connection costs (besides the kernel's
    /// socket): keep it small. The copy phase's state is boxed and exists only while copying;
    /// freed, it leaves a hole in the heap between the tasks that stay, so keep it small too.
    #[tokio::test]
    async fn a_connection_task_and_its_copy_phase_are_small() {
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
        let task = serve(stream, peer, permit, shared.clone());
        let size = std::mem::size_of_val(&task);
        println!("connection task future: {size} bytes");
        // tokio stores a task's future with about 100 bytes of its own, in 128-byte steps: at
        // up to 280 bytes the whole task takes 384.
        assert!(size <= 280, "connection task future is {size} bytes");

        let _second_client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (second, _) = listener.accept().await.unwrap();
        let copy = copy_phase(second, shared, Published::default(), INITIAL_BUFFER);
        let copy_size = std::mem::size_of_val(&*copy);
        println!("copy phase state: {copy_size} bytes");
        assert!(copy_size <= 768, "copy phase state is {copy_size} bytes");
        drop((task, client));
    }
}
