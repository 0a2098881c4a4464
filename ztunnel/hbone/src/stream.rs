//! One HBONE stream (an HTTP/2 CONNECT stream) as a byte stream, on `h2` directly.
//!
//! hyper's upgrade path gives each upgraded stream a task of its own and a channel:
//! every write is copied into a box, queued, and sent on by that task. Here the
//! relay's own task hands the bytes to h2: one task per proxied connection, not
//! two, and no extra hop per write.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use h2::{client::ResponseFuture, Reason, RecvStream, SendStream};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest header block a peer may send (hyper's bound, which HBONE had
/// before): a CONNECT's headers are a few hundred bytes.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// A CONNECT stream's two halves: reads are its DATA frames, writes become DATA
/// frames within the peer's flow-control window; shutdown ends the stream
/// (END_STREAM), and dropping it resets the stream if it is not done.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: Incoming,
    /// The rest of the last DATA frame read.
    buf: Bytes,
    /// END_STREAM sent.
    shut: bool,
}

/// What a stream reads from: the peer's DATA frames, or first (a client's
/// CONNECT sent without waiting) the response that opens them.
enum Incoming {
    Response(ResponseFuture),
    Body(RecvStream),
    /// The CONNECT was answered with anything but 200, or failed: nothing to read.
    Refused(Option<Refusal>),
}

/// Why a CONNECT sent without waiting for its response was not accepted.
#[derive(Debug)]
pub enum Refusal {
    /// The server answered with this status.
    Status(StatusCode),
    /// The request failed (reset, connection lost) before any answer.
    Request(h2::Error),
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv: Incoming::Body(recv),
            buf: Bytes::new(),
            shut: false,
        }
    }

    /// A client's CONNECT stream, usable before its response: writes go out at
    /// once (the server holds them, unread, until it has decided and answered
    /// 200), reads start once a 200 has come. Any other answer fails reads, and
    /// [`H2Stream::refusal`] says what it was. This saves the round trip a
    /// client would otherwise wait before sending its first bytes.
    pub fn awaiting_response(send: SendStream<Bytes>, response: ResponseFuture) -> Self {
        Self {
            send,
            recv: Incoming::Response(response),
            buf: Bytes::new(),
            shut: false,
        }
    }

    /// Why the CONNECT of an [`H2Stream::awaiting_response`] stream was not
    /// accepted, if it was not: its answer when known (one that has arrived is
    /// taken now, even if no read has looked at it yet), once.
    pub fn refusal(&mut self) -> Option<Refusal> {
        if let Incoming::Response(_) = self.recv {
            let waker = std::task::Waker::noop();
            let _ = self.poll_response(&mut Context::from_waker(waker));
        }
        match &mut self.recv {
            Incoming::Refused(refusal) => refusal.take(),
            _ => None,
        }
    }

    /// Waits for the answer to the CONNECT of an [`H2Stream::awaiting_response`]
    /// stream (at once for any other): Ok once it is 200, or why not.
    pub async fn answered(&mut self) -> Result<(), Refusal> {
        std::future::poll_fn(|cx| self.poll_response(cx)).await;
        match &mut self.recv {
            // Taken already by `refusal`: refused all the same.
            Incoming::Refused(refusal) => Err(refusal
                .take()
                .unwrap_or_else(|| Refusal::Request(Reason::REFUSED_STREAM.into()))),
            _ => Ok(()),
        }
    }

    /// Ready once the response (if any is awaited) has come: the stream's body
    /// is then readable, or the stream refused.
    fn poll_response(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Incoming::Response(response) = &mut self.recv else {
            return Poll::Ready(());
        };
        self.recv = match ready!(Pin::new(response).poll(cx)) {
            Ok(response) if response.status() == StatusCode::OK => {
                Incoming::Body(response.into_body())
            }
            Ok(response) => Incoming::Refused(Some(Refusal::Status(response.status()))),
            Err(e) => Incoming::Refused(Some(Refusal::Request(e))),
        };
        Poll::Ready(())
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_response(cx));
        let recv = match &mut this.recv {
            Incoming::Body(recv) => recv,
            Incoming::Refused(_) | Incoming::Response(_) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "HBONE CONNECT not accepted",
                )))
            }
        };
        while this.buf.is_empty() {
            match ready!(recv.poll_data(cx)) {
                // END_STREAM: end of file.
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => this.buf = data,
                Some(Err(e)) => {
                    return Poll::Ready(match e.reason() {
                        Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(()),
                        Some(Reason::STREAM_CLOSED) => {
                            Err(io::Error::new(io::ErrorKind::BrokenPipe, e))
                        }
                        _ => Err(into_io(e)),
                    })
                }
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() {
            // An empty slice still holds the connection's read buffer it was cut
            // from: let it go, so that an idle stream holds none.
            this.buf = Bytes::new();
        }
        let _ = recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        if let Poll::Ready(reset) = this.send.poll_reset(cx) {
            return Poll::Ready(Err(match reset {
                Ok(reason) => io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    format!("HBONE stream reset by the peer: {reason}"),
                ),
                Err(e) => into_io(e),
            }));
        }
        // Capacity is asked for only with bytes to send: an idle stream holds
        // none of the connection's window.
        this.send.reserve_capacity(buf.len());
        while this.send.capacity() == 0 {
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(into_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed",
                    )))
                }
            }
        }
        let n = this.send.capacity().min(buf.len());
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(into_io)?;
        Poll::Ready(Ok(n))
    }

    /// The connection's task writes what was sent.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.shut {
            this.shut = true;
            this.send.reserve_capacity(0);
            this.send.send_data(Bytes::new(), true).map_err(into_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// The error code of the GOAWAY this side's HTTP/2 library sent because the
/// peer broke the protocol or flooded it (`ENHANCE_YOUR_CALM`: rapid reset,
/// CONTINUATION floods), if that is how the connection ended.
pub fn goaway_sent(e: &h2::Error) -> Option<h2::Reason> {
    e.reason().filter(|_| e.is_go_away() && e.is_library())
}

fn into_io(e: h2::Error) -> io::Error {
    match e.is_io() {
        true => e.into_io().expect("an I/O error"),
        false => io::Error::other(e),
    }
}

/// Why a connection's keepalive gave up.
#[derive(Debug, thiserror::Error)]
pub enum KeepaliveError {
    #[error("no PING answer within {0:?}")]
    Timeout(Duration),
    #[error("PING: {0}")]
    Ping(h2::Error),
}

/// Pings the peer every `interval`; returns when an answer takes longer than
/// `timeout` (or pinging fails). Polled beside its connection, which carries the
/// PINGs: a dead peer's connection is closed, as hyper's keepalive did.
pub async fn keepalive(
    ping: Option<h2::PingPong>,
    interval: Duration,
    timeout: Duration,
) -> KeepaliveError {
    let Some(mut ping) = ping else {
        // Only taken once per connection; never reached.
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return KeepaliveError::Ping(e),
            Err(_) => return KeepaliveError::Timeout(timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The client side of a test CONNECT over `client`: its response to come,
    /// its stream.
    async fn send_connect(client: tokio::io::DuplexStream) -> (ResponseFuture, SendStream<Bytes>) {
        let (sender, connection) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(connection);
        let mut sender = sender.ready().await.unwrap();
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:8080")
            .body(())
            .unwrap();
        sender.send_request(request, false).unwrap()
    }

    /// A CONNECT stream over an in-memory HTTP/2 connection: (client's, server's).
    async fn pair() -> (H2Stream, H2Stream) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server).await.unwrap();
            let (req, mut respond) = connection.accept().await.unwrap().unwrap();
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            // Accepting drives the connection.
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            H2Stream::new(send, req.into_body())
        });
        let (response, send) = send_connect(client).await;
        let response = response.await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        (
            H2Stream::new(send, response.into_body()),
            server.await.unwrap(),
        )
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_beyond_the_window_and_a_half_close_ends_one_direction() {
        let (mut client, mut server) = pair().await;
        // 1 MiB: many times HTTP/2's default 64 KiB window, so the reader's
        // released capacity is what lets the writer go on.
        let request = pattern(1 << 20);
        let sent = request.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert!(received == request, "the server got other bytes");
        // The other direction still flows after the client's half-close.
        let mut client = writer.await.unwrap();
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply");
    }

    #[tokio::test]
    async fn a_writer_waits_for_the_peers_window_instead_of_buffering() {
        let (mut client, _server) = pair().await;
        // The server reads nothing: no more than its window may be taken.
        let big = pattern(4 << 20);
        let mut taken = 0;
        let write = async {
            loop {
                taken += client.write(&big[taken..]).await.unwrap();
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(300), write).await;
        assert!(
            taken <= 65_535,
            "{taken} bytes taken beyond the peer's 64 KiB window"
        );
    }

    /// A client's CONNECT sent without waiting, to a server that reads what came
    /// before it answers `status`: (client's stream, bytes the server had read
    /// when it answered).
    async fn early(status: http::StatusCode) -> (H2Stream, tokio::task::JoinHandle<Vec<u8>>) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server).await.unwrap();
            let (req, mut respond) = connection.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            // The client's bytes are there before any answer.
            let mut body = req.into_body();
            let data = body.data().await.unwrap().unwrap().to_vec();
            let response = http::Response::builder().status(status).body(()).unwrap();
            let done = status != http::StatusCode::OK;
            let send = respond.send_response(response, done).unwrap();
            if !done {
                let mut stream = H2Stream::new(send, body);
                stream.write_all(b"answer").await.unwrap();
                stream.shutdown().await.unwrap();
            }
            data
        });
        let (response, send) = send_connect(client).await;
        (H2Stream::awaiting_response(send, response), server)
    }

    #[tokio::test]
    async fn an_early_stream_sends_before_the_answer_and_reads_after_a_200() {
        let (mut client, server) = early(http::StatusCode::OK).await;
        client.write_all(b"first bytes").await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"answer");
        assert_eq!(server.await.unwrap(), b"first bytes");
        assert!(client.refusal().is_none());
    }

    #[tokio::test]
    async fn an_early_stream_refused_fails_its_reads_and_says_with_what_status() {
        let (mut client, server) = early(http::StatusCode::UNAUTHORIZED).await;
        client.write_all(b"never delivered").await.unwrap();
        let mut reply = Vec::new();
        let error = client.read_to_end(&mut reply).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
        assert!(reply.is_empty());
        server.await.unwrap();
        match client.refusal() {
            Some(Refusal::Status(status)) => assert_eq!(status, http::StatusCode::UNAUTHORIZED),
            other => panic!("{other:?}"),
        }
        assert!(client.refusal().is_none(), "said once");
    }

    #[tokio::test]
    async fn keepalive_gives_up_on_a_peer_that_never_answers() {
        // Nothing reads the other end: PINGs are never answered.
        let (client, _silent) = tokio::io::duplex(1 << 20);
        let (_sender, mut connection) = h2::client::handshake(client).await.unwrap();
        let ping = connection.ping_pong();
        let started = Instant::now();
        let outcome = tokio::select! {
            e = keepalive(ping, Duration::from_millis(20), Duration::from_millis(100)) => e,
            r = connection => panic!("the connection ended first: {r:?}"),
        };
        assert!(matches!(outcome, KeepaliveError::Timeout(_)), "{outcome}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
