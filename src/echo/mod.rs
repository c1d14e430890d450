//! The echo itself: `tokio::io::copy_bidirectional` between a client stream and an in-memory
//! loop, in phases that hold buffers only while data flows. A TCP socket without faults skips
//! the loop: its copy writes straight back to the socket ([`mirror`]).
//!
//! * [`ring`]: the loop between the two copies, and the [`Pace`](ring::Pace) hook through which
//!   faults hold bytes back;
//! * [`mirror`]: the direct echo's halves of a TCP socket;
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
pub(crate) mod mirror;
pub(crate) mod ring;
pub(crate) mod traffic;

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use self::copy::{CopyPhase, PhaseStart};
use self::ring::Pace;
use crate::context::ConnContext;

/// Buffer size a connection starts with (and returns to when it goes quiet): enough for typical
/// request/response sizes, and small, because every copying connection may always hold three of
/// them whatever the buffer budget (see [`crate::budget`]). Bulk traffic grows it (×4 per full read).
pub const INITIAL_BUFFER: usize = 1024;

/// Largest buffer a connection grows to. Large reads and writes cut syscalls per MiB for bulk
/// streams; the loop and two copy buffers bound a connection's echo memory at three times this.
pub const MAX_BUFFER: usize = 256 * 1024;

/// A client stream the echo runs over: a TCP socket (below), or a TLS session on one (its impl
/// is beside the session, in `stage/tls_session.rs`).
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

    /// Starts a copy phase over this stream: through the loop (the default: the loop is
    /// where faults hold bytes back, and a TLS session's halves are not independent).
    fn copy_phase<P: Pace + 'static>(start: PhaseStart<Self, P>, ctx: Arc<ConnContext>) -> CopyPhase<Self, P>
    where
        Self: Sized,
    {
        copy::looped_phase(start, ctx)
    }
}

impl EchoStream for TcpStream {
    const BUFFERED_WRITES: bool = false;

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    fn tcp(&self) -> &TcpStream {
        self
    }

    /// Without faults, the direct echo ([`mirror`]): nothing to hold back between the copies.
    fn copy_phase<P: Pace + 'static>(
        start: PhaseStart<Self, P>,
        ctx: Arc<ConnContext>,
    ) -> CopyPhase<Self, P> {
        if P::ACTIVE {
            copy::looped_phase(start, ctx)
        } else {
            copy::direct_phase(start, ctx)
        }
    }
}
