//! The operator's HTTP endpoint (`--metrics-listen`): `/metrics`, `/healthz`, `/readyz`.
//!
//! Served with hyper's HTTP/1 server (the Prometheus exporter already depends on hyper, so it
//! adds no new stack). It is kept apart from the echo path: its own listener, its own small limit
//! of concurrent HTTP connections, and a header-read timeout, so a slow, malformed or hostile
//! HTTP client can neither hold the endpoint nor disturb echo clients.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::context::HttpContext;
use crate::net::accept_policy::{self, AcceptPolicy};

/// Concurrent HTTP connections served; more wait in the backlog.
const MAX_HTTP_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the exporter's upkeep runs between scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves the endpoint until `stop` is cancelled.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<HttpContext>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
    let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
    let mut policy = AcceptPolicy::new("metrics endpoint");
    loop {
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = upkeep.tick() => {
                if let Some(registry) = shared.conn.metrics.registry() {
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
                Ok(accepted) => {
                    policy.on_success();
                    accepted
                }
                Err(err) => {
                    // The same errors that hit the echo listeners can hit this one: the same
                    // policy, the same counter.
                    shared.conn.metrics.accept_error(accept_policy::kind(&err));
                    if let Some(pause) = policy.on_error(&err) {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(pause) => {}
                        }
                    }
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
    shared: &HttpContext,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            match crate::context::render(&shared.conn, &shared.state) {
                Some(text) => (StatusCode::OK, PROMETHEUS_TEXT, text),
                None => (StatusCode::NOT_FOUND, TEXT_PLAIN, "metrics are off\n".into()),
            }
        }
        // Alive is answering: this endpoint runs on the same runtime as the echo, so a busy
        // runtime answers late rather than wrongly (a liveness restart under load would only
        // make the overload worse).
        (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, TEXT_PLAIN, "ok\n".into()),
        (&Method::GET | &Method::HEAD, "/readyz") => match shared.state.not_ready() {
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, TEXT_PLAIN, format!("{why}\n")),
            None => (StatusCode::OK, TEXT_PLAIN, "ready\n".into()),
        },
        (_, "/metrics" | "/healthz" | "/readyz") => {
            (StatusCode::METHOD_NOT_ALLOWED, TEXT_PLAIN, "use GET\n".to_string())
        }
        _ => (StatusCode::NOT_FOUND, TEXT_PLAIN, "not found: try /metrics, /healthz or /readyz\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    Ok(response)
}

/// Binds the endpoint's listener (called at start, so a busy port fails start-up loudly).
pub(crate) fn bind(addr: SocketAddr) -> Result<(SocketAddr, TcpListener), crate::Error> {
    let fail = |source| crate::Error::MetricsBind { addr, source };
    let listener = crate::net::bind_tcp(addr, 128).map_err(fail)?;
    let bound = listener.local_addr().map_err(fail)?;
    Ok((bound, listener))
}
