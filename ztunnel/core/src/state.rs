//! The mesh as the tunnel sees it, derived from a config snapshot: workloads by IP
//! and by name, services by VIP with their endpoints, waypoints. Immutable: the
//! proxy takes one `Arc<State>` per connection and never holds a lock while it
//! works.
//!
//! A new snapshot is applied incrementally ([`State::update`]): the objects that
//! changed since the last one are found with [`CowMap::diff`] (which skips what
//! the two snapshots share), and only the entries they touch are derived again —
//! a pod, the services selecting or listing it, the waypoint it serves. Every
//! index is a [`CowMap`], so the new state shares everything else with the old
//! one, which its readers keep using undisturbed. [`State::build`] is the same
//! update from an empty state.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use crate::{
    config::{self, CowMap, Snapshot},
    identity::Identity,
};

/// A pod in the mesh: the pod as the snapshot has it (its name, namespace,
/// service account, node, labels, and where its node finds its network namespace
/// and cgroup, all read through `Deref`), shared with the snapshot rather than
/// copied, and what the state derives from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub pod: Arc<config::Pod>,
    /// The pod's address (a pod without one has no workload).
    pub ip: Ipv4Addr,
    /// Shared by the workloads of one service account (see `State::identities`).
    pub identity: Identity,
    /// In an ambient namespace and not opted out: its node's tunnel carries its
    /// traffic, and it is reached over HBONE.
    pub captured: bool,
    /// The waypoint (namespace, name) its pod-addressed traffic may go through.
    pub waypoint: Option<(String, String)>,
}

impl std::ops::Deref for Workload {
    type Target = config::Pod;

    fn deref(&self) -> &config::Pod {
        &self.pod
    }
}

impl Workload {
    /// The canonical workload name, as Istio derives it for telemetry.
    pub fn workload_name(&self) -> &str {
        [
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ]
        .iter()
        .find_map(|l| self.labels.get(*l))
        .map(String::as_str)
        .unwrap_or(&self.name)
    }
}

/// What policy sees of a workload it judges traffic to.
impl<'a> From<&'a Workload> for crate::policy::Target<'a> {
    fn from(w: &'a Workload) -> Self {
        Self {
            namespace: &w.namespace,
            name: &w.name,
            labels: &w.labels,
        }
    }
}

impl<'a> From<&'a Arc<Workload>> for crate::policy::Target<'a> {
    fn from(w: &'a Arc<Workload>) -> Self {
        w.as_ref().into()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<config::ServicePort>,
    /// Pods selected by the service that have an IP.
    pub endpoints: Vec<Arc<Workload>>,
    /// The waypoint (namespace, name) its traffic may go through.
    pub waypoint: Option<(String, String)>,
}

/// Which traffic a waypoint handles (`istio.io/waypoint-for`; Istio's default is
/// service-addressed traffic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

/// A waypoint: a Gateway of class istio-waypoint and the pods serving it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waypoint {
    pub name: String,
    pub namespace: String,
    pub traffic: WaypointFor,
    pub pods: Vec<Arc<Workload>>,
}

impl Waypoint {
    pub fn serves_services(&self) -> bool {
        matches!(self.traffic, WaypointFor::Service | WaypointFor::All)
    }

    pub fn serves_workloads(&self) -> bool {
        matches!(self.traffic, WaypointFor::Workload | WaypointFor::All)
    }
}

/// What the state needs besides the config.
#[derive(Clone, Debug, Default)]
pub struct MeshSettings {
    pub node: String,
    pub trust_domain: String,
    pub trust_domain_aliases: Vec<String>,
    /// Policies here apply to every namespace (Istio: istio-system).
    pub root_namespace: String,
}

impl MeshSettings {
    pub fn new(node: &str, trust_domain: &str) -> Self {
        Self {
            node: node.to_owned(),
            trust_domain: trust_domain.to_owned(),
            trust_domain_aliases: Vec::new(),
            root_namespace: crate::policy::ROOT_NAMESPACE.to_owned(),
        }
    }

    fn trust_domains(&self) -> Vec<String> {
        let mut trust_domains = vec![self.trust_domain.clone()];
        trust_domains.extend(self.trust_domain_aliases.iter().cloned());
        trust_domains
    }
}

/// (namespace, name) of an object.
type Name = (String, String);

#[derive(Clone, Debug, Default)]
pub struct State {
    pub node: String,
    pub snapshot: Arc<Snapshot>,
    /// The compiled policies.
    pub policies: Arc<crate::policy::Index>,
    settings: Arc<MeshSettings>,
    /// The workload each IP routes to: of the pods claiming it (a reused address
    /// may have two for a while), the one with the greatest (namespace, name).
    by_ip: CowMap<Ipv4Addr, Workload>,
    /// The pods claiming an address more than one pod claims. An address only
    /// one claims (nearly all) has no entry: its claimant is `by_ip`'s workload.
    contested_ips: CowMap<Ipv4Addr, BTreeSet<Name>>,
    /// One identity per (namespace, service account) of the workloads, shared
    /// by them, and how many use it.
    identities: CowMap<Name, (Identity, usize)>,
    /// Workloads by namespace, then name: what selectors choose among.
    by_namespace: CowMap<String, CowMap<String, Workload>>,
    /// The captured workloads this node's tunnel serves, by IP.
    local: CowMap<Ipv4Addr, Workload>,
    /// Services with a cluster IP, by VIP: of those claiming it, the one with the
    /// greatest (namespace, name).
    services: CowMap<Ipv4Addr, Service>,
    vip_claims: CowMap<Ipv4Addr, BTreeSet<Name>>,
    /// Services with a cluster IP, by (namespace, name).
    services_by_name: CowMap<Name, Service>,
    /// The Services bound to a waypoint that each workload (by IP) is an
    /// endpoint of: what a waypoint asks (`bound_services`). Services without a
    /// waypoint (nearly all) are not indexed.
    bound_services_of: CowMap<Ipv4Addr, BTreeMap<Name, Arc<Service>>>,
    waypoints: CowMap<Name, Waypoint>,
    /// Headless Services (no cluster IP), by (namespace, name): their endpoints.
    /// They route nothing; DNS names their pods.
    headless: CowMap<Name, Vec<Arc<Workload>>>,
    /// What an update needs to find what a change touches: the Services of each
    /// namespace (by name), the EndpointSlices of each Service (by name), and
    /// the EndpointSlices listing each address.
    services_in: CowMap<String, BTreeSet<String>>,
    slices_of: CowMap<Name, BTreeSet<String>>,
    slices_at: CowMap<Ipv4Addr, BTreeSet<Name>>,
    /// Waypoint bindings refused, by object (`Pod ns/name`, `Service ns/name`): why.
    pub refused_bindings: BTreeMap<String, String>,
}

/// `istio.io/use-waypoint` on an object, else on its namespace; "none" opts out.
/// The waypoint's namespace is `istio.io/use-waypoint-namespace` (next to the
/// label used) or the object's own. Err: that waypoint's Gateway does not admit the
/// object's namespace (its HBONE listener's `allowedRoutes.namespaces`, Istio's
/// rule), so the binding is refused.
fn use_waypoint(
    labels: &BTreeMap<String, String>,
    namespace: &str,
    snapshot: &Snapshot,
) -> Result<Option<(String, String)>, String> {
    let ns_labels = snapshot.namespaces.get(namespace).map(|n| &n.labels);
    let (name, source) = match labels.get(config::USE_WAYPOINT) {
        Some(name) => (name, labels),
        None => match ns_labels.and_then(|l| Some((l.get(config::USE_WAYPOINT)?, l))) {
            Some(found) => found,
            None => return Ok(None),
        },
    };
    if name == "none" {
        return Ok(None);
    }
    let waypoint_ns = source
        .get(config::USE_WAYPOINT_NAMESPACE)
        .cloned()
        .unwrap_or_else(|| namespace.to_owned());
    let key = (waypoint_ns, name.clone());
    // A Gateway not declared (yet) is not refused here: traffic for it fails
    // closed where it is routed.
    if let Some(gateway) = snapshot.gateways.get(&key) {
        let empty = BTreeMap::new();
        if !gateway.allowed_namespaces.admits(
            &gateway.namespace,
            namespace,
            ns_labels.unwrap_or(&empty),
        ) {
            return Err(format!(
                "waypoint {}/{} does not admit namespace {namespace} ({:?} in its HBONE listener's allowedRoutes.namespaces): binding refused",
                key.0, key.1, gateway.allowed_namespaces
            ));
        }
    }
    Ok(Some(key))
}

/// An object's waypoint binding; a refused one is recorded in `refused` and gives
/// None (the object's traffic does not go through that waypoint).
fn binding(
    refused: &mut BTreeMap<String, String>,
    kind: &str,
    (namespace, name): (&str, &str),
    labels: &BTreeMap<String, String>,
    snapshot: &Snapshot,
) -> Option<(String, String)> {
    use_waypoint(labels, namespace, snapshot).unwrap_or_else(|reason| {
        refused.insert(format!("{kind} {namespace}/{name}"), reason);
        None
    })
}

/// The state, updated on every config snapshot (refused bindings reported).
pub fn spawn_updates(
    mut snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    settings: MeshSettings,
    bindings_refused: prometheus_client::metrics::gauge::Gauge,
) -> tokio::sync::watch::Receiver<Arc<State>> {
    let first = Arc::new(State::build(
        snapshots.borrow_and_update().clone(),
        &settings,
    ));
    report_refused_bindings(&first, None, &bindings_refused);
    let (tx, rx) = tokio::sync::watch::channel(first);
    tokio::spawn(async move {
        while snapshots.changed().await.is_ok() {
            let snapshot = snapshots.borrow_and_update().clone();
            let previous = tx.borrow().clone();
            let state = Arc::new(previous.update(snapshot));
            report_refused_bindings(&state, Some(&previous), &bindings_refused);
            if tx.send(state).is_err() {
                return;
            }
        }
    });
    rx
}

/// Logs the waypoint bindings `state` refuses that `previous` did not, and sets
/// `gauge` (`ztunnel_waypoint_bindings_refused`) to how many there are.
pub fn report_refused_bindings(
    state: &State,
    previous: Option<&State>,
    gauge: &prometheus_client::metrics::gauge::Gauge,
) {
    for (object, reason) in &state.refused_bindings {
        if previous.is_none_or(|p| p.refused_bindings.get(object) != Some(reason)) {
            tracing::warn!(%object, "{reason}");
        }
    }
    gauge.set(state.refused_bindings.len() as i64);
}

/// What an update derives again, by (namespace, name).
#[derive(Default)]
struct Dirty {
    pods: BTreeSet<Name>,
    services: BTreeSet<Name>,
    waypoints: BTreeSet<Name>,
}

/// Adds `item` to the set at `key`.
fn claim<K: Ord + std::hash::Hash + Clone, T: Ord + Clone>(
    map: &mut CowMap<K, BTreeSet<T>>,
    key: K,
    item: T,
) {
    match map.get_mut(&key) {
        Some(set) => {
            set.insert(item);
        }
        None => {
            map.insert(key, BTreeSet::from([item]));
        }
    }
}

/// Removes `item` from the set at `key` (and the set once empty).
fn unclaim<K: Ord + std::hash::Hash + Clone, T: Ord + Clone>(
    map: &mut CowMap<K, BTreeSet<T>>,
    key: &K,
    item: &T,
) {
    if let Some(set) = map.get_mut(key) {
        set.remove(item);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

impl State {
    /// The state of `snapshot`, from nothing.
    pub fn build(snapshot: Arc<Snapshot>, settings: &MeshSettings) -> Self {
        let empty = State {
            node: settings.node.clone(),
            settings: Arc::new(settings.clone()),
            ..Default::default()
        };
        empty.update(snapshot)
    }

    /// The state of `snapshot`, derived from this one (the state of an earlier
    /// snapshot of the same source): only what the objects that changed touch is
    /// derived again, the rest is shared.
    pub fn update(&self, snapshot: Arc<Snapshot>) -> Self {
        let mut next = self.clone();
        next.apply(&self.snapshot, &snapshot);
        next.snapshot = snapshot;
        next
    }

    fn apply(&mut self, old: &Snapshot, new: &Snapshot) {
        if !new.policies.diff(&old.policies).is_empty() {
            // Policies are indexed by namespace and target: rebuilt (the work
            // grows with the policies, not the pods), in a fixed order.
            let mut policies: Vec<_> = new.policies.iter().collect();
            policies.sort_by(|a, b| a.0.cmp(b.0));
            self.policies = Arc::new(crate::policy::Index::build(
                policies.into_iter().map(|(_, p)| p),
                &self.settings.root_namespace,
                self.settings.trust_domains(),
            ));
        }
        let mut dirty = Dirty::default();
        for (ns, _, _) in new.namespaces.diff(&old.namespaces) {
            // Capture and waypoint bindings of its pods and Services.
            if let Some(pods) = self.by_namespace.get(ns) {
                dirty
                    .pods
                    .extend(pods.keys().map(|name| (ns.clone(), name.clone())));
            }
            if let Some(services) = self.services_in.get(ns) {
                dirty
                    .services
                    .extend(services.iter().map(|name| (ns.clone(), name.clone())));
            }
        }
        for (key, _, now) in new.services.diff(&old.services) {
            match now {
                Some(_) => claim(&mut self.services_in, key.0.clone(), key.1.clone()),
                None => unclaim(&mut self.services_in, &key.0, &key.1),
            }
            dirty.services.insert(key.clone());
        }
        for (key, was, now) in new.endpoint_slices.diff(&old.endpoint_slices) {
            if let Some(was) = was {
                self.index_slice(key, was, false, &mut dirty);
            }
            if let Some(now) = now {
                self.index_slice(key, now, true, &mut dirty);
            }
        }
        dirty.pods.extend(
            new.pods
                .diff(&old.pods)
                .into_iter()
                .map(|(k, ..)| k.clone()),
        );
        let gateways = new.gateways.diff(&old.gateways);
        dirty
            .waypoints
            .extend(gateways.iter().map(|(k, ..)| (*k).clone()));
        if !gateways.is_empty() {
            // Bindings anywhere may name a Gateway: everything is derived again
            // (Gateways change seldom).
            dirty.pods.extend(new.pods.keys().cloned());
            dirty.services.extend(new.services.keys().cloned());
        }
        for key in std::mem::take(&mut dirty.pods) {
            self.derive_pod(&key, new, &mut dirty);
        }
        for key in std::mem::take(&mut dirty.services) {
            self.derive_service(&key, new);
        }
        for key in std::mem::take(&mut dirty.waypoints) {
            self.derive_waypoint(&key, new);
        }
    }

    /// Adds (or removes) an EndpointSlice to the indexes; its Service is derived
    /// again.
    fn index_slice(
        &mut self,
        key: &Name,
        slice: &config::EndpointSlice,
        add: bool,
        dirty: &mut Dirty,
    ) {
        let Some(service) = &slice.service else {
            return;
        };
        let of = (key.0.clone(), service.clone());
        match add {
            true => claim(&mut self.slices_of, of.clone(), key.1.clone()),
            false => unclaim(&mut self.slices_of, &of, &key.1),
        }
        for ip in &slice.addresses {
            match add {
                true => claim(&mut self.slices_at, *ip, key.clone()),
                false => unclaim(&mut self.slices_at, ip, key),
            }
        }
        dirty.services.insert(of);
    }

    /// The workload of a pod, if it has one.
    fn workload(&mut self, pod: &Arc<config::Pod>, snapshot: &Snapshot) -> Option<Workload> {
        let ip = pod.ip?;
        let ambient_ns = snapshot
            .namespaces
            .get(&pod.namespace)
            .and_then(|n| n.labels.get(config::DATAPLANE_MODE))
            .is_some_and(|m| m == config::AMBIENT);
        let opted_out = pod
            .labels
            .get(config::DATAPLANE_MODE)
            .is_some_and(|m| m == config::OPT_OUT);
        // A waypoint's pods are never captured: they speak HBONE themselves.
        let is_waypoint = pod.labels.contains_key(config::GATEWAY_NAME);
        let Ok(identity) = self.acquire_identity(&pod.namespace, &pod.service_account) else {
            tracing::warn!(pod = %pod.name, namespace = %pod.namespace, "no valid identity for the pod; left out of the mesh");
            return None;
        };
        Some(Workload {
            pod: pod.clone(),
            ip,
            identity,
            captured: ambient_ns && !opted_out && !is_waypoint,
            waypoint: binding(
                &mut self.refused_bindings,
                "Pod",
                (&pod.namespace, &pod.name),
                &pod.labels,
                snapshot,
            ),
        })
    }

    /// The identity of a service account's workloads, counted as used by one
    /// more.
    fn acquire_identity(
        &mut self,
        namespace: &str,
        service_account: &str,
    ) -> Result<Identity, crate::identity::IdentityError> {
        let key = (namespace.to_owned(), service_account.to_owned());
        if let Some((identity, users)) = self.identities.get_mut(&key) {
            *users += 1;
            return Ok(identity.clone());
        }
        let identity = Identity::new(&self.settings.trust_domain, namespace, service_account)?;
        self.identities.insert(key, (identity.clone(), 1));
        Ok(identity)
    }

    /// A workload no longer uses its identity (forgotten once none does).
    fn release_identity(&mut self, workload: &Workload) {
        let key = (workload.namespace.clone(), workload.service_account.clone());
        if let Some((_, users)) = self.identities.get_mut(&key) {
            *users -= 1;
            if *users == 0 {
                self.identities.remove(&key);
            }
        }
    }

    /// Derives a pod's workload again, and marks what depends on it (before and
    /// after): the Services selecting or listing it, the waypoint it serves.
    fn derive_pod(&mut self, key: &Name, snapshot: &Snapshot, dirty: &mut Dirty) {
        let (ns, name) = key;
        let old = self
            .by_namespace
            .get(ns)
            .and_then(|pods| pods.get_arc(name))
            .cloned();
        self.refused_bindings.remove(&format!("Pod {ns}/{name}"));
        let new = match snapshot.pods.get_arc(key) {
            Some(pod) => self.workload(pod, snapshot).map(Arc::new),
            None => None,
        };
        if let Some(old) = &old {
            if let Some(pods) = self.by_namespace.get_mut(ns) {
                pods.remove(name);
                if pods.is_empty() {
                    self.by_namespace.remove(ns);
                }
            }
            self.release_identity(old);
            if new.is_none() {
                self.policies.forget(ns, name);
            }
        }
        if let Some(new) = &new {
            match self.by_namespace.get_mut(ns) {
                Some(pods) => {
                    pods.insert_arc(name.clone(), new.clone());
                }
                None => {
                    let mut pods = CowMap::new();
                    pods.insert_arc(name.clone(), new.clone());
                    self.by_namespace.insert(ns.clone(), pods);
                }
            }
        }
        if let Some(old) = &old {
            self.claim_ip(old.ip, key, false);
        }
        if let Some(new) = &new {
            self.claim_ip(new.ip, key, true);
        }
        for workload in old.iter().chain(new.iter()) {
            self.dependents(workload, snapshot, dirty);
        }
    }

    /// The pods claiming `ip`.
    fn claimants(&self, ip: Ipv4Addr) -> BTreeSet<Name> {
        match self.contested_ips.get(&ip) {
            Some(claimants) => claimants.clone(),
            None => self
                .by_ip
                .get(&ip)
                .map(|w| (w.namespace.clone(), w.name.clone()))
                .into_iter()
                .collect(),
        }
    }

    /// Pod `key` claims `ip` (with `claims`; or no longer does): the address
    /// goes to the claimant with the greatest (namespace, name), whose workload
    /// (as `by_namespace` has it now) `by_ip` and `local` then hold.
    fn claim_ip(&mut self, ip: Ipv4Addr, key: &Name, claims: bool) {
        let mut claimants = self.claimants(ip);
        match claims {
            true => claimants.insert(key.clone()),
            false => claimants.remove(key),
        };
        let owner = claimants
            .last()
            .and_then(|(ns, name)| self.by_namespace.get(ns)?.get_arc(name))
            .cloned();
        match claimants.len() > 1 {
            true => {
                self.contested_ips.insert(ip, claimants);
            }
            false => {
                self.contested_ips.remove(&ip);
            }
        }
        self.local.remove(&ip);
        match owner {
            Some(workload) => {
                if workload.captured && workload.node_name == self.node {
                    self.local.insert_arc(ip, workload.clone());
                }
                self.by_ip.insert_arc(ip, workload);
            }
            None => {
                self.by_ip.remove(&ip);
            }
        }
    }

    /// Marks what is derived from `workload`.
    fn dependents(&self, workload: &Workload, snapshot: &Snapshot, dirty: &mut Dirty) {
        let ns = &workload.namespace;
        for name in self.services_in.get(ns).into_iter().flatten() {
            let key = (ns.clone(), name.clone());
            if snapshot.services.get(&key).is_some_and(|s| {
                !s.selector.is_empty()
                    && s.selector
                        .iter()
                        .all(|(k, v)| workload.labels.get(k) == Some(v))
            }) {
                dirty.services.insert(key);
            }
        }
        for slice in self.slices_at.get(&workload.ip).into_iter().flatten() {
            if let Some(service) = snapshot
                .endpoint_slices
                .get(slice)
                .and_then(|s| s.service.as_ref())
            {
                dirty.services.insert((slice.0.clone(), service.clone()));
            }
        }
        if let Some(gateway) = workload.labels.get(config::GATEWAY_NAME) {
            dirty.waypoints.insert((ns.clone(), gateway.clone()));
        }
    }

    /// The workloads of a namespace.
    fn in_namespace(&self, ns: &str) -> impl Iterator<Item = &Arc<Workload>> {
        self.by_namespace
            .get(ns)
            .into_iter()
            .flat_map(|pods| pods.arcs().map(|(_, w)| w))
    }

    /// Derives a Service again: its ports, endpoints and waypoint.
    fn derive_service(&mut self, key: &Name, snapshot: &Snapshot) {
        if let Some(old) = self.services_by_name.remove(key) {
            for endpoint in old.endpoints.iter().filter(|_| old.waypoint.is_some()) {
                if let Some(services) = self.bound_services_of.get_mut(&endpoint.ip) {
                    services.remove(key);
                    if services.is_empty() {
                        self.bound_services_of.remove(&endpoint.ip);
                    }
                }
            }
            unclaim(&mut self.vip_claims, &old.vip, key);
            self.settle_vip(old.vip);
        }
        self.headless.remove(key);
        self.refused_bindings
            .remove(&format!("Service {}/{}", key.0, key.1));
        let Some(svc) = snapshot.services.get(key) else {
            return;
        };
        let slices: Vec<&config::EndpointSlice> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|name| snapshot.endpoint_slices.get(&(key.0.clone(), name.clone())))
            .collect();
        // Named target ports are resolved per service port in its slices; a port
        // not resolved yet is left out (its traffic is not routed, not guessed).
        let ports = svc
            .ports
            .iter()
            .filter_map(|p| match &p.target_port_name {
                None => Some(p.clone()),
                Some(_) => slices
                    .iter()
                    .flat_map(|e| &e.ports)
                    .find(|(name, _)| *name == p.name)
                    .map(|(_, number)| config::ServicePort {
                        target_port: *number,
                        ..p.clone()
                    }),
            })
            .collect();
        // Without a selector, the endpoints are whatever its slices list.
        let mut endpoints: Vec<Arc<Workload>> = if svc.selector.is_empty() {
            slices
                .iter()
                .flat_map(|e| &e.addresses)
                .filter_map(|ip| self.by_ip.get_arc(ip).cloned())
                .collect()
        } else {
            self.in_namespace(&svc.namespace)
                .filter(|w| svc.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                .cloned()
                .collect()
        };
        endpoints.sort_by(|a, b| (a.ip, &a.namespace, &a.name).cmp(&(b.ip, &b.namespace, &b.name)));
        endpoints.dedup_by_key(|w| w.ip);
        let Some(vip) = svc.cluster_ip else {
            self.headless.insert(key.clone(), endpoints);
            return;
        };
        let waypoint = binding(
            &mut self.refused_bindings,
            "Service",
            (&svc.namespace, &svc.name),
            &svc.labels,
            snapshot,
        );
        let service = Arc::new(Service {
            name: svc.name.clone(),
            namespace: svc.namespace.clone(),
            vip,
            ports,
            endpoints,
            waypoint,
        });
        for endpoint in service
            .endpoints
            .iter()
            .filter(|_| service.waypoint.is_some())
        {
            match self.bound_services_of.get_mut(&endpoint.ip) {
                Some(services) => {
                    services.insert(key.clone(), service.clone());
                }
                None => {
                    self.bound_services_of.insert(
                        endpoint.ip,
                        BTreeMap::from([(key.clone(), service.clone())]),
                    );
                }
            }
        }
        self.services_by_name.insert_arc(key.clone(), service);
        claim(&mut self.vip_claims, vip, key.clone());
        self.settle_vip(vip);
    }

    /// Points a VIP at the Service claiming it (see `services`).
    fn settle_vip(&mut self, vip: Ipv4Addr) {
        let owner = self
            .vip_claims
            .get(&vip)
            .and_then(|claims| claims.last())
            .and_then(|key| self.services_by_name.get_arc(key))
            .cloned();
        match owner {
            Some(service) => {
                self.services.insert_arc(vip, service);
            }
            None => {
                self.services.remove(&vip);
            }
        }
    }

    /// Derives a waypoint again: its Gateway and the pods serving it.
    fn derive_waypoint(&mut self, key: &Name, snapshot: &Snapshot) {
        self.waypoints.remove(key);
        let Some(gateway) = snapshot
            .gateways
            .get(key)
            .filter(|g| g.class == config::WAYPOINT_CLASS)
        else {
            return;
        };
        let traffic = match gateway.labels.get(config::WAYPOINT_FOR).map(String::as_str) {
            None | Some("service") => WaypointFor::Service,
            Some("workload") => WaypointFor::Workload,
            Some("all") => WaypointFor::All,
            Some(_) => WaypointFor::None,
        };
        let mut pods: Vec<Arc<Workload>> = self
            .in_namespace(&gateway.namespace)
            .filter(|w| w.labels.get(config::GATEWAY_NAME) == Some(&gateway.name))
            .cloned()
            .collect();
        pods.sort_by(|a, b| (a.ip, &a.name).cmp(&(b.ip, &b.name)));
        self.waypoints.insert(
            key.clone(),
            Waypoint {
                name: gateway.name.clone(),
                namespace: gateway.namespace.clone(),
                traffic,
                pods,
            },
        );
    }

    /// The Services bound to waypoint `key` that `workload` is an endpoint of. A
    /// waypoint applies their policies to traffic addressed to the pod as well:
    /// naming a pod never skips its Service's policy.
    pub fn bound_services(
        &self,
        workload: &Workload,
        key: &(String, String),
    ) -> Vec<(String, String)> {
        self.bound_services_of
            .get(&workload.ip)
            .into_iter()
            .flatten()
            .filter(|(_, s)| s.waypoint.as_ref() == Some(key))
            .map(|(name, _)| name.clone())
            .collect()
    }

    pub fn waypoint(&self, key: &(String, String)) -> Option<&Arc<Waypoint>> {
        self.waypoints.get_arc(key)
    }

    /// Whether `identity` is that of a pod serving some waypoint.
    pub fn is_waypoint_identity(&self, identity: &crate::identity::Identity) -> bool {
        self.waypoints
            .values()
            .any(|w| w.pods.iter().any(|p| p.identity == *identity))
    }

    pub fn workload_by_ip(&self, ip: Ipv4Addr) -> Option<&Arc<Workload>> {
        self.by_ip.get_arc(&ip)
    }

    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.by_namespace.get(namespace)?.get_arc(name)
    }

    pub fn service_by_vip(&self, ip: Ipv4Addr) -> Option<&Arc<Service>> {
        self.services.get_arc(&ip)
    }

    /// The addresses whose workload differs from `previous`'s (a state this one
    /// was updated from, or any other): before and after. In time that grows
    /// with the difference when the two share their indexes.
    pub fn workload_changes<'a>(
        &'a self,
        previous: &'a State,
    ) -> Vec<(
        Ipv4Addr,
        Option<&'a Arc<Workload>>,
        Option<&'a Arc<Workload>>,
    )> {
        self.by_ip
            .diff(&previous.by_ip)
            .into_iter()
            .map(|(ip, old, new)| (*ip, old, new))
            .collect()
    }

    /// The VIPs whose Service differs from `previous`'s: before and after (as
    /// [`State::workload_changes`]).
    pub fn service_changes<'a>(
        &'a self,
        previous: &'a State,
    ) -> Vec<(Ipv4Addr, Option<&'a Arc<Service>>, Option<&'a Arc<Service>>)> {
        self.services
            .diff(&previous.services)
            .into_iter()
            .map(|(ip, old, new)| (*ip, old, new))
            .collect()
    }

    /// The headless Services whose endpoints differ from `previous`'s: before
    /// and after (as [`State::workload_changes`]).
    pub fn headless_changes<'a>(
        &'a self,
        previous: &'a State,
    ) -> Vec<crate::cow_map::Change<'a, (String, String), Vec<Arc<Workload>>>> {
        self.headless.diff(&previous.headless)
    }

    /// A headless Service's endpoints, by (namespace, name).
    pub fn headless_service(&self, key: &(String, String)) -> Option<&Vec<Arc<Workload>>> {
        self.headless.get(key)
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.by_ip.arcs().map(|(_, w)| w)
    }

    /// Headless Services ((namespace, name)) and their endpoints.
    pub fn headless_services(
        &self,
    ) -> impl Iterator<Item = (&(String, String), &Vec<Arc<Workload>>)> {
        self.headless.iter()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.arcs().map(|(_, s)| s)
    }

    /// The captured workloads this node's tunnel serves.
    pub fn local_workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.local.arcs().map(|(_, w)| w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Namespace, Pod, Service as SvcConfig, ServicePort};

    fn pod(ns: &str, name: &str, node: &str, ip: [u8; 4], labels: &[(&str, &str)]) -> Pod {
        Pod {
            uid: None,
            name: name.into(),
            namespace: ns.into(),
            labels: Arc::new(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            annotations: BTreeMap::new(),
            service_account: "default".into(),
            node_name: node.into(),
            ip: Some(ip.into()),
            netns: None,
            cgroup: None,
        }
    }

    #[test]
    fn ambient_namespaces_capture_their_pods_unless_opted_out() {
        let mut snapshot = Snapshot::default();
        snapshot.namespaces.insert(
            "mesh".into(),
            Namespace {
                name: "mesh".into(),
                labels: [(config::DATAPLANE_MODE.to_string(), "ambient".to_string())].into(),
                annotations: Default::default(),
            },
        );
        for p in [
            pod("mesh", "a", "n1", [10, 0, 0, 1], &[("app", "web")]),
            pod("mesh", "b", "n2", [10, 0, 0, 2], &[("app", "web")]),
            pod(
                "mesh",
                "c",
                "n1",
                [10, 0, 0, 3],
                &[(config::DATAPLANE_MODE, "none")],
            ),
            pod("plain", "d", "n1", [10, 0, 0, 4], &[("app", "web")]),
        ] {
            snapshot
                .pods
                .insert((p.namespace.clone(), p.name.clone()), p);
        }
        snapshot.services.insert(
            ("mesh".into(), "web".into()),
            SvcConfig {
                name: "web".into(),
                namespace: "mesh".into(),
                labels: BTreeMap::new(),
                cluster_ip: Some([10, 96, 0, 1].into()),
                ports: vec![ServicePort {
                    name: None,
                    port: 80,
                    target_port: 8080,
                    target_port_name: None,
                    app_protocol: None,
                }],
                selector: [("app".to_string(), "web".to_string())].into(),
            },
        );
        let state = State::build(
            Arc::new(snapshot),
            &MeshSettings::new("n1", "cluster.local"),
        );
        let local: Vec<&str> = state.local_workloads().map(|w| w.name.as_str()).collect();
        assert_eq!(local, vec!["a"]);
        assert!(!state.workload_by_ip([10, 0, 0, 3].into()).unwrap().captured);
        assert!(!state.workload_by_ip([10, 0, 0, 4].into()).unwrap().captured);
        let svc = state.service_by_vip([10, 96, 0, 1].into()).unwrap();
        let names: Vec<&str> = svc.endpoints.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, vec!["a", "b"], "same namespace only");
        assert_eq!(
            state.workload_by_name("mesh", "a").unwrap().workload_name(),
            "web"
        );
    }

    #[test]
    fn an_address_two_pods_claim_has_one_owner_and_passes_to_the_other() {
        let settings = MeshSettings::new("n1", "cluster.local");
        let ip = Ipv4Addr::new(10, 0, 0, 7);
        let key = |name: &str| ("demo".to_string(), name.to_string());
        let with = |names: &[&str]| {
            let mut snapshot = Snapshot::default();
            for name in names {
                snapshot
                    .pods
                    .insert(key(name), pod("demo", name, "n1", ip.octets(), &[]));
            }
            Arc::new(snapshot)
        };
        // Whichever came first, the greatest (namespace, name) owns it.
        let empty = State::build(with(&[]), &settings);
        for first in ["new", "old"] {
            let state = empty.update(with(&[first])).update(with(&["new", "old"]));
            assert_eq!(
                state.workload_by_ip(ip).unwrap().name,
                "old",
                "{first} first"
            );
            assert_eq!(state.contested_ips.len(), 1);
            assert_eq!(
                state.contested_ips[&ip],
                BTreeSet::from([key("new"), key("old")])
            );
        }
        let both = empty.update(with(&["new", "old"]));
        // The owner goes: the other has the address, no longer contested.
        let one = both.update(with(&["new"]));
        assert_eq!(one.workload_by_ip(ip).unwrap().name, "new");
        assert!(one.contested_ips.is_empty());
        // The other goes instead: the owner keeps it.
        let other = both.update(with(&["old"]));
        assert_eq!(other.workload_by_ip(ip).unwrap().name, "old");
        assert!(other.contested_ips.is_empty());
        // An address only one pod claims has no entry at all.
        assert!(empty.update(with(&["new"])).contested_ips.is_empty());
        assert!(one.update(with(&[])).workload_by_ip(ip).is_none());
    }

    #[test]
    fn workloads_of_one_service_account_share_its_identity() {
        let mut snapshot = Snapshot::default();
        for (name, sa, ip) in [("a", "web", 1), ("b", "web", 2), ("c", "db", 3)] {
            let mut p = pod("demo", name, "n1", [10, 0, 0, ip], &[]);
            p.service_account = sa.into();
            snapshot.pods.insert(("demo".into(), name.into()), p);
        }
        let settings = MeshSettings::new("n1", "cluster.local");
        let state = State::build(Arc::new(snapshot.clone()), &settings);
        let identity =
            |s: &State, name: &str| s.workload_by_name("demo", name).unwrap().identity.clone();
        assert_eq!(
            identity(&state, "a").to_string(),
            "spiffe://cluster.local/ns/demo/sa/web"
        );
        assert_eq!(state.identities.len(), 2);
        assert_eq!(state.identities[&("demo".into(), "web".into())].1, 2);
        // The last workload of a service account gone: its identity is forgotten.
        snapshot.pods.remove(&("demo".into(), "c".into()));
        let state = state.update(Arc::new(snapshot));
        assert_eq!(state.identities.len(), 1);
        assert_eq!(identity(&state, "b"), identity(&state, "a"));
    }

    #[test]
    fn a_cross_namespace_binding_needs_the_gateways_consent() {
        use config::{AllowedNamespaces, Gateway, LabelExpression, LabelSelector};
        let build = |allowed: AllowedNamespaces| {
            let mut snapshot = Snapshot::default();
            for (ns, labels) in [("infra", vec![]), ("demo", vec![("team", "a")])] {
                snapshot.namespaces.insert(
                    ns.into(),
                    Namespace {
                        name: ns.into(),
                        labels: labels
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        annotations: BTreeMap::new(),
                    },
                );
            }
            snapshot.gateways.insert(
                ("infra".into(), "wp".into()),
                Gateway {
                    name: "wp".into(),
                    namespace: "infra".into(),
                    class: config::WAYPOINT_CLASS.into(),
                    labels: BTreeMap::new(),
                    allowed_namespaces: allowed,
                },
            );
            let bound = [
                (config::USE_WAYPOINT, "wp"),
                (config::USE_WAYPOINT_NAMESPACE, "infra"),
            ];
            for p in [
                pod("demo", "a", "n1", [10, 0, 0, 1], &bound),
                pod("infra", "b", "n1", [10, 0, 0, 2], &bound[..1]),
            ] {
                snapshot
                    .pods
                    .insert((p.namespace.clone(), p.name.clone()), p);
            }
            State::build(
                Arc::new(snapshot),
                &MeshSettings::new("n1", "cluster.local"),
            )
        };
        let key = Some(("infra".to_string(), "wp".to_string()));
        let selector = |expressions| {
            AllowedNamespaces::Selector(LabelSelector {
                match_labels: BTreeMap::new(),
                match_expressions: expressions,
            })
        };
        for (allowed, admitted) in [
            (AllowedNamespaces::Same, false),
            (AllowedNamespaces::All, true),
            (
                selector(vec![LabelExpression::In("team".into(), vec!["a".into()])]),
                true,
            ),
            (
                selector(vec![LabelExpression::NotIn(
                    "team".into(),
                    vec!["a".into()],
                )]),
                false,
            ),
            (
                selector(vec![LabelExpression::DoesNotExist("team".into())]),
                false,
            ),
        ] {
            let state = build(allowed.clone());
            let a = state.workload_by_name("demo", "a").unwrap();
            assert_eq!(a.waypoint.is_some(), admitted, "{allowed:?}");
            assert_eq!(
                state.refused_bindings.contains_key("Pod demo/a"),
                !admitted,
                "{allowed:?}"
            );
            // The Gateway's own namespace under Same; a selector decides for it too.
            let b = state.workload_by_name("infra", "b").unwrap();
            let own = !matches!(allowed, AllowedNamespaces::Selector(_))
                || matches!(&allowed, AllowedNamespaces::Selector(s) if s.matches(&BTreeMap::new()));
            assert_eq!(b.waypoint == key, own, "{allowed:?}");
        }
    }

    /// A small deterministic generator (xorshift), so a failure is reproducible
    /// from its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }
    }

    const NAMESPACES: [&str; 4] = ["a", "b", "infra", "istio-system"];

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// One random object of a small world, so that objects collide: pods share
    /// addresses, Services share VIPs, slices list pods of other namespaces,
    /// bindings name Gateways that admit or refuse them.
    fn random_change(rng: &mut Rng, snapshot: &mut Snapshot) {
        use config::{AllowedNamespaces, EndpointSlice, Gateway, LabelSelector};
        let ns = rng.pick(&NAMESPACES).to_string();
        let delete = rng.chance(25);
        match rng.below(7) {
            0 => {
                let key = ns.clone();
                if delete {
                    snapshot.namespaces.remove(&key);
                    return;
                }
                let mut l = Vec::new();
                if rng.chance(70) {
                    l.push((config::DATAPLANE_MODE, config::AMBIENT));
                }
                if rng.chance(30) {
                    l.push((config::USE_WAYPOINT, "wp"));
                    if rng.chance(50) {
                        l.push((config::USE_WAYPOINT_NAMESPACE, "infra"));
                    }
                }
                if rng.chance(50) {
                    l.push(("team", rng.pick(&["x", "y"])));
                }
                snapshot.namespaces.insert(
                    key.clone(),
                    Namespace {
                        name: key,
                        labels: labels(&l),
                        annotations: BTreeMap::new(),
                    },
                );
            }
            1 | 2 => {
                let key = (ns.clone(), format!("p{}", rng.below(6)));
                if delete {
                    snapshot.pods.remove(&key);
                    return;
                }
                let mut l = vec![("app", rng.pick(&["x", "y", "z"]))];
                if rng.chance(15) {
                    l.push((config::DATAPLANE_MODE, config::OPT_OUT));
                }
                if rng.chance(20) {
                    l.push((config::GATEWAY_NAME, "wp"));
                }
                if rng.chance(20) {
                    l.push((config::USE_WAYPOINT, rng.pick(&["wp", "none"])));
                    if rng.chance(50) {
                        l.push((config::USE_WAYPOINT_NAMESPACE, "infra"));
                    }
                }
                let mut p = pod(
                    &key.0,
                    &key.1,
                    rng.pick(&["n1", "n2"]),
                    [10, 0, 0, 1 + rng.below(5) as u8],
                    &l,
                );
                if rng.chance(10) {
                    p.ip = None;
                }
                if rng.chance(5) {
                    p.service_account = "Not A Name".into();
                }
                snapshot.pods.insert(key, p);
            }
            3 => {
                let key = (ns.clone(), format!("s{}", rng.below(4)));
                if delete {
                    snapshot.services.remove(&key);
                    return;
                }
                let named = rng.chance(30);
                snapshot.services.insert(
                    key.clone(),
                    SvcConfig {
                        name: key.1.clone(),
                        namespace: key.0.clone(),
                        labels: match rng.chance(30) {
                            true => labels(&[(config::USE_WAYPOINT, "wp")]),
                            false => BTreeMap::new(),
                        },
                        cluster_ip: (!rng.chance(20))
                            .then(|| [10, 96, 0, 1 + rng.below(3) as u8].into()),
                        ports: vec![ServicePort {
                            name: Some("http".into()),
                            port: 80,
                            target_port: if named { 0 } else { 8080 },
                            target_port_name: named.then(|| "web".into()),
                            app_protocol: None,
                        }],
                        selector: match rng.chance(30) {
                            true => BTreeMap::new(),
                            false => labels(&[("app", rng.pick(&["x", "y"]))]),
                        },
                    },
                );
            }
            4 => {
                let key = (ns.clone(), format!("e{}", rng.below(4)));
                if delete {
                    snapshot.endpoint_slices.remove(&key);
                    return;
                }
                let addresses = (1..=5)
                    .filter(|_| rng.chance(40))
                    .map(|i| [10, 0, 0, i].into())
                    .collect();
                snapshot.endpoint_slices.insert(
                    key.clone(),
                    EndpointSlice {
                        name: key.1.clone(),
                        namespace: key.0.clone(),
                        service: (!rng.chance(10)).then(|| format!("s{}", rng.below(4))),
                        addresses,
                        ports: vec![(Some("http".into()), 8000 + rng.below(3) as u16)],
                    },
                );
            }
            5 => {
                let key = (rng.pick(&["a", "infra"]).to_string(), "wp".to_string());
                if delete {
                    snapshot.gateways.remove(&key);
                    return;
                }
                let allowed = match rng.below(3) {
                    0 => AllowedNamespaces::Same,
                    1 => AllowedNamespaces::All,
                    _ => AllowedNamespaces::Selector(LabelSelector {
                        match_labels: labels(&[("team", "x")]),
                        match_expressions: Vec::new(),
                    }),
                };
                snapshot.gateways.insert(
                    key.clone(),
                    Gateway {
                        name: key.1.clone(),
                        namespace: key.0.clone(),
                        class: rng.pick(&[config::WAYPOINT_CLASS, "other"]).into(),
                        labels: labels(&[(
                            config::WAYPOINT_FOR,
                            rng.pick(&["service", "workload", "all"]),
                        )]),
                        allowed_namespaces: allowed,
                    },
                );
            }
            _ => {
                let name = format!("ap{}", rng.below(3));
                let key = ("AuthorizationPolicy".to_string(), ns.clone(), name.clone());
                if delete {
                    snapshot.policies.remove(&key);
                    return;
                }
                let spec = rng.pick(&[
                    "{action: DENY, selector: {matchLabels: {app: x}}, rules: [{from: [{source: {namespaces: [b]}}]}]}",
                    "{rules: [{from: [{source: {namespaces: [a]}}]}]}",
                    "{selector: {matchLabels: {app: y}}, rules: [{}]}",
                    // Refused: in force fail closed.
                    "{action: PERHAPS}",
                ]);
                let policy = crate::policy::Policy::new(
                    "AuthorizationPolicy",
                    "security.istio.io/v1",
                    &ns,
                    &name,
                    BTreeMap::new(),
                    serde_yaml::from_str(spec).unwrap(),
                );
                snapshot.policies.insert(key, policy);
            }
        }
    }

    /// Every index and every decision of `incremental` is that of `scratch`.
    fn assert_same(incremental: &State, scratch: &State, context: &str) {
        macro_rules! same_index {
            ($($index:ident),+) => {$(
                assert_eq!(
                    incremental.$index, scratch.$index,
                    "{}: {context}", stringify!($index)
                );
            )+};
        }
        same_index!(
            by_ip,
            contested_ips,
            identities,
            by_namespace,
            local,
            services,
            vip_claims,
            services_by_name,
            bound_services_of,
            waypoints,
            headless,
            services_in,
            slices_of,
            slices_at,
            refused_bindings
        );
        // The same decisions, for every pair of workloads, from the policy index
        // the update kept or rebuilt.
        for to in scratch.workloads() {
            for from in scratch.workloads() {
                let conn = crate::policy::Connection {
                    source_identity: Some(from.identity.clone()),
                    source_ip: from.ip.into(),
                    destination_ip: to.ip.into(),
                    destination_port: 8080,
                };
                assert_eq!(
                    incremental.policies.authorize(to, &conn),
                    scratch.policies.authorize(to, &conn),
                    "decision {} -> {}: {context}",
                    from.name,
                    to.name
                );
            }
        }
    }

    #[test]
    fn random_changes_applied_one_by_one_give_the_state_built_from_scratch() {
        let settings = MeshSettings::new("n1", "cluster.local");
        for seed in 1..=60u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut snapshot = Snapshot::default();
            let mut state = State::build(Arc::new(snapshot.clone()), &settings);
            for step in 0..80 {
                // Mostly one object at a time, as a watch delivers them; sometimes
                // a burst.
                for _ in 0..1 + usize::from(rng.chance(20)) * rng.below(6) {
                    random_change(&mut rng, &mut snapshot);
                }
                // Sometimes the source rebuilds the whole snapshot (the local
                // one does): nothing shared, the same objects.
                let next = match rng.chance(10) {
                    true => Snapshot {
                        pods: snapshot
                            .pods
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                        ..snapshot.clone()
                    },
                    false => snapshot.clone(),
                };
                let next = Arc::new(next);
                // Ask the old state first: its policy cache is shared.
                for w in state.workloads() {
                    let conn = crate::policy::Connection {
                        source_identity: None,
                        source_ip: w.ip.into(),
                        destination_ip: w.ip.into(),
                        destination_port: 80,
                    };
                    state.policies.authorize(w, &conn);
                }
                let previous = state;
                let before: Vec<Workload> = previous.workloads().map(|w| (**w).clone()).collect();
                state = previous.update(next.clone());
                let scratch = State::build(next, &settings);
                assert_same(&state, &scratch, &format!("seed {seed}, step {step}"));
                // The changed addresses are those whose workload differs.
                let mut changed: Vec<Ipv4Addr> = state
                    .workload_changes(&previous)
                    .iter()
                    .map(|c| c.0)
                    .collect();
                changed.sort();
                let mut expected: Vec<Ipv4Addr> = previous
                    .workloads()
                    .chain(state.workloads())
                    .map(|w| w.ip)
                    .filter(|ip| previous.workload_by_ip(*ip) != state.workload_by_ip(*ip))
                    .collect();
                expected.sort();
                expected.dedup();
                assert_eq!(changed, expected, "seed {seed}, step {step}");
                // Readers of the old state see it unchanged.
                let after: Vec<Workload> = previous.workloads().map(|w| (**w).clone()).collect();
                assert_eq!(before, after);
            }
        }
    }
}
