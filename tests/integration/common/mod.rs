//! Shared test support: start echod (in-process or as the built binary) on loopback port 0,
//! and talk to it.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use echod::{Config, DrainReport, Server, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any single wait in a test may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Multiplier for test sizes and counts: `ECHOD_TEST_SCALE=0.1` shrinks the bulk tests for slow
/// environments (such as Windows binaries under Wine). Never below a floor that keeps each test
/// meaningful.
pub fn scale(n: usize, floor: usize) -> usize {
    let factor: f64 = std::env::var("ECHOD_TEST_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    ((n as f64 * factor) as usize).max(floor)
}

/// An in-process echod on 127.0.0.1:0.
pub struct TestServer {
    pub addr: SocketAddr,
    /// Every listener's bound address, in `--listen` order.
    pub addrs: Vec<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub handle: ServerHandle,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<DrainReport>,
}

/// The loopback configuration with `args` applied as if given on the command line (one TCP
/// listener on 127.0.0.1:0 unless `args` has a `--listen` of its own).
pub fn config(args: &[&str]) -> Config {
    let mut argv = vec!["echod"];
    if !args.contains(&"--listen") {
        argv.extend(["--listen", "127.0.0.1:0"]);
    }
    // Metrics off unless asked for, and a short drain timeout, so a test that forgets a client
    // costs seconds, not the default 25 s.
    for (flag, value) in [("--metrics-listen", "off"), ("--shutdown-timeout", "5s")] {
        if !args.contains(&flag) {
            argv.extend([flag, value]);
        }
    }
    argv.extend_from_slice(args);
    Config::try_parse_checked_from(argv).expect("test arguments parse")
}

impl TestServer {
    pub async fn start(args: &[&str]) -> TestServer {
        TestServer::start_with(config(args)).await
    }

    pub async fn start_with(config: Config) -> TestServer {
        let server = Server::bind(&config).expect("bind on loopback");
        let addrs = server.local_addrs();
        let addr = addrs[0];
        let metrics_addr = server.metrics_addr();
        let handle = server.handle();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        TestServer { addr, addrs, metrics_addr, handle, stop: Some(stop), task }
    }

    /// Starts the drain (as a signal would) without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Starts the drain and waits for the server to finish it.
    pub async fn shutdown(mut self) -> DrainReport {
        self.begin_shutdown();
        tokio::time::timeout(TIMEOUT, self.task).await.expect("server stops in time").expect("server task")
    }

    /// Waits for the drain to finish after [`begin_shutdown`](Self::begin_shutdown).
    pub async fn finished(self) -> DrainReport {
        tokio::time::timeout(TIMEOUT, self.task).await.expect("server stops in time").expect("server task")
    }

    pub async fn connect(&self) -> TcpStream {
        connect(self.addr).await
    }

    /// The rendered metrics (the server must have been started with metrics on).
    pub fn metrics(&self) -> String {
        self.handle.render_metrics().expect("metrics are on")
    }
}

/// Connects from a chosen loopback source address (127.0.0.2, 127.0.0.3, ...): how tests make
/// clients that differ by address. Linux only: it routes all of 127.0.0.0/8 to loopback.
#[cfg(target_os = "linux")]
pub async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(format!("{source}:0").parse().expect("source address")).expect("bind the source address");
    tokio::time::timeout(TIMEOUT, socket.connect(addr))
        .await
        .expect("connect in time")
        .expect("connect succeeds")
}

/// Whether a connection from `source` is refused: reset (at connect, on loopback the reset can
/// beat the connect's own completion, or at the first read) with nothing echoed.
#[cfg(target_os = "linux")]
pub async fn refused_from(source: &str, addr: SocketAddr, send: &[u8]) -> bool {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(format!("{source}:0").parse().expect("source address")).expect("bind the source address");
    let mut stream = match tokio::time::timeout(TIMEOUT, socket.connect(addr)).await.expect("connect in time")
    {
        Ok(stream) => stream,
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return true,
        Err(err) => panic!("connect from {source}: {err}"),
    };
    reset_unechoed(&mut stream, send).await
}

/// Whether the server ends `stream` with a reset after the client sent `send`, echoing nothing.
/// The reset may arrive before `send` is written: the write then fails with it, and the reset
/// is reported to that one call only (Linux hands a socket's pending error to the first call
/// that looks), so the read after it sees a plain end of stream.
#[cfg(target_os = "linux")]
pub async fn reset_unechoed(stream: &mut TcpStream, send: &[u8]) -> bool {
    let reset_at_write = match stream.write_all(send).await {
        Ok(()) => false,
        Err(err) => {
            matches!(err.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
        }
    };
    let (back, reset_at_read) = outcome(stream).await;
    back.is_empty() && (reset_at_write || reset_at_read)
}

/// Reads one line (up to and including `\n`, at most 4 KiB), bounded in time.
pub async fn read_line(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(TIMEOUT, async {
        while line.len() < 4096 {
            stream.read_exact(&mut byte).await.expect("a line");
            line.push(byte[0]);
            if byte[0] == b'\n' {
                break;
            }
        }
    })
    .await
    .expect("line in time");
    String::from_utf8(line).expect("UTF-8 line")
}

/// What the server does with a connection after the client sent something: the bytes that came
/// back before the connection ended, and whether it ended with a reset.
pub async fn outcome(stream: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let reset = tokio::time::timeout(TIMEOUT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => return true,
            }
        }
    })
    .await
    .expect("the connection ends in time");
    (got, reset)
}

pub async fn connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect succeeds")
}

/// Sends `data` and reads the same number of bytes back, writing and reading concurrently so
/// that payloads larger than the socket buffers cannot deadlock.
pub async fn echo(stream: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    let (mut reader, mut writer) = stream.split();
    let write = async {
        writer.write_all(data).await.expect("write");
    };
    let read = async {
        let mut back = vec![0u8; data.len()];
        reader.read_exact(&mut back).await.expect("read the echo");
        back
    };
    let ((), back) =
        tokio::time::timeout(TIMEOUT, async { tokio::join!(write, read) }).await.expect("echo in time");
    back
}

/// Reads until EOF (bounded in time) and returns what came.
pub async fn read_to_eof(stream: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut rest))
        .await
        .expect("EOF in time")
        .expect("clean EOF");
    rest
}

/// Makes dropping `stream` send an RST instead of a FIN.
pub fn set_reset_on_close(stream: &TcpStream) {
    socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)).expect("SO_LINGER 0");
}

/// Deterministic bytes covering every byte value, different per `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8).wrapping_add(i as u8)
        })
        .collect()
}

/// The value of one sample in a Prometheus text exposition, summed over every series whose
/// name and labels match (`labels` is a substring of the label set, e.g. `reason="eof"`).
pub fn metric(exposition: &str, name: &str, labels: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, l)) => (n, l),
                None => (series, ""),
            };
            (series_name == name && series_labels.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A minimal HTTP/1.0 GET: returns the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = connect(addr).await;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send request");
    let response = String::from_utf8_lossy(&read_to_eof(&mut stream).await).into_owned();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status line");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Polls `check` every 10 ms until it holds, failing after `TIMEOUT`. For state that has no
/// event to await (a counter reaching a value in another task).
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    eventually_saw(what, || if check() { Ok(()) } else { Err(String::new()) }).await
}

/// [`eventually`] for a check that says what it saw when it does not hold yet; the failure
/// then shows the last of it.
pub async fn eventually_saw(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let seen = match check() {
            Ok(()) => return,
            Err(seen) => seen,
        };
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}; last saw: {seen}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The built `echod` binary, running, with the addresses it logged.
/// (Only the Unix tests use it: signals, `/proc`, open-files limits.)
#[cfg(unix)]
pub struct Binary {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// Every stderr line after start-up, as it arrives.
    pub log: mpsc::Receiver<String>,
}

#[cfg(unix)]
impl Binary {
    /// Starts `echod --listen 127.0.0.1:0 ARGS` and waits for its start-up line.
    pub fn start(args: &[&str]) -> Binary {
        Binary::start_command(Binary::command(args))
    }

    pub fn command(args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_echod"));
        command.args(["--listen", "127.0.0.1:0"]).args(args);
        command.env("RUST_LOG", "info").env("NO_COLOR", "1").stdin(Stdio::null()).stdout(Stdio::null());
        command.stderr(Stdio::piped());
        command
    }

    pub fn start_command(mut command: Command) -> Binary {
        let (child, log) = spawn_logged(&mut command);
        let mut addr = None;
        let mut metrics_addr = None;
        loop {
            let line = log.recv_timeout(TIMEOUT).expect("echod logs its start-up line");
            if line.contains("listening") && addr.is_none() {
                addr = find_addr(&line);
            } else if line.contains("serving /metrics") {
                metrics_addr = find_addr(&line);
            } else if line.contains("echod started") {
                break;
            }
        }
        Binary { child, addr: addr.expect("a listening line"), metrics_addr, log }
    }

    /// Waits for a log line containing `needle`, returning it.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self.log.recv_timeout(left).unwrap_or_else(|_| panic!("no log line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Sends a Unix signal to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a PID this test started.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(std::time::Instant::now() < deadline, "echod did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Spawns `command` (its stderr piped) and a thread that forwards its log lines, for as long as
/// the receiver lives (so the process never blocks on a full pipe).
pub fn spawn_logged(command: &mut Command) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = command.spawn().expect("start echod");
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, log) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, log)
}

#[cfg(unix)]
impl Drop for Binary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The first `IP:PORT` in a log line.
pub fn find_addr(line: &str) -> Option<SocketAddr> {
    line.split(|c: char| c.is_whitespace() || c == '=' || c == '"' || c == ',')
        .find_map(|word| word.parse().ok())
}

/// Runs the binary to completion with `args` (no implicit --listen) and returns (code, stderr).
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_echod"));
    command
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let out = output_within(command.spawn().expect("start echod"), TIMEOUT, &format!("echod {args:?}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Waits for `child` (its stdout and stderr piped) to exit within `limit`, reading both pipes as
/// it goes, so a child that writes more than a pipe holds cannot stall. Past the limit the child
/// is killed and the test fails, naming `what` and showing its stderr. (A process's exit cannot
/// be awaited portably with a time bound: it is polled.)
pub fn output_within(mut child: Child, limit: Duration, what: &str) -> Output {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.join().unwrap_or_default();
            panic!("{what} ran past {limit:?}; stderr:\n{}", String::from_utf8_lossy(&err));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let join = |reader: std::thread::JoinHandle<Vec<u8>>| reader.join().expect("pipe reader");
    Output { status, stdout: join(stdout), stderr: join(stderr) }
}
