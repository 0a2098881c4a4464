//! The stream idle timeout (Envoy's `stream_idle_timeout`): a request whose
//! stream sees nothing in either direction (response headers, body frames) for
//! the timeout is ended — before its response headers with 408 (flag SI), after
//! them by an error that resets the stream.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::Future;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::upstream::{self, BoxError};

/// The last activity on one request's stream.
pub struct Activity {
    base: Instant,
    /// Milliseconds from `base` to the last frame either way.
    last_ms: AtomicU64,
    timeout: Duration,
}

impl Activity {
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            timeout,
        })
    }

    fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// When the stream times out unless something passes before.
    fn deadline(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Acquire)) + self.timeout
    }

    /// Whether the stream has been idle for the timeout.
    pub fn expired(&self) -> bool {
        self.deadline() <= Instant::now()
    }

    /// Returns once the stream has been idle for the timeout.
    pub async fn idle(&self) {
        loop {
            let deadline = self.deadline();
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[derive(Debug)]
pub struct StreamIdle;

impl std::fmt::Display for StreamIdle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stream idle timeout")
    }
}

impl std::error::Error for StreamIdle {}

/// A body whose frames count as its stream's activity, and which fails once the
/// stream has been idle for the timeout.
pub struct IdleBody {
    inner: upstream::Body,
    activity: Arc<Activity>,
    /// Made when the body first waits (most bodies never do).
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleBody {
    pub fn new(inner: upstream::Body, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            sleep: None,
        }
    }
}

impl Body for IdleBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            self.activity.touch();
            return Poll::Ready(frame);
        }
        loop {
            let deadline = self.activity.deadline();
            if deadline <= Instant::now() {
                return Poll::Ready(Some(Err(StreamIdle.into())));
            }
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    /// A body that sends one frame after `gap`, then ends.
    fn after(gap: Duration) -> upstream::Body {
        let frames = futures_util::stream::once(async move {
            tokio::time::sleep(gap).await;
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x")))
        });
        StreamBody::new(frames).boxed()
    }

    // Real time (no paused clock in this crate's tokio): margins wide enough for
    // a loaded machine.
    const TIMEOUT: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn a_body_quiet_for_the_timeout_fails_and_a_livelier_one_passes() {
        let body = IdleBody::new(after(Duration::from_millis(10)), Activity::new(TIMEOUT));
        assert!(body.collect().await.is_ok());
        let started = Instant::now();
        let body = IdleBody::new(after(Duration::from_secs(60)), Activity::new(TIMEOUT));
        let error = body.collect().await.unwrap_err();
        assert!(error.is::<StreamIdle>(), "{error}");
        assert!(started.elapsed() >= TIMEOUT);
    }

    #[tokio::test]
    async fn activity_in_the_other_direction_keeps_the_stream_alive() {
        let activity = Activity::new(TIMEOUT);
        // Each direction alone is quiet for longer than the timeout, but frames
        // pass every 600 ms on one side or the other.
        let one = IdleBody::new(after(Duration::from_millis(600)), activity.clone());
        let two = IdleBody::new(after(Duration::from_millis(1200)), activity.clone());
        let (a, b) = tokio::join!(one.collect(), two.collect());
        assert!(a.is_ok() && b.is_ok());
        // Then nothing: idle() returns a timeout after the last frame.
        let quiet = Instant::now();
        activity.idle().await;
        assert!(quiet.elapsed() >= TIMEOUT / 2);
    }
}
