//! A TLS session as the echo uses it: rustls over a read-ahead socket
//! ([`ReadAhead`](crate::net::read_ahead::ReadAhead)), whose reads take every record already
//! at hand.
//!
//! tokio-rustls hands out one record's plaintext (at most 16 KiB) per read. The echo would then
//! turn every record into one trip through the loop and one encrypted write, one `send` each,
//! where plain TCP moves up to a whole buffer (256 KiB) per trip. A read here goes on taking
//! records while they can be had without waiting (rustls holds plaintext, or the read-ahead
//! holds bytes from the socket) and the caller's buffer has room; so a bulk session moves a
//! buffer per trip too, and its writes leave as several records in one `send`.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustls::ServerConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::echo::EchoStream;
use crate::net::read_ahead::ReadAhead;

/// Records one read takes at most beyond the first (a 256 KiB buffer holds 16).
const MOST_RECORDS_PER_READ: usize = 64;

/// The server side of a TLS session on a tls:// listener.
pub(crate) struct Session {
    tls: TlsStream<ReadAhead>,
    /// An error met while taking a further record in a read that had already got data: reported
    /// by the next read, so no byte before it and no error is lost.
    deferred: Option<io::Error>,
}

impl Session {
    pub fn new(tls: TlsStream<ReadAhead>) -> Session {
        Session { tls, deferred: None }
    }

    /// The rustls connection (negotiated version, suite, the client's certificates).
    pub fn connection(&self) -> &ServerConnection {
        self.tls.get_ref().1
    }

    /// Whether a read would return data without waiting on the socket.
    fn more_at_hand(&self) -> bool {
        let (io, session) = self.tls.get_ref();
        !session.wants_read() || io.buffered() > 0
    }
}

impl AsyncRead for Session {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(err) = this.deferred.take() {
            return Poll::Ready(Err(err));
        }
        let start = buf.filled().len();
        ready!(Pin::new(&mut this.tls).poll_read(cx, buf))?;
        if buf.filled().len() == start {
            return Poll::Ready(Ok(())); // end of the session
        }
        for _ in 0..MOST_RECORDS_PER_READ {
            if buf.remaining() == 0 || !this.more_at_hand() {
                break;
            }
            let before = buf.filled().len();
            match Pin::new(&mut this.tls).poll_read(cx, buf) {
                Poll::Ready(Ok(())) if buf.filled().len() > before => {}
                // The end of the session (the next read reports it again), or only part of a
                // record at hand: what this read has is returned now.
                Poll::Ready(Ok(())) | Poll::Pending => break,
                Poll::Ready(Err(err)) => {
                    this.deferred = Some(err);
                    break;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Session {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

/// * Writes are buffered in TLS records until flushed (the copy flushes; the phase's
///   `unflushed` flag keeps a phase from ending with plaintext still in rustls).
/// * Readiness: rustls may already hold decrypted plaintext (records that arrived with the
///   handshake's last flight, or with a read that filled the copy's buffer) or a close_notify
///   the socket will never announce again; then a read makes progress without the socket
///   becoming readable. `wants_read` is false exactly then (after the handshake). Likewise
///   when the read-ahead holds bytes the socket has already delivered, or a read has an error
///   to report.
/// * A peer that closes TCP without a close_notify (rustls: `UnexpectedEof`) has finished
///   sending, as with a FIN: everything pending is echoed, then echod's close_notify and FIN.
impl EchoStream for Session {
    const BUFFERED_WRITES: bool = true;

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.deferred.is_some() || (!self.connection().is_handshaking() && self.more_at_hand()) {
            return Poll::Ready(Ok(()));
        }
        self.tcp().poll_read_ready(cx)
    }

    fn tcp(&self) -> &TcpStream {
        self.tls.get_ref().0.tcp()
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
        let (io, session) = self.tls.get_mut();
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
