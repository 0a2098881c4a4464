//! Istio's CA API over TLS: authenticate the caller, check the CSR, check that the
//! workload runs on the caller's node, sign. Every refusal carries a gRPC status
//! saying why, is logged and counted by reason.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
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
    auth::{Authenticator, Caller, NodeAuthorizer},
    grpc::{self, Code, IstioCertificateRequest, IstioCertificateResponse, UnaryBody},
    Authority, Refusal,
};
use crate::identity::Identity;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
        metrics
    }
}

pub struct CaServer {
    authority: Arc<Authority>,
    authenticator: Arc<dyn Authenticator>,
    authorizer: Arc<dyn NodeAuthorizer>,
    metrics: CaMetrics,
}

impl CaServer {
    pub fn new(
        authority: Arc<Authority>,
        authenticator: Arc<dyn Authenticator>,
        authorizer: Arc<dyn NodeAuthorizer>,
        metrics: CaMetrics,
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
        })
    }

    /// TLS for the listener: a certificate for `dns_names` signed by this CA.
    pub fn tls_config(&self, dns_names: &[String]) -> Result<Arc<rustls::ServerConfig>> {
        let (chain, key) = self.authority.serving_certificate(dns_names)?;
        let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(
                crate::tls::parse_certs(&chain)?,
                crate::tls::parse_key(&key)?,
            )
            .context("the CA's serving certificate")?;
        config.alpn_protocols = vec![crate::tls::ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }

    /// Serves until the listener fails.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
    ) -> Result<()> {
        self.serve_until(listener, tls, std::future::pending())
            .await
    }

    /// Serves until `shutdown` completes, then closes every connection.
    pub async fn serve_until(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let acceptor = TlsAcceptor::from(tls);
        let mut connections = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => accepted.context("accepting")?,
                _ = &mut shutdown => return Ok(()), // dropping the JoinSet aborts them all
                Some(_) = connections.join_next() => continue,
            };
            let (server, acceptor) = (self.clone(), acceptor.clone());
            let _ = tcp.set_nodelay(true);
            connections.spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return tracing::debug!(%peer, "CA: TLS handshake failed: {e}"),
                    Err(_) => return tracing::debug!(%peer, "CA: TLS handshake timed out"),
                };
                let service = hyper::service::service_fn(move |req| {
                    let server = server.clone();
                    async move { Ok::<_, std::convert::Infallible>(server.handle(req).await) }
                });
                if let Err(e) = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await
                {
                    tracing::debug!(%peer, "CA: connection ended: {e}");
                }
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<UnaryBody> {
        if req.uri().path() != grpc::CREATE_CERTIFICATE_PATH {
            return status_response(
                Code::Unimplemented,
                &format!("no method {}", req.uri().path()),
            );
        }
        let token = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let body = match Limited::new(req.into_body(), grpc::MAX_MESSAGE + 5)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                return status_response(
                    Code::ResourceExhausted,
                    &format!("reading the request: {e}"),
                )
            }
        };
        let request: IstioCertificateRequest = match grpc::unframe(body) {
            Ok(r) => r,
            Err(e) => return status_response(Code::InvalidArgument, &e),
        };
        self.metrics.csr_requests.inc();
        match self.create_certificate(token.as_deref(), &request).await {
            Ok((identity, cert_chain)) => {
                self.metrics.issued.inc();
                tracing::info!(%identity, "CA: certificate issued");
                let response = IstioCertificateResponse { cert_chain };
                grpc_response(Some(grpc::frame(&response)), Code::Ok, "")
            }
            Err(refusal) => {
                self.metrics
                    .refused
                    .get_or_create(&ReasonLabels {
                        reason: refusal.reason().to_owned(),
                    })
                    .inc();
                tracing::warn!(reason = refusal.reason(), "CA: CSR refused: {refusal}");
                let code = match refusal {
                    Refusal::Unauthenticated(_) => Code::Unauthenticated,
                    Refusal::NotOnNode(_) | Refusal::NotOwnIdentity(_) => Code::PermissionDenied,
                    Refusal::Internal(_) => Code::Internal,
                    _ => Code::InvalidArgument,
                };
                status_response(code, &refusal.to_string())
            }
        }
    }

    /// The whole decision, apart from transport.
    pub async fn create_certificate(
        &self,
        token: Option<&str>,
        request: &IstioCertificateRequest,
    ) -> Result<(Identity, Vec<String>), Refusal> {
        let token = token.ok_or_else(|| Refusal::Unauthenticated("no bearer token".into()))?;
        let caller = self
            .authenticator
            .authenticate(token)
            .await
            .map_err(Refusal::Unauthenticated)?;
        let (identity, csr) = self.authority.check_csr(&request.csr)?;
        if let Some(asked) = impersonated(request) {
            if asked != identity.to_string() {
                return Err(Refusal::BadCsr(format!(
                    "{} asks for {asked} but the CSR is for {identity}",
                    grpc::IMPERSONATED_IDENTITY
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

fn impersonated(request: &IstioCertificateRequest) -> Option<String> {
    let field = request
        .metadata
        .as_ref()?
        .fields
        .get(grpc::IMPERSONATED_IDENTITY)?;
    match &field.kind {
        Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn grpc_response(data: Option<Bytes>, code: Code, message: &str) -> Response<UnaryBody> {
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, grpc::CONTENT_TYPE)
        .body(UnaryBody::new(data, grpc::status_trailers(code, message)))
        .expect("a valid response")
}

/// A "trailers-only" response: the status travels in the headers.
fn status_response(code: Code, message: &str) -> Response<UnaryBody> {
    let mut response = Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, grpc::CONTENT_TYPE)
        .body(UnaryBody::empty())
        .expect("a valid response");
    response
        .headers_mut()
        .extend(grpc::status_trailers(code, message));
    response
}
