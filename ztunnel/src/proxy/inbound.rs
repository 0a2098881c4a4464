//! Inbound: HBONE (mTLS + HTTP/2 CONNECT) and plaintext connections to an enrolled
//! pod, delivered to the application from inside the pod.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use ztunnel_hbone::stream::{keepalive, H2Stream};

use super::{active::Registration, relay, Context, Error, Record};
use crate::{
    accept::{Acceptor, Conn},
    identity::Identity,
    orig_src::Delivery,
    policy::Connection,
    redirect::is_tunnel_port,
    state::Workload,
    tls,
};

const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve_hbone(
    ctx: Arc<Context>,
    pod: Arc<Workload>,
    acceptor: Acceptor,
    delivery: Delivery,
) {
    let tls = Arc::new(ServerTls::default());
    loop {
        let (tcp, peer) = acceptor.accept().await;
        if let Err(why) = arrived_for_the_pod(&tcp, &pod) {
            tracing::warn!(pod = %pod.name, %peer, "HBONE refused: {why}");
            continue;
        }
        // (The acceptor has set no delay.) Everything else in the connection's
        // own task: a slow CA holds only the connections waiting for the
        // certificate (within the handshake timeout), never the accept loop.
        let (ctx2, pod, delivery, tls) = (ctx.clone(), pod.clone(), delivery.clone(), tls.clone());
        ctx.drain.spawn(async move {
            let metrics = ctx2.hbone_protocol_errors.clone();
            if let Err(e) = hbone_connection(ctx2, pod.clone(), &tls, tcp, peer, delivery).await {
                match e.goaway_sent() {
                    // A peer with a valid certificate that breaks HTTP/2 or floods
                    // it (rapid reset): worth a warning, and counted.
                    Some(reason) => {
                        tracing::warn!(pod = %pod.name, %peer, "HBONE connection closed: the peer broke HTTP/2 ({reason:?}): {e}");
                        metrics
                            .get_or_create(&ProtocolErrorLabels {
                                reason: format!("{reason:?}"),
                            })
                            .inc();
                    }
                    None => tracing::debug!(pod = %pod.name, %peer, "HBONE connection: {e}"),
                }
            }
        });
    }
}

/// The TLS config for a pod's current certificate, rebuilt when it rotates.
#[derive(Default)]
struct ServerTls(std::sync::Mutex<Option<(String, TlsAcceptor)>>);

impl ServerTls {
    async fn acceptor(&self, ctx: &Context, pod: &Workload) -> std::io::Result<TlsAcceptor> {
        // Fail closed: no certificate, no connection.
        let cert = ctx.certs.fetch(&pod.identity).await.map_err(|e| {
            tracing::warn!(pod = %pod.name, "HBONE refused: {e:#}");
            std::io::Error::other(format!("no certificate: {e:#}"))
        })?;
        let mut current = self.0.lock().expect("not poisoned");
        if let Some((serial, acceptor)) = &*current {
            if *serial == cert.info.serial {
                return Ok(acceptor.clone());
            }
        }
        let config = cert.server_config().map_err(|e| {
            tracing::warn!(pod = %pod.name, "HBONE: TLS config: {e:#}");
            std::io::Error::other(format!("TLS config: {e:#}"))
        })?;
        let acceptor = TlsAcceptor::from(config);
        *current = Some((cert.info.serial.clone(), acceptor.clone()));
        Ok(acceptor)
    }
}

/// Why an HBONE connection ended in error (logged at debug: the peer's trouble;
/// each CONNECT on it is counted by itself).
#[derive(Debug, thiserror::Error)]
enum HboneConnectionError {
    #[error("mTLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("HTTP/2: {0}")]
    Http2(h2::Error),
    #[error("HTTP/2 keepalive: {0}")]
    Keepalive(ztunnel_hbone::stream::KeepaliveError),
}

impl HboneConnectionError {
    /// The error code of the GOAWAY sent because the peer broke HTTP/2, if that
    /// ended the connection.
    fn goaway_sent(&self) -> Option<h2::Reason> {
        match self {
            HboneConnectionError::Http2(e) => ztunnel_hbone::stream::goaway_sent(e),
            _ => None,
        }
    }
}

/// Inbound HBONE connections closed because the peer broke HTTP/2, by the
/// GOAWAY's error code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ProtocolErrorLabels {
    pub reason: String,
}

async fn hbone_connection(
    ctx: Arc<Context>,
    pod: Arc<Workload>,
    server_tls: &ServerTls,
    tcp: Conn,
    peer: SocketAddr,
    delivery: Delivery,
) -> Result<(), HboneConnectionError> {
    // The certificate's wait counts in the handshake's time.
    let tls = tcp
        .handshake()
        .run(async {
            let acceptor = server_tls.acceptor(&ctx, &pod).await?;
            acceptor.accept(tcp).await
        })
        .await
        .map_err(HboneConnectionError::Handshake)?;
    let peer_identity = tls::peer_identity(tls.get_ref().1.peer_certificates())?;
    // Once per pooled connection: where HBONE comes from (a source pod's own
    // address, from tunnels that dial inside the pod as Istio's does).
    tracing::info!(target: "hbone", pod = %pod.name, %peer, identity = %peer_identity, "HBONE connection accepted");
    let settings = &ctx.hbone;
    let mut connection = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_concurrent_streams(settings.max_streams_per_connection as u32)
        .max_header_list_size(ztunnel_hbone::stream::MAX_HEADER_LIST_SIZE)
        .handshake::<_, Bytes>(ztunnel_hbone::batched::BatchedWrites::new(tls))
        .await
        .map_err(HboneConnectionError::Http2)?;
    let keepalive = keepalive(
        connection.ping_pong(),
        settings.keepalive_interval,
        settings.keepalive_timeout,
    );
    tokio::pin!(keepalive);
    let drained = ctx.drain.clone();
    let drained = drained.signaled();
    tokio::pin!(drained);
    let mut draining = false;
    // Accepting drives the connection (every stream's frames); each stream is
    // served in its own task.
    loop {
        let (req, respond) = tokio::select! {
            accepted = connection.accept() => match accepted {
                None => return Ok(()),
                Some(accepted) => accepted.map_err(HboneConnectionError::Http2)?,
            },
            e = &mut keepalive => return Err(HboneConnectionError::Keepalive(e)),
            // Draining: GOAWAY, so that the peer opens no more streams here and
            // dials afresh; the open ones finish within the grace period.
            _ = &mut drained, if !draining => {
                draining = true;
                connection.graceful_shutdown();
                continue;
            }
        };
        let (ctx, pod, peer_identity) = (ctx.clone(), pod.clone(), peer_identity.clone());
        let delivery = delivery.clone();
        ctx.drain.clone().spawn(async move {
            stream(ctx, pod, peer_identity, peer, req, respond, delivery).await;
        });
    }
}

fn status(code: StatusCode) -> Response<()> {
    Response::builder()
        .status(code)
        .body(())
        .expect("a valid response")
}

/// One CONNECT stream: answered 200 only once the application accepted, then
/// relayed until both sides are done or a policy change denies it.
async fn stream(
    ctx: Arc<Context>,
    pod: Arc<Workload>,
    peer_identity: Identity,
    peer: SocketAddr,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    delivery: Delivery,
) {
    // Boxed: deciding and reaching the application take more state than
    // relaying, and an idle connection's task need not keep room for them.
    let opened = tokio::select! {
        opened = Box::pin(connect(&ctx, &pod, peer_identity, peer, &req, &delivery)) => opened,
        // Cancelled by the peer: stop dialing. A cancelled stream frees its
        // place under the connection's stream limit at once, so CONNECTs
        // cancelled while the application is slow to accept must not leave
        // dials (and their sockets) running behind it.
        reset = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            // A RST_STREAM from the peer, or the connection gone (either way the
            // stream can no longer be answered).
            return tracing::debug!(pod = %pod.name, %peer, "CONNECT ended before the application answered (reset: {reset:?})");
        }
    };
    let (record, registration, mut app) = match opened {
        Ok(opened) => opened,
        Err(code) => {
            let _ = respond.send_response(status(code), true);
            return;
        }
    };
    let send = match respond.send_response(status(StatusCode::OK), false) {
        Ok(send) => send,
        Err(e) => return record.closed(&ctx.metrics, Err(Error::Upgrade(e))),
    };
    let mut tunnel = H2Stream::new(send, req.into_body());
    tokio::select! {
        result = relay(&mut tunnel, &mut app) => {
            record.closed(&ctx.metrics, result.map_err(Error::Relay));
        }
        _ = registration.cancelled.cancelled() => {
            record.closed(&ctx.metrics, Err(Error::DeniedByPolicyChange));
        }
    }
}

/// Decides a CONNECT stream and reaches the application: the connection's record,
/// its registration (for policy changes) and the application's connection; or
/// the status that refuses it (counted and logged).
async fn connect(
    ctx: &Context,
    pod: &Arc<Workload>,
    peer_identity: Identity,
    peer: SocketAddr,
    req: &Request<RecvStream>,
    delivery: &Delivery,
) -> Result<(Record, Registration, TcpStream), StatusCode> {
    let state = ctx.snapshot();
    let forwarded = forwarded_for(req);
    // The client's workload, when its claimed address belongs to the identity it proved.
    let source = forwarded
        .and_then(|ip| state.workload_by_ip(ip))
        .filter(|w| w.identity == peer_identity)
        .cloned();
    let mut record = Record {
        started: Instant::now(),
        reporter: "destination",
        source_addr: source
            .as_ref()
            .map_or(peer, |w| SocketAddr::new(IpAddr::V4(w.ip), 0)),
        destination_addr: peer,
        source,
        destination: Some(pod.clone()),
        source_principal: Some(peer_identity.to_string()),
        destination_service: None,
        mtls: true,
    };
    if req.method() != Method::CONNECT {
        record.refused(&ctx.metrics, &Error::NotConnect(req.method().clone()));
        return Err(StatusCode::BAD_REQUEST);
    }
    let target: Option<SocketAddr> = req.uri().authority().and_then(|a| a.as_str().parse().ok());
    let Some(target) = target else {
        record.refused(&ctx.metrics, &Error::BadAuthority);
        return Err(StatusCode::BAD_REQUEST);
    };
    record.destination_addr = target;
    if target.ip() != IpAddr::V4(pod.ip) {
        record.refused(&ctx.metrics, &Error::NotThisPod(target));
        return Err(StatusCode::BAD_REQUEST);
    }
    if is_tunnel_port(target.port()) {
        record.refused(
            &ctx.metrics,
            &Error::SelfCall(format!("HBONE: {target} is the tunnel itself")),
        );
        return Err(StatusCode::BAD_REQUEST);
    }
    // The source address policy sees: the client workload's, when its identity
    // proved it; otherwise the address the connection came from.
    let conn = Connection {
        source_identity: Some(peer_identity.clone()),
        source_ip: record
            .source
            .as_ref()
            .map_or(peer.ip(), |w| IpAddr::V4(w.ip)),
        destination_ip: target.ip(),
        destination_port: target.port(),
    };
    if let Err(denied) = ctx.authorize(&state, pod, &conn, false) {
        record.refused(&ctx.metrics, &denied);
        return Err(StatusCode::UNAUTHORIZED);
    }
    let client = original_source(
        &state,
        &peer_identity,
        peer,
        record.source.as_deref(),
        forwarded,
    );
    let app = match deliver(delivery, client, target).await {
        Ok(app) => app,
        Err(e) => {
            record.refused(&ctx.metrics, &e);
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    record.opened(&ctx.metrics);
    let registration = ctx.active.register(conn, pod.clone(), false);
    Ok((record, registration, app))
}

/// The `for=` address of a `forwarded` header (HBONE clients name the workload
/// they act for; trust it only when the proven identity matches).
pub(crate) fn forwarded_for<B>(req: &Request<B>) -> Option<std::net::Ipv4Addr> {
    let value = req.headers().get("forwarded")?.to_str().ok()?;
    match crate::forwarded::parse_for(value)? {
        (IpAddr::V4(ip), _) => Some(ip),
        (IpAddr::V6(_), _) => None,
    }
}

/// The address an HBONE client's connection is delivered from, as Istio's ztunnel
/// does: the client workload's own, when its identity proves it (the `forwarded`
/// address already checked), the one a waypoint forwards for (the waypoint
/// believed it by the same rule; one that could not sends its peer's address,
/// which is no workload's), or the address the connection came from when it is
/// the peer identity's own workload. Otherwise unknown.
fn original_source(
    state: &crate::state::State,
    peer_identity: &Identity,
    peer: SocketAddr,
    verified: Option<&Workload>,
    forwarded: Option<std::net::Ipv4Addr>,
) -> Option<IpAddr> {
    if let Some(workload) = verified {
        return Some(IpAddr::V4(workload.ip));
    }
    if let Some(ip) = forwarded {
        if state.workload_by_ip(ip).is_some() && state.is_waypoint_identity(peer_identity) {
            return Some(IpAddr::V4(ip));
        }
    }
    match peer.ip() {
        IpAddr::V4(ip) => state
            .workload_by_ip(ip)
            .filter(|w| w.identity == *peer_identity)
            .map(|_| peer.ip()),
        IpAddr::V6(_) => None,
    }
}

/// Connects to the application from inside the pod, as the tunnel, from the
/// client's address where it is known (see [`crate::orig_src`]).
async fn deliver(
    delivery: &Delivery,
    client: Option<IpAddr>,
    target: SocketAddr,
) -> Result<TcpStream, Error> {
    delivery
        .connect(client, target, APP_CONNECT_TIMEOUT)
        .await
        .map_err(|error| Error::ApplicationUnreachable { target, error })
}

/// Inbound connections reach the tunnel's listeners only through `sk_lookup`, for
/// the pod's IP. One that arrived any other way (the pod connecting to its own
/// 127.0.0.1:15006 or :15008) would make the tunnel deliver to itself, in a loop.
fn arrived_for_the_pod(tcp: &Conn, pod: &Workload) -> Result<(), String> {
    let local = tcp
        .local_addr()
        .map_err(|e| format!("no local address: {e}"))?;
    if local.ip() != IpAddr::V4(pod.ip) {
        return Err(format!(
            "{local} is not the pod's address: a call to the tunnel itself"
        ));
    }
    if is_tunnel_port(local.port()) && local.port() != crate::redirect::HBONE_PORT {
        return Err(format!("{local} is the tunnel itself"));
    }
    Ok(())
}

pub async fn serve_plaintext(
    ctx: Arc<Context>,
    pod: Arc<Workload>,
    acceptor: Acceptor,
    delivery: Delivery,
) {
    loop {
        let (mut stream, peer) = acceptor.accept().await;
        let (ctx2, pod, delivery) = (ctx.clone(), pod.clone(), delivery.clone());
        ctx.drain.spawn(async move {
            let ctx = ctx2;
            let Ok(target) = stream.local_addr() else {
                return;
            };
            // Registered at once: no delivery may take this client's port.
            let _held = delivery.hold(peer, target.port());
            let state = ctx.snapshot();
            let source = match peer.ip() {
                IpAddr::V4(ip) => state.workload_by_ip(ip).cloned(),
                IpAddr::V6(_) => None,
            };
            let record = Record {
                started: Instant::now(),
                reporter: "destination",
                source_addr: peer,
                destination_addr: target,
                source,
                destination: Some(pod.clone()),
                source_principal: None,
                destination_service: None,
                mtls: false,
            };
            if let Err(why) = arrived_for_the_pod(&stream, &pod) {
                tracing::warn!(pod = %pod.name, %peer, "plaintext refused: {why}");
                return record.refused(&ctx.metrics, &Error::SelfCall(why));
            }
            if delivery.is_own_delivery(peer, target) {
                return record.refused(
                    &ctx.metrics,
                    &Error::SelfCall("the tunnel's own delivery came back".into()),
                );
            }
            let conn = Connection {
                source_identity: None,
                source_ip: peer.ip(),
                destination_ip: target.ip(),
                destination_port: target.port(),
            };
            if let Err(denied) = ctx.authorize(&state, &pod, &conn, true) {
                return record.refused(&ctx.metrics, &denied);
            }
            let mut app = match deliver(&delivery, Some(peer.ip()), target).await {
                Ok(app) => app,
                Err(e) => return record.refused(&ctx.metrics, &e),
            };
            record.opened(&ctx.metrics);
            let registration = ctx.active.register(conn, pod.clone(), true);
            tokio::select! {
                result = relay(&mut stream, &mut app) => {
                    record.closed(&ctx.metrics, result.map_err(Error::Relay));
                }
                _ = registration.cancelled.cancelled() => {
                    record.closed(&ctx.metrics, Err(Error::DeniedByPolicyChange));
                }
            }
        });
    }
}
