//! `ztunnel policy check`: what the data path would decide for a connection, from a
//! config directory, with the same engine ([`crate::policy::Index`]) the tunnel and
//! the waypoint call. It builds a [`State`], so it sits above both.

use std::{net::IpAddr, sync::Arc};

use serde::Serialize;

use crate::{
    config::Snapshot,
    jwt::TokenError,
    policy::{authn, Connection, Mode, Request},
    state::{MeshSettings, State, Waypoint, Workload},
};

/// HTTP details of the request to check (decided by a waypoint).
#[derive(Clone, Debug, Default)]
pub struct HttpQuery {
    pub method: String,
    pub path: String,
    /// `name=value` pairs.
    pub headers: Vec<(String, String)>,
    pub jwt: Option<String>,
    /// The waypoint's MeshConfig settings: how it normalizes paths, how many
    /// X-Forwarded-For hops it believes.
    pub path_normalization: crate::path_normalization::Level,
    pub trusted_proxies: usize,
}

/// A connection to check.
#[derive(Clone, Debug)]
pub struct Query {
    /// `namespace/pod`.
    pub from: String,
    /// `namespace/pod:port`, or `namespace/service:port` for service-addressed traffic.
    pub to: String,
    pub plaintext: bool,
    pub http: Option<HttpQuery>,
}

/// What the data path would answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Verdict {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
    /// An invalid JWT.
    #[serde(rename = "401")]
    Unauthenticated,
    /// A path the waypoint refuses.
    #[serde(rename = "400")]
    BadRequest,
}

/// Who decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    Ztunnel,
    Waypoint,
    /// Nothing enforces policy there.
    None,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Unauthenticated => "401",
            Self::BadRequest => "400",
        })
    }
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ztunnel => "ztunnel",
            Self::Waypoint => "waypoint",
            Self::None => "none",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub decision: Verdict,
    pub layer: Layer,
    pub policy: Option<String>,
    pub reason: String,
    pub notes: Vec<String>,
}

impl Outcome {
    pub fn allowed(&self) -> bool {
        self.decision == Verdict::Allow
    }

    fn new(
        decision: Verdict,
        layer: Layer,
        policy: Option<String>,
        reason: String,
        notes: Vec<String>,
    ) -> Self {
        Self {
            decision,
            layer,
            policy,
            reason,
            notes,
        }
    }
}

/// A query that names what the config does not have, or is malformed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0:?}: expected <namespace>/<name>")]
    Name(String),
    #[error("{0:?}: expected <namespace>/<pod>:<port>")]
    Destination(String),
    #[error("{0:?} is not a port")]
    Port(String),
    #[error("no pod {0} with an IP in the config")]
    NoPod(String),
    #[error("no pod or service {0} (with an IP) in the config")]
    NoDestination(String),
    #[error("service {0} has no port {1}")]
    NoServicePort(String, u16),
    #[error("service {0} has no endpoints")]
    NoEndpoints(String),
}

type Result<T> = std::result::Result<T, QueryError>;

fn split_name(text: &str) -> Result<(&str, &str)> {
    text.split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .ok_or_else(|| QueryError::Name(text.to_owned()))
}

/// The destination of the query: a pod, or a service (one of its endpoints).
struct Destination {
    workload: Arc<Workload>,
    port: u16,
    address: (IpAddr, u16),
    /// The Services whose waypoint policies apply: the one addressed, or those a
    /// pod going through its waypoint is an endpoint of.
    services: Vec<(String, String)>,
    waypoint: Option<Arc<Waypoint>>,
}

fn destination(state: &State, to: &str, notes: &mut Vec<String>) -> Result<Destination> {
    let (name, port) = to
        .rsplit_once(':')
        .ok_or_else(|| QueryError::Destination(to.to_owned()))?;
    let port: u16 = port
        .parse()
        .map_err(|_| QueryError::Port(port.to_owned()))?;
    let (ns, name) = split_name(name)?;
    if let Some(workload) = state.workload_by_name(ns, name) {
        binding_note(state, "Pod", ns, name, notes);
        let waypoint = workload
            .waypoint
            .as_ref()
            .and_then(|k| state.waypoint(k))
            .filter(|w| w.serves_workloads())
            .cloned();
        let services = waypoint.as_ref().map_or_else(Vec::new, |w| {
            state.bound_services(workload, &(w.namespace.clone(), w.name.clone()))
        });
        return Ok(Destination {
            workload: workload.clone(),
            port,
            address: (workload.ip.into(), port),
            services,
            waypoint,
        });
    }
    let service = state
        .services()
        .find(|s| s.namespace == ns && s.name == name)
        .ok_or_else(|| QueryError::NoDestination(format!("{ns}/{name}")))?;
    let target = service
        .ports
        .iter()
        .find(|p| p.port == port)
        .ok_or_else(|| QueryError::NoServicePort(format!("{ns}/{name}"), port))?
        .target_port;
    let workload = service
        .endpoints
        .first()
        .ok_or_else(|| QueryError::NoEndpoints(format!("{ns}/{name}")))?
        .clone();
    if service.endpoints.len() > 1 {
        notes.push(format!(
            "service {ns}/{name} has {} endpoints; checked against {}",
            service.endpoints.len(),
            workload.name
        ));
    }
    binding_note(state, "Service", ns, name, notes);
    let waypoint = service
        .waypoint
        .as_ref()
        .and_then(|k| state.waypoint(k))
        .filter(|w| w.serves_services())
        .cloned();
    Ok(Destination {
        workload,
        port: target,
        address: (service.vip.into(), port),
        services: vec![(service.namespace.clone(), service.name.clone())],
        waypoint,
    })
}

/// A note when the object's waypoint binding was refused.
fn binding_note(state: &State, kind: &str, ns: &str, name: &str, notes: &mut Vec<String>) {
    if let Some(reason) = state.refused_bindings.get(&format!("{kind} {ns}/{name}")) {
        notes.push(format!("{kind} {ns}/{name}: {reason}"));
    }
}

/// What the data path would decide for `query` in the mesh `snapshot` describes.
pub fn check(snapshot: Snapshot, settings: &MeshSettings, query: &Query) -> Result<Outcome> {
    let state = State::build(Arc::new(snapshot), settings);
    let (from_ns, from_pod) = split_name(&query.from)?;
    let Some(source) = state.workload_by_name(from_ns, from_pod).cloned() else {
        return Err(QueryError::NoPod(format!("{from_ns}/{from_pod}")));
    };
    let mut notes = Vec::new();
    let dst = destination(&state, &query.to, &mut notes)?;
    let plaintext = query.plaintext || !source.captured;
    if !source.captured && !query.plaintext {
        notes.push(format!(
            "{from_ns}/{from_pod} is not in the mesh: its traffic arrives in plaintext"
        ));
    }
    if source.captured {
        notes.push(match state.snapshot.allows_plaintext_udp(from_ns) {
            true => format!("policies judge TCP: UDP other than DNS from {from_ns}/{from_pod} leaves in plaintext, unjudged (namespace annotation {})", crate::config::ALLOW_PLAINTEXT_UDP_ANNOTATION),
            false => format!("policies judge TCP: UDP other than DNS from {from_ns}/{from_pod} is refused at the pod"),
        });
    }
    let identity = (!plaintext).then(|| source.identity.clone());

    if let Some(waypoint) = &dst.waypoint {
        let conn = Connection {
            source_identity: identity.clone(),
            source_ip: source.ip.into(),
            destination_ip: dst.address.0,
            destination_port: dst.address.1,
        };
        // The path as the waypoint judges it: normalized.
        let path = query.http.as_ref().map(|h| {
            crate::path_normalization::normalize(
                h.path.split('?').next().unwrap_or("/"),
                h.path_normalization,
            )
        });
        if let Some(Err(e)) = &path {
            let reason = format!("the waypoint refuses the path (400): {e}");
            return Ok(Outcome::new(
                Verdict::BadRequest,
                Layer::Waypoint,
                None,
                reason,
                notes,
            ));
        }
        let request = query.http.as_ref().map(|h| {
            let (authority, headers): (Vec<_>, Vec<_>) = h
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .partition(|(k, _)| k == ":authority");
            // As the waypoint: `hosts` match :authority (HTTP/2), else Host; without
            // either the client addressed the destination by IP.
            let host = authority
                .iter()
                .chain(headers.iter().filter(|(k, _)| k == "host"))
                .map(|(_, v)| v.clone())
                .next()
                .unwrap_or_else(|| format!("{}:{}", dst.address.0, dst.address.1));
            let forwarded_for: Vec<&str> = headers
                .iter()
                .filter(|(k, _)| k == "x-forwarded-for")
                .map(|(_, v)| v.as_str())
                .collect();
            let remote_ip =
                crate::forwarded::remote_ip(&forwarded_for, h.trusted_proxies, conn.source_ip);
            Request {
                method: h.method.clone(),
                path: path
                    .clone()
                    .and_then(std::result::Result::ok)
                    .unwrap_or_default(),
                host,
                headers,
                remote_ip: Some(remote_ip),
                auth: None,
            }
        });
        let mut request = request;
        let authentications = state
            .policies
            .request_authentications((&waypoint.namespace, &waypoint.name), &dst.services);
        if let (Some(h), Some(req)) = (query.http.as_ref(), request.as_ref()) {
            // The token, if given, where a RequestAuthentication looks by default.
            let mut headers = req.headers.clone();
            if let Some(token) = &h.jwt {
                headers.push(("authorization".into(), format!("Bearer {token}")));
            }
            let query_string = h.path.split_once('?').map(|(_, q)| q);
            if let Some((policy, reason)) =
                authn::refused_by(&authentications, &headers, query_string)
            {
                return Ok(Outcome::new(
                    Verdict::Unauthenticated,
                    Layer::Waypoint,
                    Some(policy),
                    reason,
                    notes,
                ));
            }
        }
        if let (Some(token), Some(req)) = (
            query.http.as_ref().and_then(|h| h.jwt.as_deref()),
            request.as_mut(),
        ) {
            let rules: Vec<&authn::JwtRule> =
                authentications.iter().flat_map(|a| &a.rules).collect();
            if rules.is_empty() {
                notes.push("no RequestAuthentication applies: the token is not read".into());
            } else {
                match validate_offline(token, &rules) {
                    Ok(auth) => req.auth = Some(auth),
                    Err(reason) => {
                        let reason = format!("Jwt verification fails: {reason}");
                        return Ok(Outcome::new(
                            Verdict::Unauthenticated,
                            Layer::Waypoint,
                            authentications.first().map(|a| a.name.clone()),
                            reason,
                            notes,
                        ));
                    }
                }
            }
        }
        if request.is_none() {
            notes.push("no HTTP details given: the waypoint judges the connection at L4".into());
        }
        let decision = state.policies.authorize_request(
            (&waypoint.namespace, &waypoint.name),
            &dst.services,
            &conn,
            request.as_ref(),
            false,
        );
        notes.extend(decision.notes.iter().cloned());
        notes.extend(decision.dry_run.iter().map(|d| format!("dry-run {d}")));
        notes.extend(
            decision
                .audit
                .iter()
                .map(|a| format!("AUDIT policy {a} matched")),
        );
        notes.push(format!(
            "through waypoint {}/{}",
            waypoint.namespace, waypoint.name
        ));
        if !decision.allow {
            return Ok(Outcome::new(
                Verdict::Deny,
                Layer::Waypoint,
                decision.policy,
                decision.reason,
                notes,
            ));
        }
        // Then the destination's tunnel, which sees the waypoint as the client.
        if let Some(wp) = waypoint.pods.first() {
            let conn = Connection {
                source_identity: Some(wp.identity.clone()),
                source_ip: wp.ip.into(),
                destination_ip: dst.workload.ip.into(),
                destination_port: dst.port,
            };
            if dst.workload.captured {
                let tunnel = state.policies.authorize(&dst.workload, &conn);
                if !tunnel.allow {
                    notes.extend(tunnel.notes);
                    notes.push("the destination's tunnel judges the waypoint's connection".into());
                    return Ok(Outcome::new(
                        Verdict::Deny,
                        Layer::Ztunnel,
                        tunnel.policy,
                        tunnel.reason,
                        notes,
                    ));
                }
            }
        }
        return Ok(Outcome::new(
            Verdict::Allow,
            Layer::Waypoint,
            decision.policy,
            decision.reason,
            notes,
        ));
    }

    if query.http.is_some() {
        notes.push("HTTP attributes are decided by a waypoint; no waypoint serves this destination, so only the tunnel's L4 decision applies".into());
    }
    if !dst.workload.captured {
        let reason = format!(
            "{}/{} is not in the mesh: no tunnel enforces policy for it",
            dst.workload.namespace, dst.workload.name
        );
        return Ok(Outcome::new(
            Verdict::Allow,
            Layer::None,
            None,
            reason,
            notes,
        ));
    }
    let conn = Connection {
        source_identity: identity,
        source_ip: source.ip.into(),
        destination_ip: dst.workload.ip.into(),
        destination_port: dst.port,
    };
    if plaintext {
        let (mode, policy) = state.policies.peer_authentication(&dst.workload, dst.port);
        if mode == Mode::Strict {
            let name = policy.clone().unwrap_or_default();
            return Ok(Outcome::new(
                Verdict::Deny,
                Layer::Ztunnel,
                policy,
                format!("plaintext refused: PeerAuthentication {name} is STRICT"),
                notes,
            ));
        }
    }
    let decision = state.policies.authorize(&dst.workload, &conn);
    notes.extend(decision.notes.iter().cloned());
    notes.extend(decision.dry_run.iter().map(|d| format!("dry-run {d}")));
    notes.extend(
        decision
            .audit
            .iter()
            .map(|a| format!("AUDIT policy {a} matched")),
    );
    let verdict = if decision.allow {
        Verdict::Allow
    } else {
        Verdict::Deny
    };
    Ok(Outcome::new(
        verdict,
        Layer::Ztunnel,
        decision.policy,
        decision.reason,
        notes,
    ))
}

/// Validates a token against rules with inline keys (a jwksUri is not fetched here).
fn validate_offline(
    token: &str,
    rules: &[&authn::JwtRule],
) -> std::result::Result<crate::jwt::RequestAuth, TokenError> {
    let rule = authn::rule_for(rules, token)?;
    match &rule.jwks {
        authn::JwksSource::Inline(jwks) => Ok(crate::jwt::verify(
            token,
            jwks,
            &rule.issuer,
            &rule.audiences,
        )?),
        authn::JwksSource::Uri(uri) => Err(TokenError::NoKeys(format!(
            "the keys are at {uri}; policy check does not fetch them"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{Namespace, Pod, Policy, AMBIENT, DATAPLANE_MODE};

    fn pod(name: &str, ip: [u8; 4]) -> Pod {
        Pod {
            uid: None,
            name: name.into(),
            namespace: "shop".into(),
            labels: Default::default(),
            annotations: BTreeMap::new(),
            service_account: name.into(),
            node_name: "n1".into(),
            ip: Some(ip.into()),
            netns: None,
            cgroup: None,
        }
    }

    /// shop (ambient): client and web, and `policies` (YAML specs by name).
    fn snapshot(policies: &[(&str, &str)]) -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.namespaces.insert(
            "shop".into(),
            Namespace {
                name: "shop".into(),
                labels: [(DATAPLANE_MODE.to_owned(), AMBIENT.to_owned())].into(),
                annotations: BTreeMap::new(),
            },
        );
        for p in [pod("client", [10, 0, 0, 1]), pod("web", [10, 0, 0, 2])] {
            snapshot
                .pods
                .insert((p.namespace.clone(), p.name.clone()), p);
        }
        for (name, spec) in policies {
            let policy = Policy::new(
                "AuthorizationPolicy",
                "security.istio.io/v1",
                "shop",
                name,
                BTreeMap::new(),
                serde_yaml::from_str(spec).unwrap(),
            );
            snapshot.policies.insert(
                (policy.kind.clone(), "shop".into(), name.to_string()),
                policy,
            );
        }
        snapshot
    }

    fn query(from: &str, to: &str) -> Query {
        Query {
            from: from.into(),
            to: to.into(),
            plaintext: false,
            http: None,
        }
    }

    fn ask(snapshot: Snapshot, from: &str, to: &str) -> Result<Outcome> {
        check(
            snapshot,
            &MeshSettings::new("n1", "cluster.local"),
            &query(from, to),
        )
    }

    #[test]
    fn the_verdict_and_layer_are_types_that_print_as_before() {
        let allowed = ask(snapshot(&[]), "shop/client", "shop/web:80").unwrap();
        assert_eq!(
            (allowed.decision, allowed.layer),
            (Verdict::Allow, Layer::Ztunnel)
        );
        assert!(allowed.allowed());
        let deny = "action: DENY\nrules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]";
        let denied = ask(
            snapshot(&[("no-client", deny)]),
            "shop/client",
            "shop/web:80",
        )
        .unwrap();
        assert_eq!(denied.decision, Verdict::Deny);
        assert_eq!(denied.policy.as_deref(), Some("shop/no-client"));
        let json = serde_json::to_value(&denied).unwrap();
        assert_eq!(json["decision"], "DENY");
        assert_eq!(json["layer"], "ztunnel");
        assert_eq!(
            format!("{} {}", Verdict::Unauthenticated, Layer::None),
            "401 none"
        );
    }

    #[test]
    fn a_query_naming_what_the_config_lacks_is_refused_with_a_typed_error() {
        let cases = [
            ("shop/ghost", "shop/web:80", "NoPod"),
            ("client", "shop/web:80", "Name"),
            ("shop/client", "shop/web", "Destination"),
            ("shop/client", "shop/web:http", "Port"),
            ("shop/client", "shop/nothing:80", "NoDestination"),
        ];
        for (from, to, expected) in cases {
            let err = ask(snapshot(&[]), from, to).unwrap_err();
            let kind = format!("{err:?}");
            assert!(kind.starts_with(expected), "{from} -> {to}: {kind}");
        }
    }
}
