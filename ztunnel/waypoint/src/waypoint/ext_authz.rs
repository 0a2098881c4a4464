//! Calling the extension providers of CUSTOM policies: the transport around the
//! protocol in [`crate::extauthz`]. HTTP providers on the waypoint's pooled HTTP
//! client; gRPC providers through tonic's generated client over hyper-util's pooled
//! HTTP/2 (h2c) client, as the CA client is tonic over our own hyper transport.
//! A provider that fails or does not answer in its timeout decides per
//! `failOpen` (denied by default: fail closed).

use std::{net::SocketAddr, time::Duration};

use http::HeaderMap;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as Pooled},
    rt::TokioExecutor,
};

use crate::{
    extauthz::{
        check_request, grpc_verdict, http_request, http_verdict, on_failure, parse_timeout, proto,
        CheckContext, GrpcProvider, HttpProvider, Verdict, MAX_RESPONSE_BYTES,
    },
    http_client,
};

/// Why a provider gave no answer (the request is then decided per `failOpen`).
#[derive(Debug, thiserror::Error)]
enum ProviderError {
    #[error("the check request: {0}")]
    Request(#[from] http::Error),
    #[error(transparent)]
    Send(#[from] http_client::SendError),
    #[error("the provider's address: {0}")]
    Uri(#[from] http::uri::InvalidUri),
    #[error("gRPC status {:?}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
}

/// When a provider's timeout cannot be read (it was checked at load).
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(600);

/// Asks an HTTP provider about a request. `address` is where `provider.service`
/// resolved.
pub async fn check_http(
    provider: &HttpProvider,
    client: &http_client::Client,
    address: SocketAddr,
    method: &http::Method,
    path: &str,
    headers: &HeaderMap,
) -> Verdict {
    let timeout = parse_timeout(provider.timeout.as_deref()).unwrap_or(DEFAULT_TIMEOUT);
    let ask = async {
        let request = http_request(provider, address, method, path, headers)?;
        Ok::<_, ProviderError>(http_client::send(client, request, MAX_RESPONSE_BYTES).await?)
    };
    let failure = match tokio::time::timeout(timeout, ask).await {
        Ok(Ok((parts, body))) => return http_verdict(provider, parts.status, &parts.headers, body),
        Ok(Err(e)) => format!("the provider failed: {e}"),
        Err(_) => format!("the provider did not answer within {timeout:?}"),
    };
    on_failure(
        provider.fail_open,
        provider.status_on_error.as_deref(),
        failure,
    )
}

/// The pooled HTTP/2 (h2c) client of the gRPC providers.
pub type GrpcClient = Pooled<HttpConnector, tonic::body::Body>;

pub fn grpc_client() -> GrpcClient {
    Pooled::builder(TokioExecutor::new())
        .http2_only(true)
        .build(http_client::connector())
}

/// Asks a gRPC provider (plaintext HTTP/2) about a request.
pub async fn check_grpc(
    provider: &GrpcProvider,
    client: &GrpcClient,
    address: SocketAddr,
    context: CheckContext<'_>,
) -> Verdict {
    let timeout = parse_timeout(provider.timeout.as_deref()).unwrap_or(DEFAULT_TIMEOUT);
    let failure = match tokio::time::timeout(timeout, ask_grpc(client, address, &context)).await {
        Ok(Ok(response)) => return grpc_verdict(response),
        Ok(Err(e)) => format!("the provider failed: {e}"),
        Err(_) => format!("the provider did not answer within {timeout:?}"),
    };
    on_failure(
        provider.fail_open,
        provider.status_on_error.as_deref(),
        failure,
    )
}

async fn ask_grpc(
    client: &GrpcClient,
    address: SocketAddr,
    context: &CheckContext<'_>,
) -> Result<proto::CheckResponse, ProviderError> {
    let origin: http::Uri = format!("http://{address}").parse()?;
    let mut authz = proto::AuthorizationClient::with_origin(client.clone(), origin)
        .max_decoding_message_size(MAX_RESPONSE_BYTES);
    let response = authz
        .check(check_request(context))
        .await
        .map_err(ProviderError::Status)?;
    Ok(response.into_inner())
}
