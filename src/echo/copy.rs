//! The copy phase: `copy_bidirectional` between the client stream and the loop, watched by a
//! tick that publishes counts, enforces the idle timeout and ends the phase when traffic stops.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::mirror::{Inbound, Mirror, WAITING_BUFFER};
use super::ring::{Loop, Pace};
use super::traffic::Traffic;
use super::{EchoStream, MAX_BUFFER};
use crate::budget::Budget;
use crate::context::ConnContext;
use crate::metrics::{CloseReason, Published};

/// How often a copying connection publishes its byte counts, checks whether it went quiet, and
/// checks for the forced close at the end of a drain.
pub(crate) const TICK: Duration = Duration::from_secs(1);

/// Polls of the copy in a row before yielding to the scheduler anyway.
const MAX_REPOLLS: u32 = 8;

/// Why a copy phase ended.
pub(crate) enum PhaseEnd {
    /// Both directions finished: the client closed and got everything back.
    Finished,
    /// A read filled the buffer; start again with bigger buffers.
    Grow,
    /// Nothing buffered and nothing to read: free the buffers and wait.
    Quiet,
    /// Closed by the server: idle timeout or shutdown.
    Closed(CloseReason),
    /// A fault's reset point was reached, with everything before it sent.
    InjectedReset,
    /// The socket failed.
    Failed(io::Error),
}

/// A finished copy phase: the stream and pace back, why it ended, and what it published.
pub(crate) struct CopyOutcome<S, P> {
    pub stream: S,
    pub pace: P,
    pub end: PhaseEnd,
    pub published: Published,
    pub last_activity: Instant,
    /// The buffer size the phase ran with (the budget may have granted less than asked).
    pub size: usize,
}

/// A running copy phase, boxed: connections that wait do not carry its state.
pub(crate) type CopyPhase<S, P> = Pin<Box<dyn Future<Output = CopyOutcome<S, P>> + Send>>;

/// What a copy phase starts from.
pub(crate) struct PhaseStart<S, P> {
    pub stream: S,
    pub pace: P,
    pub published: Published,
    /// Buffer size asked for; the budget grants it or less.
    pub size: usize,
    /// End the phase as soon as it is drained rather than on a quiet tick.
    pub end_when_drained: bool,
}

/// Starts a copy phase. It owns the stream and everything the copy borrows, in one allocation
/// that exists only while copying, and gives the stream back when it ends. The stream's type
/// chooses how it echoes ([`EchoStream::copy_phase`]): through the loop, or for a TCP socket
/// without faults, directly ([`direct_phase`]).
pub(crate) fn copy_phase<S: EchoStream, P: Pace + 'static>(
    start: PhaseStart<S, P>,
    ctx: Arc<ConnContext>,
) -> CopyPhase<S, P> {
    S::copy_phase(start, ctx)
}

/// A copy phase through the loop: `copy_bidirectional` between the client stream and the loop,
/// which the pace (faults) may hold bytes back in.
pub(crate) fn looped_phase<S: EchoStream, P: Pace + 'static>(
    start: PhaseStart<S, P>,
    ctx: Arc<ConnContext>,
) -> CopyPhase<S, P> {
    Box::pin(async move {
        let PhaseStart { mut stream, mut pace, published, size, end_when_drained } = start;
        let lease = Lease::take(&ctx.budget, size);
        let traffic = Traffic::new(published);
        if P::ACTIVE {
            pace.start_phase(&traffic);
        }
        let (ended, pace) = {
            let mut client = Metered::new(&mut stream, &traffic, lease.can_grow(&ctx));
            let mut echo_loop = Loop::new(lease.size, &traffic, pace);
            let ended = {
                // Pinned in place and handed on by reference: passed by value, the copy's state
                // would be stored twice in this future (once as the argument, once pinned).
                let copy = std::pin::pin!(tokio::io::copy_bidirectional_with_sizes(
                    &mut client,
                    &mut echo_loop,
                    lease.size,
                    lease.size
                ));
                let ticker = std::pin::pin!(tokio::time::sleep_until(Instant::now() + tick(&ctx)));
                let watch =
                    Watch { traffic: &traffic, ctx: &ctx, published, end_when_drained, faulty: P::ACTIVE };
                watch.run(copy, ticker).await
            };
            (ended, echo_loop.into_pace())
        };
        let (end, published, last_activity, size) = settle(ended, &traffic, lease, &ctx);
        if matches!(end, PhaseEnd::InjectedReset) {
            crate::net::reset_after_delivery(stream.tcp()).await;
        }
        CopyOutcome { stream, pace, end, published, last_activity, size }
    })
}

/// A copy phase of a TCP socket whose pace holds nothing back: `copy_bidirectional` between the
/// socket's read half and its write half (see [`super::mirror`]), one buffer and no loop.
pub(crate) fn direct_phase<P: Pace + 'static>(
    start: PhaseStart<TcpStream, P>,
    ctx: Arc<ConnContext>,
) -> CopyPhase<TcpStream, P> {
    debug_assert!(!P::ACTIVE, "a pace that holds bytes back needs the loop");
    Box::pin(async move {
        let PhaseStart { mut stream, pace, published, size, end_when_drained } = start;
        let lease = Lease::take(&ctx.budget, size);
        let traffic = Traffic::new(published);
        let ended = {
            let (read, write) = stream.split();
            let mut inbound = Inbound(read);
            let mut client = Metered::new(&mut inbound, &traffic, lease.can_grow(&ctx));
            let mut mirror = Mirror::new(write, &traffic);
            let copy = std::pin::pin!(tokio::io::copy_bidirectional_with_sizes(
                &mut client,
                &mut mirror,
                lease.size,
                WAITING_BUFFER
            ));
            let ticker = std::pin::pin!(tokio::time::sleep_until(Instant::now() + tick(&ctx)));
            let watch = Watch { traffic: &traffic, ctx: &ctx, published, end_when_drained, faulty: false };
            watch.run(copy, ticker).await
        };
        let (end, published, last_activity, size) = settle(ended, &traffic, lease, &ctx);
        CopyOutcome { stream, pace, end, published, last_activity, size }
    })
}

/// The end of a phase's copy: publishes the final counts and returns the buffers to the budget.
fn settle(
    (end, mut published, last_activity): (PhaseEnd, Published, Instant),
    traffic: &Traffic,
    lease: Lease<'_>,
    ctx: &ConnContext,
) -> (PhaseEnd, Published, Instant, usize) {
    let (received, sent) = traffic.totals();
    ctx.metrics.publish(&mut published, received, sent);
    (end, published, last_activity, lease.size)
}

/// The tick of a copy phase: 1 s, or a quarter of the idle timeout (at least 10 ms).
fn tick(ctx: &ConnContext) -> Duration {
    ctx.idle_timeout.map_or(TICK, |t| (t / 4).clamp(Duration::from_millis(10), TICK))
}

/// A phase's lease on the buffer budget, returned when the phase ends or is dropped.
struct Lease<'a> {
    budget: &'a Budget,
    size: usize,
}

impl<'a> Lease<'a> {
    fn take(budget: &'a Budget, wanted: usize) -> Lease<'a> {
        Lease { budget, size: budget.lease(wanted) }
    }

    /// Whether a read that fills the buffer may end the phase to grow: not at the largest size,
    /// nor when the budget has no room for the next.
    fn can_grow(&self, ctx: &ConnContext) -> bool {
        self.size < MAX_BUFFER && ctx.budget.has_room(self.size * 4)
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.budget.release(self.size);
    }
}

/// What the copy phase's tick reads and updates.
struct Watch<'a> {
    traffic: &'a Traffic,
    ctx: &'a ConnContext,
    published: Published,
    end_when_drained: bool,
    faulty: bool,
}

impl<'a> Watch<'a> {
    /// Drives the copy and, once per tick, publishes the counts and decides whether the phase
    /// ends. Returns why it ended, what it published, and when traffic was last seen.
    ///
    /// The tick's timer is polled only when it has fired (`is_elapsed`, one atomic load) rather
    /// than on every wake: a busy connection is woken once per message, and polling a timer
    /// re-registers the task's waker with it each time.
    fn run<F>(
        self,
        mut copy: Pin<&'a mut F>,
        mut ticker: Pin<&'a mut Sleep>,
    ) -> impl Future<Output = (PhaseEnd, Published, Instant)> + 'a
    where
        F: Future<Output = io::Result<(u64, u64)>>,
    {
        let Watch { traffic, ctx, mut published, end_when_drained, faulty } = self;
        let mut armed = false;
        let mut seen = traffic.totals();
        let mut last_activity = Instant::now();
        // The forced close at the end of a drain is checked on the tick rather than raced here:
        // a cancellation future locks the token's shared mutex every time it is polled, and
        // this is polled on every wake of every busy connection.
        std::future::poll_fn(move |cx| {
            // The idle clock of the next phase runs from the last traffic: bytes moved since the
            // last tick moved just now (a phase often ends right after its last echo, before any
            // tick saw it).
            macro_rules! end {
                ($end:expr) => {{
                    let last = if traffic.totals() != seen { Instant::now() } else { last_activity };
                    Poll::Ready(($end, published, last))
                }};
            }
            let mut polls = 0;
            loop {
                if let Poll::Ready(result) = copy.as_mut().poll(cx) {
                    return end!(match result {
                        Ok(_) => PhaseEnd::Finished,
                        Err(err) if GrowPoint::is(&err) => PhaseEnd::Grow,
                        Err(err) => PhaseEnd::Failed(err),
                    });
                }
                // One end of the loop unblocked the other, parked, end (see `ring`): poll again
                // now, which is what a wake would have done, minus the trip through the scheduler.
                if !traffic.wanted() {
                    break;
                }
                polls += 1;
                if polls == MAX_REPOLLS {
                    cx.waker().wake_by_ref();
                    break;
                }
            }
            if faulty && traffic.sent.load(Relaxed) >= traffic.reset_at.load(Relaxed) && traffic.flushed() {
                return end!(PhaseEnd::InjectedReset);
            }
            if end_when_drained && traffic.echoed_and_drained() {
                return end!(PhaseEnd::Quiet);
            }
            if armed && !ticker.is_elapsed() {
                return Poll::Pending;
            }
            armed = true;
            while ticker.as_mut().poll(cx).is_ready() {
                let now = traffic.totals();
                ctx.metrics.publish(&mut published, now.0, now.1);
                if ctx.force_close.is_cancelled() {
                    return end!(PhaseEnd::Closed(CloseReason::Shutdown));
                }
                let at = Instant::now();
                if now != seen {
                    seen = now;
                    last_activity = at;
                } else if ctx.idle_timeout.is_some_and(|t| at - last_activity >= t) {
                    return end!(PhaseEnd::Closed(CloseReason::IdleTimeout));
                } else if traffic.drained() {
                    return end!(PhaseEnd::Quiet);
                }
                ticker.as_mut().reset(at + tick(ctx));
            }
            Poll::Pending
        })
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

/// What [`Metered`] needs of the stream it wraps: a client stream, or the direct echo's read
/// half.
pub(crate) trait Metering: AsyncRead + AsyncWrite + Unpin {
    /// As [`EchoStream::BUFFERED_WRITES`].
    const BUFFERED_WRITES: bool;

    /// As [`EchoStream::is_end_of_stream`].
    fn is_end_of_stream(err: &io::Error) -> bool;
}

impl<S: EchoStream> Metering for S {
    const BUFFERED_WRITES: bool = <S as EchoStream>::BUFFERED_WRITES;

    fn is_end_of_stream(err: &io::Error) -> bool {
        <S as EchoStream>::is_end_of_stream(err)
    }
}

impl Metering for Inbound<'_> {
    const BUFFERED_WRITES: bool = false;

    fn is_end_of_stream(_err: &io::Error) -> bool {
        false
    }
}

/// The client stream as the copy sees it: counts bytes in [`Traffic`], notes EOF and whether
/// the socket has more to read, and notices reads that fill the whole buffer.
pub(crate) struct Metered<'a, S> {
    stream: &'a mut S,
    traffic: &'a Traffic,
    can_grow: bool,
}

impl<'a, S: Metering> Metered<'a, S> {
    pub(crate) fn new(stream: &'a mut S, traffic: &'a Traffic, can_grow: bool) -> Self {
        traffic.grow.store(false, Relaxed);
        Metered { stream, traffic, can_grow }
    }
}

impl<S: Metering> AsyncRead for Metered<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let traffic = self.traffic;
        // A read with everything echoed is the safe point to end the copy: both buffers and
        // the loop are empty, so dropping the copy loses nothing. Until then the reader holds
        // off: a client that always has more on the way (a stream the server only just keeps
        // up with) would otherwise never let the echo catch up, and run at the first size for
        // good. The write that catches up has the copy polled again (`note_echo_progress`).
        if traffic.grow.load(Relaxed) {
            if traffic.balanced() {
                return Poll::Ready(Err(GrowPoint::error()));
            }
            return Poll::Pending;
        }
        let before = buf.filled().len();
        match Pin::new(&mut *self.stream).poll_read(cx, buf) {
            Poll::Pending => {
                if traffic.reading.load(Relaxed) == Traffic::DATA {
                    traffic.reading.store(Traffic::DRAINED, Relaxed);
                }
                Poll::Pending
            }
            Poll::Ready(Ok(())) => {
                traffic.reading.store(Traffic::DATA, Relaxed);
                let n = buf.filled().len() - before;
                if n == 0 {
                    traffic.eof.store(true, Relaxed);
                } else {
                    Traffic::add(&traffic.received, n);
                    if self.can_grow && buf.remaining() == 0 && before == 0 {
                        traffic.grow.store(true, Relaxed);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) if S::is_end_of_stream(&err) => {
                traffic.reading.store(Traffic::DATA, Relaxed);
                traffic.eof.store(true, Relaxed);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
        }
    }
}

impl<S: Metering> AsyncWrite for Metered<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut *self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            Traffic::add(&self.traffic.sent, n);
            if S::BUFFERED_WRITES {
                self.traffic.unflushed.store(true, Relaxed);
            } else {
                self.traffic.note_echo_progress();
            }
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut *self.stream).poll_flush(cx);
        if S::BUFFERED_WRITES && matches!(result, Poll::Ready(Ok(()))) {
            self.traffic.unflushed.store(false, Relaxed);
            self.traffic.note_echo_progress();
        }
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::echo::ring::Plain;
    use crate::echo::INITIAL_BUFFER;
    use crate::metrics::{Registry, ServerMetrics};

    /// A client that always has more on the way never gives the echo a moment to catch up by
    /// itself (each read finds data before the last one is echoed). The phase must still reach
    /// its growth point right after the first full read, not run on at the first size until
    /// the client pauses: a server that only just keeps up would never grow its buffers.
    #[tokio::test]
    async fn a_phase_grows_while_the_client_always_has_more_to_read() {
        grows_while_the_client_always_has_more_to_read(copy_phase).await;
    }

    /// The same through the loop (what a TLS session's echo or a faulty listener's runs).
    #[tokio::test]
    async fn a_looped_phase_grows_while_the_client_always_has_more_to_read() {
        grows_while_the_client_always_has_more_to_read(looped_phase).await;
    }

    /// A way to start a plain TCP socket's copy phase.
    type Starter = fn(PhaseStart<TcpStream, Plain>, Arc<ConnContext>) -> CopyPhase<TcpStream, Plain>;

    async fn grows_while_the_client_always_has_more_to_read(phase: Starter) {
        const QUEUED: usize = 64 * 1024;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("address")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        client.write_all(&[7; QUEUED]).await.expect("write");
        // Everything queued at the server before the phase starts: its first 64 reads of 1 KiB
        // all find data at once.
        let queued = async {
            let mut peeked = vec![0; QUEUED];
            loop {
                server.readable().await.expect("readable");
                if server.peek(&mut peeked).await.expect("peek") == QUEUED {
                    break;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), queued).await.expect("data queued at the server");

        let metrics = ServerMetrics::new(Some(Registry::new()), 1);
        let ctx = Arc::new(ConnContext::new(Arc::new(metrics), None, Budget::new(1 << 20, INITIAL_BUFFER)));
        let start = PhaseStart {
            stream: server,
            pace: Plain,
            published: Published::default(),
            size: INITIAL_BUFFER,
            end_when_drained: false,
        };
        let outcome =
            tokio::time::timeout(Duration::from_secs(10), phase(start, ctx)).await.expect("the phase ends");
        assert!(matches!(outcome.end, PhaseEnd::Grow), "the phase ends to grow");
        let Published { received, sent } = outcome.published;
        assert_eq!(received, sent, "everything read was echoed before the phase ended");
        assert!(
            received <= 4 * INITIAL_BUFFER as u64,
            "grew after {received} bytes, not right after the first full read"
        );
    }
}
