//! Metrics and the HTTP endpoint: exact totals, live counters, readiness, close reasons, and an
//! endpoint that misbehaving HTTP clients cannot use to disturb echo traffic.

use std::time::Duration;

use crate::common::{
    self, echo, eventually, eventually_saw, http_get, metric, pattern, read_to_eof, set_reset_on_close,
    TestServer, TIMEOUT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const METRICS_ON: [&str; 2] = ["--metrics-listen", "127.0.0.1:0"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_are_exact_after_traffic_stops() {
    let server = TestServer::start(&METRICS_ON).await;
    let sizes = [1usize, 100, 4096, 70_000, 1 << 20, 3 << 20, 5, 0, 333_333, 42];
    let mut total = 0u64;
    for (i, size) in sizes.iter().enumerate() {
        let mut stream = server.connect().await;
        let data = pattern(*size, i as u64);
        if *size > 0 {
            assert!(echo(&mut stream, &data).await == data);
        }
        stream.shutdown().await.unwrap();
        assert!(read_to_eof(&mut stream).await.is_empty());
        total += *size as u64;
    }
    eventually("connections closed", || server.handle.active_connections() == 0).await;

    let m = server.metrics();
    let k = sizes.len() as f64;
    let listener = format!("listener=\"{}\"", server.addr);
    assert_eq!(metric(&m, "echod_connections_accepted_total", &listener), k);
    assert_eq!(metric(&m, "echod_bytes_received_total", ""), total as f64);
    assert_eq!(metric(&m, "echod_bytes_sent_total", ""), total as f64);
    assert_eq!(metric(&m, "echod_connection_duration_seconds_count", ""), k);
    assert_eq!(metric(&m, "echod_connections_closed_total", "reason=\"eof\""), k);
    assert_eq!(metric(&m, "echod_connections_closed_total", ""), k);
    assert_eq!(metric(&m, "echod_connections_active", ""), 0.0);
    assert_eq!(metric(&m, "echod_draining", ""), 0.0);
    assert_eq!(metric(&m, "echod_build_info", &format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))), 1.0);
    assert!(metric(&m, "echod_max_connections", "") >= 1.0);
    assert!(metric(&m, "echod_runtime_workers", "") >= 1.0);
    // The same exposition is served over HTTP, with HELP and TYPE for each family.
    let (status, body) = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    for family in
        ["echod_bytes_received_total", "echod_connection_duration_seconds", "process_cpu_seconds_total"]
    {
        assert!(body.contains(&format!("# HELP {family} ")), "no HELP for {family}");
        assert!(body.contains(&format!("# TYPE {family} ")), "no TYPE for {family}");
    }
    assert!(body.contains("echod_connection_duration_seconds_bucket{le=\"0.001\"}"));
    assert!(body.contains("echod_connection_duration_seconds_bucket{le=\"3600\"}"));
    assert!(!body.contains("peer"), "no peer labels");
    server.shutdown().await;
}

/// Byte counters move while a connection is still open (published about once a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_counters_are_live_during_a_long_connection() {
    let server = TestServer::start(&METRICS_ON).await;
    let mut stream = server.connect().await;
    let data = pattern(100_000, 1);
    assert!(echo(&mut stream, &data).await == data);
    eventually("received published while open", || {
        metric(&server.metrics(), "echod_bytes_received_total", "") >= 100_000.0
    })
    .await;
    eventually("sent published while open", || {
        metric(&server.metrics(), "echod_bytes_sent_total", "") >= 100_000.0
    })
    .await;
    assert_eq!(server.handle.active_connections(), 1, "the connection is still open");
    assert_eq!(metric(&server.metrics(), "echod_connections_active", ""), 1.0);

    // And during continuous traffic, not only after a pause.
    let before = metric(&server.metrics(), "echod_bytes_sent_total", "");
    let (mut reader, mut writer) = stream.into_split();
    let chunk = pattern(64 << 10, 2);
    let expected = chunk.clone();
    let pump = tokio::spawn(async move {
        let mut sent = 0usize;
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let mut back = vec![0u8; chunk.len()];
        // Keep echoing until the counters have moved (checked by the test body) or time runs out.
        while tokio::time::Instant::now() < deadline {
            writer.write_all(&chunk).await.unwrap();
            reader.read_exact(&mut back).await.unwrap();
            assert!(back == expected);
            sent += chunk.len();
            if sent > (1 << 30) {
                break;
            }
            tokio::task::yield_now().await;
        }
        (reader, writer)
    });
    eventually("counters move during traffic", || {
        metric(&server.metrics(), "echod_bytes_sent_total", "") > before + 65_536.0
    })
    .await;
    pump.abort();
    drop(pump.await);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_when_draining_while_in_flight_connections_echo() {
    let mut server = TestServer::start(&METRICS_ON).await;
    let http = server.metrics_addr.unwrap();
    assert_eq!(http_get(http, "/readyz").await.0, 200);
    let mut client = server.connect().await;
    assert_eq!(echo(&mut client, b"before").await, b"before");

    server.begin_shutdown();
    eventually("draining", || server.handle.is_draining()).await;
    assert_eq!(http_get(http, "/readyz").await.0, 503);
    assert_eq!(http_get(http, "/healthz").await.0, 200, "alive while draining");
    assert_eq!(metric(&server.metrics(), "echod_draining", ""), 1.0);
    assert_eq!(echo(&mut client, b"during the drain").await, b"during the drain");
    client.shutdown().await.unwrap();
    assert!(read_to_eof(&mut client).await.is_empty());
    server.finished().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_answers_health_404_and_garbage_without_disturbing_echo() {
    let server = TestServer::start(&METRICS_ON).await;
    let http = server.metrics_addr.unwrap();
    let mut client = server.connect().await;

    assert_eq!(http_get(http, "/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(http_get(http, "/readyz").await.0, 200);
    assert_eq!(http_get(http, "/nope").await.0, 404);
    assert_eq!(http_get(http, "/").await.0, 404);

    // Garbage instead of HTTP, and a client that connects and says nothing.
    let mut garbage = common::connect(http).await;
    garbage.write_all(&pattern(10_000, 99)).await.unwrap();
    let _ = tokio::time::timeout(TIMEOUT, garbage.read_to_end(&mut Vec::new()))
        .await
        .expect("garbage is dropped");
    let _silent = common::connect(http).await;

    assert_eq!(echo(&mut client, b"unaffected").await, b"unaffected");
    assert_eq!(http_get(http, "/metrics").await.0, 200);
    client.shutdown().await.unwrap();
    assert!(read_to_eof(&mut client).await.is_empty());
    server.shutdown().await;
}

/// Each way a connection can end is counted under its own `reason`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_are_counted_by_reason() {
    let idle = Duration::from_millis(300);
    let mut server = TestServer::start(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--idle-timeout",
        "300ms",
        "--shutdown-timeout",
        "200ms",
    ])
    .await;
    let reason = |m: &str, r: &str| metric(m, "echod_connections_closed_total", &format!("reason=\"{r}\""));

    // eof: the client closes after its echo.
    let mut eof = server.connect().await;
    assert_eq!(echo(&mut eof, b"bye").await, b"bye");
    eof.shutdown().await.unwrap();
    assert!(read_to_eof(&mut eof).await.is_empty());

    // reset: the client aborts with an RST, after an echo (so echod has surely accepted it:
    // a connection reset before the accept never becomes one).
    let mut reset = server.connect().await;
    assert_eq!(echo(&mut reset, b"r").await, b"r");
    set_reset_on_close(&reset);
    drop(reset);

    // idle_timeout: the client goes quiet and the server closes it.
    let mut quiet = server.connect().await;
    assert_eq!(echo(&mut quiet, b"zzz").await, b"zzz");
    assert!(read_to_eof(&mut quiet).await.is_empty());

    // Wine hands a Windows program a peer's RST as a clean end of stream (real Windows reports
    // WSAECONNRESET); ci/windows.sh sets ECHOD_TEST_WINE so only the split is relaxed there.
    let wine = std::env::var_os("ECHOD_TEST_WINE").is_some();
    eventually_saw("eof, reset and idle counted", || {
        let m = server.metrics();
        let (eof, reset) = (reason(&m, "eof"), reason(&m, "reset"));
        let (idle, error) = (reason(&m, "idle_timeout"), reason(&m, "error"));
        let split_ok = if wine { eof + reset == 2.0 } else { eof == 1.0 && reset == 1.0 };
        if split_ok && idle == 1.0 {
            Ok(())
        } else {
            Err(format!("eof {eof}, reset {reset}, idle_timeout {idle}, error {error}"))
        }
    })
    .await;

    // shutdown: a client that keeps talking through the drain is closed at the timeout.
    // It talks once before the drain starts: a connection that never sent a byte is idle, and
    // the drain closes idle connections at once.
    let mut chatty = server.connect().await;
    assert_eq!(echo(&mut chatty, b"x").await, b"x");
    server.begin_shutdown();
    let talk = tokio::spawn(async move {
        for _ in 0..200 {
            if chatty.write_all(b"x").await.is_err() {
                break;
            }
            let mut one = [0u8; 1];
            match chatty.read(&mut one).await {
                Ok(1) => tokio::time::sleep(idle / 10).await,
                _ => break,
            }
        }
    });
    let handle = server.handle.clone();
    let report = server.finished().await;
    assert_eq!(report.closed_by_timeout, 1);
    tokio::time::timeout(TIMEOUT, talk).await.unwrap().unwrap();
    // The server has stopped; its registry stays readable through the handle.
    let m = handle.render_metrics().unwrap();
    assert_eq!(reason(&m, "shutdown"), 1.0);
    assert_eq!(reason(&m, "error"), 0.0);
    assert_eq!(metric(&m, "echod_connections_closed_total", ""), 4.0);
    assert_eq!(metric(&m, "echod_connections_active", ""), 0.0);
}
