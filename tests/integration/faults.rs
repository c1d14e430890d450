//! Fault injection per listener (`--listen tcp://ADDR?delay=...&rate=...`), against the real
//! server on loopback: each fault does what it says and nothing else, ends are counted, and a
//! plain listener beside a faulty one is unaffected.

use std::time::{Duration, Instant};

use crate::common::{self, connect, echo, metric, outcome, pattern, TestServer, TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn faulty(options: &str) -> TestServer {
    let listen = format!("tcp://127.0.0.1:0?{options}");
    TestServer::start(&["--listen", &listen, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_holds_every_byte_back_and_pipelines() {
    let delay = Duration::from_millis(200);
    let server = faulty("delay=200ms").await;
    let mut client = connect(server.addr).await;
    let started = Instant::now();
    assert_eq!(echo(&mut client, b"ping").await, b"ping");
    let rtt = started.elapsed();
    assert!(rtt >= delay, "round trip {rtt:?} shorter than the delay");

    // Twenty messages sent together come back about one delay later, not twenty.
    let started = Instant::now();
    for i in 0..20u8 {
        client.write_all(&[i; 100]).await.unwrap();
    }
    let mut back = vec![0u8; 2000];
    tokio::time::timeout(TIMEOUT, client.read_exact(&mut back)).await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(took >= delay, "pipelined echo after {took:?}");
    assert!(took < delay * 5, "not pipelined: 20 messages took {took:?}");
    for (i, chunk) in back.chunks(100).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8), "message {i} out of order");
    }

    // The plain listener beside it answers at once.
    let mut plain = connect(server.addrs[1]).await;
    let started = Instant::now();
    assert_eq!(echo(&mut plain, b"quick").await, b"quick");
    assert!(started.elapsed() < delay, "the plain listener was delayed: {:?}", started.elapsed());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_caps_the_echo_bandwidth() {
    // 256 KiB at 1 MiB/s: at least ~0.25 s (less the 50 ms burst), and not much more.
    let server = faulty("rate=1MiB").await;
    let mut client = connect(server.addr).await;
    let data = pattern(256 * 1024, 1);
    let started = Instant::now();
    assert!(echo(&mut client, &data).await == data);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(190), "256 KiB at 1 MiB/s took only {took:?}");
    assert!(took < Duration::from_millis(1500), "256 KiB at 1 MiB/s took {took:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_after_echoes_up_to_the_point_then_holds_the_connection_open() {
    let server = faulty("stall_after=1000").await;
    let mut client = connect(server.addr).await;
    client.write_all(&pattern(3000, 2)).await.unwrap();
    let mut back = vec![0u8; 1000];
    tokio::time::timeout(TIMEOUT, client.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, pattern(3000, 2)[..1000]);
    // Then nothing, and the connection stays open.
    let mut more = [0u8; 1];
    let quiet = tokio::time::timeout(Duration::from_millis(500), client.read(&mut more)).await;
    assert!(quiet.is_err(), "a stalled connection sent or closed: {quiet:?}");
    assert_eq!(server.handle.active_connections(), 1);
    drop(client);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_still_honours_the_idle_timeout() {
    let listen = "tcp://127.0.0.1:0?stall_after=10";
    let server = TestServer::start(&["--listen", listen, "--idle-timeout", "300ms"]).await;
    let mut client = connect(server.addr).await;
    client.write_all(&[7u8; 50]).await.unwrap();
    let (back, _) = outcome(&mut client).await;
    assert_eq!(back, [7u8; 10]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_after_sends_exactly_n_bytes_then_a_fin() {
    let server = faulty("close_after=1500").await;
    let mut client = connect(server.addr).await;
    let data = pattern(4000, 3);
    client.write_all(&data).await.unwrap();
    let (back, reset) = outcome(&mut client).await;
    assert!(!reset, "a close, not a reset");
    assert_eq!(back, data[..1500]);
    drop(client);
    common::eventually_saw("injected close counted", || {
        let n = metric(&server.metrics(), "echod_connections_closed_total", "reason=\"injected_close\"");
        if n == 1.0 {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_after_sends_exactly_n_bytes_then_a_reset() {
    let server = faulty("reset_after=2KiB").await;
    let mut client = connect(server.addr).await;
    let data = pattern(8000, 4);
    client.write_all(&data).await.unwrap();
    let (back, reset) = outcome(&mut client).await;
    // Wine hands a Windows program a peer's RST as a clean end of stream (real Windows reports
    // WSAECONNRESET); ci/windows.sh sets ECHOD_TEST_WINE.
    assert!(reset || std::env::var_os("ECHOD_TEST_WINE").is_some(), "a reset, not a close");
    assert_eq!(back.len(), 2048, "exactly the bytes before the point");
    assert_eq!(back, data[..2048]);
    common::eventually_saw("injected reset counted", || {
        let n = metric(&server.metrics(), "echod_connections_closed_total", "reason=\"injected_reset\"");
        if n == 1.0 {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_draw_a_point_per_connection() {
    let server = faulty("close_after=100-300").await;
    let mut seen = Vec::new();
    for _ in 0..20 {
        let mut client = connect(server.addr).await;
        client.write_all(&[1u8; 400]).await.unwrap();
        let (back, reset) = outcome(&mut client).await;
        assert!(!reset);
        assert!((100..=300).contains(&back.len()), "closed after {} bytes", back.len());
        seen.push(back.len());
    }
    seen.sort_unstable();
    seen.dedup();
    assert!(seen.len() > 1, "every connection drew the same point: {seen:?}");
    server.shutdown().await;
}

/// Sends one message on each of `n` connections and counts those reset before any echo.
async fn resets_among(server: &TestServer, n: usize) -> usize {
    let mut resets = 0;
    for _ in 0..n {
        // On loopback the reset can beat the connect's own completion.
        let Ok(mut client) = tokio::net::TcpStream::connect(server.addr).await else {
            resets += 1;
            continue;
        };
        let _ = client.write_all(b"hello").await;
        let mut back = [0u8; 5];
        match tokio::time::timeout(TIMEOUT, client.read_exact(&mut back)).await.expect("an answer in time") {
            Ok(_) => assert_eq!(&back, b"hello"),
            Err(_) => resets += 1,
        }
    }
    resets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_probability_zero_one_and_a_half() {
    let never = faulty("reset_probability=0").await;
    assert_eq!(resets_among(&never, 50).await, 0);
    never.shutdown().await;
    let always = faulty("reset_probability=1").await;
    assert_eq!(resets_among(&always, 50).await, 50);
    let m = always.metrics();
    assert_eq!(metric(&m, "echod_connections_closed_total", "reason=\"injected_reset\""), 50.0);
    always.shutdown().await;
    let half = faulty("reset_probability=0.5").await;
    let resets = resets_among(&half, 200).await;
    assert!((60..=140).contains(&resets), "{resets} of 200 reset at p=0.5");
    half.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_combine() {
    let server = faulty("delay=100ms&rate=512KiB&close_after=64KiB").await;
    let mut client = connect(server.addr).await;
    let data = pattern(100 * 1024, 5);
    let started = Instant::now();
    let (mut reader, mut writer) = client.split();
    let write = async {
        let _ = writer.write_all(&data).await;
    };
    let read = async {
        let mut back = Vec::new();
        let _ = tokio::time::timeout(TIMEOUT, reader.read_to_end(&mut back)).await.expect("closed in time");
        back
    };
    let ((), back) = tokio::join!(write, read);
    let took = started.elapsed();
    assert_eq!(back, data[..64 * 1024], "exactly the bytes before the close");
    // 64 KiB at 512 KiB/s is ~125 ms, plus the delay.
    assert!(took >= Duration::from_millis(200), "took {took:?}");
    server.shutdown().await;
}
