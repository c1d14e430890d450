//! `churn`: connect, send one message, take its echo back, close with a RST; repeat, at a
//! bounded rate.
//!
//! The rate bound protects the host: every loopback connection takes an entry in the kernel's
//! connection-tracking table (10 s after a RST, 120 s after a normal close), and when the table
//! is full the kernel drops new connections for every process on the machine. The table's fill
//! is checked before the run and every second during it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::net::{check_conntrack, close_with_reset, Connector};
use crate::pattern::Pattern;
use crate::pingpong::verify;
use crate::run::{pace, timed, Run};
use crate::stats::{ErrorKind, Failure, Stats};

pub async fn run(run: &Run, size: usize, rate: f64, conntrack_limit: f64) -> Duration {
    if let Err(e) = check_conntrack(conntrack_limit) {
        run.stats.fail(Failure::new(ErrorKind::Limit, e));
        return Duration::ZERO;
    }
    let (start, deadline) = run.begin_measure();
    let tickets = Arc::new(AtomicU64::new(0));
    let total = run.count;

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
            interval: Duration::from_secs_f64(1.0 / rate),
            size,
            timeout: run.timeout,
        };
        set.spawn(ctx.work());
    }
    run.join_all(set).await;
    watch.abort();
    let elapsed = start.elapsed();
    run.end_measure();
    elapsed
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
            if let Err(failure) = self.one(k, from, &mut out, &mut back).await {
                self.stats.fail(failure);
            }
        }
    }

    async fn one(&self, id: u64, from: Instant, out: &mut [u8], back: &mut [u8]) -> Result<(), Failure> {
        let mut stream = self
            .connector
            .connect(id)
            .await
            .map_err(|e| Failure::new(ErrorKind::Connect, format!("connection {id}: connect: {e}")))?;
        self.stats.connections.fetch_add(1, Relaxed);
        let pattern = Pattern::new(id);
        pattern.fill(0, out);
        let (mut rd, mut wr) = stream.split();
        let (w, r) = tokio::join!(
            timed(id, "write", self.timeout, wr.write_all(out)),
            timed(id, "read", self.timeout, rd.read_exact(back)),
        );
        let result = w.and(r.map(|_| ())).and_then(|()| verify(&pattern, id, 0, back));
        let done = Instant::now();
        close_with_reset(stream);
        result?;
        self.stats.done(id, done - from, self.size as u64);
        Ok(())
    }
}
