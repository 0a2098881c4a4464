//! The tunnel's side of Istio's CA API: one HTTP/2 connection over TLS, reopened
//! when it breaks.

use std::{error::Error as _, path::PathBuf, sync::Arc, time::Duration};

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::{net::TcpStream, sync::Mutex};
use tokio_rustls::TlsConnector;

use super::api::{
    istio_certificate_service_client::IstioCertificateServiceClient, IstioCertificateRequest,
    IMPERSONATED_IDENTITY, MAX_MESSAGE,
};
use crate::identity::Identity;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Debug)]
pub struct CaClientConfig {
    /// `host:port` of the CA.
    pub address: String,
    /// The name the CA's certificate must carry.
    pub server_name: String,
    /// Roots that signed the CA's serving certificate.
    pub roots_pem: String,
    /// Where the roots come from, if a file: read again before every new
    /// connection, so a CA given a new root is trusted once the file says so (a
    /// ConfigMap volume follows the ConfigMap).
    pub roots_file: Option<PathBuf>,
    /// The caller's credential, re-read for every call (tokens rotate).
    pub token_file: PathBuf,
}

impl CaClientConfig {
    /// A client of the CA at `address` (named `server_name`), trusting the roots in
    /// `roots_file`, authenticated by the token in `token_file`.
    pub fn from_files(
        address: &str,
        server_name: &str,
        roots_file: &std::path::Path,
        token_file: &std::path::Path,
    ) -> Result<Self, CaConfigError> {
        Ok(Self {
            address: address.to_owned(),
            server_name: server_name.to_owned(),
            roots_pem: std::fs::read_to_string(roots_file).map_err(|error| {
                CaConfigError::Read {
                    path: roots_file.to_owned(),
                    error,
                }
            })?,
            roots_file: Some(roots_file.to_owned()),
            token_file: token_file.to_owned(),
        })
    }
}

/// Why a CA client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CaConfigError {
    #[error("reading {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the CA's roots: {0}")]
    Roots(crate::tls::TlsError),
    #[error("the CA's roots: {0}")]
    Tls(rustls::Error),
}

/// Why a call failed: the CA said no, it could not be reached, or it answered
/// something that is not a usable certificate chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaError {
    #[error("CA refused (gRPC status {code}): {message}")]
    Refused { code: i32, message: String },
    #[error("CA unreachable: {0}")]
    Unreachable(String),
    #[error("CA protocol error: {0}")]
    Protocol(String),
}

/// What [`CaApi::create_certificate`] returns.
pub type CertificateFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<String>, CaError>> + Send + 'a>>;

/// What the certificate manager asks of a CA: Istio's CA API through
/// [`CaClient`] (to `ztunnel-ca` or istiod), or a fake in tests.
pub trait CaApi: Send + Sync {
    /// A chain for the CSR (the leaf first, the roots last), asked on
    /// `identity`'s behalf, valid for `ttl`.
    fn create_certificate<'a>(
        &'a self,
        csr_pem: &'a str,
        identity: &'a Identity,
        ttl: Duration,
    ) -> CertificateFuture<'a>;
}

impl CaApi for CaClient {
    fn create_certificate<'a>(
        &'a self,
        csr_pem: &'a str,
        identity: &'a Identity,
        ttl: Duration,
    ) -> CertificateFuture<'a> {
        Box::pin(CaClient::create_certificate(self, csr_pem, identity, ttl))
    }
}

pub struct CaClient {
    config: CaClientConfig,
    /// The roots in force (as read) and the connector trusting them.
    tls: std::sync::Mutex<(String, TlsConnector)>,
    connection: Mutex<Option<SendRequest<tonic::body::Body>>>,
}

/// A TLS connector trusting exactly these roots.
fn connector(roots_pem: &str) -> Result<TlsConnector, CaConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for root in crate::tls::parse_certs(roots_pem).map_err(CaConfigError::Roots)? {
        roots.add(root).map_err(CaConfigError::Tls)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(CaConfigError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![crate::tls::ALPN_H2.to_vec()];
    Ok(TlsConnector::from(Arc::new(tls)))
}

impl CaClient {
    pub fn new(config: CaClientConfig) -> Result<Self, CaConfigError> {
        let tls = connector(&config.roots_pem)?;
        Ok(Self {
            tls: std::sync::Mutex::new((config.roots_pem.clone(), tls)),
            config,
            connection: Mutex::new(None),
        })
    }

    /// The connector for a new connection, trusting the roots file as it is now;
    /// one that cannot be read or parsed leaves the roots as they were.
    fn current_connector(&self) -> TlsConnector {
        let mut current = self.tls.lock().unwrap();
        if let Some(path) = &self.config.roots_file {
            match std::fs::read_to_string(path) {
                Ok(pem) if pem != current.0 => match connector(&pem) {
                    Ok(tls) => {
                        tracing::info!(file = %path.display(), "the CA's roots changed: trusting the new ones");
                        *current = (pem, tls);
                    }
                    Err(e) => tracing::warn!(
                        file = %path.display(),
                        "the CA's roots changed but are not usable, keeping the previous: {e:#}"
                    ),
                },
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    file = %path.display(),
                    "reading the CA's roots, keeping the previous: {e}"
                ),
            }
        }
        current.1.clone()
    }

    /// Asks for a certificate for `identity` (the CSR's SAN), on its behalf.
    pub async fn create_certificate(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let token = std::fs::read_to_string(&self.config.token_file).map_err(|e| {
            CaError::Unreachable(format!(
                "reading the token {}: {e}",
                self.config.token_file.display()
            ))
        })?;
        let mut metadata = prost_types::Struct::default();
        metadata.fields.insert(
            IMPERSONATED_IDENTITY.to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
            },
        );
        let message = IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: ttl.as_secs() as i64,
            metadata: Some(metadata),
        };
        let authorization: tonic::metadata::MetadataValue<_> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| CaError::Unreachable("the token is not a valid header value".into()))?;
        let origin: http::Uri = format!("https://{}", self.config.server_name)
            .parse()
            .map_err(|e| CaError::Unreachable(format!("server name: {e}")))?;
        let call = async {
            loop {
                let (sender, reused) = self.sender().await?;
                let mut client =
                    IstioCertificateServiceClient::with_origin(Http2(sender), origin.clone())
                        .max_decoding_message_size(MAX_MESSAGE);
                let mut request = tonic::Request::new(message.clone());
                request
                    .metadata_mut()
                    .insert("authorization", authorization.clone());
                match client.create_certificate(request).await {
                    Ok(response) => return check_chain(response.into_inner().cert_chain),
                    Err(status) if status.source().is_some() => {
                        // Never reuse a connection that failed a call.
                        *self.connection.lock().await = None;
                        let unsent = status
                            .source()
                            .is_some_and(|e| e.downcast_ref::<SendFailed>().is_some());
                        // One the CA closed (it restarted) may not look closed
                        // yet: that is no reason to fail, try a new one.
                        if !(reused && unsent) {
                            return Err(CaError::Unreachable(format!(
                                "the call failed: {}",
                                status.message()
                            )));
                        }
                    }
                    // No source: a status the CA sent.
                    Err(status) => {
                        return Err(CaError::Refused {
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        })
                    }
                }
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| CaError::Unreachable("the call timed out".into()))?
    }

    /// A connection to send on, and whether it was already open.
    async fn sender(&self) -> Result<(SendRequest<tonic::body::Body>, bool), CaError> {
        let mut slot = self.connection.lock().await;
        if let Some(sender) = slot.as_ref() {
            if !sender.is_closed() {
                return Ok((sender.clone(), true));
            }
        }
        let unreachable = |e: String| CaError::Unreachable(e);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.config.address))
            .await
            .map_err(|_| unreachable(format!("connecting to {} timed out", self.config.address)))?
            .map_err(|e| unreachable(format!("connecting to {}: {e}", self.config.address)))?;
        // Small request/response messages: Nagle would hold them for a delayed ACK.
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.config.server_name.clone())
            .map_err(|e| unreachable(format!("server name: {e}")))?;
        let tls = self.current_connector();
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name, tcp))
            .await
            .map_err(|_| unreachable("TLS handshake timed out".into()))?
            .map_err(|e| unreachable(format!("TLS handshake: {e}")))?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| unreachable(format!("HTTP/2 handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("CA connection ended: {e}");
            }
        });
        *slot = Some(sender.clone());
        Ok((sender, false))
    }
}

/// Istio's response: the leaf first, the root last. An empty chain is how a
/// response with the wrong field numbers decodes, so it is named precisely.
fn check_chain(chain: Vec<String>) -> Result<Vec<String>, CaError> {
    match chain.len() {
        0 => Err(CaError::Protocol(
            "IstioCertificateResponse.cert_chain (field 1) is empty".into(),
        )),
        1 => Err(CaError::Protocol(
            "IstioCertificateResponse.cert_chain (field 1) holds a certificate but no root".into(),
        )),
        _ => Ok(chain),
    }
}

/// A request that never reached the CA (the connection was closed): safe to retry.
#[derive(Debug)]
struct SendFailed(hyper::Error);

impl std::fmt::Display for SendFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sending the request: {}", self.0)
    }
}

impl std::error::Error for SendFailed {}

/// Our HTTP/2 connection as the service tonic's client calls.
struct Http2(SendRequest<tonic::body::Body>);

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Http2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = SendFailed;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, SendFailed>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), SendFailed>> {
        self.0.poll_ready(cx).map_err(SendFailed)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let response = self.0.send_request(request);
        Box::pin(async move { response.await.map_err(SendFailed) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_chain_is_a_protocol_error_naming_the_field() {
        let err = check_chain(vec![]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "CA protocol error: IstioCertificateResponse.cert_chain (field 1) is empty"
        );
        assert!(matches!(
            check_chain(vec!["leaf".into()]),
            Err(CaError::Protocol(_))
        ));
        assert_eq!(check_chain(vec!["a".into(), "b".into()]).unwrap().len(), 2);
    }
}
