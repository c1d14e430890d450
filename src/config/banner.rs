//! `--banner TEXT`: a template, parsed once at start into literal text and placeholders.
//!
//! Placeholders: `{hostname}`, `{client}`, `{peer}`, `{server}`, `{listener}`, `{version}`,
//! `{client_cert}`; `{{` and `}}` stand for literal braces. Anything else in braces, or a brace
//! left unpaired, is refused at start (exit 2, naming `--banner`).

use std::fmt;
use std::str::FromStr;

/// One piece of a banner template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BannerPart {
    Text(String),
    /// The host's name (the pod's name under Kubernetes).
    Hostname,
    /// The client's address: the PROXY header's when there is one, else the socket's peer.
    Client,
    /// The socket's peer address.
    Peer,
    /// The local address the client reached.
    Server,
    /// The listener, as `--listen` spells it (with its bound port).
    Listener,
    /// echod's version.
    Version,
    /// The subject of the client's TLS certificate (empty without one).
    ClientCert,
}

const PLACEHOLDERS: [(&str, BannerPart); 7] = [
    ("hostname", BannerPart::Hostname),
    ("client", BannerPart::Client),
    ("peer", BannerPart::Peer),
    ("server", BannerPart::Server),
    ("listener", BannerPart::Listener),
    ("version", BannerPart::Version),
    ("client_cert", BannerPart::ClientCert),
];

/// A parsed `--banner` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BannerTemplate {
    pub parts: Vec<BannerPart>,
}

impl FromStr for BannerTemplate {
    type Err = String;

    fn from_str(s: &str) -> Result<BannerTemplate, String> {
        if s.contains(['\n', '\r']) {
            return Err("the banner is one line: it cannot contain a line break".into());
        }
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = s.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let rest = &s[at + 1..];
                    let end = rest.find('}').ok_or_else(|| {
                        format!("`{{` at position {at} is never closed (write `{{{{` for a literal brace)")
                    })?;
                    let name = &rest[..end];
                    let part =
                        PLACEHOLDERS.iter().find(|(n, _)| *n == name).map(|(_, p)| p.clone()).ok_or_else(
                            || {
                                let known: Vec<String> =
                                    PLACEHOLDERS.iter().map(|(n, _)| format!("{{{n}}}")).collect();
                                format!("unknown placeholder `{{{name}}}` (known: {})", known.join(", "))
                            },
                        )?;
                    for _ in 0..=name.chars().count() {
                        chars.next();
                    }
                    if !text.is_empty() {
                        parts.push(BannerPart::Text(std::mem::take(&mut text)));
                    }
                    parts.push(part);
                }
                '}' => {
                    return Err(format!(
                        "`}}` at position {at} has no opening brace (write `}}}}` for a literal brace)"
                    ))
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(BannerPart::Text(text));
        }
        Ok(BannerTemplate { parts })
    }
}

impl fmt::Display for BannerTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                BannerPart::Text(text) => f.write_str(&text.replace('{', "{{").replace('}', "}}"))?,
                other => {
                    let name = PLACEHOLDERS.iter().find(|(_, p)| p == other).map_or("", |(n, _)| n);
                    write!(f, "{{{name}}}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_literal_braces() {
        let t: BannerTemplate =
            "{hostname}-{listener} {client} {{x}} {peer}{server}{version}{client_cert}".parse().unwrap();
        assert_eq!(
            t.parts,
            vec![
                BannerPart::Hostname,
                BannerPart::Text("-".into()),
                BannerPart::Listener,
                BannerPart::Text(" ".into()),
                BannerPart::Client,
                BannerPart::Text(" {x} ".into()),
                BannerPart::Peer,
                BannerPart::Server,
                BannerPart::Version,
                BannerPart::ClientCert,
            ]
        );
        assert_eq!(t.to_string().parse::<BannerTemplate>().unwrap(), t);
        assert_eq!("plain".parse::<BannerTemplate>().unwrap().parts, vec![BannerPart::Text("plain".into())]);
        assert_eq!("é{client}ü".parse::<BannerTemplate>().unwrap().parts.len(), 3);
    }

    #[test]
    fn bad_templates_are_refused() {
        let err = |s: &str| s.parse::<BannerTemplate>().unwrap_err();
        assert!(err("{nope}").contains("unknown placeholder `{nope}`"));
        assert!(err("{client").contains("never closed"));
        assert!(err("a}b").contains("no opening brace"));
        assert!(err("two\nlines").contains("line break"));
    }
}
