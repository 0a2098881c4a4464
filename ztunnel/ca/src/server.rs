//! Istio's CA API over TLS: authenticate the caller, check the CSR, check that the
//! workload runs on the caller's node, sign. Every refusal carries a gRPC status
//! saying why, is logged and counted by reason.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{
    api::{
        istio_certificate_service_server::{
            IstioCertificateService, IstioCertificateServiceServer,
        },
        IstioCertificateRequest, IstioCertificateResponse, IMPERSONATED_IDENTITY, MAX_MESSAGE,
    },
    auth::{Authenticator, Caller, NodeAuthorizer},
    Authority, Refusal,
};
use crate::identity::Identity;
use ztunnel_core::drain::Drain;

/// What clients may hold of the CA's listener.
#[derive(Clone, Debug)]
pub struct ServeLimits {
    /// A TLS handshake not finished by then is dropped.
    pub handshake_timeout: Duration,
    /// A connection with no call in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Connections open at once from one address (a node's tunnel needs one).
    pub max_connections_per_source: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_connections: 4096,
            max_connections_per_source: 64,
        }
    }
}

/// Calls in flight on one connection.
const MAX_STREAMS: u32 = 128;
/// After an idle connection is told to go away, how long it may take to close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Accept failures that lack a resource (EMFILE, ENFILE, ENOMEM) are retried
/// after a pause doubling up to this.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// One warning per kind of trouble per this interval; the rest are counted.
const WARN_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// The CA's metrics, with Istio's names where Istio has them.
#[derive(Clone, Default)]
pub struct CaMetrics {
    pub csr_requests: Counter,
    pub issued: Counter,
    pub refused: Family<ReasonLabels, Counter>,
    pub root_expiry: Gauge,
    pub connections: Gauge,
    pub connections_refused: Family<ReasonLabels, Counter>,
    pub accept_errors: Counter,
}

impl CaMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "citadel_server_csr_count",
            "CSRs received",
            metrics.csr_requests.clone(),
        );
        registry.register(
            "citadel_server_success_cert_issuance_count",
            "Certificates issued",
            metrics.issued.clone(),
        );
        registry.register(
            "ztunnel_ca_csr_refused",
            "CSRs refused, by reason",
            metrics.refused.clone(),
        );
        registry.register(
            "citadel_server_root_cert_expiry_timestamp",
            "Unix time the earliest root certificate expires",
            metrics.root_expiry.clone(),
        );
        registry.register(
            "ztunnel_ca_connections",
            "Connections open to the CA",
            metrics.connections.clone(),
        );
        registry.register(
            "ztunnel_ca_connections_refused",
            "Connections closed unserved, by reason",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "ztunnel_ca_accept_errors",
            "Failures to accept a connection (the CA keeps serving)",
            metrics.accept_errors.clone(),
        );
        metrics
    }
}

/// Why the CA's TLS listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("signing the CA's serving certificate: {0}")]
    Sign(rcgen::Error),
    #[error("the CA's serving certificate: {0}")]
    Pem(crate::tls::TlsError),
    #[error("the CA's TLS configuration: {0}")]
    Tls(rustls::Error),
}

pub struct CaServer {
    authority: Arc<Authority>,
    authenticator: Arc<dyn Authenticator>,
    authorizer: Arc<dyn NodeAuthorizer>,
    metrics: CaMetrics,
    limits: ServeLimits,
}

impl CaServer {
    pub fn new(
        authority: Arc<Authority>,
        authenticator: Arc<dyn Authenticator>,
        authorizer: Arc<dyn NodeAuthorizer>,
        metrics: CaMetrics,
    ) -> Arc<Self> {
        Self::with_limits(
            authority,
            authenticator,
            authorizer,
            metrics,
            ServeLimits::default(),
        )
    }

    pub fn with_limits(
        authority: Arc<Authority>,
        authenticator: Arc<dyn Authenticator>,
        authorizer: Arc<dyn NodeAuthorizer>,
        metrics: CaMetrics,
        limits: ServeLimits,
    ) -> Arc<Self> {
        let expiry = authority
            .root_not_after()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        metrics.root_expiry.set(expiry);
        Arc::new(Self {
            authority,
            authenticator,
            authorizer,
            metrics,
            limits,
        })
    }

    /// TLS for the listener: a certificate for `dns_names` signed by this CA.
    pub fn tls_config(
        &self,
        dns_names: &[String],
    ) -> Result<Arc<rustls::ServerConfig>, ServingError> {
        let (chain, key) = self
            .authority
            .serving_certificate(dns_names)
            .map_err(ServingError::Sign)?;
        let chain = crate::tls::parse_certs(&chain).map_err(ServingError::Pem)?;
        let key = crate::tls::parse_key(&key).map_err(ServingError::Pem)?;
        let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .and_then(|builder| builder.with_no_client_auth().with_single_cert(chain, key))
            .map_err(ServingError::Tls)?;
        config.alpn_protocols = vec![crate::tls::ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }

    /// Serves until the process ends.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        self.serve_until(listener, tls, std::future::pending())
            .await
    }

    /// Serves until `shutdown` completes, then closes every connection. A failing
    /// accept (out of file descriptors, an aborted connection) never ends it.
    pub async fn serve_until(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        self.serve_inner(listener, tls, shutdown, None).await
    }

    /// Serves until `drain` is signaled; then accepts no more, lets the calls in
    /// flight finish (each connection closes gracefully: HTTP/2 GOAWAY) and
    /// returns when every connection has closed. Run it as drained work, so that
    /// the process's grace period bounds it.
    pub async fn serve_draining(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        drain: Drain,
    ) {
        let signaled = drain.clone();
        self.serve_inner(
            listener,
            tls,
            async move { signaled.signaled().await },
            Some(drain),
        )
        .await
    }

    async fn serve_inner(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl std::future::Future<Output = ()>,
        drain: Option<Drain>,
    ) {
        let acceptor = TlsAcceptor::from(tls);
        let api = IstioCertificateServiceServer::from_arc(self.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let open = Arc::new(OpenConnections::default());
        let mut connections = tokio::task::JoinSet::new();
        let (mut accept_warning, mut cap_warning) = (Throttled::default(), Throttled::default());
        let mut backoff = Duration::ZERO;
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = &mut shutdown => break,
                Some(_) = connections.join_next() => continue,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => {
                    backoff = Duration::ZERO;
                    accepted
                }
                Err(e) => {
                    self.metrics.accept_errors.inc();
                    if is_connection_error(&e) {
                        continue; // that client's trouble, not the listener's
                    }
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                    accept_warning.warn(|suppressed| {
                        tracing::warn!(
                            suppressed,
                            "CA: accepting a connection failed, retrying in {backoff:?}: {e}"
                        )
                    });
                    // Connections ending meanwhile free what accept lacks.
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut shutdown => break,
                    }
                    continue;
                }
            };
            let slot = match open.take(peer.ip(), &self.limits) {
                Ok(slot) => slot,
                Err(reason) => {
                    self.metrics
                        .connections_refused
                        .get_or_create(&ReasonLabels {
                            reason: reason.into(),
                        })
                        .inc();
                    cap_warning.warn(|suppressed| {
                        tracing::warn!(
                            %peer,
                            reason,
                            suppressed,
                            "CA: too many connections, closing a new one"
                        )
                    });
                    continue; // dropping it closes it
                }
            };
            let (server, acceptor, api) = (self.clone(), acceptor.clone(), api.clone());
            let drain = drain.clone();
            let _ = tcp.set_nodelay(true);
            connections.spawn(async move {
                server.metrics.connections.inc();
                server
                    .serve_connection(acceptor, api, tcp, peer, drain)
                    .await;
                server.metrics.connections.dec();
                drop(slot);
            });
        }
        // The listener is closed. Draining: the connections close once their calls
        // are answered. Otherwise dropping the JoinSet aborts them all.
        drop(listener);
        if drain.is_some() {
            while connections.join_next().await.is_some() {}
        }
    }

    async fn serve_connection(
        &self,
        acceptor: TlsAcceptor,
        api: IstioCertificateServiceServer<CaServer>,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        drain: Option<Drain>,
    ) {
        let drained = async {
            match &drain {
                Some(drain) => drain.signaled().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(drained);
        let handshake = acceptor.accept(tcp);
        let handshake = tokio::time::timeout(self.limits.handshake_timeout, handshake);
        let tls = tokio::select! {
            done = handshake => match done {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, "CA: TLS handshake failed: {e}"),
                Err(_) => return tracing::debug!(%peer, "CA: TLS handshake timed out"),
            },
            // No call in flight yet: nothing to wait for.
            () = &mut drained => return tracing::debug!(%peer, "CA: draining, closing a connection in its handshake"),
        };
        let activity = Arc::new(Activity::new());
        let service = {
            let activity = activity.clone();
            hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
                use tonic::codegen::Service;
                request.extensions_mut().insert(Peer(peer));
                let busy = activity.begin();
                let call = api.clone().call(request);
                async move {
                    let response = call.await;
                    drop(busy);
                    response
                }
            })
        };
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(MAX_STREAMS)
            .serve_connection(TokioIo::new(tls), service);
        tokio::pin!(connection);
        let ended = tokio::select! {
            ended = connection.as_mut() => ended,
            _ = activity.idle_for(self.limits.idle_timeout) => {
                tracing::debug!(%peer, "CA: closing an idle connection");
                connection.as_mut().graceful_shutdown();
                tokio::time::timeout(CLOSE_GRACE, connection.as_mut())
                    .await
                    .unwrap_or(Ok(()))
            }
            // The calls in flight finish; the process's grace period bounds them.
            () = &mut drained => {
                connection.as_mut().graceful_shutdown();
                connection.as_mut().await
            }
        };
        if let Err(e) = ended {
            tracing::debug!(%peer, "CA: connection ended: {e}");
        }
    }

    /// The whole decision, apart from transport: `source` is the caller's address.
    pub async fn decide(
        &self,
        token: Option<&str>,
        source: IpAddr,
        request: &IstioCertificateRequest,
    ) -> Result<(Identity, Vec<String>), Refusal> {
        let token = token.ok_or_else(|| Refusal::Unauthenticated("no bearer token".into()))?;
        let caller = self.authenticator.authenticate(token, source).await?;
        let (identity, csr) = self.authority.check_csr(&request.csr)?;
        if let Some(asked) = impersonated(request) {
            if asked != identity.to_string() {
                return Err(Refusal::BadCsr(format!(
                    "{} asks for {asked} but the CSR is for {identity}",
                    IMPERSONATED_IDENTITY
                )));
            }
        }
        match caller {
            Caller::Node(node) => match self.authorizer.runs_on(&identity, &node) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(Refusal::NotOnNode(format!(
                        "no pod with service account {} in namespace {} runs on node {node}",
                        identity.service_account(),
                        identity.namespace(),
                    )))
                }
                Err(e) => return Err(Refusal::Internal(format!("looking up pods: {e}"))),
            },
            Caller::Workload {
                namespace,
                service_account,
            } => {
                if (identity.namespace(), identity.service_account())
                    != (namespace.as_str(), service_account.as_str())
                {
                    return Err(Refusal::NotOwnIdentity(format!(
                        "service account {namespace}/{service_account} may only ask for its own identity, not {identity}"
                    )));
                }
            }
        }
        let ttl = match request.validity_duration {
            0 => None,
            secs if secs > 0 => Some(Duration::from_secs(secs as u64)),
            secs => {
                return Err(Refusal::BadCsr(format!(
                    "negative validity_duration {secs}"
                )))
            }
        };
        let chain = self.authority.sign(&identity, &csr, ttl)?;
        Ok((identity, chain))
    }
}

/// The client's address, put in each request for the handler.
#[derive(Clone, Copy, Debug)]
struct Peer(SocketAddr);

#[tonic::async_trait]
impl IstioCertificateService for CaServer {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let source = request
            .extensions()
            .get::<Peer>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |p| p.0.ip());
        self.metrics.csr_requests.inc();
        match self
            .decide(token.as_deref(), source, request.get_ref())
            .await
        {
            Ok((identity, cert_chain)) => {
                self.metrics.issued.inc();
                // Whether a node proxy asked on the workload's behalf.
                let impersonated = impersonated(request.get_ref()).is_some();
                tracing::info!(%identity, impersonated, "CA: certificate issued");
                Ok(tonic::Response::new(IstioCertificateResponse {
                    cert_chain,
                }))
            }
            Err(refusal) => {
                self.metrics
                    .refused
                    .get_or_create(&ReasonLabels {
                        reason: refusal.reason().to_owned(),
                    })
                    .inc();
                tracing::warn!(%source, reason = refusal.reason(), "CA: CSR refused: {refusal}");
                Err(tonic::Status::new(refusal.code(), refusal.to_string()))
            }
        }
    }
}

fn impersonated(request: &IstioCertificateRequest) -> Option<String> {
    let field = request
        .metadata
        .as_ref()?
        .fields
        .get(IMPERSONATED_IDENTITY)?;
    match &field.kind {
        Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

/// An accept error that concerns one pending connection only (Linux's accept(2)
/// passes on its network errors): accept again at once.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | TimedOut
    ) || matches!(
        e.raw_os_error(),
        Some(
            libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

/// A warning at most once per [`WARN_EVERY`], saying how many were held back.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    fn warn(&mut self, log: impl FnOnce(u64)) {
        if self.last.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            self.suppressed += 1;
            return;
        }
        log(self.suppressed);
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

/// Connections open: in total, and by source address.
#[derive(Default)]
struct OpenConnections {
    counts: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One open connection, counted until dropped.
struct Slot {
    open: Arc<OpenConnections>,
    source: IpAddr,
}

impl OpenConnections {
    /// A slot for a new connection from `source`, or the cap that forbids one.
    fn take(self: &Arc<Self>, source: IpAddr, limits: &ServeLimits) -> Result<Slot, &'static str> {
        let mut counts = self.counts.lock().unwrap();
        let (total, by_source) = &mut *counts;
        if *total >= limits.max_connections {
            return Err("connection_cap");
        }
        let from_source = by_source.entry(source).or_default();
        if *from_source >= limits.max_connections_per_source {
            return Err("source_cap");
        }
        *total += 1;
        *from_source += 1;
        Ok(Slot {
            open: self.clone(),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.open.counts.lock().unwrap();
        let (total, by_source) = &mut *counts;
        *total -= 1;
        if let Some(n) = by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// Calls in flight on a connection, and when the last one ended.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

/// A call in flight, until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// Completes once no call has been in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let quiet = self.last.lock().unwrap().elapsed();
            if self.in_flight.load(Ordering::SeqCst) == 0 && quiet >= timeout {
                return;
            }
            let wait = timeout.saturating_sub(quiet).max(Duration::from_millis(50));
            tokio::time::sleep(wait).await;
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap() = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_in_total_and_per_source() {
        let open = Arc::new(OpenConnections::default());
        let limits = ServeLimits {
            max_connections: 3,
            max_connections_per_source: 2,
            ..Default::default()
        };
        let (a, b, c) = (
            IpAddr::from([10, 0, 0, 1]),
            IpAddr::from([10, 0, 0, 2]),
            IpAddr::from([10, 0, 0, 3]),
        );
        let a1 = open.take(a, &limits).unwrap();
        let _a2 = open.take(a, &limits).unwrap();
        assert_eq!(open.take(a, &limits).err(), Some("source_cap"));
        let _b1 = open.take(b, &limits).unwrap();
        assert_eq!(open.take(c, &limits).err(), Some("connection_cap"));
        drop(a1);
        let _c1 = open.take(c, &limits).unwrap();
        assert_eq!(open.counts.lock().unwrap().0, 3);
    }

    #[test]
    fn a_lack_of_file_descriptors_is_not_one_connections_error() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(!is_connection_error(&emfile));
        let aborted = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert!(is_connection_error(&aborted));
    }

    /// The CA's signing rules: which identity a caller may get, and every refusal.
    mod signing {
        use super::*;
        use crate::AuthorityOptions;

        /// Tokens → callers.
        struct Tokens(Vec<(&'static str, Caller)>);

        impl Authenticator for Tokens {
            fn authenticate<'a>(
                &'a self,
                token: &'a str,
                _source: IpAddr,
            ) -> crate::auth::AuthFuture<'a> {
                let found = self
                    .0
                    .iter()
                    .find(|(t, _)| *t == token)
                    .map(|(_, c)| c.clone());
                Box::pin(std::future::ready(
                    found.ok_or_else(|| Refusal::Unauthenticated("unknown token".into())),
                ))
            }
        }

        /// (node, namespace, service account) of the pods; `None`: the lookup fails.
        struct Pods(Option<Vec<(&'static str, &'static str, &'static str)>>);

        impl NodeAuthorizer for Pods {
            fn runs_on(&self, identity: &Identity, node: &str) -> Result<bool, String> {
                let pods = self.0.as_ref().ok_or("the API server is away")?;
                Ok(pods.iter().any(|(n, ns, sa)| {
                    *n == node && *ns == identity.namespace() && *sa == identity.service_account()
                }))
            }
        }

        fn server(name: &str, pods: Pods) -> Arc<CaServer> {
            let dir = std::env::temp_dir()
                .join(format!("ztunnel-ca-signing-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let authority = Authority::load_or_create(AuthorityOptions {
                dir: dir.clone(),
                trust_domain: "cluster.local".into(),
                default_ttl: Duration::from_secs(3600),
                max_ttl: Duration::from_secs(7200),
            })
            .unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            let tokens = Tokens(vec![
                ("node-a-token", Caller::Node("node-a".into())),
                (
                    "waypoint-token",
                    Caller::Workload {
                        namespace: "shop".into(),
                        service_account: "waypoint".into(),
                    },
                ),
            ]);
            CaServer::new(
                Arc::new(authority),
                Arc::new(tokens),
                Arc::new(pods),
                CaMetrics::default(),
            )
        }

        fn csr(sans: &[&str]) -> String {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names = sans
                .iter()
                .map(|s| match s.strip_prefix("dns:") {
                    Some(dns) => rcgen::SanType::DnsName(dns.try_into().unwrap()),
                    None => rcgen::SanType::URI((*s).try_into().unwrap()),
                })
                .collect();
            params.serialize_request(&key).unwrap().pem().unwrap()
        }

        fn request(csr: String) -> IstioCertificateRequest {
            IstioCertificateRequest {
                csr,
                validity_duration: 0,
                metadata: None,
            }
        }

        fn impersonating(csr: String, identity: &str) -> IstioCertificateRequest {
            let mut metadata = prost_types::Struct::default();
            metadata.fields.insert(
                IMPERSONATED_IDENTITY.to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(identity.into())),
                },
            );
            IstioCertificateRequest {
                metadata: Some(metadata),
                ..request(csr)
            }
        }

        const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
        const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
        const WAYPOINT: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";
        const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

        async fn decide(
            server: &CaServer,
            token: &str,
            request: IstioCertificateRequest,
        ) -> Result<Identity, Refusal> {
            server
                .decide(Some(token), PEER, &request)
                .await
                .map(|(identity, _)| identity)
        }

        #[tokio::test]
        async fn a_node_gets_only_the_identities_of_pods_on_it() {
            let pods = Pods(Some(vec![
                ("node-a", "shop", "web"),
                ("node-b", "shop", "db"),
            ]));
            let server = server("node", pods);
            let (identity, chain) = server
                .decide(Some("node-a-token"), PEER, &impersonating(csr(&[WEB]), WEB))
                .await
                .unwrap();
            assert_eq!(identity.to_string(), WEB);
            assert_eq!(chain.len(), 2, "the leaf, then the root");
            let leaf = crate::tls::parse_certs(&chain[0]).unwrap();
            assert_eq!(crate::tls::identity_of(&leaf[0]).unwrap().to_string(), WEB);
            let refused = decide(&server, "node-a-token", request(csr(&[DB])))
                .await
                .unwrap_err();
            assert!(matches!(refused, Refusal::NotOnNode(_)), "{refused}");
            assert_eq!(refused.reason(), "not_on_caller_node");
            // A node cannot ask for one identity in the CSR and another by name.
            let refused = decide(&server, "node-a-token", impersonating(csr(&[WEB]), DB))
                .await
                .unwrap_err();
            assert!(matches!(refused, Refusal::BadCsr(_)), "{refused}");
        }

        #[tokio::test]
        async fn when_the_pods_cannot_be_looked_up_nothing_is_signed() {
            let server = server("lookup", Pods(None));
            let refused = decide(&server, "node-a-token", request(csr(&[WEB])))
                .await
                .unwrap_err();
            assert!(matches!(refused, Refusal::Internal(_)), "{refused}");
        }

        #[tokio::test]
        async fn a_workload_gets_only_its_own_identity() {
            let server = server("own", Pods(Some(vec![("node-a", "shop", "web")])));
            let identity = decide(&server, "waypoint-token", request(csr(&[WAYPOINT])))
                .await
                .unwrap();
            assert_eq!(identity.to_string(), WAYPOINT);
            let refused = decide(&server, "waypoint-token", request(csr(&[WEB])))
                .await
                .unwrap_err();
            assert!(matches!(refused, Refusal::NotOwnIdentity(_)), "{refused}");
            assert_eq!(refused.reason(), "not_caller_identity");
        }

        #[tokio::test]
        async fn callers_and_csrs_that_do_not_qualify_are_refused_with_their_reason() {
            let server = server("refusals", Pods(Some(vec![("node-a", "shop", "web")])));
            let no_token = server
                .decide(None, PEER, &request(csr(&[WEB])))
                .await
                .unwrap_err();
            assert_eq!(no_token.reason(), "unauthenticated");
            let cases = [
                ("forged", request(csr(&[WEB])), "unauthenticated"),
                ("node-a-token", request("not a CSR".into()), "bad_csr"),
                (
                    "node-a-token",
                    request(csr(&[WEB, "dns:web.shop.svc"])),
                    "san_count",
                ),
                (
                    "node-a-token",
                    request(csr(&["spiffe://other.domain/ns/shop/sa/web"])),
                    "foreign_trust_domain",
                ),
                (
                    "node-a-token",
                    IstioCertificateRequest {
                        validity_duration: -1,
                        ..request(csr(&[WEB]))
                    },
                    "bad_csr",
                ),
                (
                    "node-a-token",
                    IstioCertificateRequest {
                        validity_duration: 7201,
                        ..request(csr(&[WEB]))
                    },
                    "ttl_too_long",
                ),
            ];
            for (token, request, reason) in cases {
                let refused = decide(&server, token, request).await.unwrap_err();
                assert_eq!(refused.reason(), reason, "{refused}");
            }
            assert_eq!(
                Refusal::TtlTooLong {
                    asked: Duration::from_secs(7201),
                    max: Duration::from_secs(7200)
                }
                .to_string(),
                "requested lifetime 7201s exceeds the maximum 7200s"
            );
            // The longest allowed lifetime is signed.
            let ok = IstioCertificateRequest {
                validity_duration: 7200,
                ..request(csr(&[WEB]))
            };
            assert!(decide(&server, "node-a-token", ok).await.is_ok());
        }
    }

    #[test]
    fn throttled_warnings_count_what_they_hold_back() {
        let mut throttled = Throttled::default();
        let mut logged = Vec::new();
        for _ in 0..5 {
            throttled.warn(|suppressed| logged.push(suppressed));
        }
        assert_eq!(logged, vec![0]);
        assert_eq!(throttled.suppressed, 4);
    }
}
