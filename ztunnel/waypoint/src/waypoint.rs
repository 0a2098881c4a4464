//! The waypoint (`waypoint` binary): terminates HBONE for the destinations that use
//! it, applies L7 AuthorizationPolicy to each HTTP request (policies attached to its
//! Gateway or to the destination Service with `targetRefs`), and forwards what is
//! allowed to the destination over HBONE, as itself. Non-HTTP traffic gets L4 policy.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context as TaskContext, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;

use crate::{
    accept::{AcceptMetrics, Acceptor, Conn, Limiter, Limits},
    certs::{CertError, CertManager, WorkloadCert},
    config, extauthz, forwarded,
    identity::Identity,
    jwt::{self, Jwks, TokenError},
    path_normalization,
    policy::{
        authn::{self, find_token, JwksSource, JwtRule, Location, RequestAuthentication},
        Connection, Request as PolicyRequest, RequestAuth,
    },
    state::{State, Workload},
    tls,
};
use ztunnel_core::{
    balance::Balancer,
    drain::{self, Drain},
    response_flags::{ResponseFlag as Flag, ResponseFlags},
};
use ztunnel_hbone::{
    pool::{Pool, PoolSettings},
    relay,
    stream::H2Stream,
};

mod conn_idle;
mod ext_authz;
mod idle;
mod resets;
mod retry;
mod telemetry;
mod upstream;
use idle::IdleBody;
use telemetry::{Access, ConnMetrics, Metered, Outcome, Record, RequestLabels, RequestMetrics};
use upstream::{Protocol, UpstreamError, Upstreams};

#[derive(Clone, Debug)]
pub struct WaypointOptions {
    pub source: config::Source,
    /// The Gateway this waypoint serves, and its namespace.
    pub name: String,
    pub namespace: String,
    /// This waypoint's own pod (its identity comes from its service account).
    pub pod: String,
    /// Trust, the root namespace and the CA.
    pub mesh: ztunnel_core::cli::MeshOptions,
    pub listen: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// Istio MeshConfig YAML with `extensionProviders` (for CUSTOM policies).
    pub mesh_config: Option<PathBuf>,
    /// On SIGTERM: how long requests in flight are given to finish.
    pub drain_grace: Duration,
    pub limits: RequestLimits,
    /// Threads that serve connections, each with its own event loop (at least 1).
    pub workers: usize,
}

/// Limits on each downstream request (Envoy's defaults).
#[derive(Clone, Copy, Debug)]
pub struct RequestLimits {
    /// Header count; over it: 431.
    pub max_headers: usize,
    /// Header block size in bytes; over it: 431.
    pub max_header_bytes: usize,
    /// How long a request's headers may take to arrive; past it the connection
    /// is closed. HTTP/1.1: counted from the end of the previous request (so it
    /// also closes an idle keep-alive connection); HTTP/2 and HBONE: the first
    /// request's, from the connection's start (GOAWAY).
    pub request_headers_timeout: Duration,
    /// How long a request's stream may see nothing either way: before the
    /// response headers it is answered 408 (flag SI), after them reset.
    pub stream_idle_timeout: Duration,
    /// How long a downstream connection (HBONE, HTTP/2, HTTP/1.1) may have no
    /// request open before it is closed, HTTP/2 with GOAWAY. Before its first
    /// request the request headers timeout applies instead.
    pub idle_timeout: Duration,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_headers: 100,
            max_header_bytes: 60 * 1024,
            // Envoy's stream idle timeout, which also bounds a request waiting
            // for its headers.
            request_headers_timeout: Duration::from_secs(300),
            stream_idle_timeout: Duration::from_secs(300),
            // Envoy's connection idle timeout.
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TimedOutLabels {
    /// `hbone` (the tunnel's connection) or `http` (a tunnelled HTTP connection).
    layer: &'static str,
    /// `request_headers` (no first request in time) or `idle`.
    timeout: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolErrorLabels {
    /// `hbone` or `http`, as for timeouts.
    layer: &'static str,
    /// The error code of the GOAWAY the waypoint sent (`ENHANCE_YOUR_CALM`: a
    /// flood, such as rapid reset; `PROTOCOL_ERROR`, ...), or `PREMATURE_RESETS`
    /// (most of its requests cancelled soon after they were sent).
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    /// `not_bound`, `unknown_destination` or `bad_request`.
    reason: String,
}

/// A worker's connections to endpoints: HBONE, and HTTP over it.
struct WorkerUpstream {
    pool: Arc<Pool>,
    upstreams: Arc<Upstreams>,
}

thread_local! {
    /// The connection worker this thread is (0 off the workers).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

struct Waypoint {
    key: (String, String),
    identity: Identity,
    state: tokio::sync::watch::Receiver<Arc<State>>,
    certs: Arc<CertManager>,
    /// Upstream connections, one set per connection worker: shared by the
    /// worker's downstream connections, never used from another thread.
    upstream: Vec<WorkerUpstream>,
    /// Which endpoints a request tries (the tunnel's balancer too).
    balancer: Balancer,
    metrics: RequestMetrics,
    /// Istio's TCP metrics, of the connections relayed unread.
    tcp_metrics: crate::metrics::TcpMetrics,
    /// CONNECTs refused before any policy: destinations not bound here and the like.
    refused: Family<RefusedLabels, Counter>,
    /// Downstream connections closed by their request headers or idle timeout.
    timed_out: Family<TimedOutLabels, Counter>,
    /// Downstream connections cut off for breaking HTTP/2 (GOAWAY) or for
    /// cancelling most of their requests (dropped).
    protocol_errors: Family<ProtocolErrorLabels, Counter>,
    limits: RequestLimits,
    path_normalization: path_normalization::Level,
    /// X-Forwarded-For hops believed (MeshConfig numTrustedProxies).
    trusted_proxies: usize,
    /// How long an undeclared port's first bytes are awaited before it is taken
    /// for a server-first protocol (MeshConfig protocolDetectionTimeout; None:
    /// until the client speaks, within the request headers timeout).
    protocol_detection_timeout: Option<Duration>,
    /// Extension providers of the mesh config, by name.
    providers: HashMap<String, extauthz::ProviderSpec>,
    /// JWKS fetched from jwksUri: (keys, when fetched).
    jwks: Mutex<HashMap<String, (Arc<Jwks>, Instant)>>,
    /// Pooled clients: HTTP(S) for jwksUri and HTTP providers, h2c for gRPC ones.
    http_client: crate::http_client::Client,
    grpc_client: ext_authz::GrpcClient,
    /// The TLS server config of the current certificate, made once per certificate.
    tls: Mutex<Option<(Arc<WorkloadCert>, Arc<rustls::ServerConfig>)>>,
    /// The process's drain, signaled on SIGTERM: connections close once their
    /// requests are done (HTTP/2 with GOAWAY); it tracks every downstream
    /// connection and tunnelled stream, and the metrics server's.
    drain: Drain,
}

/// How long a fetched JWKS is used before it is fetched again (on failure the
/// last good one stays in use).
const JWKS_REFRESH: Duration = Duration::from_secs(20 * 60);
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a CONNECT through the waypoint is going, and for whom.
#[derive(Clone)]
struct Target {
    /// A Service VIP (its ready endpoints are read per request) or one workload.
    destination: Destination,
    /// The port on the endpoint.
    port: u16,
    /// The protocol the Service port declares.
    protocol: upstream::Declared,
    /// The service addressed, if any: (namespace, name).
    service: Option<(String, String)>,
    /// The Services bound here whose policies apply: the one addressed, or every
    /// one the addressed pod is an endpoint of.
    services: Vec<(String, String)>,
    /// The address the client asked for.
    asked: SocketAddr,
    /// The client's address (the one its source tunnel forwarded, when the
    /// client's identity proves it; else the peer's): sent on in `forwarded`.
    client: SocketAddr,
    /// `for="<client>"`, the element the waypoint appends to `forwarded`.
    forwarded: http::HeaderValue,
}

/// One tunnelled HTTP connection: what each of its requests shares.
struct Downstream {
    conn: Connection,
    client: Identity,
    target: Target,
    metrics: Arc<ConnMetrics>,
    /// Its requests cancelled soon after they were sent.
    resets: resets::Resets,
}

#[derive(Clone)]
enum Destination {
    Service(std::net::Ipv4Addr),
    Workload(Arc<Workload>),
}

/// After GOAWAY for a timeout: how long the peer gets to let the connection
/// close (an attacker that never acknowledges is not waited for).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Runs a hyper server connection until it ends: gracefully (HTTP/2: GOAWAY)
/// when the waypoint drains, its requests finishing; and when `streams` says no
/// request came in time (logged and counted for `layer`), then at most
/// CLOSE_WAIT; at once when its client cancelled most of its requests (`resets`).
macro_rules! serve_until_done {
    ($waypoint:expr, $connection:expr, $streams:expr, $resets:expr, $layer:expr) => {{
        let connection = $connection;
        tokio::pin!(connection);
        let limits = $waypoint.limits;
        tokio::select! {
            ended = connection.as_mut() => ended,
            _ = $waypoint.drain.signaled() => {
                connection.as_mut().graceful_shutdown();
                connection.as_mut().await
            }
            expired = $streams.expired(limits.request_headers_timeout, limits.idle_timeout) => {
                $waypoint.timed_out($layer, expired);
                connection.as_mut().graceful_shutdown();
                tokio::time::timeout(CLOSE_WAIT, connection.as_mut())
                    .await
                    .unwrap_or(Ok(()))
            }
            // Its requests are the flood's: dropped with the connection.
            (premature, ended) = $resets.tripped() => {
                $waypoint.reset_flood($layer, premature, ended);
                Ok(())
            }
        }
    }};
}

/// CONNECTs at once on one HBONE connection (hyper's server default, which
/// the waypoint had before).
const MAX_CONNECTS_PER_CONNECTION: u32 = 200;

/// How long a new connection's first bytes are awaited to tell HTTP from a
/// protocol whose server speaks first, unless the mesh config says.
const PROTOCOL_DETECTION_TIMEOUT: Duration = Duration::from_millis(500);

/// Attempts per request (Istio's default retry policy: connect failures and
/// refused streams, on another endpoint).
const ATTEMPTS: usize = 2;

/// Why a CONNECT is refused before any policy.
enum Refusal {
    /// Not a Service VIP or workload whose binding is this waypoint.
    NotBound(String),
    UnknownDestination(String),
}

/// Why the waypoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Source(#[from] config::SourceError),
    #[error(
        "pod {0} is not in the config (or has no address): the waypoint needs its own identity"
    )]
    NoOwnPod(String),
    #[error(transparent)]
    MeshConfig(#[from] extauthz::MeshConfigError),
    #[error("pathNormalization: {0}")]
    PathNormalization(String),
    #[error("protocolDetectionTimeout: {0}")]
    ProtocolDetectionTimeout(extauthz::BadTimeout),
    #[error(transparent)]
    Ca(#[from] ztunnel_core::ca::client::CaConfigError),
    #[error("the waypoint's own certificate: {0}")]
    Certificate(#[from] CertError),
    #[error("binding {address}: {error}")]
    Bind {
        address: SocketAddr,
        error: std::io::Error,
    },
    #[error("starting connection worker {worker}: {error}")]
    Worker {
        worker: usize,
        error: std::io::Error,
    },
}

/// Why a downstream connection or one of its streams ended in error: logged at
/// debug (the client's trouble, or the endpoint's, already counted per
/// request), but a warning, counted, when the client broke HTTP/2.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("the waypoint's certificate: {0}")]
    Certificate(#[from] CertError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("mTLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("HTTP/2: {0}")]
    Http2(h2::Error),
    #[error("HTTP: {0}")]
    Http(upstream::BoxError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("no endpoint of {asked} reachable: {failures}")]
    Unreachable { asked: SocketAddr, failures: String },
}

impl ConnectionError {
    /// The error code of the GOAWAY the waypoint (its HTTP/2 library) sent
    /// because the peer broke the protocol, if that ended the connection.
    fn goaway_sent(&self) -> Option<h2::Reason> {
        let h2 = match self {
            ConnectionError::Http2(e) => e,
            // hyper's own connection error, not one from a body it was sending
            // (an upstream's, which is no fault of this client).
            ConnectionError::Http(e) => {
                let hyper = e.downcast_ref::<hyper::Error>().filter(|e| !e.is_user())?;
                std::error::Error::source(hyper)?.downcast_ref::<h2::Error>()?
            }
            _ => return None,
        };
        ztunnel_hbone::stream::goaway_sent(h2)
    }
}

/// Why a request cannot be sent on as it came (answered 400).
#[derive(Debug, thiserror::Error)]
enum Unforwardable {
    #[error("its URI: {0}")]
    Uri(#[from] http::uri::InvalidUri),
    #[error("a header value: {0}")]
    Header(#[from] http::header::InvalidHeaderValue),
}

/// How long a starting waypoint waits to find its own pod in the config.
const OWN_POD_WAIT: Duration = Duration::from_secs(60);

pub async fn run(options: WaypointOptions) -> Result<(), StartError> {
    let settings = options.mesh.settings("");
    let mut registry = Registry::default();
    let config_metrics = config::ConfigMetrics::register(&mut registry);
    let mut snapshots = options.source.watch(config_metrics.clone()).await?;
    // The waypoint's own pod gives its identity. Just started, the API may not have
    // its address yet: wait for it a while, then give up.
    let deadline = tokio::time::Instant::now() + OWN_POD_WAIT;
    let me = loop {
        let state = State::build(snapshots.borrow_and_update().clone(), &settings);
        if let Some(me) = state
            .workload_by_name(&options.namespace, &options.pod)
            .cloned()
        {
            break me;
        }
        tracing::info!(
            pod = %format!("{}/{}", options.namespace, options.pod),
            "waiting for this pod (with its address) in the config: it gives the waypoint's identity"
        );
        match tokio::time::timeout_at(deadline, snapshots.changed()).await {
            Ok(Ok(())) => {}
            _ => {
                return Err(StartError::NoOwnPod(format!(
                    "{}/{}",
                    options.namespace, options.pod
                )))
            }
        }
    };
    let states = crate::state::spawn_updates(snapshots, settings, config_metrics.bindings_refused);

    let metrics = RequestMetrics::register(&mut registry);
    let tcp_metrics = crate::metrics::TcpMetrics::register(&mut registry);
    let refused = Family::<RefusedLabels, Counter>::default();
    registry.register(
        "ztunnel_waypoint_connects_refused",
        "CONNECTs the waypoint refused before any policy, by reason (not_bound: a destination not bound to this waypoint)",
        refused.clone(),
    );
    let timed_out = Family::<TimedOutLabels, Counter>::default();
    registry.register(
        "ztunnel_waypoint_connections_timed_out",
        "Downstream connections the waypoint closed (HTTP/2: GOAWAY) because no request came: none within the request headers timeout of the start, or none for the idle timeout",
        timed_out.clone(),
    );
    let protocol_errors = Family::<ProtocolErrorLabels, Counter>::default();
    registry.register(
        "ztunnel_waypoint_protocol_errors",
        "Downstream HTTP/2 connections the waypoint closed because the client broke the protocol or flooded it (reason: the GOAWAY's error code, ENHANCE_YOUR_CALM for floods such as rapid reset; PREMATURE_RESETS: most of its requests cancelled within a second)",
        protocol_errors.clone(),
    );
    let mesh_config = match &options.mesh_config {
        Some(path) => extauthz::MeshConfig::load(path)?,
        None => Default::default(),
    };
    let certs = options.mesh.cert_manager(&mut registry)?;
    certs.fetch(&me.identity).await?;

    let waypoint = Arc::new(Waypoint {
        key: (options.namespace.clone(), options.name.clone()),
        identity: me.identity.clone(),
        state: states,
        certs,
        upstream: (0..options.workers.max(1))
            .map(|_| WorkerUpstream {
                pool: Pool::new(Default::default()),
                upstreams: Upstreams::new(),
            })
            .collect(),
        balancer: Balancer::new(),
        metrics,
        tcp_metrics,
        refused,
        timed_out,
        protocol_errors,
        limits: options.limits,
        path_normalization: mesh_config
            .path_normalization()
            .map_err(StartError::PathNormalization)?,
        trusted_proxies: mesh_config.trusted_proxies(),
        protocol_detection_timeout: match mesh_config.protocol_detection_timeout() {
            Ok(None) => Some(PROTOCOL_DETECTION_TIMEOUT),
            Ok(Some(Duration::ZERO)) => None,
            Ok(Some(timeout)) => Some(timeout),
            Err(e) => return Err(StartError::ProtocolDetectionTimeout(e)),
        },
        jwks: Mutex::new(HashMap::new()),
        http_client: crate::http_client::new(),
        grpc_client: ext_authz::grpc_client(),
        providers: mesh_config.providers(),
        tls: Mutex::new(None),
        drain: Drain::new(),
    });
    let drain = waypoint.drain.clone();
    let accept_metrics = AcceptMetrics::register(&mut registry);
    let bind = |address| async move {
        TcpListener::bind(address)
            .await
            .map_err(|error| StartError::Bind { address, error })
    };
    let metrics = bind(options.metrics_addr).await?;
    let metrics_limiter = Limiter::new(Limits::http_endpoint(), accept_metrics.clone());
    tokio::spawn(crate::http_server::serve_draining(
        Acceptor::new(metrics, metrics_limiter, "metrics"),
        crate::metrics::handler(Arc::new(Mutex::new(registry))),
        drain.clone(),
    ));
    let listener = bind(options.listen)
        .await?
        .into_std()
        .map_err(|error| StartError::Bind {
            address: options.listen,
            error,
        })?;
    tracing::info!(waypoint = %format!("{}/{}", options.namespace, options.name), identity = %me.identity, listen = %options.listen, workers = options.workers, "waypoint running");
    let limiter = Limiter::new(Limits::proxy(), accept_metrics);
    for worker in 0..waypoint.upstream.len() {
        start_worker(worker, &listener, &waypoint, &limiter)
            .map_err(|error| StartError::Worker { worker, error })?;
    }
    drop(listener);
    // On SIGTERM: no new connections (the listeners close), GOAWAY on the open
    // ones, requests in flight finish within the grace period.
    drain::on_sigterm(&drain, options.drain_grace, "waypoint").await;
    tracing::info!("waypoint stopped");
    Ok(())
}

/// Starts a connection worker: a thread with a single-threaded runtime that
/// accepts on its own handle of the listening socket (whichever worker is free
/// takes a new connection). A connection, its requests and the upstream
/// connections they open stay on that thread, as on Envoy's workers: a
/// multi-threaded runtime moved a connection's tasks between cores and cost
/// about a third more CPU per request (`cargo xtask bench waypoint`).
fn start_worker(
    worker: usize,
    listener: &std::net::TcpListener,
    waypoint: &Arc<Waypoint>,
    limiter: &Arc<Limiter>,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = {
        let _in_runtime = runtime.enter();
        TcpListener::from_std(listener.try_clone()?)?
    };
    let acceptor = Acceptor::new(listener, limiter.clone(), "waypoint");
    let waypoint = waypoint.clone();
    let drain = waypoint.drain.clone();
    std::thread::Builder::new()
        .name(format!("waypoint-{worker}"))
        .spawn(move || {
            WORKER.set(worker);
            runtime.block_on(async move {
                acceptor
                    .serve_until_drained(&drain, move |tcp, peer| {
                        let waypoint = waypoint.clone();
                        async move {
                            if let Err(e) = waypoint.clone().connection(tcp, peer).await {
                                waypoint.connection_failed("hbone", &e);
                            }
                        }
                    })
                    .await;
                // Its connections finish their requests (the main thread ends
                // the process after the grace period).
                drain.tracker().wait().await;
            })
        })?;
    Ok(())
}

impl Waypoint {
    /// This worker's upstream connections.
    fn upstream(&self) -> &WorkerUpstream {
        &self.upstream[WORKER.get() % self.upstream.len()]
    }

    /// One HBONE connection: mTLS, then HTTP/2 on `h2` directly (hyper's server
    /// and upgrade gave each CONNECT's bytes a task and a copy more). It ends
    /// gracefully (GOAWAY, its streams finishing) when the waypoint drains, and
    /// when no CONNECT came in time (logged and counted), then within CLOSE_WAIT.
    async fn connection(
        self: Arc<Self>,
        tcp: Conn,
        peer: SocketAddr,
    ) -> Result<(), ConnectionError> {
        let tls = tcp
            .handshake()
            .run(TlsAcceptor::from(self.server_config().await?).accept(tcp))
            .await
            .map_err(ConnectionError::Handshake)?;
        let client = tls::peer_identity(tls.get_ref().1.peer_certificates())?;
        let settings = PoolSettings::default();
        let mut connection = h2::server::Builder::new()
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(settings.connection_window)
            .max_frame_size(settings.max_frame_size)
            .max_concurrent_streams(MAX_CONNECTS_PER_CONNECTION)
            .max_header_list_size(ztunnel_hbone::stream::MAX_HEADER_LIST_SIZE)
            .handshake::<_, Bytes>(ztunnel_hbone::batched::BatchedWrites::new(tls))
            .await
            .map_err(ConnectionError::Http2)?;
        let streams = conn_idle::Streams::new();
        let limits = self.limits;
        let drained = self.drain.signaled();
        let expired = streams.expired(limits.request_headers_timeout, limits.idle_timeout);
        tokio::pin!(drained, expired);
        // Set once GOAWAY is sent: by when the connection must be gone.
        let mut closing: Option<tokio::time::Instant> = None;
        let far = || tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        type Accepted = Option<Result<(Request<RecvStream>, SendResponse<Bytes>), h2::Error>>;
        // One per turn of the loop, never kept: its size does not matter.
        #[allow(clippy::large_enum_variant)]
        enum Event {
            Accepted(Accepted),
            Drain,
            Expired(conn_idle::Expired),
            Gone,
        }
        loop {
            // Accepting drives the connection (every stream's frames).
            let event = tokio::select! {
                accepted = connection.accept() => Event::Accepted(accepted),
                _ = &mut drained, if closing.is_none() => Event::Drain,
                expired = &mut expired, if closing.is_none() => Event::Expired(expired),
                _ = tokio::time::sleep_until(closing.unwrap_or_else(far)), if closing.is_some() => Event::Gone,
            };
            match event {
                Event::Accepted(None) | Event::Gone => return Ok(()),
                Event::Accepted(Some(accepted)) => {
                    let (req, respond) = accepted.map_err(ConnectionError::Http2)?;
                    // The CONNECT's tunnelled stream keeps the connection busy.
                    let open = streams.open();
                    self.clone()
                        .connect(client.clone(), peer, req, respond, open);
                }
                // Requests in flight get the drain's grace period.
                Event::Drain => {
                    connection.graceful_shutdown();
                    closing = Some(far());
                }
                Event::Expired(expired) => {
                    self.timed_out("hbone", expired);
                    connection.graceful_shutdown();
                    closing = Some(tokio::time::Instant::now() + CLOSE_WAIT);
                }
            }
        }
    }

    /// A downstream connection closed by its request headers or idle timeout:
    /// logged and counted.
    fn timed_out(&self, layer: &'static str, expired: conn_idle::Expired) {
        let timeout = match expired {
            conn_idle::Expired::RequestHeaders => self.limits.request_headers_timeout,
            conn_idle::Expired::Idle => self.limits.idle_timeout,
        };
        tracing::info!(
            layer,
            "waypoint: closing a downstream connection: no request within its {} timeout ({timeout:?})",
            expired.as_str()
        );
        self.timed_out
            .get_or_create(&TimedOutLabels {
                layer,
                timeout: expired.as_str(),
            })
            .inc();
    }

    /// A downstream connection ended in an error: one the waypoint cut off for
    /// breaking HTTP/2 is a warning, and counted; the rest (a client gone, a
    /// reset) are routine.
    fn connection_failed(&self, layer: &'static str, error: &ConnectionError) {
        let Some(reason) = error.goaway_sent() else {
            return tracing::debug!(layer, "waypoint: a downstream connection failed: {error}");
        };
        tracing::warn!(
            layer,
            "waypoint: closed a downstream connection that broke HTTP/2 ({reason:?}): {error}"
        );
        self.protocol_errors
            .get_or_create(&ProtocolErrorLabels {
                layer,
                reason: format!("{reason:?}"),
            })
            .inc();
    }

    /// A downstream connection closed because its client cancelled most of its
    /// requests soon after sending them: logged and counted.
    fn reset_flood(&self, layer: &'static str, premature: u32, ended: u32) {
        tracing::warn!(
            layer,
            "waypoint: closed a downstream connection whose client cancelled {premature} of its {ended} requests within a second of sending them (a reset flood)"
        );
        self.protocol_errors
            .get_or_create(&ProtocolErrorLabels {
                layer,
                reason: "PREMATURE_RESETS".into(),
            })
            .inc();
    }

    /// The TLS server config presenting the current certificate: one for all
    /// connections, made again when the certificate is renewed.
    async fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, ConnectionError> {
        let cert = self.certs.fetch(&self.identity).await?;
        let mut cached = self.tls.lock().expect("not poisoned");
        if let Some((for_cert, config)) = cached.as_ref() {
            if Arc::ptr_eq(for_cert, &cert) {
                return Ok(config.clone());
            }
        }
        let config = cert.server_config()?;
        *cached = Some((cert, config.clone()));
        Ok(config)
    }

    /// The destination of a CONNECT, if it is bound to this waypoint: a Service
    /// VIP whose `use-waypoint` is this waypoint (and it serves services), or a
    /// workload whose own binding is this waypoint (and it serves workloads).
    /// Anything else is refused: naming a pod behind a bound Service must not skip
    /// that Service's policies, nor reach the pod as the waypoint.
    fn resolve(
        &self,
        state: &State,
        asked: SocketAddr,
        client: SocketAddr,
    ) -> Result<Target, Refusal> {
        let IpAddr::V4(ip) = asked.ip() else {
            return Err(Refusal::UnknownDestination(format!("{asked}: not IPv4")));
        };
        let me = state.waypoint(&self.key);
        let bound = |binding: &Option<(String, String)>| binding.as_ref() == Some(&self.key);
        if let Some(service) = state.service_by_vip(ip) {
            let name = (service.namespace.clone(), service.name.clone());
            if !bound(&service.waypoint) || !me.is_some_and(|w| w.serves_services()) {
                return Err(Refusal::NotBound(format!(
                    "service {}/{} is not bound to this waypoint",
                    name.0, name.1
                )));
            }
            let unknown = |why: &str| {
                Refusal::UnknownDestination(format!("service {}/{}: {why}", name.0, name.1))
            };
            let port = service
                .ports
                .iter()
                .find(|p| p.port == asked.port())
                .ok_or_else(|| unknown("no such port"))?;
            if service.endpoints.is_empty() {
                return Err(unknown("no endpoints"));
            }
            return Ok(Target {
                destination: Destination::Service(ip),
                port: port.target_port,
                protocol: upstream::declared(port.app_protocol.as_deref(), port.name.as_deref()),
                service: Some(name.clone()),
                services: vec![name],
                asked,
                client,
                forwarded: forwarded_for(client),
            });
        }
        let Some(workload) = state.workload_by_ip(ip).cloned() else {
            return Err(Refusal::UnknownDestination(format!(
                "{asked}: no such service or workload"
            )));
        };
        if !bound(&workload.waypoint) || !me.is_some_and(|w| w.serves_workloads()) {
            return Err(Refusal::NotBound(format!(
                "workload {}/{} is not bound to this waypoint (its own istio.io/use-waypoint, with waypoint-for workload or all)",
                workload.namespace, workload.name
            )));
        }
        Ok(Target {
            services: state.bound_services(&workload, &self.key),
            destination: Destination::Workload(workload),
            port: asked.port(),
            protocol: upstream::Declared::Undeclared,
            service: None,
            asked,
            client,
            forwarded: forwarded_for(client),
        })
    }

    /// One CONNECT: answered 200 and tunnelled when its destination is bound
    /// here, else refused (logged and counted).
    fn connect(
        self: Arc<Self>,
        client: Identity,
        peer: SocketAddr,
        req: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        open: conn_idle::Open,
    ) {
        let status = |code| Response::builder().status(code).body(()).expect("valid");
        let target = match self.connect_target(&client, peer, &req) {
            Ok(target) => target,
            Err(code) => {
                let _ = respond.send_response(status(code), true);
                return;
            }
        };
        let send = match respond.send_response(status(StatusCode::OK), false) {
            Ok(send) => send,
            Err(e) => return tracing::debug!("waypoint: answering a CONNECT: {e}"),
        };
        let stream = H2Stream::new(send, req.into_body());
        self.drain.clone().spawn(async move {
            let _open = open;
            if let Err(e) = self.clone().stream(stream, client, target).await {
                self.connection_failed("http", &e);
            }
        });
    }

    /// Where a CONNECT goes; or the status that refuses it (logged and counted).
    fn connect_target(
        &self,
        client: &Identity,
        peer: SocketAddr,
        req: &Request<RecvStream>,
    ) -> Result<Target, StatusCode> {
        let refuse = |reason: &str, code: StatusCode, why: &str| {
            tracing::warn!(src = %client, %peer, "waypoint: CONNECT refused: {why}");
            self.refused
                .get_or_create(&RefusedLabels {
                    reason: reason.into(),
                })
                .inc();
            code
        };
        if req.method() != Method::CONNECT {
            return Err(refuse(
                "bad_request",
                StatusCode::BAD_REQUEST,
                "not CONNECT",
            ));
        }
        let Some(asked) = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        else {
            return Err(refuse(
                "bad_request",
                StatusCode::BAD_REQUEST,
                ":authority is not ip:port",
            ));
        };
        let state = self.state.borrow().clone();
        // The client's own address when its identity proves it (as the tunnel
        // does); otherwise the address the connection came from.
        let claimed = req
            .headers()
            .get("forwarded")
            .and_then(|v| v.to_str().ok())
            .and_then(forwarded::parse_for);
        let client_addr = claimed
            .and_then(|(ip, port)| match ip {
                IpAddr::V4(v4) => state
                    .workload_by_ip(v4)
                    .filter(|w| &w.identity == client)
                    .map(|_| SocketAddr::new(ip, port.unwrap_or(peer.port()))),
                IpAddr::V6(_) => None,
            })
            .unwrap_or(peer);
        self.resolve(&state, asked, client_addr)
            .map_err(|refusal| match refusal {
                Refusal::NotBound(why) => refuse(
                    "not_bound",
                    StatusCode::FORBIDDEN,
                    &format!("{asked}: {why}"),
                ),
                Refusal::UnknownDestination(why) => {
                    refuse("unknown_destination", StatusCode::SERVICE_UNAVAILABLE, &why)
                }
            })
    }

    /// One tunnelled stream: HTTP gets L7 policy per request; anything else L4.
    async fn stream(
        self: Arc<Self>,
        mut stream: H2Stream,
        client: Identity,
        target: Target,
    ) -> Result<(), ConnectionError> {
        let conn = Connection {
            source_identity: Some(client.clone()),
            source_ip: target.client.ip(),
            destination_ip: target.asked.ip(),
            destination_port: target.asked.port(),
        };
        // A declared protocol is taken at its word: HTTP goes to the HTTP server
        // (which refuses what is not HTTP), anything else is relayed unread, at
        // once (a server-first protocol must not wait for the client).
        let (first, http) = match target.protocol {
            upstream::Declared::Http(_) => (Vec::new(), true),
            upstream::Declared::Opaque => (Vec::new(), false),
            upstream::Declared::Undeclared => {
                let first = self.sniff(&mut stream, &target, &conn).await?;
                let http = looks_like_http(&first);
                (first, http)
            }
        };
        let stream = Prefixed {
            prefix: first,
            inner: stream,
        };
        if http {
            let labels = self.connection_labels(&self.state.borrow(), &conn, &client, &target);
            let downstream = Arc::new(Downstream {
                conn,
                client,
                target,
                metrics: Arc::new(ConnMetrics::new(self.metrics.clone(), labels)),
                resets: Default::default(),
            });
            let watched = downstream.clone();
            let streams = conn_idle::Streams::new();
            let this = self.clone();
            let opened = streams.clone();
            let service = hyper::service::service_fn(move |req| {
                let (this, downstream) = (this.clone(), downstream.clone());
                // Open until the response's body is done (or dropped).
                let open = opened.open();
                // Boxed: hyper moves each request's future into a task of its own.
                Box::pin(async move {
                    let request = downstream.resets.begin();
                    let response = this.request(req, &downstream).await;
                    request.answered();
                    Ok::<_, Infallible>(response.map(|body| conn_idle::Holding::new(body, open)))
                })
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .max_headers(self.limits.max_headers)
                .max_buf_size(self.limits.max_header_bytes.max(8192))
                .timer(TokioTimer::new())
                .header_read_timeout(self.limits.request_headers_timeout);
            builder
                .http2()
                .max_header_list_size(self.limits.max_header_bytes as u32);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            return serve_until_done!(self, connection, streams, watched.resets, "http")
                .map_err(ConnectionError::Http);
        }
        let state = self.state.borrow().clone();
        let decision = state.policies.authorize_request(
            (&self.key.0, &self.key.1),
            &target.services,
            &conn,
            None,
            false,
        );
        // Counted as Envoy's TCP proxy does: opened, then closed with the bytes
        // relayed each way; one refused or unreachable as both at once (RBAC: no
        // flag; no endpoint: UH; every endpoint failed: UF, and URX after a retry).
        let m = &self.tcp_metrics;
        let refused = |flags: ResponseFlags| {
            let labels = self.tcp_labels(&state, &conn, &client, &target, None, flags);
            m.opened.get_or_create(&labels).inc();
            m.closed.get_or_create(&labels).inc();
        };
        if !decision.allow {
            tracing::warn!(src = %client, dst = %target.asked, "waypoint: connection denied: {}", decision.reason);
            refused(ResponseFlags::NONE);
            return Ok(());
        }
        let endpoints = self.endpoints(&state, &target);
        let mut failures = Vec::new();
        for endpoint in &endpoints {
            match self
                .upstream_stream(endpoint, target.port, target.client)
                .await
            {
                Ok(mut upstream) => {
                    let labels = self.tcp_labels(
                        &state,
                        &conn,
                        &client,
                        &target,
                        Some(endpoint),
                        ResponseFlags::NONE,
                    );
                    m.opened.get_or_create(&labels).inc();
                    let mut stream = stream;
                    let relayed = relay(&mut stream, &mut upstream).await;
                    // A relay that failed counts no bytes: they are not known.
                    let (received, sent) = relayed.as_ref().map_or((0, 0), |bytes| *bytes);
                    m.closed.get_or_create(&labels).inc();
                    m.received.get_or_create(&labels).inc_by(received);
                    m.sent.get_or_create(&labels).inc_by(sent);
                    relayed?;
                    return Ok(());
                }
                Err(e) => failures.push(format!("{}: {e}", endpoint.name)),
            }
        }
        refused(match failures.len() {
            0 => Flag::NoHealthyUpstream.into(),
            1 => Flag::UpstreamConnectionFailure.into(),
            _ => ResponseFlags::from(Flag::UpstreamConnectionFailure)
                .with(Flag::UpstreamRetryLimitExceeded),
        });
        Err(ConnectionError::Unreachable {
            asked: target.asked,
            failures: failures.join("; "),
        })
    }

    /// Istio's TCP labels of a connection the waypoint relays unread, to
    /// `endpoint` when it reached one.
    fn tcp_labels(
        &self,
        state: &State,
        conn: &Connection,
        client: &Identity,
        target: &Target,
        endpoint: Option<&Workload>,
        response_flags: ResponseFlags,
    ) -> crate::metrics::TcpLabels {
        use crate::metrics::UNKNOWN;
        let source = source_workload(state, conn, client);
        let workload =
            |w: Option<&Workload>| w.map_or(UNKNOWN.into(), |w| w.workload_name().to_owned());
        let namespace = |w: Option<&Workload>| w.map_or(UNKNOWN.into(), |w| w.namespace.clone());
        crate::metrics::TcpLabels {
            reporter: "waypoint".into(),
            source_workload: workload(source.map(|w| &**w)),
            source_workload_namespace: namespace(source.map(|w| &**w)),
            source_principal: client.to_string(),
            destination_workload: workload(endpoint),
            destination_workload_namespace: namespace(endpoint),
            destination_principal: endpoint.map_or(UNKNOWN.into(), |w| w.identity.to_string()),
            destination_service: target
                .service
                .as_ref()
                .map_or(UNKNOWN.into(), |(ns, n)| format!("{n}.{ns}.svc")),
            request_protocol: "tcp".into(),
            response_flags,
            connection_security_policy: "mutual_tls".into(),
        }
    }

    /// The first bytes of a connection to an undeclared port, to tell HTTP from
    /// the rest: none when the client stays silent past the protocol detection
    /// timeout (a server-first protocol), unless the connection can only be HTTP.
    /// Then, as Istio with its detection timeout off, the client's first bytes
    /// decide, however late (within the request headers timeout).
    async fn sniff(
        &self,
        stream: &mut H2Stream,
        target: &Target,
        conn: &Connection,
    ) -> std::io::Result<Vec<u8>> {
        let mut first = vec![0u8; 24];
        let detection = self
            .protocol_detection_timeout
            .unwrap_or(self.limits.request_headers_timeout);
        let n = match tokio::time::timeout(detection, stream.read(&mut first)).await {
            Ok(read) => read?,
            // Detection off: that was the request headers timeout already.
            Err(_) if self.protocol_detection_timeout.is_some() && self.only_http(target, conn) => {
                let late = stream.read(&mut first);
                match tokio::time::timeout(self.limits.request_headers_timeout, late).await {
                    Ok(read) => read?,
                    Err(_) => 0,
                }
            }
            Err(_) => 0,
        };
        first.truncate(n);
        Ok(first)
    }

    /// Whether a connection to `target` can only be HTTP: its Service port says
    /// so, or the policies let no plain TCP connection through (they need L7).
    fn only_http(&self, target: &Target, conn: &Connection) -> bool {
        target.protocol.http().is_some()
            || !self
                .state
                .borrow()
                .policies
                .authorize_request(
                    (&self.key.0, &self.key.1),
                    &target.services,
                    conn,
                    None,
                    false,
                )
                .allow
    }

    /// The endpoints to try for one request or connection, in order, at most
    /// ATTEMPTS: a Service's ready endpoints now, from the next in turn (a retry
    /// never goes back to the one that failed); or the one workload.
    fn endpoints<'a>(&self, state: &'a State, target: &'a Target) -> Vec<&'a Arc<Workload>> {
        let vip = match &target.destination {
            Destination::Workload(w) => return vec![w],
            Destination::Service(vip) => *vip,
        };
        let Some(service) = state.service_by_vip(vip) else {
            return Vec::new();
        };
        self.balancer
            .attempts(&vip, &service.endpoints)
            .take(ATTEMPTS)
            .collect()
    }

    /// A byte stream to an endpoint: HBONE when it is in the mesh.
    async fn upstream_stream(
        &self,
        endpoint: &Workload,
        port: u16,
        client: SocketAddr,
    ) -> Result<Box<dyn Io>, UpstreamError> {
        let address = SocketAddr::new(IpAddr::V4(endpoint.ip), port);
        if !endpoint.captured {
            return match TcpStream::connect(address).await {
                Ok(tcp) => Ok(Box::new(tcp)),
                Err(error) => Err(UpstreamError::Connect { address, error }),
            };
        }
        let cert: Arc<WorkloadCert> = self.certs.fetch(&self.identity).await?;
        let hbone = SocketAddr::new(IpAddr::V4(endpoint.ip), ztunnel_ebpf_common::HBONE_PORT);
        let mut headers = http::HeaderMap::new();
        // Who the waypoint acts for: the client, as Istio's waypoint says it.
        headers.insert("forwarded", forwarded_for(client));
        let (upgraded, guard) = self
            .upstream()
            .pool
            .connect(&cert, &endpoint.identity, hbone, address, headers)
            .await?;
        Ok(Box::new(Guarded {
            inner: upgraded,
            _guard: guard,
        }))
    }

    /// One HTTP request: judged, forwarded when allowed, counted. A gRPC request
    /// the waypoint answers itself gets its answer as gRPC (as Envoy does).
    async fn request(
        &self,
        req: Request<Incoming>,
        downstream: &Downstream,
    ) -> Response<upstream::Body> {
        let started = Instant::now();
        let Downstream {
            conn,
            client,
            target,
            metrics,
            resets: _,
        } = downstream;
        let grpc = is_grpc(req.headers());
        let access = Access::on().then(|| Access {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            destination: target.asked,
            endpoint: None,
        });
        let request_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut handled = self.handle(req, conn, client, target, &request_bytes).await;
        if handled.endpoint.is_none() && grpc {
            handled.response = grpc_local_reply(handled.response);
        }
        let endpoint = handled.endpoint.clone();
        let record = Record {
            conn: metrics.clone(),
            outcome: Outcome {
                destination: endpoint.clone().or_else(|| match &target.destination {
                    Destination::Workload(w) => Some(w.clone()),
                    Destination::Service(_) => None,
                }),
                grpc,
                response_code: handled.response.status(),
                flags: handled.flags,
                grpc_status: None,
            },
            started,
            request_bytes,
            access: access.map(|access| Access {
                endpoint: endpoint.map(|e| e.name.clone()),
                ..access
            }),
        };
        let grpc_status = handled
            .response
            .headers()
            .get(&GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        handled
            .response
            .map(|body| Metered::response(body, grpc_status, record).boxed())
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        conn: &Connection,
        client: &Identity,
        target: &Target,
        request_bytes: &Arc<std::sync::atomic::AtomicU64>,
    ) -> Handled {
        // HTTP/1.1's limits are hyper's (431 before this); HTTP/2's header block
        // size too: the count is checked here for both.
        if req.headers().len() > self.limits.max_headers {
            tracing::warn!(src = %client, dst = %target.asked, headers = req.headers().len(), "request refused (431): more than {} headers", self.limits.max_headers);
            return Handled::local(text(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request Header Fields Too Large\n",
            ));
        }
        let host = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let state = self.state.borrow().clone();
        // The path policy judges is the path the application gets: normalized
        // first, refused when that cannot be done safely.
        if let Err(why) = self.normalize_path(&mut req) {
            tracing::warn!(src = %client, dst = %target.asked, path = %req.uri().path(), "request refused (400): {why}");
            return Handled::local(text(StatusCode::BAD_REQUEST, "Bad Request: path\n"));
        }
        // What applies here, worked out once per destination and policy change.
        let policies = state
            .policies
            .at_waypoint((&self.key.0, &self.key.1), &target.services);
        // RequestAuthentication first: an invalid token is 401, none passes.
        let authentications = policies.request_authentications();
        // Boxed, as the other rare steps (ext_authz, dialing an endpoint): inline,
        // their futures made every request's larger, and moving a request's
        // future (into its task, into its box) copied them each time.
        let auth = match authentications.is_empty() {
            true => Ok(None),
            false => Box::pin(self.authenticate(authentications, &mut req)).await,
        };
        let auth = match auth {
            Ok(auth) => auth,
            Err(reason) => {
                tracing::warn!(src = %client, dst = %target.asked, path = %req.uri().path(), "request refused: JWT: {reason}");
                return Handled::local(text(StatusCode::UNAUTHORIZED, "Jwt verification fails"));
            }
        };
        let attributes = PolicyRequest {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            host: host.clone(),
            headers: req
                .headers()
                .iter()
                .filter_map(|(k, v)| {
                    v.to_str()
                        .ok()
                        .map(|v| (k.as_str().to_owned(), v.to_owned()))
                })
                .collect(),
            remote_ip: Some(forwarded::remote_ip(
                &req.headers()
                    .get_all("x-forwarded-for")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect::<Vec<_>>(),
                self.trusted_proxies,
                conn.source_ip,
            )),
            auth,
        };
        // CUSTOM first: the external authorizer of each matching policy.
        let custom = policies.custom_request(conn, &attributes);
        for (policy, provider) in &custom {
            match Box::pin(self.ext_authz(&state, provider, &req, client, conn, &host)).await {
                Ok(upstream_headers) => req.headers_mut().extend(upstream_headers),
                Err(response) => {
                    tracing::warn!(src = %client, dst = %target.asked, path = %attributes.path, %policy, %provider, "request denied by CUSTOM policy");
                    let mut handled = Handled::local(response);
                    handled.flags = Flag::UnauthorizedExternalService.into();
                    return handled;
                }
            }
        }
        let decision = policies.authorize_request(conn, Some(&attributes), true);
        if !decision.allow {
            tracing::warn!(
                src = %client,
                dst = %target.asked,
                method = %attributes.method,
                path = %attributes.path,
                policy = decision.policy.as_deref().unwrap_or("none"),
                "request denied: {}",
                decision.reason
            );
            return Handled::local(text(StatusCode::FORBIDDEN, "RBAC: access denied"));
        }
        self.forward(req, &host, &state, target, request_bytes)
            .await
    }

    /// Asks `provider` about the request: Ok(headers for upstream), or the response
    /// that denies it. Unknown providers and gRPC providers (not supported yet)
    /// deny: fail closed.
    async fn ext_authz(
        &self,
        state: &State,
        provider: &str,
        req: &Request<Incoming>,
        client: &Identity,
        conn: &Connection,
        host: &str,
    ) -> Result<http::HeaderMap, Response<upstream::Body>> {
        let deny = |why: String| {
            tracing::warn!(%provider, "ext authz: {why}");
            text(StatusCode::FORBIDDEN, "RBAC: access denied")
        };
        let Some(spec) = self.providers.get(provider) else {
            return Err(deny(
                "no such extension provider in the mesh config (fail closed)".into(),
            ));
        };
        let verdict = if let Some(grpc) = &spec.envoy_ext_authz_grpc {
            let Some(address) = resolve_provider(state, &grpc.service, grpc.port) else {
                return Err(deny(format!("cannot resolve {}", grpc.service)));
            };
            let context = extauthz::CheckContext {
                method: req.method(),
                path: req.uri().path_and_query().map_or("/", |p| p.as_str()),
                host,
                version: req.version(),
                headers: req.headers(),
                source_principal: client.to_string(),
                source: SocketAddr::new(conn.source_ip, 0),
                destination_principal: self.identity.to_string(),
                destination: SocketAddr::new(conn.destination_ip, conn.destination_port),
            };
            ext_authz::check_grpc(grpc, &self.grpc_client, address, context).await
        } else if let Some(http_provider) = &spec.envoy_ext_authz_http {
            let Some(address) = resolve_provider(state, &http_provider.service, http_provider.port)
            else {
                return Err(deny(format!("cannot resolve {}", http_provider.service)));
            };
            ext_authz::check_http(
                http_provider,
                &self.http_client,
                address,
                req.method(),
                req.uri().path(),
                req.headers(),
            )
            .await
        } else {
            return Err(deny(
                "the provider is neither envoyExtAuthzHttp nor envoyExtAuthzGrpc (fail closed)"
                    .into(),
            ));
        };
        match verdict {
            extauthz::Verdict::Allow(headers) => Ok(headers),
            extauthz::Verdict::Deny {
                status,
                headers,
                body,
                reason,
            } => {
                tracing::info!(%provider, "ext authz denied: {reason}");
                let mut response = Response::builder()
                    .status(status)
                    .body(Full::new(body).map_err(|never| match never {}).boxed())
                    .expect("a valid response");
                response.headers_mut().extend(headers);
                Err(response)
            }
        }
    }

    /// Replaces the request's path with its normalized form (the query stays).
    fn normalize_path(&self, req: &mut Request<Incoming>) -> Result<(), String> {
        let path = req.uri().path();
        if path_normalization::is_normalized(path) {
            return Ok(());
        }
        let normalized = path_normalization::normalize(path, self.path_normalization)
            .map_err(|e| e.to_string())?;
        if normalized == path {
            return Ok(());
        }
        let mut parts = req.uri().clone().into_parts();
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        parts.path_and_query = Some(
            format!("{normalized}{query}")
                .parse()
                .map_err(|e| format!("the normalized path: {e}"))?,
        );
        *req.uri_mut() =
            http::Uri::from_parts(parts).map_err(|e| format!("the normalized path: {e}"))?;
        Ok(())
    }

    /// Istio's labels that every request of a downstream connection has: its
    /// source and the service addressed (each request sets its own others).
    fn connection_labels(
        &self,
        state: &State,
        conn: &Connection,
        client: &Identity,
        target: &Target,
    ) -> RequestLabels {
        let source = source_workload(state, conn, client);
        RequestLabels {
            reporter: "waypoint".into(),
            source_workload: source.map_or(crate::metrics::UNKNOWN.into(), |w| {
                w.workload_name().to_owned()
            }),
            source_workload_namespace: source
                .map_or(crate::metrics::UNKNOWN.into(), |w| w.namespace.clone()),
            source_principal: client.to_string(),
            destination_service: target
                .service
                .as_ref()
                .map_or(crate::metrics::UNKNOWN.into(), |(ns, n)| {
                    format!("{n}.{ns}.svc")
                }),
            connection_security_policy: "mutual_tls".into(),
            ..Default::default()
        }
    }

    /// Validates the request's JWT, if it carries one, against the rules of
    /// `authentications`, and applies their outputs (token removal, payload and
    /// claim headers). Ok(None): no token.
    async fn authenticate(
        &self,
        authentications: &[Arc<RequestAuthentication>],
        req: &mut Request<Incoming>,
    ) -> Result<Option<RequestAuth>, TokenError> {
        // Most requests have no RequestAuthentication: no header copy for them.
        if authentications.is_empty() {
            return Ok(None);
        }
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .filter_map(|(k, v)| {
                v.to_str()
                    .ok()
                    .map(|v| (k.as_str().to_owned(), v.to_owned()))
            })
            .collect();
        if let Some((_, reason)) = authn::refused_by(authentications, &headers, req.uri().query()) {
            return Err(TokenError::RefusedByPolicy(reason));
        }
        let rules: Vec<&JwtRule> = authentications.iter().flat_map(|a| &a.rules).collect();
        if rules.is_empty() {
            return Ok(None);
        }
        let Some((token, location)) = find_token(&rules, &headers, req.uri().query()) else {
            return Ok(None);
        };
        let rule = authn::rule_for(&rules, &token)?;
        let jwks = match &rule.jwks {
            JwksSource::Inline(jwks) => Arc::new(jwks.clone()),
            JwksSource::Uri(uri) => self.fetch_jwks(uri).await.map_err(TokenError::NoKeys)?,
        };
        let auth = jwt::verify(&token, &jwks, &rule.issuer, &rule.audiences)?;
        let headers = req.headers_mut();
        if let (false, Location::Header(name)) = (rule.forward_original_token, &location) {
            headers.remove(name.as_str());
        }
        if let Some(header) = &rule.output_payload_to_header {
            if let (Some(payload), Ok(name)) = (
                token.split('.').nth(1),
                http::HeaderName::try_from(header.as_str()),
            ) {
                if let Ok(value) = http::HeaderValue::from_str(payload) {
                    headers.insert(name, value);
                }
            }
        }
        for (header, claim) in &rule.output_claim_to_headers {
            let value = match &auth.claims[claim] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => continue,
                other => other.to_string(),
            };
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::try_from(header.as_str()),
                http::HeaderValue::from_str(&value),
            ) {
                headers.insert(name, value);
            }
        }
        Ok(Some(auth))
    }

    /// A jwksUri's keys: cached, refreshed after JWKS_REFRESH. When a fetch fails
    /// the last good keys stay in use; with none, tokens from that issuer are
    /// refused (fail closed).
    async fn fetch_jwks(&self, uri: &str) -> Result<Arc<Jwks>, String> {
        let cached = self.jwks.lock().expect("not poisoned").get(uri).cloned();
        if let Some((jwks, fetched)) = &cached {
            if fetched.elapsed() < JWKS_REFRESH {
                return Ok(jwks.clone());
            }
        }
        match tokio::time::timeout(JWKS_TIMEOUT, fetch(&self.http_client, uri))
            .await
            .unwrap_or_else(|_| Err("timed out".into()))
        {
            Ok(jwks) => {
                let jwks = Arc::new(jwks);
                self.jwks
                    .lock()
                    .expect("not poisoned")
                    .insert(uri.to_owned(), (jwks.clone(), Instant::now()));
                Ok(jwks)
            }
            Err(e) => {
                tracing::warn!(%uri, "fetching the JWKS failed: {e}");
                cached
                    .map(|(jwks, _)| jwks)
                    .ok_or_else(|| format!("no keys from {uri}: {e}"))
            }
        }
    }

    /// Sends the request to one of the target's endpoints (the next in turn; on a
    /// connect failure or a refused stream, the one after), on a pooled connection
    /// in the protocol the Service port declares, else in the request's own.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        host: &str,
        state: &State,
        target: &Target,
        request_bytes: &Arc<std::sync::atomic::AtomicU64>,
    ) -> Handled {
        let protocol =
            target
                .protocol
                .http()
                .unwrap_or(if req.version() == http::Version::HTTP_2 {
                    Protocol::Http2
                } else {
                    Protocol::Http1
                });
        // HTTP/1.1 Upgrade (WebSocket): after policy, the two connections are
        // joined once the endpoint agrees (101).
        let upgrade = match protocol {
            Protocol::Http1 => upgrade_protocol(req.headers()),
            Protocol::Http2 => None,
        };
        let mut downstream_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let activity = idle::Activity::new(self.limits.stream_idle_timeout);
        let req = req.map(|body| {
            let body = Metered::request(body.map_err(Into::into).boxed(), request_bytes.clone());
            IdleBody::new(body.boxed(), activity.clone()).boxed()
        });
        let req = match upstream_request(req, host, target, protocol, upgrade) {
            Ok(req) => req,
            Err(e) => {
                tracing::warn!(dst = %target.asked, "request refused (400): {e}");
                return Handled::local(text(StatusCode::BAD_REQUEST, "Bad Request\n"));
            }
        };
        let endpoints = self.endpoints(state, target);
        if endpoints.is_empty() {
            tracing::warn!(dst = %target.asked, "no endpoint to forward to (UH)");
            let mut handled =
                Handled::local(text(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"));
            handled.flags = Flag::NoHealthyUpstream.into();
            return handled;
        }
        // HTTP/2: a small body is read whole first, so that a refused stream can
        // be retried. HTTP/1.1 has no refused streams: a request it did not send
        // comes back whole, with no copy.
        let kept = match protocol {
            Protocol::Http2 => retry::keep(req).await,
            Protocol::Http1 => Ok((req, None)),
        };
        let (mut req, replay) = match kept {
            Ok(kept) => kept,
            Err(_) if activity.expired() => return self.stream_timed_out(target, None),
            Err(e) => {
                tracing::warn!(dst = %target.asked, "request ended: its body failed: {e}");
                let mut handled =
                    Handled::local(text(StatusCode::BAD_REQUEST, "Bad Request: body\n"));
                handled.flags = Flag::DownstreamConnectionTermination.into();
                return handled;
            }
        };
        let mut flags = ResponseFlags::from(Flag::UpstreamConnectionTermination);
        for (attempt, endpoint) in endpoints.into_iter().enumerate() {
            let key = upstream::Key {
                endpoint: SocketAddr::new(IpAddr::V4(endpoint.ip), target.port),
                client: target.client.ip(),
                protocol,
            };
            let dial = || Box::pin(self.upstream_stream(endpoint, target.port, target.client));
            let sent = async {
                match downstream_upgrade.is_some() {
                    true => self.upstream().upstreams.send_upgrade(req, dial).await,
                    false => self.upstream().upstreams.send(&key, req, dial).await,
                }
            };
            let timed_out = || self.stream_timed_out(target, Some(endpoint));
            let sent = tokio::select! {
                sent = sent => sent,
                _ = activity.idle() => return timed_out(),
            };
            match sent {
                Ok(mut response) => {
                    if let (StatusCode::SWITCHING_PROTOCOLS, Some(downstream)) =
                        (response.status(), downstream_upgrade.take())
                    {
                        join_upgraded(downstream, hyper::upgrade::on(&mut response));
                    } else {
                        strip_hop_by_hop(response.headers_mut());
                    }
                    let response = response
                        .map(|b| IdleBody::new(b.map_err(Into::into).boxed(), activity).boxed());
                    return Handled {
                        response,
                        endpoint: Some(endpoint.clone()),
                        flags: ResponseFlags::NONE,
                    };
                }
                // A client that stalls mid-upload fails the request body: the
                // timeout's answer, not the upstream's failure.
                Err(_) if activity.expired() => return timed_out(),
                Err(e) => {
                    flags = match (e.connect_failure, attempt > 0) {
                        (true, false) => Flag::UpstreamConnectionFailure.into(),
                        (true, true) => ResponseFlags::from(Flag::UpstreamConnectionFailure)
                            .with(Flag::UpstreamRetryLimitExceeded),
                        (false, _) => Flag::UpstreamConnectionTermination.into(),
                    };
                    tracing::warn!(dst = %target.asked, endpoint = %endpoint.name, protocol = protocol.as_str(), "waypoint: upstream failed ({flags}): {}", e.error);
                    // Refused unprocessed: sent again from the copy, if kept.
                    let again = || replay.as_ref().map(retry::Replay::request);
                    match e.unsent.or_else(|| e.refused_stream.then(again).flatten()) {
                        Some(unsent) => req = unsent,
                        None => break,
                    }
                }
            }
        }
        let reason = if flags.contains(Flag::UpstreamConnectionFailure) {
            "connection failure"
        } else {
            "connection termination"
        };
        let mut handled = Handled::local(
            Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .header(http::header::CONTENT_TYPE, "text/plain")
                .body(
                    Full::new(Bytes::from(format!(
                        "upstream connect error or disconnect/reset before headers. reset reason: {reason} ({flags})"
                    )))
                    .map_err(|never| match never {})
                    .boxed(),
                )
                .expect("a valid response"),
        );
        handled.flags = flags;
        handled
    }
}

impl Waypoint {
    /// The answer to a request whose stream was idle for the stream idle timeout
    /// before its response headers.
    fn stream_timed_out(&self, target: &Target, endpoint: Option<&Workload>) -> Handled {
        let endpoint = endpoint.map_or("none", |e| e.name.as_str());
        tracing::warn!(dst = %target.asked, %endpoint, "request ended (408): its stream was idle for the stream idle timeout ({:?})", self.limits.stream_idle_timeout);
        let mut handled = Handled::local(text(StatusCode::REQUEST_TIMEOUT, "stream timeout"));
        handled.flags = Flag::StreamIdleTimeout.into();
        handled
    }
}

/// What became of one request.
struct Handled {
    response: Response<upstream::Body>,
    /// The endpoint that answered; None: the waypoint answered itself.
    endpoint: Option<Arc<Workload>>,
    flags: ResponseFlags,
}

impl Handled {
    fn local(response: Response<upstream::Body>) -> Self {
        Self {
            response,
            endpoint: None,
            flags: ResponseFlags::NONE,
        }
    }
}

/// The request as the endpoint gets it: HTTP/1.1 in origin form with a Host
/// header, or HTTP/2 with an absolute URI (its :authority); hop-by-hop headers
/// (this connection's, not the endpoint's) removed.
fn upstream_request(
    req: Request<upstream::Body>,
    host: &str,
    target: &Target,
    protocol: Protocol,
    upgrade: Option<http::HeaderValue>,
) -> Result<Request<upstream::Body>, Unforwardable> {
    let asked = target.asked;
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let authority = if host.is_empty() {
        asked.to_string()
    } else {
        host.to_owned()
    };
    let path = || parts.uri.path_and_query().map_or("/", |p| p.as_str());
    match protocol {
        Protocol::Http1 => {
            // Already in origin form (as HTTP/1.1 clients send): kept as it is.
            if parts.uri.authority().is_some() || parts.uri.scheme().is_some() {
                parts.uri = path().parse()?;
            }
            parts.version = http::Version::HTTP_11;
            parts
                .headers
                .insert(http::header::HOST, http::HeaderValue::from_str(&authority)?);
            if let Some(upgrade) = upgrade {
                parts.headers.insert(http::header::UPGRADE, upgrade);
                parts.headers.insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("upgrade"),
                );
            }
        }
        Protocol::Http2 => {
            // Already absolute with this authority (as HTTP/2 clients send it):
            // kept as it is.
            let absolute = parts.uri.scheme() == Some(&http::uri::Scheme::HTTP)
                && parts.uri.authority().map(|a| a.as_str()) == Some(authority.as_str());
            if !absolute {
                parts.uri = format!("http://{authority}{}", path()).parse()?;
            }
            parts.version = http::Version::HTTP_2;
            parts.headers.remove(http::header::HOST);
        }
    }
    // The request's id: the client's, or a new one (as Envoy's x-request-id).
    if !parts.headers.contains_key(&X_REQUEST_ID) {
        parts.headers.insert(
            X_REQUEST_ID.clone(),
            http::HeaderValue::from_str(&request_id())?,
        );
    }
    // The original client, appended (RFC 7239 §4): earlier elements are the
    // client's own say, the last one the waypoint's.
    let forwarded = match parts.headers.get(http::header::FORWARDED) {
        Some(earlier) => http::HeaderValue::from_bytes(
            &[earlier.as_bytes(), b", ", target.forwarded.as_bytes()].concat(),
        )?,
        None => target.forwarded.clone(),
    };
    parts.headers.insert(http::header::FORWARDED, forwarded);
    if !parts.headers.contains_key(&X_FORWARDED_PROTO) {
        parts.headers.insert(
            X_FORWARDED_PROTO.clone(),
            http::HeaderValue::from_static("http"),
        );
    }
    Ok(Request::from_parts(parts, body))
}

/// The workload a connection came from, when its certificate's identity is that
/// workload's: an address alone names no one.
fn source_workload<'a>(
    state: &'a State,
    conn: &Connection,
    client: &Identity,
) -> Option<&'a Arc<Workload>> {
    match conn.source_ip {
        IpAddr::V4(ip) => state.workload_by_ip(ip).filter(|w| &w.identity == client),
        IpAddr::V6(_) => None,
    }
}

/// The `forwarded` element naming the client.
fn forwarded_for(client: SocketAddr) -> http::HeaderValue {
    http::HeaderValue::from_str(&forwarded::for_client(client))
        .expect("an address is a valid value")
}

/// A random (version 4) UUID.
fn request_id() -> String {
    let (high, low) = (fastrand::u64(..), fastrand::u64(..));
    let high = (high & !0xf000) | 0x4000;
    let low = (low & !(0xc << 60)) | (0x8 << 60);
    // Hex digits written directly: this runs for every request without an id.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(36);
    for (i, nibble) in (0..16)
        .map(|i| (high >> (60 - 4 * i)) & 0xf)
        .chain((0..16).map(|i| (low >> (60 - 4 * i)) & 0xf))
        .enumerate()
    {
        if matches!(i, 8 | 12 | 16 | 20) {
            id.push('-');
        }
        id.push(HEX[nibble as usize] as char);
    }
    id
}

/// Hop-by-hop headers that are no standard `http::header` constant.
static KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");
// Named once: a name given as a string is parsed (and its case checked) each use.
static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
static X_FORWARDED_PROTO: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
static PROXY_CONNECTION: http::HeaderName = http::HeaderName::from_static("proxy-connection");

/// Removes the headers that describe one connection (RFC 9110 §7.6.1): those
/// `connection` names and the fixed set. `te: trailers` stays (gRPC needs it).
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // Most requests name no header in `connection`: nothing allocated for them.
    let named: Vec<http::HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| http::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| n != http::header::TE)
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        &http::header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &http::header::TRANSFER_ENCODING,
        &http::header::UPGRADE,
    ] {
        headers.remove(name);
    }
    let trailers_only = headers
        .get_all(http::header::TE)
        .iter()
        .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(http::header::TE);
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`connection: upgrade`
/// with `upgrade: <protocol>`), but h2c: that is this hop's business only.
fn upgrade_protocol(headers: &http::HeaderMap) -> Option<http::HeaderValue> {
    let asks = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = headers.get(http::header::UPGRADE)?;
    (asks && !protocol.as_bytes().eq_ignore_ascii_case(b"h2c")).then(|| protocol.clone())
}

/// Relays between the client's and the endpoint's connections once both have
/// switched protocols.
fn join_upgraded(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((downstream, upstream)) => {
                let (mut downstream, mut upstream) =
                    (TokioIo::new(downstream), TokioIo::new(upstream));
                if let Err(e) = relay(&mut downstream, &mut upstream).await {
                    tracing::debug!("waypoint: upgraded connection: {e}");
                }
            }
            Err(e) => tracing::debug!("waypoint: upgrade failed: {e}"),
        }
    });
}

/// A gRPC request (`application/grpc`, `application/grpc+proto`, ...; not grpc-web).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v == "application/grpc"
                || v.starts_with("application/grpc+")
                || v.starts_with("application/grpc;")
        })
}

/// A reply the waypoint makes itself, as a gRPC client understands it (as Envoy
/// sends its local replies to gRPC requests): HTTP 200, trailers only, the status
/// mapped to a gRPC code and the text in `grpc-message`.
fn grpc_local_reply(response: Response<upstream::Body>) -> Response<upstream::Body> {
    use tonic::Code;
    let code = match response.status() {
        StatusCode::BAD_REQUEST => Code::Internal,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::Unimplemented,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    };
    let (parts, body) = response.into_parts();
    let message = async move {
        body.collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
            .unwrap_or_default()
    };
    // Local replies are small and already complete.
    let message = futures_util::FutureExt::now_or_never(message).unwrap_or_default();
    let mut reply = Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(Empty::new().map_err(|never| match never {}).boxed())
        .expect("a valid response");
    // Trailers-only: the status travels in the headers, with end of stream.
    let headers = reply.headers_mut();
    if tonic::Status::new(code, message)
        .add_header(headers)
        .is_err()
    {
        headers.insert("grpc-status", http::HeaderValue::from(code as i32));
    }
    for (name, value) in parts.headers.iter() {
        if name != http::header::CONTENT_TYPE && name != http::header::CONTENT_LENGTH {
            headers.append(name.clone(), value.clone());
        }
    }
    reply
}

/// A provider's address: an IP, or `name.namespace.svc[.cluster.local]` → the
/// service's VIP (the waypoint reaches it like any client).
fn resolve_provider(state: &State, service: &str, port: u16) -> Option<SocketAddr> {
    if let Ok(ip) = service.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, port));
    }
    let mut labels = service.split('.');
    let (name, namespace) = (labels.next()?, labels.next()?);
    let svc = state
        .services()
        .find(|s| s.name == name && s.namespace == namespace)?;
    Some(SocketAddr::new(IpAddr::V4(svc.vip), port))
}

/// GETs a JWKS over HTTP or HTTPS (the system's roots).
async fn fetch(client: &crate::http_client::Client, uri: &str) -> Result<Jwks, String> {
    let parsed: http::Uri = uri.parse().map_err(|e| format!("{e}"))?;
    if !matches!(parsed.scheme_str(), Some("http" | "https")) {
        return Err("only http:// and https:// jwksUri are supported".into());
    }
    let request = Request::get(parsed)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    // Never more than MAX_JWKS_BYTES in memory, whatever the server sends.
    let (parts, body) = crate::http_client::send(client, request, jwt::MAX_JWKS_BYTES)
        .await
        .map_err(|e| e.to_string())?;
    if !parts.status.is_success() {
        return Err(format!("HTTP {}", parts.status));
    }
    Jwks::parse(&String::from_utf8_lossy(&body)).map_err(|e| e.to_string())
}

fn text(code: StatusCode, body: &'static str) -> Response<upstream::Body> {
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(
            Full::new(Bytes::from_static(body.as_bytes()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("a valid response")
}

/// HTTP/1.x methods, and the HTTP/2 prior-knowledge preface.
fn looks_like_http(first: &[u8]) -> bool {
    const STARTS: [&[u8]; 10] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
        b"PRI * HTTP/2.0",
    ];
    STARTS.iter().any(|s| {
        first.starts_with(s) || (first.len() < s.len() && !first.is_empty() && s.starts_with(first))
    })
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A stream whose first bytes were already read.
struct Prefixed<S> {
    prefix: Vec<u8>,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An HBONE stream holding its pool slot.
struct Guarded {
    inner: H2Stream,
    _guard: ztunnel_hbone::pool::StreamGuard,
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_version_4_uuids() {
        let id = request_id();
        let groups: Vec<&str> = id.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{id}"
        );
        assert!(groups[2].starts_with('4'), "{id}");
        assert!("89ab".contains(&groups[3][..1]), "{id}");
        assert_ne!(request_id(), id);
    }

    #[test]
    fn hop_by_hop_headers_stay_on_their_connection() {
        let mut headers = http::HeaderMap::new();
        for (k, v) in [
            ("connection", "close, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "trailers"),
            ("x-kept", "yes"),
        ] {
            headers.insert(k, v.parse().unwrap());
        }
        strip_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["te", "x-kept"], "te: trailers stays for gRPC");
        headers.insert("te", "gzip".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert!(headers.get("te").is_none());
    }

    #[test]
    fn a_local_reply_to_grpc_is_a_trailers_only_grpc_status() {
        let reply = grpc_local_reply(text(StatusCode::FORBIDDEN, "RBAC: access denied"));
        assert_eq!(reply.status(), StatusCode::OK);
        assert_eq!(reply.headers()["content-type"], "application/grpc");
        let status = tonic::Status::from_header_map(reply.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(status.message(), "RBAC: access denied");
        assert!(http_body::Body::is_end_stream(reply.body()));
        let reply = grpc_local_reply(text(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"));
        assert_eq!(reply.headers()["grpc-status"], "14");
        let mut grpc = http::HeaderMap::new();
        grpc.insert("content-type", "application/grpc+proto".parse().unwrap());
        assert!(is_grpc(&grpc));
        grpc.insert("content-type", "application/grpc-web".parse().unwrap());
        assert!(!is_grpc(&grpc));
    }
}
