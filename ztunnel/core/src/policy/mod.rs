//! Policy: PeerAuthentication and L4 AuthorizationPolicy with Istio's semantics.
//!
//! [`Index`] is compiled once per config change. Evaluating a connection looks up
//! the policies that target its destination (cached per workload) and never walks
//! the rest of the mesh.

pub mod authn;
pub mod authz;
pub mod matching;
pub mod peer_auth;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use serde::Serialize;

pub use authz::{Action, Compiled};
pub use peer_auth::{Mode, PeerAuthentication};
// A validated token, as the JWT verifier returns it.
pub use crate::jwt::RequestAuth;

use crate::identity::Identity;

/// Istio's default root namespace: its policies apply to the whole mesh.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// The workload traffic goes to, as policy sees it (the state's workloads fill it
/// in): policy never depends on the state that owns its [`Index`].
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// What the tunnel knows about a connection when it decides.
#[derive(Clone, Debug)]
pub struct Connection {
    /// Proven by mTLS; None for plaintext.
    pub source_identity: Option<Identity>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

/// What a waypoint knows about an HTTP request when it decides.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub method: String,
    /// Without the query string.
    pub path: String,
    /// Host header or :authority.
    pub host: String,
    /// Lowercase names.
    pub headers: Vec<(String, String)>,
    /// The client's address (remoteIpBlocks, remote.ip); None: the connection's.
    pub remote_ip: Option<IpAddr>,
    /// A validated JWT, if the request carried one.
    pub auth: Option<RequestAuth>,
}

/// The outcome for one connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allow: bool,
    /// The deciding policy, `namespace/name`.
    pub policy: Option<String>,
    /// Why, in words: "denied by DENY policy ns/name", "no ALLOW policy matched", ...
    pub reason: String,
    /// What applies with a caveat: policies with L7 attributes that target the
    /// destination (they belong on a waypoint; see [`authz`]), refused policies in
    /// force fail closed.
    pub notes: Vec<String>,
    /// Dry-run policies that matched, with what they would have decided.
    pub dry_run: Vec<DryRun>,
    /// AUDIT policies that matched.
    pub audit: Vec<String>,
}

/// A dry-run policy that matched, and what the decision would have been had it
/// been enforced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DryRun {
    /// `namespace/name`.
    pub policy: String,
    pub would_allow: bool,
    /// Why it would have been so; None where only the policy's own action is known
    /// (at a waypoint).
    pub reason: Option<String>,
}

impl std::fmt::Display for DryRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let would = if self.would_allow { "allow" } else { "deny" };
        write!(f, "{}: would {would}", self.policy)?;
        if let Some(reason) = &self.reason {
            write!(f, " ({reason})")?;
        }
        Ok(())
    }
}

/// One problem of a refused policy: the field, from the resource's top (e.g.
/// `spec.rules[0].from[1].source.principals`), and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct FieldError {
    pub path: String,
    pub problem: String,
}

impl FieldError {
    /// A problem of a field under `spec` (`path` relative to it).
    pub fn spec(path: impl std::fmt::Display, problem: impl Into<String>) -> Self {
        Self {
            path: format!("spec.{path}"),
            problem: problem.into(),
        }
    }
}

/// Reads a part of a policy as `T`. Refused: the path below `value` of the field
/// at fault, as a suffix to `value`'s own path (`.from[0].source.principals`,
/// `[2]`, or empty for `value` itself), and what is wrong with it.
pub(crate) fn read<T: serde::de::DeserializeOwned>(
    value: &serde_yaml::Value,
) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let below = match e.path().to_string() {
            whole if whole == "." => String::new(),
            index if index.starts_with('[') => index,
            field => format!(".{field}"),
        };
        (below, e.into_inner().to_string())
    })
}

/// Why the config source refuses a `security.istio.io` resource: every problem,
/// and what the policy does while it stays in force, fail closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} (in force, fail closed: {in_force})", join(.problems))]
pub struct Refusal {
    pub problems: Vec<FieldError>,
    pub in_force: String,
}

/// The problems, `; `-separated.
pub(crate) fn join(problems: &[FieldError]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A `security.istio.io` resource, compiled once, where the config source reads
/// it: the snapshot carries what it compiled to (a refused policy compiled fail
/// closed, and why it was refused) to [`Index::build`].
#[derive(Clone, Debug)]
pub struct Policy {
    pub kind: String,
    pub api_version: String,
    pub name: String,
    pub namespace: String,
    pub annotations: BTreeMap<String, String>,
    pub spec: serde_yaml::Value,
    compiled: Rules,
}

/// What a policy compiled to.
#[derive(Clone, Debug)]
enum Rules {
    Authorization(Arc<Compiled>),
    RequestAuthentication(Arc<authn::RequestAuthentication>),
    PeerAuthentication(Arc<PeerAuthentication>),
    /// A kind the mesh does not enforce.
    Other,
}

/// Equal when their resources are: what they compile to follows.
impl PartialEq for Policy {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.kind,
            &self.api_version,
            &self.name,
            &self.namespace,
            &self.annotations,
            &self.spec,
        ) == (
            &other.kind,
            &other.api_version,
            &other.name,
            &other.namespace,
            &other.annotations,
            &other.spec,
        )
    }
}

impl Policy {
    /// Compiles the resource (fail closed: see [`Compiled::compile_fail_closed`],
    /// [`PeerAuthentication::compile_fail_closed`],
    /// [`authn::RequestAuthentication::compile_fail_closed`]).
    pub fn new(
        kind: &str,
        api_version: &str,
        namespace: &str,
        name: &str,
        annotations: BTreeMap<String, String>,
        spec: serde_yaml::Value,
    ) -> Self {
        let compiled =
            match kind {
                "AuthorizationPolicy" => Rules::Authorization(Arc::new(
                    Compiled::compile_fail_closed(namespace, name, &annotations, &spec),
                )),
                "RequestAuthentication" => Rules::RequestAuthentication(Arc::new(
                    authn::RequestAuthentication::compile_fail_closed(namespace, name, &spec),
                )),
                "PeerAuthentication" => Rules::PeerAuthentication(Arc::new(
                    PeerAuthentication::compile_fail_closed(namespace, name, &spec),
                )),
                _ => Rules::Other,
            };
        Self {
            kind: kind.to_owned(),
            api_version: api_version.to_owned(),
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            annotations,
            spec,
            compiled,
        }
    }

    /// Why the config source refuses it, if it does: a refused policy stays in
    /// force, compiled fail closed.
    pub fn refusal(&self) -> Option<Refusal> {
        match &self.compiled {
            Rules::Authorization(c) => (!c.refused.is_empty()).then(|| Refusal {
                problems: c.refused.clone(),
                in_force: c.fail_closed_effect(),
            }),
            Rules::RequestAuthentication(a) => (!a.refused.is_empty()).then(|| Refusal {
                problems: a.refused.iter().map(|r| r.reason.clone()).collect(),
                in_force: a.fail_closed_effect(),
            }),
            Rules::PeerAuthentication(p) => p.refused.clone().map(|problem| Refusal {
                problems: vec![problem],
                in_force: "STRICT on every port of the workloads it applies to".into(),
            }),
            Rules::Other => None,
        }
    }
}

/// The policies applying to one workload, by action.
#[derive(Default, Debug)]
struct Applicable {
    custom: Vec<Arc<Compiled>>,
    deny: Vec<Arc<Compiled>>,
    allow: Vec<Arc<Compiled>>,
    audit: Vec<Arc<Compiled>>,
    dry_run: Vec<Arc<Compiled>>,
    notes: Vec<String>,
}

impl Applicable {
    /// Files a policy that applies under its action (dry-run ones apart), with
    /// the note of what was refused in it, if anything.
    fn add(&mut self, policy: &Arc<Compiled>) {
        if let Some(note) = refused_note(policy) {
            self.notes.push(note);
        }
        if policy.dry_run {
            self.dry_run.push(policy.clone());
            return;
        }
        match policy.action {
            Action::Custom => self.custom.push(policy.clone()),
            Action::Deny => self.deny.push(policy.clone()),
            Action::Allow => self.allow.push(policy.clone()),
            Action::Audit => self.audit.push(policy.clone()),
        }
    }
}

/// All policies of the mesh, compiled.
#[derive(Debug, Default)]
pub struct Index {
    root_namespace: String,
    trust_domains: Vec<String>,
    /// AuthorizationPolicies by namespace (the root namespace's apply everywhere).
    authz: HashMap<String, Vec<Arc<Compiled>>>,
    peer_auth: HashMap<String, Vec<Arc<PeerAuthentication>>>,
    /// Policies attached with targetRefs: (namespace, kind, name) → policies.
    attached: HashMap<(String, String, String), Vec<Arc<Compiled>>>,
    /// Refused policies whose targetRefs cannot be read: namespace → policies
    /// applying to every waypoint target there.
    attached_anywhere: HashMap<String, Vec<Arc<Compiled>>>,
    /// RequestAuthentications attached with targetRefs: (namespace, kind, name).
    authn: HashMap<(String, String, String), Vec<Arc<authn::RequestAuthentication>>>,
    /// Refused RequestAuthentications whose targetRefs cannot be read: namespace →
    /// those applying to every waypoint target there.
    authn_anywhere: HashMap<String, Vec<Arc<authn::RequestAuthentication>>>,
    /// Per workload, with the labels the entry was made for: the index outlives
    /// state updates that change a workload's labels (a stale entry is made again).
    cache: Mutex<HashMap<(String, String), (BTreeMap<String, String>, Arc<Applicable>)>>,
    /// Per waypoint destination (hashed: a lookup makes no key), what it applies.
    at_waypoints: Mutex<HashMap<u64, Vec<(WaypointTarget, Arc<AtWaypoint>)>>>,
}

/// A waypoint and the Services of one destination: (namespace, name) each.
type WaypointTarget = ((String, String), Vec<(String, String)>);

/// At most this many destinations' policies are kept per index (the index is
/// rebuilt when the policies change; destinations change less often).
const AT_WAYPOINTS_KEPT: usize = 4096;

/// What a waypoint applies for one destination: the AuthorizationPolicies attached
/// to its Gateway and to the destination's Services (and refused ones whose targets
/// cannot be read there), by action, and the RequestAuthentications.
#[derive(Debug)]
pub struct AtWaypoint {
    policies: Applicable,
    authn: Vec<Arc<authn::RequestAuthentication>>,
    trust_domains: Vec<String>,
}

impl Index {
    /// Indexes the snapshot's policies, compiled where the config source read them.
    pub fn build<'a>(
        policies: impl IntoIterator<Item = &'a Policy>,
        root_namespace: &str,
        trust_domains: Vec<String>,
    ) -> Self {
        let mut index = Self {
            root_namespace: root_namespace.to_owned(),
            trust_domains,
            ..Default::default()
        };
        for policy in policies {
            match &policy.compiled {
                Rules::Authorization(c) => {
                    let c = c.clone();
                    // The waypoint's: attached to its targets (or, when they cannot
                    // be read, to every target of the namespace).
                    for (kind, name) in &c.targets {
                        index
                            .attached
                            .entry((c.namespace.clone(), kind.clone(), name.clone()))
                            .or_default()
                            .push(c.clone());
                    }
                    if c.any_target {
                        index
                            .attached_anywhere
                            .entry(c.namespace.clone())
                            .or_default()
                            .push(c.clone());
                    }
                    if c.waypoint_only {
                        continue;
                    }
                    if c.has_l7 {
                        tracing::warn!(policy = %c.name, "{}", l7_note(&c));
                    }
                    index.authz.entry(c.namespace.clone()).or_default().push(c);
                }
                Rules::RequestAuthentication(a) => {
                    if a.targets.is_empty() && !a.any_target {
                        tracing::debug!(policy = %a.name, "RequestAuthentication without targetRefs: no waypoint applies it");
                    }
                    for (kind, name) in &a.targets {
                        index
                            .authn
                            .entry((a.namespace.clone(), kind.clone(), name.clone()))
                            .or_default()
                            .push(a.clone());
                    }
                    if a.any_target {
                        index
                            .authn_anywhere
                            .entry(a.namespace.clone())
                            .or_default()
                            .push(a.clone());
                    }
                }
                Rules::PeerAuthentication(p) => {
                    index
                        .peer_auth
                        .entry(p.namespace.clone())
                        .or_default()
                        .push(p.clone());
                }
                Rules::Other => {}
            }
        }
        // Deterministic order: the first match in a list is the one reported.
        for list in index.authz.values_mut() {
            list.sort_by(|a, b| a.name.cmp(&b.name));
        }
        for list in index.peer_auth.values_mut() {
            list.sort_by(|a, b| a.name.cmp(&b.name));
        }
        index
    }

    pub fn trust_domains(&self) -> &[String] {
        &self.trust_domains
    }

    fn applicable(&self, workload: Target) -> Arc<Applicable> {
        let key = (workload.namespace.to_owned(), workload.name.to_owned());
        if let Some((labels, found)) = self.cache.lock().expect("not poisoned").get(&key) {
            if labels == workload.labels {
                return found.clone();
            }
        }
        let mut applicable = Applicable::default();
        let root = self.authz.get(&self.root_namespace).into_iter().flatten();
        let own = (workload.namespace != self.root_namespace)
            .then(|| self.authz.get(workload.namespace))
            .flatten()
            .into_iter()
            .flatten();
        for policy in root.chain(own) {
            let selected = policy.selector.as_ref().is_none_or(|labels| {
                labels
                    .iter()
                    .all(|(k, v)| workload.labels.get(k) == Some(v))
            });
            if !selected {
                continue;
            }
            if policy.has_l7 {
                applicable
                    .notes
                    .push(format!("{}: {}", policy.name, l7_note(policy)));
            }
            applicable.add(policy);
        }
        let applicable = Arc::new(applicable);
        self.cache
            .lock()
            .expect("not poisoned")
            .insert(key, (workload.labels.clone(), applicable.clone()));
        applicable
    }

    /// Drops what was worked out for a workload that is gone (the index is kept
    /// across state updates that leave the policies alone).
    pub fn forget(&self, namespace: &str, name: &str) {
        self.cache
            .lock()
            .expect("not poisoned")
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// AuthorizationPolicy for a connection to `destination`: CUSTOM, then DENY,
    /// then ALLOW; AUDIT and dry-run policies are recorded, never decide.
    pub fn authorize<'a>(&self, destination: impl Into<Target<'a>>, conn: &Connection) -> Decision {
        let applicable = self.applicable(destination.into());
        let mut decision = decide(
            &applicable.custom,
            &applicable.deny,
            &applicable.allow,
            conn,
            &self.trust_domains,
        );
        decision.notes = applicable.notes.clone();
        decision.audit = applicable
            .audit
            .iter()
            .filter(|p| p.matches(conn, &self.trust_domains))
            .map(|p| p.name.clone())
            .collect();
        for shadow in &applicable.dry_run {
            if !shadow.matches(conn, &self.trust_domains) && shadow.action != Action::Allow {
                continue;
            }
            // What the decision would be with this policy enforced.
            let one = std::slice::from_ref(shadow);
            let (deny, allow) = match shadow.action {
                Action::Deny => (
                    [&applicable.deny[..], one].concat(),
                    applicable.allow.clone(),
                ),
                Action::Allow => (
                    applicable.deny.clone(),
                    [&applicable.allow[..], one].concat(),
                ),
                _ => (applicable.deny.clone(), applicable.allow.clone()),
            };
            let would = decide(&applicable.custom, &deny, &allow, conn, &self.trust_domains);
            decision.dry_run.push(DryRun {
                policy: shadow.name.clone(),
                would_allow: would.allow,
                reason: Some(would.reason),
            });
        }
        decision
    }

    /// The PeerAuthentication mode for plaintext to `destination:port`, and the
    /// policy that set it (None: the mesh default, PERMISSIVE).
    pub fn peer_authentication<'a>(
        &self,
        destination: impl Into<Target<'a>>,
        port: u16,
    ) -> (Mode, Option<String>) {
        peer_auth::effective(
            &self.peer_auth,
            &self.root_namespace,
            destination.into(),
            port,
        )
    }
}

impl Index {
    /// What the waypoint applies for a destination, worked out once per index.
    pub fn at_waypoint(
        &self,
        waypoint: (&str, &str),
        services: &[(String, String)],
    ) -> Arc<AtWaypoint> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (waypoint, services).hash(&mut hasher);
        let hash = hasher.finish();
        let same =
            |(w, s): &WaypointTarget| (w.0.as_str(), w.1.as_str()) == waypoint && s == services;
        let mut cache = self.at_waypoints.lock().expect("not poisoned");
        if let Some((_, found)) = cache
            .get(&hash)
            .and_then(|b| b.iter().find(|(k, _)| same(k)))
        {
            return found.clone();
        }
        let mut policies = Applicable::default();
        let attached = with_anywhere(
            attached_to(&self.attached, waypoint, services),
            &self.attached_anywhere,
            waypoint,
            services,
        );
        for policy in attached {
            policies.add(policy);
        }
        let authn = with_anywhere(
            attached_to(&self.authn, waypoint, services),
            &self.authn_anywhere,
            waypoint,
            services,
        )
        .into_iter()
        .cloned()
        .collect();
        let found = Arc::new(AtWaypoint {
            policies,
            authn,
            trust_domains: self.trust_domains.clone(),
        });
        if cache.len() >= AT_WAYPOINTS_KEPT {
            cache.clear();
        }
        let key = (
            (waypoint.0.to_owned(), waypoint.1.to_owned()),
            services.to_vec(),
        );
        cache.entry(hash).or_default().push((key, found.clone()));
        found
    }

    /// AuthorizationPolicy at a waypoint, for one request (see
    /// [`AtWaypoint::authorize_request`]).
    pub fn authorize_request(
        &self,
        waypoint: (&str, &str),
        services: &[(String, String)],
        conn: &Connection,
        req: Option<&Request>,
        ext_authz: bool,
    ) -> Decision {
        self.at_waypoint(waypoint, services)
            .authorize_request(conn, req, ext_authz)
    }

    /// The RequestAuthentications a waypoint applies for a destination: those
    /// attached to its Gateway and to the destination's Services.
    pub fn request_authentications(
        &self,
        waypoint: (&str, &str),
        services: &[(String, String)],
    ) -> Vec<Arc<authn::RequestAuthentication>> {
        self.at_waypoint(waypoint, services).authn.clone()
    }
}

impl AtWaypoint {
    /// AuthorizationPolicy for one request (None: non-HTTP traffic, judged as
    /// the tunnel judges) with every field: CUSTOM, then DENY, then ALLOW.
    pub fn authorize_request(
        &self,
        conn: &Connection,
        req: Option<&Request>,
        ext_authz: bool,
    ) -> Decision {
        let policies = &self.policies;
        let tds = &self.trust_domains;
        let matcher = |p: &Compiled| match req {
            Some(req) => p.matches_request(conn, req, tds),
            None => p.matches(conn, tds),
        };
        // With an external authorizer the waypoint asks it for CUSTOM policies
        // itself (see `custom_request`); without one they deny (fail closed).
        let custom: &[Arc<Compiled>] = if ext_authz { &[] } else { &policies.custom };
        let mut decision = decide_with(
            custom,
            &policies.deny,
            &policies.allow,
            &matcher,
            "the waypoint",
        );
        decision.audit = policies
            .audit
            .iter()
            .filter(|p| matcher(p))
            .map(|p| p.name.clone())
            .collect();
        decision.notes = policies.notes.clone();
        for shadow in policies.dry_run.iter().filter(|p| matcher(p)) {
            decision.dry_run.push(DryRun {
                policy: shadow.name.clone(),
                would_allow: shadow.action == Action::Allow,
                reason: None,
            });
        }
        decision
    }

    /// The RequestAuthentications that apply.
    pub fn request_authentications(&self) -> &[Arc<authn::RequestAuthentication>] {
        &self.authn
    }

    /// The CUSTOM policies whose rules match the request: (policy, provider), in
    /// name order.
    pub fn custom_request(&self, conn: &Connection, req: &Request) -> Vec<(String, String)> {
        self.policies
            .custom
            .iter()
            .filter(|p| p.matches_request(conn, req, &self.trust_domains))
            .map(|p| (p.name.clone(), p.provider.clone().unwrap_or_default()))
            .collect()
    }
}

/// What is attached with targetRefs to the waypoint's Gateway and to `services`
/// (namespace, name), each once.
/// `attached` plus the policies of `anywhere` (those whose targets could not be
/// read) in the waypoint's and the destination Services' namespaces, each once.
fn with_anywhere<'a, T>(
    mut attached: Vec<&'a Arc<T>>,
    anywhere: &'a HashMap<String, Vec<Arc<T>>>,
    waypoint: (&str, &str),
    services: &[(String, String)],
) -> Vec<&'a Arc<T>> {
    let mut namespaces = vec![waypoint.0];
    for (ns, _) in services {
        if !namespaces.contains(&ns.as_str()) {
            namespaces.push(ns);
        }
    }
    // A policy with some targets unreadable is both attached and "anywhere".
    let anywhere = namespaces
        .into_iter()
        .filter_map(|ns| anywhere.get(ns))
        .flatten();
    for p in anywhere {
        if !attached.iter().any(|q| Arc::ptr_eq(q, p)) {
            attached.push(p);
        }
    }
    attached
}

fn attached_to<'a, T>(
    attached: &'a HashMap<(String, String, String), Vec<Arc<T>>>,
    waypoint: (&str, &str),
    services: &[(String, String)],
) -> Vec<&'a Arc<T>> {
    let gateway = (
        waypoint.0.to_owned(),
        "Gateway".to_owned(),
        waypoint.1.to_owned(),
    );
    let mut found: Vec<&Arc<T>> = Vec::new();
    let keys = std::iter::once(gateway).chain(
        services
            .iter()
            .map(|(ns, name)| (ns.clone(), "Service".to_owned(), name.clone())),
    );
    for item in keys.filter_map(|k| attached.get(&k)).flatten() {
        // A policy targeting two of them applies once.
        if !found.iter().any(|f| Arc::ptr_eq(f, item)) {
            found.push(item);
        }
    }
    found
}

fn decide(
    custom: &[Arc<Compiled>],
    deny: &[Arc<Compiled>],
    allow: &[Arc<Compiled>],
    conn: &Connection,
    tds: &[String],
) -> Decision {
    decide_with(
        custom,
        deny,
        allow,
        &|p: &Compiled| p.matches(conn, tds),
        "the tunnel",
    )
}

fn decide_with(
    custom: &[Arc<Compiled>],
    deny: &[Arc<Compiled>],
    allow: &[Arc<Compiled>],
    matches: &dyn Fn(&Compiled) -> bool,
    layer: &str,
) -> Decision {
    let base = |allow: bool, policy: Option<String>, reason: String| Decision {
        allow,
        policy,
        reason,
        notes: Vec::new(),
        dry_run: Vec::new(),
        audit: Vec::new(),
    };
    if let Some(p) = custom.iter().find(|p| matches(p)) {
        let provider = p.provider.as_deref().unwrap_or("");
        return base(
            false,
            Some(p.name.clone()),
            format!("denied by CUSTOM policy {}{}: provider {provider:?} is not available in {layer} (fail closed)", p.name, refused_suffix(p)),
        );
    }
    if let Some(p) = deny.iter().find(|p| matches(p)) {
        return base(
            false,
            Some(p.name.clone()),
            format!("denied by DENY policy {}{}", p.name, refused_suffix(p)),
        );
    }
    if allow.is_empty() {
        return base(true, None, "no ALLOW policy applies: allowed".into());
    }
    match allow.iter().find(|p| matches(p)) {
        Some(p) => base(
            true,
            Some(p.name.clone()),
            format!("allowed by ALLOW policy {}", p.name),
        ),
        None => base(false, None, "no ALLOW policy matched".into()),
    }
}

/// For a refused policy in force: what it does now.
fn refused_note(policy: &Compiled) -> Option<String> {
    (!policy.refused.is_empty()).then(|| {
        format!(
            "{} was refused ({}); in force fail closed: {}",
            policy.name,
            join(&policy.refused),
            policy.fail_closed_effect()
        )
    })
}

fn refused_suffix(policy: &Compiled) -> &'static str {
    match policy.refused.is_empty() {
        true => "",
        false => " (refused as invalid: it denies everything it applies to until fixed)",
    }
}

fn l7_note(policy: &Compiled) -> String {
    match policy.action {
        Action::Allow => "uses L7 attributes the tunnel cannot see: its rules that need them never match here (fail closed); it belongs on a waypoint".into(),
        _ => "uses L7 attributes the tunnel cannot see: enforced here on its L4 part alone (it denies more); it belongs on a waypoint".into(),
    }
}

#[cfg(test)]
mod tests;
