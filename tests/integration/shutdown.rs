//! Graceful drain, driven in-process (the binary's signal handling is tested in signals.rs).

use std::time::{Duration, Instant};

use crate::common::{self, echo, read_to_eof, TestServer, TIMEOUT};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_newcomers_but_keeps_echoing_in_flight_connections() {
    let mut server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    assert_eq!(echo(&mut client, b"before").await, b"before");

    server.begin_shutdown();
    tokio::time::timeout(TIMEOUT, server.handle.listeners_closed()).await.expect("listeners close");
    assert!(server.handle.is_draining());
    let refused = tokio::net::TcpStream::connect(server.addr).await;
    assert!(refused.is_err(), "a new connect succeeded during the drain");

    // Data sent after the shutdown began is still echoed, and the client closes normally.
    let data = common::pattern(1 << 20, 5);
    assert!(echo(&mut client, &data).await == data);
    client.shutdown().await.unwrap();
    assert!(read_to_eof(&mut client).await.is_empty());

    let report = server.finished().await;
    assert_eq!(report.draining, 1);
    assert_eq!(report.closed_by_timeout, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_shutdown_timeout_are_closed_in_time() {
    let server = TestServer::start(&["--shutdown-timeout", "300ms"]).await;
    // A client that sends without reading always has data in flight: only the timeout ends it.
    let mut lingering = server.connect().await;
    let stuck = common::pattern(8 << 20, 3);
    let (_, mut writer) = lingering.split();
    let _ = tokio::time::timeout(Duration::from_millis(300), writer.write_all(&stuck)).await;

    let started = Instant::now();
    let report = server.shutdown().await;
    let took = started.elapsed();
    assert_eq!(report.closed_by_timeout, 1);
    assert!(took >= Duration::from_millis(300), "closed before the timeout: {took:?}");
    assert!(took < Duration::from_secs(3), "drain took {took:?}");
    // The client sees its connection end.
    let mut rest = Vec::new();
    let end =
        tokio::time::timeout(TIMEOUT, tokio::io::AsyncReadExt::read_to_end(&mut lingering, &mut rest)).await;
    assert!(end.is_ok(), "the lingering client was not closed");
}

/// When the listeners close, a connection with nothing in flight is closed at once (a FIN: the
/// client reads a clean EOF), while one mid-transfer keeps echoing until it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_idle_connections_at_once_and_lets_busy_ones_finish() {
    let mut server = TestServer::start(&["--shutdown-timeout", "20s"]).await;
    let mut idle = server.connect().await;
    assert_eq!(echo(&mut idle, b"once").await, b"once");
    let mut busy = server.connect().await;
    assert_eq!(echo(&mut busy, b"first").await, b"first");
    // The idle client's copy phase ends on its quiet tick: it holds no buffers, nothing in flight.
    common::eventually("both connections quiet", || server.handle.copying_connections() == 0).await;

    // The busy client streams throughout the drain.
    let chunk = common::pattern(64 * 1024, 9);
    let streaming = tokio::spawn(async move {
        let started = Instant::now();
        let mut rounds = 0;
        while started.elapsed() < Duration::from_millis(1500) {
            assert!(echo(&mut busy, &chunk).await == chunk, "echo during the drain");
            rounds += 1;
        }
        busy.shutdown().await.unwrap();
        assert!(read_to_eof(&mut busy).await.is_empty());
        rounds
    });
    // Let the stream get going, so the busy connection is mid-transfer when the listeners close.
    common::eventually("the busy client copying", || server.handle.copying_connections() == 1).await;
    let started = Instant::now();
    server.begin_shutdown();
    assert!(read_to_eof(&mut idle).await.is_empty(), "the idle client gets a clean EOF");
    let idle_closed = started.elapsed();
    assert!(idle_closed < Duration::from_secs(5), "idle client closed after {idle_closed:?}");

    let rounds = tokio::time::timeout(TIMEOUT, streaming).await.unwrap().unwrap();
    assert!(rounds > 1, "the busy client kept echoing ({rounds} rounds)");
    let report = server.finished().await;
    assert_eq!(report.draining, 2);
    assert_eq!(report.closed_by_timeout, 0, "neither waited for the timeout");
    assert!(started.elapsed() < Duration::from_secs(10), "drain took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delay_keeps_accepting_while_not_ready() {
    let mut server = TestServer::start(&["--shutdown-delay", "400ms"]).await;
    server.begin_shutdown();
    common::eventually("draining", || server.handle.is_draining()).await;
    // Still accepting and echoing during the delay.
    let mut late = server.connect().await;
    assert_eq!(echo(&mut late, b"late").await, b"late");
    drop(late);
    tokio::time::timeout(TIMEOUT, server.handle.listeners_closed())
        .await
        .expect("listeners close after the delay");
    server.finished().await;
}
