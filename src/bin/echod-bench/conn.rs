//! One client connection, plain TCP or TLS over it, and what every mode does on one: the
//! banner line read before the echo, an echo of a message, and the close.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use echod::net::read_ahead::ReadAhead;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::run::timed;
use crate::stats::{ErrorKind, Failure};

/// A connection: TCP, or TLS over TCP.
#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    /// Over a read-ahead socket, like echod's own sessions: rustls reads 4 KiB at a time.
    Tls(Box<tokio_rustls::client::TlsStream<ReadAhead>>),
}

impl Conn {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Tcp(s) => s,
            Conn::Tls(s) => s.get_ref().0.tcp(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Closes a connection with a RST instead of a FIN (SO_LINGER 0): no TIME_WAIT on the client,
/// and the connection-tracking entry expires after 10 s instead of 120 s. A TLS connection
/// sends no close_notify first.
pub fn close_with_reset(conn: Conn) {
    let _ = socket2::SockRef::from(conn.tcp()).set_linger(Some(Duration::ZERO));
    drop(conn);
}

/// Writes `out` and reads exactly `back.len()` bytes at the same time, on one stream: a
/// message larger than the socket buffers cannot deadlock against a server that echoes as it
/// reads, and no split of the stream is needed.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    out: &[u8],
    back: &mut [u8],
) -> io::Result<()> {
    let (mut written, mut flushed, mut filled) = (0, false, 0);
    poll_fn(|cx| {
        while written < out.len() {
            match Pin::new(&mut *s).poll_write(cx, &out[written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        // TLS keeps records that the socket did not take yet: flush them out.
        if written == out.len() && !flushed {
            match Pin::new(&mut *s).poll_flush(cx) {
                Poll::Ready(Ok(())) => flushed = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        while filled < back.len() {
            let mut buf = ReadBuf::new(&mut back[filled..]);
            match Pin::new(&mut *s).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("server closed after echoing {filled} of {} bytes", back.len()),
                    )));
                }
                Poll::Ready(Ok(())) => filled += buf.filled().len(),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if flushed && filled == back.len() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// The longest banner line accepted.
pub const MAX_BANNER: usize = 4096;

/// `--expect-banner[=TEXT]`: what the banner line must be.
#[derive(Debug, Clone)]
pub enum ExpectBanner {
    /// Any non-empty line.
    Any,
    /// Exactly this text.
    Exact(String),
    /// A glob (`*`, `?`, `[...]`).
    Glob(glob::Pattern),
}

impl ExpectBanner {
    pub fn parse(s: &str) -> Result<ExpectBanner, String> {
        if s.is_empty() {
            Ok(ExpectBanner::Any)
        } else if s.contains(['*', '?', '[']) {
            glob::Pattern::new(s)
                .map(ExpectBanner::Glob)
                .map_err(|e| format!("`{s}` is not a valid glob: {e}"))
        } else {
            Ok(ExpectBanner::Exact(s.to_string()))
        }
    }

    fn accepts(&self, banner: &str) -> bool {
        match self {
            ExpectBanner::Any => true,
            ExpectBanner::Exact(text) => banner == text,
            ExpectBanner::Glob(pattern) => pattern.matches(banner),
        }
    }
}

/// Reads the banner line (up to `\n`, which is not part of it, nor a `\r` before it) before
/// anything was sent, so nothing may follow it yet. Returns the line, and separately whether it
/// is what `expect` asks for (the line is counted either way).
pub async fn read_banner<S: AsyncRead + Unpin>(
    s: &mut S,
    id: u64,
    timeout: Duration,
    expect: &ExpectBanner,
) -> Result<(String, Result<(), Failure>), Failure> {
    let mut buf = vec![0u8; MAX_BANNER + 1];
    let mut len = 0;
    let end = loop {
        let n = timed(id, "banner", timeout, s.read(&mut buf[len..])).await?;
        if n == 0 {
            return Err(Failure::new(
                ErrorKind::Banner,
                format!("connection {id}: server closed before a banner line ({len} bytes without `\\n`)"),
            ));
        }
        let start = len;
        len += n;
        if let Some(at) = buf[start..len].iter().position(|&b| b == b'\n') {
            break start + at;
        }
        if len > MAX_BANNER {
            return Err(Failure::new(
                ErrorKind::Banner,
                format!("connection {id}: banner longer than {MAX_BANNER} bytes"),
            ));
        }
    };
    if len > end + 1 {
        return Err(Failure::new(
            ErrorKind::Banner,
            format!(
                "connection {id}: {} byte(s) after the banner line before anything was sent",
                len - end - 1
            ),
        ));
    }
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = String::from_utf8_lossy(line).into_owned();
    let verdict = if text.is_empty() {
        Err(Failure::new(ErrorKind::Banner, format!("connection {id}: empty banner line")))
    } else if !expect.accepts(&text) {
        Err(Failure::new(
            ErrorKind::Banner,
            format!("connection {id}: banner `{}` is not the one expected ({expect:?})", text.escape_debug()),
        ))
    } else {
        Ok(())
    };
    Ok((text, verdict))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn banner_lines() {
        let any = ExpectBanner::Any;
        let glob = ExpectBanner::parse("pod-? *").unwrap();
        let cases: [(&[u8], &ExpectBanner, bool); 4] = [
            (b"hello\r\n", &any, true),
            (b"pod-1 10.0.0.1:5\n", &glob, true),
            (b"pod-12 x\n", &glob, false),
            (b"\n", &any, false),
        ];
        for (input, expect, ok) in cases {
            let (mut a, mut b) = tokio::io::duplex(64);
            tokio::io::AsyncWriteExt::write_all(&mut b, input).await.unwrap();
            let (text, verdict) = read_banner(&mut a, 0, Duration::from_secs(1), expect).await.unwrap();
            assert_eq!(verdict.is_ok(), ok, "{text:?}");
        }
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut b, b"hi\nextra").await.unwrap();
        assert!(read_banner(&mut a, 0, Duration::from_secs(1), &any).await.is_err());
        assert!(matches!(ExpectBanner::parse("exact text").unwrap(), ExpectBanner::Exact(_)));
        assert!(ExpectBanner::parse("[oops").is_err());
    }
}
