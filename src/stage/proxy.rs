//! The PROXY protocol stage (HAProxy's spec, version 1 text and version 2 binary): reads the
//! header a load balancer sends before the client's bytes, and learns the client's address.
//!
//! The header is read without ever consuming a byte past it, so the echo starts exactly at the
//! client's first byte, even when it arrived in the same segment: a v2 header says its length
//! up front and is read exactly; a v1 line is peeked at and only the bytes up to its CRLF are
//! read (when the CRLF has not arrived yet, everything peeked is header and is read, and the next
//! peek waits for more). Nothing is allocated beyond the header's own size, which the spec bounds
//! (v1: 107 bytes; v2: 16 + 65,535). Parsing is `ppp`'s.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::ProxyVersion;

/// The longest v1 header line, CRLF included.
pub const V1_MAX: usize = 107;
/// The fixed part of a v2 header.
pub const V2_FIXED: usize = 16;
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// What a header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The client's address (`None` for v1 `UNKNOWN` and v2 `LOCAL`: the load balancer's own
    /// health checks, served as the socket's peer).
    pub client: Option<SocketAddr>,
    pub version: u8,
}

/// Why a header was refused.
#[derive(Debug)]
pub enum ProxyError {
    /// The connection ended or failed before the header was complete.
    Io(io::Error),
    /// Not a PROXY header, or a malformed one.
    Malformed(String),
    /// A header of the version the listener does not take.
    WrongVersion { got: u8, want: ProxyVersion },
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::Io(err) => write!(f, "connection failed before the PROXY header was complete: {err}"),
            ProxyError::Malformed(why) => write!(f, "malformed PROXY header: {why}"),
            ProxyError::WrongVersion { got, want } => {
                write!(f, "PROXY header version {got}, but the listener takes proxy={}", want.as_str())
            }
        }
    }
}

impl From<io::Error> for ProxyError {
    fn from(err: io::Error) -> Self {
        ProxyError::Io(err)
    }
}

/// Reads one PROXY header of the accepted `version` from the start of `stream`.
pub async fn read_header(stream: &mut TcpStream, version: ProxyVersion) -> Result<ProxyHeader, ProxyError> {
    // Both signatures differ in their first byte already; five bytes tell them apart for sure
    // and are part of either header.
    let mut start = [0u8; 5];
    stream.read_exact(&mut start).await?;
    if &start == b"PROXY" {
        if version == ProxyVersion::V2 {
            return Err(ProxyError::WrongVersion { got: 1, want: version });
        }
        read_v1(stream, start).await
    } else if start[..] == V2_SIGNATURE[..5] {
        if version == ProxyVersion::V1 {
            return Err(ProxyError::WrongVersion { got: 2, want: version });
        }
        read_v2(stream, start).await
    } else {
        Err(ProxyError::Malformed("the connection does not start with a PROXY protocol signature".into()))
    }
}

async fn read_v1(stream: &mut TcpStream, start: [u8; 5]) -> Result<ProxyHeader, ProxyError> {
    let mut line = Vec::with_capacity(V1_MAX);
    line.extend_from_slice(&start);
    let mut chunk = [0u8; V1_MAX];
    loop {
        let room = V1_MAX - line.len();
        if room == 0 {
            return Err(ProxyError::Malformed(format!("v1 line longer than {V1_MAX} bytes")));
        }
        let seen = stream.peek(&mut chunk[..room]).await?;
        if seen == 0 {
            return Err(ProxyError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let end = chunk[..seen].iter().position(|&b| b == b'\n');
        let take = end.map_or(seen, |at| at + 1);
        stream.read_exact(&mut chunk[..take]).await?;
        line.extend_from_slice(&chunk[..take]);
        if end.is_some() {
            break;
        }
    }
    if !line.ends_with(b"\r\n") {
        return Err(ProxyError::Malformed("v1 line does not end with CRLF".into()));
    }
    let header =
        ppp::v1::Header::try_from(&line[..]).map_err(|e| ProxyError::Malformed(format!("v1: {e}")))?;
    let client = match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    };
    Ok(ProxyHeader { client, version: 1 })
}

async fn read_v2(stream: &mut TcpStream, start: [u8; 5]) -> Result<ProxyHeader, ProxyError> {
    let mut fixed = [0u8; V2_FIXED];
    fixed[..5].copy_from_slice(&start);
    stream.read_exact(&mut fixed[5..]).await?;
    if fixed[..12] != V2_SIGNATURE {
        return Err(ProxyError::Malformed("v2 signature is wrong".into()));
    }
    if fixed[12] >> 4 != 2 {
        return Err(ProxyError::Malformed(format!("v2 header with version nibble {}", fixed[12] >> 4)));
    }
    let length = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    let mut header = Vec::with_capacity(V2_FIXED + length);
    header.extend_from_slice(&fixed);
    header.resize(V2_FIXED + length, 0);
    stream.read_exact(&mut header[V2_FIXED..]).await?;
    let parsed =
        ppp::v2::Header::try_from(&header[..]).map_err(|e| ProxyError::Malformed(format!("v2: {e}")))?;
    let client = match (parsed.command, parsed.addresses) {
        (ppp::v2::Command::Local, _) => None,
        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        // UNIX or unspecified addresses: nothing an IP client address can say.
        (ppp::v2::Command::Proxy, _) => None,
    };
    Ok(ProxyHeader { client, version: 2 })
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    /// Sends `chunks` (each written and flushed separately) then `after`, and reads one header.
    async fn exchange(
        version: ProxyVersion,
        chunks: &[&[u8]],
        after: &[u8],
    ) -> (Result<ProxyHeader, ProxyError>, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        client.set_nodelay(true).unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let after = after.to_vec();
        let writer = tokio::spawn(async move {
            for chunk in chunks {
                client.write_all(&chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.write_all(&after).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let result = read_header(&mut server, version).await;
        let mut rest = Vec::new();
        if result.is_ok() {
            server.read_to_end(&mut rest).await.unwrap();
        }
        drop(writer.await.unwrap());
        (result, rest)
    }

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    #[tokio::test]
    async fn v1_tcp4_tcp6_and_unknown_with_data_in_the_same_segment() {
        let (h, rest) =
            exchange(ProxyVersion::V1, &[b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 8080\r\nhello"], b"").await;
        assert_eq!(h.unwrap().client, Some("192.0.2.7:40000".parse().unwrap()));
        assert_eq!(rest, b"hello");
        let (h, rest) = exchange(ProxyVersion::Any, &[b"PROXY TCP6 2001:db8::1 ::1 5 6\r\n"], b"x").await;
        assert_eq!(h.unwrap().client, Some("[2001:db8::1]:5".parse().unwrap()));
        assert_eq!(rest, b"x");
        let (h, _) = exchange(ProxyVersion::V1, &[b"PROXY UNKNOWN\r\n"], b"").await;
        assert_eq!(h.unwrap(), ProxyHeader { client: None, version: 1 });
    }

    #[tokio::test]
    async fn v2_proxy_and_local_exactly_consumed() {
        let mut addrs = vec![198, 51, 100, 9, 10, 0, 0, 1];
        addrs.extend_from_slice(&1234u16.to_be_bytes());
        addrs.extend_from_slice(&80u16.to_be_bytes());
        let mut header = v2(1, 0x11, &addrs);
        header.extend_from_slice(b"after");
        let (h, rest) = exchange(ProxyVersion::V2, &[&header], b"").await;
        assert_eq!(h.unwrap().client, Some("198.51.100.9:1234".parse().unwrap()));
        assert_eq!(rest, b"after");
        let (h, rest) = exchange(ProxyVersion::Any, &[&v2(0, 0, &[])], b"z").await;
        assert_eq!(h.unwrap(), ProxyHeader { client: None, version: 2 });
        assert_eq!(rest, b"z");
    }

    #[tokio::test]
    async fn a_header_split_byte_by_byte_works() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 8080\r\n";
        let chunks: Vec<&[u8]> = line.chunks(1).collect();
        let (h, rest) = exchange(ProxyVersion::V1, &chunks, b"data").await;
        assert_eq!(h.unwrap().client, Some("192.0.2.7:40000".parse().unwrap()));
        assert_eq!(rest, b"data");
    }

    #[tokio::test]
    async fn garbage_wrong_versions_long_lines_and_truncation_are_refused() {
        let (h, _) = exchange(ProxyVersion::Any, &[b"GET / HTTP/1.1\r\n\r\n"], b"").await;
        assert!(matches!(h, Err(ProxyError::Malformed(_))), "{h:?}");
        let (h, _) = exchange(ProxyVersion::V2, &[b"PROXY UNKNOWN\r\n"], b"").await;
        assert!(matches!(h, Err(ProxyError::WrongVersion { got: 1, .. })), "{h:?}");
        let (h, _) = exchange(ProxyVersion::V1, &[&v2(0, 0, &[])], b"").await;
        assert!(matches!(h, Err(ProxyError::WrongVersion { got: 2, .. })), "{h:?}");
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        let (h, _) = exchange(ProxyVersion::V1, &[long.as_bytes()], b"").await;
        assert!(matches!(h, Err(ProxyError::Malformed(_))), "{h:?}");
        let mut truncated = v2(1, 0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]);
        truncated.truncate(20);
        let (h, _) = exchange(ProxyVersion::V2, &[&truncated], b"").await;
        assert!(matches!(h, Err(ProxyError::Io(_))), "{h:?}");
        let (h, _) = exchange(ProxyVersion::V1, &[b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"], b"").await;
        assert!(matches!(h, Err(ProxyError::Malformed(_))), "{h:?}");
    }
}
