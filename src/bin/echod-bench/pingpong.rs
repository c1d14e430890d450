//! `pingpong`: every connection sends a message and waits for its whole echo.
//!
//! Closed loop by default (the next message leaves when the previous one is back). With
//! `--rate` it is open loop: messages leave on a fixed schedule whatever the server does, the
//! connection reading echoes concurrently, and latency counts from the intended send time, so a
//! stalled server shows up as latency instead of as fewer samples (no coordinated omission).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::conn::{close_with_reset, exchange, Conn};
use crate::pattern::Pattern;
use crate::run::{pace, slots_before, timed, Run, Window};
use crate::stats::{ErrorKind, Failure, Stats};

pub async fn run(run: &Run, size: usize, rate: Option<f64>) -> Duration {
    let n = run.connections as f64;
    let (stats, timeout) = (run.stats.clone(), run.timeout);
    let quotas: Arc<Vec<Option<u64>>> = Arc::new((0..run.connections).map(|id| run.share(id)).collect());
    run.each(move |id, conn, window| {
        let (stats, quota) = (stats.clone(), quotas[id as usize]);
        async move {
            match rate {
                None => closed_loop(conn, id, size, quota, window, timeout, stats).await,
                Some(rate) => {
                    // Each connection sends every n/rate seconds, the connections staggered
                    // evenly from the start of the traffic (or from when it connected, if later).
                    let period = Duration::from_secs_f64(n / rate);
                    let first =
                        (window.traffic + Duration::from_secs_f64(id as f64 / rate)).max(Instant::now());
                    let warm = slots_before(first, period, window.start);
                    let messages = match (quota, window.deadline) {
                        (Some(q), _) => warm + q,
                        (None, Some(end)) => slots_before(first, period, end),
                        (None, None) => 0,
                    };
                    open_loop(conn, id, size, first, period, messages, timeout, stats).await
                }
            }
        }
    })
    .await
}

async fn closed_loop(
    mut conn: Conn,
    id: u64,
    size: usize,
    quota: Option<u64>,
    window: Window,
    timeout: Duration,
    stats: Arc<Stats>,
) -> Result<(), Failure> {
    let pattern = Pattern::new(id);
    let mut out = vec![0u8; size];
    let mut back = vec![0u8; size];
    let mut offset = 0u64;
    let mut sent = 0u64;
    loop {
        if stats.finished(quota, sent, window.deadline) {
            break;
        }
        pattern.fill(offset, &mut out);
        let t0 = Instant::now();
        timed(id, "echo", timeout, exchange(&mut conn, &out, &mut back)).await?;
        let latency = t0.elapsed();
        verify(&pattern, id, offset, &back)?;
        if stats.done(id, t0, latency, size as u64) {
            sent += 1;
        }
        offset += size as u64;
    }
    finish(conn, id, timeout).await
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
pub async fn finish(mut stream: Conn, id: u64, timeout: Duration) -> Result<(), Failure> {
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
    stream: Conn,
    id: u64,
    size: usize,
    first: Instant,
    period: Duration,
    messages: u64,
    timeout: Duration,
    stats: Arc<Stats>,
) -> Result<(), Failure> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    // The writer tells the reader when each message was due (or left, if earlier).
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Instant, Instant)>();
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
            if tx.send((intended, from, Instant::now())).is_err() {
                break; // the reader failed
            }
            timed(id, "write", timeout, wr.write_all(&out)).await?;
        }
        Ok::<_, Failure>(wr)
    });
    let mut back = vec![0u8; size];
    let mut received = 0u64;
    let read_result: Result<(), Failure> = async {
        while let Some((intended, from, sent_at)) = rx.recv().await {
            let offset = received * size as u64;
            timed(id, "read", timeout, rd.read_exact(&mut back)).await?;
            let now = Instant::now();
            verify(&pattern, id, offset, &back)?;
            stats.done(id, intended, now - from, size as u64);
            stats.service(id, intended, now - sent_at);
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
    finish(rd.unsplit(wr), id, timeout).await
}
