//! Signals and the graceful drain, against the built binary: SIGTERM closes the listeners while
//! connected clients keep echoing; the shutdown timeout closes stragglers; a second signal exits
//! at once with 130/143; `--shutdown-delay` keeps accepting while `/readyz` says 503; and
//! systemd socket activation serves on a socket passed as fd 3.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::common::{self, pattern, Binary, TIMEOUT};

/// Connects with a bounded wait and a read/write timeout on the socket.
fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// Writes `data` and reads the same bytes back (payloads here are far smaller than the socket
/// buffers, so sequential write-then-read cannot deadlock).
fn echo(stream: &mut TcpStream, data: &[u8]) {
    stream.write_all(data).expect("write");
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back).expect("read the echo");
    assert_eq!(back, data, "echo differs");
}

/// Reads until EOF or a reset, returning what came and whether it ended in a reset.
fn read_until_closed(stream: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (data, false),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (data, true),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("waiting for the close: {e}"),
        }
    }
}

/// GET `path` on the metrics endpoint; the status code.
fn http_status(addr: SocketAddr, path: &str) -> u16 {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(common::http_get(addr, path)).0
}

fn assert_refused(addr: SocketAddr) {
    match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "connect after close: {e}"),
        Ok(_) => panic!("a connect to {addr} succeeded after the listeners closed"),
    }
}

#[test]
fn sigterm_drains_connected_clients_and_refuses_new_ones() {
    let mut echod = Binary::start(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = echod.metrics_addr.expect("metrics address logged");
    assert_eq!(http_status(metrics, "/readyz"), 200);

    let mut client = connect(echod.addr);
    echo(&mut client, b"before the signal");

    echod.signal(libc::SIGTERM);
    echod.wait_for_log("listeners closed");

    assert_refused(echod.addr);
    // The HTTP endpoint keeps serving through the drain, and says not ready.
    assert_eq!(http_status(metrics, "/readyz"), 503);
    assert_eq!(http_status(metrics, "/healthz"), 200);

    // The client connected before the signal is still served.
    let late = pattern(10_000, 7);
    echo(&mut client, &late);
    client.shutdown(Shutdown::Write).unwrap();
    let (rest, reset) = read_until_closed(&mut client);
    assert!(!reset && rest.is_empty(), "expected a clean EOF, got {} bytes, reset={reset}", rest.len());

    echod.wait_for_log("shutdown complete");
    assert_eq!(echod.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn shutdown_timeout_closes_idle_clients_and_exits_zero() {
    let mut echod = Binary::start(&["--metrics-listen", "off", "--shutdown-timeout", "300ms"]);
    let mut client = connect(echod.addr);
    echo(&mut client, b"x");

    let signalled = Instant::now();
    echod.signal(libc::SIGTERM);
    echod.wait_for_log("shutdown timeout reached");
    // The server closes the straggler: EOF (or a reset), nothing else.
    let (rest, _reset) = read_until_closed(&mut client);
    assert!(rest.is_empty(), "unexpected {} bytes at the close", rest.len());
    assert_eq!(echod.wait_exit(Duration::from_secs(5)), Some(0));
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(3), "exit took {took:?} with a 300ms shutdown timeout");
    assert!(took >= Duration::from_millis(300), "exit after {took:?}, before the shutdown timeout");
}

#[test]
fn second_signal_exits_at_once_with_128_plus_signal() {
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let mut echod = Binary::start(&["--metrics-listen", "off", "--shutdown-timeout", "60s"]);
        let mut client = connect(echod.addr);
        echo(&mut client, b"hold");

        echod.signal(signal);
        echod.wait_for_log("listeners closed");
        let again = Instant::now();
        echod.signal(signal);
        assert_eq!(echod.wait_exit(Duration::from_secs(5)), Some(code), "second signal {signal}");
        assert!(again.elapsed() < Duration::from_secs(3), "forced exit took {:?}", again.elapsed());
    }
}

#[test]
fn shutdown_delay_keeps_accepting_while_not_ready() {
    const DELAY: Duration = Duration::from_millis(500);
    let mut echod = Binary::start(&["--metrics-listen", "127.0.0.1:0", "--shutdown-delay", "500ms"]);
    let metrics = echod.metrics_addr.expect("metrics address logged");

    let signalled = Instant::now();
    echod.signal(libc::SIGTERM);
    echod.wait_for_log("shutdown requested");
    assert_eq!(http_status(metrics, "/readyz"), 503);
    // Still accepting during the delay.
    let mut newcomer = connect(echod.addr);
    echo(&mut newcomer, b"accepted during the delay");
    let during = signalled.elapsed();
    assert!(
        during < DELAY,
        "the check took {during:?}, past the delay: it proves nothing; machine too slow?"
    );

    echod.wait_for_log("listeners closed");
    let closed_after = signalled.elapsed();
    assert!(closed_after >= DELAY, "listeners closed {closed_after:?} after SIGTERM, before the delay");
    assert_refused(echod.addr);
    // The newcomer is drained like any other client.
    echo(&mut newcomer, b"and served during the drain");
    newcomer.shutdown(Shutdown::Write).unwrap();
    let (rest, reset) = read_until_closed(&mut newcomer);
    assert!(!reset && rest.is_empty());
    assert_eq!(echod.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn socket_activation_serves_the_passed_socket() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the socket to pass");
    let addr = listener.local_addr().unwrap();
    let fd = listener.as_raw_fd();

    // LISTEN_PID must name echod's own PID, known only after fork: a shell sets it to its own
    // PID ($$) and execs echod, which keeps that PID. The socket is placed at fd 3 (the first
    // socket-activation descriptor) between fork and exec.
    let mut command = std::process::Command::new("/bin/sh");
    command
        .args(["-c", r#"LISTEN_PID=$$ exec "$0" "$@""#, env!("CARGO_BIN_EXE_echod")])
        .args(["--listen", "127.0.0.1:1", "--metrics-listen", "off"])
        .env("LISTEN_FDS", "1")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if fd == 3 {
                // Already in place: just let it survive exec.
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) == -1 {
                // dup2 leaves the new descriptor without FD_CLOEXEC.
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut echod = Binary::start_command(command);
    drop(listener);
    assert_eq!(echod.addr, addr, "echod should listen on the passed socket, not --listen");

    let mut client = connect(addr);
    echo(&mut client, &pattern(50_000, 3));
    drop(client);

    echod.signal(libc::SIGTERM);
    assert_eq!(echod.wait_exit(Duration::from_secs(10)), Some(0));
    // With the passed socket closed by echod and by the test, the port is free again.
    assert_refused(addr);
}
