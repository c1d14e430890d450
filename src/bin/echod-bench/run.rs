//! What every mode shares: the run's settings, timeouts, connection setup and pacing.

use std::future::Future;
use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::net::Connector;
use crate::progress::Progress;
use crate::stats::{ErrorKind, Failure, Stats};

/// Connections opened at once while setting up (the server's accept backlog is the limit that
/// matters; this keeps bursts well under a typical 1024).
pub const CONNECT_CONCURRENCY: usize = 256;

/// The settings and shared state of one run.
pub struct Run {
    pub connector: Connector,
    pub stats: Arc<Stats>,
    pub connections: u64,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub timeout: Duration,
    pub progress: Progress,
}

impl Run {
    /// Connection `i`'s share of `--count` (spread evenly, the first ones taking the remainder).
    pub fn share(&self, i: u64) -> Option<u64> {
        self.count.map(|n| n / self.connections + u64::from(i < n % self.connections))
    }

    /// Announces the measured phase (a machine-readable line on stderr, read by bench/run),
    /// starts the progress display, and returns the start instant and the deadline.
    pub fn begin_measure(&self) -> (Instant, Option<Instant>) {
        phase("measure");
        let start = Instant::now();
        self.progress.start(start);
        (start, self.duration.map(|d| start + d))
    }

    /// Ends the measured phase.
    pub fn end_measure(&self) {
        self.progress.finish();
        phase("done");
    }

    /// A bound on the whole measured phase, after which tasks are abandoned (as errors):
    /// the duration plus room for the last operations to time out.
    pub fn hard_limit(&self) -> Option<Duration> {
        self.duration.map(|d| d + self.timeout * 2 + Duration::from_secs(5))
    }

    /// Opens `n` connections with ids 0..n, a bounded number at a time; failures are counted.
    pub async fn connect_all(&self, n: u64) -> Vec<(u64, TcpStream)> {
        let mut set = JoinSet::new();
        let mut opened = Vec::with_capacity(n as usize);
        let mut next = 0u64;
        loop {
            while next < n && set.len() < CONNECT_CONCURRENCY && !self.stats.stopped() {
                let connector = self.connector.clone();
                let id = next;
                set.spawn(async move { (id, connector.connect(id).await) });
                next += 1;
            }
            match set.join_next().await {
                None => break,
                Some(Ok((id, Ok(stream)))) => {
                    self.stats.connections.fetch_add(1, Relaxed);
                    opened.push((id, stream));
                }
                Some(Ok((id, Err(e)))) => self
                    .stats
                    .fail(Failure::new(ErrorKind::Connect, format!("connection {id}: connect: {e}"))),
                Some(Err(e)) => self.stats.fail(Failure::new(ErrorKind::Io, format!("connect task: {e}"))),
            }
        }
        opened.sort_by_key(|(id, _)| *id);
        opened
    }

    /// Waits for every task, recording failures; tasks still running at the hard limit are
    /// abandoned and counted as timeouts.
    pub async fn join_all(&self, mut set: JoinSet<Result<(), Failure>>) {
        let limit = self.hard_limit().map(|d| tokio::time::Instant::now() + d);
        loop {
            let next = async {
                match limit {
                    Some(at) => tokio::time::timeout_at(at, set.join_next()).await.ok(),
                    None => Some(set.join_next().await),
                }
            };
            match next.await {
                Some(None) => break,
                Some(Some(Ok(Ok(())))) => {}
                Some(Some(Ok(Err(failure)))) => self.stats.fail(failure),
                Some(Some(Err(e))) => self.stats.fail(Failure::new(ErrorKind::Io, format!("task: {e}"))),
                None => {
                    let left = set.len();
                    set.abort_all();
                    self.stats.fail(Failure::new(
                        ErrorKind::Timeout,
                        format!(
                            "{left} connection task(s) still running past the run's time limit; abandoned"
                        ),
                    ));
                    break;
                }
            }
        }
    }
}

/// Prints a phase marker: `echod-bench: phase=NAME`.
pub fn phase(name: &str) {
    eprintln!("echod-bench: phase={name}");
}

/// Runs an I/O operation of connection `id` under the timeout, naming it in any error.
pub async fn timed<T>(
    id: u64,
    what: &str,
    timeout: Duration,
    fut: impl Future<Output = io::Result<T>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::io(id, what, e)),
        Err(_) => Err(Failure::new(
            ErrorKind::Timeout,
            format!("connection {id}: {what}: no progress for {timeout:?}"),
        )),
    }
}

/// Waits for an open-loop send time. The runtime's timer ticks in milliseconds, so it sleeps
/// until a millisecond before `intended` and returns at once after that: the send may leave up
/// to a millisecond early but is never made late by the timer. Returns the instant latency is
/// measured from: the intended time, or the actual send time if that is earlier.
pub async fn pace(intended: Instant) -> Instant {
    let margin = Duration::from_millis(1);
    let now = Instant::now();
    if intended > now + margin {
        tokio::time::sleep_until((intended - margin).into()).await;
    }
    intended.min(Instant::now())
}
