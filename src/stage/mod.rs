//! The stages a listener may put in front of the echo, and the task that runs them.
//!
//! A stream listener is a stack: PROXY header ([`proxy`]), then the TLS handshake ([`tls`],
//! leaving a `tls_session` for the later stages), then the banner ([`banner`], over TLS on a
//! tls listener), then the echo (with the listener's faults, if any). Each stage is a module of
//! its own that turns a stream, plus what it learned (the client's address, its certificate),
//! into the next step. A plain TCP listener has no stack
//! at all: its connections go straight to the echo and pay nothing for stages they do not use;
//! every tls listener has one.

pub mod banner;
pub mod proxy;
pub mod tls;
pub(crate) mod tls_session;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use crate::access::Access;
use crate::config::{FaultSpec, ProxyVersion};
use crate::connection::{Account, Connection};
use crate::echo::faults::Faults;
use crate::echo::ring::{Pace, Plain};
use crate::echo::EchoStream;
use crate::metrics::{CloseReason, Stage};
use crate::net;
use crate::random::chance;
use banner::{Banner, BannerFields};

/// The stages of one listener.
pub(crate) struct Stack {
    /// The listener, as `--listen` spells it (for logs).
    pub listener: String,
    pub proxy: Option<ProxyStage>,
    pub tls: Option<tls::TlsStage>,
    pub banner: Option<Banner>,
    /// Faults acting on the echo itself (delay, rate, points); `None` for a clean echo.
    pub faults: Option<FaultSpec>,
    /// Each connection is reset at once with this probability.
    pub reset_probability: Option<f64>,
    /// Access control on the PROXY header's client address (PROXY listeners only: other
    /// listeners check the peer right after accept).
    pub access: Option<Arc<Access>>,
}

/// The PROXY header stage's settings.
pub(crate) struct ProxyStage {
    pub version: ProxyVersion,
    pub timeout: Duration,
}

impl Stack {
    /// Whether a listener with these stages needs the staged path at all.
    pub fn is_empty(&self) -> bool {
        self.proxy.is_none()
            && self.tls.is_none()
            && self.banner.is_none()
            && self.faults.is_none()
            && self.reset_probability.is_none()
    }
}

/// One connection of a staged listener: the stages in order, then the echo. Runs on the
/// connection's own task; a stage that fails closes only this connection, having echoed
/// nothing.
pub(crate) async fn serve(
    stack: Arc<Stack>,
    mut stream: TcpStream,
    mut account: Account,
    permit: OwnedSemaphorePermit,
) {
    let peer = account.peer();
    if stack.reset_probability.is_some_and(chance) {
        if let Err(err) = net::reset_on_close(&stream) {
            debug!(%peer, error = %err, "could not arm the injected reset");
        }
        debug!(%peer, listener = %stack.listener, "injected reset at connect");
        account.end(CloseReason::InjectedReset);
        return;
    }
    if let Some(proxy) = &stack.proxy {
        let header = match tokio::time::timeout(proxy.timeout, proxy::read_header(&mut stream, proxy.version))
            .await
        {
            Ok(Ok(header)) => header,
            Ok(Err(err)) => return handshake_failed(&mut account, &stack, Stage::Proxy, &err),
            Err(_elapsed) => {
                let why =
                    format!("no complete PROXY header within {}", humantime::format_duration(proxy.timeout));
                return handshake_failed(&mut account, &stack, Stage::Proxy, &why);
            }
        };
        if let Some(client) = header.client.filter(|&c| c != peer) {
            account.extras().client = Some(client);
        }
        // Access is decided on the client the header names, not on the proxy.
        if let Some(access) = &stack.access {
            let client = account.client();
            match access.admit(client.ip()) {
                Ok(slot) => account.extras().source = slot,
                Err(why) => {
                    let _ = net::reset_on_close(&stream);
                    account.ctx().metrics.rejected(why);
                    access.log_refusal(why, client);
                    debug!(%peer, %client, listener = %stack.listener, reason = why.as_str(), "connection refused");
                    account.end(CloseReason::Rejected);
                    return;
                }
            }
        }
    }
    let Some(tls) = &stack.tls else {
        return banner_then_echo(&stack, account, permit, stream).await;
    };
    let stream = match tls::handshake(tls, stream).await {
        Ok(stream) => stream,
        Err(why) => return handshake_failed(&mut account, &stack, Stage::Tls, &why),
    };
    let client_cert = tls::client_subject(&stream);
    debug!(peer = %account.peer(), listener = %stack.listener, tls = %tls::negotiated(&stream),
        client_cert = client_cert.as_deref().unwrap_or(""), "TLS handshake complete");
    if client_cert.is_some() {
        account.extras().client_cert = client_cert;
    }
    banner_then_echo(&stack, account, permit, stream).await
}

/// The last stages, on whichever stream the earlier ones left: the banner, then the echo.
async fn banner_then_echo<S: EchoStream>(
    stack: &Stack,
    mut account: Account,
    permit: OwnedSemaphorePermit,
    mut stream: S,
) {
    if let Some(banner) = &stack.banner {
        if let Err(reason) = send_banner(&mut stream, banner, &account).await {
            account.end(reason);
            return;
        }
    }
    echo(stack.faults.as_ref(), account, permit, stream).await
}

/// The echo, with the listener's faults or without.
async fn echo<S: EchoStream>(
    faults: Option<&FaultSpec>,
    account: Account,
    permit: OwnedSemaphorePermit,
    stream: S,
) {
    match faults {
        Some(spec) => run(account, permit, stream, Faults::new(spec)).await,
        None => run(account, permit, stream, Plain).await,
    }
}

async fn run<S: EchoStream, P: Pace + 'static>(
    account: Account,
    permit: OwnedSemaphorePermit,
    stream: S,
    pace: P,
) {
    Connection::new(account, permit, stream, pace).await
}

/// Writes the banner line (flushed, for streams that buffer).
async fn send_banner<S: EchoStream>(
    stream: &mut S,
    banner: &Banner,
    account: &Account,
) -> Result<(), CloseReason> {
    let server = stream.tcp().local_addr().ok();
    let client_cert = account.client_cert();
    let line =
        banner.render(&BannerFields { client: account.client(), peer: account.peer(), server, client_cert });
    let write = async {
        stream.write_all(&line).await?;
        stream.flush().await
    };
    write.await.map_err(|err| CloseReason::from_io_error(&err))
}

/// Closes a connection whose stage failed: counted, logged at debug, nothing echoed. Dropping
/// the stream with unread bytes in it makes the close a reset.
fn handshake_failed(account: &mut Account, stack: &Stack, stage: Stage, why: &dyn std::fmt::Display) {
    account.ctx().metrics.handshake_failed(stage);
    account.end(CloseReason::HandshakeFailed);
    debug!(peer = %account.peer(), listener = %stack.listener, stage = stage.as_str(), error = %why, "handshake failed");
}
