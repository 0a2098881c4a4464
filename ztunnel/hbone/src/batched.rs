//! Writes of an HBONE connection, held back by one turn of the scheduler so the
//! frames its streams queue in that turn leave together.
//!
//! An HTTP/2 connection's task writes whenever it runs, and a stream that queues a
//! frame wakes it to run next on the same worker. With many streams busy at once,
//! that is one TLS record and one `writev` (and the peer's wakeup and read) per
//! frame. Yielding once before a batch's first write lets every stream that is
//! already runnable queue its frames first: one record and one syscall for all of
//! them. When nothing else is runnable, the wait costs a poll of the connection
//! and the worker's non-blocking look for I/O (one `epoll_wait`).

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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use tokio::io::DuplexStream;

    use super::*;

    /// Counts the writes that reach the transport.
    struct Counted {
        inner: DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let written = Pin::new(&mut self.inner).poll_write(cx, buf);
            if let Poll::Ready(Ok(_)) = written {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            written
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    // One worker, as under load: a stream's task that queues a frame wakes the
    // connection's task to run right after it (tokio's LIFO slot), so unbatched,
    // each stream's frame is a write of its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn frames_that_streams_queue_in_one_turn_leave_in_one_write() {
        const STREAMS: usize = 16;
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(AtomicUsize::new(0));
        let client_io = BatchedWrites::new(Counted {
            inner: client_io,
            writes: writes.clone(),
        });
        // The server counts the DATA frames that arrive, on all streams.
        let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut server = h2::server::handshake(server_io).await.unwrap();
            while let Some(Ok((request, _respond))) = server.accept().await {
                let arrived = arrived_tx.clone();
                tokio::spawn(async move {
                    let mut body = request.into_body();
                    arrived.send(()).unwrap();
                    while let Some(Ok(data)) = body.data().await {
                        let _ = body.flow_control().release_capacity(data.len());
                        arrived.send(()).unwrap();
                    }
                });
            }
        });
        let (client, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let go = Arc::new(tokio::sync::Barrier::new(STREAMS + 1));
        for _ in 0..STREAMS {
            let mut client = client.clone().ready().await.unwrap();
            let request = http::Request::post("http://test/").body(()).unwrap();
            let (_response, mut send) = client.send_request(request, false).unwrap();
            let go = go.clone();
            tokio::spawn(async move {
                go.wait().await;
                send.send_data(Bytes::from_static(b"x"), false).unwrap();
                // Kept open: the server reads until the test ends.
                std::future::pending::<()>().await;
            });
        }
        for _ in 0..STREAMS {
            arrived.recv().await.expect("each stream's headers arrive");
        }
        let before = writes.load(Ordering::Relaxed);
        go.wait().await;
        for _ in 0..STREAMS {
            arrived.recv().await.expect("each stream's frame arrives");
        }
        let frames_writes = writes.load(Ordering::Relaxed) - before;
        assert!(
            frames_writes <= 2,
            "{STREAMS} streams' frames queued in one turn took {frames_writes} writes"
        );
    }
}
