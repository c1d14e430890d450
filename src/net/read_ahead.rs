//! A TCP stream that reads ahead for callers that read in small pieces.
//!
//! rustls reads the socket at most 4 KiB at a time (its deframer grows in 4 KiB steps up to one
//! record), so a TLS session under bulk traffic makes about five `recv` calls per 16 KiB record
//! where the plain echo makes one per 256 KiB. [`ReadAhead`] sits between the socket and rustls:
//! a small read is served from a buffer that one large `recv` filled, so the session pays one
//! system call per [`READ_AHEAD`] bytes instead, and a memory copy for each piece.
//!
//! Memory: the buffer exists only while the socket keeps delivering full buffers. It is taken
//! when a small read finds it empty, and given back as soon as it is drained after a fill that
//! did not fill it (the socket had no more), so a quiet or interactive session holds nothing
//! and a bulk one holds [`READ_AHEAD`] bytes beside rustls' own record buffers. Reads as large
//! as the buffer go straight to the socket. Writes pass through untouched.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes one `recv` asks for when a small read finds nothing buffered. 32 KiB is two TLS records
/// and stays within the allocator's thread cache, so taking and returning it costs little.
pub const READ_AHEAD: usize = 32 * 1024;

/// A [`TcpStream`] whose small reads are served from one large read of the socket.
#[derive(Debug)]
pub struct ReadAhead {
    tcp: TcpStream,
    /// Bytes read from the socket and not yet handed out: `buf[start..end]`.
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    /// The last fill took all the buffer had room for: the socket may hold more.
    filled_up: bool,
}

impl ReadAhead {
    pub fn new(tcp: TcpStream) -> ReadAhead {
        ReadAhead { tcp, buf: None, start: 0, end: 0, filled_up: false }
    }

    /// The socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Bytes read from the socket and not handed out yet.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Whether a buffer is held now (for tests of the memory rule).
    pub fn holds_buffer(&self) -> bool {
        self.buf.is_some()
    }

    /// Hands out buffered bytes; returns the buffer once it is drained and the socket had no more.
    fn serve(&mut self, out: &mut ReadBuf<'_>) {
        let Some(buf) = &self.buf else { return };
        let n = out.remaining().min(self.end - self.start);
        out.put_slice(&buf[self.start..self.start + n]);
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if !self.filled_up {
                self.buf = None;
            }
        }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffered() > 0 {
            this.serve(out);
            return Poll::Ready(Ok(()));
        }
        if out.remaining() >= READ_AHEAD {
            return Pin::new(&mut this.tcp).poll_read(cx, out);
        }
        let buf = this.buf.get_or_insert_with(|| vec![0; READ_AHEAD].into_boxed_slice());
        let mut fill = ReadBuf::new(buf);
        let polled = Pin::new(&mut this.tcp).poll_read(cx, &mut fill);
        let n = fill.filled().len();
        if let Err(err) = ready!(polled) {
            this.buf = None;
            return Poll::Ready(Err(err));
        }
        this.end = n;
        this.filled_up = n == READ_AHEAD;
        if n == 0 {
            // End of stream: nothing to hand out, and nothing to keep the buffer for.
            this.buf = None;
        } else {
            this.serve(out);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (ReadAhead, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (ReadAhead::new(accepted.expect("accept").0), client.expect("connect"))
    }

    /// Small reads return every byte once, in order, and the buffer is gone once the socket is
    /// drained; EOF comes through.
    #[tokio::test]
    async fn small_reads_see_every_byte_and_the_buffer_is_returned_when_drained() {
        let (mut ahead, mut peer) = pair().await;
        let sent: Vec<u8> = (0..3 * READ_AHEAD + 123).map(|i| (i * 7 % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                peer.write_all(&sent).await.expect("write");
                peer.shutdown().await.expect("shutdown");
                peer
            })
        };
        let mut got = Vec::new();
        let mut piece = [0u8; 4096];
        loop {
            let n = ahead.read(&mut piece).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&piece[..n]);
            assert!(got.len() <= sent.len(), "more bytes than were sent");
        }
        assert_eq!(got, sent);
        assert_eq!(ahead.buffered(), 0);
        assert!(!ahead.holds_buffer(), "the buffer outlived the data");
        drop(writer.await.expect("writer task"));
    }

    /// One small message: read ahead, handed out, and the buffer returned at once (the fill was
    /// short, so the socket had nothing more).
    #[tokio::test]
    async fn a_short_fill_keeps_no_buffer_after_it_is_handed_out() {
        let (mut ahead, mut peer) = pair().await;
        peer.write_all(b"hello").await.expect("write");
        let mut piece = [0u8; 3];
        assert_eq!(ahead.read(&mut piece).await.expect("read"), 3);
        assert_eq!(&piece, b"hel");
        assert!(ahead.holds_buffer(), "two bytes are still buffered");
        assert_eq!(ahead.read(&mut piece).await.expect("read"), 2);
        assert_eq!(&piece[..2], b"lo");
        assert!(!ahead.holds_buffer());
    }

    /// Large reads bypass the buffer; writes pass through.
    #[tokio::test]
    async fn large_reads_go_straight_to_the_socket_and_writes_pass_through() {
        let (mut ahead, mut peer) = pair().await;
        peer.write_all(&[1u8; 1000]).await.expect("write");
        let mut big = vec![0u8; READ_AHEAD];
        let n = ahead.read(&mut big).await.expect("read");
        assert!(n > 0 && n <= 1000);
        assert!(!ahead.holds_buffer());
        ahead.write_all(b"back").await.expect("write through");
        let mut back = [0u8; 4];
        peer.read_exact(&mut back).await.expect("read back");
        assert_eq!(&back, b"back");
    }
}
