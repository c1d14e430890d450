//! The direct echo: a plain TCP connection without faults has nothing for the loop to do, so
//! its copy writes what it reads from the client straight back to the client's socket.
//!
//! `copy_bidirectional` still runs the echo, between the socket's read half
//! ([`Inbound`]) and its write half seen as the far end ([`Mirror`]). The client-to-far-end
//! direction carries every byte: it reads a message into its buffer and writes it from there to
//! the socket, as the classic read/write echo does. The far end has nothing of its own to send,
//! so the other direction only waits, and when the client's FIN has been echoed and our side
//! shut down, it finds the far end's EOF and the copy returns.
//!
//! Against the loop this saves per message two copies (into the ring and out of it), the polls
//! of the second direction that carry them, and two of the three buffers a message passes
//! through: a connection holds one buffer of the phase's size, not two and a ring. Faults need
//! the loop (they hold bytes back between the copies) and so does a TLS session (its halves
//! are not independent), so those listeners keep it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};

use super::traffic::Traffic;

/// The buffer of the direction that only waits: the copy needs one that is not empty (it reads
/// nothing into it).
pub(crate) const WAITING_BUFFER: usize = 1;

/// The client's side of the direct echo: reads come from the socket; nothing is ever written
/// to it (the [`Mirror`] writes the echo), and shutting it down is the mirror's job too.
pub(crate) struct Inbound<'a>(pub ReadHalf<'a>);

impl AsyncRead for Inbound<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Inbound<'_> {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, _buf: &[u8]) -> Poll<io::Result<usize>> {
        // The mirror never yields a byte to read, so the copy has nothing to write here.
        Poll::Ready(Err(io::Error::other("the direct echo writes through its mirror")))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The far end of the direct echo: what the copy writes to it goes to the client's socket
/// (counted as sent); reading from it waits until it has been shut down, then finds EOF.
pub(crate) struct Mirror<'a> {
    half: WriteHalf<'a>,
    traffic: &'a Traffic,
    shut: bool,
    reader: Option<Waker>,
}

impl<'a> Mirror<'a> {
    pub(crate) fn new(half: WriteHalf<'a>, traffic: &'a Traffic) -> Self {
        Mirror { half, traffic, shut: false, reader: None }
    }
}

impl AsyncWrite for Mirror<'_> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.half).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            Traffic::add(&self.traffic.sent, n);
            self.traffic.note_echo_progress();
        }
        result
    }

    /// A TCP socket does not buffer writes: nothing to flush.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Shuts our side of the socket down (the client reads EOF after everything echoed), and
    /// lets the waiting direction find its EOF.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(Pin::new(&mut this.half).poll_shutdown(cx))?;
        this.shut = true;
        // As the loop does (see `ring`): flag the waiting reader so the phase polls the copy
        // again, and wake its waker only if it is not the one this poll runs with.
        this.traffic.reader_wanted.store(true, Relaxed);
        if let Some(waker) = &this.reader {
            if !waker.will_wake(cx.waker()) {
                waker.wake_by_ref();
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Mirror<'_> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, _buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.traffic.reader_wanted.store(false, Relaxed);
        if this.shut {
            return Poll::Ready(Ok(()));
        }
        match &this.reader {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => this.reader = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}
