//! The waypoint's upstream HTTP connections: HTTP/1.1 or HTTP/2 over HBONE to one
//! endpoint, pooled across downstream connections per (endpoint, client address,
//! protocol). No lock is held across a request: an HTTP/2 connection's sender is
//! cloned per request (streams multiplex, bounded by the server's
//! SETTINGS_MAX_CONCURRENT_STREAMS), an HTTP/1.1 connection is taken by one request
//! at a time and found again when its previous response is done.

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::Io;

/// Any body's error: hyper's, or the stream idle timeout's.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// The protocol spoken to an endpoint.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http",
            Protocol::Http2 => "http2",
        }
    }
}

/// What a Service port says its traffic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Declared {
    /// Nothing (or a name Istio does not know): the client's first bytes decide.
    Undeclared,
    /// HTTP, spoken upstream in this protocol.
    Http(Protocol),
    /// An opaque byte stream (`tcp`, `tls`, `https`, and the protocols Istio
    /// proxies as TCP unless told otherwise: `mongo`, `mysql`, `redis`): relayed
    /// without reading it, and without waiting for the client to speak first.
    Opaque,
}

impl Declared {
    pub fn http(self) -> Option<Protocol> {
        match self {
            Declared::Http(protocol) => Some(protocol),
            Declared::Undeclared | Declared::Opaque => None,
        }
    }
}

/// A Service port's protocol as Istio reads it: `appProtocol` first, else the
/// port name's prefix (`<protocol>` or `<protocol>-<suffix>`).
pub fn declared(app_protocol: Option<&str>, name: Option<&str>) -> Declared {
    let of = |p: &str| match p.to_ascii_lowercase().as_str() {
        "http2" | "grpc" | "grpc-web" | "h2c" | "kubernetes.io/h2c" => {
            Declared::Http(Protocol::Http2)
        }
        "http" => Declared::Http(Protocol::Http1),
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" => Declared::Opaque,
        _ => Declared::Undeclared,
    };
    if let Some(p) = app_protocol {
        return of(p);
    }
    let Some(name) = name else {
        return Declared::Undeclared;
    };
    of(name.split_once('-').map_or(name, |(prefix, _)| prefix))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    pub endpoint: SocketAddr,
    /// The downstream client's address: the destination's tunnel delivers the
    /// connection from it, so a connection carries one client's requests only.
    pub client: IpAddr,
    pub protocol: Protocol,
}

/// Why an upstream connection could not be opened, or a request on it failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {address}: {error}")]
    Connect {
        address: SocketAddr,
        error: std::io::Error,
    },
    #[error("the waypoint's certificate: {0}")]
    Certificate(#[from] crate::certs::CertError),
    #[error("HBONE: {0}")]
    Hbone(#[from] ztunnel_hbone::pool::Error),
    #[error("{protocol} handshake: {}", crate::error_chain(.error))]
    Handshake {
        protocol: &'static str,
        error: hyper::Error,
    },
    /// With its causes: hyper's own message is often only "connection error".
    #[error("{}", crate::error_chain(.0))]
    Request(hyper::Error),
}

/// What a dial returns: a byte stream to the endpoint.
pub type Dialed = Result<Box<dyn Io>, UpstreamError>;

/// A request that failed before any of it reached the endpoint comes back, so
/// that it can be tried on another (Istio's retry on connect failure and refused
/// streams).
pub struct SendError {
    pub error: UpstreamError,
    pub unsent: Option<Request<Body>>,
    /// The connection could not be opened at all (Envoy's `UF`).
    pub connect_failure: bool,
    /// The endpoint refused the stream unprocessed (HTTP/2 REFUSED_STREAM): the
    /// request may go elsewhere, if the caller kept a copy of it.
    pub refused_stream: bool,
}

/// Pooled connections idle longer than this are closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// At most this many idle HTTP/1.1 connections kept per key.
const MAX_IDLE_HTTP1: usize = 256;

struct Http1Conn {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

struct Http2Conn {
    sender: http2::SendRequest<Body>,
    last_used: Instant,
}

#[derive(Default)]
pub struct Upstreams {
    http1: Mutex<HashMap<Key, Vec<Http1Conn>>>,
    http2: Mutex<HashMap<Key, Http2Conn>>,
    /// One HTTP/2 dial per key at a time: the streams that start together share it.
    dialing: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

impl Upstreams {
    pub fn new() -> Arc<Self> {
        let upstreams = Arc::new(Self::default());
        let weak = Arc::downgrade(&upstreams);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(IDLE_TIMEOUT / 3).await;
                let Some(upstreams) = weak.upgrade() else {
                    return;
                };
                upstreams.evict_idle();
            }
        });
        upstreams
    }

    /// Sends `req` to the endpoint of `key`, on a pooled connection or one made
    /// with `dial`.
    pub async fn send<D, F>(
        &self,
        key: &Key,
        req: Request<Body>,
        dial: D,
    ) -> Result<Response<Incoming>, SendError>
    where
        D: FnOnce() -> F,
        F: Future<Output = Dialed>,
    {
        match key.protocol {
            Protocol::Http1 => self.send_http1(key, req, dial).await,
            Protocol::Http2 => self.send_http2(key, req, dial).await,
        }
    }

    async fn send_http1<D, F>(
        &self,
        key: &Key,
        req: Request<Body>,
        dial: D,
    ) -> Result<Response<Incoming>, SendError>
    where
        D: FnOnce() -> F,
        F: Future<Output = Dialed>,
    {
        let mut sender = match self.idle_http1(key) {
            Some(sender) => sender,
            None => {
                let connect = async {
                    let io = dial().await?;
                    let (mut sender, connection) = http1::Builder::new()
                        .handshake(TokioIo::new(io))
                        .await
                        .map_err(handshake("HTTP/1.1"))?;
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!("waypoint upstream HTTP/1.1: {e}");
                        }
                    });
                    sender.ready().await.map_err(handshake("HTTP/1.1"))?;
                    Ok::<_, UpstreamError>(sender)
                };
                // Boxed, as every rare step: inline, it made each request's
                // future larger, and that future is copied into its task.
                match Box::pin(connect).await {
                    Ok(sender) => sender,
                    Err(error) => {
                        return Err(SendError {
                            error,
                            unsent: Some(req),
                            connect_failure: true,
                            refused_stream: false,
                        })
                    }
                }
            }
        };
        let response = sender.try_send_request(req).await;
        match response {
            Ok(response) => {
                // Ready again once this response's body is read; found then.
                let mut idle = self.http1.lock().expect("not poisoned");
                let list = idle.entry(key.clone()).or_default();
                if list.len() < MAX_IDLE_HTTP1 {
                    list.push(Http1Conn {
                        sender,
                        since: Instant::now(),
                    });
                }
                Ok(response)
            }
            Err(mut e) => Err(SendError {
                unsent: e.take_message(),
                error: UpstreamError::Request(e.into_error()),
                connect_failure: false,
                refused_stream: false,
            }),
        }
    }

    /// An HTTP/1.1 request that asks to switch protocols (a WebSocket): on a
    /// connection of its own, never pooled (after a 101 it is the client's).
    pub async fn send_upgrade<D, F>(
        &self,
        req: Request<Body>,
        dial: D,
    ) -> Result<Response<Incoming>, SendError>
    where
        D: FnOnce() -> F,
        F: Future<Output = Dialed>,
    {
        let connect = async {
            let io = dial().await?;
            let (sender, connection) = http1::handshake(TokioIo::new(io))
                .await
                .map_err(handshake("HTTP/1.1"))?;
            tokio::spawn(async move {
                if let Err(e) = connection.with_upgrades().await {
                    tracing::debug!("waypoint upstream HTTP/1.1 (upgrade): {e}");
                }
            });
            Ok::<_, UpstreamError>(sender)
        };
        let mut sender = match connect.await {
            Ok(sender) => sender,
            Err(error) => {
                return Err(SendError {
                    error,
                    unsent: Some(req),
                    connect_failure: true,
                    refused_stream: false,
                })
            }
        };
        sender
            .try_send_request(req)
            .await
            .map_err(|mut e| SendError {
                unsent: e.take_message(),
                error: UpstreamError::Request(e.into_error()),
                connect_failure: false,
                refused_stream: false,
            })
    }

    /// An idle HTTP/1.1 connection of `key` ready for a request; closed ones go.
    fn idle_http1(&self, key: &Key) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.http1.lock().expect("not poisoned");
        let list = idle.get_mut(key)?;
        list.retain(|c| !c.sender.is_closed());
        let ready = list.iter().position(|c| c.sender.is_ready())?;
        Some(list.swap_remove(ready).sender)
    }

    async fn send_http2<D, F>(
        &self,
        key: &Key,
        req: Request<Body>,
        dial: D,
    ) -> Result<Response<Incoming>, SendError>
    where
        D: FnOnce() -> F,
        F: Future<Output = Dialed>,
    {
        let mut sender = match self.open_http2(key) {
            Some(sender) => sender,
            None => {
                let gate = self
                    .dialing
                    .lock()
                    .expect("not poisoned")
                    .entry(key.clone())
                    .or_default()
                    .clone();
                let _dialing = gate.lock().await;
                match self.open_http2(key) {
                    Some(sender) => sender,
                    None => match Box::pin(self.dial_http2(key, dial)).await {
                        Ok(sender) => sender,
                        Err(error) => {
                            return Err(SendError {
                                error,
                                unsent: Some(req),
                                connect_failure: true,
                                refused_stream: false,
                            })
                        }
                    },
                }
            }
        };
        match sender.try_send_request(req).await {
            Ok(response) => Ok(response),
            Err(mut e) => {
                let unsent = e.take_message();
                let error = e.into_error();
                Err(SendError {
                    unsent,
                    refused_stream: refused_stream(&error),
                    error: UpstreamError::Request(error),
                    connect_failure: false,
                })
            }
        }
    }

    fn open_http2(&self, key: &Key) -> Option<http2::SendRequest<Body>> {
        let mut conns = self.http2.lock().expect("not poisoned");
        let conn = conns.get_mut(key)?;
        if conn.sender.is_closed() {
            conns.remove(key);
            return None;
        }
        conn.last_used = Instant::now();
        Some(conn.sender.clone())
    }

    async fn dial_http2<D, F>(
        &self,
        key: &Key,
        dial: D,
    ) -> Result<http2::SendRequest<Body>, UpstreamError>
    where
        D: FnOnce() -> F,
        F: Future<Output = Dialed>,
    {
        let io = dial().await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Fixed windows as large as the HBONE pool's: no BDP pings, which
            // cost a frame and a wakeup per round trip.
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024)
            .handshake(TokioIo::new(io))
            .await
            .map_err(handshake("HTTP/2"))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("waypoint upstream HTTP/2: {e}");
            }
        });
        self.http2.lock().expect("not poisoned").insert(
            key.clone(),
            Http2Conn {
                sender: sender.clone(),
                last_used: Instant::now(),
            },
        );
        Ok(sender)
    }

    fn evict_idle(&self) {
        self.http1.lock().expect("not poisoned").retain(|_, list| {
            list.retain(|c| !c.sender.is_closed() && c.since.elapsed() < IDLE_TIMEOUT);
            !list.is_empty()
        });
        // Dropping the last sender of an HTTP/2 connection closes it (streams in
        // flight hold their own).
        self.http2
            .lock()
            .expect("not poisoned")
            .retain(|_, c| !c.sender.is_closed() && c.last_used.elapsed() < IDLE_TIMEOUT);
        self.dialing
            .lock()
            .expect("not poisoned")
            .retain(|_, gate| Arc::strong_count(gate) > 1);
    }
}

fn handshake(protocol: &'static str) -> impl FnOnce(hyper::Error) -> UpstreamError {
    move |error| UpstreamError::Handshake { protocol, error }
}

/// Whether the server reset the stream with REFUSED_STREAM: it did not process
/// the request (RFC 9113 §8.7), so it may be sent elsewhere.
fn refused_stream(error: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_protocol_is_app_protocol_then_the_name_prefix() {
        use Declared::*;
        use Protocol::*;
        assert_eq!(declared(Some("grpc"), Some("http")), Http(Http2));
        assert_eq!(declared(Some("kubernetes.io/h2c"), None), Http(Http2));
        assert_eq!(declared(Some("HTTP"), Some("grpc")), Http(Http1));
        assert_eq!(declared(Some("tcp"), Some("grpc")), Opaque);
        assert_eq!(declared(Some("bogus"), Some("http")), Undeclared);
        assert_eq!(declared(None, Some("grpc-web")), Http(Http2));
        assert_eq!(declared(None, Some("grpc")), Http(Http2));
        assert_eq!(declared(None, Some("http2-api")), Http(Http2));
        assert_eq!(declared(None, Some("http-api")), Http(Http1));
        assert_eq!(declared(None, Some("grpcish")), Undeclared);
        assert_eq!(declared(None, None), Undeclared);
    }

    #[test]
    fn tcp_tls_and_the_protocols_istio_proxies_as_tcp_are_opaque() {
        for p in ["tcp", "TLS", "https", "mongo", "mysql", "redis"] {
            assert_eq!(declared(Some(p), None), Declared::Opaque, "appProtocol {p}");
            let name = format!("{p}-db");
            assert_eq!(declared(None, Some(&name)), Declared::Opaque, "name {name}");
        }
        assert_eq!(declared(None, Some("tcpish")), Declared::Undeclared);
    }
}
