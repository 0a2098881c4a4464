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
use super::Connection;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Spec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    target_ref: Option<serde_yaml::Value>,
    #[serde(default)]
    target_refs: Option<Vec<serde_yaml::Value>>,
    #[serde(default)]
    rules: Option<Vec<RuleSpec>>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    provider: Option<Provider>,
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
    pub dry_run: bool,
    /// The policy uses L7 attributes the tunnel cannot see.
    pub has_l7: bool,
    rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default)]
struct Rule {
    /// An ALLOW rule needing L7: never matches at L4.
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
}

#[derive(Clone, Debug, Default)]
struct Operation {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
}

#[derive(Clone, Debug)]
enum ConditionKey {
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
}

#[derive(Clone, Debug)]
struct Condition {
    key: ConditionKey,
    values: Vec<String>,
    not_values: Vec<String>,
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

impl Compiled {
    /// Validates and compiles a policy; the error names the field.
    pub fn compile(
        namespace: &str,
        name: &str,
        annotations: &BTreeMap<String, String>,
        spec: &serde_yaml::Value,
    ) -> Result<Self, String> {
        let spec: Spec = if spec.is_null() {
            Spec::default()
        } else {
            serde_yaml::from_value(spec.clone()).map_err(|e| e.to_string())?
        };
        let action = match spec.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "AUDIT" => Action::Audit,
            "CUSTOM" => Action::Custom,
            other => {
                return Err(format!(
                    "action: {other:?} is not ALLOW, DENY, AUDIT or CUSTOM"
                ))
            }
        };
        let provider = spec.provider.map(|p| p.name);
        match (action, &provider) {
            (Action::Custom, None) => {
                return Err("provider: a CUSTOM policy needs provider.name".into())
            }
            (Action::Custom, _) | (_, None) => {}
            (_, Some(_)) => return Err("provider: only a CUSTOM policy names a provider".into()),
        }
        if spec.selector.is_some() && (spec.target_ref.is_some() || spec.target_refs.is_some()) {
            return Err("selector and targetRef(s) cannot both be set".into());
        }
        let dry_run = match annotations.get("istio.io/dry-run").map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(format!(
                    "metadata.annotations[istio.io/dry-run]: {other:?} is not true or false"
                ))
            }
        };
        if dry_run && action == Action::Custom {
            return Err("istio.io/dry-run is not supported for CUSTOM policies".into());
        }
        let mut has_l7 = false;
        let mut rules = Vec::new();
        for (i, rule) in spec.rules.unwrap_or_default().into_iter().enumerate() {
            let (rule, l7) = compile_rule(rule, action).map_err(|e| format!("rules[{i}].{e}"))?;
            has_l7 |= l7;
            rules.push(rule);
        }
        Ok(Self {
            name: format!("{namespace}/{name}"),
            namespace: namespace.to_owned(),
            action,
            provider,
            selector: spec.selector.map(|s| s.match_labels),
            waypoint_only: spec.target_ref.is_some() || spec.target_refs.is_some(),
            dry_run,
            has_l7,
            rules,
        })
    }

    /// Whether any rule matches the connection. No rules: never.
    pub fn matches(&self, conn: &Connection, trust_domains: &[String]) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.matches(conn, trust_domains))
    }
}

fn present(list: &Option<Vec<String>>) -> bool {
    list.as_ref().is_some_and(|l| !l.is_empty())
}

fn compile_rule(rule: RuleSpec, action: Action) -> Result<(Rule, bool), String> {
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
            return Err(format!("from[{i}].source: at least one field must be set"));
        }
        if present(&s.service_accounts) && (present(&s.principals) || present(&s.namespaces)) {
            return Err(format!(
                "from[{i}].source: serviceAccounts cannot be set with principals or namespaces"
            ));
        }
        let strings = |v: &Option<Vec<String>>| {
            v.iter()
                .flatten()
                .map(|p| StringMatch::parse(p))
                .collect::<Vec<_>>()
        };
        let cidrs = |v: &Option<Vec<String>>, field: &str| -> Result<Vec<Cidr>, String> {
            v.iter()
                .flatten()
                .map(|c| Cidr::parse(c).map_err(|e| format!("from[{i}].source.{field}: {e}")))
                .collect()
        };
        let accounts = |v: &Option<Vec<String>>, field: &str| -> Result<Vec<String>, String> {
            v.iter()
                .flatten()
                .map(|sa| match sa.split_once('/') {
                    Some((ns, name))
                        if !ns.is_empty() && !name.is_empty() && !name.contains('/') =>
                    {
                        Ok(sa.clone())
                    }
                    _ => Err(format!(
                        "from[{i}].source.{field}: {sa:?} is not <namespace>/<name>"
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
            return Err(format!("to[{i}].operation: at least one field must be set"));
        }
        let ports = |v: &Option<Vec<String>>, field: &str| -> Result<Vec<u16>, String> {
            v.iter()
                .flatten()
                .map(|p| {
                    p.parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("to[{i}].operation.{field}: {p:?} is not a port"))
                })
                .collect()
        };
        to.push(Operation {
            ports: ports(&o.ports, "ports")?,
            not_ports: ports(&o.not_ports, "notPorts")?,
        });
    }
    let mut when = Vec::new();
    for (i, c) in rule.when.unwrap_or_default().into_iter().enumerate() {
        if !present(&c.values) && !present(&c.not_values) {
            return Err(format!("when[{i}]: values or notValues must be set"));
        }
        let key = match c.key.as_str() {
            "source.ip" => ConditionKey::SourceIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            k if is_l7_key(k) => {
                l7 = true;
                continue;
            }
            k => return Err(format!("when[{i}].key: unknown key {k:?}")),
        };
        let values = c.values.unwrap_or_default();
        let not_values = c.not_values.unwrap_or_default();
        for v in values.iter().chain(&not_values) {
            match key {
                ConditionKey::SourceIp | ConditionKey::DestinationIp => {
                    Cidr::parse(v).map_err(|e| format!("when[{i}] ({}): {e}", c.key))?;
                }
                ConditionKey::DestinationPort => {
                    v.parse::<u16>()
                        .map_err(|_| format!("when[{i}] ({}): {v:?} is not a port", c.key))?;
                }
                _ => {}
            }
        }
        when.push(Condition {
            key,
            values,
            not_values,
        });
    }
    Ok((
        Rule {
            never: l7 && action == Action::Allow,
            from,
            to,
            when,
        },
        l7,
    ))
}

impl Rule {
    fn matches(&self, conn: &Connection, tds: &[String]) -> bool {
        !self.never
            && (self.from.is_empty() || self.from.iter().any(|s| s.matches(conn, tds)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(conn)))
            && self.when.iter().all(|c| c.matches(conn, tds))
    }
}

/// The peer's principal in every accepted trust domain (aliases are one domain).
fn principals(conn: &Connection, tds: &[String]) -> Vec<String> {
    match &conn.source_identity {
        Some(id) if tds.iter().any(|d| d == id.trust_domain()) => tds
            .iter()
            .map(|td| format!("{td}/ns/{}/sa/{}", id.namespace(), id.service_account()))
            .collect(),
        Some(id) => vec![id.principal()],
        None => Vec::new(),
    }
}

fn any_principal(patterns: &[StringMatch], conn: &Connection, tds: &[String]) -> Option<bool> {
    let names = principals(conn, tds);
    // No identity (plaintext): identity-based fields never match.
    (!names.is_empty()).then(|| patterns.iter().any(|p| names.iter().any(|n| p.matches(n))))
}

impl Source {
    fn matches(&self, conn: &Connection, tds: &[String]) -> bool {
        let identity = conn.source_identity.as_ref();
        let namespace = identity.map(|id| id.namespace());
        let account = identity.map(|id| format!("{}/{}", id.namespace(), id.service_account()));
        let ns_matches =
            |list: &[StringMatch]| namespace.is_some_and(|ns| list.iter().any(|p| p.matches(ns)));
        (self.principals.is_empty() || any_principal(&self.principals, conn, tds) == Some(true))
            && (self.not_principals.is_empty()
                || any_principal(&self.not_principals, conn, tds) == Some(false))
            && (self.namespaces.is_empty() || ns_matches(&self.namespaces))
            && (self.not_namespaces.is_empty()
                || (namespace.is_some() && !ns_matches(&self.not_namespaces)))
            && (self.ip_blocks.is_empty()
                || self.ip_blocks.iter().any(|c| c.contains(conn.source_ip)))
            && (self.not_ip_blocks.is_empty()
                || !self
                    .not_ip_blocks
                    .iter()
                    .any(|c| c.contains(conn.source_ip)))
            && (self.service_accounts.is_empty()
                || account
                    .as_ref()
                    .is_some_and(|a| self.service_accounts.contains(a) && trusted(conn, tds)))
            && (self.not_service_accounts.is_empty()
                || account
                    .as_ref()
                    .is_some_and(|a| !self.not_service_accounts.contains(a)))
    }
}

fn trusted(conn: &Connection, tds: &[String]) -> bool {
    conn.source_identity
        .as_ref()
        .is_some_and(|id| tds.iter().any(|d| d == id.trust_domain()))
}

impl Operation {
    fn matches(&self, conn: &Connection) -> bool {
        (self.ports.is_empty() || self.ports.contains(&conn.destination_port))
            && !self.not_ports.contains(&conn.destination_port)
    }
}

impl Condition {
    fn matches(&self, conn: &Connection, tds: &[String]) -> bool {
        let test = |value: &str| -> Option<bool> {
            match self.key {
                ConditionKey::SourceIp => {
                    Some(Cidr::parse(value).is_ok_and(|c| c.contains(conn.source_ip)))
                }
                ConditionKey::DestinationIp => {
                    Some(Cidr::parse(value).is_ok_and(|c| c.contains(conn.destination_ip)))
                }
                ConditionKey::DestinationPort => Some(value == conn.destination_port.to_string()),
                ConditionKey::SourceNamespace => conn
                    .source_identity
                    .as_ref()
                    .map(|id| StringMatch::parse(value).matches(id.namespace())),
                ConditionKey::SourcePrincipal => {
                    any_principal(&[StringMatch::parse(value)], conn, tds)
                }
            }
        };
        let identity_key = matches!(
            self.key,
            ConditionKey::SourceNamespace | ConditionKey::SourcePrincipal
        );
        if identity_key && conn.source_identity.is_none() {
            return false;
        }
        (self.values.is_empty() || self.values.iter().any(|v| test(v) == Some(true)))
            && !self.not_values.iter().any(|v| test(v) == Some(true))
    }
}

/// For `policy check` and logs: the source address a connection is judged on.
pub fn describe_source(conn: &Connection) -> String {
    match &conn.source_identity {
        Some(id) => format!("{id} ({})", conn.source_ip),
        None => format!("{} (no identity: plaintext)", conn.source_ip),
    }
}
