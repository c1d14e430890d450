//! The HTTP endpoint against hostile clients: arbitrary request bytes never disturb echo
//! traffic, and a slowloris (many connections trickling header bytes) delays a scrape only as
//! far as the endpoint's own limits allow.

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::Duration;

use crate::common::{self, connect, echo, metric, pattern, scale, TestServer, TIMEOUT};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const METRICS_ON: [&str; 2] = ["--metrics-listen", "127.0.0.1:0"];

/// The endpoint's limits, as src/http.rs sets them: HTTP connections served at once (more
/// wait in the listener's backlog), and the time a client has to send its request headers.
const MAX_HTTP_CONNECTIONS: usize = 64;
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Scheduling and timer slack allowed on top of a bound that follows from those limits.
const SLACK: Duration = Duration::from_secs(2);

// ------------------------------------------------------------------------------- properties

/// Request-shaped bytes: methods, paths, versions and headers drawn from what parsers trip on
/// (bad methods, huge or negative lengths, chunked bodies that lie, bare CR/LF, NULs), with or
/// without the blank line that ends the headers, and a body.
fn http_like() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        Just("GET".to_string()),
        Just("HEAD".to_string()),
        Just("POST".to_string()),
        Just("DELETE".to_string()),
        Just("CONNECT".to_string()),
        "[A-Z]{0,12}",
        "\\PC{0,8}",
    ];
    let path = prop_oneof![
        Just("/metrics".to_string()),
        Just("/healthz".to_string()),
        Just("/readyz".to_string()),
        Just("*".to_string()),
        Just("http://[::1]:9007/metrics".to_string()),
        "/[ -~]{0,64}",
        "\\PC{0,32}",
    ];
    let version = prop_oneof![
        Just("HTTP/1.1".to_string()),
        Just("HTTP/1.0".to_string()),
        Just("HTTP/2.0".to_string()),
        Just("HTTP/0.9".to_string()),
        "[ -~]{0,10}",
    ];
    let header = prop_oneof![
        Just("Host: x".to_string()),
        Just("Connection: keep-alive".to_string()),
        Just("Connection: close".to_string()),
        Just("Expect: 100-continue".to_string()),
        Just("Transfer-Encoding: chunked".to_string()),
        Just("Upgrade: h2c".to_string()),
        (0u64..u64::MAX).prop_map(|n| format!("Content-Length: {n}")),
        Just("Content-Length: -1".to_string()),
        Just("Content-Length: 5, 6".to_string()),
        "[!-9;-~]{1,16}: [ -~]{0,64}",
        "[ -~\r\n\0]{0,80}",
    ];
    let headers = prop::collection::vec(header, 0..12);
    let body = prop::collection::vec(any::<u8>(), 0..512);
    let line_end = prop_oneof![Just("\r\n"), Just("\n"), Just("\r")];
    (method, path, version, headers, any::<bool>(), line_end, body).prop_map(
        |(method, path, version, headers, end_headers, eol, body)| {
            let mut request = format!("{method} {path} {version}{eol}");
            for header in headers {
                request.push_str(&header);
                request.push_str(eol);
            }
            if end_headers {
                request.push_str(eol);
            }
            let mut bytes = request.into_bytes();
            bytes.extend_from_slice(&body);
            bytes
        },
    )
}

/// What a hostile or broken client may send: raw bytes, request-shaped bytes, and
/// request-shaped bytes with some of them overwritten.
fn request_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..4096),
        http_like(),
        (http_like(), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)).prop_map(
            |(mut bytes, flips)| {
                if !bytes.is_empty() {
                    for (at, byte) in flips {
                        let i = at.index(bytes.len());
                        bytes[i] = byte;
                    }
                }
                bytes
            }
        ),
    ]
}

/// Sends `bytes` to the endpoint, closes our side, and reads whatever comes back until the
/// endpoint closes (bounded in time). A reset is an acceptable answer to garbage.
async fn send_to_endpoint(addr: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>, TestCaseError> {
    let mut stream = connect(addr).await;
    // The endpoint may answer and close before it has read everything: write errors are fine.
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    match tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut answer)).await {
        Err(_) => Err(TestCaseError::fail("the endpoint neither answered nor closed in time")),
        Ok(_) => Ok(answer),
    }
}

/// Whatever bytes reach the HTTP endpoint, an echo connection open the whole time keeps echoing
/// exactly, the endpoint answers only with HTTP/1 (or nothing), and a normal scrape still works
/// at the end.
#[test]
fn arbitrary_request_bytes_never_disturb_echo() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime for the test");
    let server = runtime.block_on(TestServer::start(&METRICS_ON));
    let http = server.metrics_addr.expect("metrics are on");
    let echo_client = tokio::sync::Mutex::new(runtime.block_on(server.connect()));
    let round = Cell::new(0u64);

    // PROPTEST_CASES overrides the count (and ECHOD_TEST_SCALE scales it, as for the bulk tests).
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| scale(512, 64) as u32);
    // No regression file: a failure prints the bytes that caused it.
    let mut runner =
        TestRunner::new(ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() });
    let result = runner.run(&request_bytes(), |bytes| {
        runtime.block_on(async {
            let answer = send_to_endpoint(http, &bytes).await?;
            prop_assert!(
                answer.is_empty() || answer.starts_with(b"HTTP/1."),
                "the endpoint answered with something other than HTTP/1: {:?}",
                String::from_utf8_lossy(&answer[..answer.len().min(64)])
            );
            round.set(round.get() + 1);
            let data = pattern(1 + (round.get() as usize * 97) % 8192, round.get());
            let back = echo(&mut *echo_client.lock().await, &data).await;
            prop_assert!(back == data, "the echo connection's bytes changed after {:?}", bytes);
            Ok(())
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }

    runtime.block_on(async {
        let (status, body) = common::http_get(http, "/metrics").await;
        assert_eq!(status, 200);
        assert_eq!(metric(&body, "echod_connections_active", ""), 1.0, "the echo connection stays open");
        assert_eq!(metric(&body, "echod_connections_closed_total", ""), 0.0, "no echo connection closed");
        drop(echo_client.into_inner());
        server.shutdown().await;
    });
    eprintln!("{cases} cases of request bytes sent to the HTTP endpoint, echo undisturbed");
}

// ------------------------------------------------------------------------------- slowloris

/// A slowloris connection: connects and sends the start of a request's headers.
async fn slowloris(addr: SocketAddr) -> (TcpStream, Instant) {
    let mut stream = connect(addr).await;
    let connected = Instant::now();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.expect("first bytes");
    (stream, connected)
}

/// Then one more header byte every 500 ms, never finishing the headers, until the endpoint
/// closes the connection. Returns how long after the connect that was.
async fn trickle(mut stream: TcpStream, connected: Instant) -> Duration {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut buf = [0u8; 1024];
    let deadline = connected + TIMEOUT * 2;
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return connected.elapsed(),
                Ok(_) => continue, // an error response; the close follows
            },
            _ = tick.tick() => {
                if stream.write_all(b"a").await.is_err() {
                    return connected.elapsed();
                }
            }
            () = tokio::time::sleep_until(deadline) => panic!("the endpoint never closed a slowloris connection"),
        }
    }
}

/// A fresh scrape: connect, request /metrics, read the whole answer. Returns how long it took.
async fn timed_scrape(addr: SocketAddr) -> Duration {
    let start = Instant::now();
    let mut stream = connect(addr).await;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.expect("send the request");
    let mut answer = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut answer))
        .await
        .expect("the scrape is answered in time")
        .expect("the scrape's answer");
    assert!(answer.starts_with(b"HTTP/1.0 200"), "scrape answered {:?}", String::from_utf8_lossy(&answer));
    start.elapsed()
}

/// Under the endpoint's connection limit, a slowloris does not delay anyone: a fresh scrape is
/// served at once, and echo is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_under_the_limit_does_not_delay_a_scrape() {
    let server = TestServer::start(&METRICS_ON).await;
    let http = server.metrics_addr.expect("metrics are on");
    let mut trickling = Vec::new();
    for _ in 0..MAX_HTTP_CONNECTIONS - 4 {
        let (stream, connected) = slowloris(http).await;
        trickling.push(tokio::spawn(trickle(stream, connected)));
    }
    let waited = timed_scrape(http).await;
    eprintln!("{} slowloris connections: a fresh scrape took {waited:?}", trickling.len());
    assert!(waited < SLACK, "a scrape under the limit waited {waited:?}");
    let mut client = server.connect().await;
    let data = pattern(100_000, 3);
    assert!(echo(&mut client, &data).await == data);
    for task in trickling {
        task.abort();
    }
    server.shutdown().await;
}

/// Beyond the limit, slowloris connections take every slot and queue in the backlog, but each
/// is closed HEADER_TIMEOUT after it was accepted however it trickles, so a fresh scrape that
/// queues behind Q of them waits at most ceil((Q + 1) / MAX_HTTP_CONNECTIONS) header timeouts,
/// and at least one less. Echo is untouched throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_beyond_the_limit_delays_a_scrape_by_header_timeouts_only() {
    let server = TestServer::start(&METRICS_ON).await;
    let http = server.metrics_addr.expect("metrics are on");
    // 160 connections: 64 served, 96 waiting in the listener's backlog (128), none refused.
    let count = 160;
    let mut trickling = Vec::new();
    for _ in 0..count {
        let (stream, connected) = slowloris(http).await;
        trickling.push(tokio::spawn(trickle(stream, connected)));
    }
    let queued_ahead = count - MAX_HTTP_CONNECTIONS;
    let waves = (queued_ahead + 1).div_ceil(MAX_HTTP_CONNECTIONS) as u32;
    let upper = HEADER_TIMEOUT * waves + SLACK;
    let lower = HEADER_TIMEOUT * (waves - 1);

    // Echo is unaffected while the endpoint is saturated.
    let echo_start = Instant::now();
    let mut client = server.connect().await;
    let data = pattern(1 << 20, 4);
    assert!(echo(&mut client, &data).await == data);
    let echo_took = echo_start.elapsed();
    // Under Wine a MiB of loopback echo alone can take longer than the slack; what matters
    // there is that it completes while the endpoint is saturated.
    if std::env::var_os("ECHOD_TEST_WINE").is_none() {
        assert!(echo_took < SLACK, "echo took {echo_took:?} while the endpoint was saturated");
    }

    let waited = timed_scrape(http).await;
    let mut lifetimes = Vec::new();
    for task in trickling {
        lifetimes
            .push(tokio::time::timeout(TIMEOUT * 3, task).await.expect("slowloris closed").expect("task"));
    }
    let first_wave = lifetimes[..MAX_HTTP_CONNECTIONS].iter().max().copied().unwrap_or_default();
    let last = lifetimes.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{count} slowloris connections: a fresh scrape behind {queued_ahead} of them took {waited:?} \
         (bound {lower:?}..{upper:?}); the first {MAX_HTTP_CONNECTIONS} were closed within \
         {first_wave:?}, all within {last:?}; a 1 MiB echo meanwhile took {echo_took:?}"
    );
    assert!(waited <= upper, "the scrape waited {waited:?}, more than {upper:?}");
    assert!(waited >= lower, "the scrape waited only {waited:?}: the slowloris did not hold the slots");
    assert!(
        first_wave <= HEADER_TIMEOUT + SLACK,
        "trickling kept a connection past the header timeout: {first_wave:?}"
    );
    let all_bound = HEADER_TIMEOUT * count.div_ceil(MAX_HTTP_CONNECTIONS) as u32 + SLACK;
    assert!(last <= all_bound, "the last slowloris connection lasted {last:?}, more than {all_bound:?}");
    server.shutdown().await;
}
