//! The mesh as the tunnel sees it, built from a config snapshot: workloads by IP
//! and by name, services by VIP with their endpoints. Immutable: the proxy takes one
//! `Arc<State>` per connection and never holds a lock while it works.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
};

use crate::{
    config::{self, Snapshot},
    identity::Identity,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    pub identity: Identity,
    /// In an ambient namespace and not opted out: its node's tunnel carries its
    /// traffic, and it is reached over HBONE.
    pub captured: bool,
    /// Local mode: where its node finds its network namespace and cgroup.
    pub netns: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    /// The waypoint (namespace, name) its pod-addressed traffic may go through.
    pub waypoint: Option<(String, String)>,
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
#[derive(Clone, Debug)]
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
}

#[derive(Debug, Default)]
pub struct State {
    pub node: String,
    pub snapshot: Arc<Snapshot>,
    /// The compiled policies.
    pub policies: Arc<crate::policy::Index>,
    by_ip: HashMap<Ipv4Addr, Arc<Workload>>,
    by_name: HashMap<(String, String), Arc<Workload>>,
    services: HashMap<Ipv4Addr, Arc<Service>>,
    /// The services each workload (by IP) is an endpoint of.
    services_of: HashMap<Ipv4Addr, Vec<Arc<Service>>>,
    waypoints: HashMap<(String, String), Arc<Waypoint>>,
    /// Headless Services (no cluster IP), by (namespace, name): their endpoints.
    /// They route nothing; DNS names their pods.
    headless: HashMap<(String, String), Vec<Arc<Workload>>>,
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

/// The state, rebuilt on every config snapshot (refused bindings reported).
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
            let state = Arc::new(State::build(snapshot, &settings));
            let previous = tx.borrow().clone();
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

impl State {
    pub fn build(snapshot: Arc<Snapshot>, settings: &MeshSettings) -> Self {
        let trust_domain = settings.trust_domain.as_str();
        let mut trust_domains = vec![settings.trust_domain.clone()];
        trust_domains.extend(settings.trust_domain_aliases.iter().cloned());
        let mut state = State {
            node: settings.node.clone(),
            policies: Arc::new(crate::policy::Index::build(
                snapshot.policies.values(),
                &settings.root_namespace,
                trust_domains,
            )),
            ..Default::default()
        };
        for pod in snapshot.pods.values() {
            let Some(ip) = pod.ip else { continue };
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
            let Ok(identity) = Identity::new(trust_domain, &pod.namespace, &pod.service_account)
            else {
                tracing::warn!(pod = %pod.name, namespace = %pod.namespace, "no valid identity for the pod; left out of the mesh");
                continue;
            };
            let workload = Arc::new(Workload {
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
                node: pod.node_name.clone(),
                ip,
                labels: pod.labels.clone(),
                identity,
                captured: ambient_ns && !opted_out && !is_waypoint,
                netns: pod.netns.clone(),
                cgroup: pod.cgroup.clone(),
                waypoint: binding(
                    &mut state.refused_bindings,
                    "Pod",
                    (&pod.namespace, &pod.name),
                    &pod.labels,
                    &snapshot,
                ),
            });
            state.by_ip.insert(ip, workload.clone());
            state
                .by_name
                .insert((pod.namespace.clone(), pod.name.clone()), workload);
        }
        // Services and waypoints select among their namespace's workloads and
        // their own slices: indexed once, so a build grows with the cluster, not
        // with its square.
        let mut by_namespace: HashMap<&str, Vec<&Arc<Workload>>> = HashMap::new();
        for workload in state.by_name.values() {
            by_namespace
                .entry(workload.namespace.as_str())
                .or_default()
                .push(workload);
        }
        let mut slices_of: HashMap<(&str, &str), Vec<&config::EndpointSlice>> = HashMap::new();
        for slice in snapshot.endpoint_slices.values() {
            if let Some(service) = &slice.service {
                slices_of
                    .entry((slice.namespace.as_str(), service.as_str()))
                    .or_default()
                    .push(slice);
            }
        }
        let in_namespace = |ns: &str| by_namespace.get(ns).into_iter().flatten().copied();
        for svc in snapshot.services.values() {
            let slices = slices_of
                .get(&(svc.namespace.as_str(), svc.name.as_str()))
                .map(Vec::as_slice)
                .unwrap_or_default();
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
                    .filter_map(|ip| state.by_ip.get(ip).cloned())
                    .collect()
            } else {
                in_namespace(&svc.namespace)
                    .filter(|w| svc.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                    .cloned()
                    .collect()
            };
            endpoints.sort_by_key(|w| w.ip);
            endpoints.dedup_by_key(|w| w.ip);
            let Some(vip) = svc.cluster_ip else {
                state
                    .headless
                    .insert((svc.namespace.clone(), svc.name.clone()), endpoints);
                continue;
            };
            let waypoint = binding(
                &mut state.refused_bindings,
                "Service",
                (&svc.namespace, &svc.name),
                &svc.labels,
                &snapshot,
            );
            let service = Arc::new(Service {
                name: svc.name.clone(),
                namespace: svc.namespace.clone(),
                vip,
                ports,
                endpoints,
                waypoint,
            });
            for endpoint in &service.endpoints {
                state
                    .services_of
                    .entry(endpoint.ip)
                    .or_default()
                    .push(service.clone());
            }
            state.services.insert(vip, service);
        }
        for gateway in snapshot
            .gateways
            .values()
            .filter(|g| g.class == config::WAYPOINT_CLASS)
        {
            let traffic = match gateway.labels.get(config::WAYPOINT_FOR).map(String::as_str) {
                None | Some("service") => WaypointFor::Service,
                Some("workload") => WaypointFor::Workload,
                Some("all") => WaypointFor::All,
                Some(_) => WaypointFor::None,
            };
            let mut pods: Vec<Arc<Workload>> = in_namespace(&gateway.namespace)
                .filter(|w| w.labels.get(config::GATEWAY_NAME) == Some(&gateway.name))
                .cloned()
                .collect();
            pods.sort_by_key(|w| w.ip);
            state.waypoints.insert(
                (gateway.namespace.clone(), gateway.name.clone()),
                Arc::new(Waypoint {
                    name: gateway.name.clone(),
                    namespace: gateway.namespace.clone(),
                    traffic,
                    pods,
                }),
            );
        }
        state.snapshot = snapshot;
        state
    }

    /// The Services bound to waypoint `key` that `workload` is an endpoint of. A
    /// waypoint applies their policies to traffic addressed to the pod as well:
    /// naming a pod never skips its Service's policy.
    pub fn bound_services(
        &self,
        workload: &Workload,
        key: &(String, String),
    ) -> Vec<(String, String)> {
        let mut services: Vec<(String, String)> = self
            .services_of
            .get(&workload.ip)
            .into_iter()
            .flatten()
            .filter(|s| s.waypoint.as_ref() == Some(key))
            .map(|s| (s.namespace.clone(), s.name.clone()))
            .collect();
        services.sort();
        services.dedup();
        services
    }

    pub fn waypoint(&self, key: &(String, String)) -> Option<&Arc<Waypoint>> {
        self.waypoints.get(key)
    }

    /// Whether `identity` is that of a pod serving some waypoint.
    pub fn is_waypoint_identity(&self, identity: &crate::identity::Identity) -> bool {
        self.waypoints
            .values()
            .any(|w| w.pods.iter().any(|p| p.identity == *identity))
    }

    pub fn workload_by_ip(&self, ip: Ipv4Addr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.by_name.get(&(namespace.to_owned(), name.to_owned()))
    }

    pub fn service_by_vip(&self, ip: Ipv4Addr) -> Option<&Arc<Service>> {
        self.services.get(&ip)
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.by_ip.values()
    }

    /// Headless Services ((namespace, name)) and their endpoints.
    pub fn headless_services(
        &self,
    ) -> impl Iterator<Item = (&(String, String), &Vec<Arc<Workload>>)> {
        self.headless.iter()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// The captured workloads this node's tunnel serves.
    pub fn local_workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.by_ip
            .values()
            .filter(move |w| w.captured && w.node == self.node)
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
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
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
}
