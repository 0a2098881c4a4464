//! A small HTTP/1 server for the plain-text endpoints: metrics, readiness, admin.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::accept::{Acceptor, Limiter, Limits};

pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// Serves `handler` on `listener` with the limits of an HTTP endpoint (metrics
/// not exported: see [`serve_with`]).
pub async fn serve(listener: TcpListener, handler: Handler) {
    let limiter = Limiter::new(Limits::http_endpoint(), Default::default());
    serve_with(Acceptor::new(listener, limiter, "http"), handler).await
}

/// Serves `handler` on every connection `acceptor` admits, for ever: a client must
/// send its request's headers within the handshake timeout.
pub async fn serve_with(acceptor: Acceptor, handler: Handler) {
    let header_timeout = acceptor.limiter().limits().handshake_timeout;
    acceptor
        .serve(move |conn, _| {
            let handler = handler.clone();
            async move {
                let service = hyper::service::service_fn(move |req| {
                    let response = handler(&req);
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(conn), service)
                    .await;
            }
        })
        .await
}

pub fn text(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("a valid response")
}

pub fn not_found() -> Response<Full<Bytes>> {
    text(StatusCode::NOT_FOUND, "text/plain", "not found\n")
}
