//! A small HTTP/1 server for the plain-text endpoints: metrics, readiness, admin.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::{
    accept::{Acceptor, Limiter, Limits},
    drain::Drain,
};

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
    serve_draining(acceptor, handler, Drain::new()).await
}

/// Like [`serve_with`], until `drain` is signaled: then it accepts no more, and
/// each open connection closes once its current request is answered (draining
/// waits for them).
pub async fn serve_draining(acceptor: Acceptor, handler: Handler, drain: Drain) {
    let header_timeout = acceptor.limiter().limits().handshake_timeout;
    let connections = drain.clone();
    acceptor
        .serve_until_drained(&drain, move |conn, _| {
            let (handler, drain) = (handler.clone(), connections.clone());
            async move {
                let service = hyper::service::service_fn(move |req| {
                    let response = handler(&req);
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(conn), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => {}
                    () = drain.signaled() => {
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                    }
                }
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
