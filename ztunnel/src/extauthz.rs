//! External authorization for `action: CUSTOM` policies at the waypoint: the
//! providers of the mesh config (`extensionProviders`) and the HTTP check protocol
//! (`envoyExtAuthzHttp`). A provider that errors or times out denies, unless it is
//! `failOpen`.

use std::{collections::HashMap, net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

/// The parts of Istio's MeshConfig the mesh uses.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    #[serde(default)]
    pub extension_providers: Vec<ProviderSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderSpec {
    pub name: String,
    #[serde(default)]
    pub envoy_ext_authz_http: Option<HttpProvider>,
    #[serde(default)]
    pub envoy_ext_authz_grpc: Option<serde_yaml::Value>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpProvider {
    /// A host name (`name.namespace.svc[.cluster.local]`, resolved in the mesh
    /// state) or an IP address.
    pub service: String,
    pub port: u16,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub include_request_headers_in_check: Vec<String>,
    #[serde(default)]
    pub headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    pub status_on_error: Option<String>,
}

impl MeshConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: Self =
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        for provider in &config.extension_providers {
            if let Some(http) = &provider.envoy_ext_authz_http {
                parse_timeout(http.timeout.as_deref())
                    .with_context(|| format!("provider {}: timeout", provider.name))?;
            }
        }
        Ok(config)
    }

    pub fn providers(&self) -> HashMap<String, ProviderSpec> {
        self.extension_providers
            .iter()
            .map(|p| (p.name.clone(), p.clone()))
            .collect()
    }
}

fn parse_timeout(text: Option<&str>) -> Result<Duration> {
    let Some(text) = text else {
        return Ok(Duration::from_millis(600));
    };
    if let Some(ms) = text.strip_suffix("ms") {
        return Ok(Duration::from_millis(ms.parse()?));
    }
    let secs: f64 = text.strip_suffix('s').unwrap_or(text).parse()?;
    Ok(Duration::from_secs_f64(secs))
}

/// The provider's answer.
pub enum Verdict {
    /// Allowed: headers to add to the request sent upstream.
    Allow(HeaderMap),
    /// Denied: the status, headers and body to answer the client with.
    Deny {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        reason: String,
    },
}

/// Asks an HTTP provider about a request. `address` is where `provider.service`
/// resolved.
pub async fn check_http(
    provider: &HttpProvider,
    address: SocketAddr,
    method: &http::Method,
    path: &str,
    headers: &HeaderMap,
) -> Verdict {
    let timeout = parse_timeout(provider.timeout.as_deref()).unwrap_or(Duration::from_millis(600));
    let result = tokio::time::timeout(timeout, ask(provider, address, method, path, headers)).await;
    let failure = match result {
        Ok(Ok((status, response_headers, _))) if status.is_success() => {
            let mut upstream = HeaderMap::new();
            for name in &provider.headers_to_upstream_on_allow {
                for value in response_headers.get_all(name.as_str()) {
                    if let Ok(name) = http::HeaderName::try_from(name.as_str()) {
                        upstream.append(name, value.clone());
                    }
                }
            }
            return Verdict::Allow(upstream);
        }
        Ok(Ok((status, response_headers, body))) => {
            let mut downstream = HeaderMap::new();
            for name in &provider.headers_to_downstream_on_deny {
                for value in response_headers.get_all(name.as_str()) {
                    if let Ok(name) = http::HeaderName::try_from(name.as_str()) {
                        downstream.append(name, value.clone());
                    }
                }
            }
            return Verdict::Deny {
                status,
                headers: downstream,
                body,
                reason: format!("the provider answered {status}"),
            };
        }
        Ok(Err(e)) => format!("the provider failed: {e:#}"),
        Err(_) => format!("the provider did not answer within {timeout:?}"),
    };
    if provider.fail_open {
        tracing::warn!("ext authz: {failure}; failOpen: allowed");
        return Verdict::Allow(HeaderMap::new());
    }
    let status = provider
        .status_on_error
        .as_deref()
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::FORBIDDEN);
    Verdict::Deny {
        status,
        headers: HeaderMap::new(),
        body: Bytes::new(),
        reason: failure,
    }
}

async fn ask(
    provider: &HttpProvider,
    address: SocketAddr,
    method: &http::Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<(StatusCode, HeaderMap, Bytes)> {
    let tcp = TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method.clone())
        .uri(format!(
            "{}{path}",
            provider.path_prefix.as_deref().unwrap_or("")
        ))
        .header(http::header::HOST, provider.service.as_str())
        .body(Empty::<Bytes>::new())?;
    for name in &provider.include_request_headers_in_check {
        for value in headers.get_all(name.to_ascii_lowercase().as_str()) {
            request.headers_mut().append(
                http::HeaderName::try_from(name.to_ascii_lowercase())?,
                value.clone(),
            );
        }
    }
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    Ok((
        parts.status,
        parts.headers,
        body.collect().await?.to_bytes(),
    ))
}
