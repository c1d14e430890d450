//! `hold`: open N connections, echo one byte on each, keep them all open for --duration, then
//! check that a sample of them (1%, at least 100) still echoes, and close all with a RST.
//!
//! Latency here is the time to connect and get the first byte back.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use crate::conn::{close_with_reset, exchange, Conn};
use crate::pattern::Pattern;
use crate::pingpong::verify;
use crate::run::{pace, phase, timed, Run, CONNECT_CONCURRENCY};
use crate::stats::{ErrorKind, Failure};

/// What the hold mode adds to the report.
#[derive(Debug, Clone, Serialize)]
pub struct HoldReport {
    /// Connections open and verified during the hold.
    pub held: u64,
    /// Seconds taken to open and verify them all.
    pub setup_s: f64,
    /// Seconds they were held.
    pub hold_s: f64,
    /// Connections re-checked after the hold, and how many of them still echoed.
    pub sampled: u64,
    pub sample_ok: u64,
}

/// Echoes the pattern byte at `offset` on one connection.
async fn echo_byte(stream: &mut Conn, id: u64, offset: u64, timeout: Duration) -> Result<(), Failure> {
    let pattern = Pattern::new(id);
    let out = [pattern.byte(offset)];
    let mut back = [0u8; 1];
    timed(id, "echo", timeout, exchange(stream, &out, &mut back)).await?;
    verify(&pattern, id, offset, &back)
}

pub async fn run(run: &Run, hold: Duration) -> (Duration, HoldReport) {
    let n = run.connections;
    let start = Instant::now();
    let window = run.begin(start);

    // Open and verify every connection, a bounded number at a time (or at --connect-rate).
    let mut held: Vec<(u64, Conn)> = Vec::with_capacity(n as usize);
    let mut set = JoinSet::new();
    let mut next = 0u64;
    loop {
        while next < n && set.len() < CONNECT_CONCURRENCY && !run.stats.stopped() {
            let (id, connector, stats, timeout) =
                (next, run.connector.clone(), run.stats.clone(), run.timeout);
            let at = run.connect_rate.map(|rate| start + Duration::from_secs_f64(id as f64 / rate));
            set.spawn(async move {
                if let Some(at) = at {
                    pace(at).await;
                }
                let t0 = Instant::now();
                let mut stream = connector.open(id, &stats).await?.conn;
                echo_byte(&mut stream, id, 0, timeout).await?;
                stats.done(id, t0, t0.elapsed(), 1);
                Ok::<_, Failure>((id, stream))
            });
            next += 1;
        }
        match set.join_next().await {
            None => break,
            Some(Ok(Ok(conn))) => held.push(conn),
            Some(Ok(Err(failure))) => run.stats.fail(failure),
            Some(Err(e)) => run.stats.fail(Failure::new(ErrorKind::Io, format!("connect task: {e}"))),
        }
    }
    let setup = start.elapsed();
    held.sort_by_key(|(id, _)| *id);

    // Hold. The marker lets bench/run sample the server's memory while all are open.
    phase("hold");
    run.progress.println(&format!(
        "holding {} connections for {}",
        held.len(),
        humantime::format_duration(hold)
    ));
    let hold_start = Instant::now();
    tokio::time::sleep(hold).await;
    let hold_s = hold_start.elapsed().as_secs_f64();

    // Re-check an evenly spread sample.
    let count = held.len() as u64;
    let want = (count / 100).max(100).min(count);
    let step = count.checked_div(want).unwrap_or(1).max(1);
    let mut sample = JoinSet::new();
    let mut rest = Vec::with_capacity(held.len());
    let mut sampled = 0u64;
    for (i, (id, stream)) in held.into_iter().enumerate() {
        if (i as u64) % step == 0 && sampled < want {
            sampled += 1;
            let timeout = run.timeout;
            sample.spawn(async move {
                let mut stream = stream;
                echo_byte(&mut stream, id, 1, timeout).await.map(|()| stream)
            });
        } else {
            rest.push(stream);
        }
    }
    let mut sample_ok = 0u64;
    while let Some(joined) = sample.join_next().await {
        match joined {
            Ok(Ok(stream)) => {
                sample_ok += 1;
                close_with_reset(stream);
            }
            Ok(Err(failure)) => run.stats.fail(failure),
            Err(e) => run.stats.fail(Failure::new(ErrorKind::Io, format!("sample task: {e}"))),
        }
    }
    for stream in rest {
        close_with_reset(stream);
    }
    let elapsed = run.end(window);
    (elapsed, HoldReport { held: count, setup_s: setup.as_secs_f64(), hold_s, sampled, sample_ok })
}
