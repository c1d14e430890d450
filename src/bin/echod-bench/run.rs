//! What every mode shares: the run's settings, the measured window (warm-up, duration),
//! timeouts, connection setup (all at once, or a ramp at --connect-rate) and pacing.

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::task::{JoinHandle, JoinSet};

use crate::conn::Conn;
use crate::net::Connector;
use crate::progress::Progress;
use crate::stats::{lock, ErrorKind, Failure, Stats};

/// Connections opened at once while setting up (the server's accept backlog is the limit that
/// matters; this keeps bursts well under a typical 1024).
pub const CONNECT_CONCURRENCY: usize = 256;

/// Latency slices of the interval log (`--histogram`).
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The wall-clock time of an instant (both clocks read once, at the first call).
pub fn wall(t: Instant) -> SystemTime {
    static BASE: OnceLock<(Instant, SystemTime)> = OnceLock::new();
    let (i, s) = *BASE.get_or_init(|| (Instant::now(), SystemTime::now()));
    if t >= i {
        s + (t - i)
    } else {
        s - (i - t)
    }
}

/// The measured window: traffic begins at `traffic`; work that begins from `start` on (after
/// the warm-up) counts; none begins after `deadline`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub traffic: Instant,
    pub start: Instant,
    pub deadline: Option<Instant>,
}

/// The settings and shared state of one run.
pub struct Run {
    pub connector: Connector,
    pub stats: Arc<Stats>,
    pub connections: u64,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub timeout: Duration,
    pub warmup: Duration,
    /// Connections opened per second (a ramp); else as fast as the setup allows.
    pub connect_rate: Option<f64>,
    pub progress: Arc<Progress>,
    /// The task that marks the window's start and cuts the interval log's slices.
    marker: Mutex<Option<JoinHandle<()>>>,
    /// The window's start and end, once known.
    pub marks: Mutex<(Option<Instant>, Option<Instant>)>,
}

impl Run {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        connector: Connector,
        stats: Arc<Stats>,
        connections: u64,
        duration: Option<Duration>,
        count: Option<u64>,
        timeout: Duration,
        warmup: Duration,
        connect_rate: Option<f64>,
        progress: Progress,
    ) -> Run {
        Run {
            connector,
            stats,
            connections,
            duration,
            count,
            timeout,
            warmup,
            connect_rate,
            progress: Arc::new(progress),
            marker: Mutex::new(None),
            marks: Mutex::new((None, None)),
        }
    }

    /// Connection `i`'s share of `--count` (spread evenly, the first ones taking the remainder).
    pub fn share(&self, i: u64) -> Option<u64> {
        self.count.map(|n| n / self.connections + u64::from(i < n % self.connections))
    }

    /// Traffic begins at `traffic_start`; the window opens after the warm-up. At the window's
    /// start a task announces the measured phase (a machine-readable line on stderr, read by
    /// bench/run), starts the progress display, then cuts the latency histogram into slices.
    pub fn begin(&self, traffic_start: Instant) -> Window {
        let start = traffic_start + self.warmup;
        self.stats.measure_from(start);
        lock(&self.marks).0 = Some(start);
        let (stats, progress) = (self.stats.clone(), self.progress.clone());
        let marker = tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            phase("measure");
            progress.start(start);
            let mut tick = tokio::time::interval_at((start + INTERVAL).into(), INTERVAL);
            loop {
                let at = tick.tick().await;
                stats.cut_interval(at.into_std());
            }
        });
        *lock(&self.marker) = Some(marker);
        Window { traffic: traffic_start, start, deadline: self.duration.map(|d| start + d) }
    }

    /// Ends the measured phase; returns its length.
    pub fn end(&self, window: Window) -> Duration {
        if let Some(marker) = lock(&self.marker).take() {
            marker.abort();
        }
        let end = Instant::now();
        self.stats.cut_interval(end);
        lock(&self.marks).1 = Some(end);
        self.progress.finish();
        phase("done");
        end.saturating_duration_since(window.start)
    }

    /// A bound on the whole run past its start, after which tasks are abandoned (as errors):
    /// warm-up and duration plus room for the last operations to time out.
    pub fn hard_limit(&self) -> Option<Duration> {
        self.duration.map(|d| self.warmup + d + self.timeout * 4 + Duration::from_secs(5))
    }

    /// Opens `n` connections with ids 0..n, a bounded number at a time; failures are counted.
    pub async fn connect_all(&self, n: u64) -> Vec<(u64, Conn)> {
        let mut set = JoinSet::new();
        let mut opened = Vec::with_capacity(n as usize);
        let mut next = 0u64;
        loop {
            while next < n && set.len() < CONNECT_CONCURRENCY && !self.stats.stopped() {
                let (connector, stats) = (self.connector.clone(), self.stats.clone());
                let id = next;
                set.spawn(async move { (id, connector.open(id, &stats).await) });
                next += 1;
            }
            match set.join_next().await {
                None => break,
                Some(Ok((id, Ok(opened_conn)))) => opened.push((id, opened_conn.conn)),
                Some(Ok((_, Err(failure)))) => self.stats.fail(failure),
                Some(Err(e)) => self.stats.fail(Failure::new(ErrorKind::Io, format!("connect task: {e}"))),
            }
        }
        opened.sort_by_key(|(id, _)| *id);
        opened
    }

    /// Runs `work` on each of the run's connections and returns the measured interval. Without
    /// --connect-rate, every connection is opened first and the traffic starts when the last
    /// one is up; with it, connection i opens at start + i / rate and its traffic starts at
    /// once (a ramp, which the warm-up can leave out of the figures).
    pub async fn each<F, Fut>(&self, work: F) -> Duration
    where
        F: Fn(u64, Conn, Window) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<(), Failure>> + Send + 'static,
    {
        let mut set = JoinSet::new();
        let window = match self.connect_rate {
            None => {
                let conns = self.connect_all(self.connections).await;
                let window = self.begin(Instant::now());
                for (id, conn) in conns {
                    set.spawn(work(id, conn, window));
                }
                window
            }
            Some(rate) => {
                let t0 = Instant::now();
                let window = self.begin(t0);
                for id in 0..self.connections {
                    let at = t0 + Duration::from_secs_f64(id as f64 / rate);
                    if window.deadline.is_some_and(|d| at >= d) {
                        break;
                    }
                    let (connector, stats, work) = (self.connector.clone(), self.stats.clone(), work.clone());
                    set.spawn(async move {
                        pace(at).await;
                        if stats.stopped() {
                            return Ok(());
                        }
                        let opened = connector.open(id, &stats).await?;
                        work(id, opened.conn, window).await
                    });
                }
                window
            }
        };
        self.join_all(set).await;
        self.end(window)
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

/// How many of the instants `first + k * period` (k = 0, 1, …) fall before `end`: computed
/// the way the schedules compute them, so that the count agrees with the sends.
pub fn slots_before(first: Instant, period: Duration, end: Instant) -> u64 {
    if end <= first || period.is_zero() {
        return 0;
    }
    let mut k = ((end - first).as_secs_f64() / period.as_secs_f64()).ceil() as u64;
    while k > 0 && first + period.mul_f64((k - 1) as f64) >= end {
        k -= 1;
    }
    while first + period.mul_f64(k as f64) < end {
        k += 1;
    }
    k
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
