//! Graceful drain, driven in-process (the binary's signal handling is tested in signals.rs).

mod common;

use std::time::{Duration, Instant};

use common::{echo, read_to_eof, TestServer, TIMEOUT};
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
    let mut lingering = server.connect().await;
    assert_eq!(echo(&mut lingering, b"hi").await, b"hi");

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
