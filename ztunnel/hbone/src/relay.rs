//! Relaying a connection's bytes both ways, with memory only where bytes wait.
//!
//! Each read lands in a buffer on the polling thread's stack and is written on at
//! once; only what the writer does not take then is copied to the heap, and that
//! copy is freed as soon as it is written. An idle connection (most of them, on a
//! busy node) therefore holds no buffer at all, and a bulk one holds at most one
//! read's worth per direction while its writer lags. (A fixed pair of 64 KiB
//! buffers per connection cost 1.3 GiB for 10,000 idle connections.)

use std::{
    future::poll_fn,
    io,
    mem::MaybeUninit,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most one read takes: large enough for bulk throughput. It lives on the
/// stack during a poll, never in the connection.
const READ_SIZE: usize = 64 * 1024;

/// Relays both ways until both sides are done; returns (client→server,
/// server→client). An end-of-stream from one side is passed on as a shutdown of
/// the other's write side (half-close) while the other direction carries on.
pub async fn relay<A, B>(client: &mut A, server: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut relay = Relay::default();
    poll_fn(|cx| relay.poll(cx, client, server)).await
}

/// Both directions of one connection.
#[derive(Default)]
struct Relay {
    to_server: Half,
    to_client: Half,
}

impl Relay {
    fn poll<A, B>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut A,
        server: &mut B,
    ) -> Poll<io::Result<(u64, u64)>>
    where
        A: AsyncRead + AsyncWrite + Unpin + ?Sized,
        B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        let up = self.to_server.poll(cx, client, server)?;
        let down = self.to_client.poll(cx, server, client)?;
        Poll::Ready(Ok((ready!(up), ready!(down))))
    }
}

/// One direction: reader → writer.
#[derive(Default)]
struct Half {
    /// Bytes read but not yet taken by the writer; allocated only while it lags.
    pending: Vec<u8>,
    /// How much of `pending` is written.
    written: usize,
    /// The writer took bytes it may hold until flushed.
    need_flush: bool,
    /// The reader ended (EOF).
    read_done: bool,
    /// The writer is shut down: this direction is finished.
    done: bool,
    /// Bytes written.
    amount: u64,
}

impl Half {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        let mut writer = Pin::new(writer);
        loop {
            if self.done {
                return Poll::Ready(Ok(self.amount));
            }
            // One unit of the task's budget per round, as tokio's own copy: a
            // connection that always has bytes still lets other tasks run.
            let coop = ready!(tokio::task::coop::poll_proceed(cx));
            while self.written < self.pending.len() {
                let n = ready!(writer
                    .as_mut()
                    .poll_write(cx, &self.pending[self.written..]))?;
                self.wrote(n)?;
                self.written += n;
                coop.made_progress();
            }
            // Written: give the memory back.
            self.pending = Vec::new();
            self.written = 0;
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                coop.made_progress();
                continue;
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); READ_SIZE];
            let mut buf = ReadBuf::uninit(&mut stack);
            match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                Poll::Pending => {
                    // Nothing more to send now: what the writer holds must go out.
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(result) => result?,
            }
            coop.made_progress();
            let data = buf.filled();
            if data.is_empty() {
                self.read_done = true;
                continue;
            }
            let mut sent = 0;
            while sent < data.len() {
                match writer.as_mut().poll_write(cx, &data[sent..]) {
                    Poll::Ready(n) => {
                        let n = n?;
                        self.wrote(n)?;
                        sent += n;
                    }
                    // The writer lags: keep the rest until it takes more.
                    Poll::Pending => {
                        self.pending = data[sent..].to_vec();
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    /// Counts `n` bytes the writer took.
    fn wrote(&mut self, n: usize) -> io::Result<()> {
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the writer took no byte",
            ));
        }
        self.amount += n as u64;
        self.need_flush = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// A relay between two in-memory connections of `capacity` bytes each way:
    /// (the client's end, the server's end, the relay's result).
    fn relayed(
        capacity: usize,
    ) -> (
        DuplexStream,
        DuplexStream,
        tokio::task::JoinHandle<io::Result<(u64, u64)>>,
    ) {
        let (client, mut client_side) = duplex(capacity);
        let (mut server_side, server) = duplex(capacity);
        let task = tokio::spawn(async move { relay(&mut client_side, &mut server_side).await });
        (client, server, task)
    }

    /// Deterministic bytes that differ by position and seed.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    #[tokio::test]
    async fn a_client_half_close_reaches_the_server_and_its_reply_still_flows() {
        let (mut client, mut server, relay) = relayed(1024);
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut request = Vec::new();
        server.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"request", "EOF passed on after the request");
        server.write_all(b"a longer reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"a longer reply");
        assert_eq!(relay.await.unwrap().unwrap(), (7, 14));
    }

    #[tokio::test]
    async fn a_server_half_close_reaches_the_client_which_can_still_send() {
        let (mut client, mut server, relay) = relayed(1024);
        server.write_all(b"banner").await.unwrap();
        server.shutdown().await.unwrap();
        let mut banner = Vec::new();
        client.read_to_end(&mut banner).await.unwrap();
        assert_eq!(banner, b"banner");
        client.write_all(b"after the server closed").await.unwrap();
        client.shutdown().await.unwrap();
        let mut late = Vec::new();
        server.read_to_end(&mut late).await.unwrap();
        assert_eq!(late, b"after the server closed");
        assert_eq!(relay.await.unwrap().unwrap(), (23, 6));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_transfer_both_ways_arrives_intact_and_is_counted() {
        // Small pipes: the writer lags all the time, so the relay keeps and
        // resends partial reads.
        let (client, server, relay) = relayed(3000);
        let up = pattern(8 << 20, 1);
        let down = pattern(5 << 20, 2);
        let send_and_receive = |mut end: DuplexStream, data: Vec<u8>| async move {
            let (mut reader, mut writer) = tokio::io::split(&mut end);
            let write = async {
                writer.write_all(&data).await.unwrap();
                writer.shutdown().await.unwrap();
            };
            let mut received = Vec::new();
            let read = reader.read_to_end(&mut received);
            let (_, read) = tokio::join!(write, read);
            read.unwrap();
            received
        };
        let (at_server, at_client) = tokio::join!(
            tokio::spawn(send_and_receive(server, down.clone())),
            tokio::spawn(send_and_receive(client, up.clone())),
        );
        assert!(at_server.unwrap() == up, "client → server intact");
        assert!(at_client.unwrap() == down, "server → client intact");
        assert_eq!(
            relay.await.unwrap().unwrap(),
            (up.len() as u64, down.len() as u64)
        );
    }

    #[tokio::test]
    async fn a_peer_that_never_reads_stalls_only_its_own_direction() {
        let (mut client, mut server, relay) = relayed(4096);
        // The server never reads: the client can get no more into the relay than
        // the two pipes and one read held for the server.
        let flood = pattern(4 << 20, 3);
        let mut pushed = 0;
        while pushed < flood.len() {
            let write = client.write(&flood[pushed..]);
            match tokio::time::timeout(Duration::from_millis(200), write).await {
                Ok(n) => pushed += n.unwrap(),
                Err(_) => break,
            }
        }
        assert!(
            pushed <= 2 * 4096 + READ_SIZE,
            "{pushed} bytes taken from a client whose server never reads"
        );
        // The other way is not held up.
        server.write_all(b"still talking").await.unwrap();
        let mut reply = [0u8; 13];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"still talking");
        relay.abort();
    }

    #[tokio::test]
    async fn a_connection_holds_a_buffer_only_while_its_writer_lags() {
        let (mut client, mut client_side) = duplex(8192);
        let (mut server_side, mut server) = duplex(1000);
        let mut relay = Relay::default();
        let mut poll = |relay: &mut Relay| {
            let waker = std::task::Waker::noop();
            let result = relay.poll(
                &mut Context::from_waker(waker),
                &mut client_side,
                &mut server_side,
            );
            assert!(result.is_pending());
        };
        // Idle: no buffer, and none in the relay's own state either.
        poll(&mut relay);
        assert_eq!(relay.to_server.pending.capacity(), 0);
        assert!(std::mem::size_of::<Relay>() < 256);
        // 3000 bytes into a 1024-byte pipe: the rest waits in the relay.
        client.write_all(&pattern(3000, 4)).await.unwrap();
        poll(&mut relay);
        assert_eq!(
            relay.to_server.pending.len() - relay.to_server.written,
            2000
        );
        // The server reads: written on, and the memory given back.
        let mut received = vec![0u8; 3000];
        for chunk in received.chunks_mut(1000) {
            server.read_exact(chunk).await.unwrap();
            poll(&mut relay);
        }
        assert_eq!(received, pattern(3000, 4));
        assert_eq!(relay.to_server.pending.capacity(), 0);
        assert_eq!(relay.to_server.amount, 3000);
    }
}
