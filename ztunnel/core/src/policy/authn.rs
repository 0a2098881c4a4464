//! RequestAuthentication: which JWTs a waypoint accepts, where it finds them, and
//! what it passes on. A request without a token passes unauthenticated; a request
//! with an invalid one is refused (401).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::FieldError;
use crate::jwt::{Jwks, TokenError};

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
    /// Its targets could not be read: it applies to every waypoint target of its
    /// namespace (fail closed, with `refused`).
    pub any_target: bool,
    pub rules: Vec<JwtRule>,
    /// Rules that could not be compiled. They stay in force fail closed: a token
    /// where such a rule would look is refused (401), since no one can say it is
    /// valid; when even that cannot be read, every request is refused.
    pub refused: Vec<RefusedRule>,
}

/// A part of a RequestAuthentication that was refused, and where its tokens would be.
#[derive(Clone, Debug)]
pub struct RefusedRule {
    pub reason: FieldError,
    /// (header, prefix) and query parameters; None: unknown, every request is refused.
    pub locations: Option<(Vec<(String, String)>, Vec<String>)>,
}

/// The fields a RequestAuthentication spec has.
const SPEC_FIELDS: &[&str] = &["selector", "targetRef", "targetRefs", "jwtRules"];

impl RequestAuthentication {
    /// Compiles a RequestAuthentication as the config source's check does: Err with
    /// every reason when any part is refused.
    pub fn compile(
        namespace: &str,
        name: &str,
        spec: &serde_yaml::Value,
    ) -> Result<Self, super::Refusal> {
        let compiled = Self::compile_fail_closed(namespace, name, spec);
        match compiled.refused.is_empty() {
            true => Ok(compiled),
            false => Err(super::Refusal {
                problems: compiled.refused.iter().map(|r| r.reason.clone()).collect(),
                in_force: compiled.fail_closed_effect(),
            }),
        }
    }

    /// Compiles what can be compiled and keeps the rest in force fail closed: a
    /// RequestAuthentication we cannot read must never let through a token it
    /// would have refused (an application may trust the header the mesh passed).
    pub fn compile_fail_closed(namespace: &str, name: &str, spec: &serde_yaml::Value) -> Self {
        let mut refused = Vec::new();
        let unknown = |reason: FieldError| RefusedRule {
            reason,
            locations: None,
        };
        let empty = serde_yaml::Mapping::new();
        let map = match spec {
            serde_yaml::Value::Null => &empty,
            serde_yaml::Value::Mapping(m) => m,
            _ => {
                refused.push(unknown(FieldError {
                    path: "spec".into(),
                    problem: "not an object".into(),
                }));
                &empty
            }
        };
        let mut readable = refused.is_empty();
        for key in map.keys() {
            match key.as_str() {
                Some(k) if SPEC_FIELDS.contains(&k) => {}
                _ => refused.push(unknown(FieldError {
                    path: "spec".into(),
                    problem: format!(
                        "unknown field {key:?}, expected one of {}",
                        SPEC_FIELDS.join(", ")
                    ),
                })),
            }
            readable &= key.as_str().is_some_and(|k| SPEC_FIELDS.contains(&k));
        }
        let field = |name: &str| map.get(name).filter(|v| !v.is_null());
        let selector = match field("selector").map(super::read::<super::authz::Selector>) {
            None => None,
            Some(Ok(s)) => Some(s.match_labels),
            // Only a waypoint applies RequestAuthentication here, by targetRefs:
            // a bad selector is reported and changes nothing.
            Some(Err((below, e))) => {
                refused.push(RefusedRule {
                    reason: FieldError::spec(format!("selector{below}"), e),
                    locations: Some((Vec::new(), Vec::new())),
                });
                None
            }
        };
        let mut target_problems = Vec::new();
        let (targets, mut any_target) = super::authz::compile_targets(
            namespace,
            field("targetRef"),
            field("targetRefs"),
            &mut target_problems,
        );
        refused.extend(target_problems.into_iter().map(unknown));
        // A spec we cannot read might have named any target.
        any_target |= !readable;
        let mut rules = Vec::new();
        match field("jwtRules") {
            None => {}
            Some(serde_yaml::Value::Sequence(list)) => {
                for (i, rule) in list.iter().enumerate() {
                    match compile_rule(rule) {
                        Ok(rule) => rules.push(rule),
                        Err((path, problem)) => refused.push(RefusedRule {
                            reason: FieldError::spec(format!("jwtRules[{i}]{path}"), problem),
                            locations: rule_locations(rule),
                        }),
                    }
                }
            }
            Some(_) => refused.push(unknown(FieldError::spec("jwtRules", "not a list"))),
        }
        Self {
            name: format!("{namespace}/{name}"),
            namespace: namespace.to_owned(),
            selector,
            targets,
            any_target,
            rules,
            refused,
        }
    }

    /// What a refused RequestAuthentication does while in force.
    pub fn fail_closed_effect(&self) -> String {
        let scope = match self.any_target {
            true => "every waypoint target of its namespace",
            false => "its targets",
        };
        match self.refused.iter().any(|r| r.locations.is_none()) {
            true => format!("every request to {scope} is refused (401)"),
            false => format!(
                "requests to {scope} carrying a token where a refused rule looks are refused (401)"
            ),
        }
    }

    /// Why a request is refused by this policy's refused parts, if it is.
    fn refuses(&self, headers: &[(String, String)], query: Option<&str>) -> Option<String> {
        self.refused.iter().find_map(|rule| {
            let refuse = match &rule.locations {
                None => true,
                Some((from_headers, from_params)) => {
                    token_at(from_headers, from_params, headers, query).is_some()
                }
            };
            refuse.then(|| {
                format!(
                    "RequestAuthentication {} is refused ({}): fail closed",
                    self.name, rule.reason
                )
            })
        })
    }
}

/// The RequestAuthentication that could not be compiled and refuses this request
/// (fail closed), and why: (policy, reason).
pub fn refused_by(
    authentications: &[std::sync::Arc<RequestAuthentication>],
    headers: &[(String, String)],
    query: Option<&str>,
) -> Option<(String, String)> {
    authentications
        .iter()
        .find_map(|a| a.refuses(headers, query).map(|why| (a.name.clone(), why)))
}

/// The rule for a token's issuer, among those that apply.
pub fn rule_for<'a>(rules: &[&'a JwtRule], token: &str) -> Result<&'a JwtRule, TokenError> {
    let issuer = crate::jwt::issuer(token)?;
    rules
        .iter()
        .find(|r| r.issuer == issuer)
        .copied()
        .ok_or(TokenError::IssuerNotAccepted(issuer))
}

/// One `jwtRules` entry, or why it is refused: (the field's path under the rule,
/// what is wrong).
fn compile_rule(value: &serde_yaml::Value) -> Result<JwtRule, (String, String)> {
    let rule: RuleSpec = super::read(value)?;
    if rule.issuer.is_empty() {
        return Err((".issuer".into(), "required".into()));
    }
    if !rule.from_cookies.is_empty() {
        return Err((".fromCookies".into(), "not supported".into()));
    }
    let jwks = match (rule.jwks, rule.jwks_uri) {
        (Some(inline), _) => {
            JwksSource::Inline(Jwks::parse(&inline).map_err(|e| (".jwks".into(), e.to_string()))?)
        }
        (None, Some(uri)) if uri.starts_with("http://") || uri.starts_with("https://") => {
            JwksSource::Uri(uri)
        }
        (None, Some(uri)) => {
            return Err((".jwksUri".into(), format!("{uri:?} is not an http(s) URL")))
        }
        (None, None) => return Err((String::new(), "jwks or jwksUri is required".into())),
    };
    let (from_headers, from_params) = locations(
        rule.from_headers
            .into_iter()
            .map(|h| (h.name, h.prefix.unwrap_or_default()))
            .collect(),
        rule.from_params,
    );
    let _ = rule.timeout;
    Ok(JwtRule {
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
    })
}

/// Where a rule reads tokens: its headers (lower-cased) and parameters, or
/// Istio's defaults (`Authorization: Bearer `, `access_token`) when it names none.
fn locations(
    from_headers: Vec<(String, String)>,
    from_params: Vec<String>,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut from_headers: Vec<(String, String)> = from_headers
        .into_iter()
        .map(|(name, prefix)| (name.to_ascii_lowercase(), prefix))
        .collect();
    let mut from_params = from_params;
    if from_headers.is_empty() && from_params.is_empty() {
        from_headers.push(("authorization".into(), "Bearer ".into()));
        from_params.push("access_token".into());
    }
    (from_headers, from_params)
}

/// Where a refused rule would have read tokens, when its `fromHeaders` and
/// `fromParams` can still be read; None otherwise.
fn rule_locations(rule: &serde_yaml::Value) -> Option<(Vec<(String, String)>, Vec<String>)> {
    let rule = rule.as_mapping()?;
    let from_headers = match rule.get("fromHeaders") {
        None | Some(serde_yaml::Value::Null) => Vec::new(),
        Some(v) => serde_yaml::from_value::<Vec<HeaderSpec>>(v.clone())
            .ok()?
            .into_iter()
            .map(|h| (h.name, h.prefix.unwrap_or_default()))
            .collect(),
    };
    let from_params = match rule.get("fromParams") {
        None | Some(serde_yaml::Value::Null) => Vec::new(),
        Some(v) => serde_yaml::from_value::<Vec<String>>(v.clone()).ok()?,
    };
    Some(locations(from_headers, from_params))
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
    rules
        .iter()
        .find_map(|rule| token_at(&rule.from_headers, &rule.from_params, headers, query))
}

/// The token in the first of these headers (with its prefix) or parameters.
fn token_at(
    from_headers: &[(String, String)],
    from_params: &[String],
    headers: &[(String, String)],
    query: Option<&str>,
) -> Option<(String, Location)> {
    for (name, prefix) in from_headers {
        if let Some((_, value)) = headers.iter().find(|(k, _)| k == name) {
            if let Some(token) = value.strip_prefix(prefix.as_str()) {
                return Some((token.trim().to_owned(), Location::Header(name.clone())));
            }
        }
    }
    for param in from_params {
        let found = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|kv| kv.strip_prefix(&format!("{param}=")));
        if let Some(token) = found {
            return Some((token.to_owned(), Location::Param(param.clone())));
        }
    }
    None
}
