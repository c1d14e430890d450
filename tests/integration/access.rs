//! Access control and per-source limits against the real server on loopback. Clients differ by
//! source address (127.0.0.2, 127.0.0.3, ...: Linux routes all of 127.0.0.0/8 to loopback).

use std::time::{Duration, Instant};

use crate::common::{self, connect_from, echo, metric, refused_from, Binary, TestServer, TIMEOUT};
use tokio::io::AsyncWriteExt;

async fn served_from(source: &str, server: &TestServer) -> tokio::net::TcpStream {
    let mut client = connect_from(source, server.addr).await;
    assert_eq!(echo(&mut client, source.as_bytes()).await, source.as_bytes(), "{source} served");
    client
}

async fn start(args: &[&str]) -> TestServer {
    let mut all = vec!["--metrics-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    TestServer::start(&all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_host_is_refused_while_another_is_served() {
    let server = start(&["--deny", "127.0.0.2"]).await;
    assert!(refused_from("127.0.0.2", server.addr, b"let me in").await);
    let _ok = served_from("127.0.0.3", &server).await;
    let m = server.metrics();
    assert_eq!(metric(&m, "echod_connections_rejected_total", "reason=\"denied\""), 1.0);
    assert_eq!(metric(&m, "echod_connections_accepted_total", ""), 1.0, "refusals are not accepted");
    assert_eq!(metric(&m, "echod_connections_active", ""), 1.0, "nor active");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_list_admits_only_its_prefixes_and_deny_beats_allow() {
    let server = start(&["--allow", "127.0.0.0/30,127.0.1.0/24", "--deny", "127.0.1.9"]).await;
    let _a = served_from("127.0.0.2", &server).await;
    let _b = served_from("127.0.1.200", &server).await;
    assert!(refused_from("127.0.0.5", server.addr, b"x").await, "outside every allow");
    assert!(refused_from("127.0.1.9", server.addr, b"x").await, "deny wins over allow");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_rules_apply_to_ipv6_clients() {
    let denied = TestServer::start(&["--listen", "[::1]:0", "--deny", "::1"]).await;
    match tokio::net::TcpStream::connect(denied.addr).await {
        // On loopback the reset can beat the connect's own completion.
        Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "connect: {err}"),
        Ok(mut stream) => {
            assert!(
                common::reset_unechoed(&mut stream, b"six").await,
                "the denied ::1 was echoed or not reset"
            )
        }
    }
    denied.shutdown().await;
    let allowed = TestServer::start(&["--listen", "[::1]:0", "--allow", "::1/128"]).await;
    let mut client = common::connect(allowed.addr).await;
    assert_eq!(echo(&mut client, b"six").await, b"six");
    drop(client);
    allowed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_past_a_sources_limit_is_refused_and_a_freed_slot_admits_the_next() {
    let server = start(&["--max-connections-per-source", "2"]).await;
    let first = served_from("127.0.0.2", &server).await;
    let _second = served_from("127.0.0.2", &server).await;
    assert!(refused_from("127.0.0.2", server.addr, b"third").await);
    let _other = served_from("127.0.0.3", &server).await;
    drop(first);
    common::eventually("the slot freed", || server.handle.active_connections() == 2).await;
    let _again = served_from("127.0.0.2", &server).await;
    let m = server.metrics();
    assert_eq!(metric(&m, "echod_connections_rejected_total", "reason=\"per_source_limit\""), 1.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_rate_per_source_is_capped() {
    let server = start(&["--connect-rate-per-source", "5"]).await;
    // A burst of 5 is admitted at once; then the bucket refills at 5 per second.
    for _ in 0..5 {
        drop(served_from("127.0.0.2", &server).await);
    }
    assert!(refused_from("127.0.0.2", server.addr, b"sixth").await);
    let _other = served_from("127.0.0.3", &server).await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    drop(served_from("127.0.0.2", &server).await);
    let m = server.metrics();
    assert_eq!(metric(&m, "echod_connections_rejected_total", "reason=\"connect_rate\""), 1.0);
    server.shutdown().await;
}

/// Behind a load balancer the rules see the client the PROXY header names, not the balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_apply_to_the_proxy_client_address() {
    let server = start(&["--listen", "tcp://127.0.0.1:0?proxy=v1", "--deny", "192.0.2.0/24"]).await;
    let mut denied = common::connect(server.addr).await;
    denied.write_all(b"PROXY TCP4 192.0.2.55 10.0.0.1 4000 8080\r\nhello").await.unwrap();
    let (back, _) = common::outcome(&mut denied).await;
    assert!(back.is_empty(), "a denied PROXY client was echoed {back:?}");
    let mut allowed = common::connect(server.addr).await;
    allowed.write_all(b"PROXY TCP4 198.51.100.1 10.0.0.1 4000 8080\r\n").await.unwrap();
    assert_eq!(
        echo(&mut allowed, b"hello").await,
        b"hello",
        "the proxy itself (127.0.0.1) is not what is checked"
    );
    common::eventually_saw("the refusal counted", || {
        let m = server.metrics();
        let rejected = metric(&m, "echod_connections_rejected_total", "reason=\"denied\"");
        let closed = metric(&m, "echod_connections_closed_total", "reason=\"rejected\"");
        if rejected == 1.0 && closed == 1.0 {
            Ok(())
        } else {
            Err(format!("rejected {rejected}, closed {closed}"))
        }
    })
    .await;
    server.shutdown().await;
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// A flood of refused connects costs little CPU per connect and does not stop an allowed client
/// from being served meanwhile.
#[test]
fn a_flood_of_refused_connects_is_cheap_and_disturbs_no_one() {
    const FLOOD: usize = 4000;
    let echod = Binary::start(&["--metrics-listen", "off", "--deny", "127.0.0.2"]);
    let pid = echod.child.id();
    let addr = echod.addr;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let mut allowed = common::connect_from("127.0.0.3", addr).await;
        let cpu_before = cpu_seconds(pid);
        let started = Instant::now();
        let flood = tokio::spawn(async move {
            let mut refused = 0;
            for _ in 0..FLOOD {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                // Closed with a reset by us too, so neither side leaves TIME_WAIT behind.
                socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO)).unwrap();
                match socket.connect(addr).await {
                    Ok(mut stream) => {
                        let mut byte = [0u8; 1];
                        if let Ok(Err(_) | Ok(0)) =
                            tokio::time::timeout(TIMEOUT, tokio::io::AsyncReadExt::read(&mut stream, &mut byte)).await
                        {
                            refused += 1;
                        }
                    }
                    Err(_) => refused += 1,
                }
            }
            refused
        });
        let mut rounds = 0;
        while !flood.is_finished() {
            assert_eq!(echo(&mut allowed, b"still served").await, b"still served");
            rounds += 1;
        }
        let refused = flood.await.unwrap();
        let took = started.elapsed();
        let cpu = cpu_seconds(pid) - cpu_before;
        let per_connect = cpu / FLOOD as f64 * 1e6;
        println!("{refused} refused connects in {took:?}: echod used {cpu:.2} s CPU, {per_connect:.0} µs per connect; {rounds} echoes meanwhile");
        assert_eq!(refused, FLOOD, "every connect from the denied host was refused");
        assert!(rounds > 0);
        // Generous: accepting and resetting a connection is tens of microseconds.
        assert!(per_connect < 1000.0, "{per_connect:.0} µs of CPU per refused connect");
    });
    drop(echod);
}
