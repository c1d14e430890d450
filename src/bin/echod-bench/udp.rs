//! `udp`: datagrams to a UDP echo server, every one checked.
//!
//! Each socket (`--connections`) sends datagrams that carry a sequence number, a check of the
//! socket and the number, and the socket's own pattern (see [`crate::pattern`]) for the rest.
//! Closed loop by default: each socket keeps `--in-flight` datagrams outstanding, sending the
//! next as one comes back (or is given up as lost after `--loss-timeout`). With `--rate` it is
//! open loop: datagrams leave on a fixed schedule whatever comes back, and latency counts from
//! the intended send time.
//!
//! What comes back is classified, each kind counted apart:
//! * **corrupted**: wrong length, a header that does not check, a number never sent, or bytes
//!   that differ from the pattern: a failure (each one an error of the run);
//! * **duplicate**: a number that already came back;
//! * **reordered**: a number lower than one that came back before it (late, but whole);
//! * **lost**: sent, never back by the end of the run (after waiting `--loss-timeout` for the
//!   last ones): reported, and a failure over `--max-loss`.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

use crate::pattern::Pattern;
use crate::progress::Progress;
use crate::run::{pace, phase};
use crate::stats::{ErrorKind, Failure, Stats, Summary};
use crate::Cli;

/// Bytes before the pattern: the sequence number and its check.
pub const HEADER: usize = 16;
/// The largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;
/// Loopback source addresses sockets are spread over (as the stream modes do).
const SPREAD_ADDRS: u64 = 253;

/// The `udp` mode's own options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Datagram size in bytes (16 to 65507): the sequence number and its check, then the
    /// socket's pattern.
    #[arg(long, short = 's', default_value = "64", value_parser = parse_datagram_size)]
    pub size: usize,
    /// Datagrams each socket keeps in flight (closed loop).
    #[arg(long, short = 'k', value_name = "K", default_value = "8",
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub in_flight: u32,
    /// Datagrams per second over all sockets, sent on a fixed schedule (open loop); latency then
    /// counts from the intended send time.
    #[arg(long, value_name = "PER_SECOND", value_parser = crate::parse_rate)]
    pub rate: Option<f64>,
    /// Largest fraction of datagrams that may be lost (0 to 1) for the run to pass.
    #[arg(long, value_name = "FRACTION", default_value = "0", value_parser = parse_fraction)]
    pub max_loss: f64,
    /// How long a datagram may stay unanswered before it counts as lost (a closed loop then
    /// sends another in its place); also how long the run waits for the last ones.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub loss_timeout: Duration,
}

fn parse_datagram_size(s: &str) -> Result<usize, String> {
    let n = crate::parse_size(s)?;
    if !(HEADER..=MAX_DATAGRAM).contains(&n) {
        return Err(format!(
            "a datagram is {HEADER} to {MAX_DATAGRAM} bytes (it carries a {HEADER}-byte header)"
        ));
    }
    Ok(n)
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !(0.0..=1.0).contains(&f) {
        return Err("must be between 0 and 1".into());
    }
    Ok(f)
}

/// What one socket saw.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Counts {
    pub sent: u64,
    /// Distinct datagrams that came back intact.
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub corrupted: u64,
    /// Came back after being given up as lost (closed loop), so counted received, not lost.
    pub late: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.sent += o.sent;
        self.received += o.received;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.corrupted += o.corrupted;
        self.late += o.late;
    }
}

/// The `udp` part of the JSON report.
#[derive(Debug, Serialize)]
struct UdpReport {
    in_flight: Option<u32>,
    max_loss: f64,
    loss_ratio: f64,
    #[serde(flatten)]
    counts: Counts,
}

/// The JSON report: the other modes' shape, plus `udp`.
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
    udp: UdpReport,
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The check of datagram `seq` of socket `id`: a datagram of another socket, or with its number
/// altered, does not pass.
fn tag(id: u64, seq: u64) -> u64 {
    mix(mix(id ^ 0x243f_6a88_85a3_08d3) ^ seq)
}

/// One socket's datagrams: building and checking them.
struct Codec {
    id: u64,
    size: usize,
    pattern: Pattern,
}

impl Codec {
    fn fill(&self, seq: u64, buf: &mut [u8]) {
        buf[..8].copy_from_slice(&seq.to_le_bytes());
        buf[8..16].copy_from_slice(&tag(self.id, seq).to_le_bytes());
        self.pattern.fill(seq * (self.size - HEADER) as u64, &mut buf[HEADER..self.size]);
    }

    /// The sequence number of an intact datagram (one of the `sent` first), or what is wrong.
    fn check(&self, got: &[u8], sent: u64) -> Result<u64, String> {
        if got.len() != self.size {
            return Err(format!("{} bytes came back for {}-byte datagrams", got.len(), self.size));
        }
        let seq = u64::from_le_bytes(got[..8].try_into().expect("8 bytes"));
        let check = u64::from_le_bytes(got[8..16].try_into().expect("8 bytes"));
        if check != tag(self.id, seq) {
            return Err(format!("header {seq:#x}/{check:#x} is not one this socket sent"));
        }
        if seq >= sent {
            return Err(format!("sequence number {seq} was never sent"));
        }
        let offset = seq * (self.size - HEADER) as u64;
        self.pattern
            .check(offset, &got[HEADER..])
            .map_err(|at| format!("datagram {seq}: byte {} differs from what was sent", HEADER + at))?;
        Ok(seq)
    }
}

/// Send times of the datagrams in flight, by sequence number (a ring: a datagram back after
/// more than its length of others has its latency unknown, and is still counted).
struct SendTimes {
    slots: Vec<(u64, Instant)>,
}

impl SendTimes {
    fn new(len: usize, now: Instant) -> SendTimes {
        SendTimes { slots: vec![(u64::MAX, now); len.next_power_of_two()] }
    }
    fn put(&mut self, seq: u64, at: Instant) {
        let i = seq as usize & (self.slots.len() - 1);
        self.slots[i] = (seq, at);
    }
    fn get(&self, seq: u64) -> Option<Instant> {
        let (s, at) = self.slots[seq as usize & (self.slots.len() - 1)];
        (s == seq).then_some(at)
    }
}

/// Sequence numbers seen, one bit each.
#[derive(Default)]
struct Seen(Vec<u64>);

impl Seen {
    /// Marks `seq`; whether it was new.
    fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.0.len() {
            self.0.resize(word + 1, 0);
        }
        let new = self.0[word] & (1 << bit) == 0;
        self.0[word] |= 1 << bit;
        new
    }
    fn contains(&self, seq: u64) -> bool {
        self.0.get((seq / 64) as usize).is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }
}

/// How a socket decides when to send.
#[derive(Debug, Clone, Copy)]
enum Pacing {
    /// Keep this many in flight.
    Closed(u32),
    /// Datagram `k` is due at `first + k * period`.
    Open { first: Instant, period: Duration },
}

/// Everything one socket's task needs.
struct Job {
    socket: UdpSocket,
    id: u64,
    size: usize,
    pacing: Pacing,
    quota: Option<u64>,
    deadline: Option<Instant>,
    loss_timeout: Duration,
    stats: Arc<Stats>,
}

/// Runs the mode: called by `main` in place of the stream modes, with the global options.
pub fn main(cli: &Cli, args: &Args) -> ExitCode {
    let usage = |message: String| crate::usage_error(clap::error::ErrorKind::ValueValidation, message);
    let target = match cli.target.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => addr,
        _ => usage(format!("cannot resolve --target `{}`", cli.target)),
    };
    let connections = cli.connections.unwrap_or(1);
    if connections == 0 || connections > 10_000 {
        usage("--connections must be between 1 and 10000 sockets".into());
    }
    if cli.count == Some(0) {
        usage("--count must be at least 1".into());
    }
    // The stream modes' extras: a udp run has no warm-up, start time, connect pacing, PROXY
    // header, banner, TLS, histogram file or worker name (yet); refused rather than ignored.
    let unsupported = [
        ("--warmup", cli.warmup.is_some()),
        ("--start-at", cli.start_at.is_some()),
        ("--connect-rate", cli.connect_rate.is_some()),
        ("--proxy-protocol", cli.proxy_protocol.is_some()),
        ("--expect-banner", cli.expect_banner.is_some()),
        ("--tls", cli.tls),
        ("--histogram", cli.histogram.is_some()),
        ("--worker", cli.worker.is_some()),
    ];
    if let Some((flag, _)) = unsupported.iter().find(|(_, set)| *set) {
        crate::usage_error(
            clap::error::ErrorKind::ArgumentConflict,
            format!("{flag} does not apply to the udp mode"),
        );
    }
    let duration = match (cli.duration, cli.count) {
        (None, None) => Some(Duration::from_secs(10)),
        (d, _) => d,
    };
    let threads =
        cli.threads.or_else(|| std::thread::available_parallelism().ok()).map_or(1, NonZeroUsize::get);
    let spread = !cli.no_spread
        && cfg!(target_os = "linux")
        && matches!(target.ip(), IpAddr::V4(ip) if ip.is_loopback());
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("echod-bench: error: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
    let stats = Arc::new(Stats::new(cli.verbose));
    let progress = Progress::new(stats.clone(), duration, cli.count, "datagrams", !cli.quiet);
    let (elapsed, counts) =
        runtime.block_on(run(target, connections, spread, duration, cli.count, args, &stats, &progress));
    runtime.shutdown_timeout(Duration::from_secs(1));

    let summary = stats.report(elapsed);
    let loss_ratio = if counts.sent == 0 { 0.0 } else { counts.lost as f64 / counts.sent as f64 };
    let ok = summary.errors == 0
        && summary.connections_opened > 0
        && counts.received > 0
        && loss_ratio <= args.max_loss;
    let report = Report {
        mode: "udp",
        target,
        connections,
        size: Some(args.size),
        rate: args.rate,
        threads,
        source_spread: spread,
        ok,
        summary,
        udp: UdpReport {
            in_flight: args.rate.is_none().then_some(args.in_flight),
            max_loss: args.max_loss,
            loss_ratio,
            counts,
        },
    };
    if cli.json {
        println!("{}", serde_json::to_string(&report).expect("serializable report"));
    } else {
        print_text(&report);
    }
    if loss_ratio > args.max_loss {
        eprintln!(
            "echod-bench: error: {} of {} datagrams lost ({:.3}%), over --max-loss {}",
            counts.lost,
            counts.sent,
            loss_ratio * 100.0,
            args.max_loss
        );
    } else if report.summary.errors == 0 && !ok {
        eprintln!("echod-bench: error: the run did not complete (no socket opened, or nothing came back)");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    target: SocketAddr,
    connections: u64,
    spread: bool,
    duration: Option<Duration>,
    count: Option<u64>,
    args: &Args,
    stats: &Arc<Stats>,
    progress: &Progress,
) -> (Duration, Counts) {
    let mut sockets = Vec::with_capacity(connections as usize);
    for id in 0..connections {
        match open(target, id, spread).await {
            Ok(socket) => {
                stats.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                sockets.push((id, socket));
            }
            Err(e) => stats.fail(Failure::new(ErrorKind::Connect, format!("socket {id}: {e}"))),
        }
    }
    phase("measure");
    let start = Instant::now();
    stats.measure_from(start);
    progress.start(start);
    let deadline = duration.map(|d| start + d);
    let n = connections as f64;
    let mut set = JoinSet::new();
    for (id, socket) in sockets {
        let quota = count.map(|c| c / connections + u64::from(id < c % connections));
        let pacing = match args.rate {
            None => Pacing::Closed(args.in_flight),
            Some(rate) => Pacing::Open {
                first: start + Duration::from_secs_f64(id as f64 / rate),
                period: Duration::from_secs_f64(n / rate),
            },
        };
        let job = Job {
            socket,
            id,
            size: args.size,
            pacing,
            quota,
            deadline,
            loss_timeout: args.loss_timeout,
            stats: stats.clone(),
        };
        set.spawn(job.run());
    }
    // A bound on the whole run: its length, the wait for the last datagrams, and room.
    let limit =
        duration.map(|d| tokio::time::Instant::now() + d + args.loss_timeout * 2 + Duration::from_secs(10));
    let mut total = Counts::default();
    loop {
        let next = async {
            match limit {
                Some(at) => tokio::time::timeout_at(at, set.join_next()).await.ok(),
                None => Some(set.join_next().await),
            }
        };
        match next.await {
            Some(None) => break,
            Some(Some(Ok((counts, result)))) => {
                total.add(&counts);
                if let Err(failure) = result {
                    stats.fail(failure);
                }
            }
            Some(Some(Err(e))) => stats.fail(Failure::new(ErrorKind::Io, format!("socket task: {e}"))),
            None => {
                let left = set.len();
                set.abort_all();
                stats.fail(Failure::new(
                    ErrorKind::Timeout,
                    format!("{left} socket task(s) still running past the run's time limit; abandoned"),
                ));
                break;
            }
        }
    }
    let elapsed = start.elapsed();
    progress.finish();
    phase("done");
    (elapsed, total)
}

/// A socket for socket `id`, connected to the target (so only its datagrams are received),
/// with buffers large enough for the datagrams in flight.
async fn open(target: SocketAddr, id: u64, spread: bool) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let local = match (target, spread) {
        (SocketAddr::V4(_), true) => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (id % SPREAD_ADDRS) as u8)), 0)
        }
        (SocketAddr::V4(_), false) => SocketAddr::from(([0, 0, 0, 0], 0)),
        (SocketAddr::V6(_), _) => SocketAddr::from(([0u16; 8], 0)),
    };
    let socket = Socket::new(Domain::for_address(target), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&local.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.connect(target).await?;
    Ok(socket)
}

impl Job {
    /// Sends and checks until the quota or deadline, then waits for the last datagrams.
    async fn run(self) -> (Counts, Result<(), Failure>) {
        let mut state = SocketState::new(&self);
        let result = state.run(&self).await;
        (state.counts, result)
    }
}

struct SocketState {
    codec: Codec,
    out: Vec<u8>,
    back: Vec<u8>,
    times: SendTimes,
    seen: Seen,
    /// In send order, those not yet back or given up (lazily: entries already back are
    /// skipped when they reach the front).
    outstanding: VecDeque<(u64, Instant)>,
    in_flight: u64,
    highest: Option<u64>,
    counts: Counts,
}

impl SocketState {
    fn new(job: &Job) -> SocketState {
        let window = match job.pacing {
            Pacing::Closed(k) => (k as usize * 4).max(1024),
            Pacing::Open { .. } => 1 << 16,
        };
        SocketState {
            codec: Codec { id: job.id, size: job.size, pattern: Pattern::new(job.id) },
            out: vec![0u8; job.size],
            back: vec![0u8; MAX_DATAGRAM + 1],
            times: SendTimes::new(window, Instant::now()),
            seen: Seen::default(),
            outstanding: VecDeque::new(),
            in_flight: 0,
            highest: None,
            counts: Counts::default(),
        }
    }

    fn sending_done(&self, job: &Job) -> bool {
        job.quota.is_some_and(|q| self.counts.sent >= q)
            || job.deadline.is_some_and(|d| Instant::now() >= d)
            || job.stats.stopped()
    }

    /// Sends datagram number `sent` (latency counted from `from`).
    async fn send(&mut self, job: &Job, from: Instant) -> Result<(), Failure> {
        let seq = self.counts.sent;
        self.codec.fill(seq, &mut self.out);
        match job.socket.send(&self.out).await {
            Ok(_) => {}
            // The kernel refused this one (its buffer full, say): it is as good as lost.
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock) => {}
            // A previous datagram met a closed port: the server is not there.
            Err(e) => return Err(Failure::new(ErrorKind::Io, format!("socket {}: send: {e}", job.id))),
        }
        self.times.put(seq, from);
        self.outstanding.push_back((seq, Instant::now()));
        self.counts.sent += 1;
        self.in_flight += 1;
        Ok(())
    }

    /// Gives up the datagrams outstanding for longer than the loss timeout; returns when the
    /// next one will be due for that.
    fn expire(&mut self, job: &Job, now: Instant) -> Option<Instant> {
        while let Some(&(seq, at)) = self.outstanding.front() {
            if self.seen.contains(seq) {
                self.outstanding.pop_front();
            } else if now >= at + job.loss_timeout {
                self.outstanding.pop_front();
                self.in_flight -= 1;
                self.counts.lost += 1;
            } else {
                return Some(at + job.loss_timeout);
            }
        }
        None
    }

    /// Classifies one datagram that came back.
    fn receive(&mut self, job: &Job, len: usize) -> Result<(), Failure> {
        let now = Instant::now();
        let seq = match self.codec.check(&self.back[..len], self.counts.sent) {
            Ok(seq) => seq,
            Err(why) => {
                self.counts.corrupted += 1;
                return Err(Failure::new(
                    ErrorKind::Mismatch,
                    format!("socket {}: corrupted datagram: {why}", job.id),
                ));
            }
        };
        if !self.seen.insert(seq) {
            self.counts.duplicates += 1;
            return Ok(());
        }
        self.counts.received += 1;
        // Still outstanding, or already given up as lost?
        let outstanding = self.outstanding.front().is_some_and(|&(front, _)| seq >= front);
        if outstanding {
            self.in_flight -= 1;
        } else {
            self.counts.lost -= 1;
            self.counts.late += 1;
        }
        if self.highest.is_some_and(|h| seq < h) {
            self.counts.reordered += 1;
        }
        self.highest = Some(self.highest.map_or(seq, |h| h.max(seq)));
        let sent_at = self.times.get(seq);
        match sent_at {
            Some(from) => {
                job.stats.done(job.id, from, now - from, len as u64);
                if let Pacing::Open { .. } = job.pacing {
                    job.stats.service(job.id, from, now - from);
                }
            }
            // Back after its send time was overwritten: counted, without a latency.
            None => {
                job.stats.messages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                job.stats.bytes.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }

    async fn run(&mut self, job: &Job) -> Result<(), Failure> {
        loop {
            // Send what is due.
            let sending = !self.sending_done(job);
            let mut next_send = None;
            if sending {
                match job.pacing {
                    Pacing::Closed(k) => {
                        while self.in_flight < u64::from(k) && !self.sending_done(job) {
                            self.send(job, Instant::now()).await?;
                        }
                    }
                    Pacing::Open { first, period } => {
                        let due = first + period.mul_f64(self.counts.sent as f64);
                        if due <= Instant::now() + Duration::from_millis(1) {
                            let from = pace(due).await;
                            self.send(job, from).await?;
                            continue;
                        }
                        next_send = Some(due);
                    }
                }
            }
            let now = Instant::now();
            let expiry = self.expire(job, now);
            if !sending && self.in_flight == 0 {
                break;
            }
            // Take what has come back without waiting (no timer armed while datagrams flow).
            let mut took = 0;
            while took < 64 {
                match job.socket.try_recv(&mut self.back) {
                    Ok(len) => {
                        took += 1;
                        if let Err(failure) = self.receive(job, len) {
                            job.stats.fail(failure);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        return Err(Failure::new(
                            ErrorKind::Io,
                            format!("socket {}: nothing listening at the target (port unreachable)", job.id),
                        ));
                    }
                    Err(e) => return Err(Failure::io(job.id, "receive", e)),
                }
            }
            if took > 0 {
                continue;
            }
            // Wait for a datagram, the next send, the next loss, or the deadline.
            let mut wake = [next_send, expiry, job.deadline.filter(|_| sending)]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(now + job.loss_timeout);
            if wake < now {
                wake = now;
            }
            let received = tokio::select! {
                r = job.socket.recv(&mut self.back) => Some(r),
                () = tokio::time::sleep_until(wake.into()) => None,
            };
            match received {
                None => {}
                Some(Ok(len)) => {
                    // Every corruption is an error of the run; the run goes on to count them all.
                    if let Err(failure) = self.receive(job, len) {
                        job.stats.fail(failure);
                    }
                }
                Some(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    return Err(Failure::new(
                        ErrorKind::Io,
                        format!("socket {}: nothing listening at the target (port unreachable)", job.id),
                    ));
                }
                Some(Err(e)) => return Err(Failure::io(job.id, "receive", e)),
            }
        }
        Ok(())
    }
}

fn print_text(r: &Report) {
    let s = &r.summary;
    let u = &r.udp;
    println!(
        "udp {} x{}, {} B{}  ({:.2} s, {} thread(s))",
        r.target,
        r.connections,
        r.size.unwrap_or(0),
        match (r.rate, u.in_flight) {
            (Some(rate), _) => format!(", rate {rate}/s"),
            (None, Some(k)) => format!(", {k} in flight each"),
            _ => String::new(),
        },
        s.elapsed_s,
        r.threads
    );
    println!(
        "  {:<12} {} datagrams back, {:.1}/s, {:.2} MiB/s echoed",
        "throughput", s.messages, s.msgs_per_s, s.mib_per_s
    );
    let p = &s.latency_us;
    println!(
        "  {:<12} p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1} µs  (n={})",
        "latency", p.p50, p.p90, p.p99, p.p999, p.max, p.count
    );
    let c = &u.counts;
    println!(
        "  {:<12} {} sent, {} back, {} lost ({:.3}%), {} duplicates, {} reordered, {} late, {} corrupted",
        "datagrams",
        c.sent,
        c.received,
        c.lost,
        u.loss_ratio * 100.0,
        c.duplicates,
        c.reordered,
        c.late,
        c.corrupted
    );
    println!("  {:<12} {} opened", "sockets", s.connections_opened);
    println!("  {:<12} {} {}", "errors", s.errors, if r.ok { "(ok)" } else { "(FAILED)" });
    for (kind, n) in &s.error_kinds {
        println!("    {kind}: {n}");
    }
    for e in &s.first_errors {
        println!("    {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_check_and_every_alteration_is_caught() {
        let codec = Codec { id: 3, size: 64, pattern: Pattern::new(3) };
        let mut d = vec![0u8; 64];
        codec.fill(5, &mut d);
        assert_eq!(codec.check(&d, 6), Ok(5));
        assert!(codec.check(&d, 5).is_err(), "never sent");
        assert!(codec.check(&d[..63], 6).is_err(), "short");
        for at in [0, 9, 16, 63] {
            let mut bad = d.clone();
            bad[at] ^= 1;
            assert!(codec.check(&bad, 6).is_err(), "byte {at} altered");
        }
        let other = Codec { id: 4, size: 64, pattern: Pattern::new(4) };
        assert!(other.check(&d, 6).is_err(), "another socket's datagram");
    }

    #[test]
    fn seen_marks_each_number_once() {
        let mut seen = Seen::default();
        assert!(seen.insert(130));
        assert!(!seen.insert(130));
        assert!(seen.contains(130) && !seen.contains(129));
    }
}
