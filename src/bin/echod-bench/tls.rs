//! The TLS client (rustls with the ring provider, installed explicitly): trust from a CA file
//! or none (`--insecure`), an optional client certificate, the server name, the versions, and
//! no session resumption, so that every connection makes a full handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme, SupportedProtocolVersion};

/// `--tls-version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum TlsVersion {
    /// TLS 1.2 only.
    #[value(name = "1.2")]
    #[serde(rename = "1.2")]
    V12,
    /// TLS 1.3 only.
    #[value(name = "1.3")]
    #[serde(rename = "1.3")]
    V13,
}

/// What the TLS flags asked for.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub ca: Option<PathBuf>,
    pub insecure: bool,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The server name to send and verify; else the host of --target.
    pub sni: Option<String>,
    /// Only this version; else 1.2 and 1.3.
    pub version: Option<TlsVersion>,
}

/// A usage error: the flag at fault and what is wrong.
pub type FlagError = (&'static str, String);

/// The TLS side of every connection: a connector over one shared configuration.
#[derive(Clone)]
pub struct Tls {
    pub connector: tokio_rustls::TlsConnector,
    pub name: ServerName<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("name", &self.name).finish_non_exhaustive()
    }
}

fn certificates(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, FlagError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| (flag, format!("cannot read {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (flag, format!("{}: not a PEM certificate file: {e}", path.display())))?;
    if certs.is_empty() {
        return Err((flag, format!("{}: no certificate in it", path.display())));
    }
    Ok(certs)
}

impl Tls {
    /// Builds the client configuration; `host` is the target's host, the default server name.
    pub fn new(opts: &TlsOptions, host: &str) -> Result<Tls, FlagError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&'static SupportedProtocolVersion] = match opts.version {
            None => &[&rustls::version::TLS13, &rustls::version::TLS12],
            Some(TlsVersion::V12) => &[&rustls::version::TLS12],
            Some(TlsVersion::V13) => &[&rustls::version::TLS13],
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| ("--tls-version", format!("not supported by the provider: {e}")))?;
        let builder = match (&opts.ca, opts.insecure) {
            (Some(_), true) => {
                return Err(("--insecure", "give either --tls-ca or --insecure, not both".into()));
            }
            (None, false) => return Err(("--tls", "needs --tls-ca FILE or --insecure".into())),
            (None, true) => {
                builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            }
            (Some(ca), false) => {
                let mut roots = RootCertStore::empty();
                for cert in certificates("--tls-ca", ca)? {
                    roots.add(cert).map_err(|e| {
                        ("--tls-ca", format!("{}: unusable CA certificate: {e}", ca.display()))
                    })?;
                }
                builder.with_root_certificates(roots)
            }
        };
        let mut config = match (&opts.cert, &opts.key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = certificates("--tls-cert", cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| ("--tls-key", format!("{}: no usable private key: {e}", key.display())))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ("--tls-key", format!("does not fit --tls-cert: {e}")))?
            }
            (Some(_), None) => return Err(("--tls-cert", "needs --tls-key".into())),
            (None, Some(_)) => return Err(("--tls-key", "needs --tls-cert".into())),
        };
        // Every connection makes a full handshake: no tickets, no session IDs, no early data.
        config.resumption = Resumption::disabled();
        config.enable_early_data = false;
        let (flag, name) = match &opts.sni {
            Some(sni) => ("--sni", sni.as_str()),
            None => ("--target", host),
        };
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| (flag, format!("`{name}` is not a server name: {e}")))?;
        Ok(Tls { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), name })
    }
}

/// `--insecure`: any certificate is accepted, but the handshake's signatures are still checked
/// (the server holds the key of the certificate it sent).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
