//! Accepting connections so that no error and no single client stops a server.
//!
//! Every listener (the proxy's, the waypoint's, admin, metrics, readiness) accepts
//! through an [`Acceptor`]:
//! - an accept error (EMFILE, ENFILE, ECONNABORTED, ...) is counted, logged at most
//!   once a second, and backed off, and the listener keeps serving;
//! - connections are capped in total (per [`Limiter`], which listeners may share)
//!   and per source, so one client cannot take every slot; a connection over a cap
//!   is closed at once and counted;
//! - an accepted [`Conn`] fails its reads and writes once it has moved no byte for
//!   the idle timeout (a silent client is closed, its slot freed).
//!
//! The handshake timeout is the server's to apply: a TLS server runs its handshake
//! in [`Conn::handshake`], an HTTP/1 server reads headers within it.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    ops::Deref,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};

/// How much a server takes, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, across every listener sharing a [`Limiter`].
    pub max_connections: usize,
    /// Connections open at once from one source.
    pub max_per_source: usize,
    /// How long a client has to complete the server's handshake (TLS, or an HTTP
    /// request's headers).
    pub handshake_timeout: Duration,
    /// A connection that moves no byte either way for this long is closed; `None`
    /// for connections that may legitimately sit idle (plain TCP relayed for pods).
    pub idle_timeout: Option<Duration>,
}

impl Limits {
    /// For the small HTTP endpoints (admin, metrics, readiness): a handful of
    /// clients, short requests.
    pub fn http_endpoint() -> Self {
        Self {
            max_connections: 64,
            max_per_source: 16,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(60)),
        }
    }

    /// For the proxy and the waypoint. The total is kept within the process's
    /// file-descriptor limit (a relayed connection holds about two descriptors).
    pub fn proxy() -> Self {
        let fd_budget = fd_limit().saturating_sub(FD_RESERVE) / 2;
        let max_connections = 65_536.min(fd_budget).max(16);
        Self {
            max_connections,
            max_per_source: (max_connections / 4).max(1),
            handshake_timeout: Duration::from_secs(10),
            // As Envoy's TCP proxy: an hour. HBONE peers answer keep-alive pings,
            // so a live peer is never idle this long.
            idle_timeout: Some(Duration::from_secs(3600)),
        }
    }
}

/// Descriptors kept for everything that is not a client's connection (listeners,
/// upstream dials, config files, BPF maps).
const FD_RESERVE: usize = 256;

/// The process's soft RLIMIT_NOFILE.
#[allow(unsafe_code)] // one libc call, see SAFETY
pub fn fd_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: &'static str,
    /// "limit" (the total cap), "per_source_limit", "idle_timeout" (closed after
    /// the fact), "handshake_timeout".
    pub reason: &'static str,
}

/// What the acceptors report.
#[derive(Clone, Default)]
pub struct AcceptMetrics {
    pub errors: Family<ListenerLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
    pub open: Family<ListenerLabels, Gauge>,
}

impl AcceptMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "ztunnel_accept_errors",
            "Failed accepts (e.g. out of file descriptors), by listener",
            m.errors.clone(),
        );
        registry.register(
            "ztunnel_connections_refused",
            "Connections closed by a limit or timeout of the server, by listener and reason",
            m.refused.clone(),
        );
        registry.register(
            "ztunnel_connections_open",
            "Accepted connections open now, by listener",
            m.open.clone(),
        );
        m
    }

    /// Counts a connection a server closed for `reason`.
    pub fn refuse(&self, listener: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels { listener, reason })
            .inc();
    }
}

/// The slots of one or more listeners: a total and per source.
pub struct Limiter {
    limits: Limits,
    metrics: AcceptMetrics,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl Limiter {
    pub fn new(limits: Limits, metrics: AcceptMetrics) -> Arc<Self> {
        Arc::new(Self {
            limits,
            metrics,
            counts: Mutex::default(),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn metrics(&self) -> &AcceptMetrics {
        &self.metrics
    }

    /// A slot for a connection from `source` to `listener`, or which cap is full.
    fn admit(
        self: &Arc<Self>,
        listener: &'static str,
        source: IpAddr,
    ) -> Result<Slot, &'static str> {
        let mut counts = self.counts.lock().expect("not poisoned");
        if counts.total >= self.limits.max_connections {
            return Err("limit");
        }
        let from_source = counts.per_source.entry(source).or_default();
        if *from_source >= self.limits.max_per_source {
            return Err("per_source_limit");
        }
        *from_source += 1;
        counts.total += 1;
        self.metrics
            .open
            .get_or_create(&ListenerLabels { listener })
            .inc();
        Ok(Slot {
            limiter: self.clone(),
            listener,
            source,
        })
    }

    /// Connections holding a slot now.
    pub fn open(&self) -> usize {
        self.counts.lock().expect("not poisoned").total
    }
}

/// A connection's place under the caps, given back on drop.
struct Slot {
    limiter: Arc<Limiter>,
    listener: &'static str,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limiter
            .metrics
            .open
            .get_or_create(&ListenerLabels {
                listener: self.listener,
            })
            .dec();
        let mut counts = self.limiter.counts.lock().expect("not poisoned");
        counts.total -= 1;
        if let Some(n) = counts.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.per_source.remove(&self.source);
            }
        }
    }
}

/// What counts as one source for the per-source cap.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// The client's address.
    PeerIp,
    /// Everything this listener accepts is one source (a pod's own listener: its
    /// connections come from its address and its loopback alike).
    Listener(IpAddr),
}

/// Accepts from one listener under a [`Limiter`]; never fails.
pub struct Acceptor {
    listener: TcpListener,
    limiter: Arc<Limiter>,
    name: &'static str,
    source: Source,
    log: RateLimitedLog,
}

/// The first backoff after a resource error, and the longest.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Acceptor {
    pub fn new(listener: TcpListener, limiter: Arc<Limiter>, name: &'static str) -> Self {
        Self {
            listener,
            limiter,
            name,
            source: Source::PeerIp,
            log: RateLimitedLog::new(),
        }
    }

    pub fn source(mut self, source: Source) -> Self {
        self.source = source;
        self
    }

    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection within the limits. Errors and refusals are handled here
    /// (counted, logged, backed off); the listener is never given up.
    pub async fn accept(&self) -> (Conn, SocketAddr) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    self.limiter
                        .metrics
                        .errors
                        .get_or_create(&ListenerLabels {
                            listener: self.name,
                        })
                        .inc();
                    self.log.warn(|suppressed| {
                        tracing::warn!(listener = self.name, suppressed, "accept failed: {e}")
                    });
                    // Errors about one connection (it was reset before we took it) are
                    // passed over; anything else (out of descriptors or memory) is given
                    // time to clear, so the loop does not spin.
                    if !is_connection_error(&e) {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                    continue;
                }
            };
            backoff = BACKOFF_MIN;
            let source = match self.source {
                Source::PeerIp => peer.ip(),
                Source::Listener(ip) => ip,
            };
            match self.limiter.admit(self.name, source) {
                Ok(slot) => {
                    let _ = tcp.set_nodelay(true);
                    return (Conn::new(tcp, slot, self.name), peer);
                }
                Err(reason) => {
                    // Dropping the stream closes it: the client learns at once.
                    self.limiter.metrics.refuse(self.name, reason);
                    self.log.warn(|suppressed| {
                        tracing::warn!(listener = self.name, %peer, suppressed, "connection refused: {}", match reason {
                            "limit" => "the server's connection limit is reached",
                            _ => "this source's connection limit is reached",
                        })
                    });
                }
            }
        }
    }

    /// Accepts forever, running `handle` for each connection on its own task.
    pub async fn serve<F, Fut>(self, handle: F)
    where
        F: Fn(Conn, SocketAddr) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        loop {
            let (conn, peer) = self.accept().await;
            tokio::spawn(handle(conn, peer));
        }
    }

    /// Like [`Acceptor::serve`], until `drain` is signaled: then the listener is
    /// closed, and draining waits for the connections' tasks.
    pub async fn serve_until_drained<F, Fut>(self, drain: &crate::drain::Drain, handle: F)
    where
        F: Fn(Conn, SocketAddr) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        loop {
            let (conn, peer) = tokio::select! {
                accepted = self.accept() => accepted,
                () = drain.signaled() => return,
            };
            drain.spawn(handle(conn, peer));
        }
    }
}

/// Errors of one incoming connection, not of the listener or the process.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// A warning written at most once a second; the others are counted and the count
/// given with the next one written.
pub struct RateLimitedLog {
    state: Mutex<(Option<std::time::Instant>, u64)>,
}

impl RateLimitedLog {
    pub fn new() -> Self {
        Self {
            state: Mutex::new((None, 0)),
        }
    }

    /// Calls `write` with the number of warnings suppressed since the last one, or
    /// counts this one as suppressed.
    pub fn warn(&self, write: impl FnOnce(u64)) {
        let mut state = self.state.lock().expect("not poisoned");
        let now = std::time::Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < Duration::from_secs(1) => state.1 += 1,
            _ => {
                let suppressed = std::mem::take(&mut state.1);
                state.0 = Some(now);
                drop(state);
                write(suppressed);
            }
        }
    }
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new()
    }
}

/// An accepted connection: the stream, its slot under the caps (freed on drop),
/// and its idle timeout.
pub struct Conn {
    stream: TcpStream,
    idle: Option<Idle>,
    _slot: Slot,
    listener: &'static str,
}

struct Idle {
    timeout: Duration,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Conn {
    fn new(stream: TcpStream, slot: Slot, listener: &'static str) -> Self {
        let idle = slot.limiter.limits.idle_timeout.map(|timeout| Idle {
            timeout,
            last_activity: Instant::now(),
            timer: Box::pin(tokio::time::sleep(timeout)),
        });
        Self {
            stream,
            idle,
            _slot: slot,
            listener,
        }
    }

    /// The handshake timer of this connection's server, to run its handshake in.
    pub fn handshake(&self) -> Handshake {
        Handshake {
            limiter: self._slot.limiter.clone(),
            listener: self.listener,
        }
    }

    fn touch(&mut self) {
        if let Some(idle) = &mut self.idle {
            idle.last_activity = Instant::now();
        }
    }

    /// Ready with an error once the connection has been idle too long. The timer is
    /// moved on lazily, only when it fires.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(idle) = &mut self.idle else {
            return Poll::Pending;
        };
        loop {
            if idle.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = idle.last_activity + idle.timeout;
            if deadline <= Instant::now() {
                self._slot
                    .limiter
                    .metrics
                    .refuse(self.listener, "idle_timeout");
                // Once fired, it stays fired.
                idle.last_activity = Instant::now() - idle.timeout;
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("idle for {:?}", idle.timeout),
                ));
            }
            idle.timer.as_mut().reset(deadline);
        }
    }
}

/// A server's handshake (TLS) bounded by [`Limits::handshake_timeout`].
pub struct Handshake {
    limiter: Arc<Limiter>,
    listener: &'static str,
}

impl Handshake {
    pub async fn run<T>(self, handshake: impl Future<Output = io::Result<T>>) -> io::Result<T> {
        let timeout = self.limiter.limits.handshake_timeout;
        // Counted before the connection is dropped (closed), as every refusal is.
        let mut handshake = std::pin::pin!(handshake);
        tokio::select! {
            result = &mut handshake => result,
            () = tokio::time::sleep(timeout) => {
                self.limiter
                    .metrics
                    .refuse(self.listener, "handshake_timeout");
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("handshake not done within {timeout:?}"),
                ))
            }
        }
    }
}

impl Deref for Conn {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => this.poll_idle(cx).map(Err),
            ready => ready,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.touch();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => this.poll_idle(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.touch();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => this.poll_idle(cx).map(Err),
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn limits(total: usize, per_source: usize, idle: Option<Duration>) -> Limits {
        Limits {
            max_connections: total,
            max_per_source: per_source,
            handshake_timeout: Duration::from_secs(1),
            idle_timeout: idle,
        }
    }

    #[test]
    fn slots_are_capped_in_total_and_per_source_and_given_back() {
        let limiter = Limiter::new(limits(3, 2, None), AcceptMetrics::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = limiter.admit("test", a).unwrap();
        let _a2 = limiter.admit("test", a).unwrap();
        assert_eq!(limiter.admit("test", a).err(), Some("per_source_limit"));
        let _b1 = limiter.admit("test", b).unwrap();
        assert_eq!(limiter.admit("test", b).err(), Some("limit"));
        drop(a1);
        assert_eq!(limiter.open(), 2);
        assert!(limiter.admit("test", b).is_ok());
    }

    #[test]
    fn warnings_are_written_once_a_second_with_the_count_suppressed() {
        let log = RateLimitedLog::new();
        let mut written = Vec::new();
        for _ in 0..5 {
            log.warn(|suppressed| written.push(suppressed));
        }
        assert_eq!(written, vec![0]);
        log.state.lock().unwrap().0 = Some(std::time::Instant::now() - Duration::from_secs(2));
        log.warn(|suppressed| written.push(suppressed));
        assert_eq!(written, vec![0, 4]);
    }

    async fn pair(limits: Limits) -> (Acceptor, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = Acceptor::new(
            listener,
            Limiter::new(limits, AcceptMetrics::default()),
            "test",
        );
        (acceptor, TcpStream::connect(addr).await.unwrap())
    }

    #[tokio::test]
    async fn an_idle_connection_fails_after_the_idle_timeout_and_an_active_one_does_not() {
        let idle = Duration::from_millis(300);
        let (acceptor, mut client) = pair(limits(4, 4, Some(idle))).await;
        let (mut conn, _) = acceptor.accept().await;
        // Activity every 100 ms keeps it open past the timeout.
        let started = Instant::now();
        let mut buf = [0u8; 1];
        let mut last_byte = Instant::now();
        for _ in 0..6 {
            client.write_all(b"x").await.unwrap();
            conn.read_exact(&mut buf).await.unwrap();
            last_byte = Instant::now();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(started.elapsed() > idle);
        // Then silence: the read fails about the timeout after the last byte.
        let error = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        let silent = last_byte.elapsed();
        assert!(silent >= idle && silent < idle * 3, "{silent:?}");
        assert_eq!(acceptor.limiter.open(), 1);
        drop(conn);
        assert_eq!(acceptor.limiter.open(), 0, "the slot is given back");
    }

    #[tokio::test]
    async fn a_connection_over_the_cap_is_closed_and_the_next_one_served() {
        let (acceptor, _first_client) = pair(limits(1, 1, None)).await;
        let addr = acceptor.local_addr().unwrap();
        let (first, _) = acceptor.accept().await;
        let acceptor = Arc::new(acceptor);
        let accepting = tokio::spawn({
            let acceptor = acceptor.clone();
            async move { acceptor.accept().await }
        });
        // Refused while the first holds the only slot: closed at once.
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
            .await
            .expect("closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0, "the refused connection is closed");
        drop(first);
        let third = TcpStream::connect(addr).await.unwrap();
        let (_conn, peer) = accepting.await.unwrap();
        assert_eq!(peer, third.local_addr().unwrap());
        let refused = acceptor
            .limiter
            .metrics
            .refused
            .get_or_create(&RefusedLabels {
                listener: "test",
                reason: "limit",
            })
            .get();
        assert_eq!(refused, 1);
    }
}
