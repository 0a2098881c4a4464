//! External authorization for `action: CUSTOM` policies at the waypoint: the
//! providers of the mesh config (`extensionProviders`) and the HTTP check protocol
//! (`envoyExtAuthzHttp`). A provider that errors or times out denies, unless it is
//! `failOpen`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::Empty;
use serde::Deserialize;

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
    /// How long a waypoint waits for a client's first bytes on a port that
    /// declares no protocol (`0s`: until the client speaks).
    #[serde(default)]
    pub protocol_detection_timeout: Option<String>,
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

/// Why the mesh config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum MeshConfigError {
    #[error("reading {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("parsing {}: {error}", path.display())]
    Parse {
        path: PathBuf,
        error: serde_yaml::Error,
    },
    #[error("provider {provider}: timeout: {error}")]
    Timeout { provider: String, error: BadTimeout },
    #[error("{}: pathNormalization.normalization: {error}", path.display())]
    PathNormalization { path: PathBuf, error: String },
    #[error("{}: protocolDetectionTimeout: {error}", path.display())]
    ProtocolDetectionTimeout { path: PathBuf, error: BadTimeout },
}

/// A provider `timeout` that is not a duration.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration (e.g. 600ms, 1.5s)")]
pub struct BadTimeout(pub String);

impl MeshConfig {
    pub fn load(path: &Path) -> Result<Self, MeshConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| MeshConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let config: Self = serde_yaml::from_str(&text).map_err(|error| MeshConfigError::Parse {
            path: path.to_owned(),
            error,
        })?;
        for provider in &config.extension_providers {
            if let Some(http) = &provider.envoy_ext_authz_http {
                parse_timeout(http.timeout.as_deref()).map_err(|error| {
                    MeshConfigError::Timeout {
                        provider: provider.name.clone(),
                        error,
                    }
                })?;
            }
        }
        config
            .path_normalization()
            .map_err(|error| MeshConfigError::PathNormalization {
                path: path.to_owned(),
                error,
            })?;
        config.protocol_detection_timeout().map_err(|error| {
            MeshConfigError::ProtocolDetectionTimeout {
                path: path.to_owned(),
                error,
            }
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
    /// `protocolDetectionTimeout`: None when not set; zero turns detection's
    /// timeout off.
    pub fn protocol_detection_timeout(&self) -> Result<Option<Duration>, BadTimeout> {
        self.protocol_detection_timeout
            .as_deref()
            .map(|text| parse_timeout(Some(text)))
            .transpose()
    }

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

/// A provider's `timeout` (600ms when unset).
pub fn parse_timeout(text: Option<&str>) -> Result<Duration, BadTimeout> {
    let Some(text) = text else {
        return Ok(Duration::from_millis(600));
    };
    let bad = || BadTimeout(text.to_owned());
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse().map(Duration::from_millis).map_err(|_| bad());
    }
    let secs: f64 = text
        .strip_suffix('s')
        .unwrap_or(text)
        .parse()
        .map_err(|_| bad())?;
    // Negative, infinite or NaN: refused, not a panic.
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
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

/// What an HTTP provider's answer decides: a 2xx allows (with the headers
/// `headersToUpstreamOnAllow` names), anything else denies with the provider's
/// status, body and the headers `headersToDownstreamOnDeny` names.
pub fn http_verdict(
    provider: &HttpProvider,
    status: StatusCode,
    response_headers: &HeaderMap,
    body: Bytes,
) -> Verdict {
    let pick = |names: &[String]| {
        let mut picked = HeaderMap::new();
        for name in names {
            for value in response_headers.get_all(name.as_str()) {
                if let Ok(name) = http::HeaderName::try_from(name.as_str()) {
                    picked.append(name, value.clone());
                }
            }
        }
        picked
    };
    if status.is_success() {
        return Verdict::Allow(pick(&provider.headers_to_upstream_on_allow));
    }
    Verdict::Deny {
        status,
        headers: pick(&provider.headers_to_downstream_on_deny),
        body,
        reason: format!("the provider answered {status}"),
    }
}

/// A provider that failed or timed out: allowed if `failOpen`, else denied with
/// `statusOnError` (403 by default).
pub fn on_failure(fail_open: bool, status_on_error: Option<&str>, failure: String) -> Verdict {
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

/// The check request to an HTTP provider at `address` (where `provider.service`
/// resolved): the request's method and path (after `pathPrefix`), no body, and
/// the headers `includeRequestHeadersInCheck` names.
pub fn http_request(
    provider: &HttpProvider,
    address: SocketAddr,
    method: &http::Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<Request<Empty<Bytes>>, http::Error> {
    let mut request = Request::builder()
        .method(method.clone())
        .uri(format!(
            "http://{address}{}{path}",
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
    Ok(request)
}

pub mod proto;

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
    /// The path with the query.
    pub path: &'a str,
    pub host: &'a str,
    pub version: http::Version,
    pub headers: &'a HeaderMap,
    /// The client's SPIFFE ID.
    pub source_principal: String,
    pub source: SocketAddr,
    /// The waypoint's own SPIFFE ID: it is the downstream connection's local end,
    /// as Envoy fills in `destination.principal`.
    pub destination_principal: String,
    pub destination: SocketAddr,
}

/// What a provider's CheckResponse decides: OK allows (with the headers for
/// upstream), any other code denies (with the provider's status, 403 by default,
/// headers and body).
pub fn grpc_verdict(response: proto::CheckResponse) -> Verdict {
    use proto::check_response::HttpResponse;
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
        return Verdict::Allow(match &response.http_response {
            Some(HttpResponse::OkResponse(ok)) => headers(&ok.headers),
            _ => HeaderMap::new(),
        });
    }
    let denied = match response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => denied,
        _ => Default::default(),
    };
    let status = denied
        .status
        .and_then(|s| u16::try_from(s.code).ok())
        .filter(|code| *code >= 100)
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::FORBIDDEN);
    Verdict::Deny {
        status,
        headers: headers(&denied.headers),
        body: Bytes::from(denied.body),
        reason: format!("the provider answered status {code}"),
    }
}

/// The CheckRequest for a request: its method, path, host and headers (repeated
/// ones joined with ",", as Envoy does), and both peers.
pub fn check_request(context: &CheckContext<'_>) -> proto::CheckRequest {
    use proto::attribute_context::{HttpRequest, Peer, Request};
    let peer = |addr: SocketAddr, principal: String| Peer {
        address: Some(proto::Address {
            address: Some(proto::address::Address::SocketAddress(
                proto::SocketAddress {
                    address: addr.ip().to_string(),
                    port_specifier: Some(proto::socket_address::PortSpecifier::PortValue(
                        addr.port().into(),
                    )),
                },
            )),
        }),
        principal,
    };
    let mut headers = std::collections::HashMap::<String, String>::new();
    for (name, value) in context.headers {
        let Ok(value) = value.to_str() else { continue };
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|joined| {
                joined.push(',');
                joined.push_str(value);
            })
            .or_insert_with(|| value.to_owned());
    }
    proto::CheckRequest {
        attributes: Some(proto::AttributeContext {
            source: Some(peer(context.source, context.source_principal.clone())),
            destination: Some(peer(
                context.destination,
                context.destination_principal.clone(),
            )),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: context.method.to_string(),
                    headers,
                    path: context.path.to_owned(),
                    host: context.host.to_owned(),
                    protocol: match context.version {
                        http::Version::HTTP_10 => "HTTP/1.0",
                        http::Version::HTTP_2 => "HTTP/2",
                        _ => "HTTP/1.1",
                    }
                    .into(),
                }),
            }),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use proto::check_response::HttpResponse;

    #[test]
    fn a_provider_timeout_is_a_duration_and_anything_else_a_typed_refusal() {
        assert_eq!(parse_timeout(None), Ok(Duration::from_millis(600)));
        assert_eq!(parse_timeout(Some("250ms")), Ok(Duration::from_millis(250)));
        assert_eq!(parse_timeout(Some("1.5s")), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_timeout(Some("2")), Ok(Duration::from_secs(2)));
        // Negative and infinite seconds once panicked in Duration::from_secs_f64.
        for bad in ["-1s", "inf", "NaN", "ten", "5m", "-3ms"] {
            assert_eq!(
                parse_timeout(Some(bad)),
                Err(BadTimeout(bad.to_owned())),
                "{bad}"
            );
        }
    }

    fn denied(code: i32, status: Option<i32>) -> proto::CheckResponse {
        proto::CheckResponse {
            status: Some(proto::RpcStatus {
                code,
                message: "no".into(),
            }),
            http_response: Some(HttpResponse::DeniedResponse(proto::DeniedHttpResponse {
                status: status.map(|code| proto::HttpStatus { code }),
                headers: vec![proto::HeaderValueOption {
                    header: Some(proto::HeaderValue {
                        key: "x-reason".into(),
                        value: "policy".into(),
                    }),
                }],
                body: "denied".into(),
            })),
        }
    }

    fn deny_status(verdict: Verdict) -> StatusCode {
        match verdict {
            Verdict::Deny { status, .. } => status,
            Verdict::Allow(_) => panic!("allowed"),
        }
    }

    #[test]
    fn a_bad_protocol_detection_timeout_is_refused_and_zero_kept_as_off() {
        let load = |yaml: &str| {
            let dir = std::env::temp_dir().join(format!("meshconfig-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{}.yaml", yaml.len()));
            std::fs::write(&path, yaml).unwrap();
            let loaded = MeshConfig::load(&path);
            std::fs::remove_file(&path).unwrap();
            loaded
        };
        let config = load("protocolDetectionTimeout: 0s\n").unwrap();
        assert_eq!(
            config.protocol_detection_timeout(),
            Ok(Some(Duration::ZERO))
        );
        let config = load("protocolDetectionTimeout: 100ms\n").unwrap();
        assert_eq!(
            config.protocol_detection_timeout(),
            Ok(Some(Duration::from_millis(100)))
        );
        assert_eq!(load("{}\n").unwrap().protocol_detection_timeout(), Ok(None));
        let refused = load("protocolDetectionTimeout: soon\n").unwrap_err();
        assert!(
            matches!(refused, MeshConfigError::ProtocolDetectionTimeout { .. }),
            "{refused}"
        );
    }

    #[test]
    fn an_ok_status_allows_with_the_providers_headers() {
        let response = proto::CheckResponse {
            status: Some(proto::RpcStatus::default()),
            http_response: Some(HttpResponse::OkResponse(proto::OkHttpResponse {
                headers: vec![proto::HeaderValueOption {
                    header: Some(proto::HeaderValue {
                        key: "x-auth-user".into(),
                        value: "alice".into(),
                    }),
                }],
            })),
        };
        let Verdict::Allow(headers) = grpc_verdict(response) else {
            panic!("denied")
        };
        assert_eq!(headers["x-auth-user"], "alice");
        // No status at all is OK too (proto3: code 0 is the default).
        assert!(matches!(
            grpc_verdict(proto::CheckResponse::default()),
            Verdict::Allow(_)
        ));
    }

    #[test]
    fn any_other_status_denies_with_the_providers_answer_or_403() {
        let Verdict::Deny {
            status,
            headers,
            body,
            ..
        } = grpc_verdict(denied(7, Some(418)))
        else {
            panic!("allowed")
        };
        assert_eq!(status, StatusCode::IM_A_TEAPOT);
        assert_eq!(headers["x-reason"], "policy");
        assert_eq!(body, "denied");
        // Unset, or not an HTTP status: 403.
        for code in [None, Some(0), Some(42), Some(70_000), Some(-1)] {
            assert_eq!(
                deny_status(grpc_verdict(denied(16, code))),
                StatusCode::FORBIDDEN
            );
        }
        // A non-OK status with an ok_response is still a denial.
        let mut response = denied(7, None);
        response.http_response = Some(HttpResponse::OkResponse(Default::default()));
        assert_eq!(deny_status(grpc_verdict(response)), StatusCode::FORBIDDEN);
    }

    #[test]
    fn an_http_answer_passes_on_only_the_headers_the_provider_config_names() {
        let provider: HttpProvider = serde_yaml::from_str(
            "{service: authz, port: 80, headersToUpstreamOnAllow: [x-user], headersToDownstreamOnDeny: [x-reason]}",
        )
        .unwrap();
        let mut answer = HeaderMap::new();
        for (k, v) in [("x-user", "alice"), ("x-reason", "r"), ("set-cookie", "s")] {
            answer.insert(k, v.parse().unwrap());
        }
        let Verdict::Allow(upstream) =
            http_verdict(&provider, StatusCode::OK, &answer, Bytes::new())
        else {
            panic!("denied")
        };
        assert_eq!(upstream.len(), 1);
        assert_eq!(upstream["x-user"], "alice");
        let Verdict::Deny {
            status,
            headers,
            body,
            ..
        } = http_verdict(&provider, StatusCode::UNAUTHORIZED, &answer, "no".into())
        else {
            panic!("allowed")
        };
        assert_eq!(
            (status, body),
            (StatusCode::UNAUTHORIZED, Bytes::from("no"))
        );
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-reason"], "r");
    }

    #[test]
    fn a_check_request_has_envoys_field_numbers() {
        let mut headers = HeaderMap::new();
        headers.append("x-test", "one".parse().unwrap());
        headers.append("x-test", "two".parse().unwrap());
        let context = CheckContext {
            method: &http::Method::POST,
            path: "/a?b=c",
            host: "web.shop",
            version: http::Version::HTTP_2,
            headers: &headers,
            source_principal: "spiffe://td/ns/a/sa/b".into(),
            source: "10.0.0.1:0".parse().unwrap(),
            destination_principal: "spiffe://td/ns/a/sa/wp".into(),
            destination: "10.96.0.1:80".parse().unwrap(),
        };
        let request = check_request(&context);
        let http = request
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .unwrap();
        assert_eq!(http.headers["x-test"], "one,two");
        assert_eq!(http.protocol, "HTTP/2");
        // CheckRequest.attributes (1) → AttributeContext.request (4) →
        // Request.http (2) → HttpRequest.path (4), by hand: the published numbers.
        let bytes = bytes::Bytes::from(request.encode_to_vec());
        let path = [1, 4, 2, 4].into_iter().fold(bytes, field);
        assert_eq!(path, "/a?b=c");
    }

    /// The length-delimited field `wanted` of a message, read by hand.
    fn field(mut message: Bytes, wanted: u32) -> Bytes {
        use prost::encoding::{decode_key, decode_varint, WireType};
        loop {
            let (number, wire) = decode_key(&mut message).unwrap();
            assert_eq!(wire, WireType::LengthDelimited);
            let len = decode_varint(&mut message).unwrap() as usize;
            let value = message.split_to(len);
            if number == wanted {
                return value;
            }
        }
    }
}
