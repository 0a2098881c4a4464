//! Premature resets on one downstream connection: requests the client cancels
//! before their answer, soon after it sent them. Each costs the waypoint a
//! policy decision and an upstream stream while costing the client two frames,
//! and the HTTP/2 library's own guard only counts streams reset before they are
//! taken up (rapid reset, CVE-2023-44487, paced just slower than that). As
//! Envoy's `premature_reset_*` limits: a connection is closed once half of
//! `JUDGED_AFTER` requests ended that way, or, past that many requests, once
//! half of them did.

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// A request cancelled within this time of its start is premature (Envoy's
/// `premature_reset_min_stream_lifetime_seconds`).
const MIN_LIFETIME: Duration = Duration::from_secs(1);

/// Requests after which the share of premature ones is judged; half this many
/// trip it sooner (Envoy's `premature_reset_total_stream_count`).
const JUDGED_AFTER: u32 = 500;

/// The requests of one connection, as they end.
#[derive(Default)]
pub struct Resets {
    ended: AtomicU32,
    premature: AtomicU32,
    /// Told once, when the connection should be closed.
    tripped: Notify,
}

impl Resets {
    /// One request begins: it counts as premature if dropped unanswered soon.
    pub fn begin(&self) -> Request<'_> {
        Request {
            resets: self,
            started: Instant::now(),
            answered: false,
        }
    }

    /// Resolves once the connection's client has cancelled too many of its
    /// requests, with how many of how many.
    pub async fn tripped(&self) -> (u32, u32) {
        self.tripped.notified().await;
        (
            self.premature.load(Ordering::Relaxed),
            self.ended.load(Ordering::Relaxed),
        )
    }

    fn ended(&self, premature: bool) {
        let ended = self.ended.fetch_add(1, Ordering::Relaxed) + 1;
        let cancelled = match premature {
            true => self.premature.fetch_add(1, Ordering::Relaxed) + 1,
            false => self.premature.load(Ordering::Relaxed),
        };
        let limit = ended.max(JUDGED_AFTER);
        // `notify_one` keeps its permit for the waiting loop.
        if premature && cancelled * 2 >= limit {
            self.tripped.notify_one();
        }
    }
}

/// One request in flight; dropped without [`Request::answered`] it was cancelled.
pub struct Request<'a> {
    resets: &'a Resets,
    started: Instant,
    answered: bool,
}

impl Request<'_> {
    /// The request has its response (its status, at least).
    pub fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        let premature = !self.answered && self.started.elapsed() < MIN_LIFETIME;
        self.resets.ended(premature);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cancel(resets: &Resets, n: u32) {
        (0..n).for_each(|_| drop(resets.begin()));
    }

    fn answer(resets: &Resets, n: u32) {
        (0..n).for_each(|_| resets.begin().answered());
    }

    fn is_tripped(resets: &Resets) -> bool {
        let tripped = std::pin::pin!(resets.tripped());
        futures_util::FutureExt::now_or_never(tripped).is_some()
    }

    #[test]
    fn half_the_judged_count_cancelled_trips_at_once() {
        let resets = Resets::default();
        answer(&resets, 10);
        cancel(&resets, JUDGED_AFTER / 2 - 1);
        assert!(!is_tripped(&resets));
        cancel(&resets, 1);
        assert!(is_tripped(&resets));
    }

    #[test]
    fn past_the_judged_count_half_cancelled_trips() {
        let resets = Resets::default();
        answer(&resets, 5_000);
        cancel(&resets, 4_999);
        assert!(!is_tripped(&resets), "under half");
        cancel(&resets, 1);
        assert!(is_tripped(&resets), "half");
    }

    #[test]
    fn a_client_that_answers_more_than_it_cancels_never_trips() {
        let resets = Resets::default();
        for _ in 0..10_000 {
            answer(&resets, 2);
            cancel(&resets, 1);
        }
        assert!(!is_tripped(&resets));
    }

    #[test]
    fn a_request_cancelled_after_its_min_lifetime_is_not_premature() {
        let resets = Resets::default();
        for _ in 0..JUDGED_AFTER {
            let mut request = resets.begin();
            request.started -= MIN_LIFETIME;
            drop(request);
        }
        assert!(!is_tripped(&resets));
        assert_eq!(resets.premature.load(Ordering::Relaxed), 0);
    }
}
