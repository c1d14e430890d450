//! `churn`: connect, send one message, take its echo back, close with a RST; repeat, at a
//! bounded rate. `handshake` is the same with TLS, timed to the end of the handshake: full
//! handshakes per second and their latency (session resumption is off).
//!
//! The rate bound protects the host: every loopback connection takes an entry in the kernel's
//! connection-tracking table (10 s after a RST, 120 s after a normal close), and when the table
//! is full the kernel drops new connections for every process on the machine. The table's fill
//! is checked before the run and every second during it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::conn::{close_with_reset, exchange};
use crate::net::{check_conntrack, Connector};
use crate::pattern::Pattern;
use crate::pingpong::verify;
use crate::run::{pace, slots_before, timed, Run};
use crate::stats::{ErrorKind, Failure, Stats};

/// What a connection's latency runs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The echo is back (churn).
    Echo,
    /// The TLS handshake is done (handshake).
    Handshake,
}

pub async fn run(run: &Run, size: usize, rate: f64, conntrack_limit: f64, until: Until) -> Duration {
    if let Err(e) = check_conntrack(conntrack_limit) {
        run.stats.fail(Failure::new(ErrorKind::Limit, e));
        return Duration::ZERO;
    }
    let window = run.begin(Instant::now());
    let (start, deadline) = (window.traffic, window.deadline);
    let interval = Duration::from_secs_f64(1.0 / rate);
    // Connections due in the warm-up come first and do not count against --count.
    let warm = slots_before(start, interval, window.start);
    let tickets = Arc::new(AtomicU64::new(0));
    let total = run.count.map(|n| n + warm);

    // Watch the connection-tracking table while connections churn.
    let stats = run.stats.clone();
    let watch = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Err(e) = check_conntrack(conntrack_limit) {
                stats.fail(Failure::new(ErrorKind::Limit, e));
                stats.stop.store(true, Relaxed);
                return;
            }
        }
    });

    let mut set = JoinSet::new();
    for _ in 0..run.connections {
        let ctx = Worker {
            connector: run.connector.clone(),
            stats: run.stats.clone(),
            tickets: tickets.clone(),
            total,
            start,
            deadline,
            interval,
            size,
            timeout: run.timeout,
            until,
        };
        set.spawn(ctx.work());
    }
    run.join_all(set).await;
    watch.abort();
    run.end(window)
}

struct Worker {
    connector: Connector,
    stats: Arc<Stats>,
    tickets: Arc<AtomicU64>,
    total: Option<u64>,
    start: Instant,
    deadline: Option<Instant>,
    interval: Duration,
    size: usize,
    timeout: Duration,
    until: Until,
}

impl Worker {
    /// Takes tickets (connection k is due at start + k * interval) until the count or the
    /// deadline is reached; an error is counted and the worker goes on with the next ticket.
    async fn work(self) -> Result<(), Failure> {
        let mut out = vec![0u8; self.size];
        let mut back = vec![0u8; self.size];
        loop {
            let k = self.tickets.fetch_add(1, Relaxed);
            let intended = self.start + self.interval.mul_f64(k as f64);
            if self.total.is_some_and(|n| k >= n)
                || self.deadline.is_some_and(|d| intended >= d)
                || self.stats.stopped()
            {
                return Ok(());
            }
            let from = pace(intended).await;
            if let Err(failure) = self.one(k, intended, from, &mut out, &mut back).await {
                self.stats.fail(failure);
            }
        }
    }

    async fn one(
        &self,
        id: u64,
        intended: Instant,
        from: Instant,
        out: &mut [u8],
        back: &mut [u8],
    ) -> Result<(), Failure> {
        let opened = self.connector.open(id, &self.stats).await?;
        let mut conn = opened.conn;
        let pattern = Pattern::new(id);
        pattern.fill(0, out);
        let result = timed(id, "echo", self.timeout, exchange(&mut conn, out, back))
            .await
            .and_then(|()| verify(&pattern, id, 0, back));
        let done = Instant::now();
        close_with_reset(conn);
        result?;
        let end = match self.until {
            Until::Echo => done,
            Until::Handshake => opened.handshaken,
        };
        self.stats.done(id, intended, end - from, self.size as u64);
        Ok(())
    }
}
