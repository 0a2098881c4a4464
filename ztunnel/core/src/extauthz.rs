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
    /// `pathNormalization.normalization`: how the waypoint normalizes paths.
    #[serde(default)]
    pub path_normalization: Option<PathNormalizationSpec>,
    /// `defaultConfig.gatewayTopology.numTrustedProxies`: X-Forwarded-For hops
    /// the waypoint believes.
    #[serde(default)]
    pub default_config: Option<ProxyConfigSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PathNormalizationSpec {
    #[serde(default)]
    pub normalization: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfigSpec {
    #[serde(default)]
    pub gateway_topology: Option<GatewayTopologySpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayTopologySpec {
    #[serde(default)]
    pub num_trusted_proxies: u32,
}

/// The most of a provider's response body the waypoint reads: a larger one is a
/// failed check (denied unless `failOpen`).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderSpec {
    pub name: String,
    #[serde(default)]
    pub envoy_ext_authz_http: Option<HttpProvider>,
    #[serde(default)]
    pub envoy_ext_authz_grpc: Option<GrpcProvider>,
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
        config.path_normalization().map_err(|e| {
            anyhow::anyhow!("{}: pathNormalization.normalization: {e}", path.display())
        })?;
        Ok(config)
    }

    /// The waypoint's path normalization (MERGE_SLASHES unless set).
    pub fn path_normalization(&self) -> Result<crate::path_normalization::Level, String> {
        match self
            .path_normalization
            .as_ref()
            .and_then(|p| p.normalization.as_deref())
        {
            Some(name) => crate::path_normalization::Level::parse(name),
            None => Ok(Default::default()),
        }
    }

    /// How many proxies in front of the waypoint add to X-Forwarded-For (0: none
    /// is believed).
    pub fn trusted_proxies(&self) -> usize {
        self.default_config
            .as_ref()
            .and_then(|c| c.gateway_topology.as_ref())
            .map_or(0, |t| t.num_trusted_proxies as usize)
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
    on_failure(
        provider.fail_open,
        provider.status_on_error.as_deref(),
        failure,
    )
}

/// A provider that failed or timed out: allowed if `failOpen`, else denied with
/// `statusOnError` (403 by default).
fn on_failure(fail_open: bool, status_on_error: Option<&str>, failure: String) -> Verdict {
    if fail_open {
        tracing::warn!("ext authz: {failure}; failOpen: allowed");
        return Verdict::Allow(HeaderMap::new());
    }
    let status = status_on_error
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
        read_capped(body).await?.to_bytes(),
    ))
}

/// A provider's response body, at most MAX_RESPONSE_BYTES of it.
async fn read_capped(body: hyper::body::Incoming) -> Result<http_body_util::Collected<Bytes>> {
    http_body_util::Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("the response body: {e} (at most {MAX_RESPONSE_BYTES} bytes)"))
}

/// Envoy's gRPC authorization API (`envoy.service.auth.v3.Authorization/Check`),
/// the fields the waypoint sends and reads.
pub mod proto {
    use std::collections::HashMap;

    pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CheckRequest {
        #[prost(message, optional, tag = "1")]
        pub attributes: Option<AttributeContext>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeContext {
        #[prost(message, optional, tag = "1")]
        pub source: Option<Peer>,
        #[prost(message, optional, tag = "2")]
        pub destination: Option<Peer>,
        #[prost(message, optional, tag = "4")]
        pub request: Option<AttributeRequest>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Peer {
        #[prost(message, optional, tag = "1")]
        pub address: Option<Address>,
        #[prost(string, tag = "4")]
        pub principal: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Address {
        #[prost(message, optional, tag = "1")]
        pub socket_address: Option<SocketAddress>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SocketAddress {
        #[prost(string, tag = "2")]
        pub address: String,
        #[prost(uint32, tag = "3")]
        pub port_value: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeRequest {
        #[prost(message, optional, tag = "2")]
        pub http: Option<HttpRequest>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HttpRequest {
        #[prost(string, tag = "2")]
        pub method: String,
        #[prost(map = "string, string", tag = "3")]
        pub headers: HashMap<String, String>,
        #[prost(string, tag = "4")]
        pub path: String,
        #[prost(string, tag = "5")]
        pub host: String,
        #[prost(string, tag = "10")]
        pub protocol: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CheckResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<RpcStatus>,
        #[prost(message, optional, tag = "2")]
        pub denied_response: Option<DeniedHttpResponse>,
        #[prost(message, optional, tag = "3")]
        pub ok_response: Option<OkHttpResponse>,
    }

    /// google.rpc.Status
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RpcStatus {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DeniedHttpResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<HttpStatus>,
        #[prost(message, repeated, tag = "2")]
        pub headers: Vec<HeaderValueOption>,
        #[prost(string, tag = "3")]
        pub body: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OkHttpResponse {
        #[prost(message, repeated, tag = "2")]
        pub headers: Vec<HeaderValueOption>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HttpStatus {
        #[prost(int32, tag = "1")]
        pub code: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderValueOption {
        #[prost(message, optional, tag = "1")]
        pub header: Option<HeaderValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcProvider {
    pub service: String,
    pub port: u16,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub status_on_error: Option<String>,
}

/// What the waypoint tells a gRPC provider about a request.
pub struct CheckContext<'a> {
    pub method: &'a http::Method,
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    pub source_principal: String,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// Asks a gRPC provider (plaintext HTTP/2) about a request.
pub async fn check_grpc(
    provider: &GrpcProvider,
    address: SocketAddr,
    context: CheckContext<'_>,
) -> Verdict {
    let timeout = parse_timeout(provider.timeout.as_deref()).unwrap_or(Duration::from_millis(600));
    let failure = match tokio::time::timeout(timeout, ask_grpc(address, &context)).await {
        Ok(Ok(response)) => {
            let headers = |options: &[proto::HeaderValueOption]| {
                let mut map = HeaderMap::new();
                for header in options.iter().filter_map(|o| o.header.as_ref()) {
                    if let (Ok(k), Ok(v)) = (
                        http::HeaderName::try_from(header.key.as_str()),
                        http::HeaderValue::from_str(&header.value),
                    ) {
                        map.append(k, v);
                    }
                }
                map
            };
            let code = response.status.as_ref().map_or(0, |s| s.code);
            if code == 0 {
                return Verdict::Allow(
                    response
                        .ok_response
                        .as_ref()
                        .map(|o| headers(&o.headers))
                        .unwrap_or_default(),
                );
            }
            let denied = response.denied_response.unwrap_or_default();
            let status = denied
                .status
                .and_then(|s| StatusCode::from_u16(s.code as u16).ok())
                .filter(|s| s.as_u16() >= 100)
                .unwrap_or(StatusCode::FORBIDDEN);
            return Verdict::Deny {
                status,
                headers: headers(&denied.headers),
                body: Bytes::from(denied.body),
                reason: format!("the provider answered status {code}"),
            };
        }
        Ok(Err(e)) => format!("the provider failed: {e:#}"),
        Err(_) => format!("the provider did not answer within {timeout:?}"),
    };
    on_failure(
        provider.fail_open,
        provider.status_on_error.as_deref(),
        failure,
    )
}

async fn ask_grpc(address: SocketAddr, context: &CheckContext<'_>) -> Result<proto::CheckResponse> {
    use crate::ca::grpc;
    let peer = |addr: SocketAddr, principal: String| proto::Peer {
        address: Some(proto::Address {
            socket_address: Some(proto::SocketAddress {
                address: addr.ip().to_string(),
                port_value: addr.port().into(),
            }),
        }),
        principal,
    };
    let request = proto::CheckRequest {
        attributes: Some(proto::AttributeContext {
            source: Some(peer(context.source, context.source_principal.clone())),
            destination: Some(peer(context.destination, String::new())),
            request: Some(proto::AttributeRequest {
                http: Some(proto::HttpRequest {
                    method: context.method.to_string(),
                    headers: context
                        .headers
                        .iter()
                        .filter_map(|(k, v)| {
                            v.to_str()
                                .ok()
                                .map(|v| (k.as_str().to_owned(), v.to_owned()))
                        })
                        .collect(),
                    path: context.path.to_owned(),
                    host: context.host.to_owned(),
                    protocol: "HTTP/1.1".into(),
                }),
            }),
        }),
    };
    let tcp = TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    tcp.set_nodelay(true)?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await?;
    tokio::spawn(connection);
    let call = Request::post(format!("http://{address}{}", proto::CHECK_PATH))
        .header(http::header::CONTENT_TYPE, grpc::CONTENT_TYPE)
        .header("te", "trailers")
        .body(http_body_util::Full::new(grpc::frame(&request)))?;
    let response = sender.send_request(call).await?;
    let (parts, body) = response.into_parts();
    let collected = read_capped(body).await?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = trailers
        .get("grpc-status")
        .or(parts.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("0");
    anyhow::ensure!(status == "0", "gRPC status {status}");
    grpc::unframe(collected.to_bytes()).map_err(|e| anyhow::anyhow!(e))
}
