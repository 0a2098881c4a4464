//! L7 stand-in applications for the waypoint's tests: one server per pod that
//! speaks HTTP/1.1 and HTTP/2 (h2c) — gRPC requests go to the Echo service
//! (tonic's generated server, on hyper), others are answered
//! `<pod> <HTTP version> <method> <path>` (and for `/headers` the values of
//! x-request-id and x-forwarded-proto; for `/conn` the connection's peer address,
//! as `conn=<ip:port>`; `/big?bytes=<n>` streams n bytes instead), after
//! `?delay=<ms>` when asked — and a gRPC client on one HTTP/2 connection.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::{Code, Status};

use crate::{app::EchoServer, Pod};

pub mod echo {
    tonic::include_proto!("testbed.echo");
}

use echo::{
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer as EchoService},
    EchoReply, EchoRequest,
};

/// The L7 server of one pod; stops when dropped.
pub struct L7Server {
    _inner: EchoServer,
    started: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl L7Server {
    /// Listens on 0.0.0.0:`port` in `pod`; returns once it listens.
    pub fn start(pod: &Pod, port: u16) -> Result<Self> {
        let started = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (count, ended) = (started.clone(), closed.clone());
        Ok(Self {
            _inner: EchoServer::serve(pod, port, move |stream, pod| {
                let (count, ended) = (count.clone(), ended.clone());
                async move {
                    serve(stream, pod, count).await;
                    ended.fetch_add(1, Ordering::AcqRel);
                }
            })?,
            started,
            closed,
        })
    }

    /// Connections that have ended so far.
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::Acquire)
    }

    /// Requests received so far (answered or not).
    pub fn started(&self) -> usize {
        self.started.load(Ordering::Acquire)
    }
}

async fn serve(stream: tokio::net::TcpStream, pod: String, started: Arc<AtomicUsize>) {
    let grpc = EchoService::new(Replies { pod: pod.clone() });
    let peer = stream
        .peer_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string());
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let (grpc, pod, peer) = (grpc.clone(), pod.clone(), peer.clone());
        started.fetch_add(1, Ordering::AcqRel);
        async move {
            let is_grpc = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            if is_grpc {
                use tonic::codegen::Service;
                return grpc.clone().call(req).await;
            }
            if req.headers().contains_key(http::header::UPGRADE) {
                return Ok(switch_protocols(req, pod));
            }
            // `/upload`: answered only once the whole request body is in, with
            // its length and digest.
            let (parts, body) = req.into_parts();
            let mut received = None;
            if parts.uri.path() == "/upload" {
                use http_body_util::BodyExt;
                match body.collect().await {
                    Ok(body) => received = Some(body.to_bytes()),
                    Err(_) => {
                        return Ok(http::Response::builder()
                            .status(400)
                            .body(tonic::body::Body::empty())
                            .expect("a valid response"))
                    }
                }
            }
            let req = http::Request::from_parts(parts, ());
            let delay = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("delay="))
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(0);
            // Only when asked: tokio rounds a timer up to its next millisecond, so
            // even a zero sleep would hold every answer for up to 1 ms.
            if delay > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            }
            let mut body = format!(
                "{pod} {:?} {} {}",
                req.version(),
                req.method(),
                req.uri().path()
            );
            if let Some(bytes) = received {
                body.push_str(&format!(
                    " bytes={} digest={:016x}",
                    bytes.len(),
                    digest(&bytes)
                ));
            }
            if req.uri().path() == "/big" {
                let bytes: usize = req
                    .uri()
                    .query()
                    .and_then(|q| q.strip_prefix("bytes="))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                return Ok(http::Response::new(tonic::body::Body::new(big(bytes))));
            }
            if req.uri().path() == "/conn" {
                body.push_str(&format!(" conn={peer}"));
            }
            if req.uri().path() == "/headers" {
                for name in ["x-request-id", "forwarded", "x-forwarded-proto"] {
                    let value = req.headers().get(name).and_then(|v| v.to_str().ok());
                    body.push_str(&format!(" {name}={}", value.unwrap_or("none")));
                }
            }
            Ok(http::Response::new(tonic::body::Body::new(Full::new(
                Bytes::from(body),
            ))))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Room for the headers a proxy adds to a request at its own limit (hyper's
    // default is 100, like the waypoint's).
    builder.http1().max_headers(200);
    let _ = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}

/// A body of `bytes` bytes, made as it is read.
fn big(
    bytes: usize,
) -> http_body_util::StreamBody<
    impl futures_util::Stream<Item = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
> {
    const CHUNK: usize = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let chunks = (0..bytes.div_ceil(CHUNK)).map(move |i| {
        Ok(hyper::body::Frame::data(
            chunk.slice(..CHUNK.min(bytes - i * CHUNK)),
        ))
    });
    http_body_util::StreamBody::new(futures_util::stream::iter(chunks))
}

/// A digest of a body (FNV-1a), to tell it arrived whole and unchanged.
pub fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// The body `tb-probe post` sends: `len` bytes of a pattern.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// Agrees to any `upgrade` (as a WebSocket server would), then answers each
/// chunk read with `<pod>:<chunk>`.
fn switch_protocols(
    mut req: http::Request<Incoming>,
    pod: String,
) -> http::Response<tonic::body::Body> {
    let protocol = req.headers()[http::header::UPGRADE].clone();
    let upgraded = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(upgraded) = upgraded.await else { return };
        let mut io = TokioIo::new(upgraded);
        let mut buf = vec![0u8; 4096];
        while let Ok(n @ 1..) = io.read(&mut buf).await {
            let mut reply = format!("{pod}:").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            if io.write_all(&reply).await.is_err() {
                return;
            }
        }
    });
    let mut response = http::Response::new(tonic::body::Body::empty());
    *response.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    response
        .headers_mut()
        .insert(http::header::UPGRADE, protocol);
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    response
}

struct Replies {
    pod: String,
}

impl Replies {
    fn reply(&self, request: &EchoRequest, index: u32) -> EchoReply {
        EchoReply {
            message: request.message.clone(),
            pod: self.pod.clone(),
            index,
        }
    }
}

fn asked_status(code: i32) -> Option<Status> {
    (code != 0).then(|| Status::new(Code::from(code), format!("the client asked for {code}")))
}

type Replying = Pin<Box<dyn futures_util::Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Replies {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        let request = request.into_inner();
        match asked_status(request.code) {
            Some(status) => Err(status),
            None => Ok(tonic::Response::new(self.reply(&request, 0))),
        }
    }

    type StreamStream = Replying;

    async fn stream(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<Replying>, Status> {
        let request = request.into_inner();
        let mut items: Vec<Result<EchoReply, Status>> = (0..request.count)
            .map(|i| Ok(self.reply(&request, i)))
            .collect();
        // After the messages: the status travels in trailers.
        items.extend(asked_status(request.code).map(Err));
        Ok(tonic::Response::new(Box::pin(futures_util::stream::iter(
            items,
        ))))
    }
}

/// One HTTP/2 connection, as the service tonic's client calls.
#[derive(Clone)]
pub struct Channel(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

/// An Echo client over one HTTP/2 (h2c) connection to `addr`.
pub async fn client(addr: SocketAddr) -> Result<EchoClient<Channel>> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .context("HTTP/2 handshake")?;
    tokio::spawn(connection);
    Ok(EchoClient::with_origin(
        Channel(sender),
        format!("http://{addr}").parse()?,
    ))
}

/// HTTP/2 on the wire, for the attacks a library client does not make: a preface
/// and no request, a header block never finished.
pub mod raw_h2 {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    /// RST_STREAM's error code for a stream no longer wanted.
    pub const CANCEL: u32 = 0x8;
    pub const END_HEADERS: u8 = 0x4;
    const ACK: u8 = 0x1;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    }

    /// The preface, then an empty SETTINGS frame.
    pub fn start() -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[]));
        out
    }

    /// A GET's HEADERS frame (HPACK: static-table method and scheme, literal
    /// authority and path, nothing indexed); without END_HEADERS when `finished`
    /// is false (the block would go on in CONTINUATION frames).
    pub fn get(stream: u32, authority: &str, path: &str, finished: bool) -> Vec<u8> {
        let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
        for (index, value) in [(1u8, authority), (4, path)] {
            block.push(index); // literal without indexing, indexed name
            block.push(value.len() as u8);
            block.extend(value.as_bytes());
        }
        let flags = END_STREAM | if finished { END_HEADERS } else { 0 };
        frame(HEADERS, flags, stream, &block)
    }

    /// HTTP/2 rapid reset (CVE-2023-44487): `n` GETs, each cancelled
    /// (RST_STREAM) at once.
    pub fn rapid_reset(authority: &str, n: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for stream in (1..2 * n).step_by(2) {
            out.extend(get(stream, authority, "/reset", true));
            out.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
        }
        out
    }

    /// What a connection sent until it closed.
    #[derive(Debug, Default)]
    pub struct Seen {
        /// Each frame as `<type>:<stream>`.
        pub frames: Vec<String>,
        /// The error code of the first GOAWAY, and when it came.
        pub goaway: Option<u32>,
        pub goaway_after: Option<Duration>,
        /// When the peer closed, from the call; None: still open at `limit`.
        pub closed_after: Option<Duration>,
    }

    /// Reads frames until the peer closes (or `limit` passes); when `answer`,
    /// acknowledges its SETTINGS and PINGs as any client does (a client in the
    /// middle of a header block may send nothing else).
    pub async fn read_until_closed<S: AsyncRead + AsyncWrite + Unpin>(
        io: &mut S,
        limit: Duration,
        answer: bool,
    ) -> Seen {
        let started = Instant::now();
        let mut seen = Seen::default();
        let read = async {
            loop {
                let mut head = [0u8; 9];
                if io.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let (kind, flags) = (head[3], head[4]);
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & !(1 << 31);
                let mut payload = vec![0u8; len];
                if io.read_exact(&mut payload).await.is_err() {
                    return;
                }
                seen.frames.push(format!("{kind}:{stream}"));
                let answer_frame = match kind {
                    GOAWAY if len >= 8 && seen.goaway.is_none() => {
                        seen.goaway = Some(u32::from_be_bytes([
                            payload[4], payload[5], payload[6], payload[7],
                        ]));
                        seen.goaway_after = Some(started.elapsed());
                        None
                    }
                    SETTINGS if flags & ACK == 0 => Some(frame(SETTINGS, ACK, 0, &[])),
                    PING if flags & ACK == 0 => Some(frame(PING, ACK, 0, &payload)),
                    _ => None,
                };
                if let (true, Some(frame)) = (answer, answer_frame) {
                    let _ = io.write_all(&frame).await;
                }
            }
        };
        if tokio::time::timeout(limit, read).await.is_ok() {
            seen.closed_after = Some(started.elapsed());
        }
        seen
    }
}
