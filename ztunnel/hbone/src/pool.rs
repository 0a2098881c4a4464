//! HBONE client connections, pooled: many CONNECT streams share one mTLS HTTP/2
//! connection per (origin, source identity, destination identity, destination
//! address). The node tunnel's origin is the source pod: its connections are dialed
//! from inside the pod's network namespace, so they leave from the pod's own
//! address, and two pods never share one.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::{
    certs::WorkloadCert,
    identity::Identity,
    netns::SocketFactory,
    response_flags::ResponseFlag,
    stream::{H2Stream, Refusal},
};

/// Why no HBONE stream could be opened. Each names the response flag Istio's
/// ztunnel reports for it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {address}: {error}")]
    Connect {
        address: SocketAddr,
        error: std::io::Error,
    },
    #[error("the source pod {0} is no longer served")]
    OriginGone(Ipv4Addr),
    #[error("TLS client configuration: {0}")]
    ClientConfig(crate::tls::TlsError),
    #[error("mTLS handshake with {address} (expecting {destination}): {error}")]
    Tls {
        address: SocketAddr,
        destination: Identity,
        error: std::io::Error,
    },
    #[error("HTTP/2 handshake with {address}: {error}")]
    Http2Handshake {
        address: SocketAddr,
        error: h2::Error,
    },
    #[error("HBONE CONNECT: {0}")]
    Request(h2::Error),
    #[error("HBONE CONNECT to {authority} via {address}: {status}")]
    Status {
        authority: SocketAddr,
        address: SocketAddr,
        status: StatusCode,
    },
    /// Another connection's dial to the same place, whose failure this one shares.
    #[error("{0}")]
    Dial(Arc<Error>),
    #[error("no HBONE stream to {0} after {DIAL_ROUNDS} dials: every new connection was taken or closed")]
    NoStream(SocketAddr),
}

impl Error {
    /// Why the CONNECT to `authority` via `address` was not accepted.
    pub fn refused(refusal: Refusal, authority: SocketAddr, address: SocketAddr) -> Self {
        match refusal {
            Refusal::Status(status) => Self::Status {
                authority,
                address,
                status,
            },
            Refusal::Request(e) => Self::Request(e),
        }
    }

    /// The flag Istio's ztunnel reports for a connection that failed this way.
    pub fn flag(&self) -> ResponseFlag {
        match self {
            Self::Tls { .. } => ResponseFlag::TlsFailure,
            Self::Http2Handshake { .. } => ResponseFlag::Http2HandshakeFailure,
            Self::ClientConfig(_) => ResponseFlag::IdentityError,
            Self::Dial(e) => e.flag(),
            Self::Connect { .. }
            | Self::OriginGone(_)
            | Self::Request(_)
            | Self::Status { .. }
            | Self::NoStream(_) => ResponseFlag::Connect,
        }
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// HTTP/2 and pool settings.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub max_streams_per_connection: usize,
    pub idle_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub connect_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Where a pooled connection's TCP connection is dialed from.
#[derive(Clone, Default)]
pub enum Origin {
    /// The calling process's own network namespace (the waypoint, in its pod).
    #[default]
    Local,
    /// Inside a source pod, from its address.
    Pod(PodOrigin),
}

/// One enrollment of a source pod: its socket factory, and a token cancelled when
/// the pod is no longer served (every connection dialed from it is then closed).
#[derive(Clone)]
pub struct PodOrigin {
    id: u64,
    ip: Ipv4Addr,
    sockets: SocketFactory,
    gone: CancellationToken,
}

impl PodOrigin {
    /// `gone` is cancelled when the pod leaves (or is enrolled again).
    pub fn new(ip: Ipv4Addr, sockets: SocketFactory, gone: CancellationToken) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            ip,
            sockets,
            gone,
        }
    }

    /// The pod's socket factory (its other connections are dialed there too).
    pub fn sockets(&self) -> &SocketFactory {
        &self.sockets
    }
}

/// What a pool key knows of an origin: the pod (and which enrollment of it).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum OriginKey {
    Local,
    Pod { ip: Ipv4Addr, id: u64 },
}

impl Origin {
    fn key(&self) -> OriginKey {
        match self {
            Self::Local => OriginKey::Local,
            Self::Pod(p) => OriginKey::Pod { ip: p.ip, id: p.id },
        }
    }

    /// Cancelled when the origin is gone (never, for the local namespace).
    fn gone(&self) -> Option<&CancellationToken> {
        match self {
            Self::Local => None,
            Self::Pod(p) => Some(&p.gone),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    origin: OriginKey,
    source: Identity,
    destination: Identity,
    address: SocketAddr,
}

struct Connection {
    sender: SendRequest<Bytes>,
    /// Cancelled when no new stream may go on the connection: its task ended
    /// (closed, failed, or its pod gone), or the peer refused new streams
    /// (GOAWAY: it is draining) while its open streams carry on.
    closed: CancellationToken,
    streams: Arc<AtomicUsize>,
    last_used: Mutex<Instant>,
}

impl Connection {
    fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }
}

/// A stream in use; dropping it frees its slot on the connection.
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a failed dial's error is given to new connections to the same place
/// without dialing again: long enough that a burst fails together, short enough
/// that a destination back up is used at once. Per source pod, like the key: a
/// dial from one pod says nothing of another's (its namespace's routes, what the
/// destination's network policy admits from its address).
const NEGATIVE_CACHE: Duration = Duration::from_secs(1);

/// Dials a connection may start or join before giving up (each brought a
/// connection whose slots others took first, or that closed at once).
const DIAL_ROUNDS: usize = 4;

/// One dial to a key, shared by every connection waiting for it: the first to ask
/// dials; the others wait for that dial's result (a waiter takes over when the
/// dialing one is cancelled). Its outcome, and when it was known.
#[derive(Default)]
struct Dial(tokio::sync::OnceCell<(Result<(), Arc<Error>>, Instant)>);

#[derive(Default)]
pub struct Pool {
    settings: PoolSettings,
    connections: Mutex<HashMap<Key, Vec<Arc<Connection>>>>,
    dialing: Mutex<HashMap<Key, Arc<Dial>>>,
}

impl Pool {
    pub fn new(settings: PoolSettings) -> Arc<Self> {
        let pool = Arc::new(Self {
            settings,
            connections: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            loop {
                let Some(pool) = weak.upgrade() else { return };
                let every = pool.settings.idle_timeout / 4;
                pool.evict_idle();
                drop(pool);
                tokio::time::sleep(every).await;
            }
        });
        pool
    }

    /// Opens a CONNECT stream to `authority` through `address` (the destination's
    /// HBONE port), as `source`, requiring the server to be `destination`, dialed
    /// from this process's own network namespace.
    pub async fn connect(
        &self,
        source: &Arc<WorkloadCert>,
        destination: &Identity,
        address: SocketAddr,
        authority: SocketAddr,
        headers: http::HeaderMap,
    ) -> Result<(H2Stream, StreamGuard)> {
        let (mut stream, guard) = self
            .connect_early_from(
                &Origin::Local,
                source,
                destination,
                address,
                authority,
                headers,
            )
            .await?;
        match stream.answered().await {
            Ok(()) => Ok((stream, guard)),
            Err(refusal) => Err(Error::refused(refusal, authority, address)),
        }
    }

    /// Like [`Pool::connect`], dialed from `origin` (one pooled connection per
    /// origin: a source pod's streams share only its own), without waiting for
    /// the CONNECT's response: the stream takes writes at once and reads once
    /// the server has answered 200 (see [`H2Stream::awaiting_response`]; its
    /// `refusal` says why not).
    pub async fn connect_early_from(
        &self,
        origin: &Origin,
        source: &Arc<WorkloadCert>,
        destination: &Identity,
        address: SocketAddr,
        authority: SocketAddr,
        headers: http::HeaderMap,
    ) -> Result<(H2Stream, StreamGuard)> {
        let key = Key {
            origin: origin.key(),
            source: source.identity.clone(),
            destination: destination.clone(),
            address,
        };
        let (mut sender, guard) = self.slot(&key, origin, source).await?;
        // An authority that is an ip:port is always a valid URI.
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(authority.to_string())
            .body(())
            .expect("a valid CONNECT request");
        *request.headers_mut() = headers;
        let (response, send) = sender
            .send_request(request, false)
            .map_err(Error::Request)?;
        Ok((H2Stream::awaiting_response(send, response), guard))
    }

    /// A stream slot on a pooled connection, ready for a request, dialing one when
    /// none is free. Streams that start together share one dial, and its failure.
    async fn slot(
        &self,
        key: &Key,
        origin: &Origin,
        source: &Arc<WorkloadCert>,
    ) -> Result<(SendRequest<Bytes>, StreamGuard)> {
        let mut refused = None;
        for _ in 0..DIAL_ROUNDS {
            if let Some((connection, guard)) = self.take_slot(key) {
                match connection.sender.clone().ready().await {
                    Ok(sender) => return Ok((sender, guard)),
                    // Nothing was sent on it: the next round takes another
                    // connection or dials one (to the peer's successor, when it
                    // was draining).
                    Err(e) => {
                        tracing::debug!(address = %key.address, "HBONE connection refuses new streams: {e}");
                        connection.closed.cancel();
                        refused = Some(e);
                        continue;
                    }
                }
            }
            let dial = self.dial_for(key);
            let (result, _) = dial
                .0
                .get_or_init(|| async {
                    let opened = self
                        .open(origin, source, &key.destination, key.address)
                        .await;
                    let result = match opened {
                        Ok(connection) => {
                            self.connections
                                .lock()
                                .expect("not poisoned")
                                .entry(key.clone())
                                .or_default()
                                .push(Arc::new(connection));
                            Ok(())
                        }
                        Err(e) => Err(Arc::new(e)),
                    };
                    (result, Instant::now())
                })
                .await;
            if let Err(e) = result {
                return Err(Error::Dial(e.clone()));
            }
        }
        Err(refused.map_or(Error::NoStream(key.address), Error::Request))
    }

    /// The dial to join for `key`: the one in flight, or a failure still fresh;
    /// otherwise a new one.
    fn dial_for(&self, key: &Key) -> Arc<Dial> {
        let mut dialing = self.dialing.lock().expect("not poisoned");
        let current = dialing.get(key).filter(|dial| match dial.0.get() {
            None => true,
            Some((Err(_), at)) => at.elapsed() < NEGATIVE_CACHE,
            // It brought a connection, whose slots are taken by now.
            Some((Ok(()), _)) => false,
        });
        match current {
            Some(dial) => dial.clone(),
            None => {
                let dial = Arc::new(Dial::default());
                dialing.insert(key.clone(), dial.clone());
                dial
            }
        }
    }

    /// A free stream slot on a live pooled connection.
    fn take_slot(&self, key: &Key) -> Option<(Arc<Connection>, StreamGuard)> {
        let mut connections = self.connections.lock().expect("not poisoned");
        let list = connections.get_mut(key)?;
        // A broken connection is never handed out again.
        list.retain(|c| !c.is_closed());
        for connection in list.iter() {
            let streams = connection.streams.load(Ordering::Acquire);
            if streams < self.settings.max_streams_per_connection {
                connection.streams.fetch_add(1, Ordering::AcqRel);
                *connection.last_used.lock().expect("not poisoned") = Instant::now();
                return Some((connection.clone(), StreamGuard(connection.streams.clone())));
            }
        }
        None
    }

    async fn open(
        &self,
        origin: &Origin,
        source: &Arc<WorkloadCert>,
        destination: &Identity,
        address: SocketAddr,
    ) -> Result<Connection> {
        let s = &self.settings;
        let connect_error = |error| Error::Connect { address, error };
        let tcp = match origin {
            Origin::Local => {
                let tcp = tokio::time::timeout(s.connect_timeout, TcpStream::connect(address))
                    .await
                    .map_err(|_| connect_error(timed_out()))?
                    .map_err(connect_error)?;
                tcp.set_nodelay(true).map_err(connect_error)?;
                tcp
            }
            Origin::Pod(pod) => {
                if pod.gone.is_cancelled() {
                    return Err(Error::OriginGone(pod.ip));
                }
                pod.sockets
                    .connect(address, s.connect_timeout)
                    .await
                    .map_err(|e| {
                        connect_error(std::io::Error::new(
                            e.kind(),
                            format!("from the pod {}: {e}", pod.ip),
                        ))
                    })?
            }
        };
        let config = source
            .client_config(destination.clone())
            .map_err(Error::ClientConfig)?;
        let connector = TlsConnector::from(config);
        let name = ServerName::IpAddress(address.ip().into());
        let tls_error = |error| Error::Tls {
            address,
            destination: destination.clone(),
            error,
        };
        let tls = tokio::time::timeout(s.connect_timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| tls_error(timed_out()))?
            .map_err(tls_error)?;
        // A pod's connections end with it (left the mesh, or enrolled again).
        let gone = origin.gone().cloned().unwrap_or_default();
        self.http2(tls, address, gone).await
    }

    /// The HTTP/2 client over an established stream, driven until it ends, its
    /// keepalive fails or `gone` is cancelled.
    async fn http2<T>(
        &self,
        io: T,
        address: SocketAddr,
        gone: CancellationToken,
    ) -> Result<Connection>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let s = &self.settings;
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .max_header_list_size(crate::stream::MAX_HEADER_LIST_SIZE)
            .enable_push(false)
            .handshake::<_, Bytes>(crate::batched::BatchedWrites::new(io))
            .await
            .map_err(|error| Error::Http2Handshake { address, error })?;
        let keepalive = crate::stream::keepalive(
            connection.ping_pong(),
            s.keepalive_interval,
            s.keepalive_timeout,
        );
        let closed = CancellationToken::new();
        let on_close = closed.clone().drop_guard();
        tokio::spawn(async move {
            tokio::select! {
                result = connection => if let Err(e) = result {
                    tracing::debug!(%address, "HBONE connection ended: {e}");
                },
                e = keepalive => tracing::debug!(%address, "HBONE connection closed: {e}"),
                _ = gone.cancelled() => {
                    tracing::debug!(%address, "HBONE connection closed: its source pod is no longer served");
                }
            }
            drop(on_close);
        });
        Ok(Connection {
            sender,
            closed,
            streams: Arc::new(AtomicUsize::new(0)),
            last_used: Mutex::new(Instant::now()),
        })
    }

    /// Closes every pooled connection to `ip` at once (the workload left; its IP
    /// may be reused by another).
    pub fn evict_address(&self, ip: Ipv4Addr) {
        self.connections
            .lock()
            .expect("not poisoned")
            .retain(|key, _| key.address.ip() != ip);
    }

    fn evict_idle(&self) {
        let idle = self.settings.idle_timeout;
        let mut connections = self.connections.lock().expect("not poisoned");
        for list in connections.values_mut() {
            list.retain(|c| {
                !c.is_closed()
                    && (c.streams.load(Ordering::Acquire) > 0
                        || c.last_used.lock().expect("not poisoned").elapsed() < idle)
            });
        }
        connections.retain(|_, list| !list.is_empty());
        drop(connections);
        // Dials nobody waits on, once done and no longer a fresh failure.
        self.dialing
            .lock()
            .expect("not poisoned")
            .retain(|_, dial| {
                Arc::strong_count(dial) > 1
                    || dial
                        .0
                        .get()
                        .is_none_or(|(result, at)| result.is_err() && at.elapsed() < NEGATIVE_CACHE)
            });
    }

    /// Live pooled connections (for tests and /config_dump).
    pub fn connection_count(&self) -> usize {
        self.connections
            .lock()
            .expect("not poisoned")
            .values()
            .flatten()
            .filter(|c| !c.is_closed())
            .count()
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        Key {
            origin: OriginKey::Local,
            source: id.clone(),
            destination: id,
            address: "10.0.0.1:15008".parse().unwrap(),
        }
    }

    /// A pooled connection to an HTTP/2 server in this process, closed when `gone`
    /// is cancelled.
    async fn served(pool: &Pool, gone: CancellationToken) -> Arc<Connection> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut connection = h2::server::handshake(server).await.unwrap();
            while let Some(Ok((_req, mut respond))) = connection.accept().await {
                let _ = respond.send_response(http::Response::new(()), false);
            }
        });
        let address = "10.0.0.1:15008".parse().unwrap();
        Arc::new(pool.http2(client, address, gone).await.unwrap())
    }

    fn pooled(pool: &Pool, key: &Key, connection: Arc<Connection>) {
        pool.connections
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .push(connection);
    }

    #[tokio::test]
    async fn two_source_pods_never_share_a_connection_and_a_pods_close_when_it_goes() {
        let pool = Pool::default();
        let pod = |ip: [u8; 4], id| Key {
            origin: OriginKey::Pod { ip: ip.into(), id },
            ..key()
        };
        // Same identities and destination; other pods, or the same pod enrolled
        // again (a new namespace behind its address).
        let (a, b, a_again) = (
            pod([10, 0, 0, 2], 1),
            pod([10, 0, 0, 3], 2),
            pod([10, 0, 0, 2], 3),
        );
        let (a_gone, b_gone) = (CancellationToken::new(), CancellationToken::new());
        pooled(&pool, &a, served(&pool, a_gone.clone()).await);
        for other in [&b, &a_again, &key()] {
            assert!(
                pool.take_slot(other).is_none(),
                "{other:?} was given {a:?}'s connection"
            );
        }
        let (_, stream) = pool.take_slot(&a).expect("a's own connection");
        pooled(&pool, &b, served(&pool, b_gone.clone()).await);
        assert_eq!(pool.connection_count(), 2);

        // a leaves: its connection closes, even with a stream open; b's stays.
        a_gone.cancel();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.connection_count() != 1 {
            assert!(Instant::now() < deadline, "a's connection is still open");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(stream);
        assert!(
            pool.take_slot(&a).is_none(),
            "a closed connection handed out"
        );
        assert!(pool.take_slot(&b).is_some(), "b's connection survived");
    }

    fn finished(result: Result<(), &str>, ago: Duration) -> Arc<Dial> {
        let dial = Dial::default();
        let result = result.map_err(|_| Arc::new(Error::OriginGone(Ipv4Addr::LOCALHOST)));
        dial.0.set((result, Instant::now() - ago)).unwrap();
        Arc::new(dial)
    }

    #[test]
    fn a_dial_in_flight_or_a_fresh_failure_is_joined_anything_else_replaced() {
        let pool = Pool::default();
        let key = key();
        let in_flight = pool.dial_for(&key);
        assert!(Arc::ptr_eq(&in_flight, &pool.dial_for(&key)), "joined");
        drop(in_flight);
        let cases = [
            (Err("refused"), Duration::ZERO, true),
            (Err("refused"), NEGATIVE_CACHE * 2, false),
            // A success brought a connection; needing another means it is full.
            (Ok(()), Duration::ZERO, false),
        ];
        for (result, ago, joined) in cases {
            let dial = finished(result, ago);
            pool.dialing
                .lock()
                .unwrap()
                .insert(key.clone(), dial.clone());
            assert_eq!(
                Arc::ptr_eq(&dial, &pool.dial_for(&key)),
                joined,
                "{result:?} {ago:?} ago"
            );
        }
    }
}
