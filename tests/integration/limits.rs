//! Connection limit and idle timeout.

use std::time::{Duration, Instant};

use crate::common::{self, echo, read_to_eof, TestServer, TIMEOUT};
use tokio::io::AsyncReadExt;

/// At the limit echod stops accepting; the newcomer waits in the backlog (never refused) and is
/// served as soon as a slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_queues_the_excess_and_serves_it_later() {
    let server = TestServer::start(&["--max-connections", "2"]).await;
    let mut first = server.connect().await;
    let mut second = server.connect().await;
    assert_eq!(echo(&mut first, b"one").await, b"one");
    assert_eq!(echo(&mut second, b"two").await, b"two");

    // The third handshake completes in the kernel's backlog, but echod does not serve it yet.
    let mut third = server.connect().await;
    tokio::io::AsyncWriteExt::write_all(&mut third, b"three").await.unwrap();
    let mut buf = [0u8; 5];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read_exact(&mut buf)).await;
    assert!(early.is_err(), "a third client was served beyond --max-connections 2");
    assert_eq!(server.handle.active_connections(), 2);

    // Freeing a slot lets echod accept it, and the bytes it sent while queued come back.
    drop(first);
    tokio::time::timeout(TIMEOUT, third.read_exact(&mut buf))
        .await
        .expect("served once a slot frees")
        .unwrap();
    assert_eq!(&buf, b"three");
    assert_eq!(echo(&mut second, b"still").await, b"still");
    drop((second, third));
    let report = server.shutdown().await;
    assert_eq!(report.closed_by_timeout, 0);
}

/// An idle connection is closed after --idle-timeout; a busy one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_idle_connections_only() {
    let idle = Duration::from_millis(400);
    let server = TestServer::start(&["--idle-timeout", "400ms"]).await;

    let mut quiet = server.connect().await;
    // The server's idle clock starts at its last read or write, which is after this send began
    // and may be before the echo arrives here: start the client's clock before the send.
    let quiet_since = Instant::now();
    assert_eq!(echo(&mut quiet, b"hello").await, b"hello");
    let quiet_closed = tokio::spawn(async move {
        let rest = read_to_eof(&mut quiet).await;
        (rest, quiet_since.elapsed())
    });

    // A busy client keeps talking for well past the timeout and is never cut off.
    let mut busy = server.connect().await;
    let busy_until = Instant::now() + idle * 3;
    let mut rounds = 0;
    while Instant::now() < busy_until {
        assert_eq!(echo(&mut busy, b"ping").await, b"ping", "busy client cut off");
        tokio::time::sleep(idle / 8).await;
        rounds += 1;
        assert!(rounds < 1000);
    }

    let (rest, after) = tokio::time::timeout(TIMEOUT, quiet_closed).await.unwrap().unwrap();
    assert!(rest.is_empty());
    assert!(after >= idle, "closed after {after:?}, before the {idle:?} timeout");
    assert!(after < idle * 5, "closed only after {after:?}");
    assert_eq!(echo(&mut busy, b"still here").await, b"still here");
    drop(busy);
    server.shutdown().await;
}

/// The idle clock runs from the last byte, not from the connect: a client that waits before it
/// speaks still gets the whole timeout after its last echo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_counts_from_the_last_echo_not_from_the_connect() {
    let idle = Duration::from_millis(400);
    let server = TestServer::start(&["--idle-timeout", "400ms"]).await;
    let mut late = server.connect().await;
    // Quiet on purpose, for most of the timeout: that is the behaviour under test.
    tokio::time::sleep(idle * 3 / 4).await;
    let since = Instant::now();
    assert_eq!(echo(&mut late, b"at last").await, b"at last");
    let rest =
        tokio::time::timeout(TIMEOUT, read_to_eof(&mut late)).await.expect("closed within the timeout");
    let after = since.elapsed();
    assert!(rest.is_empty());
    assert!(after >= idle, "closed {after:?} after the last echo, before the {idle:?} timeout");
    server.shutdown().await;
}

/// A connection stuck because its client never reads counts as idle too: nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_also_closes_a_stalled_connection() {
    let server = TestServer::start(&["--idle-timeout", "300ms"]).await;
    let mut stalled = server.connect().await;
    // Write far more than all buffers hold, never reading: the writer stalls, then the server
    // closes the connection, which ends the write with an error.
    let data = common::pattern(48 << 20, 9);
    let written =
        tokio::time::timeout(TIMEOUT, tokio::io::AsyncWriteExt::write_all(&mut stalled, &data)).await;
    assert!(matches!(written, Ok(Err(_))), "the stalled connection was not closed");
    common::eventually("connection freed", || server.handle.active_connections() == 0).await;
    server.shutdown().await;
}
