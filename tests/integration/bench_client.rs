//! echod-bench against the real echod (every mode must pass) and against broken echo servers
//! (every corruption must be caught and make the exit status non-zero).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crate::common;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A running echod, killed when dropped.
struct Echod {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Echod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first `127.0.0.1:PORT` in a log line.
fn find_addr(line: &str) -> Option<SocketAddr> {
    let start = line.find("127.0.0.1:")?;
    let rest = &line[start + "127.0.0.1:".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let port: u16 = digits.parse().ok()?;
    (port != 0).then(|| SocketAddr::from(([127, 0, 0, 1], port)))
}

fn start_echod() -> Echod {
    start_echod_with(&["--listen", "127.0.0.1:0"])
}

/// echod with these flags (which must include a `--listen` on 127.0.0.1:0), metrics off.
fn start_echod_with(args: &[&str]) -> Echod {
    let mut child = Command::new(env!("CARGO_BIN_EXE_echod"))
        .args(args)
        .args(["--metrics-listen", "off"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start echod");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    // Keep draining stderr after the address is found, so echod never blocks on a full pipe.
    thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent {
                if let Some(addr) = find_addr(&line) {
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(addr) => Echod { child, addr },
        Err(_) => {
            let _ = child.kill();
            panic!("echod logged no listening address within 10 s");
        }
    }
}

/// Runs echod-bench with a hard time bound; returns its output.
fn bench(target: SocketAddr, args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_echod-bench"))
        .arg("--target")
        .arg(target.to_string())
        // Under Wine (and a busy host) a socket can go seconds without progress: the runs
        // check correctness, not speed.
        .args([
            "--quiet",
            "--json",
            "--timeout",
            if std::env::var_os("ECHOD_TEST_WINE").is_some() { "10s" } else { "2s" },
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start echod-bench");
    common::output_within(child, Duration::from_secs(30), &format!("echod-bench {args:?}"))
}

fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "echod-bench {args:?} exited with {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_passes(target: SocketAddr, args: &[&str]) -> serde_json::Value {
    let out = bench(target, args);
    assert!(out.status.success(), "{}", describe(args, &out));
    let report = json_line(&out, &describe(args, &out));
    assert_eq!(report["ok"], true, "{}", describe(args, &out));
    assert_eq!(report["errors"], 0, "{}", describe(args, &out));
    assert!(report["messages"].as_u64().unwrap_or(0) > 0, "{}", describe(args, &out));
    report
}

#[test]
fn every_mode_passes_against_echod() {
    let echod = start_echod();
    let t = echod.addr;

    let r = assert_passes(t, &["pingpong", "-c", "4", "-d", "1s", "--size", "512"]);
    assert_eq!(r["connections_opened"], 4);
    assert!(r["latency_us"]["p50"].as_f64().unwrap() > 0.0);

    let r = assert_passes(t, &["pingpong", "-c", "4", "-d", "1s", "--rate", "400"]);
    let n = r["messages"].as_u64().unwrap();
    assert!((300..=500).contains(&n), "open loop at 400/s for 1 s sent {n} messages");
    assert_eq!(r["service_us"]["count"].as_u64(), Some(n));

    let r = assert_passes(t, &["pingpong", "-c", "3", "-n", "301", "--size", "100KiB"]);
    assert_eq!(r["messages"], 301);

    let r = assert_passes(t, &["stream", "-c", "2", "-d", "1s", "--size", "16KiB"]);
    assert!(r["mib_per_s"].as_f64().unwrap() > 0.0);

    let r = assert_passes(t, &["churn", "-c", "8", "-n", "100", "--rate", "200"]);
    assert_eq!(r["connections_opened"], 100);

    let r = assert_passes(t, &["hold", "-c", "100", "-d", "500ms"]);
    assert_eq!(r["hold"]["held"], 100);
    assert_eq!(r["hold"]["sample_ok"], 100);

    // The same with a ramp, a warm-up and the histogram embedded.
    let timing = ["--connect-rate", "200", "--warmup", "200ms", "--histogram", "-"];
    for mode in [
        &["pingpong", "-c", "4", "-n", "400"][..],
        &["stream", "-c", "2", "-n", "40"],
        &["churn", "-c", "4", "-n", "40"],
    ] {
        let r = assert_passes(t, &[&timing[..], mode].concat());
        assert_eq!(r["messages"].as_u64(), mode[4].parse().ok(), "{r}");
        assert_eq!(r["latency_us"]["count"], r["messages"]);
        assert!(r["histogram"].is_string(), "{r}");
    }
    let r =
        assert_passes(t, &["--connect-rate", "400", "--histogram", "-", "hold", "-c", "40", "-d", "100ms"]);
    assert_eq!(r["hold"]["sample_ok"], 40);
}

#[test]
fn usage_errors_exit_2() {
    let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for args in [
        &["hold", "--count", "5"][..],
        &["pingpong", "--size", "0"],
        &["pingpong", "--rate", "-1"],
        &["warp"],
    ] {
        let out = bench(target, args);
        assert_eq!(out.status.code(), Some(2), "{}", describe(args, &out));
    }
}

#[test]
fn nothing_listening_is_an_error() {
    // Bind then drop a listener to get a port where nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = bench(port, &["pingpong", "-n", "10"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&["pingpong"], &out));
}

/// How a broken server corrupts each connection's echo.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Flip the bits of the byte at this stream offset.
    Flip(u64),
    /// Leave out the byte at this stream offset.
    Drop(u64),
}

/// A test double: an echo server in the test that can require a PROXY header, terminate TLS,
/// send a banner line and corrupt the echo, standing in for server features echod lacks.
#[derive(Clone, Default)]
struct Double {
    /// Require a PROXY header of this version (1 or 2) first; its source is `{client}`.
    proxy: Option<u8>,
    /// Terminate TLS (after the PROXY header).
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Send this line first (after the handshake); `{client}` (the PROXY header's source, else
    /// the peer), `{tls}` (negotiated version), `{sni}` and `{cert}` (`yes` when the client sent
    /// a certificate) are filled in.
    banner: Option<&'static str>,
    fault: Option<Fault>,
}

/// What a double saw: accept times and the bytes it echoed.
#[derive(Default)]
struct Seen {
    accepted: Mutex<Vec<Instant>>,
    echoed: AtomicU64,
}

/// Starts a double; returns its address and what it sees.
fn start_double(double: Double) -> (SocketAddr, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let (tx, rx) = mpsc::channel();
    let seen2 = seen.clone();
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let Ok((socket, _)) = listener.accept().await else { continue };
                seen2.accepted.lock().unwrap().push(Instant::now());
                tokio::spawn(serve_double(socket, double.clone(), seen2.clone()));
            }
        });
    });
    (rx.recv_timeout(Duration::from_secs(5)).expect("double started"), seen)
}

/// Reads and checks a PROXY header of `version` whose destination is `local`; returns the
/// source it claims, or None (the connection is then closed without a byte echoed).
async fn read_proxy(socket: &mut tokio::net::TcpStream, version: u8, local: SocketAddr) -> Option<String> {
    const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut head = vec![0u8; 16];
    socket.read_exact(&mut head).await.ok()?;
    let (source, destination) = if head.starts_with(V2_SIG) {
        if version != 2 {
            return None;
        }
        let len = u16::from_be_bytes([head[14], head[15]]) as usize;
        head.resize(16 + len, 0);
        socket.read_exact(&mut head[16..]).await.ok()?;
        let header = ppp::v2::Header::try_from(&head[..]).ok()?;
        match header.addresses {
            ppp::v2::Addresses::IPv4(a) => (
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            ),
            ppp::v2::Addresses::IPv6(a) => (
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            ),
            _ => return None,
        }
    } else {
        if version != 1 {
            return None;
        }
        while !head.ends_with(b"\r\n") {
            if head.len() > 107 {
                return None;
            }
            let mut byte = [0u8; 1];
            socket.read_exact(&mut byte).await.ok()?;
            head.push(byte[0]);
        }
        let header = ppp::v1::Header::try_from(&head[..]).ok()?;
        match header.addresses {
            ppp::v1::Addresses::Tcp4(a) => (
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            ),
            ppp::v1::Addresses::Tcp6(a) => (
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            ),
            ppp::v1::Addresses::Unknown => return None,
        }
    };
    (destination == local).then(|| source.to_string())
}

async fn serve_double(mut socket: tokio::net::TcpStream, double: Double, seen: Arc<Seen>) {
    let (Ok(local), Ok(peer)) = (socket.local_addr(), socket.peer_addr()) else { return };
    let mut client = peer.to_string();
    if let Some(version) = double.proxy {
        match read_proxy(&mut socket, version, local).await {
            Some(source) => client = source,
            None => return,
        }
    }
    let fill = |template: &str, tls: &str, sni: &str, cert: &str| {
        template
            .replace("{client}", &client)
            .replace("{tls}", tls)
            .replace("{sni}", sni)
            .replace("{cert}", cert)
    };
    match double.tls {
        None => {
            let banner = double.banner.map(|b| fill(b, "", "", ""));
            echo_double(socket, banner, double.fault, seen).await
        }
        Some(config) => {
            let Ok(stream) = tokio_rustls::TlsAcceptor::from(config).accept(socket).await else { return };
            let conn = stream.get_ref().1;
            let tls = match conn.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
                Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
                _ => "?",
            };
            let sni = conn.server_name().unwrap_or("").to_string();
            let cert = if conn.peer_certificates().is_some_and(|c| !c.is_empty()) { "yes" } else { "no" };
            let banner = double.banner.map(|b| fill(b, tls, &sni, cert));
            echo_double(stream, banner, double.fault, seen).await
        }
    }
}

async fn echo_double<S: AsyncRead + AsyncWrite + Unpin>(
    mut socket: S,
    banner: Option<String>,
    fault: Option<Fault>,
    seen: Arc<Seen>,
) {
    if let Some(banner) = banner {
        if socket.write_all(format!("{banner}\n").as_bytes()).await.is_err() {
            return;
        }
    }
    let mut buf = vec![0u8; 4096];
    let mut offset = 0u64;
    loop {
        let n = match socket.read(&mut buf).await {
            Ok(0) => {
                // Echo done: close our side too (TLS: close_notify, then FIN).
                let _ = socket.shutdown().await;
                return;
            }
            Err(_) => return,
            Ok(n) => n,
        };
        let mut chunk = buf[..n].to_vec();
        let range = offset..offset + n as u64;
        match fault {
            Some(Fault::Flip(at)) if range.contains(&at) => chunk[(at - offset) as usize] ^= 0xff,
            Some(Fault::Drop(at)) if range.contains(&at) => {
                chunk.remove((at - offset) as usize);
            }
            _ => {}
        }
        offset += n as u64;
        seen.echoed.fetch_add(n as u64, Ordering::Relaxed);
        if socket.write_all(&chunk).await.is_err() {
            return;
        }
    }
}

/// Starts an echo server that corrupts every connection once; returns its address.
fn start_broken(fault: Fault) -> SocketAddr {
    start_double(Double { fault: Some(fault), ..Double::default() }).0
}

fn assert_fails(target: SocketAddr, args: &[&str], expect: &str) {
    let out = bench(target, args);
    let text = describe(args, &out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let report = json_line(&out, &text);
    assert_eq!(report["ok"], false, "{text}");
    assert!(report["error_kinds"][expect].as_u64().unwrap_or(0) > 0, "expected a `{expect}` error: {text}");
}

#[test]
fn corrupted_echo_fails_the_run() {
    let flip = start_broken(Fault::Flip(700));
    assert_fails(flip, &["pingpong", "-c", "2", "-n", "20", "--size", "512"], "mismatch");
    assert_fails(flip, &["pingpong", "-c", "2", "-n", "20", "--rate", "200"], "mismatch");
    assert_fails(flip, &["stream", "-c", "1", "-n", "8", "--size", "1KiB"], "mismatch");
    assert_fails(flip, &["churn", "-c", "2", "-n", "4", "--size", "1KiB", "--rate", "100"], "mismatch");

    // A dropped byte shifts the rest of the stream; in a closed loop the message missing it
    // never completes.
    let drop = start_broken(Fault::Drop(100));
    assert_fails(drop, &["stream", "-c", "1", "-n", "8", "--size", "1KiB"], "mismatch");
    assert_fails(drop, &["pingpong", "-c", "1", "-n", "3", "--size", "64"], "timeout");

    // Hold: the first byte echoes, the re-check after the hold does not.
    let late = start_broken(Fault::Drop(1));
    assert_fails(late, &["hold", "-c", "3", "-d", "10ms"], "timeout");
}

// ------------------------------------------------------------------------------------------
// Results that merge, coordinated start, ramp and warm-up.

/// A directory for a test's files, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("echod-bench-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("write a test file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `echod-bench ARGS` (no --target or other defaults), bounded in time.
fn bench_raw(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_echod-bench"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start echod-bench");
    common::output_within(child, Duration::from_secs(30), &format!("echod-bench {args:?}"))
}

/// The first JSON line of an output.
fn json_line(out: &Output, what: &str) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON line: {what}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {what}"))
}

/// The sum of the intervals of an interval log, read with the hdrhistogram crate itself.
fn log_histogram(log: &[u8]) -> hdrhistogram::Histogram<u64> {
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    let mut all = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for entry in IntervalLogIterator::new(log) {
        if let LogEntry::Interval(i) = entry.expect("a valid interval log") {
            all.add(decode(i.encoded_histogram())).unwrap();
        }
    }
    all
}

fn decode(base64: &str) -> hdrhistogram::Histogram<u64> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(base64).expect("base64");
    hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .expect("a V2 histogram")
}

#[test]
fn merge_is_exact() {
    let echod = start_echod();
    let dir = TempDir::new("merge");
    let hlog = dir.path("a.hlog");
    let hlog_arg = hlog.to_str().unwrap();
    // One worker with an interval log file (and long enough for several intervals), one with the
    // histogram embedded and on stdout.
    let a =
        bench(echod.addr, &["--worker", "a", "--histogram", hlog_arg, "pingpong", "-c", "2", "-d", "2200ms"]);
    assert!(a.status.success(), "{}", describe(&["a"], &a));
    let a_json = dir.write("a.json", &a.stdout);
    let b = bench(
        echod.addr,
        &["--worker", "b", "--histogram", "-", "pingpong", "-c", "3", "-n", "700", "--rate", "2000"],
    );
    assert!(b.status.success(), "{}", describe(&["b"], &b));
    let b_log = dir.write("b.log", &b.stdout);
    let (ra, rb) = (json_line(&a, "a"), json_line(&b, "b"));

    // The interval log is HdrHistogram's, and sums to the run's count.
    let log = std::fs::read(&hlog).unwrap();
    let text = String::from_utf8_lossy(&log);
    assert!(text.contains("#[StartTime: ") && text.contains("#[BaseTime: "), "{text}");
    assert!(text.lines().filter(|l| l.starts_with("Tag=a,")).count() >= 2, "{text}");
    let ha = log_histogram(&log);
    assert_eq!(ha.len(), ra["latency_us"]["count"].as_u64().unwrap());
    assert_eq!(ra["histogram_file"].as_str(), Some(hlog_arg));
    // Embedded, and as one interval line after the JSON.
    let hb = decode(rb["histogram"].as_str().expect("embedded histogram"));
    assert_eq!(hb.len(), 700);
    let b_text = String::from_utf8_lossy(&b.stdout);
    let line = b_text.lines().nth(1).expect("an interval line after the JSON");
    assert!(line.starts_with("Tag=b,"), "{line}");
    assert_eq!(log_histogram(format!("{line}\n").as_bytes()).len(), 700);

    let out = bench_raw(&["merge", "--json", a_json.to_str().unwrap(), b_log.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&["merge"], &out));
    let m = json_line(&out, "merge");
    let sum = |k: &str| ra[k].as_u64().unwrap() + rb[k].as_u64().unwrap();
    for k in ["messages", "bytes", "errors", "connections_opened"] {
        assert_eq!(m[k].as_u64(), Some(sum(k)), "{k}: {m}");
    }
    let mut both = ha.clone();
    both.add(&hb).unwrap();
    assert_eq!(m["latency_us"]["count"].as_u64(), Some(both.len()));
    assert_eq!(both.len(), sum("messages"));
    for (key, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
        assert_eq!(m["latency_us"][key].as_f64(), Some(both.value_at_quantile(q) as f64 / 1000.0), "{key}");
    }
    assert_eq!(m["latency_us"]["max"].as_f64(), Some(both.max() as f64 / 1000.0));
    // Throughput over the union of the two (disjoint) windows.
    let span =
        |r: &serde_json::Value| r["window_end"].as_f64().unwrap() - r["window_start"].as_f64().unwrap();
    let union = span(&ra) + span(&rb);
    assert!((m["elapsed_s"].as_f64().unwrap() - union).abs() < 1e-6, "{m}");
    let rows = m["per_worker"].as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["worker"].as_str().unwrap()).collect::<Vec<_>>(), ["a", "b"]);

    // The text summary has the same totals and a row per worker.
    let out = bench_raw(&["merge", a_json.to_str().unwrap(), b_log.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&format!("{} ops", sum("messages"))), "{text}");
    assert!(text.lines().any(|l| l.trim_start().starts_with("b ")), "{text}");

    // A histogram that is not the result's own, another mode, or no histogram: refused.
    let tampered = String::from_utf8_lossy(&a.stdout).replace("\"worker\":\"a\"", "\"worker\":\"x\"");
    let mut doctored: serde_json::Value = serde_json::from_str(tampered.trim()).unwrap();
    doctored["latency_us"]["count"] = (ha.len() + 1).into();
    let bad = dir.write("bad.json", doctored.to_string().as_bytes());
    let out = bench_raw(&["merge", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not the same run"),
        "{}",
        describe(&["merge"], &out)
    );
    let c = bench(echod.addr, &["--histogram", "-", "stream", "-n", "10"]);
    let c_log = dir.write("c.log", &c.stdout);
    let out = bench_raw(&["merge", a_json.to_str().unwrap(), c_log.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&["merge modes"], &out));
    // A histogram that cannot be written fails the run, naming the flag.
    let out = bench(echod.addr, &["--histogram", "/nonexistent/dir/h.hlog", "pingpong", "-n", "10"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&["unwritable"], &out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--histogram"),
        "{}",
        describe(&["unwritable"], &out)
    );
    let d = bench(echod.addr, &["pingpong", "-n", "10"]);
    let d_json = dir.write("d.json", &d.stdout);
    let out = bench_raw(&["merge", d_json.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--histogram"),
        "{}",
        describe(&["merge none"], &out)
    );
}

#[test]
fn warmup_runs_traffic_but_counts_stay_exact() {
    let (addr, seen) = start_double(Double::default());
    let r = assert_passes(addr, &["--warmup", "300ms", "pingpong", "-c", "2", "-n", "300"]);
    assert_eq!((r["messages"].as_u64(), r["latency_us"]["count"].as_u64()), (Some(300), Some(300)));
    let echoed = seen.echoed.load(Ordering::Relaxed);
    assert!(echoed > 300 * 512, "the warm-up sent traffic too: {echoed} bytes echoed");
    assert_eq!(r["warmup_s"].as_f64(), Some(0.3));

    // Open loop, stream and churn: the work begun in the warm-up runs, --count stays exact.
    let r = assert_passes(addr, &["--warmup", "200ms", "pingpong", "-c", "2", "-n", "200", "--rate", "1000"]);
    assert_eq!(r["messages"], 200);
    assert_eq!(r["service_us"]["count"], 200);
    let r = assert_passes(addr, &["--warmup", "200ms", "stream", "-c", "2", "-n", "40", "--size", "4KiB"]);
    assert_eq!(r["messages"], 40);
    let r = assert_passes(addr, &["--warmup", "100ms", "churn", "-c", "2", "-n", "20", "--rate", "200"]);
    assert_eq!(r["messages"], 20);
    assert!(r["connections_opened"].as_u64().unwrap() > 25, "{r}");
}

#[test]
fn start_at_and_connect_rate() {
    let (addr, seen) = start_double(Double::default());
    // Two workers given one start time start within a few milliseconds of it.
    // Far enough ahead for both processes to be up, also under Wine.
    let at = SystemTime::now() + Duration::from_secs(3);
    let at_text = humantime::format_rfc3339_millis(at).to_string();
    let at_s = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let at_text = at_text.clone();
            thread::spawn(move || bench(addr, &["--start-at", &at_text, "pingpong", "-c", "2", "-n", "100"]))
        })
        .collect();
    for w in workers {
        let out = w.join().unwrap();
        assert!(out.status.success(), "{}", describe(&["--start-at"], &out));
        let r = json_line(&out, "start-at");
        let start = r["window_start"].as_f64().unwrap();
        assert!(start >= at_s - 0.002 && start < at_s + 0.5, "window starts at {start}, asked {at_s}");
        assert_eq!(r["start_late_s"].as_f64(), Some(0.0));
    }
    // A time in the past starts at once, and says how late.
    let past = humantime::format_rfc3339_millis(SystemTime::now() - Duration::from_secs(3)).to_string();
    let out = bench(addr, &["--start-at", &past, "pingpong", "-n", "10"]);
    assert!(out.status.success(), "{}", describe(&["past"], &out));
    assert!(json_line(&out, "past")["start_late_s"].as_f64().unwrap() >= 3.0);

    // --connect-rate spreads the connects: 8 at 20/s take 350 ms.
    seen.accepted.lock().unwrap().clear();
    let r = assert_passes(addr, &["--connect-rate", "20", "pingpong", "-c", "8", "-d", "600ms"]);
    assert_eq!(r["connections_opened"], 8);
    let accepted = seen.accepted.lock().unwrap().clone();
    let spread = *accepted.last().unwrap() - accepted[0];
    assert!(spread >= Duration::from_millis(300), "8 connects at 20/s took only {spread:?}");
    let r = assert_passes(addr, &["--connect-rate", "50", "hold", "-c", "10", "-d", "50ms"]);
    assert!(r["hold"]["setup_s"].as_f64().unwrap() >= 0.17, "{r}");
    let r = assert_passes(addr, &["--connect-rate", "100", "stream", "-c", "4", "-n", "20"]);
    assert_eq!(r["messages"], 20);
    // For churn it is the same knob as --rate.
    let r = assert_passes(addr, &["--connect-rate", "100", "churn", "-c", "2", "-n", "10"]);
    assert_eq!(r["rate"].as_f64(), Some(100.0));
}

// ------------------------------------------------------------------------------------------
// PROXY header, banner and TLS, against test doubles (echod does not speak them yet).

/// Certificates made for one test: a CA, a server certificate for `localhost` and 127.0.0.1,
/// a client certificate, and another CA that signed none of them.
struct Pki {
    dir: TempDir,
    server: Arc<rustls::ServerConfig>,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = TempDir::new("pki");
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "echod-bench test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names).unwrap().signed_by(&key, &issuer).unwrap();
            (cert, key)
        };
        let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
        let (client_cert, client_key) = leaf(vec!["client.test".into()]);
        let other_key = KeyPair::generate().unwrap();
        let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other_cert = other.self_signed(&other_key).unwrap();
        dir.write("ca.pem", ca_cert.pem().as_bytes());
        dir.write("other-ca.pem", other_cert.pem().as_bytes());
        dir.write("client.pem", client_cert.pem().as_bytes());
        dir.write("client.key", client_key.serialize_pem().as_bytes());
        dir.write("garbage.pem", b"not a certificate\n");

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        // Client certificates are optional: the banner says whether one came.
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
            server_key.serialize_der(),
        ));
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![server_cert.der().clone()], key)
            .unwrap();
        Pki { dir, server: Arc::new(server) }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path(name).to_str().unwrap().to_string()
    }
}

/// Every load mode, briefly, with `extra` flags before the mode.
fn every_mode(target: SocketAddr, extra: &[&str], check: impl Fn(&str, &serde_json::Value)) {
    let modes: [&[&str]; 6] = [
        &["pingpong", "-c", "3", "-n", "60"],
        &["pingpong", "-c", "2", "-n", "40", "--rate", "400"],
        &["stream", "-c", "2", "-n", "20", "--size", "8KiB"],
        &["churn", "-c", "2", "-n", "12", "--rate", "200"],
        &["hold", "-c", "5", "-d", "20ms"],
        &["pingpong", "-c", "2", "-n", "20", "--connect-rate", "100"],
    ];
    for mode in modes {
        let args: Vec<&str> = extra.iter().chain(mode.iter()).copied().collect();
        let r = assert_passes(target, &args);
        check(mode[0], &r);
    }
}

/// The banners of a result, as (text, count).
fn banners(r: &serde_json::Value) -> Vec<(String, u64)> {
    r["banners"]
        .as_object()
        .unwrap_or_else(|| panic!("no banners in {r}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

#[test]
fn proxy_header_in_every_mode() {
    for version in ["v1", "v2"] {
        let n = if version == "v1" { 1 } else { 2 };
        let (addr, _) =
            start_double(Double { proxy: Some(n), banner: Some("client={client}"), ..Double::default() });
        // Generated client addresses: one per connection, from 198.18.0.0/15.
        every_mode(addr, &["--proxy-protocol", version, "--expect-banner=client=198.18.*"], |mode, r| {
            let b = banners(r);
            let opened = r["connections_opened"].as_u64().unwrap();
            assert_eq!(b.len() as u64, opened, "{mode}: one distinct client per connection: {r}");
            assert!(b.iter().all(|(_, n)| *n == 1), "{mode}: {r}");
        });
        // A chosen one, with and without a port.
        let r = assert_passes(
            addr,
            &[
                "--proxy-protocol",
                version,
                "--proxy-source",
                "203.0.113.7:4444",
                "--expect-banner",
                "pingpong",
                "-c",
                "3",
                "-n",
                "30",
            ],
        );
        assert_eq!(banners(&r), [("client=203.0.113.7:4444".to_string(), 3)]);
        let r = assert_passes(
            addr,
            &[
                "--proxy-protocol",
                version,
                "--proxy-source",
                "203.0.113.7",
                "--expect-banner=client=203.0.113.7:*",
                "churn",
                "-n",
                "5",
                "--rate",
                "100",
            ],
        );
        assert_eq!(banners(&r).len(), 5, "a port per connection: {r}");
        assert_eq!(r["proxy_protocol"], version);
        // The first 100 distinct banners are kept, the rest only counted.
        let r = assert_passes(
            addr,
            &[
                "--proxy-protocol",
                version,
                "--expect-banner",
                "churn",
                "-c",
                "4",
                "-n",
                "120",
                "--rate",
                "1000",
            ],
        );
        assert_eq!((banners(&r).len(), r["other_banners"].as_u64()), (100, Some(20)), "{r}");
        // No header, or the other version: the double closes, the run fails.
        let other = if version == "v1" { "v2" } else { "v1" };
        for args in [&["pingpong", "-n", "5"][..], &["--proxy-protocol", other, "pingpong", "-n", "5"]] {
            let out = bench(addr, args);
            assert_eq!(out.status.code(), Some(1), "{}", describe(args, &out));
        }
    }
    // IPv6 claims against an IPv4 target cannot be one header.
    let (addr, _) = start_double(Double { proxy: Some(1), ..Double::default() });
    let out =
        bench(addr, &["--proxy-protocol", "v1", "--proxy-source", "[2001:db8::1]:5", "pingpong", "-n", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&["v6 source"], &out));
}

/// The same against echod itself: a PROXY listener of each version, with a banner that shows
/// the client address echod took from the header.
#[test]
fn every_mode_against_echods_own_proxy_listener_and_banner() {
    for version in ["v1", "v2"] {
        let listen = format!("tcp://127.0.0.1:0?proxy={version}");
        let echod = start_echod_with(&["--listen", &listen, "--banner", "{client} via {peer}"]);
        every_mode(
            echod.addr,
            &["--proxy-protocol", version, "--expect-banner=198.18.* via 127.*"],
            |mode, r| {
                let b = banners(r);
                let opened = r["connections_opened"].as_u64().unwrap();
                assert_eq!(
                    b.len() as u64,
                    opened,
                    "{mode}: echod saw one distinct client per connection: {r}"
                );
            },
        );
        // Without the header, echod closes every connection: the run fails.
        let out = bench(echod.addr, &["pingpong", "-c", "1", "-n", "5", "--timeout", "2s"]);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&["pingpong"], &out));
    }
}

#[test]
fn banner_is_read_checked_and_counted() {
    let (addr, _) = start_double(Double { banner: Some("backend-1 says hi"), ..Double::default() });
    every_mode(addr, &["--expect-banner"], |mode, r| {
        let b = banners(r);
        assert_eq!(b.len(), 1, "{mode}: {r}");
        assert_eq!(b[0].1, r["connections_opened"].as_u64().unwrap(), "{mode}: every connection saw it: {r}");
    });
    for expect in
        ["--expect-banner=backend-1 says hi", "--expect-banner=backend-? says *", "--expect-banner=*[0-9]*"]
    {
        assert_passes(addr, &[expect, "pingpong", "-n", "5"]);
    }
    let out = bench(addr, &["--expect-banner=backend-2*", "pingpong", "-c", "2", "-n", "5"]);
    let r = json_line(&out, "wrong banner");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(r["error_kinds"]["banner"], 2, "{r}");
    // The unexpected banner is still reported: that is how one sees who answered.
    assert_eq!(banners(&r), [("backend-1 says hi".to_string(), 2)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("backend-1 says hi"));
    // Text output lists the banners.
    let out = bench_raw(&["--target", &addr.to_string(), "-q", "--expect-banner", "pingpong", "-n", "3"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("banners") && text.contains("backend-1 says hi"), "{text}");
    // Without --expect-banner the banner line is echo data that was never sent: a mismatch.
    assert_fails(addr, &["pingpong", "-n", "3", "--size", "32"], "mismatch");
    // A server that sends no banner: the wait for it times out.
    let (plain, _) = start_double(Double::default());
    assert_fails(plain, &["--expect-banner", "pingpong", "-n", "3"], "timeout");
}

#[test]
fn tls_in_every_mode() {
    let pki = Pki::new();
    let (ca, client, key) = (pki.file("ca.pem"), pki.file("client.pem"), pki.file("client.key"));
    let tls = Some(pki.server.clone());
    let (addr, _) = start_double(Double {
        tls: tls.clone(),
        banner: Some("tls={tls} sni={sni} cert={cert}"),
        ..Double::default()
    });

    // Verified against the CA, the server name sent as SNI; both versions offered, 1.3 chosen.
    let base = ["--tls", "--tls-ca", &ca, "--sni", "localhost"];
    let with = |more: &[&'static str]| -> Vec<String> {
        base.iter().map(|s| s.to_string()).chain(more.iter().map(|s| s.to_string())).collect()
    };
    let args = with(&["--expect-banner=tls=1.3 sni=localhost cert=no"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    every_mode(addr, &args, |mode, r| {
        assert_eq!(r["tls_versions"]["1.3"], r["connections_opened"], "{mode}: {r}");
    });
    let r =
        assert_passes(addr, &[&args[..], &["handshake", "-c", "2", "-n", "20", "--rate", "200"]].concat());
    assert_eq!((r["messages"].as_u64(), r["connections_opened"].as_u64()), (Some(20), Some(20)), "{r}");
    assert!(r["latency_us"]["p50"].as_f64().unwrap() > 0.0);

    // PROXY header, TLS and banner together, in the handshake mode too.
    let (both, _) = start_double(Double {
        proxy: Some(1),
        tls: tls.clone(),
        banner: Some("{client} {tls}"),
        ..Double::default()
    });
    let r = assert_passes(
        both,
        &[
            "--proxy-protocol",
            "v1",
            "--tls",
            "--tls-ca",
            &ca,
            "--expect-banner=198.18.* 1.3",
            "handshake",
            "-n",
            "20",
            "--rate",
            "200",
        ],
    );
    assert_eq!(banners(&r).len(), 20, "a distinct client per connection: {r}");

    // TLS 1.2 only.
    let r = assert_passes(
        addr,
        &[
            "--tls",
            "--tls-ca",
            &ca,
            "--tls-version",
            "1.2",
            "--expect-banner=tls=1.2 *",
            "stream",
            "-n",
            "10",
        ],
    );
    assert_eq!(r["tls_versions"]["1.2"], 1, "{r}");
    // Without --sni the target's address is verified (the certificate names 127.0.0.1); no SNI.
    assert_passes(
        addr,
        &["--tls", "--tls-ca", &ca, "--expect-banner=tls=1.3 sni= cert=no", "pingpong", "-n", "5"],
    );
    // Mutual TLS.
    assert_passes(
        addr,
        &[
            "--tls",
            "--tls-ca",
            &ca,
            "--tls-cert",
            &client,
            "--tls-key",
            &key,
            "--expect-banner=* cert=yes",
            "churn",
            "-n",
            "5",
            "--rate",
            "100",
        ],
    );
    // --insecure trusts any certificate; the wrong CA trusts none.
    assert_passes(
        addr,
        &[
            "--tls",
            "--insecure",
            "--sni",
            "anything.test",
            "--expect-banner",
            "hold",
            "-c",
            "3",
            "-d",
            "10ms",
        ],
    );
    let other = pki.file("other-ca.pem");
    assert_fails(addr, &["--tls", "--tls-ca", &other, "pingpong", "-n", "3"], "tls");
    assert_fails(addr, &["--tls", "--tls-ca", &ca, "--sni", "wrong.test", "pingpong", "-n", "3"], "tls");
    // Plain TCP to a TLS server, TLS to a plain one: the run fails.
    let (plain, _) = start_double(Double::default());
    assert_fails(plain, &["--tls", "--tls-ca", &ca, "pingpong", "-n", "3"], "tls");
}

#[test]
fn corruption_fails_under_tls_and_proxy() {
    let pki = Pki::new();
    let ca = pki.file("ca.pem");
    let tls = Some(pki.server.clone());
    for (fault, pingpong_kind) in [(Fault::Flip(700), "mismatch"), (Fault::Drop(100), "timeout")] {
        let (addr, _) = start_double(Double {
            proxy: Some(2),
            tls: tls.clone(),
            fault: Some(fault),
            ..Double::default()
        });
        let common = ["--tls", "--tls-ca", ca.as_str(), "--proxy-protocol", "v2"];
        let run = |mode: &[&str], kind: &str| assert_fails(addr, &[&common[..], mode].concat(), kind);
        run(&["stream", "-n", "8", "--size", "1KiB"], "mismatch");
        run(&["pingpong", "-c", "2", "-n", "20", "--size", "512"], pingpong_kind);
        run(&["churn", "-n", "4", "--size", "1KiB", "--rate", "100"], pingpong_kind);
        run(&["handshake", "-n", "4", "--size", "1KiB", "--rate", "100"], pingpong_kind);
    }
}

/// A usage error: exit status 2 and the flag named on stderr.
fn assert_usage(args: &[&str], flag: &str) {
    let out = bench(SocketAddr::from(([127, 0, 0, 1], 9)), args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", describe(args, &out));
    assert!(stderr.contains(flag), "{args:?}: stderr does not name {flag}:\n{stderr}");
}

#[test]
fn bad_values_of_new_flags_exit_2_naming_the_flag() {
    let pki = Pki::new();
    let (ca, garbage, client) = (pki.file("ca.pem"), pki.file("garbage.pem"), pki.file("client.pem"));
    let cases: &[(&[&str], &str)] = &[
        (&["--start-at", "tomorrow", "pingpong"], "--start-at"),
        (&["--start-at", "2999-01-01T00:00:00Z", "pingpong"], "--start-at"),
        (&["--connect-rate", "0", "pingpong"], "--connect-rate"),
        (&["--connect-rate", "fast", "pingpong"], "--connect-rate"),
        (&["--warmup", "soon", "pingpong"], "--warmup"),
        (&["--warmup", "1s", "hold"], "--warmup"),
        (&["--connect-rate", "10", "churn", "--rate", "10"], "--connect-rate"),
        (&["--proxy-protocol", "v3", "pingpong"], "--proxy-protocol"),
        (&["--proxy-protocol", "v1", "--proxy-source", "nowhere", "pingpong"], "--proxy-source"),
        (&["--proxy-source", "203.0.113.1", "pingpong"], "--proxy-protocol"),
        (&["--expect-banner=[oops", "pingpong"], "--expect-banner"),
        (&["--tls-ca", &ca, "pingpong"], "--tls"),
        (&["--insecure", "pingpong"], "--tls"),
        (&["--tls", "pingpong"], "--tls"),
        (&["--tls", "--tls-ca", &ca, "--insecure", "pingpong"], "--insecure"),
        (&["--tls", "--tls-ca", "/nonexistent/ca.pem", "pingpong"], "--tls-ca"),
        (&["--tls", "--tls-ca", &garbage, "pingpong"], "--tls-ca"),
        (&["--tls", "--insecure", "--tls-cert", &client, "pingpong"], "--tls-cert"),
        (&["--tls", "--insecure", "--tls-cert", &client, "--tls-key", &garbage, "pingpong"], "--tls-key"),
        (&["--tls", "--insecure", "--tls-version", "1.4", "pingpong"], "--tls-version"),
        (&["--tls", "--insecure", "--sni", "not a name!", "pingpong"], "--sni"),
        (&["handshake"], "--tls"),
        (&["--histogram", "/nonexistent/dir/h.hlog", "merge"], "FILE"),
    ];
    for (args, flag) in cases {
        assert_usage(args, flag);
    }
}
