//! PROXY protocol listeners and the banner, against the real server on loopback: headers of both
//! versions consumed and never echoed, the client address they carry shown in the banner,
//! malformed or late headers closing only their own connection (and counted), `--proxy-from`
//! refusing other peers unread, and arbitrary bytes never echoing a header byte.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::{self, connect, echo, metric, outcome, read_line, TestServer, TIMEOUT};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

fn v2_header(command: u8, client: Option<SocketAddr>) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x20 | command);
    let mut body = Vec::new();
    match client {
        Some(SocketAddr::V4(a)) => {
            h.push(0x11);
            body.extend_from_slice(&a.ip().octets());
            body.extend_from_slice(&[10, 0, 0, 1]);
            body.extend_from_slice(&a.port().to_be_bytes());
            body.extend_from_slice(&8080u16.to_be_bytes());
        }
        Some(SocketAddr::V6(a)) => {
            h.push(0x21);
            body.extend_from_slice(&a.ip().octets());
            body.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
            body.extend_from_slice(&a.port().to_be_bytes());
            body.extend_from_slice(&8080u16.to_be_bytes());
        }
        None => h.push(0x00),
    }
    // A TLV (NOOP) the parser must skip.
    body.extend_from_slice(&[0x04, 0x00, 0x02, 0xAA, 0xBB]);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&body);
    h
}

async fn proxy_server(version: &str, extra: &[&str]) -> TestServer {
    let listen = format!("tcp://127.0.0.1:0?proxy={version}");
    let mut args =
        vec!["--listen", listen.as_str(), "--metrics-listen", "127.0.0.1:0", "--banner", "{client} {peer}"];
    args.extend_from_slice(extra);
    TestServer::start(&args).await
}

/// Sends `header` + `first` in one write, reads the banner, echoes `later`, and returns the
/// banner's client and peer.
async fn session(server: &TestServer, header: &[u8], first: &[u8], later: &[u8]) -> (String, String) {
    let mut client = connect(server.addr).await;
    let mut opening = header.to_vec();
    opening.extend_from_slice(first);
    client.write_all(&opening).await.unwrap();
    let banner = read_line(&mut client).await;
    let (client_addr, peer) = banner.trim_end().split_once(' ').expect("two fields");
    let mut back = vec![0u8; first.len()];
    tokio::time::timeout(TIMEOUT, tokio::io::AsyncReadExt::read_exact(&mut client, &mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, first, "bytes after the header, in the same segment, are echoed");
    assert_eq!(echo(&mut client, later).await, later);
    (client_addr.to_string(), peer.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_headers_give_the_client_address_and_are_never_echoed() {
    let server = proxy_server("v1", &[]).await;
    let (client, peer) =
        session(&server, b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 8080\r\n", b"same segment", b"later").await;
    assert_eq!(client, "192.0.2.7:40000");
    assert!(peer.starts_with("127.0.0.1:"), "peer is the socket's: {peer}");
    let (client, _) = session(&server, b"PROXY TCP6 2001:db8::7 ::1 5000 8080\r\n", b"x", b"y").await;
    assert_eq!(client, "[2001:db8::7]:5000");
    // UNKNOWN (a load balancer's health check): served with the socket's own address.
    let (client, peer) = session(&server, b"PROXY UNKNOWN\r\n", b"hc", b"ok").await;
    assert_eq!(client, peer);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_headers_give_the_client_address_and_are_never_echoed() {
    let server = proxy_server("v2", &[]).await;
    let v4: SocketAddr = "198.51.100.9:1234".parse().unwrap();
    let (client, _) = session(&server, &v2_header(1, Some(v4)), b"after v2", b"more").await;
    assert_eq!(client, "198.51.100.9:1234");
    let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    let (client, _) = session(&server, &v2_header(1, Some(v6)), b"six", b"again").await;
    assert_eq!(client, "[2001:db8::1]:443");
    let (client, peer) = session(&server, &v2_header(0, None), b"local", b"cmd").await;
    assert_eq!(client, peer, "LOCAL is served with the socket's address");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_takes_both_versions_and_a_header_split_byte_by_byte() {
    let server = proxy_server("any", &[]).await;
    let (client, _) = session(&server, b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\r\n", b"a", b"b").await;
    assert_eq!(client, "192.0.2.1:1");
    let (client, _) = session(&server, &v2_header(1, Some("192.0.2.2:3".parse().unwrap())), b"c", b"d").await;
    assert_eq!(client, "192.0.2.2:3");

    for header in [
        b"PROXY TCP4 192.0.2.3 10.0.0.1 7 8\r\n".to_vec(),
        v2_header(1, Some("192.0.2.4:9".parse().unwrap())),
    ] {
        let mut stream = connect(server.addr).await;
        stream.set_nodelay(true).unwrap();
        for byte in &header {
            stream.write_all(&[*byte]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stream.write_all(b"tail").await.unwrap();
        let banner = read_line(&mut stream).await;
        assert!(banner.starts_with("192.0.2."), "{banner}");
        let mut back = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut back).await.unwrap();
        assert_eq!(&back, b"tail");
    }
    server.shutdown().await;
}

/// Each bad opening closes only its own connection, echoes nothing, and is counted; a client
/// echoing on the same listener meanwhile is undisturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_close_only_their_connection_and_are_counted() {
    let server = proxy_server("v2", &["--proxy-header-timeout", "300ms"]).await;
    let mut good = connect(server.addr).await;
    good.write_all(&v2_header(1, Some("192.0.2.9:1".parse().unwrap()))).await.unwrap();
    read_line(&mut good).await;

    let long_v1 = format!("PROXY TCP4 {}\r\n", "9".repeat(120));
    let mut truncated = v2_header(1, Some("192.0.2.9:2".parse().unwrap()));
    truncated.truncate(truncated.len() - 3);
    let openings: Vec<(&str, Vec<u8>, bool)> = vec![
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false),
        ("wrong version", b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\r\nhello".to_vec(), false),
        ("oversized v1 line", long_v1.into_bytes(), false),
        ("truncated v2", truncated, true),
        ("silence", Vec::new(), false),
    ];
    let count = openings.len();
    for (what, bytes, half_close) in openings {
        let mut bad = connect(server.addr).await;
        bad.write_all(&bytes).await.unwrap();
        if half_close {
            bad.shutdown().await.unwrap();
        }
        let (back, _) = outcome(&mut bad).await;
        assert!(back.is_empty(), "{what}: echoed {back:?}");
        assert_eq!(echo(&mut good, what.as_bytes()).await, what.as_bytes(), "after {what}");
    }
    let m = server.metrics();
    assert_eq!(metric(&m, "echod_handshake_failures_total", "stage=\"proxy\""), count as f64);
    common::eventually_saw("handshake failures closed", || {
        let m = server.metrics();
        let closed = metric(&m, "echod_connections_closed_total", "reason=\"handshake_failed\"");
        if closed == count as f64 {
            Ok(())
        } else {
            Err(format!("{closed}"))
        }
    })
    .await;
    drop(good);
    server.shutdown().await;
}

/// With --proxy-from, a peer outside it is reset at once, unread, without taking a slot or
/// counting as accepted; a trusted peer is served.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_from_refuses_other_peers_unread() {
    let server = proxy_server("v1", &["--proxy-from", "127.0.0.3", "--max-connections", "1"]).await;
    let forged = b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\r\nforged";
    assert!(common::refused_from("127.0.0.2", server.addr, forged).await, "an untrusted peer was served");

    let mut trusted = common::connect_from("127.0.0.3", server.addr).await;
    trusted.write_all(b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\r\n").await.unwrap();
    assert_eq!(read_line(&mut trusted).await.split(' ').next(), Some("192.0.2.1:1"));
    assert_eq!(echo(&mut trusted, b"trusted").await, b"trusted");
    let m = server.metrics();
    assert_eq!(metric(&m, "echod_connections_rejected_total", "reason=\"untrusted_proxy\""), 1.0);
    assert_eq!(metric(&m, "echod_connections_accepted_total", ""), 1.0);
    server.shutdown().await;
}

/// Every placeholder, on a plain listener (no PROXY: client == peer) and on a PROXY one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_banner_fills_every_placeholder() {
    let template = "{hostname}|{listener}|{client}|{peer}|{server}|{version}|{client_cert}|{{ok}}";
    let server = TestServer::start(&[
        "--listen",
        "127.0.0.1:0",
        "--listen",
        "tcp://127.0.0.1:0?proxy=v1",
        "--banner",
        template,
    ])
    .await;
    let hostname = gethostname();
    let version = env!("CARGO_PKG_VERSION");

    let mut plain = connect(server.addrs[0]).await;
    let local = plain.local_addr().unwrap();
    let line = read_line(&mut plain).await;
    let expected = format!(
        "{hostname}|tcp://{}|{local}|{local}|{}|{version}||{{ok}}\n",
        server.addrs[0], server.addrs[0]
    );
    assert_banner(&line, &expected);
    assert_eq!(echo(&mut plain, b"after the banner").await, b"after the banner");

    let mut proxied = connect(server.addrs[1]).await;
    let local = proxied.local_addr().unwrap();
    proxied.write_all(b"PROXY TCP4 203.0.113.5 10.0.0.1 6000 8080\r\n").await.unwrap();
    let line = read_line(&mut proxied).await;
    let expected = format!(
        "{hostname}|tcp://{}?proxy=v1|203.0.113.5:6000|{local}|{}|{version}||{{ok}}\n",
        server.addrs[1], server.addrs[1]
    );
    assert_banner(&line, &expected);
    server.shutdown().await;
}

/// Windows host names compare without regard to case (Wine reports them in either).
fn assert_banner(line: &str, expected: &str) {
    if cfg!(windows) {
        assert_eq!(line.to_lowercase(), expected.to_lowercase());
    } else {
        assert_eq!(line, expected);
    }
}

fn gethostname() -> String {
    // The same source echod uses, read independently of it.
    let out = std::process::Command::new("hostname").output();
    match out {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => std::env::var("HOSTNAME").or_else(|_| std::env::var("COMPUTERNAME")).unwrap_or_default(),
    }
}

/// Openings that look like a header's start, or like nothing at all.
fn opening() -> impl Strategy<Value = Vec<u8>> {
    let tail = proptest::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        tail.clone(),
        tail.clone().prop_map(|t| [b"PROXY ".to_vec(), t].concat()),
        tail.clone().prop_map(|t| [b"PROXY TCP4 ".to_vec(), t].concat()),
        tail.clone().prop_map(|t| [V2_SIGNATURE.to_vec(), t].concat()),
        tail.prop_map(|t| [V2_SIGNATURE.to_vec(), vec![0x21, 0x11], t].concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever a client sends first, echod never panics and never echoes a byte of a header:
    /// anything that comes back is what followed a complete header (at least 15 bytes long).
    #[test]
    fn arbitrary_openings_never_echo_a_header_byte(bytes in opening()) {
        let (runtime, server) = &*SHARED;
        let echoed = runtime.block_on(async {
            let mut client = connect(server.addr).await;
            client.write_all(&bytes).await.unwrap();
            let _ = client.shutdown().await;
            outcome(&mut client).await.0
        });
        prop_assert!(
            echoed.is_empty() || (bytes.ends_with(&echoed) && echoed.len() + 15 <= bytes.len()),
            "sent {:?}, echoed {:?}", bytes, echoed
        );
    }
}

/// One server for every property case (a runtime of its own, outside any test's runtime).
static SHARED: std::sync::LazyLock<(tokio::runtime::Runtime, TestServer)> = std::sync::LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = runtime.block_on(TestServer::start(&[
        "--listen",
        "tcp://127.0.0.1:0?proxy=any",
        "--proxy-header-timeout",
        "200ms",
    ]));
    (runtime, server)
});

#[test]
fn the_server_survives_the_property_cases() {
    let (runtime, server) = &*SHARED;
    runtime.block_on(async {
        let mut client = connect(server.addr).await;
        client.write_all(b"PROXY UNKNOWN\r\nstill here").await.unwrap();
        let mut back = [0u8; 10];
        tokio::time::timeout(TIMEOUT, tokio::io::AsyncReadExt::read_exact(&mut client, &mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&back, b"still here");
    });
}
