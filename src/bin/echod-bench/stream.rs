//! `stream`: every connection writes chunks back to back while a concurrent reader takes the
//! echo back and checks it. At the end the writer half-closes, and the reader expects the whole
//! stream back before the server's EOF.
//!
//! A chunk's latency runs from the start of its write to the arrival of its last echoed byte.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::conn::Conn;
use crate::pattern::Pattern;
use crate::pingpong::verify;
use crate::run::{timed, Run, Window};
use crate::stats::{ErrorKind, Failure, Stats};

/// The reader's buffer.
const READ_BUF: usize = 64 * 1024;

pub async fn run(run: &Run, size: usize) -> Duration {
    let (stats, timeout) = (run.stats.clone(), run.timeout);
    let quotas: Arc<Vec<Option<u64>>> = Arc::new((0..run.connections).map(|id| run.share(id)).collect());
    run.each(move |id, conn, window| {
        connection(conn, id, size, quotas[id as usize], window, timeout, stats.clone())
    })
    .await
}

async fn connection(
    stream: Conn,
    id: u64,
    size: usize,
    quota: Option<u64>,
    window: Window,
    timeout: Duration,
    stats: Arc<Stats>,
) -> Result<(), Failure> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let pattern = Pattern::new(id);
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    let writer_stats = stats.clone();
    let writer = tokio::spawn(async move {
        let mut written = 0u64;
        let mut chunks = 0u64;
        loop {
            if writer_stats.finished(quota, chunks, window.deadline) {
                break;
            }
            let began = Instant::now();
            let _ = tx.send(began);
            // Straight from the pattern's table: the writer does no per-byte work.
            for part in pattern.parts(written, size) {
                timed(id, "write", timeout, wr.write_all(part)).await?;
            }
            written += size as u64;
            // Chunks begun in the warm-up do not count against --count.
            if writer_stats.counts(began) {
                chunks += 1;
            }
        }
        timed(id, "shutdown", timeout, wr.shutdown()).await?;
        Ok::<_, Failure>((written, wr))
    });

    let mut buf = vec![0u8; READ_BUF];
    let mut received = 0u64;
    let mut next_chunk_end = size as u64;
    let read_result: Result<(), Failure> = async {
        loop {
            let n = timed(id, "read", timeout, rd.read(&mut buf)).await?;
            if n == 0 {
                return Ok(());
            }
            verify(&pattern, id, received, &buf[..n])?;
            received += n as u64;
            // Every chunk whose last byte is now back is done.
            let now = Instant::now();
            while received >= next_chunk_end {
                let Some(started) = rx.recv().await else { break };
                stats.done(id, started, now - started, size as u64);
                next_chunk_end += size as u64;
            }
        }
    }
    .await;
    if let Err(failure) = read_result {
        writer.abort();
        return Err(failure);
    }
    let (written, _wr) =
        writer.await.map_err(|e| Failure::new(ErrorKind::Io, format!("connection {id}: writer: {e}")))??;
    if received != written {
        return Err(Failure::new(
            ErrorKind::Eof,
            format!("connection {id}: server closed after echoing {received} of {written} bytes"),
        ));
    }
    Ok(())
}
