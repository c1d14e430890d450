//! `pingpong`: every connection sends a message and waits for its whole echo.
//!
//! Closed loop by default (the next message leaves when the previous one is back). With
//! `--rate` it is open loop: messages leave on a fixed schedule whatever the server does, the
//! connection reading echoes concurrently, and latency counts from the intended send time, so a
//! stalled server shows up as latency instead of as fewer samples (no coordinated omission).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::net::close_with_reset;
use crate::pattern::Pattern;
use crate::run::{pace, timed, Run};
use crate::stats::{ErrorKind, Failure, Stats};

pub async fn run(run: &Run, size: usize, rate: Option<f64>) -> Duration {
    let conns = run.connect_all(run.connections).await;
    let n = run.connections as f64;
    let (start, deadline) = run.begin_measure();
    let mut set = JoinSet::new();
    for (id, stream) in conns {
        let stats = run.stats.clone();
        let quota = run.share(id);
        let timeout = run.timeout;
        match rate {
            None => {
                set.spawn(closed_loop(stream, id, size, quota, deadline, timeout, stats));
            }
            Some(rate) => {
                // Each connection sends every n/rate seconds, the connections staggered evenly.
                let period = Duration::from_secs_f64(n / rate);
                let first = start + Duration::from_secs_f64(id as f64 / rate);
                let messages = match (quota, deadline) {
                    (Some(q), _) => q,
                    (None, Some(end)) => scheduled_before(first, period, end),
                    (None, None) => 0,
                };
                set.spawn(open_loop(stream, id, size, first, period, messages, timeout, stats));
            }
        }
    }
    run.join_all(set).await;
    let elapsed = start.elapsed();
    run.end_measure();
    elapsed
}

/// How many sends at `first + k * period` fall before `end`.
fn scheduled_before(first: Instant, period: Duration, end: Instant) -> u64 {
    if end <= first {
        return 0;
    }
    ((end - first).as_secs_f64() / period.as_secs_f64()).ceil() as u64
}

async fn closed_loop(
    mut stream: TcpStream,
    id: u64,
    size: usize,
    quota: Option<u64>,
    deadline: Option<Instant>,
    timeout: Duration,
    stats: Arc<Stats>,
) -> Result<(), Failure> {
    let pattern = Pattern::new(id);
    let mut out = vec![0u8; size];
    let mut back = vec![0u8; size];
    let mut offset = 0u64;
    let mut sent = 0u64;
    loop {
        if stats.finished(quota, sent, deadline) {
            break;
        }
        pattern.fill(offset, &mut out);
        let t0 = Instant::now();
        // Write and read concurrently so that a message larger than the socket buffers cannot
        // deadlock against a server that echoes as it reads.
        let (mut rd, mut wr) = stream.split();
        let (w, r) = tokio::join!(
            timed(id, "write", timeout, wr.write_all(&out)),
            timed(id, "read", timeout, rd.read_exact(&mut back)),
        );
        w?;
        r?;
        let latency = t0.elapsed();
        verify(&pattern, id, offset, &back)?;
        stats.done(id, latency, size as u64);
        offset += size as u64;
        sent += 1;
    }
    finish(stream, id, timeout).await
}

/// Checks an echoed message against the pattern.
pub fn verify(pattern: &Pattern, id: u64, offset: u64, got: &[u8]) -> Result<(), Failure> {
    pattern.check(offset, got).map_err(|at| {
        Failure::new(
            ErrorKind::Mismatch,
            format!(
                "connection {id}: echoed byte at stream offset {} is {:#04x}, expected {:#04x}",
                offset + at as u64,
                got[at],
                pattern.byte(offset + at as u64)
            ),
        )
    })
}

/// Ends a connection cleanly: half-close, then expect the server's EOF with no extra bytes.
pub async fn finish(mut stream: TcpStream, id: u64, timeout: Duration) -> Result<(), Failure> {
    timed(id, "shutdown", timeout, stream.shutdown()).await?;
    let mut extra = [0u8; 64];
    let n = timed(id, "read at end", timeout, stream.read(&mut extra)).await?;
    if n != 0 {
        close_with_reset(stream);
        return Err(Failure::new(
            ErrorKind::Eof,
            format!("connection {id}: {n} unexpected byte(s) after the last echo"),
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn open_loop(
    stream: TcpStream,
    id: u64,
    size: usize,
    first: Instant,
    period: Duration,
    messages: u64,
    timeout: Duration,
    stats: Arc<Stats>,
) -> Result<(), Failure> {
    let (mut rd, mut wr) = stream.into_split();
    // The writer tells the reader when each message was due (or left, if earlier).
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Instant)>();
    let pattern = Pattern::new(id);
    let writer_stats = stats.clone();
    let writer = tokio::spawn(async move {
        let mut out = vec![0u8; size];
        for k in 0..messages {
            if writer_stats.stopped() {
                break;
            }
            let intended = first + period.mul_f64(k as f64);
            let from = pace(intended).await;
            pattern.fill(k * size as u64, &mut out);
            if tx.send((from, Instant::now())).is_err() {
                break; // the reader failed
            }
            timed(id, "write", timeout, wr.write_all(&out)).await?;
        }
        Ok::<_, Failure>(wr)
    });
    let mut back = vec![0u8; size];
    let mut received = 0u64;
    let read_result: Result<(), Failure> = async {
        while let Some((from, sent_at)) = rx.recv().await {
            let offset = received * size as u64;
            timed(id, "read", timeout, rd.read_exact(&mut back)).await?;
            let now = Instant::now();
            verify(&pattern, id, offset, &back)?;
            stats.done(id, now - from, size as u64);
            stats.service(id, now - sent_at);
            received += 1;
        }
        Ok(())
    }
    .await;
    if let Err(failure) = read_result {
        drop(rx);
        writer.abort();
        return Err(failure);
    }
    let wr =
        writer.await.map_err(|e| Failure::new(ErrorKind::Io, format!("connection {id}: writer: {e}")))??;
    finish(rd.reunite(wr).expect("halves of one stream"), id, timeout).await
}
