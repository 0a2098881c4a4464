//! AuthorizationPolicy: parsing with Istio's validation, compiling to what the
//! tunnel can enforce at L4, and matching a connection.
//!
//! L7-only attributes (hosts, methods, paths, request principals, remote IP blocks,
//! `request.*` and other L7 `when` keys) cannot be seen by the tunnel. As Istio's
//! ambient mode documents: an ALLOW rule that needs any of them never matches; a
//! DENY (or AUDIT/CUSTOM) rule keeps only its L4 part, so it denies more, never less.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::matching::{Cidr, StringMatch};
use super::{Connection, FieldError, Request};

/// Where the dry-run annotation is.
const DRY_RUN_PATH: &str = "metadata.annotations[istio.io/dry-run]";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Provider {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    #[serde(default)]
    from: Option<Vec<FromSpec>>,
    #[serde(default)]
    to: Option<Vec<ToSpec>>,
    #[serde(default)]
    when: Option<Vec<ConditionSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FromSpec {
    source: SourceSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToSpec {
    operation: OperationSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SourceSpec {
    principals: Option<Vec<String>>,
    not_principals: Option<Vec<String>>,
    request_principals: Option<Vec<String>>,
    not_request_principals: Option<Vec<String>>,
    namespaces: Option<Vec<String>>,
    not_namespaces: Option<Vec<String>>,
    ip_blocks: Option<Vec<String>>,
    not_ip_blocks: Option<Vec<String>>,
    remote_ip_blocks: Option<Vec<String>>,
    not_remote_ip_blocks: Option<Vec<String>>,
    service_accounts: Option<Vec<String>>,
    not_service_accounts: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OperationSpec {
    hosts: Option<Vec<String>>,
    not_hosts: Option<Vec<String>>,
    ports: Option<Vec<String>>,
    not_ports: Option<Vec<String>>,
    methods: Option<Vec<String>>,
    not_methods: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    not_paths: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConditionSpec {
    key: String,
    values: Option<Vec<String>>,
    not_values: Option<Vec<String>>,
}

/// A policy compiled for the tunnel.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// `namespace/name`.
    pub name: String,
    pub namespace: String,
    pub action: Action,
    pub provider: Option<String>,
    /// `selector.matchLabels`; None targets the whole namespace (or mesh).
    pub selector: Option<BTreeMap<String, String>>,
    /// Attached with targetRef(s): the waypoint's, not enforced by the tunnel.
    pub waypoint_only: bool,
    /// targetRef(s): (kind, name) in the policy's namespace (Gateway or Service).
    pub targets: Vec<(String, String)>,
    pub dry_run: bool,
    /// Its targetRefs could not be read: it applies at every waypoint target of
    /// its namespace.
    pub any_target: bool,
    /// The policy uses L7 attributes the tunnel cannot see.
    pub has_l7: bool,
    /// Why the config source refused it; empty for a valid policy. A refused
    /// policy stays in force, fail closed (see [`Compiled::compile_fail_closed`]).
    pub refused: Vec<FieldError>,
    rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default)]
struct Rule {
    /// An invalid rule: always (DENY, CUSTOM) or never (ALLOW) matches.
    fixed: Option<bool>,
    /// An ALLOW rule needing L7: never matches at L4 (in the tunnel).
    never: bool,
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

#[derive(Clone, Debug, Default)]
struct Source {
    principals: Vec<StringMatch>,
    not_principals: Vec<StringMatch>,
    namespaces: Vec<StringMatch>,
    not_namespaces: Vec<StringMatch>,
    ip_blocks: Vec<Cidr>,
    not_ip_blocks: Vec<Cidr>,
    service_accounts: Vec<String>,
    not_service_accounts: Vec<String>,
    // L7: only the waypoint sees these.
    request_principals: Vec<StringMatch>,
    not_request_principals: Vec<StringMatch>,
    remote_ip_blocks: Vec<Cidr>,
    not_remote_ip_blocks: Vec<Cidr>,
}

#[derive(Clone, Debug, Default)]
struct Operation {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    // L7: only the waypoint sees these.
    hosts: Vec<StringMatch>,
    not_hosts: Vec<StringMatch>,
    methods: Vec<StringMatch>,
    not_methods: Vec<StringMatch>,
    paths: Vec<StringMatch>,
    not_paths: Vec<StringMatch>,
}

#[derive(Clone, Debug)]
enum ConditionKey {
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    // L7: only the waypoint sees these.
    Header(String),
    RemoteIp,
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
    /// `request.auth.claims[a][b]`: a path into nested claims.
    AuthClaim(Vec<String>),
    /// The inner HTTP of a tunnel carries no TLS: always absent at the waypoint.
    ConnectionSni,
    /// Valid in Istio, not evaluated here (experimental.*): see
    /// [`Condition::unseen_matches`].
    Unsupported,
}

#[derive(Clone, Debug)]
struct Condition {
    key: ConditionKey,
    values: Vec<String>,
    not_values: Vec<String>,
    /// Whether a condition on something not evaluated matches: never in an ALLOW
    /// rule, always in the others (they deny more, never less).
    unseen_matches: bool,
}

/// Parses an L7 `when` key.
fn l7_key(key: &str) -> Result<ConditionKey, String> {
    let bracketed = |rest: &str| -> Result<Vec<String>, String> {
        // `[a][b]...`
        let mut parts = Vec::new();
        let mut rest = rest;
        while let Some(inner) = rest.strip_prefix('[') {
            let end = inner
                .find(']')
                .ok_or_else(|| format!("{key:?}: unclosed ["))?;
            parts.push(inner[..end].to_owned());
            rest = &inner[end + 1..];
        }
        if !rest.is_empty() || parts.is_empty() || parts.iter().any(String::is_empty) {
            return Err(format!("{key:?}: expected [name]"));
        }
        Ok(parts)
    };
    Ok(match key {
        "remote.ip" => ConditionKey::RemoteIp,
        "request.auth.principal" => ConditionKey::AuthPrincipal,
        "request.auth.audiences" => ConditionKey::AuthAudiences,
        "request.auth.presenter" => ConditionKey::AuthPresenter,
        "connection.sni" => ConditionKey::ConnectionSni,
        k if k.starts_with("request.headers[") => {
            let parts = bracketed(&k["request.headers".len()..])?;
            if parts.len() != 1 {
                return Err(format!("{k:?}: one header name"));
            }
            ConditionKey::Header(parts[0].to_ascii_lowercase())
        }
        k if k.starts_with("request.auth.claims[") => {
            ConditionKey::AuthClaim(bracketed(&k["request.auth.claims".len()..])?)
        }
        _ => ConditionKey::Unsupported,
    })
}

/// Known keys only the waypoint can evaluate (Istio's list).
fn is_l7_key(key: &str) -> bool {
    key.starts_with("request.headers[")
        || key.starts_with("request.auth.claims[")
        || key.starts_with("experimental.envoy.filters.")
        || matches!(
            key,
            "request.auth.principal"
                | "request.auth.audiences"
                | "request.auth.presenter"
                | "remote.ip"
                | "connection.sni"
        )
}

/// The top-level fields of an AuthorizationPolicy's spec.
const SPEC_FIELDS: [&str; 6] = [
    "selector",
    "targetRef",
    "targetRefs",
    "rules",
    "action",
    "provider",
];

impl Compiled {
    /// Validates and compiles a policy; the error names the field (every problem
    /// found, `; `-separated).
    pub fn compile(
        namespace: &str,
        name: &str,
        annotations: &BTreeMap<String, String>,
        spec: &serde_yaml::Value,
    ) -> Result<Self, Vec<FieldError>> {
        let compiled = Self::compile_fail_closed(namespace, name, annotations, spec);
        match compiled.refused.is_empty() {
            true => Ok(compiled),
            false => Err(compiled.refused),
        }
    }

    /// Compiles a policy even when parts of it are invalid, so that a refused
    /// policy never opens a workload (the problems are in `refused`):
    /// - an invalid rule never matches in an ALLOW policy, and matches everything
    ///   in a DENY or CUSTOM one (which then denies all traffic it applies to);
    /// - an invalid policy-level field (action, provider, the dry-run annotation,
    ///   an unknown field, a spec that is not an object) makes every rule invalid;
    ///   an unknown action counts as DENY, a bad dry-run annotation as enforced;
    /// - a scope that cannot be read (selector, targetRefs, or the whole spec)
    ///   widens to what the policy could have meant: every workload of its
    ///   namespace (the mesh for the root namespace) and every waypoint target
    ///   there. With the rules above that denies everything there for a DENY (a
    ///   wide outage, but never a hole) and lets an ALLOW allow nothing.
    pub fn compile_fail_closed(
        namespace: &str,
        name: &str,
        annotations: &BTreeMap<String, String>,
        spec: &serde_yaml::Value,
    ) -> Self {
        let mut refused = Vec::new();
        let empty = serde_yaml::Mapping::new();
        let map = match spec {
            serde_yaml::Value::Null => &empty,
            serde_yaml::Value::Mapping(m) => m,
            _ => {
                refused.push(FieldError {
                    path: "spec".into(),
                    problem: "not an object".into(),
                });
                &empty
            }
        };
        let readable = refused.is_empty();
        for key in map.keys() {
            match key.as_str() {
                Some(k) if SPEC_FIELDS.contains(&k) => {}
                _ => refused.push(FieldError {
                    path: "spec".into(),
                    problem: format!(
                        "unknown field {key:?}, expected one of {}",
                        SPEC_FIELDS.join(", ")
                    ),
                }),
            }
        }
        let field = |name: &str| map.get(name).filter(|v| !v.is_null());
        let action = match field("action").map(|a| a.as_str()) {
            None => Action::Allow,
            Some(Some("ALLOW")) => Action::Allow,
            Some(Some("DENY")) => Action::Deny,
            Some(Some("AUDIT")) => Action::Audit,
            Some(Some("CUSTOM")) => Action::Custom,
            Some(other) => {
                refused.push(FieldError::spec(
                    "action",
                    format!(
                        "{} is not ALLOW, DENY, AUDIT or CUSTOM",
                        other.map_or("a non-string".to_owned(), |a| format!("{a:?}"))
                    ),
                ));
                Action::Deny
            }
        };
        let provider = match field("provider").map(super::read::<Provider>) {
            None => None,
            Some(Ok(p)) => Some(p.name),
            Some(Err((below, e))) => {
                refused.push(FieldError::spec(format!("provider{below}"), e));
                None
            }
        };
        match (action, &provider) {
            (Action::Custom, None) => refused.push(FieldError::spec(
                "provider",
                "a CUSTOM policy needs provider.name",
            )),
            (Action::Custom, _) | (_, None) => {}
            (_, Some(_)) => refused.push(FieldError::spec(
                "provider",
                "only a CUSTOM policy names a provider",
            )),
        }
        let dry_run = match annotations.get("istio.io/dry-run").map(String::as_str) {
            None | Some("false") => false,
            Some("true") if action == Action::Custom => {
                refused.push(FieldError {
                    path: DRY_RUN_PATH.into(),
                    problem: "istio.io/dry-run is not supported for CUSTOM policies".into(),
                });
                false
            }
            Some("true") => true,
            Some(other) => {
                refused.push(FieldError {
                    path: DRY_RUN_PATH.into(),
                    problem: format!("{other:?} is not true or false"),
                });
                false
            }
        };
        let mut selector_unknown = !readable;
        let selector = match field("selector").map(super::read::<Selector>) {
            None => None,
            Some(Ok(s)) => Some(s.match_labels),
            Some(Err((below, e))) => {
                refused.push(FieldError::spec(format!("selector{below}"), e));
                selector_unknown = true;
                None
            }
        };
        let (targets, mut any_target) = compile_targets(
            namespace,
            field("targetRef"),
            field("targetRefs"),
            &mut refused,
        );
        // An empty targetRefs is no targetRefs (a repeated field left unset).
        let has_targets = !targets.is_empty() || any_target;
        any_target |= !readable;
        if field("selector").is_some() && has_targets {
            // Both scopes: the tunnel's (selector) and the waypoint's (targets).
            refused.push(FieldError::spec(
                "selector",
                "selector and targetRef(s) cannot both be set",
            ));
        }
        let mut broken = !refused.is_empty();
        let mut has_l7 = false;
        let mut rules = Vec::new();
        match field("rules") {
            None => {}
            Some(serde_yaml::Value::Sequence(list)) => {
                for (i, rule) in list.iter().enumerate() {
                    let compiled = super::read::<RuleSpec>(rule)
                        .map_err(|(below, e)| FieldError::spec(format!("rules[{i}]{below}"), e))
                        .and_then(|r| {
                            compile_rule(r, action).map_err(|e| {
                                FieldError::spec(format!("rules[{i}].{}", e.path), e.problem)
                            })
                        });
                    match compiled {
                        Ok((rule, l7)) => {
                            has_l7 |= l7;
                            rules.push(rule);
                        }
                        Err(e) => {
                            refused.push(e);
                            rules.push(Rule::fixed(action != Action::Allow));
                        }
                    }
                }
            }
            Some(_) => {
                refused.push(FieldError::spec("rules", "not a list"));
                broken = true;
            }
        }
        if broken {
            rules = match action {
                Action::Allow => Vec::new(),
                _ => vec![Rule::fixed(true)],
            };
        }
        Self {
            name: format!("{namespace}/{name}"),
            namespace: namespace.to_owned(),
            action,
            provider,
            selector,
            waypoint_only: has_targets && field("selector").is_none() && !selector_unknown,
            targets,
            any_target,
            dry_run,
            has_l7,
            refused,
            rules,
        }
    }

    /// What a refused policy does while it stays in force.
    pub fn fail_closed_effect(&self) -> String {
        let scope = if self.selector.is_none() && !self.waypoint_only {
            format!("every workload of namespace {}", self.namespace)
        } else {
            "the workloads it applies to".to_owned()
        };
        match self.action {
            Action::Allow => format!("its invalid parts never allow anything ({scope} stay closed to what they would have allowed)"),
            Action::Deny | Action::Custom => format!("it denies all traffic to {scope}"),
            Action::Audit => "it audits everything it applies to".to_owned(),
        }
    }

    /// Whether any rule matches the connection, as the tunnel sees it (no L7).
    /// No rules: never.
    pub fn matches(&self, conn: &Connection, trust_domains: &[String]) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.matches(conn, None, trust_domains))
    }

    /// Whether any rule matches the request, as a waypoint sees it.
    pub fn matches_request(
        &self,
        conn: &Connection,
        req: &Request,
        trust_domains: &[String],
    ) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.matches(conn, Some(req), trust_domains))
    }
}

/// targetRef and targetRefs: (kind, name) in the policy's namespace, and whether
/// one could not be read (the policy then applies to every target there).
pub(super) fn compile_targets(
    namespace: &str,
    target_ref: Option<&serde_yaml::Value>,
    target_refs: Option<&serde_yaml::Value>,
    refused: &mut Vec<FieldError>,
) -> (Vec<(String, String)>, bool) {
    let mut unknown = false;
    let list: Vec<&serde_yaml::Value> = match target_refs {
        None => Vec::new(),
        Some(serde_yaml::Value::Sequence(l)) => l.iter().collect(),
        Some(_) => {
            refused.push(FieldError::spec("targetRefs", "not a list"));
            unknown = true;
            Vec::new()
        }
    };
    let mut targets = Vec::new();
    for (i, target) in target_ref.into_iter().chain(list).enumerate() {
        let field = |f: &str| target.get(f).and_then(|v| v.as_str()).map(str::to_owned);
        let problem = match (field("kind"), field("name")) {
            (Some(kind), Some(_))
                if !matches!(
                    kind.as_str(),
                    "Gateway" | "Service" | "ServiceEntry" | "GatewayClass"
                ) =>
            {
                Some(FieldError::spec(
                    format!("targetRefs[{i}].kind"),
                    format!("{kind:?} is not Gateway, GatewayClass, Service or ServiceEntry"),
                ))
            }
            (Some(_), Some(_)) if field("namespace").is_some_and(|ns| ns != namespace) => {
                Some(FieldError::spec(
                    format!("targetRefs[{i}].namespace"),
                    "must be the policy's namespace",
                ))
            }
            (Some(kind), Some(name)) => {
                targets.push((kind, name));
                None
            }
            _ => Some(FieldError::spec(
                format!("targetRefs[{i}]"),
                "kind and name are required",
            )),
        };
        if let Some(problem) = problem {
            refused.push(problem);
            unknown = true;
        }
    }
    (targets, unknown)
}

fn present(list: &Option<Vec<String>>) -> bool {
    list.as_ref().is_some_and(|l| !l.is_empty())
}

/// One rule; an error's path is relative to the rule.
fn compile_rule(rule: RuleSpec, action: Action) -> Result<(Rule, bool), FieldError> {
    let err = |path: String, problem: String| FieldError { path, problem };
    let mut l7 = false;
    let mut from = Vec::new();
    for (i, f) in rule.from.unwrap_or_default().into_iter().enumerate() {
        let s = f.source;
        let l7_here = present(&s.request_principals)
            || present(&s.not_request_principals)
            || present(&s.remote_ip_blocks)
            || present(&s.not_remote_ip_blocks);
        l7 |= l7_here;
        let any = [
            &s.principals,
            &s.not_principals,
            &s.request_principals,
            &s.not_request_principals,
            &s.namespaces,
            &s.not_namespaces,
            &s.ip_blocks,
            &s.not_ip_blocks,
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
            &s.service_accounts,
            &s.not_service_accounts,
        ]
        .iter()
        .any(|f| present(f));
        if !any {
            return Err(err(
                format!("from[{i}].source"),
                "at least one field must be set".into(),
            ));
        }
        if present(&s.service_accounts) && (present(&s.principals) || present(&s.namespaces)) {
            return Err(err(
                format!("from[{i}].source"),
                "serviceAccounts cannot be set with principals or namespaces".into(),
            ));
        }
        let strings = |v: &Option<Vec<String>>| {
            v.iter()
                .flatten()
                .map(|p| StringMatch::parse(p))
                .collect::<Vec<_>>()
        };
        let cidrs = |v: &Option<Vec<String>>, field: &str| -> Result<Vec<Cidr>, FieldError> {
            v.iter()
                .flatten()
                .map(|c| Cidr::parse(c).map_err(|e| err(format!("from[{i}].source.{field}"), e)))
                .collect()
        };
        let accounts = |v: &Option<Vec<String>>, field: &str| -> Result<Vec<String>, FieldError> {
            v.iter()
                .flatten()
                .map(|sa| match sa.split_once('/') {
                    Some((ns, name))
                        if !ns.is_empty() && !name.is_empty() && !name.contains('/') =>
                    {
                        Ok(sa.clone())
                    }
                    _ => Err(err(
                        format!("from[{i}].source.{field}"),
                        format!("{sa:?} is not <namespace>/<name>"),
                    )),
                })
                .collect()
        };
        from.push(Source {
            principals: strings(&s.principals),
            not_principals: strings(&s.not_principals),
            namespaces: strings(&s.namespaces),
            not_namespaces: strings(&s.not_namespaces),
            ip_blocks: cidrs(&s.ip_blocks, "ipBlocks")?,
            not_ip_blocks: cidrs(&s.not_ip_blocks, "notIpBlocks")?,
            service_accounts: accounts(&s.service_accounts, "serviceAccounts")?,
            not_service_accounts: accounts(&s.not_service_accounts, "notServiceAccounts")?,
            request_principals: strings(&s.request_principals),
            not_request_principals: strings(&s.not_request_principals),
            remote_ip_blocks: cidrs(&s.remote_ip_blocks, "remoteIpBlocks")?,
            not_remote_ip_blocks: cidrs(&s.not_remote_ip_blocks, "notRemoteIpBlocks")?,
        });
    }
    let mut to = Vec::new();
    for (i, t) in rule.to.unwrap_or_default().into_iter().enumerate() {
        let o = t.operation;
        let l7_here = present(&o.hosts)
            || present(&o.not_hosts)
            || present(&o.methods)
            || present(&o.not_methods)
            || present(&o.paths)
            || present(&o.not_paths);
        l7 |= l7_here;
        if !(l7_here || present(&o.ports) || present(&o.not_ports)) {
            return Err(err(
                format!("to[{i}].operation"),
                "at least one field must be set".into(),
            ));
        }
        let ports = |v: &Option<Vec<String>>, field: &str| -> Result<Vec<u16>, FieldError> {
            v.iter()
                .flatten()
                .map(|p| {
                    p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                        err(
                            format!("to[{i}].operation.{field}"),
                            format!("{p:?} is not a port"),
                        )
                    })
                })
                .collect()
        };
        let strings = |v: &Option<Vec<String>>| {
            v.iter()
                .flatten()
                .map(|p| StringMatch::parse(p))
                .collect::<Vec<_>>()
        };
        let lower = |v: &Option<Vec<String>>| {
            v.iter()
                .flatten()
                .map(|p| StringMatch::parse(&p.to_ascii_lowercase()))
                .collect::<Vec<_>>()
        };
        to.push(Operation {
            ports: ports(&o.ports, "ports")?,
            not_ports: ports(&o.not_ports, "notPorts")?,
            hosts: lower(&o.hosts),
            not_hosts: lower(&o.not_hosts),
            methods: strings(&o.methods),
            not_methods: strings(&o.not_methods),
            paths: strings(&o.paths),
            not_paths: strings(&o.not_paths),
        });
    }
    let mut when = Vec::new();
    for (i, c) in rule.when.unwrap_or_default().into_iter().enumerate() {
        if !present(&c.values) && !present(&c.not_values) {
            return Err(err(
                format!("when[{i}]"),
                "values or notValues must be set".into(),
            ));
        }
        let key = match c.key.as_str() {
            "source.ip" => ConditionKey::SourceIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            k if is_l7_key(k) => {
                l7 = true;
                l7_key(k).map_err(|e| err(format!("when[{i}].key"), e))?
            }
            k => return Err(err(format!("when[{i}].key"), format!("unknown key {k:?}"))),
        };
        let values = c.values.unwrap_or_default();
        let not_values = c.not_values.unwrap_or_default();
        for v in values.iter().chain(&not_values) {
            match key {
                ConditionKey::SourceIp | ConditionKey::DestinationIp => {
                    Cidr::parse(v).map_err(|e| {
                        err(format!("when[{i}].values"), format!("({}): {e}", c.key))
                    })?;
                }
                ConditionKey::DestinationPort => {
                    v.parse::<u16>().map_err(|_| {
                        err(
                            format!("when[{i}].values"),
                            format!("({}): {v:?} is not a port", c.key),
                        )
                    })?;
                }
                _ => {}
            }
        }
        when.push(Condition {
            key,
            values,
            not_values,
            unseen_matches: action != Action::Allow,
        });
    }
    Ok((
        Rule {
            fixed: None,
            never: l7 && action == Action::Allow,
            from,
            to,
            when,
        },
        l7,
    ))
}

impl Rule {
    fn fixed(matches: bool) -> Self {
        Self {
            fixed: Some(matches),
            ..Self::default()
        }
    }

    /// `req` is None in the tunnel: L7 attributes are unseen (an ALLOW rule needing
    /// them never matches; other rules are judged on the rest), Some at a waypoint.
    fn matches(&self, conn: &Connection, req: Option<&Request>, tds: &[String]) -> bool {
        if let Some(fixed) = self.fixed {
            return fixed;
        }
        (req.is_some() || !self.never)
            && (self.from.is_empty() || self.from.iter().any(|s| s.matches(conn, req, tds)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(conn, req)))
            && self.when.iter().all(|c| c.matches(conn, req, tds))
    }
}

/// A list of patterns that must (or, `not`, must not) match one of `values`; an
/// empty list matches anything.
fn list_matches(patterns: &[StringMatch], values: &[&str]) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| values.iter().any(|v| p.matches(v)))
}

fn list_excludes(patterns: &[StringMatch], values: &[&str]) -> bool {
    !patterns.iter().any(|p| values.iter().any(|v| p.matches(v)))
}

/// Istio judges a peer without mTLS as having an empty principal, namespace and
/// service account (ISTIO-SECURITY-2021-004): a positive list never matches it
/// (not even `*`), a negated list does unless one of its patterns matches "".
fn identity_list(patterns: &[StringMatch], values: Option<&[String]>, negated: bool) -> bool {
    if patterns.is_empty() {
        return true;
    }
    let found = match values {
        Some(values) => patterns.iter().any(|p| values.iter().any(|v| p.matches(v))),
        None if negated => patterns.iter().any(|p| p.matches("")),
        None => return false,
    };
    found != negated
}

impl Source {
    fn matches(&self, conn: &Connection, req: Option<&Request>, tds: &[String]) -> bool {
        self.matches_l4(conn, tds) && req.is_none_or(|req| self.matches_l7(conn, req))
    }

    fn matches_l7(&self, conn: &Connection, req: &Request) -> bool {
        // No token: the request principal is empty, which only `not` lists match.
        let principal = req.auth.as_ref().map_or("", |a| a.principal.as_str());
        let remote = req.remote_ip.unwrap_or(conn.source_ip);
        list_matches(&self.request_principals, &[principal])
            && list_excludes(&self.not_request_principals, &[principal])
            && (self.remote_ip_blocks.is_empty()
                || self.remote_ip_blocks.iter().any(|c| c.contains(remote)))
            && !self.not_remote_ip_blocks.iter().any(|c| c.contains(remote))
    }

    fn matches_l4(&self, conn: &Connection, tds: &[String]) -> bool {
        let peer = Peer::of(conn, tds);
        let accounts = |list: &[String], negated: bool| {
            let patterns: Vec<StringMatch> =
                list.iter().map(|a| StringMatch::Exact(a.clone())).collect();
            identity_list(&patterns, peer.account.as_deref(), negated)
        };
        identity_list(&self.principals, peer.principals.as_deref(), false)
            && identity_list(&self.not_principals, peer.principals.as_deref(), true)
            && identity_list(&self.namespaces, peer.namespace.as_deref(), false)
            && identity_list(&self.not_namespaces, peer.namespace.as_deref(), true)
            && (self.ip_blocks.is_empty()
                || self.ip_blocks.iter().any(|c| c.contains(conn.source_ip)))
            && (self.not_ip_blocks.is_empty()
                || !self
                    .not_ip_blocks
                    .iter()
                    .any(|c| c.contains(conn.source_ip)))
            && accounts(&self.service_accounts, false)
            && accounts(&self.not_service_accounts, true)
    }
}

/// The peer's proven identity attributes; None for each when it has no identity
/// (plaintext).
struct Peer {
    /// Its principal in every accepted trust domain (aliases are one domain).
    principals: Option<Vec<String>>,
    namespace: Option<Vec<String>>,
    /// `namespace/name`, only for a trusted domain.
    account: Option<Vec<String>>,
}

impl Peer {
    fn of(conn: &Connection, tds: &[String]) -> Self {
        let Some(id) = &conn.source_identity else {
            return Self {
                principals: None,
                namespace: None,
                account: None,
            };
        };
        let trusted = tds.iter().any(|d| d == id.trust_domain());
        let principals = if trusted {
            tds.iter()
                .map(|td| format!("{td}/ns/{}/sa/{}", id.namespace(), id.service_account()))
                .collect()
        } else {
            vec![id.principal()]
        };
        Self {
            principals: Some(principals),
            namespace: Some(vec![id.namespace().to_owned()]),
            // An account of a foreign trust domain is none of ours.
            account: Some(vec![if trusted {
                format!("{}/{}", id.namespace(), id.service_account())
            } else {
                String::new()
            }]),
        }
    }
}

impl Operation {
    fn matches(&self, conn: &Connection, req: Option<&Request>) -> bool {
        self.matches_l4(conn) && req.is_none_or(|req| self.matches_l7(req))
    }

    fn matches_l7(&self, req: &Request) -> bool {
        // Hosts compare case-insensitively, with or without the port.
        let host = req.host.to_ascii_lowercase();
        let bare = host
            .rsplit_once(':')
            .filter(|(_, p)| p.parse::<u16>().is_ok())
            .map_or(host.as_str(), |(h, _)| h);
        let hosts = [host.as_str(), bare];
        list_matches(&self.hosts, &hosts)
            && list_excludes(&self.not_hosts, &hosts)
            && list_matches(&self.methods, &[req.method.as_str()])
            && list_excludes(&self.not_methods, &[req.method.as_str()])
            && list_matches(&self.paths, &[req.path.as_str()])
            && list_excludes(&self.not_paths, &[req.path.as_str()])
    }

    fn matches_l4(&self, conn: &Connection) -> bool {
        (self.ports.is_empty() || self.ports.contains(&conn.destination_port))
            && !self.not_ports.contains(&conn.destination_port)
    }
}

impl Condition {
    fn matches(&self, conn: &Connection, req: Option<&Request>, tds: &[String]) -> bool {
        // At the waypoint an absent attribute is an empty list of values: a
        // positive list never matches it, a notValues list never excludes it.
        if let Some(values) = self.request_values(conn, req) {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            let test = |pattern: &String| -> bool {
                match self.key {
                    ConditionKey::RemoteIp => Cidr::parse(pattern).is_ok_and(|c| {
                        values
                            .iter()
                            .any(|v| v.parse().is_ok_and(|ip| c.contains(ip)))
                    }),
                    _ => values
                        .iter()
                        .any(|v| StringMatch::parse(pattern).matches(v)),
                }
            };
            return (self.values.is_empty() || self.values.iter().any(test))
                && !self.not_values.iter().any(test);
        }
        if self.is_l7() {
            // In the tunnel: unseen, judged on the rest of the rule (an ALLOW rule
            // needing L7 never matches there anyway). At the waypoint: only keys
            // not evaluated at all get here.
            return req.is_none() || self.unseen_matches;
        }
        let identity = |values: &[String], negated: bool| -> bool {
            let patterns: Vec<StringMatch> = values.iter().map(|v| StringMatch::parse(v)).collect();
            let peer = Peer::of(conn, tds);
            match self.key {
                ConditionKey::SourcePrincipal => {
                    identity_list(&patterns, peer.principals.as_deref(), negated)
                }
                _ => identity_list(&patterns, peer.namespace.as_deref(), negated),
            }
        };
        if matches!(
            self.key,
            ConditionKey::SourceNamespace | ConditionKey::SourcePrincipal
        ) {
            return identity(&self.values, false) && identity(&self.not_values, true);
        }
        let test = |value: &String| -> bool {
            match self.key {
                ConditionKey::SourceIp => {
                    Cidr::parse(value).is_ok_and(|c| c.contains(conn.source_ip))
                }
                ConditionKey::DestinationIp => {
                    Cidr::parse(value).is_ok_and(|c| c.contains(conn.destination_ip))
                }
                ConditionKey::DestinationPort => *value == conn.destination_port.to_string(),
                _ => false,
            }
        };
        (self.values.is_empty() || self.values.iter().any(test))
            && !self.not_values.iter().any(test)
    }
}

/// For `policy check` and logs: the source address a connection is judged on.
pub fn describe_source(conn: &Connection) -> String {
    match &conn.source_identity {
        Some(id) => format!("{id} ({})", conn.source_ip),
        None => format!("{} (no identity: plaintext)", conn.source_ip),
    }
}

impl Condition {
    fn is_l7(&self) -> bool {
        !matches!(
            self.key,
            ConditionKey::SourceIp
                | ConditionKey::SourceNamespace
                | ConditionKey::SourcePrincipal
                | ConditionKey::DestinationIp
                | ConditionKey::DestinationPort
        )
    }

    /// The request's values for an L7 key (None in the tunnel, for L4 keys, or for
    /// keys not evaluated). Empty: the attribute is absent.
    fn request_values(&self, conn: &Connection, req: Option<&Request>) -> Option<Vec<String>> {
        let req = req?;
        let auth = req.auth.as_ref();
        Some(match &self.key {
            ConditionKey::Header(name) => req
                .headers
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .collect(),
            // Istio's remote.ip: the original client's address, else the peer's.
            ConditionKey::RemoteIp => vec![req.remote_ip.unwrap_or(conn.source_ip).to_string()],
            ConditionKey::ConnectionSni => Vec::new(),
            ConditionKey::AuthPrincipal => {
                auth.map(|a| vec![a.principal.clone()]).unwrap_or_default()
            }
            ConditionKey::AuthAudiences => auth.map(|a| a.audiences.clone()).unwrap_or_default(),
            ConditionKey::AuthPresenter => {
                auth.and_then(|a| a.presenter.clone()).into_iter().collect()
            }
            ConditionKey::AuthClaim(path) => {
                let mut value = auth.map(|a| &a.claims);
                for part in path {
                    value = value.and_then(|v| v.get(part));
                }
                match value {
                    Some(serde_json::Value::String(s)) => vec![s.clone()],
                    Some(serde_json::Value::Array(items)) => items
                        .iter()
                        .filter_map(|i| i.as_str().map(str::to_owned))
                        .collect(),
                    Some(serde_json::Value::Bool(b)) => vec![b.to_string()],
                    Some(serde_json::Value::Number(n)) => vec![n.to_string()],
                    _ => Vec::new(),
                }
            }
            ConditionKey::Unsupported => return None,
            _ => return None,
        })
    }
}
