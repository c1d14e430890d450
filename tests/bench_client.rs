//! echod-bench against the real echod (every mode must pass) and against broken echo servers
//! (every corruption must be caught and make the exit status non-zero).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    let mut child = Command::new(env!("CARGO_BIN_EXE_echod"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_echod-bench"))
        .arg("--target")
        .arg(target.to_string())
        .args(["--quiet", "--json", "--timeout", "2s"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start echod-bench");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("echod-bench {args:?} ran past 30 s; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        thread::sleep(Duration::from_millis(20));
    }
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
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(args, &out)));
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
#[derive(Clone, Copy)]
enum Fault {
    /// Flip the bits of the byte at this stream offset.
    Flip(u64),
    /// Leave out the byte at this stream offset.
    Drop(u64),
}

/// Starts an echo server that corrupts every connection once; returns its address.
fn start_broken(fault: Fault) -> SocketAddr {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { continue };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut offset = 0u64;
                    loop {
                        let n = match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let mut chunk = buf[..n].to_vec();
                        let range = offset..offset + n as u64;
                        match fault {
                            Fault::Flip(at) if range.contains(&at) => chunk[(at - offset) as usize] ^= 0xff,
                            Fault::Drop(at) if range.contains(&at) => {
                                chunk.remove((at - offset) as usize);
                            }
                            _ => {}
                        }
                        offset += n as u64;
                        if socket.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("broken server started")
}

fn assert_fails(target: SocketAddr, args: &[&str], expect: &str) {
    let out = bench(target, args);
    let text = describe(args, &out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {text}"));
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
