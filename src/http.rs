//! The operator's HTTP endpoint (`--metrics-listen`): `/metrics`, `/healthz`, `/readyz`.
//!
//! Served with hyper's HTTP/1 server (the Prometheus exporter already depends on hyper, so it
//! adds no new stack). It is kept apart from the echo path: its own listener, its own small limit
//! of concurrent HTTP connections, and a header-read timeout, so a slow, malformed or hostile
//! HTTP client can neither hold the endpoint nor disturb echo clients.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::server::Shared;

/// Concurrent HTTP connections served; more wait in the backlog.
const MAX_HTTP_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the exporter's upkeep runs between scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves the endpoint until `stop` is cancelled.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
    let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
    loop {
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = upkeep.tick() => {
                if let Some(registry) = shared.metrics.registry() {
                    registry.run_upkeep();
                }
                continue;
            }
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    debug!(error = %err, "metrics endpoint: accept failed");
                    // The same resource errors that hit the echo listener can hit this one;
                    // pause briefly rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(|request| respond(request, &shared));
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        debug!(%peer, error = %err, "metrics endpoint: connection error");
                    }
                }
                () = stop.cancelled() => {}
            }
        });
    }
}

async fn respond(
    request: Request<hyper::body::Incoming>,
    shared: &Shared,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => match shared.metrics.registry() {
            Some(registry) => (StatusCode::OK, PROMETHEUS_TEXT, registry.render()),
            None => (StatusCode::NOT_FOUND, TEXT_PLAIN, "metrics are off\n".into()),
        },
        (&Method::GET | &Method::HEAD, "/healthz") => {
            // Alive means the runtime still schedules work: a fresh task must run promptly.
            let probe = tokio::time::timeout(Duration::from_secs(1), tokio::spawn(async {})).await;
            match probe {
                Ok(Ok(())) => (StatusCode::OK, TEXT_PLAIN, "ok\n".into()),
                _ => (StatusCode::SERVICE_UNAVAILABLE, TEXT_PLAIN, "runtime not responding\n".into()),
            }
        }
        (&Method::GET | &Method::HEAD, "/readyz") => {
            if shared.draining.load(Ordering::Relaxed) {
                (StatusCode::SERVICE_UNAVAILABLE, TEXT_PLAIN, "draining\n".into())
            } else {
                (StatusCode::OK, TEXT_PLAIN, "ready\n".into())
            }
        }
        (_, "/metrics" | "/healthz" | "/readyz") => {
            (StatusCode::METHOD_NOT_ALLOWED, TEXT_PLAIN, "use GET\n".to_string())
        }
        _ => (StatusCode::NOT_FOUND, TEXT_PLAIN, "not found: try /metrics, /healthz or /readyz\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}

/// Binds the endpoint's listener (called at start, so a busy port fails start-up loudly).
pub(crate) fn bind(addr: SocketAddr) -> Result<(SocketAddr, TcpListener), crate::Error> {
    let listener = crate::listener::bind(addr, 128).map_err(|err| match err {
        crate::Error::Bind { addr, source } => crate::Error::MetricsBind { addr, source },
        other => other,
    })?;
    let bound = listener.local_addr().map_err(|source| crate::Error::MetricsBind { addr, source })?;
    Ok((bound, listener))
}
