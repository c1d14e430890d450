//! The echo itself: `tokio::io::copy_bidirectional` between a client stream and an in-memory
//! loop, in phases that hold buffers only while data flows.
//!
//! * [`ring`]: the loop between the two copies, and the [`Pace`](ring::Pace) hook through which
//!   faults hold bytes back;
//! * [`copy`]: one copy phase (the copy, its metered view of the client, the tick);
//! * [`faults`]: the paces that inject delay, rate limits, stalls, closes and resets;
//! * [`traffic`]: the counts and flags one phase's parts share.
//!
//! What the loop makes fall out of the copy for free:
//!
//! * **order and exactly-once**: one byte stream through two FIFO copies;
//! * **half-close**: when the client's FIN arrives the copy shuts the loop down; the loop then
//!   drains what it still holds, reports EOF, and the copy shuts down our side of the stream, so
//!   the client reads everything and then a clean EOF;
//! * **backpressure**: the loop holds at most one buffer's worth. A client that sends but never
//!   reads fills its receive window, our writes stall, the loop fills, the copy stops reading, and
//!   the client's own send window closes. Memory per connection stays bounded.

pub(crate) mod copy;
pub(crate) mod faults;
pub(crate) mod ring;
pub(crate) mod traffic;

use std::io;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Buffer size a connection starts with (and returns to when it goes quiet): enough for typical
/// request/response sizes, and small, because every copying connection may always hold three of
/// them whatever the buffer budget (see [`crate::budget`]). Bulk traffic grows it (×4 per full read).
pub const INITIAL_BUFFER: usize = 1024;

/// Largest buffer a connection grows to. Large reads and writes cut syscalls per MiB for bulk
/// streams; the loop and two copy buffers bound a connection's echo memory at three times this.
pub const MAX_BUFFER: usize = 256 * 1024;

/// A client stream the echo runs over: a TCP socket, or a TLS session on one.
pub(crate) trait EchoStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Writes are buffered in the stream (TLS records) until flushed.
    const BUFFERED_WRITES: bool;

    /// Ready when a read would make progress: data, EOF or an error.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// The TCP socket underneath.
    fn tcp(&self) -> &TcpStream;

    /// Whether a read error is really the end of the stream (a TLS peer that closed the TCP
    /// connection without a close_notify: the client is done sending, as with a FIN).
    fn is_end_of_stream(_err: &io::Error) -> bool {
        false
    }

    /// Ends the session without waiting, before echod closes the connection on its own (idle
    /// timeout, drain): a TLS stream sends its close_notify as far as the socket takes it now, so
    /// the client reads a clean end of the session rather than a truncated one. The FIN follows
    /// when the stream is dropped.
    fn end_session(&mut self) {}
}

impl EchoStream for TcpStream {
    const BUFFERED_WRITES: bool = false;

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    fn tcp(&self) -> &TcpStream {
        self
    }
}

/// A TLS session on a TCP socket (the server side of a tls:// listener).
///
/// * Writes are buffered in TLS records until flushed (the copy flushes; the phase's
///   `unflushed` flag keeps a phase from ending with plaintext still in rustls).
/// * Readiness: rustls may already hold decrypted plaintext (records that arrived with the
///   handshake's last flight, or with a read that filled the copy's buffer) or a close_notify
///   the socket will never announce again; then a read makes progress without the socket
///   becoming readable. `wants_read` is false exactly then (after the handshake). Likewise
///   when the read-ahead below rustls holds bytes the socket has already delivered.
/// * A peer that closes TCP without a close_notify (rustls: `UnexpectedEof`) has finished
///   sending, as with a FIN: everything pending is echoed, then echod's close_notify and FIN.
impl EchoStream for crate::stage::tls::Session {
    const BUFFERED_WRITES: bool = true;

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (io, session) = self.get_ref();
        if !session.is_handshaking() && !session.wants_read() || io.buffered() > 0 {
            return Poll::Ready(Ok(()));
        }
        io.tcp().poll_read_ready(cx)
    }

    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.tcp()
    }

    fn is_end_of_stream(err: &io::Error) -> bool {
        err.kind() == io::ErrorKind::UnexpectedEof
    }

    fn end_session(&mut self) {
        /// Writes to the socket only what it takes now.
        struct NonBlocking<'a>(&'a TcpStream);
        impl io::Write for NonBlocking<'_> {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.try_write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        // Pending records (at most rustls' 64 KiB buffer) go first; a few writes at most.
        const MOST_WRITES: usize = 8;
        let (io, session) = self.get_mut();
        let tcp = io.tcp();
        session.send_close_notify();
        for _ in 0..MOST_WRITES {
            if !session.wants_write() {
                break;
            }
            match session.write_tls(&mut NonBlocking(tcp)) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}
