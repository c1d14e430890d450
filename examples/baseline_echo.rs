//! The classic minimal tokio echo server, as a baseline for echod's benchmarks.
//!
//! An accept loop and, per connection, a task that reads into a 4 KiB buffer and writes the
//! bytes back with `write_all`, with TCP_NODELAY set. No limits, metrics, timeouts or drain:
//! the least a tokio echo server can do, so the benchmarks show what echod's extras cost.
//! The one departure from the textbook version: the listen backlog is 1024, echod's default,
//! instead of the standard library's 128, so that bursts of connections meet the same queue.
//!
//! Usage: `cargo run --release --example baseline_echo -- [ADDR]` (default 127.0.0.1:0);
//! prints the bound address on stdout.

use std::io::Write;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let arg = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".to_string());
    let addr = arg
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{arg}: {e}")))?;
    let listener = bind(addr)?;
    println!("{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    loop {
        let (mut socket, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of files or a connection aborted before accept: keep serving the others.
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = socket.set_nodelay(true);
            let mut buf = [0u8; 4096];
            loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if socket.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}
