//! Writes of an HBONE connection, held back by one turn of the scheduler so the
//! frames its streams queue in that turn leave together.
//!
//! An HTTP/2 connection's task writes whenever it runs, and a stream that queues a
//! frame wakes it to run next on the same worker. With many streams busy at once,
//! that is one TLS record and one `writev` (and the peer's wakeup and read) per
//! frame. Yielding once before a batch's first write lets every stream that is
//! already runnable queue its frames first: one record and one syscall for all of
//! them. When nothing else is runnable, the yield costs a task poll and no syscall.

use std::{
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll, Wake, Waker},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An HBONE connection's transport whose writes wait one scheduler turn per batch.
pub struct BatchedWrites<T> {
    inner: T,
    batch: Batch,
    turn: Arc<Turn>,
}

enum Batch {
    /// Nothing written since the last flush.
    Idle,
    /// The batch's first write waits for its turn.
    Waiting,
    /// The turn came: writes go through until the batch is flushed.
    Writing,
}

/// The waker tokio defers to the end of the worker's turn: it marks the turn as
/// come, then wakes the connection's task. A stream waking that task earlier
/// must not end the wait, or the batch would be one or two frames again.
#[derive(Default)]
struct Turn {
    came: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Turn {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.came.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl<T> BatchedWrites<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            batch: Batch::Idle,
            turn: Arc::default(),
        }
    }

    /// Ready once this batch may write: after the worker has run the tasks that
    /// were ready when it began (or a bounded number of them).
    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *OFF.get_or_init(|| std::env::var_os("XXX_NO_BATCH").is_some()) {
            return Poll::Ready(());
        }
        match self.batch {
            Batch::Writing => return Poll::Ready(()),
            Batch::Waiting if self.turn.came.load(Ordering::Acquire) => {
                self.batch = Batch::Writing;
                return Poll::Ready(());
            }
            Batch::Waiting => {}
            Batch::Idle => {
                self.turn.came.store(false, Ordering::Release);
                // Polled once, tokio's yield hands its waker to the worker, which
                // wakes it when it next looks for I/O: once the tasks that are
                // ready have run, or every few dozen tasks. (A plain self-wake
                // would also wake an idle worker to steal the task: a futex and a
                // context switch per batch.)
                let waker = Waker::from(self.turn.clone());
                let yield_now = std::pin::pin!(tokio::task::yield_now());
                let _pending = yield_now.poll(&mut Context::from_waker(&waker));
                self.batch = Batch::Waiting;
            }
        }
        *self.turn.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        // The turn may have come between the check and storing the waker.
        if self.turn.came.load(Ordering::Acquire) {
            self.batch = Batch::Writing;
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BatchedWrites<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BatchedWrites<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_turn(cx));
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_turn(cx));
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.batch = Batch::Idle;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
