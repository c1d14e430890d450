//! The in-memory loop between the echo's two copies: a bounded ring buffer whose two ends both
//! belong to the connection's task, with an optional [`Pace`] that holds bytes back (faults).
//!
//! tokio's `SimplexStream` is the ready-made loop (and what echod started from), but it costs
//! twice on this path. When one end unblocks the other it wakes the task through the scheduler,
//! and that task is always the one running: an extra poll per message. And its `BytesMut` grows on
//! demand and moves unread bytes to the front to make room, copying the same bytes again whenever
//! the client reads slower than it writes (measured: a third more server CPU per MiB with 16 bulk
//! streams). This ring grows to what the traffic needs (doubling, a few times per phase at most)
//! and then never moves its bytes.
//!
//! # Waking a parked end
//!
//! An end that cannot proceed (reader: ring empty; writer: ring full) registers the waker it was
//! polled with and returns `Pending`, as any `AsyncRead`/`AsyncWrite` must. When the other end
//! unblocks it, it marks the parked end *wanted* in [`Traffic`], and wakes the stored waker only
//! if it is not the waker it is itself being polled with: under today's `copy_bidirectional` both
//! directions are polled with the task's own waker, so the wake would only reschedule the task
//! that is running; instead the copy phase sees the mark and polls the copy again at once. Were
//! the copy ever to poll each direction with a waker of its own, the stored waker differs and is
//! woken, so the echo never depends on how the copy polls (tested below with distinct wakers).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::traffic::Traffic;

/// What the loop may release to its reader, and when: the hook for faults that hold bytes back
/// (delay, rate) or stop the echo at a point (stall, close, reset). [`Plain`] releases everything
/// at once and compiles to nothing.
pub(crate) trait Pace: Send + Unpin {
    /// Whether this pace can hold bytes back at all (`false`: every hook is skipped).
    const ACTIVE: bool;

    /// `n` bytes entered the loop, after `buffered` bytes already in it.
    fn on_write(&mut self, buffered: usize, n: usize);

    /// How many of the `buffered` bytes the reader may take now. `Ok(0)` with bytes buffered
    /// means "not yet": the pace has registered `cx` to be woken when more may go. `Err(end)`
    /// means the echo ends here.
    fn readable(&mut self, cx: &mut Context<'_>, buffered: usize) -> Result<usize, PaceEnd>;

    /// The reader took `n` bytes.
    fn on_read(&mut self, n: usize);

    /// Whether the loop accepts more input (a stalled pace stops reading from the client).
    fn accepts_input(&self) -> bool {
        true
    }

    /// A copy phase starts with these counts (continuing the connection's totals).
    fn start_phase(&mut self, _traffic: &Traffic) {}

    /// Why the connection ended, if the pace ended it (a close point reached).
    fn close_reason(&self) -> Option<crate::metrics::CloseReason> {
        None
    }
}

/// How a paced echo ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PaceEnd {
    /// Report EOF to the reader: the client gets a FIN after what was released.
    Close,
}

/// No pacing: the plain echo.
pub(crate) struct Plain;

impl Pace for Plain {
    const ACTIVE: bool = false;

    fn on_write(&mut self, _: usize, _: usize) {}

    fn readable(&mut self, _: &mut Context<'_>, buffered: usize) -> Result<usize, PaceEnd> {
        Ok(buffered)
    }

    fn on_read(&mut self, _: usize) {}
}

/// The loop: a ring of at most `limit` bytes, paced by `P`.
pub(crate) struct Loop<'a, P: Pace> {
    ring: VecDeque<u8>,
    limit: usize,
    /// The writing end has shut down: once the ring is empty, the reader gets EOF.
    shut: bool,
    /// The pace ended the echo: the reader gets EOF, input is discarded.
    closed: bool,
    traffic: &'a Traffic,
    pace: P,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl<'a, P: Pace> Loop<'a, P> {
    pub(crate) fn new(limit: usize, traffic: &'a Traffic, pace: P) -> Self {
        Loop {
            ring: VecDeque::new(),
            limit,
            shut: false,
            closed: false,
            traffic,
            pace,
            reader: None,
            writer: None,
        }
    }

    /// The pace back, with its state, when the phase ends.
    pub(crate) fn into_pace(self) -> P {
        self.pace
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

    /// Input arrived or the writer shut down: if the reader is parked, have it polled again.
    fn unblock_reader(&self, cx: &Context<'_>) {
        if self.traffic.reader_parked.load(Relaxed) {
            self.traffic.reader_wanted.store(true, Relaxed);
            wake_unless_same(&self.reader, cx);
        }
    }

    /// The reader made room: if the writer is parked, have it polled again.
    fn unblock_writer(&self, cx: &Context<'_>) {
        if self.traffic.writer_parked.load(Relaxed) {
            self.traffic.writer_wanted.store(true, Relaxed);
            wake_unless_same(&self.writer, cx);
        }
    }
}

/// Stores `cx`'s waker in `slot` unless an equivalent one is there already (a clone is a
/// reference-count increment; most parks reuse the stored waker).
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// Wakes the parked end's waker, unless it is the waker of the poll in progress (the copy phase
/// then polls again itself; see the module docs).
fn wake_unless_same(slot: &Option<Waker>, cx: &Context<'_>) {
    if let Some(waker) = slot {
        if !waker.will_wake(cx.waker()) {
            waker.wake_by_ref();
        }
    }
}

impl<P: Pace> AsyncRead for Loop<'_, P> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let traffic = this.traffic;
        traffic.reader_wanted.store(false, Relaxed);
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        let mut available = this.ring.len();
        if P::ACTIVE {
            match this.pace.readable(cx, available) {
                Ok(n) => available = n,
                Err(PaceEnd::Close) => {
                    this.closed = true;
                    this.ring = VecDeque::new();
                    this.unblock_writer(cx);
                    return Poll::Ready(Ok(()));
                }
            }
        }
        if available == 0 {
            if this.shut && this.ring.is_empty() {
                return Poll::Ready(Ok(()));
            }
            traffic.reader_parked.store(true, Relaxed);
            register(&mut this.reader, cx);
            return Poll::Pending;
        }
        traffic.reader_parked.store(false, Relaxed);
        let (front, back) = this.ring.as_slices();
        let limit = available.min(buf.remaining());
        let mut taken = front.len().min(limit);
        buf.put_slice(&front[..taken]);
        if taken == front.len() && taken < limit {
            let more = back.len().min(limit - taken);
            buf.put_slice(&back[..more]);
            taken += more;
        }
        this.ring.drain(..taken);
        if this.ring.is_empty() {
            // Start the next message at the ring's start: the same cache lines every time, and
            // aligned copies.
            this.ring.clear();
        }
        if P::ACTIVE {
            this.pace.on_read(taken);
        }
        this.unblock_writer(cx);
        Poll::Ready(Ok(()))
    }
}

impl<P: Pace> AsyncWrite for Loop<'_, P> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let traffic = this.traffic;
        traffic.writer_wanted.store(false, Relaxed);
        if this.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if this.closed {
            // The echo was closed on purpose; what the client still sends is read and dropped,
            // so it sees the close as a FIN, not a reset for unread data.
            return Poll::Ready(Ok(buf.len()));
        }
        let room = this.limit - this.ring.len();
        if (room == 0 || (P::ACTIVE && !this.pace.accepts_input())) && !buf.is_empty() {
            traffic.writer_parked.store(true, Relaxed);
            register(&mut this.writer, cx);
            return Poll::Pending;
        }
        traffic.writer_parked.store(false, Relaxed);
        let n = room.min(buf.len());
        this.reserve(n);
        if P::ACTIVE {
            this.pace.on_write(this.ring.len(), n);
        }
        this.ring.extend(&buf[..n]);
        if n > 0 {
            this.unblock_reader(cx);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.shut = true;
        this.unblock_reader(cx);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    use super::*;
    use crate::metrics::Published;

    fn read_all<P: Pace>(lp: &mut Loop<'_, P>, cx: &mut Context<'_>) -> Poll<Vec<u8>> {
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

    fn write<P: Pace>(lp: &mut Loop<'_, P>, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<usize> {
        Pin::new(lp).poll_write(cx, bytes).map(|result| result.unwrap())
    }

    /// The loop keeps order across the ring's wrap-around, holds at most its limit, parks a
    /// blocked end and flags it when the other end unblocks it, and reports EOF only once drained.
    #[test]
    fn the_loop_is_a_bounded_fifo_that_flags_unblocked_ends() {
        let traffic = Traffic::new(Published::default());
        let mut lp = Loop::new(8, &traffic, Plain);
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

    struct Counting(AtomicUsize);

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Polled with distinct wakers per end (as a copy that tracked each direction's wakeups
    /// would), a parked end is woken by the other end's progress; polled with the same waker it
    /// is only flagged, so the running task is not rescheduled for nothing.
    #[test]
    fn a_parked_end_polled_with_its_own_waker_is_woken() {
        let traffic = Traffic::new(Published::default());
        let mut lp = Loop::new(4, &traffic, Plain);
        let reader_wakes = Arc::new(Counting(AtomicUsize::new(0)));
        let writer_wakes = Arc::new(Counting(AtomicUsize::new(0)));
        let reader_waker = Waker::from(reader_wakes.clone());
        let writer_waker = Waker::from(writer_wakes.clone());
        let mut reader_cx = Context::from_waker(&reader_waker);
        let mut writer_cx = Context::from_waker(&writer_waker);

        // Reader parks; the writer's input wakes it.
        assert!(read_all(&mut lp, &mut reader_cx).is_pending());
        assert_eq!(write(&mut lp, &mut writer_cx, b"abcd"), Poll::Ready(4));
        assert_eq!(reader_wakes.0.load(Ordering::Relaxed), 1);
        // Writer parks on a full ring; the reader's progress wakes it.
        assert!(write(&mut lp, &mut writer_cx, b"e").is_pending());
        assert_eq!(read_all(&mut lp, &mut reader_cx), Poll::Ready(b"abcd".to_vec()));
        assert_eq!(writer_wakes.0.load(Ordering::Relaxed), 1);
        // Shutdown wakes a parked reader too.
        assert!(read_all(&mut lp, &mut reader_cx).is_pending());
        assert!(Pin::new(&mut lp).poll_shutdown(&mut writer_cx).is_ready());
        assert_eq!(reader_wakes.0.load(Ordering::Relaxed), 2);

        // One waker for both ends: flagged, never woken.
        let traffic = Traffic::new(Published::default());
        let mut lp = Loop::new(4, &traffic, Plain);
        let shared = Arc::new(Counting(AtomicUsize::new(0)));
        let waker = Waker::from(shared.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(read_all(&mut lp, &mut cx).is_pending());
        assert_eq!(write(&mut lp, &mut cx, b"ab"), Poll::Ready(2));
        assert!(traffic.reader_wanted.load(Relaxed));
        assert_eq!(shared.0.load(Ordering::Relaxed), 0);
    }
}
