//! echod's design at its least, as a second baseline for the benchmarks: one task per client
//! that echoes through `tokio::io::copy_bidirectional`, and nothing else (no metering, budget,
//! tick, timeouts, metrics or drain).
//!
//! `copy_bidirectional` joins two streams, and an echo has one, so the far end is the socket's
//! own write half: whatever the copy reads from the client it writes back to the client. That
//! far end never has anything to send; reading from it waits until the copy has shut it down
//! (after the client's FIN), then returns end of stream so the copy can finish. This is the
//! shape echod's direct echo has (`src/echo/mirror.rs`); the difference between the two in
//! `bench/run` is what echod's extras cost, and the difference between this and
//! `baseline_echo` is what the design itself costs over a read/write loop.
//!
//! Usage: `cargo run --release --example copy_echo -- [ADDR]` (default 127.0.0.1:0); prints
//! the bound address on stdout.

use std::io::{self, Write};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The client's end of the copy: reads from the socket. The copy never writes to it, since
/// the far end never yields a byte.
struct ClientSide<'a>(ReadHalf<'a>);

impl AsyncRead for ClientSide<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientSide<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::other("nothing is ever copied towards the client side")))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The far end of the copy: writes go back out of the socket; reads end once it is shut down.
struct FarSide<'a> {
    out: WriteHalf<'a>,
    closed: bool,
    waiting: Option<Waker>,
}

impl AsyncWrite for FarSide<'_> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.out).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.out).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(Pin::new(&mut self.out).poll_shutdown(cx))?;
        self.closed = true;
        if let Some(waker) = self.waiting.take() {
            waker.wake();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for FarSide<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        // Woken on every message by the other direction's traffic: keep the waker it already
        // has rather than clone one each time.
        match &self.waiting {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => self.waiting = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

async fn echo(mut socket: TcpStream) -> io::Result<()> {
    socket.set_nodelay(true)?;
    let (read, write) = socket.split();
    let mut client = ClientSide(read);
    let mut far = FarSide { out: write, closed: false, waiting: None };
    tokio::io::copy_bidirectional(&mut client, &mut far).await?;
    Ok(())
}

fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

#[tokio::main]
async fn main() -> io::Result<()> {
    let arg = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".to_string());
    let addr = arg.parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{arg}: {e}")))?;
    let listener = bind(addr)?;
    println!("{}", listener.local_addr()?);
    io::stdout().flush()?;
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                tokio::spawn(echo(socket));
            }
            Err(e) => {
                // Out of files or a connection aborted before accept: keep serving the others.
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}
