//! TLS echo on `tls://` listeners: every guarantee of the TCP echo over TLS 1.2 and 1.3 (exact
//! bytes, half-close by close_notify and/or FIN, backpressure, idle timeout, drain, plaintext
//! byte counts), mutual TLS, failed handshakes closed and counted without disturbing anyone,
//! reload by SIGHUP and by replaced files, and the exit status of bad TLS flags.
//!
//! Certificates are made by each test (rcgen), in a directory of its own. These tests run on
//! every platform (under Wine too), except the SIGHUP one.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::common::{self, metric, pattern, scale, TestServer, TIMEOUT};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SerialNumber};
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

type Client = TlsStream<TcpStream>;

// ------------------------------------------------------------------------------------------
// Certificates and files

/// A directory of its own for one test, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("echod-tls-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the test directory");
        TempDir(path)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn file(&self, name: &str) -> String {
        self.path(name).to_str().expect("a UTF-8 temp path").to_string()
    }

    /// Replaces `name` at once, as a Secret volume update or `mv` does: written beside it,
    /// then renamed over it.
    fn write(&self, name: &str, contents: &[u8]) {
        let staging = self.path(&format!(".{name}.new"));
        std::fs::write(&staging, contents).expect("write a test file");
        // Windows refuses to replace a file another process is reading at that moment (echod's
        // poll of the files): try again, a bounded number of times.
        let mut tries = 0;
        while let Err(err) = std::fs::rename(&staging, self.path(name)) {
            tries += 1;
            assert!(
                cfg!(windows) && err.kind() == io::ErrorKind::PermissionDenied && tries < 100,
                "rename a test file into place: {err}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A client identity: certificate chain and key.
type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// A CA, another CA that signed nothing echod trusts, and what they sign.
struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    ca: Issuer<'static, KeyPair>,
    other_ca: Issuer<'static, KeyPair>,
}

/// The notAfter of every server certificate the tests make: 2030-01-01T00:00:00Z.
const NOT_AFTER: i64 = 1_893_456_000;

fn make_ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert, Issuer::new(params, key))
}

impl Pki {
    fn new() -> Pki {
        let (ca_cert, ca) = make_ca("echod test CA");
        let (_, other_ca) = make_ca("a CA echod does not trust");
        Pki { ca_pem: ca_cert.pem(), ca_der: ca_cert.der().clone(), ca, other_ca }
    }

    /// A server certificate for localhost and 127.0.0.1 with serial `10:SERIAL`: (chain PEM, key
    /// PEM).
    fn server(&self, serial: u8) -> (String, String) {
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, format!("echod test server {serial}"));
        params.serial_number = Some(SerialNumber::from_slice(&[0x10, serial]));
        params.not_after = rcgen::date_time_ymd(2030, 1, 1);
        let cert = params.signed_by(&key, &self.ca).expect("server certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// A client certificate with common name `cn`, signed by `issuer`.
    fn client(&self, issuer: &Issuer<'static, KeyPair>, cn: &str) -> Identity {
        let key = KeyPair::generate().expect("client key");
        let mut params = CertificateParams::new(vec![format!("{cn}.test")]).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, issuer).expect("client certificate");
        (vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    /// Writes `cert.pem`, `key.pem` (serial `serial`) and `ca.pem` into `dir`.
    fn write_files(&self, dir: &TempDir, serial: u8) {
        let (cert, key) = self.server(serial);
        dir.write("cert.pem", cert.as_bytes());
        dir.write("key.pem", key.as_bytes());
        dir.write("ca.pem", self.ca_pem.as_bytes());
    }
}

/// The serial of a certificate as echod reports it (colon-separated hex).
fn serial_of(cert: &CertificateDer<'_>) -> String {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).expect("an X.509 certificate");
    parsed.raw_serial_as_string()
}

/// The serial of the certificate the server presented on `stream`.
fn served_serial(stream: &Client) -> String {
    let certs = stream.get_ref().1.peer_certificates().expect("the server presented a certificate");
    serial_of(&certs[0])
}

// ------------------------------------------------------------------------------------------
// Servers and clients

/// The flags that point echod at the files of [`Pki::write_files`].
fn tls_flags(dir: &TempDir) -> Vec<String> {
    vec!["--tls-cert".into(), dir.file("cert.pem"), "--tls-key".into(), dir.file("key.pem")]
}

/// An in-process echod whose only listener is `listen`, with metrics on, the TLS files of `dir`
/// and `args`.
async fn start(dir: &TempDir, listen: &str, args: &[&str]) -> TestServer {
    let flags = tls_flags(dir);
    let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
    all.extend(["--listen", listen, "--metrics-listen", "127.0.0.1:0"]);
    all.extend_from_slice(args);
    TestServer::start(&all).await
}

/// A client configuration trusting the test CA, for `version` (or both), with an optional
/// client identity; no resumption, so every connection makes a full handshake.
fn client_config(
    pki: &Pki,
    version: Option<&'static SupportedProtocolVersion>,
    identity: Option<Identity>,
) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: Vec<&'static SupportedProtocolVersion> = match version {
        Some(v) => vec![v],
        None => vec![&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca_der.clone()).expect("the test CA");
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).expect("client identity"),
        None => builder.with_no_client_auth(),
    };
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

/// Connects and makes the handshake with server name `localhost`.
async fn try_connect(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<Client> {
    let tcp = common::connect(addr).await;
    let name = ServerName::try_from("localhost").expect("a server name");
    tokio::time::timeout(TIMEOUT, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("handshake in time")
}

async fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> Client {
    try_connect(addr, config).await.expect("TLS handshake")
}

/// Sends `data` and reads as many bytes back, writing and reading at once.
async fn echo(stream: &mut Client, data: &[u8]) -> Vec<u8> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = async {
        writer.write_all(data).await.expect("write");
        writer.flush().await.expect("flush");
    };
    let read = async {
        let mut back = vec![0u8; data.len()];
        reader.read_exact(&mut back).await.expect("read the echo");
        back
    };
    let ((), back) =
        tokio::time::timeout(TIMEOUT, async { tokio::join!(write, read) }).await.expect("echo in time");
    back
}

/// How the client ends its side of the session.
#[derive(Debug, Clone, Copy)]
enum End {
    /// close_notify, then FIN (tokio-rustls' shutdown).
    CloseNotifyAndFin,
    /// close_notify alone; the TCP connection stays open both ways.
    CloseNotify,
    /// FIN without a close_notify (a truncated session, as some clients close).
    Fin,
}

/// Writes `data`, ends the client's side as `end` says, and meanwhile reads whatever the server
/// sends until its close_notify. An error if the server's side ends any other way (a FIN without
/// close_notify is rustls' `UnexpectedEof`).
async fn send_then_end_and_read_all(stream: &mut Client, data: &[u8], end: End) -> io::Result<Vec<u8>> {
    let mut written = 0;
    let mut ended = false;
    let mut eof = false;
    let mut back = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let drive = poll_fn(|cx| loop {
        let mut progress = false;
        if written < data.len() {
            if let Poll::Ready(n) = Pin::new(&mut *stream).poll_write(cx, &data[written..]) {
                written += n?;
                progress = true;
            }
        } else if !ended {
            let done = match end {
                End::CloseNotifyAndFin => Pin::new(&mut *stream).poll_shutdown(cx),
                End::CloseNotify => {
                    stream.get_mut().1.send_close_notify();
                    Pin::new(&mut *stream).poll_flush(cx)
                }
                End::Fin => Pin::new(&mut *stream).poll_flush(cx).map_ok(|()| {
                    let _ = socket2::SockRef::from(stream.get_ref().0).shutdown(std::net::Shutdown::Write);
                }),
            };
            if let Poll::Ready(result) = done {
                result?;
                ended = true;
                progress = true;
            }
        }
        if !eof {
            let mut read = ReadBuf::new(&mut buf);
            if let Poll::Ready(result) = Pin::new(&mut *stream).poll_read(cx, &mut read) {
                result?;
                if read.filled().is_empty() {
                    eof = true;
                } else {
                    back.extend_from_slice(read.filled());
                }
                progress = true;
            }
        }
        if eof && ended {
            return Poll::Ready(Ok::<(), io::Error>(()));
        }
        if !progress {
            return Poll::Pending;
        }
    });
    tokio::time::timeout(TIMEOUT, drive).await.expect("exchange in time")?;
    Ok(back)
}

/// After the server's close_notify, its FIN: the TCP connection underneath reads a clean EOF.
async fn expect_tcp_eof(stream: &mut Client) {
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(TIMEOUT, stream.get_mut().0.read(&mut byte))
        .await
        .expect("FIN in time")
        .expect("a FIN, not a reset");
    assert_eq!(n, 0, "nothing after the close_notify");
}

/// Reads one line (the banner).
async fn read_line(stream: &mut Client) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        let n = tokio::time::timeout(TIMEOUT, stream.read(&mut byte))
            .await
            .expect("banner in time")
            .expect("banner");
        assert_eq!(n, 1, "the banner ended early: {:?}", String::from_utf8_lossy(&line));
        line.push(byte[0]);
        assert!(line.len() < 1000, "banner too long");
    }
    String::from_utf8(line).expect("a UTF-8 banner")
}

fn value(server: &TestServer, name: &str, labels: &str) -> f64 {
    metric(&server.metrics(), name, labels)
}

/// Waits until the server has closed `n` connections with `reason`.
async fn closed(server: &TestServer, reason: &str, n: f64) {
    let labels = format!("reason=\"{reason}\"");
    common::eventually_saw(&format!("{n} connections closed with {reason}"), || {
        let seen = value(server, "echod_connections_closed_total", &labels);
        if seen == n {
            Ok(())
        } else {
            Err(format!("{seen}"))
        }
    })
    .await;
}

// ------------------------------------------------------------------------------------------
// The echo over TLS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_echo_over_tls_1_2_and_1_3_up_to_16_mib_counted_in_plaintext() {
    let pki = Pki::new();
    let dir = TempDir::new("exact");
    pki.write_files(&dir, 1);
    let server = start(&dir, "tls://127.0.0.1:0", &[]).await;
    let big = scale(16 << 20, 1 << 20);
    let sizes = [1, 255, 4096, 16_383, 16_384, 16_385, 65_537, (1 << 20) + 7, big];
    let mut total = 0;
    let all_values: Vec<u8> = (0..=255u8).collect();
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut stream = connect(server.addr, client_config(&pki, Some(version), None)).await;
        assert_eq!(stream.get_ref().1.protocol_version(), Some(version.version));
        // The server's preference wins over the client's (which lists AES-256-GCM first).
        let suite = stream.get_ref().1.negotiated_cipher_suite().expect("a negotiated suite");
        assert!(format!("{:?}", suite.suite()).contains("AES_128_GCM"), "negotiated {:?}", suite.suite());
        assert_eq!(echo(&mut stream, &all_values).await, all_values);
        total += all_values.len();
        for (i, size) in sizes.into_iter().enumerate() {
            let data = pattern(size, i as u64);
            let back = echo(&mut stream, &data).await;
            assert!(back == data, "{:?}: echo of {size} bytes differs", version.version);
            total += size;
        }
        let rest =
            send_then_end_and_read_all(&mut stream, b"", End::CloseNotifyAndFin).await.expect("clean close");
        assert!(rest.is_empty(), "nothing extra after the echo");
        expect_tcp_eof(&mut stream).await;
    }
    closed(&server, "eof", 2.0).await;
    let total = total as f64;
    assert_eq!(value(&server, "echod_bytes_received_total", ""), total, "plaintext bytes received");
    assert_eq!(value(&server, "echod_bytes_sent_total", ""), total, "plaintext bytes sent");
    server.shutdown().await;
}

/// The client ends its side with MiBs still in flight, in each of the three ways a TLS client
/// can; every byte comes back, then echod's close_notify and FIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_with_mebibytes_pending_delivers_all_then_close_notify_and_fin() {
    let pki = Pki::new();
    let dir = TempDir::new("half-close");
    pki.write_files(&dir, 1);
    let server = start(&dir, "tls://127.0.0.1:0", &[]).await;
    for (i, end) in [End::CloseNotifyAndFin, End::CloseNotify, End::Fin].into_iter().enumerate() {
        let data = pattern(scale(8 << 20, 512 << 10), i as u64);
        let mut stream = connect(server.addr, client_config(&pki, None, None)).await;
        let back = send_then_end_and_read_all(&mut stream, &data, end)
            .await
            .unwrap_or_else(|e| panic!("{end:?}: the session did not end with close_notify: {e}"));
        assert_eq!(back.len(), data.len(), "{end:?}");
        assert!(back == data, "{end:?}: the echo differs");
        expect_tcp_eof(&mut stream).await;
    }
    closed(&server, "eof", 3.0).await;
    server.shutdown().await;
}

/// A client that writes and never reads stalls: TLS buffers in echod are bounded like the TCP
/// ones, other clients are served meanwhile, and everything comes back once it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_over_tls_is_held_back_not_buffered() {
    const CHUNK: usize = 64 << 10;
    const STALL: Duration = Duration::from_secs(1);
    let pki = Pki::new();
    let dir = TempDir::new("slow");
    pki.write_files(&dir, 1);
    let server = start(&dir, "tls://127.0.0.1:0", &[]).await;
    let config = client_config(&pki, None, None);
    let mut slow = connect(server.addr, config.clone()).await;
    // An odd period, so a lost or repeated chunk never lines up by accident.
    let period = (1 << 20) - 3;
    let mut stream = pattern(period, 9);
    stream.extend_from_within(..CHUNK);
    let started = Instant::now();
    let mut written = 0usize;
    loop {
        assert!(written < 400 << 20, "echod took {written} bytes from a client that never reads");
        assert!(started.elapsed() < TIMEOUT, "still writing after {TIMEOUT:?} ({written} bytes)");
        let at = written % period;
        match tokio::time::timeout(STALL, slow.write(&stream[at..at + CHUNK])).await {
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => panic!("slow writer: {e}"),
            Err(_stalled) => break,
        }
    }
    let (leased, _) = server.handle.buffer_memory();
    println!(
        "slow TLS reader: stalled after {:.1} MiB; echo buffers leased: {leased} bytes",
        written as f64 / (1 << 20) as f64
    );
    assert!(written < 64 << 20, "{written} bytes accepted from a client that never reads");
    assert!(leased <= 3 * (256 << 10), "echo buffers of {leased} bytes for one connection");

    let mut other = connect(server.addr, config).await;
    for round in 0..20u64 {
        let data = pattern(1000, round);
        assert_eq!(echo(&mut other, &data).await, data, "another client, round {round}");
    }
    drop(other);

    let back = send_then_end_and_read_all(&mut slow, b"", End::CloseNotifyAndFin).await.expect("clean close");
    assert_eq!(back.len(), written, "everything written comes back");
    for (i, chunk) in back.chunks(CHUNK).enumerate() {
        let at = (i * CHUNK) % period;
        assert!(chunk == &stream[at..at + chunk.len()], "chunk {i} of the slow reader's echo differs");
    }
    server.shutdown().await;
}

/// `--idle-timeout` and the drain close TLS clients with a close_notify before the FIN: the
/// client reads a clean end of the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_and_drain_end_the_session_cleanly() {
    let pki = Pki::new();
    let dir = TempDir::new("idle");
    pki.write_files(&dir, 1);
    let server = start(&dir, "tls://127.0.0.1:0", &["--idle-timeout", "300ms"]).await;
    let mut idle = connect(server.addr, client_config(&pki, None, None)).await;
    assert_eq!(echo(&mut idle, b"before the pause").await, b"before the pause");
    let rest = tokio::time::timeout(TIMEOUT, async {
        let mut rest = Vec::new();
        idle.read_to_end(&mut rest).await.map(|_| rest)
    })
    .await
    .expect("closed in time")
    .expect("a close_notify, not a truncated session");
    assert!(rest.is_empty());
    expect_tcp_eof(&mut idle).await;
    closed(&server, "idle_timeout", 1.0).await;
    server.shutdown().await;

    let server = start(&dir, "tls://127.0.0.1:0", &[]).await;
    let mut waiting = connect(server.addr, client_config(&pki, None, None)).await;
    assert_eq!(echo(&mut waiting, b"hello").await, b"hello");
    let report = server.shutdown().await;
    assert_eq!(report.closed_by_timeout, 0);
    let mut rest = Vec::new();
    tokio::time::timeout(TIMEOUT, waiting.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("the drain ends the session with a close_notify");
    assert!(rest.is_empty());
}

/// A blocking rustls client through its handshake, on a socket with a 5 s read timeout. The
/// client's last flight may still be queued (TLS 1.3's Finished): the caller decides how it
/// leaves.
fn blocking_handshake(
    config: Arc<ClientConfig>,
    addr: SocketAddr,
) -> (rustls::ClientConnection, std::net::TcpStream) {
    let name = ServerName::try_from("localhost").expect("a server name");
    let mut session = rustls::ClientConnection::new(config, name).expect("a client session");
    let mut socket = std::net::TcpStream::connect(addr).expect("connect");
    socket.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
    socket.set_nodelay(true).expect("nodelay");
    while session.is_handshaking() {
        while session.wants_write() {
            session.write_tls(&mut socket).expect("send handshake");
        }
        if session.is_handshaking() {
            session.read_tls(&mut socket).expect("read handshake");
            session.process_new_packets().expect("handshake");
        }
    }
    (session, socket)
}

/// Data that arrives with the client's last handshake flight is decrypted by rustls during the
/// handshake, and the socket never announces it again: echod must echo it anyway. A blocking
/// rustls client sends its Finished and the data in one write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_in_the_same_segment_as_the_handshake_is_echoed_at_once() {
    use std::io::{Read, Write};
    let pki = Pki::new();
    let dir = TempDir::new("same-segment");
    pki.write_files(&dir, 1);
    let server = start(&dir, "tls://127.0.0.1:0", &[]).await;
    let addr = server.addr;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let config = client_config(&pki, Some(version), None);
        let back = tokio::task::spawn_blocking(move || {
            let (mut session, mut socket) = blocking_handshake(config, addr);
            // The Finished is still queued: the data goes out in the same write.
            session.writer().write_all(b"early bird").expect("queue data");
            let mut queued = Vec::new();
            while session.wants_write() {
                session.write_tls(&mut queued).expect("encode");
            }
            socket.write_all(&queued).expect("send Finished and data at once");
            let mut back = Vec::new();
            loop {
                match session.reader().read_to_end(&mut back) {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
                if back.len() >= 10 {
                    break;
                }
                if session.read_tls(&mut socket).expect("the echo within 5 s") == 0 {
                    break;
                }
                session.process_new_packets().expect("records");
            }
            back
        })
        .await
        .expect("client thread");
        assert_eq!(back, b"early bird", "{:?}", version.version);
    }
    server.shutdown().await;
}

/// A record that fails to decrypt, arriving right behind a good one (one write, one segment),
/// where echod takes several records per read: the session ends at once with an alert or a
/// close, and nothing of the bad record is echoed. (What was decrypted
/// just before it may be lost with the session: rustls fails the whole read.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_ends_the_session_and_nothing_of_it_is_echoed() {
    use std::io::{Read, Write};
    let pki = Pki::new();
    let dir = TempDir::new("corrupt-record");
    pki.write_files(&dir, 1);
    let server = start(&dir, "tls://127.0.0.1:0", &[]).await;
    let addr = server.addr;
    // More than rustls reads at once (4 KiB), so the bad record is still unread when the good
    // one is handed out.
    let good = pattern(12 * 1024, 7);
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let config = client_config(&pki, Some(version), None);
        let sent = good.clone();
        let (back, end) = tokio::task::spawn_blocking(move || {
            let good = sent;
            let (mut session, mut socket) = blocking_handshake(config, addr);
            while session.wants_write() {
                session.write_tls(&mut socket).expect("send the Finished");
            }
            let mut records = Vec::new();
            session.writer().write_all(&good).expect("queue the good record");
            while session.wants_write() {
                session.write_tls(&mut records).expect("encode");
            }
            let good_end = records.len();
            session.writer().write_all(b"never echoed").expect("queue the bad record");
            while session.wants_write() {
                session.write_tls(&mut records).expect("encode");
            }
            assert!(records.len() > good_end, "the second record was encoded");
            // The last byte is the bad record's authentication tag.
            let last = records.len() - 1;
            records[last] ^= 0x55;
            socket.write_all(&records).expect("send both records at once");
            let mut back = Vec::new();
            let end = loop {
                match session.reader().read_to_end(&mut back) {
                    Ok(_) => break "close_notify".to_string(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => break format!("read: {e}"),
                }
                assert!(back.len() <= good.len(), "more came back than the good record");
                match session.read_tls(&mut socket) {
                    Ok(0) => break "TCP closed".to_string(),
                    Ok(_) => {}
                    Err(e) => break format!("socket: {e}"),
                }
                if let Err(e) = session.process_new_packets() {
                    // The server's alert; what was decrypted before it is still readable.
                    let _ = session.reader().read_to_end(&mut back);
                    break format!("alert: {e}");
                }
            };
            (back, end)
        })
        .await
        .expect("client thread");
        assert!(
            good.starts_with(&back),
            "{:?}: {} bytes back are not a prefix of the good record ({end})",
            version.version,
            back.len()
        );
        assert!(
            end.starts_with("alert") || end.starts_with("TCP closed"),
            "{:?}: the session did not end with an alert or a close: {end}",
            version.version
        );
    }
    // Both sessions are closed and counted. Which reason is a race: a bad record that arrives
    // while the handshake is finishing fails the handshake (handshake_failed); one that arrives
    // after it fails a read (error); or the client's close after the alert gets there first
    // (eof or reset).
    common::eventually_saw("2 sessions closed", || {
        let n: f64 = ["handshake_failed", "error", "eof", "reset"]
            .iter()
            .map(|r| value(&server, "echod_connections_closed_total", &format!("reason=\"{r}\"")))
            .sum();
        if n == 2.0 {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    })
    .await;
    server.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Handshakes

/// A handshake the server refuses: the client's handshake fails, or (TLS 1.3, where the client
/// finishes first) its first read does; nothing of the banner or the echo ever arrives.
async fn expect_refused(addr: SocketAddr, config: Arc<ClientConfig>, what: &str) {
    let mut stream = match try_connect(addr, config).await {
        Err(_) => return,
        Ok(stream) => stream,
    };
    let _ = stream.write_all(b"let me in").await;
    let _ = stream.flush().await;
    let mut got = Vec::new();
    match tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut got)).await.expect("refused in time") {
        Err(_) => {}
        Ok(_) => assert!(got.is_empty(), "{what}: the server sent {:?}", String::from_utf8_lossy(&got)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_takes_valid_client_certificates_only_and_shows_the_subject() {
    let pki = Pki::new();
    let dir = TempDir::new("mtls");
    pki.write_files(&dir, 1);
    let ca = dir.file("ca.pem");
    let server = start(
        &dir,
        "tls://127.0.0.1:0",
        &["--tls-client-ca", &ca, "--banner", "client_cert=[{client_cert}]"],
    )
    .await;
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let valid = client_config(&pki, Some(version), Some(pki.client(&pki.ca, "tester")));
        let mut stream = connect(server.addr, valid).await;
        assert_eq!(read_line(&mut stream).await, "client_cert=[CN=tester]\n");
        assert_eq!(echo(&mut stream, b"trusted").await, b"trusted");
        let rest =
            send_then_end_and_read_all(&mut stream, b"", End::CloseNotifyAndFin).await.expect("clean close");
        assert!(rest.is_empty());

        expect_refused(server.addr, client_config(&pki, Some(version), None), "no client certificate").await;
        let wrong = client_config(&pki, Some(version), Some(pki.client(&pki.other_ca, "intruder")));
        expect_refused(server.addr, wrong, "a client certificate of another CA").await;
    }
    closed(&server, "handshake_failed", 4.0).await;
    assert_eq!(value(&server, "echod_handshake_failures_total", "stage=\"tls\""), 4.0);
    closed(&server, "eof", 2.0).await;
    assert_eq!(value(&server, "echod_bytes_sent_total", ""), 14.0, "only the trusted clients' bytes");
    server.shutdown().await;
}

/// A raw ClientHello record: `version` (the legacy field), the cipher suites, no extensions.
fn client_hello(version: [u8; 2], suites: &[u16]) -> Vec<u8> {
    let mut body = version.to_vec();
    body.extend_from_slice(&[0x42; 32]);
    body.push(0);
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for suite in suites {
        body.extend_from_slice(&suite.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]);
    let mut handshake = vec![1];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// Connects over plain TCP and sends `bytes`; returns the socket.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = common::connect(addr).await;
    stream.write_all(bytes).await.expect("send");
    stream
}

/// Reads until the server closes; returns what came (alerts, never an echo).
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(TIMEOUT, stream.read(&mut buf)).await.expect("closed in time") {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_bad_handshakes_are_closed_and_counted_while_others_echo() {
    let pki = Pki::new();
    let dir = TempDir::new("bad-handshakes");
    pki.write_files(&dir, 1);
    let timeout = Duration::from_millis(1500);
    let server = start(&dir, "tls://127.0.0.1:0", &["--tls-handshake-timeout", "1500ms"]).await;
    let opened = Instant::now();
    let mut silent = raw(server.addr, b"").await;
    let hello = client_hello([3, 3], &[0x1301, 0xc02b]);
    let mut half = raw(server.addr, &hello[..hello.len() / 2]).await;

    let garbage = b"GET / HTTP/1.1\r\nHost: echod\r\n\r\n";
    let old_version = client_hello([3, 1], &[0x002f]);
    // TLS_RSA_WITH_AES_128_CBC_SHA and TLS_RSA_WITH_3DES_EDE_CBC_SHA: nothing rustls speaks.
    let no_shared_cipher = client_hello([3, 3], &[0x002f, 0x000a]);
    for (what, bytes) in
        [("garbage", &garbage[..]), ("TLS 1.0 only", &old_version), ("no shared cipher", &no_shared_cipher)]
    {
        let mut stream = raw(server.addr, bytes).await;
        let got = until_closed(&mut stream).await;
        assert!(got.len() < 64 && !got.starts_with(&bytes[..5]), "{what}: the server sent {got:?}");
    }

    // The stalled handshakes are still open; a good client is served meanwhile.
    let mut good = connect(server.addr, client_config(&pki, None, None)).await;
    for round in 0..10u64 {
        let data = pattern(10_000, round);
        assert_eq!(echo(&mut good, &data).await, data);
    }
    assert!(opened.elapsed() < timeout, "the good client took longer than the handshake timeout");
    assert_eq!(value(&server, "echod_handshake_failures_total", "stage=\"tls\""), 3.0);

    for (what, stream) in [("silent", &mut silent), ("half a ClientHello", &mut half)] {
        let got = until_closed(stream).await;
        let after = opened.elapsed();
        assert!(got.len() < 64, "{what}: the server sent {got:?}");
        assert!(
            after >= timeout - Duration::from_millis(100),
            "{what}: closed after {after:?}, before the timeout"
        );
    }
    closed(&server, "handshake_failed", 5.0).await;
    assert_eq!(value(&server, "echod_handshake_failures_total", "stage=\"tls\""), 5.0);
    assert_eq!(value(&server, "echod_bytes_received_total", ""), 100_000.0, "only the good client's bytes");
    assert_eq!(echo(&mut good, b"still here").await, b"still here");
    server.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Stages around the handshake

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_header_first_then_the_handshake_then_the_banner() {
    let pki = Pki::new();
    let dir = TempDir::new("proxy");
    pki.write_files(&dir, 1);
    let banner = ["--banner", "client={client} cert=[{client_cert}]"];
    for version in ["v1", "v2"] {
        let server = start(&dir, &format!("tls://127.0.0.1:0?proxy={version}"), &banner).await;
        let header: Vec<u8> = match version {
            "v1" => b"PROXY TCP4 203.0.113.7 10.0.0.1 4444 8443\r\n".to_vec(),
            _ => {
                let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
                h.extend_from_slice(&[0x21, 0x11, 0, 12, 203, 0, 113, 7, 10, 0, 0, 1]);
                h.extend_from_slice(&4444u16.to_be_bytes());
                h.extend_from_slice(&8443u16.to_be_bytes());
                h
            }
        };
        let tcp = raw(server.addr, &header).await;
        let name = ServerName::try_from("localhost").expect("a server name");
        let connector = tokio_rustls::TlsConnector::from(client_config(&pki, None, None));
        let mut stream = tokio::time::timeout(TIMEOUT, connector.connect(name, tcp))
            .await
            .expect("handshake in time")
            .expect("TLS after the PROXY header");
        assert_eq!(read_line(&mut stream).await, "client=203.0.113.7:4444 cert=[]\n", "{version}");
        assert_eq!(echo(&mut stream, b"through a load balancer").await, b"through a load balancer");

        // Without the header, the TLS ClientHello is no PROXY header: refused, counted as proxy.
        expect_refused(server.addr, client_config(&pki, None, None), "TLS without the PROXY header").await;
        common::eventually("counted as a PROXY failure", || {
            value(&server, "echod_handshake_failures_total", "stage=\"proxy\"") == 1.0
        })
        .await;
        server.shutdown().await;
    }
}

// ------------------------------------------------------------------------------------------
// Reload

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_files_are_loaded_for_new_handshakes_and_old_sessions_keep_echoing() {
    let pki = Pki::new();
    let dir = TempDir::new("replace");
    pki.write_files(&dir, 1);
    let server = start(&dir, "tls://127.0.0.1:0", &["--tls-reload-interval", "200ms"]).await;
    let config = client_config(&pki, None, None);
    assert_eq!(value(&server, "echod_tls_certificate_expiry_timestamp_seconds", ""), NOT_AFTER as f64);
    assert_eq!(value(&server, "echod_tls_reloads_total", "result=\"ok\""), 0.0);
    let mut old = connect(server.addr, config.clone()).await;
    assert_eq!(served_serial(&old), "10:01");
    assert_eq!(echo(&mut old, b"first").await, b"first");

    // Replaced one by one, as `mv` or `cp` would.
    pki.write_files(&dir, 2);
    common::eventually_saw("the new certificate loaded", || match server.handle.tls_certificate() {
        Some(info) if info.serial == "10:02" => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await;
    let mut new = connect(server.addr, config.clone()).await;
    assert_eq!(served_serial(&new), "10:02");
    assert_eq!(echo(&mut new, b"second").await, b"second");
    assert_eq!(echo(&mut old, b"still the old session").await, b"still the old session");
    assert_eq!(served_serial(&old), "10:01");
    assert!(value(&server, "echod_tls_reloads_total", "result=\"ok\"") >= 1.0);

    // Kubernetes' way: the files are symlinks into a directory that is swapped at once.
    #[cfg(unix)]
    {
        use std::os::unix::fs::symlink;
        let k8s = TempDir::new("secret");
        let publish = |version: &str, serial: u8| {
            let data = k8s.path(version);
            std::fs::create_dir(&data).expect("a data directory");
            let (cert, key) = pki.server(serial);
            std::fs::write(data.join("tls.crt"), cert).expect("write");
            std::fs::write(data.join("tls.key"), key).expect("write");
            let link = k8s.path("..data.tmp");
            symlink(version, &link).expect("symlink");
            std::fs::rename(&link, k8s.path("..data")).expect("swap ..data");
        };
        publish("..v1", 3);
        symlink("..data/tls.crt", k8s.path("tls.crt")).expect("symlink");
        symlink("..data/tls.key", k8s.path("tls.key")).expect("symlink");
        let mounted = TestServer::start(&[
            "--listen",
            "tls://127.0.0.1:0",
            "--tls-cert",
            &k8s.file("tls.crt"),
            "--tls-key",
            &k8s.file("tls.key"),
            "--tls-reload-interval",
            "200ms",
        ])
        .await;
        assert_eq!(served_serial(&connect(mounted.addr, client_config(&pki, None, None)).await), "10:03");
        publish("..v2", 4);
        common::eventually("the swapped Secret loaded", || {
            mounted.handle.tls_certificate().is_some_and(|info| info.serial == "10:04")
        })
        .await;
        assert_eq!(served_serial(&connect(mounted.addr, client_config(&pki, None, None)).await), "10:04");
        mounted.shutdown().await;
    }

    drop((old, new));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_new_files_keep_the_old_material_and_are_reported_once() {
    let pki = Pki::new();
    let dir = TempDir::new("invalid");
    pki.write_files(&dir, 1);
    let server = start(&dir, "tls://127.0.0.1:0", &["--tls-reload-interval", "100ms"]).await;
    let config = client_config(&pki, None, None);
    let (other_cert, other_key) = pki.server(9);
    let (key7, key8) = (pki.server(7).1, pki.server(8).1);

    // A broken certificate, found by the file check.
    dir.write(
        "cert.pem",
        b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    );
    common::eventually("the broken file counted", || {
        value(&server, "echod_tls_reloads_total", "result=\"error\"") == 1.0
    })
    .await;
    // Checked again and again, reported once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(value(&server, "echod_tls_reloads_total", "result=\"error\""), 1.0);
    let mut stream = connect(server.addr, config.clone()).await;
    assert_eq!(served_serial(&stream), "10:01", "still the old certificate");
    assert_eq!(echo(&mut stream, b"served").await, b"served");

    // What a reload says about each kind of bad file, and the old material every time. (No two
    // files written in a row make a matching pair, so the file check never loads a state
    // between two cases.)
    let cert = dir.file("cert.pem");
    let key = dir.file("key.pem");
    type Case<'a> = (&'a str, &'a [u8], &'a [u8], &'a str, &'a str);
    let cases: [Case; 4] = [
        ("garbage certificate", b"not PEM at all\n", key7.as_bytes(), "--tls-cert", "no PEM certificate"),
        (
            "a key of another certificate",
            other_cert.as_bytes(),
            key8.as_bytes(),
            "--tls-key",
            "does not match",
        ),
        (
            "garbage key",
            other_cert.as_bytes(),
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "--tls-key",
            "",
        ),
        ("no key at all", other_cert.as_bytes(), b"", "--tls-key", "no PEM private key"),
    ];
    for (what, cert_pem, key_pem, flag, why) in cases {
        dir.write("cert.pem", cert_pem);
        dir.write("key.pem", key_pem);
        let err = server.handle.reload_tls().await.expect("TLS is on").expect_err(what);
        assert_eq!(err.flag, flag, "{what}: {err}");
        let file = if flag == "--tls-cert" { &cert } else { &key };
        assert_eq!(err.path, PathBuf::from(file), "{what}: {err}");
        assert!(err.to_string().contains(why), "{what}: {err}");
        assert_eq!(served_serial(&connect(server.addr, config.clone()).await), "10:01", "{what}");
    }
    assert_eq!(echo(&mut stream, b"the old session too").await, b"the old session too");

    // A good pair again: loaded.
    dir.write("cert.pem", other_cert.as_bytes());
    dir.write("key.pem", other_key.as_bytes());
    let info = server.handle.reload_tls().await.expect("TLS is on").expect("a good pair loads");
    assert_eq!(info.serial, "10:09");
    assert_eq!(served_serial(&connect(server.addr, config).await), "10:09");
    drop(stream);
    server.shutdown().await;
}

/// SIGHUP re-reads the files (with the change check off, only the signal can have done it).
#[cfg(unix)]
#[test]
fn sighup_reloads_the_files() {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let pki = Pki::new();
    let dir = TempDir::new("sighup");
    pki.write_files(&dir, 1);
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_echod"));
    command
        .args([
            "--listen",
            "tls://127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--tls-reload-interval",
            "off",
        ])
        .args(tls_flags(&dir))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let echod = common::Binary::start_command(command);
    let addr = echod.addr;
    let config = client_config(&pki, None, None);
    let mut old = runtime.block_on(connect(addr, config.clone()));
    assert_eq!(served_serial(&old), "10:01");

    pki.write_files(&dir, 2);
    echod.signal(libc::SIGHUP);
    let line = echod.wait_for_log("new handshakes use it");
    assert!(line.contains("10:02"), "{line}");
    runtime.block_on(async {
        let mut new = connect(addr, config.clone()).await;
        assert_eq!(served_serial(&new), "10:02");
        assert_eq!(echo(&mut new, b"new").await, b"new");
        assert_eq!(echo(&mut old, b"old").await, b"old");
        let (_, body) = common::http_get(echod.metrics_addr.expect("metrics on"), "/metrics").await;
        assert_eq!(metric(&body, "echod_tls_reloads_total", "result=\"ok\""), 1.0);
    });

    // A bad file on SIGHUP: logged with the flag and the file, the old certificate stays.
    dir.write("key.pem", b"garbage");
    echod.signal(libc::SIGHUP);
    let line = echod.wait_for_log("did not load");
    assert!(line.contains("--tls-key") && line.contains(&dir.file("key.pem")), "{line}");
    runtime.block_on(async {
        assert_eq!(served_serial(&connect(addr, config).await), "10:02");
    });
    drop(old);
}

// ------------------------------------------------------------------------------------------
// Bad flags

#[test]
fn bad_tls_flags_and_files_exit_2_naming_the_flag_and_the_file() {
    let pki = Pki::new();
    let dir = TempDir::new("flags");
    pki.write_files(&dir, 1);
    dir.write("garbage.pem", b"this is not PEM\n");
    dir.write("other-key.pem", pki.server(2).1.as_bytes());
    let (cert, key, ca) = (dir.file("cert.pem"), dir.file("key.pem"), dir.file("ca.pem"));
    let (garbage, other_key, missing) =
        (dir.file("garbage.pem"), dir.file("other-key.pem"), dir.file("missing.pem"));
    let base = ["--listen", "tls://127.0.0.1:0", "--metrics-listen", "off"];
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec![], vec!["--tls-cert", "--tls-key", "tls://127.0.0.1:0"]),
        (vec!["--tls-cert", &cert], vec!["--tls-key"]),
        (vec!["--tls-key", &key], vec!["--tls-cert"]),
        (vec!["--tls-cert", &missing, "--tls-key", &key], vec!["--tls-cert", &missing]),
        (vec!["--tls-cert", &garbage, "--tls-key", &key], vec!["--tls-cert", &garbage]),
        (vec!["--tls-cert", &cert, "--tls-key", &garbage], vec!["--tls-key", &garbage]),
        (vec!["--tls-cert", &cert, "--tls-key", &other_key], vec!["--tls-key", &other_key, "does not match"]),
        (
            vec!["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &garbage],
            vec!["--tls-client-ca", &garbage],
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &missing],
            vec!["--tls-client-ca", &missing],
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &key, "--tls-handshake-timeout", "0s"],
            vec!["--tls-handshake-timeout"],
        ),
    ];
    for (args, needles) in cases {
        let argv: Vec<&str> = base.iter().copied().chain(args.iter().copied()).collect();
        let (code, output) = common::run_to_exit(&argv, &[]);
        assert_eq!(code, Some(2), "echod {argv:?} should exit 2; output:\n{output}");
        for needle in needles {
            assert!(output.contains(needle), "echod {argv:?}: output should name {needle:?}:\n{output}");
        }
    }
    // The environment works the same, and TLS flags without a tls:// listener are a mistake.
    let (code, output) = common::run_to_exit(
        &["--listen", "tls://127.0.0.1:0", "--metrics-listen", "off"],
        &[("ECHOD_TLS_CERT", &cert), ("ECHOD_TLS_KEY", &garbage)],
    );
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("--tls-key") && output.contains(&garbage), "{output}");
    let (code, output) = common::run_to_exit(
        &["--listen", "127.0.0.1:0", "--metrics-listen", "off", "--tls-client-ca", &ca],
        &[],
    );
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("--tls-client-ca") && output.contains("tls://"), "{output}");
}
