//! One drain signal per process. Every server and long-lived task holds a clone of
//! the process's [`Drain`]: on SIGTERM the binary calls [`Drain::drain`], servers
//! stop accepting, connections close gracefully once their work is done, and the
//! process waits for the work tracked here, at most a grace period.

use std::{future::Future, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

#[derive(Clone, Default)]
pub struct Drain {
    signal: CancellationToken,
    work: TaskTracker,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Completes once draining has begun: stop accepting, finish what is open.
    pub async fn signaled(&self) {
        self.signal.cancelled().await
    }

    pub fn is_draining(&self) -> bool {
        self.signal.is_cancelled()
    }

    /// Runs work (a connection, a request) that draining waits for.
    pub fn spawn<F>(&self, work: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.work.spawn(work)
    }

    /// The tracked work, for code that spawns through a [`TaskTracker`].
    pub fn tracker(&self) -> &TaskTracker {
        &self.work
    }

    /// How much tracked work is still running.
    pub fn in_flight(&self) -> usize {
        self.work.len()
    }

    /// Signals every holder, then waits up to `grace` for the tracked work.
    /// Returns how much was still running at the deadline (0: all finished).
    pub async fn drain(&self, grace: Duration) -> usize {
        self.signal.cancel();
        self.work.close();
        match tokio::time::timeout(grace, self.work.wait()).await {
            Ok(()) => 0,
            Err(_) => self.work.len(),
        }
    }
}

/// Waits for SIGTERM (or Ctrl-C), then drains within `grace`, logging what it does.
/// What the binaries run as their last step.
pub async fn on_sigterm(drain: &Drain, grace: Duration, what: &str) {
    crate::shutdown_signal().await;
    tracing::info!(
        in_flight = drain.in_flight(),
        ?grace,
        "{what} draining: no new connections, open ones may finish"
    );
    match drain.drain(grace).await {
        0 => tracing::info!("{what} drained"),
        cut => tracing::warn!(
            cut,
            "{what}: still open at the end of the grace period, closed"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_work_in_flight_and_cuts_it_at_the_deadline() {
        let drain = Drain::new();
        let holder = drain.clone();
        drain.spawn(async move {
            holder.signaled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        assert_eq!(drain.drain(Duration::from_secs(5)).await, 0);
        assert!(drain.is_draining());

        let drain = Drain::new();
        drain.spawn(std::future::pending::<()>());
        assert_eq!(drain.drain(Duration::from_millis(20)).await, 1);
    }
}
