//! Counters, latency histograms and errors shared by every connection task, and the report
//! built from them at the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Histograms are sharded by connection id so that connections rarely contend for a lock.
const SHARDS: usize = 32;
/// Errors whose text is kept for the report (all are counted).
const KEPT_ERRORS: usize = 5;
/// Distinct banners kept with their counts; any further ones are only counted (a banner that
/// names the client address differs on every connection).
pub const KEPT_BANNERS: usize = 100;

/// Locks a mutex, also one that a panicking task left poisoned: the counters inside stay
/// meaningful, and a report is better than a second panic.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What went wrong, by kind; the kind names appear in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ErrorKind {
    /// Echoed bytes differ from what was sent (altered, stale, or another connection's).
    Mismatch,
    /// The server closed before echoing everything, or sent more than was sent to it.
    Eof,
    /// An operation took longer than --timeout.
    Timeout,
    /// A connection could not be opened.
    Connect,
    /// Any other I/O error (reset, refused, …).
    Io,
    /// The host's limits (connection tracking) stopped the run.
    Limit,
    /// The TLS handshake failed (certificate, version, protocol).
    Tls,
    /// The server's banner line was missing, too long or not the expected one.
    Banner,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Mismatch => "mismatch",
            ErrorKind::Eof => "eof",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::Io => "io",
            ErrorKind::Limit => "limit",
            ErrorKind::Tls => "tls",
            ErrorKind::Banner => "banner",
        }
    }
}

/// An error of one connection: its kind and a message naming the connection.
#[derive(Debug)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Failure {
        Failure { kind, message: message.into() }
    }

    /// Classifies an I/O error of connection `id` during `what`.
    pub fn io(id: u64, what: &str, e: std::io::Error) -> Failure {
        let kind = match e.kind() {
            std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
            std::io::ErrorKind::UnexpectedEof => ErrorKind::Eof,
            _ => ErrorKind::Io,
        };
        Failure::new(kind, format!("connection {id}: {what}: {e}"))
    }
}

/// Latency histograms count nanoseconds from 1 ns to one hour, at 3 significant digits.
pub const SIGNIFICANT_DIGITS: u8 = 3;
pub const HIGHEST_NS: u64 = 3_600_000_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_NS, SIGNIFICANT_DIGITS).expect("valid histogram bounds")
}

/// The latencies recorded in one slice of the measured window.
#[derive(Debug, Clone)]
pub struct Interval {
    /// When the slice began and how long it lasted.
    pub start: Instant,
    pub length: Duration,
    pub histogram: Histogram<u64>,
}

/// Everything the connection tasks record.
pub struct Stats {
    /// Messages (pingpong), chunks (stream) or connections (churn, hold) completed and verified.
    pub messages: AtomicU64,
    /// Bytes that came back echoed and verified.
    pub bytes: AtomicU64,
    /// Connections opened.
    pub connections: AtomicU64,
    /// Set to stop every task early (a host limit was reached).
    pub stop: AtomicBool,
    errors: AtomicU64,
    verbose: bool,
    kinds: Mutex<BTreeMap<ErrorKind, u64>>,
    kept: Mutex<Vec<String>>,
    latency: Vec<Mutex<Histogram<u64>>>,
    service: Vec<Mutex<Histogram<u64>>>,
    /// Work is counted from this instant on (the end of the warm-up); unset: not yet.
    measure_from: OnceLock<Instant>,
    /// The latency histogram cut into slices of the measured window, and where the next begins.
    intervals: Mutex<(Vec<Interval>, Option<Instant>)>,
    banners: Mutex<BTreeMap<String, u64>>,
    other_banners: AtomicU64,
    tls_versions: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub fn new(verbose: bool) -> Stats {
        Stats {
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            verbose,
            kinds: Mutex::new(BTreeMap::new()),
            kept: Mutex::new(Vec::new()),
            latency: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
            service: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
            measure_from: OnceLock::new(),
            intervals: Mutex::new((Vec::new(), None)),
            banners: Mutex::new(BTreeMap::new()),
            other_banners: AtomicU64::new(0),
            tls_versions: Mutex::new(BTreeMap::new()),
        }
    }

    /// Sets the start of the measured window: work done before it (the warm-up) runs but is not
    /// counted. Set once per run.
    pub fn measure_from(&self, start: Instant) {
        let _ = self.measure_from.set(start);
        lock(&self.intervals).1 = Some(start);
    }

    /// Whether a unit of work that began at `began` belongs to the measured window (it began
    /// after the warm-up). A unit counts in the window it began in, so `--count` stays exact.
    pub fn counts(&self, began: Instant) -> bool {
        self.measure_from.get().is_some_and(|start| began >= *start)
    }

    /// Records one completed, verified unit of work of `bytes` echoed bytes that began at
    /// `began`; returns whether it was counted (false for work begun in the warm-up).
    pub fn done(&self, id: u64, began: Instant, latency: Duration, bytes: u64) -> bool {
        if !self.counts(began) {
            return false;
        }
        let ns = (latency.as_nanos() as u64).max(1);
        lock(&self.latency[id as usize % SHARDS]).saturating_record(ns);
        self.messages.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
        true
    }

    /// Records a service time (from the actual send), kept beside the latency in open-loop runs.
    pub fn service(&self, id: u64, began: Instant, service: Duration) {
        if !self.counts(began) {
            return;
        }
        let ns = (service.as_nanos() as u64).max(1);
        lock(&self.service[id as usize % SHARDS]).saturating_record(ns);
    }

    /// Counts one banner line as received (`--expect-banner`).
    pub fn banner(&self, text: &str) {
        let mut banners = lock(&self.banners);
        if let Some(n) = banners.get_mut(text) {
            *n += 1;
        } else if banners.len() < KEPT_BANNERS {
            banners.insert(text.to_string(), 1);
        } else {
            self.other_banners.fetch_add(1, Relaxed);
        }
    }

    /// Counts the TLS version a handshake negotiated.
    pub fn tls_version(&self, version: Option<rustls::ProtocolVersion>) {
        let name = match version {
            Some(rustls::ProtocolVersion::TLSv1_2) => "1.2".to_string(),
            Some(rustls::ProtocolVersion::TLSv1_3) => "1.3".to_string(),
            Some(other) => format!("{other:?}"),
            None => "unknown".to_string(),
        };
        *lock(&self.tls_versions).entry(name).or_insert(0) += 1;
    }

    /// Handshakes by negotiated TLS version.
    pub fn tls_versions(&self) -> BTreeMap<String, u64> {
        lock(&self.tls_versions).clone()
    }

    /// Ends the current slice of the measured window at `now`: the latencies recorded since the
    /// last cut move into a slice of their own (the interval log's lines).
    pub fn cut_interval(&self, now: Instant) {
        let mut intervals = lock(&self.intervals);
        let Some(start) = intervals.1 else { return };
        if now <= start {
            return;
        }
        let mut histogram = new_histogram();
        for shard in &self.latency {
            let mut shard = lock(shard);
            histogram.add(&*shard).expect("same bounds");
            shard.reset();
        }
        intervals.0.push(Interval { start, length: now - start, histogram });
        intervals.1 = Some(now);
    }

    /// The slices of the measured window cut so far.
    pub fn intervals(&self) -> Vec<Interval> {
        lock(&self.intervals).0.clone()
    }

    /// Counts an error and keeps the text of the first few.
    pub fn fail(&self, failure: Failure) {
        let n = self.errors.fetch_add(1, Relaxed);
        *lock(&self.kinds).entry(failure.kind).or_insert(0) += 1;
        if self.verbose || n < KEPT_ERRORS as u64 {
            eprintln!("echod-bench: error: {}", failure.message);
        }
        let mut kept = lock(&self.kept);
        if kept.len() < KEPT_ERRORS {
            kept.push(failure.message);
        }
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Relaxed)
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }

    /// Whether a connection's loop should end: its quota of `done` units is reached, the
    /// deadline has passed, or the run was stopped.
    pub fn finished(&self, quota: Option<u64>, done: u64, deadline: Option<std::time::Instant>) -> bool {
        quota.is_some_and(|q| done >= q)
            || deadline.is_some_and(|d| std::time::Instant::now() >= d)
            || self.stopped()
    }

    fn merged(shards: &[Mutex<Histogram<u64>>]) -> Histogram<u64> {
        let mut all = new_histogram();
        for shard in shards {
            all.add(&*lock(shard)).expect("same bounds");
        }
        all
    }

    /// The whole measured window's latency histogram: every slice cut so far and what is
    /// recorded since.
    pub fn latency(&self) -> Histogram<u64> {
        // The same lock order as `cut_interval`: slices first, then the shards.
        let intervals = lock(&self.intervals);
        let mut all = Self::merged(&self.latency);
        for interval in &intervals.0 {
            all.add(&interval.histogram).expect("same bounds");
        }
        all
    }

    /// The banners seen, with their counts, and how many more were not kept.
    pub fn banners(&self) -> (BTreeMap<String, u64>, u64) {
        (lock(&self.banners).clone(), self.other_banners.load(Relaxed))
    }

    /// The summary of the run, `elapsed` being the measured interval.
    pub fn report(&self, elapsed: Duration) -> Summary {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let messages = self.messages.load(Relaxed);
        let bytes = self.bytes.load(Relaxed);
        let service = Self::merged(&self.service);
        let kinds = lock(&self.kinds);
        let mismatches = kinds.get(&ErrorKind::Mismatch).copied().unwrap_or(0);
        Summary {
            elapsed_s: secs,
            messages,
            bytes,
            msgs_per_s: messages as f64 / secs,
            mib_per_s: bytes as f64 / secs / (1024.0 * 1024.0),
            connections_opened: self.connections.load(Relaxed),
            latency_us: Percentiles::of(&self.latency()),
            service_us: (!service.is_empty()).then(|| Percentiles::of(&service)),
            errors: self.errors(),
            mismatches,
            error_kinds: kinds.iter().map(|(k, v)| (k.name().to_string(), *v)).collect(),
            first_errors: lock(&self.kept).clone(),
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let us = |ns: u64| ns as f64 / 1000.0;
        if h.is_empty() {
            return Percentiles {
                count: 0,
                min: 0.0,
                mean: 0.0,
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
            };
        }
        Percentiles {
            count: h.len(),
            min: us(h.min()),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// The measured part of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub elapsed_s: f64,
    pub messages: u64,
    pub bytes: u64,
    pub msgs_per_s: f64,
    pub mib_per_s: f64,
    pub connections_opened: u64,
    pub latency_us: Percentiles,
    pub service_us: Option<Percentiles>,
    pub errors: u64,
    pub mismatches: u64,
    pub error_kinds: BTreeMap<String, u64>,
    pub first_errors: Vec<String>,
}
