//! HBONE client connections, pooled: many CONNECT streams share one mTLS HTTP/2
//! connection per (source identity, destination identity, destination address).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::{certs::WorkloadCert, identity::Identity};

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

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    source: Identity,
    destination: Identity,
    address: SocketAddr,
}

struct Connection {
    sender: SendRequest<Empty<Bytes>>,
    streams: Arc<AtomicUsize>,
    last_used: Mutex<Instant>,
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
/// that a destination back up is used at once.
const NEGATIVE_CACHE: Duration = Duration::from_secs(1);

/// Dials a connection may start or join before giving up (each brought a
/// connection whose slots others took first, or that closed at once).
const DIAL_ROUNDS: usize = 4;

/// One dial to a key, shared by every connection waiting for it: the first to ask
/// dials; the others wait for that dial's result (a waiter takes over when the
/// dialing one is cancelled). Its outcome, and when it was known.
#[derive(Default)]
struct Dial(tokio::sync::OnceCell<(Result<(), String>, Instant)>);

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
    /// HBONE port), as `source`, requiring the server to be `destination`.
    pub async fn connect(
        &self,
        source: &Arc<WorkloadCert>,
        destination: &Identity,
        address: SocketAddr,
        authority: SocketAddr,
        headers: http::HeaderMap,
    ) -> Result<(hyper::upgrade::Upgraded, StreamGuard)> {
        let key = Key {
            source: source.identity.clone(),
            destination: destination.clone(),
            address,
        };
        let (mut sender, guard) = self.slot(&key, source).await?;
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(authority.to_string())
            .body(Empty::new())
            .context("building the CONNECT request")?;
        *request.headers_mut() = headers;
        let response = sender
            .send_request(request)
            .await
            .context("HBONE CONNECT")?;
        if response.status() != StatusCode::OK {
            bail!(
                "HBONE CONNECT to {authority} via {address}: {}",
                response.status()
            );
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .context("HBONE stream upgrade")?;
        Ok((upgraded, guard))
    }

    /// A stream slot on a pooled connection, dialing one when none is free. Streams
    /// that start together share one dial, and its failure.
    async fn slot(
        &self,
        key: &Key,
        source: &Arc<WorkloadCert>,
    ) -> Result<(SendRequest<Empty<Bytes>>, StreamGuard)> {
        for _ in 0..DIAL_ROUNDS {
            if let Some(slot) = self.take_slot(key) {
                return Ok(slot);
            }
            let dial = self.dial_for(key);
            let (result, _) = dial
                .0
                .get_or_init(|| async {
                    let result = match self.open(source, &key.destination, key.address).await {
                        Ok(connection) => {
                            self.connections
                                .lock()
                                .expect("not poisoned")
                                .entry(key.clone())
                                .or_default()
                                .push(Arc::new(connection));
                            Ok(())
                        }
                        Err(e) => Err(format!("{e:#}")),
                    };
                    (result, Instant::now())
                })
                .await;
            if let Err(e) = result {
                bail!("{e}");
            }
        }
        bail!(
            "no HBONE stream to {} after {DIAL_ROUNDS} dials: every new connection was taken or closed",
            key.address
        )
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
    fn take_slot(&self, key: &Key) -> Option<(SendRequest<Empty<Bytes>>, StreamGuard)> {
        let mut connections = self.connections.lock().expect("not poisoned");
        let list = connections.get_mut(key)?;
        // A broken connection is never handed out again.
        list.retain(|c| !c.sender.is_closed());
        for connection in list.iter() {
            let streams = connection.streams.load(Ordering::Acquire);
            if streams < self.settings.max_streams_per_connection {
                connection.streams.fetch_add(1, Ordering::AcqRel);
                *connection.last_used.lock().expect("not poisoned") = Instant::now();
                return Some((
                    connection.sender.clone(),
                    StreamGuard(connection.streams.clone()),
                ));
            }
        }
        None
    }

    async fn open(
        &self,
        source: &Arc<WorkloadCert>,
        destination: &Identity,
        address: SocketAddr,
    ) -> Result<Connection> {
        let s = &self.settings;
        let tcp = tokio::time::timeout(s.connect_timeout, TcpStream::connect(address))
            .await
            .with_context(|| format!("connecting to {address} timed out"))?
            .with_context(|| format!("connecting to {address}"))?;
        tcp.set_nodelay(true)?;
        let connector = TlsConnector::from(source.client_config(destination.clone())?);
        let name = ServerName::IpAddress(address.ip().into());
        let tls = tokio::time::timeout(s.connect_timeout, connector.connect(name, tcp))
            .await
            .with_context(|| format!("TLS handshake with {address} timed out"))?
            .with_context(|| format!("mTLS handshake with {address} (expecting {destination})"))?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .keep_alive_interval(s.keepalive_interval)
            .keep_alive_timeout(s.keepalive_timeout)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .context("HTTP/2 handshake")?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%address, "HBONE connection ended: {e}");
            }
        });
        Ok(Connection {
            sender,
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
                !c.sender.is_closed()
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
            .map(Vec::len)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        Key {
            source: id.clone(),
            destination: id,
            address: "10.0.0.1:15008".parse().unwrap(),
        }
    }

    fn finished(result: Result<(), String>, ago: Duration) -> Arc<Dial> {
        let dial = Dial::default();
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
            (Err("refused".to_owned()), Duration::ZERO, true),
            (Err("refused".to_owned()), NEGATIVE_CACHE * 2, false),
            // A success brought a connection; needing another means it is full.
            (Ok(()), Duration::ZERO, false),
        ];
        for (result, ago, joined) in cases {
            let dial = finished(result.clone(), ago);
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
