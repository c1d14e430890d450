//! UDP echo against the real server on loopback: exact echo of every size over IPv4 and IPv6,
//! many sockets with many datagrams in flight, what is refused (reserved source ports, sources
//! over their rate) and counted, the bounded per-source table, exact metrics, no UDP socket
//! without a `udp://` listener, the drain, and the command line's refusals.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::common::{self, eventually_saw, metric, run_to_exit, scale, TIMEOUT};
use echod::{DrainReport, Server, ServerHandle};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The largest UDP payloads: 65,535 less the IP and UDP headers (IPv6's header is not counted in
/// its payload length, so IPv6 datagrams can be 20 bytes longer).
const MAX_V4: usize = 65_507;
const MAX_V6: usize = 65_527;

/// An in-process echod with one TCP listener on 127.0.0.1:0 and the UDP listeners of `args`.
struct UdpServer {
    udp: Vec<SocketAddr>,
    handle: ServerHandle,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<DrainReport>,
}

impl UdpServer {
    async fn start(args: &[&str]) -> UdpServer {
        let server = Server::bind(&common::config(args)).expect("bind on loopback");
        let udp = server.udp_addrs();
        let handle = server.handle();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        UdpServer { udp, handle, stop: Some(stop), task }
    }

    fn metrics(&self) -> String {
        self.handle.render_metrics().expect("metrics are on")
    }

    fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    async fn shutdown(mut self) -> DrainReport {
        self.begin_shutdown();
        tokio::time::timeout(TIMEOUT, self.task).await.expect("server stops in time").expect("server task")
    }
}

/// A client socket on `local`, connected to `server` (so it receives only the server's replies).
async fn client_on(local: SocketAddr, server: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    Ok(socket)
}

async fn client(server: SocketAddr) -> UdpSocket {
    let any = match server.ip() {
        IpAddr::V4(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
        IpAddr::V6(_) => "[::1]:0".parse().expect("an address"),
    };
    client_on(any, server).await.expect("client socket")
}

/// Receives one datagram (bounded in time) and returns it whole.
async fn recv(socket: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 70_000];
    let n = tokio::time::timeout(TIMEOUT, socket.recv(&mut buf))
        .await
        .expect("a reply in time")
        .expect("receive a reply");
    buf.truncate(n);
    buf
}

/// Whether a datagram arrives within `wait`.
async fn arrives_within(socket: &UdpSocket, wait: Duration) -> bool {
    let mut buf = vec![0u8; 70_000];
    matches!(tokio::time::timeout(wait, socket.recv(&mut buf)).await, Ok(Ok(_)))
}

/// Sends `sentinel` and expects it to be the next datagram back: nothing (a duplicate, a second
/// reply) is left queued before it.
async fn expect_nothing_more(socket: &UdpSocket, sentinel: &[u8]) {
    socket.send(sentinel).await.expect("send the sentinel");
    assert_eq!(recv(socket).await, sentinel, "an extra datagram arrived before the sentinel");
}

/// The server's UDP listener for the address family of `ip`.
fn listener_for(server: &UdpServer, v6: bool) -> SocketAddr {
    *server.udp.iter().find(|a| a.is_ipv6() == v6).expect("a UDP listener of that family")
}

/// Whether a datagram sent from a socket bound to `source` arrives with that source address
/// (true on Linux for all of 127.0.0.0/8; a platform may bind such an address and still send
/// from another). Tests that tell clients apart by address skip without it.
fn loopback_source_kept(source: Ipv4Addr) -> bool {
    let probe = || -> io::Result<bool> {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0")?;
        receiver.set_read_timeout(Some(Duration::from_secs(2)))?;
        let sender = std::net::UdpSocket::bind(SocketAddr::from((source, 0)))?;
        sender.send_to(b"probe", receiver.local_addr()?)?;
        let (_, from) = receiver.recv_from(&mut [0u8; 16])?;
        Ok(from.ip() == IpAddr::V4(source))
    };
    probe().unwrap_or(false)
}

/// Whether this host has an IPv6 loopback address.
fn ipv6_loopback() -> bool {
    std::net::UdpSocket::bind("[::1]:0").is_ok()
}

#[tokio::test]
async fn every_size_comes_back_exactly_once_over_ipv4_and_ipv6() {
    let v6 = ipv6_loopback();
    let mut args = vec!["--listen", "udp://127.0.0.1:0"];
    if v6 {
        args.extend(["--listen", "udp://[::1]:0"]);
    }
    args.extend(["--metrics-listen", "127.0.0.1:0"]);
    if !v6 {
        eprintln!("no IPv6 loopback on this host: checking IPv4 only");
    }
    let server = UdpServer::start(&args).await;
    for family_v6 in [false, true] {
        if family_v6 && !v6 {
            continue;
        }
        let addr = listener_for(&server, family_v6);
        let socket = client(addr).await;
        let max = if family_v6 { MAX_V6 } else { MAX_V4 };
        for (seed, size) in [1usize, 512, 1472, 9000, max].into_iter().enumerate() {
            let data = common::pattern(size, seed as u64 + 1);
            socket.send(&data).await.unwrap_or_else(|e| panic!("send {size} B to {addr}: {e}"));
            let back = recv(&socket).await;
            assert_eq!(back.len(), size, "{size} B to {addr} came back as {} B", back.len());
            assert!(back == data, "{size} B to {addr} came back altered");
        }
        // Every value of a byte, and one more than the largest payload is refused by the
        // sender's own kernel: no datagram can be larger.
        let all: Vec<u8> = (0..=255u8).collect();
        socket.send(&all).await.expect("send all byte values");
        assert_eq!(recv(&socket).await, all);
        assert!(socket.send(&vec![0u8; max + 1]).await.is_err(), "a datagram over {max} B was sent");
        expect_nothing_more(&socket, b"sentinel").await;
    }
    let m = server.metrics();
    let families = if v6 { 2.0 } else { 1.0 };
    assert_eq!(metric(&m, "echod_udp_datagrams_received_total", ""), 7.0 * families, "{m}");
    assert_eq!(metric(&m, "echod_udp_datagrams_sent_total", ""), 7.0 * families, "{m}");
    server.shutdown().await;
}

#[tokio::test]
async fn many_sockets_with_many_datagrams_in_flight_are_answered_to_their_source() {
    let server = UdpServer::start(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--udp-rate-limit",
        "off",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await;
    let addr = server.udp[0];
    let sockets = scale(100, 20);
    let in_flight = 20u32;
    let mut clients = Vec::new();
    for _ in 0..sockets {
        clients.push(client(addr).await);
    }
    // Every socket sends its whole window before any reply is read.
    for (id, socket) in clients.iter().enumerate() {
        for seq in 0..in_flight {
            socket.send(&datagram(id as u32, seq)).await.expect("send");
        }
    }
    for (id, socket) in clients.iter().enumerate() {
        let mut seen = HashSet::new();
        for _ in 0..in_flight {
            let back = recv(socket).await;
            let (from, seq) = parse(&back).unwrap_or_else(|| panic!("socket {id}: malformed reply"));
            assert_eq!(from, id as u32, "socket {id} got socket {from}'s datagram");
            assert!(seq < in_flight && seen.insert(seq), "socket {id}: seq {seq} twice or unknown");
            assert!(back == datagram(id as u32, seq), "socket {id}: seq {seq} altered");
        }
        expect_nothing_more(socket, b"end").await;
    }
    let m = server.metrics();
    let total = (sockets as u32 * (in_flight + 1)) as f64;
    assert_eq!(metric(&m, "echod_udp_datagrams_sent_total", ""), total);
    server.shutdown().await;
}

/// A datagram that says which socket sent it and its sequence number, padded with bytes that
/// depend on both.
fn datagram(id: u32, seq: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(100);
    d.extend_from_slice(&id.to_le_bytes());
    d.extend_from_slice(&seq.to_le_bytes());
    d.extend(common::pattern(92, u64::from(id) << 32 | u64::from(seq)));
    d
}

fn parse(d: &[u8]) -> Option<(u32, u32)> {
    let id = u32::from_le_bytes(d.get(0..4)?.try_into().ok()?);
    let seq = u32::from_le_bytes(d.get(4..8)?.try_into().ok()?);
    Some((id, seq))
}

#[tokio::test]
async fn a_reserved_source_port_is_dropped_and_counted() {
    let server =
        UdpServer::start(&["--listen", "udp://127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]).await;
    let addr = server.udp[0];
    let mut reserved = None;
    for port in (1000..1024).rev() {
        match client_on(SocketAddr::from(([127, 0, 0, 1], port)), addr).await {
            Ok(socket) => {
                reserved = Some(socket);
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => break,
            Err(_) => continue, // in use
        }
    }
    let Some(reserved) = reserved else {
        eprintln!("skipped: binding a source port below 1024 needs root (CI runs as root)");
        server.shutdown().await;
        return;
    };
    for _ in 0..3 {
        reserved.send(b"from a service's port").await.expect("send");
    }
    common::eventually_saw("3 reserved_port drops", || {
        let m = server.metrics();
        let n = metric(&m, "echod_udp_datagrams_dropped_total", "reason=\"reserved_port\"");
        if n == 3.0 {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    })
    .await;
    let m = server.metrics();
    assert_eq!(metric(&m, "echod_udp_datagrams_sent_total", ""), 0.0, "{m}");
    assert!(!arrives_within(&reserved, Duration::from_millis(200)).await, "a reserved port was answered");
    // A client port is still answered.
    let socket = client(addr).await;
    socket.send(b"client").await.expect("send");
    assert_eq!(recv(&socket).await, b"client");
    server.shutdown().await;
}

#[tokio::test]
async fn the_rate_limit_caps_one_source_while_another_is_answered_at_full_rate() {
    if !loopback_source_kept(Ipv4Addr::new(127, 0, 0, 2)) {
        eprintln!("skipped: datagrams sent from 127.0.0.2 do not arrive from 127.0.0.2 here");
        return;
    }
    let limit = 50usize;
    let server = UdpServer::start(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--udp-rate-limit",
        "50",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await;
    let addr = server.udp[0];
    let (Ok(flooder), Ok(polite)) = (
        client_on(SocketAddr::from(([127, 0, 0, 2], 0)), addr).await,
        client_on(SocketAddr::from(([127, 0, 0, 3], 0)), addr).await,
    ) else {
        eprintln!("skipped: this host cannot bind 127.0.0.2 and 127.0.0.3");
        server.shutdown().await;
        return;
    };
    let flood = 10 * limit;
    for i in 0..flood {
        flooder.send(&(i as u32).to_le_bytes()).await.expect("flood");
    }
    // The other source is answered, every datagram, while the flooder is held.
    for i in 0..limit {
        let d = format!("polite {i}");
        polite.send(d.as_bytes()).await.expect("send");
        assert_eq!(recv(&polite).await, d.as_bytes(), "the polite source lost a reply");
    }
    // Wait until every flood datagram was judged, then count the replies that came.
    let expected = (flood + limit) as f64;
    eventually_saw("every datagram judged", || {
        let m = server.metrics();
        let n = metric(&m, "echod_udp_datagrams_received_total", "");
        if n == expected {
            Ok(())
        } else {
            Err(format!("{n} of {expected}"))
        }
    })
    .await;
    let mut answered = 0;
    while arrives_within(&flooder, Duration::from_millis(300)).await {
        answered += 1;
    }
    // Its burst, plus what refilled while the flood was being sent (50 a second).
    assert!((limit..limit + 25).contains(&answered), "the flooder got {answered} replies");
    let m = server.metrics();
    assert_eq!(
        metric(&m, "echod_udp_datagrams_dropped_total", "reason=\"rate_limited\""),
        (flood - answered) as f64,
        "{m}"
    );
    assert_eq!(metric(&m, "echod_udp_datagrams_sent_total", ""), (answered + limit) as f64);
    server.shutdown().await;
}

/// Sends `denied_count` datagrams from `denied` and one from `admitted`; the admitted one is
/// echoed, the others are counted as denied and never answered.
async fn denied_and_admitted(
    server: &UdpServer,
    denied: &UdpSocket,
    admitted: &UdpSocket,
    denied_count: usize,
) {
    for i in 0..denied_count {
        denied.send(format!("denied {i}").as_bytes()).await.expect("send");
    }
    admitted.send(b"admitted").await.expect("send");
    assert_eq!(recv(admitted).await, b"admitted");
    let expected = (denied_count + 1) as f64;
    eventually_saw("every datagram judged", || {
        let n = metric(&server.metrics(), "echod_udp_datagrams_received_total", "");
        if n == expected {
            Ok(())
        } else {
            Err(format!("{n} of {expected}"))
        }
    })
    .await;
    assert!(!arrives_within(denied, Duration::from_millis(300)).await, "a denied source was answered");
    let m = server.metrics();
    assert_eq!(
        metric(&m, "echod_udp_datagrams_dropped_total", "reason=\"denied\""),
        denied_count as f64,
        "{m}"
    );
    assert_eq!(metric(&m, "echod_udp_datagrams_sent_total", ""), 1.0, "{m}");
    assert_eq!(metric(&m, "echod_udp_datagrams_dropped_total", "reason=\"rate_limited\""), 0.0, "{m}");
}

#[tokio::test]
async fn a_denied_source_gets_no_reply_and_is_counted_while_another_is_echoed() {
    if !loopback_source_kept(Ipv4Addr::new(127, 0, 0, 2)) {
        eprintln!("skipped: datagrams sent from 127.0.0.2 do not arrive from 127.0.0.2 here");
        return;
    }
    let server = UdpServer::start(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--deny",
        "127.0.0.2/32",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await;
    let addr = server.udp[0];
    let Ok(denied) = client_on(SocketAddr::from(([127, 0, 0, 2], 0)), addr).await else {
        eprintln!("skipped: this host cannot bind 127.0.0.2");
        server.shutdown().await;
        return;
    };
    let admitted = client(addr).await;
    denied_and_admitted(&server, &denied, &admitted, 5).await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_allow_list_answers_only_its_sources_on_both_families() {
    if !loopback_source_kept(Ipv4Addr::new(127, 0, 0, 2)) {
        eprintln!("skipped: datagrams sent from 127.0.0.2 do not arrive from 127.0.0.2 here");
        return;
    }
    let v6 = ipv6_loopback();
    let mut args =
        vec!["--listen", "udp://127.0.0.1:0", "--allow", "127.0.0.1", "--metrics-listen", "127.0.0.1:0"];
    if v6 {
        args.extend(["--listen", "udp://[::1]:0"]);
    }
    let server = UdpServer::start(&args).await;
    let addr = listener_for(&server, false);
    let Ok(outside) = client_on(SocketAddr::from(([127, 0, 0, 2], 0)), addr).await else {
        eprintln!("skipped: this host cannot bind 127.0.0.2");
        server.shutdown().await;
        return;
    };
    let inside = client(addr).await;
    denied_and_admitted(&server, &outside, &inside, 3).await;
    if v6 {
        // ::1 is in no allow: refused too.
        let v6_client = client(listener_for(&server, true)).await;
        v6_client.send(b"from ::1").await.expect("send");
        eventually_saw("the IPv6 datagram denied", || {
            let n = metric(&server.metrics(), "echod_udp_datagrams_dropped_total", "reason=\"denied\"");
            if n == 4.0 {
                Ok(())
            } else {
                Err(format!("{n}"))
            }
        })
        .await;
        assert!(!arrives_within(&v6_client, Duration::from_millis(300)).await, "::1 was answered");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn metrics_are_exact_after_a_known_load() {
    // A limit of 2 a second: two datagrams are answered, the next three dropped (a token
    // comes back only after half a second).
    let server = UdpServer::start(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--udp-rate-limit",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await;
    let addr = server.udp[0];
    let label = format!("listener=\"udp://{addr}\"");
    let m = server.metrics();
    for reason in ["reserved_port", "rate_limited", "send_error", "denied"] {
        assert_eq!(
            metric(&m, "echod_udp_datagrams_dropped_total", &format!("reason=\"{reason}\"")),
            0.0,
            "every drop reason is exported from the start: {m}"
        );
    }
    assert!(m.contains(&format!("echod_udp_datagrams_received_total{{{label}}} 0")), "{m}");
    let socket = client(addr).await;
    let sizes = [100usize, 1000, 7, 8, 9];
    for &size in &sizes[..2] {
        socket.send(&vec![1u8; size]).await.expect("send");
        assert_eq!(recv(&socket).await.len(), size);
    }
    for &size in &sizes[2..] {
        socket.send(&vec![2u8; size]).await.expect("send");
    }
    eventually_saw("5 datagrams counted", || {
        let m = server.metrics();
        let n = metric(&m, "echod_udp_datagrams_received_total", &label);
        if n == 5.0 {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    })
    .await;
    let m = server.metrics();
    let want = [
        ("echod_udp_datagrams_received_total", label.as_str(), 5.0),
        ("echod_udp_datagrams_sent_total", "", 2.0),
        ("echod_udp_bytes_received_total", "", 1124.0),
        ("echod_udp_bytes_sent_total", "", 1100.0),
        ("echod_udp_datagrams_dropped_total", "reason=\"rate_limited\"", 3.0),
        ("echod_udp_datagrams_dropped_total", "reason=\"reserved_port\"", 0.0),
        ("echod_udp_datagrams_dropped_total", "reason=\"send_error\"", 0.0),
        ("echod_udp_datagrams_dropped_total", "reason=\"denied\"", 0.0),
    ];
    for (name, labels, value) in want {
        assert_eq!(metric(&m, name, labels), value, "{name}{{{labels}}} in\n{m}");
    }
    // UDP traffic is not counted as TCP traffic.
    assert_eq!(metric(&m, "echod_bytes_received_total", ""), 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn the_drain_stops_udp_when_the_stream_listeners_close() {
    // Under Wine this test has hung (past 60 s, cause not found yet), taking the whole Windows
    // run to its time limit with it: until that is understood it runs on Linux only.
    if !cfg!(target_os = "linux") {
        eprintln!("skipped off Linux: hangs under Wine");
        return;
    }
    let mut server = UdpServer::start(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--shutdown-delay",
        "300ms",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await;
    let addr = server.udp[0];
    let socket = client(addr).await;
    socket.send(b"before").await.expect("send");
    assert_eq!(recv(&socket).await, b"before");
    assert_eq!(server.handle.udp_listeners_serving(), 1);
    server.begin_shutdown();
    common::eventually("draining", || server.handle.is_draining()).await;
    // During the shutdown delay datagrams are still answered.
    socket.send(b"during the delay").await.expect("send");
    assert_eq!(recv(&socket).await, b"during the delay");
    tokio::time::timeout(TIMEOUT, server.handle.listeners_closed()).await.expect("listeners close");
    assert_eq!(server.handle.udp_listeners_serving(), 0);
    // The socket is closed: nothing answers, and on Linux the kernel says so at once.
    let answered = match socket.send(b"after").await {
        Ok(_) => arrives_within(&socket, Duration::from_millis(300)).await,
        Err(_) => false,
    };
    assert!(!answered, "a datagram was answered after the listeners closed");
    let report = server.shutdown().await;
    assert_eq!(report.closed_by_timeout, 0);
}

#[tokio::test]
async fn the_per_source_table_is_bounded() {
    // Distinct source addresses need 127.0.0.0/8 to be all local, as on Linux.
    if !cfg!(target_os = "linux") {
        eprintln!("skipped: needs the whole 127.0.0.0/8 on loopback");
        return;
    }
    let server =
        UdpServer::start(&["--listen", "udp://127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]).await;
    let addr = server.udp[0];
    // More sources than the table holds (sources hash to sets unevenly, so not every set fills).
    let sources = echod::udp::limiter::SOURCES + 4_000;
    flood_from_distinct_sources(addr, 0, sources, || {
        metric(&server.metrics(), "echod_udp_datagrams_received_total", "") as usize
    })
    .await;
    let tracked = server.handle.udp_tracked_sources();
    assert!(
        (echod::udp::limiter::SOURCES * 3 / 4..=echod::udp::limiter::SOURCES).contains(&tracked),
        "{tracked} sources tracked after {sources}"
    );
    // Every newcomer was answered (its bucket starts full).
    let m = server.metrics();
    assert_eq!(metric(&m, "echod_udp_datagrams_sent_total", ""), sources as f64);
    server.shutdown().await;
}

/// Sends one datagram from each of `count` distinct source addresses (127.1.0.0 onwards, from
/// the `first`th), in chunks, waiting after each chunk until the server has received it all
/// (`received` reads its count), so the server's buffer never overflows.
async fn flood_from_distinct_sources(
    server: SocketAddr,
    first: usize,
    count: usize,
    mut received: impl FnMut() -> usize,
) {
    const CHUNK: usize = 1000;
    let base = received();
    let mut sent = 0;
    while sent < count {
        let chunk = CHUNK.min(count - sent);
        for k in 0..chunk {
            let n = (first + sent + k) as u32;
            let ip = Ipv4Addr::from(0x7f01_0000u32 + n);
            let socket =
                std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(ip), 0)).expect("bind a source");
            socket.send_to(b"x", server).expect("send from a source");
        }
        sent += chunk;
        let want = base + sent;
        eventually_saw("the server to receive the chunk", || {
            let n = received();
            if n >= want {
                Ok(())
            } else {
                Err(format!("{n} of {want}"))
            }
        })
        .await;
    }
}

/// The built echod with these arguments only (no TCP listener unless they give one), logging at
/// info, its stderr piped.
fn echod_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_echod"));
    command.args(args).env("RUST_LOG", "info").env("NO_COLOR", "1");
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    command
}

/// The built echod with the given arguments (and no TCP listener), its UDP and metrics
/// addresses read from its start-up lines.
struct Binary {
    child: Child,
    udp: Vec<SocketAddr>,
    // Read by the tests that look into /proc (Linux).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    metrics: Option<SocketAddr>,
    log: mpsc::Receiver<String>,
}

impl Binary {
    fn start(args: &[&str]) -> Binary {
        let (child, log) = common::spawn_logged(&mut echod_command(args));
        let (mut udp, mut metrics) = (Vec::new(), None);
        loop {
            let line = log.recv_timeout(TIMEOUT).expect("echod logs its start-up");
            if line.contains("listening") && line.contains("listener=udp://") {
                udp.extend(common::find_addr(&line));
            } else if line.contains("serving /metrics") {
                metrics = common::find_addr(&line);
            } else if line.contains("echod started") {
                break;
            }
        }
        Binary { child, udp, metrics, log }
    }

    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(target_os = "linux")]
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// A flood of distinct source addresses, more than the table holds, twice over: the second
/// flood, from as many new addresses again, does not grow echod's memory (an unbounded table
/// would grow by tens of bytes per source), and echod still answers.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_flood_of_distinct_sources_keeps_rss_bounded() {
    let echod = Binary::start(&["--listen", "udp://127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]);
    let (addr, metrics) = (echod.udp[0], echod.metrics.expect("metrics address"));
    let received = || {
        let m = std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                rt.block_on(common::http_get(metrics, "/metrics")).1
            })
            .join()
            .expect("scrape")
        });
        metric(&m, "echod_udp_datagrams_received_total", "") as usize
    };
    // 36,000 sources a flood, more than the table holds: 72,000 connection-tracking entries in
    // all, for 30 s.
    let per_flood = 36_000;
    flood_from_distinct_sources(addr, 0, per_flood, received).await;
    let after_first = rss_kib(echod.pid());
    flood_from_distinct_sources(addr, per_flood, per_flood, received).await;
    let after_second = rss_kib(echod.pid());
    let growth = after_second as i64 - after_first as i64;
    eprintln!("RSS after {per_flood} sources: {after_first} KiB; after {per_flood} more: {after_second} KiB");
    // 36,000 more sources at even 24 bytes each would be 840 KiB.
    assert!(growth < 256, "RSS grew by {growth} KiB over {per_flood} new sources");
    let socket = client(addr).await;
    socket.send(b"still here").await.expect("send");
    assert_eq!(recv(&socket).await, b"still here");
    drop(echod);
}

/// The UDP sockets a process holds: its socket descriptors' inodes found in the kernel's UDP
/// tables.
#[cfg(target_os = "linux")]
fn udp_sockets_of(pid: u32) -> usize {
    let mut inodes = HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("list the fds").flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let t = target.to_string_lossy();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.insert(inode.to_string());
            }
        }
    }
    let mut found = 0;
    for table in ["udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else { continue };
        for line in text.lines().skip(1) {
            // Field 10 (0-based 9) is the inode.
            if line.split_whitespace().nth(9).is_some_and(|inode| inodes.contains(inode)) {
                found += 1;
            }
        }
    }
    found
}

#[cfg(target_os = "linux")]
#[test]
fn no_udp_socket_exists_without_a_udp_listener() {
    let plain = Binary::start(&["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]);
    assert_eq!(udp_sockets_of(plain.pid()), 0, "echod opened a UDP socket without a udp:// listener");
    // The check sees them when they are there: one socket per worker.
    let with = Binary::start(&["--listen", "udp://127.0.0.1:0", "--workers", "2", "--metrics-listen", "off"]);
    assert_eq!(udp_sockets_of(with.pid()), 2);
}

#[cfg(unix)]
#[test]
fn sigterm_stops_udp_and_exits_0() {
    let mut echod = Binary::start(&[
        "--listen",
        "127.0.0.1:0",
        "--listen",
        "udp://127.0.0.1:0",
        "--metrics-listen",
        "off",
    ]);
    let addr = echod.udp[0];
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("client");
    socket.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    socket.connect(addr).expect("connect");
    socket.send(b"ping").expect("send");
    let mut buf = [0u8; 16];
    assert_eq!(socket.recv(&mut buf).expect("reply"), 4);
    // SAFETY: kill(2) on the PID of the child this test started.
    assert_eq!(unsafe { libc::kill(echod.pid() as i32, libc::SIGTERM) }, 0);
    let deadline = std::time::Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = echod.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "echod did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    let closed: Vec<String> = echod.log.try_iter().filter(|l| l.contains("UDP listener closed")).collect();
    assert_eq!(closed.len(), 1, "the drain logs the UDP listener closing");
}

#[test]
fn bad_udp_specs_and_values_exit_2_naming_the_flag() {
    for (args, env, needles) in [
        (&["--listen", "udp://nonsense"][..], &[][..], &["--listen", "nonsense"][..]),
        (&["--listen", "udp://127.0.0.1:0?proxy=v1"], &[], &["--listen", "does not apply to udp://"]),
        (&["--listen", "udp://127.0.0.1:0?delay=1s"], &[], &["--listen", "delay"]),
        (&["--listen", "udp://127.0.0.1:99999"], &[], &["--listen", "99999"]),
        (&["--udp-rate-limit", "0"], &[], &["--udp-rate-limit", "0"]),
        (&["--udp-rate-limit", "-5"], &[], &["--udp-rate-limit", "-5"]),
        (&["--udp-rate-limit", "lots"], &[], &["--udp-rate-limit", "lots"]),
        (&["--udp-socket-buffer", "1KiB"], &[], &["--udp-socket-buffer", "1KiB"]),
        (&["--udp-socket-buffer", "-4MiB"], &[], &["--udp-socket-buffer", "-4MiB"]),
        (&[], &[("ECHOD_UDP_RATE_LIMIT", "fast")], &["--udp-rate-limit", "fast"]),
    ] as [(&[&str], &[(&str, &str)], &[&str]); 10]
    {
        let mut argv = vec!["--metrics-listen", "off", "--listen", "127.0.0.1:0"];
        argv.extend_from_slice(args);
        let (code, output) = run_to_exit(&argv, env);
        assert_eq!(code, Some(2), "echod {argv:?} {env:?} should exit 2:\n{output}");
        for needle in needles {
            assert!(output.contains(needle), "echod {argv:?}: output should name {needle:?}:\n{output}");
        }
    }
}

#[test]
fn a_busy_udp_port_fails_start_up_naming_the_address() {
    let busy = std::net::UdpSocket::bind("127.0.0.1:0").expect("hold a port");
    let addr = busy.local_addr().expect("its address");
    for workers in ["1", "2"] {
        let spec = format!("udp://{addr}");
        let (code, output) =
            run_to_exit(&["--listen", &spec, "--metrics-listen", "off", "--workers", workers], &[]);
        assert_eq!(code, Some(1), "{output}");
        assert!(output.contains(&format!("cannot listen on {addr}")), "{output}");
    }
}

#[test]
fn denied_datagrams_are_logged_once_not_per_datagram() {
    let echod =
        Binary::start(&["--listen", "udp://127.0.0.1:0", "--deny", "127.0.0.1", "--metrics-listen", "off"]);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    for _ in 0..20 {
        socket.send_to(b"refused", echod.udp[0]).expect("send");
    }
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut lines = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match echod.log.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => lines.push(line),
            Err(_) if !lines.is_empty() => break,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let refusals: Vec<_> = lines.iter().filter(|l| l.contains("refusing datagrams")).collect();
    assert_eq!(refusals.len(), 1, "{lines:#?}");
    assert!(
        refusals[0].contains("reason=\"denied\"") || refusals[0].contains("reason=denied"),
        "{}",
        refusals[0]
    );
    assert!(refusals[0].contains("127.0.0.1"), "{}", refusals[0]);
    socket.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    assert!(socket.recv_from(&mut [0u8; 64]).is_err(), "a denied datagram was answered");
}

#[test]
fn the_start_up_log_names_each_udp_listener() {
    let echod = Binary::start(&["--listen", "udp://127.0.0.1:0", "--metrics-listen", "off"]);
    assert_eq!(echod.udp.len(), 1);
    assert_ne!(echod.udp[0].port(), 0, "the bound port is logged");
}

/// Runs echod-bench's udp mode against `target` (bounded in time); returns its exit code and
/// its JSON report.
fn bench_udp(target: SocketAddr, args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_echod-bench"))
        .arg("--target")
        .arg(target.to_string())
        .args(["--quiet", "--json"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start echod-bench");
    let output = common::output_within(child, TIMEOUT, &format!("echod-bench {args:?}"));
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr).into_owned();
    let report = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}\n{err}"));
    (output.status.code(), report, err)
}

fn count(report: &serde_json::Value, field: &str) -> u64 {
    report["udp"][field].as_u64().unwrap_or_else(|| panic!("no udp.{field} in {report}"))
}

#[test]
fn echod_bench_udp_verifies_echod_closed_and_open_loop() {
    let echod = Binary::start(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--metrics-listen",
        "off",
        "--udp-rate-limit",
        "off",
    ]);
    let target = echod.udp[0];
    let n = scale(4000, 400).to_string();
    for args in [
        vec!["udp", "-c", "4", "-k", "8", "-n", &n, "--size", "64"],
        vec!["udp", "-c", "2", "-k", "4", "-n", &n, "--size", "1400"],
        vec!["udp", "-c", "2", "--rate", "2000", "-d", "1s", "--size", "512"],
    ] {
        let (code, report, err) = bench_udp(target, &args);
        assert_eq!(code, Some(0), "{args:?}: {report}\n{err}");
        assert_eq!(report["mode"], "udp");
        assert_eq!(report["ok"], true);
        let sent = count(&report, "sent");
        assert!(sent > 0);
        assert_eq!(count(&report, "received"), sent, "{report}");
        for field in ["lost", "duplicates", "corrupted"] {
            assert_eq!(count(&report, field), 0, "{field}: {report}");
        }
        assert!(report["latency_us"]["p50"].as_f64().is_some_and(|p| p > 0.0), "{report}");
    }
}

/// A UDP echo that misbehaves on purpose, every `every`th datagram.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Drop,
    Duplicate,
    Corrupt,
    /// Held back and sent after the next one.
    Reorder,
}

struct Double {
    addr: SocketAddr,
    faults: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Double {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn double(fault: Fault, every: u64) -> Double {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind the double");
    socket.set_read_timeout(Some(Duration::from_millis(50))).expect("read timeout");
    let addr = socket.local_addr().expect("its address");
    let (faults, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let (f, s) = (faults.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        let mut buf = vec![0u8; 70_000];
        let mut held: Option<(Vec<u8>, SocketAddr)> = None;
        let mut n = 0u64;
        let give_up = std::time::Instant::now() + TIMEOUT;
        while !s.load(Ordering::Relaxed) && std::time::Instant::now() < give_up {
            let Ok((len, from)) = socket.recv_from(&mut buf) else {
                // Quiet: a held datagram goes out now (the last one has nothing to wait for).
                if let Some((d, to)) = held.take() {
                    let _ = socket.send_to(&d, to);
                }
                continue;
            };
            n += 1;
            let d = &mut buf[..len];
            let faulty = n % every == 0;
            match fault {
                _ if !faulty => {
                    let _ = socket.send_to(d, from);
                }
                Fault::Drop => {}
                Fault::Duplicate => {
                    let _ = socket.send_to(d, from);
                    let _ = socket.send_to(d, from);
                }
                Fault::Corrupt => {
                    let last = d.len() - 1;
                    d[last] ^= 0x40;
                    let _ = socket.send_to(d, from);
                }
                Fault::Reorder => {
                    f.fetch_add(1, Ordering::Relaxed);
                    held = Some((d.to_vec(), from));
                    continue;
                }
            }
            if faulty {
                f.fetch_add(1, Ordering::Relaxed);
            }
            if let Some((d, to)) = held.take() {
                let _ = socket.send_to(&d, to);
            }
        }
    });
    Double { addr, faults, stop, thread: Some(thread) }
}

#[test]
fn echod_bench_udp_reports_loss_duplicates_reordering_and_corruption_apart() {
    let run = |fault, extra: &[&str]| {
        let d = double(fault, 10);
        let mut args =
            vec!["udp", "-c", "2", "-k", "4", "-n", "600", "--size", "100", "--loss-timeout", "200ms"];
        args.extend_from_slice(extra);
        let (code, report, err) = bench_udp(d.addr, &args);
        let faults = d.faults.load(Ordering::Relaxed);
        assert!(faults > 0, "{fault:?}: the double did nothing");
        (code, report, err, faults)
    };

    let (code, r, err, dropped) = run(Fault::Drop, &[]);
    assert_eq!(code, Some(1), "loss over --max-loss 0 fails: {r}\n{err}");
    assert!(err.contains("--max-loss"), "{err}");
    assert_eq!(count(&r, "lost"), dropped, "{r}");
    assert_eq!((count(&r, "duplicates"), count(&r, "corrupted")), (0, 0), "{r}");
    assert_eq!(r["errors"], 0, "loss is not an error of its own: {r}");
    let (code, r, err, _) = run(Fault::Drop, &["--max-loss", "0.2"]);
    assert_eq!(code, Some(0), "10% loss passes --max-loss 0.2: {r}\n{err}");

    let (code, r, err, duplicated) = run(Fault::Duplicate, &[]);
    assert_eq!(code, Some(0), "duplicates are reported, not a failure: {r}\n{err}");
    // A socket stops listening once its last datagram is back, so the copy of its very last
    // one may come too late to be seen: at most one per socket.
    let seen = count(&r, "duplicates");
    assert!((duplicated - 2..=duplicated).contains(&seen), "{seen} of {duplicated} duplicates seen: {r}");
    assert_eq!((count(&r, "lost"), count(&r, "corrupted")), (0, 0), "{r}");

    let (code, r, err, held) = run(Fault::Reorder, &[]);
    assert_eq!(code, Some(0), "reordering is reported, not a failure: {r}\n{err}");
    // A held datagram is released after the next one the double receives, which may be
    // another socket's: then its own socket may see nothing out of order.
    let reordered = count(&r, "reordered");
    assert!((1..=held).contains(&reordered), "{reordered} reordered of {held} held: {r}");
    assert_eq!((count(&r, "lost"), count(&r, "duplicates")), (0, 0), "{r}");

    let (code, r, err, corrupted) = run(Fault::Corrupt, &["--max-loss", "1"]);
    assert_eq!(code, Some(1), "corruption fails the run: {r}\n{err}");
    assert_eq!(count(&r, "corrupted"), corrupted, "{r}");
    assert_eq!(r["mismatches"], corrupted, "{r}");
    assert_eq!(count(&r, "duplicates"), 0, "{r}");
}

#[test]
fn echod_bench_udp_usage_errors_exit_2() {
    let target = SocketAddr::from(([127, 0, 0, 1], 9));
    for args in [
        &["udp", "--size", "8"][..],
        &["udp", "--size", "70000"],
        &["udp", "-k", "0"],
        &["udp", "--max-loss", "2"],
        // The stream modes' extras are refused, not ignored.
        &["udp", "--warmup", "1s"],
        &["udp", "--tls"],
        &["udp", "--proxy-protocol", "v1"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_echod-bench"))
            .arg("--target")
            .arg(target.to_string())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run echod-bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        if let Some(flag) = args.get(1).filter(|a| ["--warmup", "--tls", "--proxy-protocol"].contains(a)) {
            assert!(stderr.contains(flag), "{args:?}: {stderr}");
        }
    }
}

/// A buffer larger than the kernel allows is granted capped, and echod says so at start.
#[cfg(target_os = "linux")]
#[test]
fn a_capped_socket_buffer_is_logged() {
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if rmem_max == 0 || rmem_max >= 1 << 30 {
        eprintln!("skipped: net.core.rmem_max ({rmem_max}) does not cap 1 GiB");
        return;
    }
    let (mut child, rx) = common::spawn_logged(&mut echod_command(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--udp-socket-buffer",
        "1GiB",
        "--metrics-listen",
        "off",
    ]));
    let mut capped = None;
    loop {
        let line = rx.recv_timeout(TIMEOUT).expect("echod logs its start-up");
        if line.contains("capped the UDP socket buffers") {
            capped = Some(line);
        } else if line.contains("echod started") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = capped.expect("a warning that the kernel capped the buffers");
    assert!(line.contains("requested=1073741824") && line.contains("net.core.rmem_max"), "{line}");
}
