//! Timeouts of a whole downstream connection while it has no request open (hyper's
//! HTTP/2 server has none of its own; HTTP/1.1's header read timeout is hyper's):
//! the first request's headers must arrive within the request headers timeout of
//! the connection's start (a client that sends the preface, or part of a header
//! block, and then nothing), and a connection idle for the idle timeout (Envoy's
//! `idle_timeout`) is closed — HTTP/2 with GOAWAY.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// The requests (or tunnelled streams) open on one connection.
pub struct Streams {
    base: Instant,
    open: AtomicUsize,
    /// Milliseconds from `base` to the end of the last stream; u64::MAX: no
    /// stream has started yet.
    idle_since_ms: AtomicU64,
}

/// Which timeout closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// No request's headers within the request headers timeout of the start.
    RequestHeaders,
    /// No stream open for the idle timeout.
    Idle,
}

impl Expired {
    pub fn as_str(self) -> &'static str {
        match self {
            Expired::RequestHeaders => "request_headers",
            Expired::Idle => "idle",
        }
    }
}

/// Holds its connection open (not idle) while it lives.
pub struct Open(Arc<Streams>);

impl Drop for Open {
    fn drop(&mut self) {
        let streams = &self.0;
        let ms = streams.base.elapsed().as_millis() as u64;
        // The order matters: the idle time is set before the count shows idle.
        streams.idle_since_ms.store(ms, Ordering::Release);
        streams.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection busy until it ends or is dropped
/// (its size and end pass through: HTTP/1.1 keeps its content-length).
pub struct Holding<B> {
    inner: B,
    _open: Open,
}

impl<B> Holding<B> {
    pub fn new(inner: B, open: Open) -> Self {
        Self { inner, _open: open }
    }
}

impl<B: Body + Unpin> Body for Holding<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Streams {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            open: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(u64::MAX),
        })
    }

    /// A request (or stream) began: the connection is busy until it is dropped.
    pub fn open(self: &Arc<Self>) -> Open {
        self.open.fetch_add(1, Ordering::AcqRel);
        // 0, not MAX: a stream has started (the first-request timeout is over).
        let _ =
            self.idle_since_ms
                .compare_exchange(u64::MAX, 0, Ordering::AcqRel, Ordering::Acquire);
        Open(self.clone())
    }

    /// What expires next, and when; None while a stream is open.
    fn next(&self, request_headers: Duration, idle: Duration) -> Option<(Instant, Expired)> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(match self.idle_since_ms.load(Ordering::Acquire) {
            u64::MAX => (self.base + request_headers, Expired::RequestHeaders),
            ms => (self.base + Duration::from_millis(ms) + idle, Expired::Idle),
        })
    }

    /// Returns once the connection has had no stream open for its timeout: the
    /// request headers timeout before any request, the idle timeout after.
    pub async fn expired(&self, request_headers: Duration, idle: Duration) -> Expired {
        loop {
            match self.next(request_headers, idle) {
                Some((deadline, expired)) if deadline <= Instant::now() => return expired,
                Some((deadline, _)) => tokio::time::sleep_until(deadline).await,
                // Busy: look again one timeout later at the earliest (an end
                // after now cannot expire before then).
                None => tokio::time::sleep(request_headers.min(idle)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(200);
    const LONG: Duration = Duration::from_millis(600);

    #[tokio::test]
    async fn a_connection_without_a_first_request_expires_after_the_request_headers_timeout() {
        let streams = Streams::new();
        let started = Instant::now();
        assert_eq!(streams.expired(SHORT, LONG).await, Expired::RequestHeaders);
        assert!(started.elapsed() >= SHORT);
        assert!(started.elapsed() < LONG, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn an_open_stream_holds_the_connection_and_its_end_starts_the_idle_timeout() {
        let streams = Streams::new();
        let open = streams.open();
        let watch = tokio::spawn({
            let streams = streams.clone();
            async move { streams.expired(SHORT, LONG).await }
        });
        // Longer than both timeouts with a stream open: nothing expires.
        tokio::time::sleep(LONG + SHORT).await;
        assert!(!watch.is_finished());
        let ended = Instant::now();
        drop(open);
        assert_eq!(watch.await.unwrap(), Expired::Idle);
        assert!(ended.elapsed() >= LONG, "{:?}", ended.elapsed());
    }
}
