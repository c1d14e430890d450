//! echod-bench: a load client for TCP echo servers.
//!
//! Five load modes: `pingpong` (request/response, closed or open loop), `stream` (continuous
//! full-duplex), `churn` (short connections at a bounded rate), `handshake` (churn over TLS,
//! timed to the end of the handshake) and `hold` (many idle connections); any of them over TLS,
//! behind a PROXY header, after a banner line. Every echoed byte is checked against a
//! per-connection pattern; any mismatch, early EOF or error makes the exit status 1. Results go
//! to stdout, as text or (`--json`) as one JSON object; progress and errors go to stderr.
//! `merge` combines the results of several runs (several machines, pods) into one.

mod churn;
mod conn;
mod hlog;
mod hold;
mod merge;
mod net;
mod pattern;
mod pingpong;
mod progress;
mod proxy;
mod run;
mod stats;
mod stream;
mod tls;
mod udp;

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{CommandFactory, Parser, Subcommand};
use serde::Serialize;

use crate::conn::ExpectBanner;
use crate::net::{check_open_files, Connector};
use crate::progress::Progress;
use crate::proxy::{Proxy, ProxySource, ProxyVersion};
use crate::run::{wall, Run};
use crate::stats::{Stats, Summary};
use crate::tls::{Tls, TlsOptions, TlsVersion};
use echod::rlimit::raise_open_files_limit;

/// Load client for TCP echo servers: every echoed byte is verified.
///
/// Exit status: 0 when every byte came back as sent, 1 on any mismatch, early EOF or error,
/// 2 on a usage error.
#[derive(Debug, Parser)]
#[command(name = "echod-bench", version, long_about = None, max_term_width = 100)]
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

    /// Write the latency histogram: to FILE as an HdrHistogram interval log (one line per
    /// second of the measured window), or with `-` embedded in the --json result and as one
    /// interval log line on stdout after it. `merge` reads either.
    #[arg(long, global = true, value_name = "FILE|-", help_heading = "Results")]
    histogram: Option<PathBuf>,

    /// This worker's name in the results and in `merge`'s rows (and the interval log's tag).
    #[arg(long, global = true, value_name = "NAME", env = "ECHOD_BENCH_WORKER", help_heading = "Results")]
    worker: Option<String>,

    /// Start at this wall-clock time (RFC 3339, UTC: `2026-12-01T10:00:00Z`), so that workers
    /// on several machines start together.
    #[arg(long, global = true, value_name = "TIME", value_parser = parse_start_at, help_heading = "Timing")]
    start_at: Option<SystemTime>,

    /// Open connections at this rate (per second), in every mode: a ramp instead of a burst.
    /// Each connection's traffic starts as soon as it is open.
    #[arg(long, global = true, value_name = "PER_SECOND", value_parser = parse_rate, help_heading = "Timing")]
    connect_rate: Option<f64>,

    /// Run the traffic this long before the measured window opens; work begun in it is left
    /// out of every figure and of --count.
    #[arg(long, global = true, value_name = "DURATION", value_parser = humantime::parse_duration, help_heading = "Timing")]
    warmup: Option<Duration>,

    /// Send a PROXY protocol header (v1 text, v2 binary) first on every connection.
    #[arg(long, global = true, value_name = "VERSION", help_heading = "PROXY protocol and banner")]
    proxy_protocol: Option<ProxyVersion>,

    /// The client address the PROXY header claims; without a port, one port per connection.
    /// Default: a distinct address per connection from 198.18.0.0/15 (IPv6: 2001:2::/48).
    #[arg(long, global = true, value_name = "IP[:PORT]", requires = "proxy_protocol", value_parser = proxy::parse_source, help_heading = "PROXY protocol and banner")]
    proxy_source: Option<ProxySource>,

    /// Read a banner line (up to `\n`) on every connection before the echo; it must not be
    /// empty and, with =TEXT, must equal TEXT or match it as a glob (`*`, `?`, `[...]`).
    /// The distinct banners are reported with their counts.
    #[arg(long, global = true, value_name = "TEXT", num_args = 0..=1, require_equals = true, default_missing_value = "", help_heading = "PROXY protocol and banner")]
    expect_banner: Option<String>,

    /// Speak TLS (after the PROXY header, before the banner).
    #[arg(long, global = true, help_heading = "TLS")]
    tls: bool,

    /// Trust the server certificates this PEM bundle signs.
    #[arg(long, global = true, value_name = "FILE", requires = "tls", help_heading = "TLS")]
    tls_ca: Option<PathBuf>,

    /// Accept any server certificate (the handshake's signatures are still checked).
    #[arg(long, global = true, requires = "tls", help_heading = "TLS")]
    insecure: bool,

    /// Client certificate chain (PEM) for mutual TLS; with --tls-key.
    #[arg(long, global = true, value_name = "FILE", requires = "tls", help_heading = "TLS")]
    tls_cert: Option<PathBuf>,

    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, global = true, value_name = "FILE", requires = "tls", help_heading = "TLS")]
    tls_key: Option<PathBuf>,

    /// Server name to send (SNI) and verify [default: the host of --target].
    #[arg(long, global = true, value_name = "NAME", requires = "tls", help_heading = "TLS")]
    sni: Option<String>,

    /// Only this TLS version [default: 1.2 and 1.3].
    #[arg(long, global = true, value_name = "VERSION", requires = "tls", help_heading = "TLS")]
    tls_version: Option<TlsVersion>,

    #[command(subcommand)]
    mode: Mode,

    /// Write the man page (`man`) or a shell completion script (`complete-bash`, `complete-zsh`,
    /// `complete-fish`, `complete-powershell`) to stdout and exit; needs no mode.
    #[arg(long, value_name = "KIND", value_enum)]
    #[allow(dead_code)] // read by echod::generate::requested, before a mode is required
    generate: Option<echod::generate::Generate>,
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
        /// New connections per second over all workers (the same as --connect-rate) [default: 500].
        #[arg(long, value_name = "PER_SECOND", value_parser = parse_rate)]
        rate: Option<f64>,
        /// Stop when the connection-tracking table is fuller than this fraction.
        #[arg(long, value_name = "FRACTION", default_value_t = 0.5)]
        conntrack_limit: f64,
    },
    /// Full TLS handshakes: connect, handshake, echo one message, close with a RST; repeat at a
    /// bounded rate. Latency runs from the connect to the end of the handshake. Needs --tls.
    Handshake {
        /// Message size.
        #[arg(long, short = 's', default_value = "64", value_parser = parse_size)]
        size: usize,
        /// New connections per second over all workers (the same as --connect-rate) [default: 500].
        #[arg(long, value_name = "PER_SECOND", value_parser = parse_rate)]
        rate: Option<f64>,
        /// Stop when the connection-tracking table is fuller than this fraction.
        #[arg(long, value_name = "FRACTION", default_value_t = 0.5)]
        conntrack_limit: f64,
    },
    /// Open N connections, echo a byte on each, hold them, re-check a sample, close.
    Hold,
    /// Merge the --json results of several runs (one per machine or pod) into one summary.
    Merge {
        /// Result files (`--json` output, or a worker's whole log with its result line in it).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// UDP: sockets keep K datagrams in flight (or send at --rate); every one is checked.
    Udp(udp::Args),
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::Pingpong { .. } => "pingpong",
            Mode::Stream { .. } => "stream",
            Mode::Churn { .. } => "churn",
            Mode::Handshake { .. } => "handshake",
            Mode::Hold => "hold",
            Mode::Merge { .. } => "merge",
            Mode::Udp(_) => "udp",
        }
    }
}

fn parse_start_at(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339(s.trim())
        .map_err(|e| format!("`{s}` is not an RFC 3339 UTC time (2026-12-01T10:00:00Z): {e}"))
}

/// How far ahead --start-at may be.
const START_AT_HORIZON: Duration = Duration::from_secs(24 * 3600);

fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
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
    worker: Option<String>,
    target: SocketAddr,
    connections: u64,
    size: Option<usize>,
    rate: Option<f64>,
    connect_rate: Option<f64>,
    threads: usize,
    source_spread: bool,
    proxy_protocol: Option<ProxyVersion>,
    tls: bool,
    tls_version: Option<TlsVersion>,
    /// Handshakes by the version they negotiated.
    tls_versions: Option<BTreeMap<String, u64>>,
    ok: bool,
    /// The requested start (`--start-at`), and how late this process was for it.
    start_at: Option<String>,
    start_late_s: Option<f64>,
    warmup_s: f64,
    /// The measured window, in seconds since the epoch.
    window_start: f64,
    window_end: f64,
    #[serde(flatten)]
    summary: Summary,
    hold: Option<hold::HoldReport>,
    banners: Option<BTreeMap<String, u64>>,
    other_banners: Option<u64>,
    histogram_file: Option<PathBuf>,
    histogram: Option<String>,
}

fn usage_error(kind: clap::error::ErrorKind, message: impl std::fmt::Display) -> ! {
    Cli::command().error(kind, message).exit()
}

fn invalid(flag: &str, message: impl std::fmt::Display) -> ! {
    usage_error(clap::error::ErrorKind::ValueValidation, format!("invalid value for {flag}: {message}"))
}

/// The host part of a `host:port` target (the default TLS server name).
fn target_host(target: &str) -> &str {
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

fn main() -> ExitCode {
    let _ = wall(Instant::now());
    if let Some(kind) = echod::generate::requested(Cli::command()) {
        return echod::generate::print(kind, Cli::command());
    }
    let cli = Cli::parse();
    if let Mode::Udp(args) = &cli.mode {
        return udp::main(&cli, args);
    }
    if let Mode::Merge { files } = &cli.mode {
        return merge::main(files, cli.json);
    }
    let target = match cli.target.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => addr,
        _ => usage_error(
            clap::error::ErrorKind::ValueValidation,
            format!("cannot resolve --target `{}`", cli.target),
        ),
    };
    let connections = cli.connections.unwrap_or(match cli.mode {
        Mode::Churn { .. } | Mode::Handshake { .. } => 50,
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
    if matches!(cli.mode, Mode::Hold) && cli.warmup.is_some() {
        usage_error(
            clap::error::ErrorKind::ArgumentConflict,
            "--warmup does not apply to hold, which measures the connections' setup",
        );
    }
    if cli.count == Some(0) {
        usage_error(clap::error::ErrorKind::ValueValidation, "--count must be at least 1");
    }
    // churn and handshake open connections at their --rate: --connect-rate is the same knob.
    let churn_rate = match &cli.mode {
        Mode::Churn { rate, .. } | Mode::Handshake { rate, .. } => match (rate, cli.connect_rate) {
            (Some(_), Some(_)) => usage_error(
                clap::error::ErrorKind::ArgumentConflict,
                "--connect-rate and --rate both set the connection rate of churn and handshake: give one",
            ),
            (r, c) => Some(r.or(c).unwrap_or(500.0)),
        },
        _ => None,
    };
    if matches!(cli.mode, Mode::Handshake { .. }) && !cli.tls {
        usage_error(clap::error::ErrorKind::MissingRequiredArgument, "handshake mode needs --tls");
    }
    let start_at = cli.start_at.inspect(|at| {
        if at.duration_since(SystemTime::now()).is_ok_and(|ahead| ahead > START_AT_HORIZON) {
            invalid("--start-at", "more than 24 hours ahead");
        }
    });
    let duration = match (cli.duration, cli.count) {
        (None, None) => Some(Duration::from_secs(10)),
        (d, _) => d,
    };
    let threads =
        cli.threads.or_else(|| std::thread::available_parallelism().ok()).map_or(1, NonZeroUsize::get);

    let mut connector = Connector::new(target, !cli.no_spread, cli.timeout);
    if let Some(version) = cli.proxy_protocol {
        let proxy = Proxy { version, source: cli.proxy_source };
        if let Err(e) = proxy.check(target) {
            invalid("--proxy-source", e);
        }
        connector.proxy = Some(proxy);
    }
    if let Some(text) = &cli.expect_banner {
        connector.banner = Some(ExpectBanner::parse(text).unwrap_or_else(|e| invalid("--expect-banner", e)));
    }
    if cli.tls {
        let opts = TlsOptions {
            ca: cli.tls_ca.clone(),
            insecure: cli.insecure,
            cert: cli.tls_cert.clone(),
            key: cli.tls_key.clone(),
            sni: cli.sni.clone(),
            version: cli.tls_version,
        };
        match Tls::new(&opts, target_host(&cli.target)) {
            Ok(tls) => connector.tls = Some(tls),
            Err((flag, message)) => invalid(flag, message),
        }
    }

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
    let unit = match cli.mode {
        Mode::Pingpong { .. } => "msgs",
        Mode::Stream { .. } => "chunks",
        Mode::Handshake { .. } => "handshakes",
        Mode::Udp(_) => unreachable!("udp::main runs the udp mode"),
        _ => "conns",
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
    let spreads = connector.spreads();
    let run = Run::new(
        connector,
        stats.clone(),
        connections,
        duration,
        cli.count,
        cli.timeout,
        cli.warmup.unwrap_or_default(),
        cli.connect_rate,
        progress,
    );

    let mode = cli.mode.clone();
    let (elapsed, hold, start_late) = runtime.block_on(async {
        // A coordinated start: wait for the wall-clock time (bounded: at most a day, checked above).
        let mut late = None;
        if let Some(at) = start_at {
            match at.duration_since(SystemTime::now()) {
                Ok(ahead) => tokio::time::sleep(ahead).await,
                Err(e) => {
                    let behind = e.duration();
                    eprintln!(
                        "echod-bench: warning: --start-at was {:.3} s ago; starting now",
                        behind.as_secs_f64()
                    );
                    late = Some(behind.as_secs_f64());
                }
            }
            late.get_or_insert(0.0);
        }
        let (elapsed, hold) = match mode {
            Mode::Pingpong { size, rate } => (pingpong::run(&run, size, rate).await, None),
            Mode::Stream { size } => (stream::run(&run, size).await, None),
            Mode::Churn { size, conntrack_limit, .. } => (
                churn::run(&run, size, churn_rate.unwrap_or(500.0), conntrack_limit, churn::Until::Echo)
                    .await,
                None,
            ),
            Mode::Handshake { size, conntrack_limit, .. } => (
                churn::run(&run, size, churn_rate.unwrap_or(500.0), conntrack_limit, churn::Until::Handshake)
                    .await,
                None,
            ),
            Mode::Hold => {
                let (elapsed, report) = hold::run(&run, duration.unwrap_or(Duration::from_secs(10))).await;
                (elapsed, Some(report))
            }
            Mode::Merge { .. } => unreachable!("merge returned above"),
            Mode::Udp(_) => unreachable!("udp::main runs the udp mode"),
        };
        (elapsed, hold, late)
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
        Mode::Churn { size, .. } | Mode::Handshake { size, .. } => (Some(size), churn_rate),
        Mode::Hold | Mode::Merge { .. } => (None, None),
        Mode::Udp(_) => unreachable!("udp::main runs the udp mode"),
    };
    let (window_start, window_end) = {
        let marks = run.marks.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let end = marks.1.unwrap_or(now);
        (wall(marks.0.unwrap_or(end).min(end)), wall(end))
    };
    let (banners, other_banners) = match run.connector.banner {
        Some(_) => {
            let (b, o) = stats.banners();
            (Some(b), Some(o))
        }
        None => (None, None),
    };
    let mut report = Report {
        mode: cli.mode.name(),
        worker: cli.worker.clone(),
        target,
        connections,
        size,
        rate,
        connect_rate: cli.connect_rate,
        threads,
        source_spread: spreads,
        proxy_protocol: cli.proxy_protocol,
        tls: cli.tls,
        tls_version: cli.tls_version,
        tls_versions: cli.tls.then(|| stats.tls_versions()),
        ok,
        start_at: start_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
        start_late_s: start_late,
        warmup_s: cli.warmup.unwrap_or_default().as_secs_f64(),
        window_start: epoch_secs(window_start),
        window_end: epoch_secs(window_end),
        summary,
        hold,
        banners,
        other_banners,
        histogram_file: None,
        histogram: None,
    };
    // The histogram: a file of its own, or embedded and on stdout.
    let mut histogram_line = None;
    let mut failed_output = false;
    match &cli.histogram {
        Some(path) if path.as_os_str() == "-" => {
            let whole = stats.latency();
            match hlog::encode(&whole).and_then(|encoded| {
                let line = hlog::window_line(&whole, window_start, elapsed, cli.worker.as_deref())?;
                Ok((encoded, line))
            }) {
                Ok((encoded, line)) => {
                    report.histogram = Some(encoded);
                    histogram_line = Some(line);
                }
                Err(e) => {
                    eprintln!("echod-bench: error: {e}");
                    failed_output = true;
                }
            }
        }
        Some(path) => {
            match hlog::interval_log(&stats.intervals(), window_start, cli.worker.as_deref())
                .and_then(|log| hlog::write_file(path, &log))
            {
                Ok(()) => report.histogram_file = Some(path.clone()),
                Err(e) => {
                    eprintln!("echod-bench: error: --histogram: {e}");
                    failed_output = true;
                }
            }
        }
        None => {}
    }
    if cli.json {
        match serde_json::to_string(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("echod-bench: error: cannot write the JSON report: {e}");
                failed_output = true;
            }
        }
    } else {
        print_text(&report);
    }
    if let Some(line) = histogram_line {
        println!("{line}");
    }
    if report.ok && !failed_output {
        ExitCode::SUCCESS
    } else {
        if report.summary.errors == 0 && !failed_output {
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
        "handshake" => "handshakes",
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
    if let Some(versions) = &r.tls_versions {
        let list: Vec<String> = versions.iter().map(|(v, n)| format!("TLS {v}: {n}")).collect();
        println!("  {:<12} {}", "tls", list.join(", "));
    }
    if let Some(banners) = &r.banners {
        merge::print_banners(banners, r.other_banners.unwrap_or(0));
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
