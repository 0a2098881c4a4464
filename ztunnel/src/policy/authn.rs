//! RequestAuthentication: which JWTs a waypoint accepts, where it finds them, and
//! what it passes on. A request without a token passes unauthenticated; a request
//! with an invalid one is refused (401).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::jwt::Jwks;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    selector: Option<super::authz::Selector>,
    #[serde(default)]
    target_ref: Option<serde_yaml::Value>,
    #[serde(default)]
    target_refs: Option<Vec<serde_yaml::Value>>,
    #[serde(default)]
    jwt_rules: Vec<RuleSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleSpec {
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    jwks: Option<String>,
    #[serde(default)]
    jwks_uri: Option<String>,
    #[serde(default)]
    from_headers: Vec<HeaderSpec>,
    #[serde(default)]
    from_params: Vec<String>,
    #[serde(default)]
    forward_original_token: bool,
    #[serde(default)]
    output_payload_to_header: Option<String>,
    #[serde(default)]
    output_claim_to_headers: Vec<ClaimHeaderSpec>,
    #[serde(default)]
    from_cookies: Vec<String>,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderSpec {
    name: String,
    #[serde(default)]
    prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimHeaderSpec {
    header: String,
    claim: String,
}

/// Where a JWKS comes from.
#[derive(Clone, Debug)]
pub enum JwksSource {
    Inline(Jwks),
    /// Fetched over HTTP, cached and refreshed by the waypoint.
    Uri(String),
}

#[derive(Clone, Debug)]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks: JwksSource,
    /// (header, prefix); default `Authorization: Bearer `.
    pub from_headers: Vec<(String, String)>,
    /// Query parameters; default `access_token`.
    pub from_params: Vec<String>,
    pub forward_original_token: bool,
    pub output_payload_to_header: Option<String>,
    /// (header, claim)
    pub output_claim_to_headers: Vec<(String, String)>,
}

#[derive(Clone, Debug)]
pub struct RequestAuthentication {
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub targets: Vec<(String, String)>,
    pub rules: Vec<JwtRule>,
}

impl RequestAuthentication {
    pub fn compile(namespace: &str, name: &str, spec: &serde_yaml::Value) -> Result<Self, String> {
        let spec: Spec = if spec.is_null() {
            Spec::default()
        } else {
            serde_yaml::from_value(spec.clone()).map_err(|e| e.to_string())?
        };
        let mut targets = Vec::new();
        for (i, target) in spec
            .target_ref
            .iter()
            .chain(spec.target_refs.iter().flatten())
            .enumerate()
        {
            let field = |f: &str| target.get(f).and_then(|v| v.as_str()).map(str::to_owned);
            match (field("kind"), field("name")) {
                (Some(kind), Some(target_name)) => targets.push((kind, target_name)),
                _ => return Err(format!("targetRefs[{i}]: kind and name are required")),
            }
        }
        let mut rules = Vec::new();
        for (i, rule) in spec.jwt_rules.into_iter().enumerate() {
            if rule.issuer.is_empty() {
                return Err(format!("jwtRules[{i}].issuer: required"));
            }
            if !rule.from_cookies.is_empty() {
                return Err(format!("jwtRules[{i}].fromCookies: not supported"));
            }
            let jwks = match (rule.jwks, rule.jwks_uri) {
                (Some(inline), _) => JwksSource::Inline(
                    Jwks::parse(&inline).map_err(|e| format!("jwtRules[{i}].jwks: {e}"))?,
                ),
                (None, Some(uri)) if uri.starts_with("http://") || uri.starts_with("https://") => {
                    JwksSource::Uri(uri)
                }
                (None, Some(uri)) => {
                    return Err(format!(
                        "jwtRules[{i}].jwksUri: {uri:?} is not an http(s) URL"
                    ))
                }
                (None, None) => return Err(format!("jwtRules[{i}]: jwks or jwksUri is required")),
            };
            let mut from_headers: Vec<(String, String)> = rule
                .from_headers
                .into_iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.prefix.unwrap_or_default()))
                .collect();
            let mut from_params = rule.from_params;
            if from_headers.is_empty() && from_params.is_empty() {
                from_headers.push(("authorization".into(), "Bearer ".into()));
                from_params.push("access_token".into());
            }
            let _ = rule.timeout;
            rules.push(JwtRule {
                issuer: rule.issuer,
                audiences: rule.audiences,
                jwks,
                from_headers,
                from_params,
                forward_original_token: rule.forward_original_token,
                output_payload_to_header: rule
                    .output_payload_to_header
                    .map(|h| h.to_ascii_lowercase()),
                output_claim_to_headers: rule
                    .output_claim_to_headers
                    .into_iter()
                    .map(|c| (c.header.to_ascii_lowercase(), c.claim))
                    .collect(),
            });
        }
        Ok(Self {
            name: format!("{namespace}/{name}"),
            namespace: namespace.to_owned(),
            selector: spec.selector.map(|s| s.match_labels),
            targets,
            rules,
        })
    }
}

/// A token found in a request, and where: (header or param name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Header(String),
    Param(String),
}

/// The first token any rule would read from the request.
pub fn find_token(
    rules: &[&JwtRule],
    headers: &[(String, String)],
    query: Option<&str>,
) -> Option<(String, Location)> {
    for rule in rules {
        for (name, prefix) in &rule.from_headers {
            if let Some((_, value)) = headers.iter().find(|(k, _)| k == name) {
                if let Some(token) = value.strip_prefix(prefix.as_str()) {
                    return Some((token.trim().to_owned(), Location::Header(name.clone())));
                }
            }
        }
        for param in &rule.from_params {
            let found = query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix(&format!("{param}=")));
            if let Some(token) = found {
                return Some((token.to_owned(), Location::Param(param.clone())));
            }
        }
    }
    None
}
