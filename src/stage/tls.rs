//! The TLS stage: the handshake on the connection's own task, and the certificate material it
//! uses, loaded at start and reloaded without a restart.
//!
//! # Material
//!
//! [`Certificates`] holds the rustls configuration every new handshake uses, built from
//! `--tls-cert` (PEM chain), `--tls-key` (PEM PKCS#8, PKCS#1 or SEC1) and, for mutual TLS,
//! `--tls-client-ca` (PEM bundle; clients must present a certificate chaining to it, checked by
//! webpki). PEM is parsed by `rustls-pki-types`; the crypto provider is `ring`, built explicitly
//! (never a process default), TLS 1.3 and 1.2.
//!
//! # Reload
//!
//! On SIGHUP ([`Certificates::reload`]) and whenever the files' contents change (compared every
//! `--tls-reload-interval`, [`Certificates::watch`]), the files are read and the configuration
//! built again. New handshakes use the new configuration at once; established sessions keep
//! theirs. If the new files do not load, the error names the flag and the file, and the
//! configuration in use stays. Contents rather than modification times are compared: Kubernetes
//! updates a mounted Secret by swapping a symlink, and a file replaced twice within a second keeps
//! its size and mtime's second. Files that keep failing are reported once, not on every check.
//!
//! Every attempt counts in `echod_tls_reloads_total{result}`, and
//! `echod_tls_certificate_expiry_timestamp_seconds` is the served leaf's notAfter.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::TlsFiles;
use crate::metrics::TlsMetrics;
use crate::net::read_ahead::ReadAhead;
use crate::stage::tls_session::Session;

/// Why TLS material did not load: the flag and file at fault, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub flag: &'static str,
    pub path: PathBuf,
    pub why: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.flag, self.path.display(), self.why)
    }
}

impl std::error::Error for LoadError {}

/// What the served certificate is, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The leaf's serial number, hex bytes separated by colons (as `openssl x509 -serial` groups
    /// them).
    pub serial: String,
    /// The leaf's subject, RFC 4514 style.
    pub subject: String,
    /// The leaf's notAfter, seconds since the Unix epoch.
    pub not_after: i64,
}

impl CertificateInfo {
    /// The notAfter as RFC 3339 (UTC).
    pub fn expires(&self) -> String {
        format_time(self.not_after)
    }
}

/// The bytes of the three files, as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// What the last look at the files saw: their contents, or why they could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Contents(Contents),
    Unreadable(LoadError),
}

/// A configuration built from one set of files.
struct Material {
    config: Arc<ServerConfig>,
    info: CertificateInfo,
}

/// The TLS configuration new handshakes use, and how it is kept current.
pub struct Certificates {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<(Arc<ServerConfig>, CertificateInfo)>,
    /// What the files held at the last look; also serialises reloads.
    seen: Mutex<Seen>,
    metrics: TlsMetrics,
}

impl Certificates {
    /// Loads the files for the first time: any problem is an error (echod does not start).
    pub fn load(files: TlsFiles, metrics: TlsMetrics) -> Result<Certificates, LoadError> {
        let provider = Arc::new(provider());
        let contents = read(&files)?;
        let material = build(&files, &contents, &provider)?;
        warn_if_not_current(&material.info);
        metrics.expiry.set(material.info.not_after as f64);
        Ok(Certificates {
            files,
            provider,
            current: RwLock::new((material.config, material.info)),
            seen: Mutex::new(Seen::Contents(contents)),
            metrics,
        })
    }

    /// The configuration for a new handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).0.clone()
    }

    /// The certificate new handshakes present.
    pub fn info(&self) -> CertificateInfo {
        self.current.read().unwrap_or_else(PoisonError::into_inner).1.clone()
    }

    /// Whether a client certificate is required.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Reads and loads the files now, whatever they hold (SIGHUP). Blocking: file reads and
    /// certificate parsing (run it off the runtime's workers).
    pub fn reload(&self) -> Result<CertificateInfo, LoadError> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let now = read(&self.files).map_or_else(Seen::Unreadable, Seen::Contents);
        let result = self.apply(&now);
        *seen = now;
        result
    }

    /// Loads the files if they changed since the last look; `None` if they did not. Blocking,
    /// like [`reload`](Certificates::reload).
    pub fn reload_if_changed(&self) -> Option<Result<CertificateInfo, LoadError>> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let now = read(&self.files).map_or_else(Seen::Unreadable, Seen::Contents);
        if now == *seen {
            return None;
        }
        let result = self.apply(&now);
        *seen = now;
        Some(result)
    }

    /// Builds from what was read and, if that works, serves it; counts and logs either way.
    fn apply(&self, now: &Seen) -> Result<CertificateInfo, LoadError> {
        let built = match now {
            Seen::Unreadable(err) => Err(err.clone()),
            Seen::Contents(contents) => build(&self.files, contents, &self.provider),
        };
        match built {
            Ok(material) => {
                let info = material.info.clone();
                warn_if_not_current(&info);
                *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                    (material.config, material.info);
                self.metrics.expiry.set(info.not_after as f64);
                self.metrics.reloads_ok.increment(1);
                info!(serial = %info.serial, subject = %info.subject, not_after = %format_time(info.not_after),
                    "TLS certificate loaded; new handshakes use it");
                Ok(info)
            }
            Err(err) => {
                self.metrics.reloads_error.increment(1);
                let kept = self.info();
                error!(flag = err.flag, file = %err.path.display(), error = %err.why, kept_serial = %kept.serial,
                    "TLS files did not load ({err}); still serving the certificate loaded before");
                Err(err)
            }
        }
    }

    /// Checks the files every `every` until `stop`, loading them when they change. Each check
    /// runs on the blocking pool.
    pub async fn watch(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let certificates = self.clone();
            if let Err(err) = tokio::task::spawn_blocking(move || certificates.reload_if_changed()).await {
                error!(error = %err, "the TLS file check failed");
            }
        }
    }
}

/// Reads the three files.
fn read(files: &TlsFiles) -> Result<Contents, LoadError> {
    let read_one = |flag: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| LoadError {
            flag,
            path: path.to_path_buf(),
            why: format!("cannot read it: {e}"),
        })
    };
    Ok(Contents {
        cert: read_one("--tls-cert", &files.cert)?,
        key: read_one("--tls-key", &files.key)?,
        client_ca: files.client_ca.as_deref().map(|ca| read_one("--tls-client-ca", ca)).transpose()?,
    })
}

/// Every certificate in a PEM file (other sections, such as a key, are skipped).
fn certificates(
    flag: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let fail = |why: String| LoadError { flag, path: path.to_path_buf(), why };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(fail("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into()));
    }
    Ok(certs)
}

/// Builds the server configuration from the files' contents.
fn build(
    files: &TlsFiles,
    contents: &Contents,
    provider: &Arc<CryptoProvider>,
) -> Result<Material, LoadError> {
    let chain = certificates("--tls-cert", &files.cert, &contents.cert)?;
    let info =
        describe(&chain[0]).map_err(|why| LoadError { flag: "--tls-cert", path: files.cert.clone(), why })?;
    let key_error = |why: String| LoadError { flag: "--tls-key", path: files.key.clone(), why };
    let key = PrivateKeyDer::from_pem_slice(&contents.key).map_err(|e| match e {
        pem::Error::NoItemsFound => key_error("no PEM private key (PKCS#8, PKCS#1 or SEC1) in it".into()),
        e => key_error(format!("not a PEM private key file: {e}")),
    })?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => key_error(format!(
            "the key does not match the certificate in {} (--tls-cert)",
            files.cert.display()
        )),
        e => key_error(format!("unusable private key: {e}")),
    })?;

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| LoadError {
            flag: "--tls-cert",
            path: files.cert.clone(),
            why: format!("the TLS provider refuses TLS 1.2 and 1.3: {e}"),
        })?;
    let builder = match (&files.client_ca, &contents.client_ca) {
        (Some(path), Some(pem)) => {
            let fail = |why: String| LoadError { flag: "--tls-client-ca", path: path.clone(), why };
            let mut roots = RootCertStore::empty();
            for cert in certificates("--tls-client-ca", path, pem)? {
                roots.add(cert).map_err(|e| fail(format!("unusable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| fail(format!("cannot verify clients with it: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    // The server's order of cipher suites, not the client's: see `provider`.
    config.ignore_client_order = true;
    Ok(Material { config: Arc::new(config), info })
}

/// ring's provider with the AES-128-GCM suites first (then its own order). Clients commonly list
/// AES-256-GCM first; AES-128-GCM is as safe for an echo's traffic and costs about a third less
/// CPU per byte (10 AES rounds instead of 14), which is most of what TLS adds to bulk echo.
fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite::{
        TLS13_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    };
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: AES-128-GCM suites (key false) first, the rest in ring's order.
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            TLS13_AES_128_GCM_SHA256
                | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}

/// Serial, subject and notAfter of a certificate.
fn describe(cert: &CertificateDer<'_>) -> Result<CertificateInfo, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("the first certificate is not a valid X.509 certificate: {e}"))?;
    Ok(CertificateInfo {
        serial: parsed.raw_serial_as_string(),
        subject: parsed.subject().to_string(),
        not_after: parsed.validity().not_after.timestamp(),
    })
}

/// The subject of a certificate, for the client certificate's `{client_cert}` and logs.
pub fn subject(cert: &CertificateDer<'_>) -> Option<String> {
    x509_parser::parse_x509_certificate(cert.as_ref()).ok().map(|(_, c)| c.subject().to_string())
}

/// The subject of the certificate the client presented, if it presented one.
pub(crate) fn client_subject(stream: &Session) -> Option<String> {
    stream.connection().peer_certificates()?.first().and_then(|cert| subject(cert))
}

/// Serving an expired certificate is allowed (testers do it on purpose), but said.
fn warn_if_not_current(info: &CertificateInfo) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    if info.not_after < now {
        warn!(serial = %info.serial, not_after = %format_time(info.not_after),
            "the TLS certificate has expired; clients that verify it will refuse it");
    }
}

/// A Unix time as RFC 3339 (UTC).
fn format_time(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(secs) => humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string(),
        Err(_) => format!("{secs} (before 1970)"),
    }
}

/// The TLS step of a listener's stack.
pub(crate) struct TlsStage {
    pub certificates: Arc<Certificates>,
    /// `--tls-handshake-timeout`.
    pub timeout: Duration,
}

/// The server side of the handshake, with the configuration in force now, bounded by the
/// handshake timeout. On failure, why (for the debug log); the socket is closed then.
pub(crate) async fn handshake(stage: &TlsStage, stream: TcpStream) -> Result<Session, String> {
    let acceptor = tokio_rustls::TlsAcceptor::from(stage.certificates.config());
    match tokio::time::timeout(stage.timeout, acceptor.accept(ReadAhead::new(stream))).await {
        Ok(Ok(stream)) => Ok(Session::new(stream)),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_elapsed) => {
            Err(format!("no complete TLS handshake within {}", humantime::format_duration(stage.timeout)))
        }
    }
}

/// The negotiated version and cipher suite, for the debug log.
pub(crate) fn negotiated(stream: &Session) -> String {
    let session = stream.connection();
    let version = session.protocol_version().map_or_else(|| "?".to_string(), |v| format!("{v:?}"));
    let suite =
        session.negotiated_cipher_suite().map_or_else(|| "?".to_string(), |s| format!("{:?}", s.suite()));
    format!("{version} {suite}")
}
