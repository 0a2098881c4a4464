//! The waypoint's outbound HTTP client, for JWKS from a `jwksUri` and for
//! `envoyExtAuthzHttp` providers: hyper-util's pooled client (connections kept and
//! reused per host), `http://` or `https://`. TLS is rustls with ring, trusting the
//! system's roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` when set).

use std::time::Duration;

use bytes::Bytes;
use http::{response::Parts, Request};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as Pooled},
    rt::TokioExecutor,
};

/// The pooled client; cheap to clone (clones share the pool).
pub type Client = Pooled<HttpsConnector<HttpConnector>, Empty<Bytes>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client trusting the system's roots. With none found, `https://` requests
/// fail verification (logged once here): nothing is trusted by default.
pub fn new() -> Client {
    let tls = HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(crate::tls::crypto_provider())
        .unwrap_or_else(|e| {
            tracing::warn!("no usable system roots ({e}): https:// fetches will fail");
            let config = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            HttpsConnectorBuilder::new().with_tls_config(config)
        });
    Pooled::builder(TokioExecutor::new()).build(
        tls.https_or_http()
            .enable_http1()
            .wrap_connector(connector()),
    )
}

/// A plain TCP connector for absolute `http(s)://` URIs, with a connect timeout
/// and no Nagle delay (requests and answers are small).
pub fn connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http
}

/// Why a request got no whole response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// With the causes: hyper-util's own message is only "client error (Connect)".
    #[error("requesting {uri}: {}", crate::error_chain(.error))]
    Request {
        uri: http::Uri,
        error: hyper_util::client::legacy::Error,
    },
    #[error("the response body: {error} (at most {max} bytes)")]
    Body {
        error: Box<dyn std::error::Error + Send + Sync>,
        max: usize,
    },
}

/// Sends `request` (an absolute URI); returns the response with its body, at most
/// `max` bytes of it: a larger body is an error, never read whole.
pub async fn send(
    client: &Client,
    request: Request<Empty<Bytes>>,
    max: usize,
) -> Result<(Parts, Bytes), SendError> {
    let uri = request.uri().clone();
    let response = client
        .request(request)
        .await
        .map_err(|error| SendError::Request { uri, error })?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, max)
        .collect()
        .await
        .map_err(|error| SendError::Body { error, max })?
        .to_bytes();
    Ok((parts, body))
}
