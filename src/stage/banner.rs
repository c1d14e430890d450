//! The banner stage: one line sent to the client before the echo, telling which backend answered
//! and which client address it saw.
//!
//! The template is compiled once per listener: the host name, the version and the listener are
//! known then and become text; a connection only fills in its addresses (and TLS client
//! certificate).

use std::fmt::Write;
use std::net::SocketAddr;

use crate::config::{BannerPart, BannerTemplate};

/// A banner compiled for one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Banner {
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Client,
    Peer,
    Server,
    ClientCert,
}

/// What a connection fills in.
pub struct BannerFields<'a> {
    pub client: SocketAddr,
    pub peer: SocketAddr,
    pub server: Option<SocketAddr>,
    pub client_cert: Option<&'a str>,
}

/// The host's name: under Kubernetes, the pod's.
pub fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

impl Banner {
    /// Compiles `template` for the listener `listener` (as `--listen` spells it).
    pub fn compile(template: &BannerTemplate, hostname: &str, listener: &str) -> Banner {
        let mut pieces: Vec<Piece> = Vec::new();
        let push_text = |pieces: &mut Vec<Piece>, text: &str| match pieces.last_mut() {
            Some(Piece::Text(last)) => last.push_str(text),
            _ => pieces.push(Piece::Text(text.to_string())),
        };
        for part in &template.parts {
            match part {
                BannerPart::Text(text) => push_text(&mut pieces, text),
                BannerPart::Hostname => push_text(&mut pieces, hostname),
                BannerPart::Listener => push_text(&mut pieces, listener),
                BannerPart::Version => push_text(&mut pieces, env!("CARGO_PKG_VERSION")),
                BannerPart::Client => pieces.push(Piece::Client),
                BannerPart::Peer => pieces.push(Piece::Peer),
                BannerPart::Server => pieces.push(Piece::Server),
                BannerPart::ClientCert => pieces.push(Piece::ClientCert),
            }
        }
        Banner { pieces }
    }

    /// The line for one connection, `\n` included.
    pub fn render(&self, fields: &BannerFields<'_>) -> Vec<u8> {
        let mut line = String::with_capacity(64);
        for piece in &self.pieces {
            // Writing to a String cannot fail.
            let _ = match piece {
                Piece::Text(text) => line.write_str(text),
                Piece::Client => write!(line, "{}", fields.client),
                Piece::Peer => write!(line, "{}", fields.peer),
                Piece::Server => match fields.server {
                    Some(server) => write!(line, "{server}"),
                    None => Ok(()),
                },
                Piece::ClientCert => line.write_str(fields.client_cert.unwrap_or("")),
            };
        }
        line.push('\n');
        line.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_once_filled_per_connection() {
        let template: BannerTemplate =
            "{hostname}-{listener} {client} {peer} {server} v{version} [{client_cert}] {{}}".parse().unwrap();
        let banner = Banner::compile(&template, "pod-7", "tcp://127.0.0.1:8080");
        assert_eq!(banner.pieces.len(), 9, "text runs are merged: {:?}", banner.pieces);
        let line = banner.render(&BannerFields {
            client: "[2001:db8::1]:40000".parse().unwrap(),
            peer: "127.0.0.1:5555".parse().unwrap(),
            server: Some("127.0.0.1:8080".parse().unwrap()),
            client_cert: Some("CN=tester"),
        });
        let expected = format!(
            "pod-7-tcp://127.0.0.1:8080 [2001:db8::1]:40000 127.0.0.1:5555 127.0.0.1:8080 v{} [CN=tester] {{}}\n",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(String::from_utf8(line).unwrap(), expected);
        assert!(!hostname().is_empty());
    }
}
