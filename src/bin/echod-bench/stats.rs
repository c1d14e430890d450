//! Counters, latency histograms and errors shared by every connection task, and the report
//! built from them at the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Histograms are sharded by connection id so that connections rarely contend for a lock.
const SHARDS: usize = 32;
/// Errors whose text is kept for the report (all are counted).
const KEPT_ERRORS: usize = 5;

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

fn new_histogram() -> Histogram<u64> {
    // Nanoseconds from 1 ns to one hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
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
        }
    }

    /// Records one completed, verified unit of work of `bytes` echoed bytes.
    pub fn done(&self, id: u64, latency: Duration, bytes: u64) {
        let ns = (latency.as_nanos() as u64).max(1);
        self.latency[id as usize % SHARDS].lock().unwrap().saturating_record(ns);
        self.messages.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }

    /// Records a service time (from the actual send), kept beside the latency in open-loop runs.
    pub fn service(&self, id: u64, service: Duration) {
        let ns = (service.as_nanos() as u64).max(1);
        self.service[id as usize % SHARDS].lock().unwrap().saturating_record(ns);
    }

    /// Counts an error and keeps the text of the first few.
    pub fn fail(&self, failure: Failure) {
        let n = self.errors.fetch_add(1, Relaxed);
        *self.kinds.lock().unwrap().entry(failure.kind).or_insert(0) += 1;
        if self.verbose || n < KEPT_ERRORS as u64 {
            eprintln!("echod-bench: error: {}", failure.message);
        }
        let mut kept = self.kept.lock().unwrap();
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
            all.add(&*shard.lock().unwrap()).expect("same bounds");
        }
        all
    }

    /// The summary of the run, `elapsed` being the measured interval.
    pub fn report(&self, elapsed: Duration) -> Summary {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let messages = self.messages.load(Relaxed);
        let bytes = self.bytes.load(Relaxed);
        let service = Self::merged(&self.service);
        let kinds = self.kinds.lock().unwrap();
        let mismatches = kinds.get(&ErrorKind::Mismatch).copied().unwrap_or(0);
        Summary {
            elapsed_s: secs,
            messages,
            bytes,
            msgs_per_s: messages as f64 / secs,
            mib_per_s: bytes as f64 / secs / (1024.0 * 1024.0),
            connections_opened: self.connections.load(Relaxed),
            latency_us: Percentiles::of(&Self::merged(&self.latency)),
            service_us: (!service.is_empty()).then(|| Percentiles::of(&service)),
            errors: self.errors(),
            mismatches,
            error_kinds: kinds.iter().map(|(k, v)| (k.name().to_string(), *v)).collect(),
            first_errors: self.kept.lock().unwrap().clone(),
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize)]
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
    fn of(h: &Histogram<u64>) -> Percentiles {
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
