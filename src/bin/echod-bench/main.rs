//! echod-bench: a load client for TCP echo servers.
//!
//! Four modes: `pingpong` (request/response, closed or open loop), `stream` (continuous
//! full-duplex), `churn` (short connections at a bounded rate) and `hold` (many idle
//! connections). Every echoed byte is checked against a per-connection pattern; any mismatch,
//! early EOF or error makes the exit status 1. Results go to stdout, as text or (`--json`) as
//! one JSON object; progress and errors go to stderr.

mod churn;
mod hold;
mod net;
mod pattern;
mod pingpong;
mod progress;
mod run;
mod stats;
mod stream;
mod udp;

use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use serde::Serialize;

use crate::net::{check_open_files, Connector};
use crate::progress::Progress;
use crate::run::Run;
use crate::stats::{Stats, Summary};
use echod::rlimit::raise_open_files_limit;

/// Load client for TCP echo servers: every echoed byte is verified.
///
/// Exit status: 0 when every byte came back as sent, 1 on any mismatch, early EOF or error,
/// 2 on a usage error.
#[derive(Debug, Parser)]
#[command(name = "echod-bench", version, about, long_about = None, max_term_width = 100)]
struct Cli {
    /// Server address (host:port).
    #[arg(long, global = true, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    target: String,

    /// Concurrent connections (hold: connections to open) [default: pingpong/stream 1,
    /// churn 50, hold 1000].
    #[arg(long, short = 'c', global = true, value_name = "N")]
    connections: Option<u64>,

    /// How long to run (`10s`, `1m`); with --count, whichever ends first. Hold: how long to hold.
    /// [default: 10s when --count is not given]
    #[arg(long, short = 'd', global = true, value_name = "DURATION", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,

    /// Total messages (pingpong), chunks (stream) or connections (churn), over all connections.
    #[arg(long, short = 'n', global = true, value_name = "N")]
    count: Option<u64>,

    /// Runtime worker threads [default: CPUs available].
    #[arg(long, global = true, value_name = "N")]
    threads: Option<NonZeroUsize>,

    /// Print one JSON object on stdout at the end instead of the text summary.
    #[arg(long, global = true)]
    json: bool,

    /// Print every error (not only the first few) and setup details.
    #[arg(short, long, global = true)]
    verbose: bool,

    /// No progress output.
    #[arg(short, long, global = true)]
    quiet: bool,

    /// Longest wait for any one connect, read or write before it counts as an error.
    #[arg(long, global = true, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,

    /// Do not spread source addresses over 127.0.0.2-254 for a 127.x target (Linux).
    #[arg(long, global = true)]
    no_spread: bool,

    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Clone, Subcommand)]
enum Mode {
    /// Send a message, wait for its whole echo, repeat (closed loop); --rate makes it open loop.
    Pingpong {
        /// Message size (bytes; K/KiB and M/MiB suffixes accepted).
        #[arg(long, short = 's', default_value = "512", value_parser = parse_size)]
        size: usize,
        /// Messages per second over all connections, sent on a fixed schedule; latency then
        /// counts from the intended send time.
        #[arg(long, value_name = "PER_SECOND", value_parser = parse_rate)]
        rate: Option<f64>,
    },
    /// Write chunks continuously while a concurrent reader checks the echo.
    Stream {
        /// Chunk size of each write.
        #[arg(long, short = 's', default_value = "16KiB", value_parser = parse_size)]
        size: usize,
    },
    /// Connect, echo one message, close with a RST; repeat at a bounded rate.
    Churn {
        /// Message size.
        #[arg(long, short = 's', default_value = "64", value_parser = parse_size)]
        size: usize,
        /// New connections per second over all workers.
        #[arg(long, value_name = "PER_SECOND", default_value = "500", value_parser = parse_rate)]
        rate: f64,
        /// Stop when the connection-tracking table is fuller than this fraction.
        #[arg(long, value_name = "FRACTION", default_value_t = 0.5)]
        conntrack_limit: f64,
    },
    /// Open N connections, echo a byte on each, hold them, re-check a sample, close.
    Hold,
    /// UDP: sockets keep K datagrams in flight (or send at --rate); every one is checked.
    Udp(udp::Args),
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::Pingpong { .. } => "pingpong",
            Mode::Stream { .. } => "stream",
            Mode::Churn { .. } => "churn",
            Mode::Hold => "hold",
            Mode::Udp(_) => "udp",
        }
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let n: usize = digits.parse().map_err(|_| format!("`{s}` is not a size (e.g. 512, 16KiB, 1MiB)"))?;
    let mult = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return Err(format!("`{s}`: unknown unit (use K/KiB or M/MiB)")),
    };
    let size = n.checked_mul(mult).ok_or("size too large")?;
    if size == 0 || size > 64 * 1024 * 1024 {
        return Err("size must be between 1 byte and 64 MiB".into());
    }
    Ok(size)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !(r.is_finite() && r > 0.0) {
        return Err("rate must be greater than zero".into());
    }
    Ok(r)
}

/// The JSON report.
#[derive(Debug, Serialize)]
struct Report {
    mode: &'static str,
    target: SocketAddr,
    connections: u64,
    size: Option<usize>,
    rate: Option<f64>,
    threads: usize,
    source_spread: bool,
    ok: bool,
    #[serde(flatten)]
    summary: Summary,
    hold: Option<hold::HoldReport>,
}

fn usage_error(kind: clap::error::ErrorKind, message: impl std::fmt::Display) -> ! {
    Cli::command().error(kind, message).exit()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Mode::Udp(args) = &cli.mode {
        return udp::main(&cli, args);
    }
    let target = match cli.target.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => addr,
        _ => usage_error(
            clap::error::ErrorKind::ValueValidation,
            format!("cannot resolve --target `{}`", cli.target),
        ),
    };
    let connections = cli.connections.unwrap_or(match cli.mode {
        Mode::Churn { .. } => 50,
        Mode::Hold => 1000,
        _ => 1,
    });
    if connections == 0 {
        usage_error(clap::error::ErrorKind::ValueValidation, "--connections must be at least 1");
    }
    if matches!(cli.mode, Mode::Hold) && cli.count.is_some() {
        usage_error(
            clap::error::ErrorKind::ArgumentConflict,
            "hold takes --connections and --duration, not --count",
        );
    }
    if cli.count == Some(0) {
        usage_error(clap::error::ErrorKind::ValueValidation, "--count must be at least 1");
    }
    let duration = match (cli.duration, cli.count) {
        (None, None) => Some(Duration::from_secs(10)),
        (d, _) => d,
    };
    let threads =
        cli.threads.or_else(|| std::thread::available_parallelism().ok()).map_or(1, NonZeroUsize::get);

    let limit = raise_open_files_limit();
    // Every mode holds at most --connections sockets at once (churn: one per worker).
    if let Err(e) = check_open_files(connections, limit) {
        eprintln!("echod-bench: error: {e}");
        return ExitCode::FAILURE;
    }

    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("echod-bench: error: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };

    let stats = Arc::new(Stats::new(cli.verbose));
    let connector = Connector::new(target, !cli.no_spread, cli.timeout);
    let unit = match cli.mode {
        Mode::Pingpong { .. } => "msgs",
        Mode::Stream { .. } => "chunks",
        Mode::Churn { .. } | Mode::Hold => "conns",
        Mode::Udp(_) => unreachable!("udp::main runs the udp mode"),
    };
    let progress_duration = match cli.mode {
        Mode::Hold => None,
        _ => duration,
    };
    let progress = Progress::new(stats.clone(), progress_duration, cli.count, unit, !cli.quiet);
    if cli.verbose {
        eprintln!(
            "echod-bench: {} against {target}: {connections} connection(s), {threads} thread(s), open-files limit {}, source addresses {}",
            cli.mode.name(),
            limit.map_or("unknown".to_string(), |l| l.to_string()),
            if connector.spreads() { "127.0.0.2-254" } else { "default" },
        );
    }
    let run = Run {
        connector,
        stats: stats.clone(),
        connections,
        duration,
        count: cli.count,
        timeout: cli.timeout,
        progress,
    };

    let mode = cli.mode.clone();
    let (elapsed, hold) = runtime.block_on(async {
        match mode {
            Mode::Pingpong { size, rate } => (pingpong::run(&run, size, rate).await, None),
            Mode::Stream { size } => (stream::run(&run, size).await, None),
            Mode::Churn { size, rate, conntrack_limit } => {
                (churn::run(&run, size, rate, conntrack_limit).await, None)
            }
            Mode::Hold => {
                let (elapsed, report) = hold::run(&run, duration.unwrap_or(Duration::from_secs(10))).await;
                (elapsed, Some(report))
            }
            Mode::Udp(_) => unreachable!("udp::main runs the udp mode"),
        }
    });
    // Abandoned tasks (past the time limit) must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));

    let summary = stats.report(elapsed);
    let ok = summary.errors == 0
        && summary.connections_opened > 0
        && hold.as_ref().is_none_or(|h| h.held == connections && h.sample_ok == h.sampled);
    let (size, rate) = match cli.mode {
        Mode::Pingpong { size, rate } => (Some(size), rate),
        Mode::Stream { size } => (Some(size), None),
        Mode::Churn { size, rate, .. } => (Some(size), Some(rate)),
        Mode::Hold => (None, None),
        Mode::Udp(_) => unreachable!("udp::main runs the udp mode"),
    };
    let report = Report {
        mode: cli.mode.name(),
        target,
        connections,
        size,
        rate,
        threads,
        source_spread: run.connector.spreads(),
        ok,
        summary,
        hold,
    };
    if cli.json {
        println!("{}", serde_json::to_string(&report).expect("serializable report"));
    } else {
        print_text(&report);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        if report.summary.errors == 0 {
            eprintln!("echod-bench: error: the run did not complete (no connection opened, or not all held)");
        }
        ExitCode::FAILURE
    }
}

fn print_text(r: &Report) {
    let s = &r.summary;
    println!(
        "{} {} x{}{}{}  ({:.2} s, {} thread(s))",
        r.mode,
        r.target,
        r.connections,
        r.size.map_or(String::new(), |n| format!(", {n} B")),
        r.rate.map_or(String::new(), |n| format!(", rate {n}/s")),
        s.elapsed_s,
        r.threads
    );
    let unit = match r.mode {
        "pingpong" => "messages",
        "stream" => "chunks",
        _ => "connections",
    };
    println!(
        "  {:<12} {} {unit}, {:.1}/s, {:.2} MiB/s echoed",
        "throughput", s.messages, s.msgs_per_s, s.mib_per_s
    );
    let line = |name: &str, p: &stats::Percentiles| {
        println!(
            "  {:<12} p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1} µs  (n={})",
            name, p.p50, p.p90, p.p99, p.p999, p.max, p.count
        )
    };
    line("latency", &s.latency_us);
    if let Some(service) = &s.service_us {
        line("service", service);
    }
    if let Some(h) = &r.hold {
        println!(
            "  {:<12} {} held for {:.1} s (opened in {:.2} s); {} of {} sampled still echo",
            "hold", h.held, h.hold_s, h.setup_s, h.sample_ok, h.sampled
        );
    }
    println!("  {:<12} {} opened", "connections", s.connections_opened);
    println!("  {:<12} {} {}", "errors", s.errors, if r.ok { "(ok)" } else { "(FAILED)" });
    for (kind, n) in &s.error_kinds {
        println!("    {kind}: {n}");
    }
    for e in &s.first_errors {
        println!("    {e}");
    }
}
