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

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::{body::Incoming, client::conn::http1::SendRequest};
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
    ca::client::{CaClient, CaClientConfig},
    certs::{CertManager, CertManagerConfig, WorkloadCert},
    config, extauthz, forwarded,
    identity::Identity,
    jwt::{self, Jwks},
    path_normalization,
    policy::{
        authn::{self, find_token, JwksSource, JwtRule, Location, RequestAuthentication},
        Connection, Request as PolicyRequest, RequestAuth,
    },
    proxy::{pool::Pool, relay},
    state::{MeshSettings, State, Workload},
    tls,
};

#[derive(Clone, Debug)]
pub struct WaypointOptions {
    pub source: config::Source,
    /// The Gateway this waypoint serves, and its namespace.
    pub name: String,
    pub namespace: String,
    /// This waypoint's own pod (its identity comes from its service account).
    pub pod: String,
    pub trust_domain: String,
    pub trust_domain_aliases: Vec<String>,
    pub root_namespace: String,
    pub ca_address: String,
    pub ca_server_name: String,
    pub ca_root: PathBuf,
    pub ca_token: PathBuf,
    pub cert_ttl: Duration,
    pub listen: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// Istio MeshConfig YAML with `extensionProviders` (for CUSTOM policies).
    pub mesh_config: Option<PathBuf>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    reporter: String,
    source_workload: String,
    source_principal: String,
    destination_workload: String,
    destination_principal: String,
    destination_service: String,
    request_protocol: String,
    response_code: String,
    connection_security_policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    /// `not_bound`, `unknown_destination` or `bad_request`.
    reason: String,
}

struct Waypoint {
    key: (String, String),
    identity: Identity,
    state: tokio::sync::watch::Receiver<Arc<State>>,
    certs: Arc<CertManager>,
    pool: Arc<Pool>,
    requests: Family<RequestLabels, Counter>,
    /// CONNECTs refused before any policy: destinations not bound here and the like.
    refused: Family<RefusedLabels, Counter>,
    path_normalization: path_normalization::Level,
    /// X-Forwarded-For hops believed (MeshConfig numTrustedProxies).
    trusted_proxies: usize,
    /// Extension providers of the mesh config, by name.
    providers: HashMap<String, extauthz::ProviderSpec>,
    /// JWKS fetched from jwksUri: (keys, when fetched).
    jwks: Mutex<HashMap<String, (Arc<Jwks>, Instant)>>,
}

/// How long a fetched JWKS is used before it is fetched again (on failure the
/// last good one stays in use).
const JWKS_REFRESH: Duration = Duration::from_secs(20 * 60);
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a CONNECT through the waypoint is going, and for whom.
#[derive(Clone)]
struct Target {
    /// The endpoint chosen, and the port on it.
    workload: Arc<Workload>,
    port: u16,
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
}

/// Why a CONNECT is refused before any policy.
enum Refusal {
    /// Not a Service VIP or workload whose binding is this waypoint.
    NotBound(String),
    UnknownDestination(String),
}

/// How long a starting waypoint waits to find its own pod in the config.
const OWN_POD_WAIT: Duration = Duration::from_secs(60);

pub async fn run(options: WaypointOptions) -> Result<()> {
    let settings = MeshSettings {
        node: String::new(),
        trust_domain: options.trust_domain.clone(),
        trust_domain_aliases: options.trust_domain_aliases.clone(),
        root_namespace: options.root_namespace.clone(),
    };
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
            _ => bail!(
                "pod {}/{} is not in the config (or has no address): the waypoint needs its own identity",
                options.namespace,
                options.pod
            ),
        }
    };
    let states = crate::state::spawn_updates(snapshots, settings, config_metrics.bindings_refused);

    let requests = Family::<RequestLabels, Counter>::default();
    registry.register(
        "istio_requests",
        "HTTP requests through the waypoint",
        requests.clone(),
    );
    let refused = Family::<RefusedLabels, Counter>::default();
    registry.register(
        "ztunnel_waypoint_connects_refused",
        "CONNECTs the waypoint refused before any policy, by reason (not_bound: a destination not bound to this waypoint)",
        refused.clone(),
    );
    let mesh_config = match &options.mesh_config {
        Some(path) => extauthz::MeshConfig::load(path)?,
        None => Default::default(),
    };
    let ca = CaClient::new(CaClientConfig::from_files(
        &options.ca_address,
        &options.ca_server_name,
        &options.ca_root,
        &options.ca_token,
    )?)?;
    let mut cert_config = CertManagerConfig::new(&options.trust_domain);
    cert_config.trust_domain_aliases = options.trust_domain_aliases.clone();
    cert_config.ttl = options.cert_ttl;
    let certs = CertManager::new(Arc::new(ca), cert_config, &mut registry);
    certs
        .fetch(&me.identity)
        .await
        .context("the waypoint's own certificate")?;

    let waypoint = Arc::new(Waypoint {
        key: (options.namespace.clone(), options.name.clone()),
        identity: me.identity.clone(),
        state: states,
        certs,
        pool: Pool::new(Default::default()),
        requests,
        refused,
        path_normalization: mesh_config
            .path_normalization()
            .map_err(|e| anyhow::anyhow!("pathNormalization: {e}"))?,
        trusted_proxies: mesh_config.trusted_proxies(),
        jwks: Mutex::new(HashMap::new()),
        providers: mesh_config.providers(),
    });
    let accept_metrics = AcceptMetrics::register(&mut registry);
    let metrics = TcpListener::bind(options.metrics_addr)
        .await
        .with_context(|| format!("binding {}", options.metrics_addr))?;
    let metrics_limiter = Limiter::new(Limits::http_endpoint(), accept_metrics.clone());
    tokio::spawn(crate::http_server::serve_with(
        Acceptor::new(metrics, metrics_limiter, "metrics"),
        crate::metrics::handler(Arc::new(Mutex::new(registry))),
    ));
    let listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("binding {}", options.listen))?;
    tracing::info!(waypoint = %format!("{}/{}", options.namespace, options.name), identity = %me.identity, listen = %options.listen, "waypoint running");
    let limiter = Limiter::new(Limits::proxy(), accept_metrics);
    Acceptor::new(listener, limiter, "waypoint")
        .serve(move |tcp, peer| {
            let waypoint = waypoint.clone();
            async move {
                if let Err(e) = waypoint.connection(tcp, peer).await {
                    tracing::debug!(%peer, "waypoint connection: {e:#}");
                }
            }
        })
        .await;
    Ok(())
}

impl Waypoint {
    async fn connection(self: Arc<Self>, tcp: Conn, peer: SocketAddr) -> Result<()> {
        let cert = self.certs.fetch(&self.identity).await?;
        let tls = tcp
            .handshake()
            .run(TlsAcceptor::from(cert.server_config()?).accept(tcp))
            .await
            .context("mTLS handshake")?;
        let client = tls::peer_identity(tls.get_ref().1.peer_certificates())?;
        let this = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let (this, client) = (this.clone(), client.clone());
            async move { Ok::<_, Infallible>(this.connect(client, peer, req)) }
        });
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(tls), service)
            .await
            .context("HTTP/2")?;
        Ok(())
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
                .ok_or_else(|| unknown("no such port"))?
                .target_port;
            if service.endpoints.is_empty() {
                return Err(unknown("no endpoints"));
            }
            let workload = service.endpoints[fastrand::usize(..service.endpoints.len())].clone();
            return Ok(Target {
                workload,
                port,
                service: Some(name.clone()),
                services: vec![name],
                asked,
                client,
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
            workload,
            port: asked.port(),
            service: None,
            asked,
            client,
        })
    }

    fn connect(
        self: Arc<Self>,
        client: Identity,
        peer: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Response<Empty<Bytes>> {
        let status = |code| {
            Response::builder()
                .status(code)
                .body(Empty::new())
                .expect("valid")
        };
        let refuse = |reason: &str, code: StatusCode, why: &str| {
            tracing::warn!(src = %client, %peer, "waypoint: CONNECT refused: {why}");
            self.refused
                .get_or_create(&RefusedLabels {
                    reason: reason.into(),
                })
                .inc();
            status(code)
        };
        if req.method() != Method::CONNECT {
            return refuse("bad_request", StatusCode::BAD_REQUEST, "not CONNECT");
        }
        let Some(asked) = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        else {
            return refuse(
                "bad_request",
                StatusCode::BAD_REQUEST,
                ":authority is not ip:port",
            );
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
                    .filter(|w| w.identity == client)
                    .map(|_| SocketAddr::new(ip, port.unwrap_or(peer.port()))),
                IpAddr::V6(_) => None,
            })
            .unwrap_or(peer);
        let target = match self.resolve(&state, asked, client_addr) {
            Ok(target) => target,
            Err(Refusal::NotBound(why)) => {
                return refuse(
                    "not_bound",
                    StatusCode::FORBIDDEN,
                    &format!("{asked}: {why}"),
                )
            }
            Err(Refusal::UnknownDestination(why)) => {
                return refuse("unknown_destination", StatusCode::SERVICE_UNAVAILABLE, &why)
            }
        };
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let stream = match upgrade.await {
                Ok(upgraded) => TokioIo::new(upgraded),
                Err(e) => return tracing::debug!("waypoint upgrade: {e}"),
            };
            if let Err(e) = self.stream(stream, client, target).await {
                tracing::debug!("waypoint stream: {e:#}");
            }
        });
        status(StatusCode::OK)
    }

    /// One tunnelled stream: HTTP gets L7 policy per request; anything else L4.
    async fn stream(
        self: Arc<Self>,
        mut stream: TokioIo<hyper::upgrade::Upgraded>,
        client: Identity,
        target: Target,
    ) -> Result<()> {
        let mut first = vec![0u8; 24];
        let n =
            match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut first)).await {
                Ok(read) => read?,
                Err(_) => 0, // the server speaks first: not HTTP
            };
        first.truncate(n);
        let conn = Connection {
            source_identity: Some(client.clone()),
            source_ip: target.client.ip(),
            destination_ip: target.asked.ip(),
            destination_port: target.asked.port(),
        };
        let stream = Prefixed {
            prefix: first.clone(),
            inner: stream,
        };
        if looks_like_http(&first) {
            let this = self.clone();
            let upstream: Arc<tokio::sync::Mutex<Option<SendRequest<Incoming>>>> = Arc::default();
            let service = hyper::service::service_fn(move |req| {
                let (this, conn, target, upstream, client) = (
                    this.clone(),
                    conn.clone(),
                    target.clone(),
                    upstream.clone(),
                    client.clone(),
                );
                async move {
                    Ok::<_, Infallible>(this.request(req, &conn, &client, &target, upstream).await)
                }
            });
            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
                .map_err(|e| anyhow::anyhow!("HTTP: {e}"))?;
            return Ok(());
        }
        let state = self.state.borrow().clone();
        let decision = state.policies.authorize_request(
            (&self.key.0, &self.key.1),
            &target.services,
            &conn,
            None,
            false,
        );
        if !decision.allow {
            tracing::warn!(src = %client, dst = %target.asked, "waypoint: connection denied: {}", decision.reason);
            return Ok(());
        }
        let mut upstream = self.upstream_stream(&target).await?;
        let mut stream = stream;
        relay(&mut stream, &mut upstream).await?;
        Ok(())
    }

    /// A byte stream to the chosen endpoint: HBONE when it is in the mesh.
    async fn upstream_stream(&self, target: &Target) -> Result<Box<dyn Io>> {
        let address = SocketAddr::new(IpAddr::V4(target.workload.ip), target.port);
        if !target.workload.captured {
            return Ok(Box::new(
                TcpStream::connect(address)
                    .await
                    .with_context(|| format!("connecting to {address}"))?,
            ));
        }
        let cert: Arc<WorkloadCert> = self.certs.fetch(&self.identity).await?;
        let hbone = SocketAddr::new(IpAddr::V4(target.workload.ip), crate::redirect::HBONE_PORT);
        let mut headers = http::HeaderMap::new();
        // Who the waypoint acts for: the client, as Istio's waypoint says it.
        headers.insert(
            "forwarded",
            http::HeaderValue::from_str(&forwarded::for_client(target.client)).expect("an address"),
        );
        let (upgraded, guard) = self
            .pool
            .connect(&cert, &target.workload.identity, hbone, address, headers)
            .await?;
        Ok(Box::new(Guarded {
            inner: TokioIo::new(upgraded),
            _guard: guard,
        }))
    }

    async fn request(
        &self,
        mut req: Request<Incoming>,
        conn: &Connection,
        client: &Identity,
        target: &Target,
        upstream: Arc<tokio::sync::Mutex<Option<SendRequest<Incoming>>>>,
    ) -> Response<BoxBody<Bytes, hyper::Error>> {
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
            let response = text(StatusCode::BAD_REQUEST, "Bad Request: path\n");
            self.count(&state, conn, client, target, response.status());
            return response;
        }
        let service = &target.services;
        // RequestAuthentication first: an invalid token is 401, none passes.
        let authentications = state
            .policies
            .request_authentications((&self.key.0, &self.key.1), service);
        let auth = match self.authenticate(&authentications, &mut req).await {
            Ok(auth) => auth,
            Err(reason) => {
                tracing::warn!(src = %client, dst = %target.asked, path = %req.uri().path(), "request refused: JWT: {reason}");
                let response = text(StatusCode::UNAUTHORIZED, "Jwt verification fails");
                self.count(&state, conn, client, target, response.status());
                return response;
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
        let custom =
            state
                .policies
                .custom_request((&self.key.0, &self.key.1), service, conn, &attributes);
        for (policy, provider) in &custom {
            match self
                .ext_authz(&state, provider, &req, client, conn, &host)
                .await
            {
                Ok(upstream_headers) => req.headers_mut().extend(upstream_headers),
                Err(response) => {
                    tracing::warn!(src = %client, dst = %target.asked, path = %attributes.path, %policy, %provider, "request denied by CUSTOM policy");
                    self.count(&state, conn, client, target, response.status());
                    return response;
                }
            }
        }
        let decision = state.policies.authorize_request(
            (&self.key.0, &self.key.1),
            service,
            conn,
            Some(&attributes),
            true,
        );
        let response = if decision.allow {
            match self.forward(req, &host, target, &upstream).await {
                Ok(response) => response.map(|b| b.boxed()),
                Err(e) => {
                    tracing::warn!(dst = %target.asked, "waypoint: upstream failed: {e:#}");
                    text(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error\n")
                }
            }
        } else {
            tracing::warn!(
                src = %client,
                dst = %target.asked,
                method = %attributes.method,
                path = %attributes.path,
                policy = decision.policy.as_deref().unwrap_or("none"),
                "request denied: {}",
                decision.reason
            );
            text(StatusCode::FORBIDDEN, "RBAC: access denied")
        };
        self.count(&state, conn, client, target, response.status());
        response
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
    ) -> Result<http::HeaderMap, Response<BoxBody<Bytes, hyper::Error>>> {
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
                headers: req.headers(),
                source_principal: client.to_string(),
                source: SocketAddr::new(conn.source_ip, 0),
                destination: SocketAddr::new(conn.destination_ip, conn.destination_port),
            };
            extauthz::check_grpc(grpc, address, context).await
        } else if let Some(http_provider) = &spec.envoy_ext_authz_http {
            let Some(address) = resolve_provider(state, &http_provider.service, http_provider.port)
            else {
                return Err(deny(format!("cannot resolve {}", http_provider.service)));
            };
            extauthz::check_http(
                http_provider,
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

    /// `istio_requests_total` for one response.
    fn count(
        &self,
        state: &State,
        conn: &Connection,
        client: &Identity,
        target: &Target,
        status: StatusCode,
    ) {
        let source = match conn.source_ip {
            IpAddr::V4(ip) => state.workload_by_ip(ip).filter(|w| &w.identity == client),
            IpAddr::V6(_) => None,
        };
        self.requests
            .get_or_create(&RequestLabels {
                reporter: "waypoint".into(),
                source_workload: source.map_or(crate::metrics::UNKNOWN.into(), |w| {
                    w.workload_name().to_owned()
                }),
                source_principal: client.to_string(),
                destination_workload: target.workload.workload_name().to_owned(),
                destination_principal: target.workload.identity.to_string(),
                destination_service: target
                    .service
                    .as_ref()
                    .map_or(crate::metrics::UNKNOWN.into(), |(ns, n)| {
                        format!("{n}.{ns}.svc")
                    }),
                request_protocol: "http".into(),
                response_code: status.as_u16().to_string(),
                connection_security_policy: "mutual_tls".into(),
            })
            .inc();
    }

    /// Validates the request's JWT, if it carries one, against the rules of
    /// `authentications`, and applies their outputs (token removal, payload and
    /// claim headers). Ok(None): no token.
    async fn authenticate(
        &self,
        authentications: &[Arc<RequestAuthentication>],
        req: &mut Request<Incoming>,
    ) -> Result<Option<RequestAuth>, String> {
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
            return Err(reason);
        }
        let rules: Vec<&JwtRule> = authentications.iter().flat_map(|a| &a.rules).collect();
        if rules.is_empty() {
            return Ok(None);
        }
        let Some((token, location)) = find_token(&rules, &headers, req.uri().query()) else {
            return Ok(None);
        };
        let issuer = jwt::issuer(&token)?;
        let rule = rules
            .iter()
            .find(|r| r.issuer == issuer)
            .ok_or_else(|| format!("issuer {issuer:?} is not accepted"))?;
        let jwks = match &rule.jwks {
            JwksSource::Inline(jwks) => Arc::new(jwks.clone()),
            JwksSource::Uri(uri) => self.fetch_jwks(uri).await?,
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
        match tokio::time::timeout(JWKS_TIMEOUT, fetch(uri))
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

    /// Sends the request to the endpoint over this downstream connection's upstream
    /// (opened on first use, kept alive for the following requests).
    async fn forward(
        &self,
        req: Request<Incoming>,
        host: &str,
        target: &Target,
        upstream: &tokio::sync::Mutex<Option<SendRequest<Incoming>>>,
    ) -> Result<Response<Incoming>> {
        let (mut parts, body) = req.into_parts();
        // HTTP/1.1 upstream: origin-form URI and a Host header.
        parts.uri = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()?;
        parts.version = http::Version::HTTP_11;
        if !host.is_empty() {
            parts
                .headers
                .insert(http::header::HOST, http::HeaderValue::from_str(host)?);
        }
        let mut slot = upstream.lock().await;
        if slot.as_ref().is_none_or(|s| s.is_closed()) {
            let io = self.upstream_stream(target).await?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
            tokio::spawn(connection);
            *slot = Some(sender);
        }
        let sender = slot.as_mut().expect("set above");
        sender.ready().await?;
        Ok(sender
            .send_request(Request::from_parts(parts, body))
            .await?)
    }
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

/// GETs a JWKS over plain HTTP.
async fn fetch(uri: &str) -> Result<Jwks, String> {
    let parsed: http::Uri = uri.parse().map_err(|e| format!("{e}"))?;
    if parsed.scheme_str() != Some("http") {
        return Err("only http:// jwksUri is supported".into());
    }
    let authority = parsed.authority().ok_or("no host")?.clone();
    let address = if authority.port().is_some() {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let tcp = TcpStream::connect(&address)
        .await
        .map_err(|e| format!("connecting to {address}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = Request::get(parsed.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    // Never more than MAX_JWKS_BYTES in memory, whatever the server sends.
    let body = http_body_util::Limited::new(response.into_body(), jwt::MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("the body: {e} (at most {} bytes)", jwt::MAX_JWKS_BYTES))?
        .to_bytes();
    Jwks::parse(&String::from_utf8_lossy(&body))
}

fn text(code: StatusCode, body: &'static str) -> Response<BoxBody<Bytes, hyper::Error>> {
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
    inner: TokioIo<hyper::upgrade::Upgraded>,
    _guard: crate::proxy::pool::StreamGuard,
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
