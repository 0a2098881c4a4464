//! The names the mesh answers itself, as kube-dns names them: Services
//! (`<svc>.<ns>.svc.<domain>`, a headless one's pods also as
//! `<pod>.<svc>.<ns>.svc.<domain>`) and pods (`<a-b-c-d>.<ns>.pod.<domain>`); and the
//! short forms a query can carry without the search list (`<svc>`, `<svc>.<ns>`,
//! `<svc>.<ns>.svc`), taken relative to the asking pod's namespace. Pure: built
//! from the state, no I/O.

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

use crate::{
    config::CowMap,
    state::{State, Workload},
};

/// What the mesh says about a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The name exists: its IPv4 addresses (empty for a name that exists with no
    /// address, such as `<ns>.svc.<domain>`, or a headless Service with no ready
    /// endpoint).
    Addresses(Vec<Ipv4Addr>),
    /// In the cluster domain, and no such name.
    NxDomain,
    /// Not the mesh's to answer: forwarded.
    NotMesh,
}

/// The mesh's names, indexed from a state and kept up to date with the states
/// after it change by change ([`MeshNames::update`]). All lowercase. The maps
/// share what did not change with the names before (see `CowMap`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshNames {
    /// The cluster domain's labels (e.g. `cluster.local`).
    domain: String,
    /// (namespace, service) → its cluster IP, or a headless Service's endpoints.
    services: CowMap<(String, String), Vec<Ipv4Addr>>,
    /// (namespace, headless service, pod name) → the pod's address.
    service_pods: CowMap<(String, String, String), Ipv4Addr>,
    /// The namespace of each pod address the mesh knows.
    pods: CowMap<Ipv4Addr, String>,
    /// Each namespace that exists (as an object, or as that of a Service or a
    /// pod): how many of those name it.
    namespaces: CowMap<String, usize>,
}

impl MeshNames {
    pub fn new(domain: &str) -> Self {
        Self {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            ..Default::default()
        }
    }

    pub fn from_state(state: &State, domain: &str) -> Self {
        let mut names = Self::new(domain);
        for ns in state.snapshot.namespaces.keys() {
            names.count(ns, 1);
        }
        for svc in state.services() {
            names.set_service(&svc.namespace, &svc.name, Some(vec![svc.vip]));
        }
        for (key, endpoints) in state.headless_services() {
            names.set_headless(key, None, Some(endpoints));
        }
        for pod in state.workloads() {
            names.set_pod(pod.ip, Some(&pod.namespace));
        }
        names
    }

    /// The names of `state`, from these (the names of `previous`, a state it was
    /// updated from): only the names of the namespaces, Services and pods that
    /// differ between the two are derived again, in time that grows with what
    /// changed.
    pub fn update(&self, previous: &State, state: &State) -> Self {
        let mut next = self.clone();
        for (ns, old, new) in state
            .snapshot
            .namespaces
            .diff(&previous.snapshot.namespaces)
        {
            next.count(ns, isize::from(new.is_some()) - isize::from(old.is_some()));
        }
        let mut services = BTreeSet::new();
        for (_, old, new) in state.service_changes(previous) {
            services.extend(old.into_iter().chain(new).map(|s| (&s.namespace, &s.name)));
        }
        for (key, old, new) in state.headless_changes(previous) {
            next.set_headless(key, old.map(|e| &**e), new.map(|e| &**e));
            services.insert((&key.0, &key.1));
        }
        for (ns, name) in services {
            next.set_service(ns, name, addresses(state, (ns, name)));
        }
        for (ip, _, new) in state.workload_changes(previous) {
            next.set_pod(ip, new.map(|w| w.namespace.as_str()));
        }
        next
    }

    pub fn add_service(&mut self, namespace: &str, name: &str, addresses: Vec<Ipv4Addr>) {
        self.set_service(namespace, name, Some(addresses));
    }

    pub fn add_pod(&mut self, namespace: &str, ip: Ipv4Addr) {
        self.set_pod(ip, Some(namespace));
    }

    /// One more (or fewer) names in the namespace.
    fn count(&mut self, namespace: &str, delta: isize) {
        if delta == 0 {
            return;
        }
        let namespace = namespace.to_ascii_lowercase();
        let count = self.namespaces.get(&namespace).map_or(0, |n| *n as isize) + delta;
        match usize::try_from(count) {
            Ok(count) if count > 0 => drop(self.namespaces.insert(namespace, count)),
            _ => drop(self.namespaces.remove(&namespace)),
        }
    }

    /// A Service's addresses; None: no such name.
    fn set_service(&mut self, namespace: &str, name: &str, addresses: Option<Vec<Ipv4Addr>>) {
        let key = (namespace.to_ascii_lowercase(), name.to_ascii_lowercase());
        let now = addresses.is_some();
        let was = match addresses {
            Some(addresses) => self.services.insert(key, addresses),
            None => self.services.remove(&key),
        };
        self.count(namespace, isize::from(now) - isize::from(was.is_some()));
    }

    /// A headless Service's pods, named by it: those of `old` go, those of `new`
    /// come.
    fn set_headless(
        &mut self,
        (namespace, name): &(String, String),
        old: Option<&Vec<Arc<Workload>>>,
        new: Option<&Vec<Arc<Workload>>>,
    ) {
        let key = |pod: &Workload| {
            (
                namespace.to_ascii_lowercase(),
                name.to_ascii_lowercase(),
                pod.name.to_ascii_lowercase(),
            )
        };
        for pod in old.into_iter().flatten() {
            self.service_pods.remove(&key(pod));
        }
        for pod in new.into_iter().flatten() {
            self.service_pods.insert(key(pod), pod.ip);
        }
        if let Some(endpoints) = new {
            let addresses = endpoints.iter().map(|w| w.ip).collect();
            self.set_service(namespace, name, Some(addresses));
        }
    }

    /// The namespace of the pod at `ip`; None: no pod there.
    fn set_pod(&mut self, ip: Ipv4Addr, namespace: Option<&str>) {
        let was = match namespace {
            Some(ns) => {
                self.count(ns, 1);
                self.pods.insert(ip, ns.to_ascii_lowercase())
            }
            None => self.pods.remove(&ip),
        };
        if let Some(was) = was {
            self.count(&was, -1);
        }
    }

    /// What the mesh answers for `name` (any case, with or without the final dot)
    /// asked by a pod of `namespace`.
    pub fn resolve(&self, name: &str, namespace: &str) -> Answer {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let namespace = namespace.to_ascii_lowercase();
        if let Some(local) = self.in_domain(&name) {
            return self.in_cluster(local);
        }
        // A short form: resolved as the search list `<ns>.svc.<domain>`,
        // `svc.<domain>` would; a miss is not ours (it may be a real name).
        let labels: Vec<&str> = name.split('.').collect();
        let service = match labels.as_slice() {
            [svc] => self.service(&namespace, svc),
            [svc, ns] | [svc, ns, "svc"] => self.service(ns, svc),
            _ => None,
        };
        match service {
            Some(addresses) => Answer::Addresses(addresses.clone()),
            None => Answer::NotMesh,
        }
    }

    /// The labels before the cluster domain, if `name` is in it ("" for the
    /// domain itself).
    fn in_domain<'a>(&self, name: &'a str) -> Option<&'a str> {
        if self.domain.is_empty() {
            return None;
        }
        if name == self.domain {
            return Some("");
        }
        name.strip_suffix(&self.domain)?.strip_suffix('.')
    }

    /// A name in the cluster domain: the mesh knows it, or it does not exist.
    fn in_cluster(&self, local: &str) -> Answer {
        let labels: Vec<&str> = if local.is_empty() {
            Vec::new()
        } else {
            local.split('.').collect()
        };
        let exists_empty = Answer::Addresses(Vec::new());
        let found = match labels.as_slice() {
            // The domain, `svc`, `pod` and each namespace exist, with no address.
            [] | ["svc"] | ["pod"] => return exists_empty,
            [ns, "svc"] | [ns, "pod"] if self.namespaces.contains_key(*ns) => return exists_empty,
            [svc, ns, "svc"] => self.service(ns, svc).cloned(),
            [pod, svc, ns, "svc"] => self
                .service_pods
                .get(&(ns.to_string(), svc.to_string(), pod.to_string()))
                .map(|ip| vec![*ip]),
            [dashed, ns, "pod"] => dashed_ip(dashed)
                .filter(|ip| self.pods.get(ip).is_some_and(|n| n == ns))
                .map(|ip| vec![ip]),
            _ => None,
        };
        found.map_or(Answer::NxDomain, Answer::Addresses)
    }

    fn service(&self, namespace: &str, name: &str) -> Option<&Vec<Ipv4Addr>> {
        self.services.get(&(namespace.to_owned(), name.to_owned()))
    }
}

/// What `state` names (namespace, name): a headless Service's endpoints, or a
/// Service's cluster IP (if it holds it: of two claiming one, the state routes
/// to one); None: no such Service.
fn addresses(state: &State, key: (&String, &String)) -> Option<Vec<Ipv4Addr>> {
    let key = (key.0.clone(), key.1.clone());
    if let Some(endpoints) = state.headless_service(&key) {
        return Some(endpoints.iter().map(|w| w.ip).collect());
    }
    let vip = state.snapshot.services.get(&key)?.cluster_ip?;
    state
        .service_by_vip(vip)
        .filter(|s| s.namespace == key.0 && s.name == key.1)
        .map(|_| vec![vip])
}

/// `10-1-2-3` → 10.1.2.3.
fn dashed_ip(label: &str) -> Option<Ipv4Addr> {
    label.replace('-', ".").parse().ok().filter(|_| {
        // Exactly four dash-separated parts: "10.1.2.3" itself is not a label.
        !label.contains('.')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn mesh() -> MeshNames {
        let mut names = MeshNames::new("cluster.local");
        names.add_service("demo", "server", vec![ip("10.96.0.50")]);
        names.add_service("other", "server", vec![ip("10.96.0.60")]);
        names.add_service("demo", "db", vec![ip("10.0.1.5"), ip("10.0.2.5")]);
        names
            .service_pods
            .insert(("demo".into(), "db".into(), "db-0".into()), ip("10.0.1.5"));
        names.add_pod("demo", ip("10.0.1.5"));
        names.add_pod("demo", ip("10.0.1.7"));
        names
    }

    fn addresses(list: &[&str]) -> Answer {
        Answer::Addresses(list.iter().map(|s| ip(s)).collect())
    }

    #[test]
    fn a_service_is_found_by_its_full_name_in_any_namespace() {
        let names = mesh();
        for asker in ["demo", "other", "elsewhere"] {
            assert_eq!(
                names.resolve("server.demo.svc.cluster.local.", asker),
                addresses(&["10.96.0.50"])
            );
            assert_eq!(
                names.resolve("Server.Other.SVC.cluster.local", asker),
                addresses(&["10.96.0.60"])
            );
        }
    }

    #[test]
    fn short_forms_are_relative_to_the_asking_pods_namespace() {
        let names = mesh();
        assert_eq!(names.resolve("server.", "demo"), addresses(&["10.96.0.50"]));
        assert_eq!(names.resolve("server", "other"), addresses(&["10.96.0.60"]));
        assert_eq!(
            names.resolve("server.other.", "demo"),
            addresses(&["10.96.0.60"])
        );
        assert_eq!(
            names.resolve("server.demo.svc.", "other"),
            addresses(&["10.96.0.50"])
        );
        // A namespace with no such Service: not the mesh's, forwarded.
        assert_eq!(names.resolve("server.", "elsewhere"), Answer::NotMesh);
        assert_eq!(names.resolve("example.com.", "demo"), Answer::NotMesh);
        assert_eq!(names.resolve("a.b.c.d.", "demo"), Answer::NotMesh);
    }

    #[test]
    fn what_a_search_list_appends_to_a_qualified_name_does_not_exist() {
        // `server.demo` with the search list first becomes
        // `server.demo.demo.svc.cluster.local`: NXDOMAIN, as from kube-dns, so the
        // resolver moves on to the next suffix at once.
        let names = mesh();
        for name in [
            "server.demo.demo.svc.cluster.local",
            "server.demo.svc.svc.cluster.local",
            "server.demo.svc.demo.svc.cluster.local",
            "server.demo.cluster.local",
            "missing.demo.svc.cluster.local",
            "server.nowhere.svc.cluster.local",
            "example.com.cluster.local",
        ] {
            assert_eq!(names.resolve(name, "demo"), Answer::NxDomain, "{name}");
        }
    }

    #[test]
    fn names_above_the_services_exist_without_addresses() {
        let names = mesh();
        for name in [
            "cluster.local",
            "svc.cluster.local",
            "demo.svc.cluster.local",
            "demo.pod.cluster.local",
        ] {
            assert_eq!(names.resolve(name, "demo"), addresses(&[]), "{name}");
        }
        assert_eq!(
            names.resolve("nowhere.svc.cluster.local", "demo"),
            Answer::NxDomain
        );
    }

    #[test]
    fn a_headless_service_names_its_endpoints_and_each_pod() {
        let names = mesh();
        assert_eq!(
            names.resolve("db.demo.svc.cluster.local", "x"),
            addresses(&["10.0.1.5", "10.0.2.5"])
        );
        assert_eq!(
            names.resolve("db-0.db.demo.svc.cluster.local", "x"),
            addresses(&["10.0.1.5"])
        );
        assert_eq!(
            names.resolve("db-1.db.demo.svc.cluster.local", "x"),
            Answer::NxDomain
        );
    }

    #[test]
    fn a_pod_is_named_by_its_dashed_address_in_its_own_namespace_only() {
        let names = mesh();
        assert_eq!(
            names.resolve("10-0-1-7.demo.pod.cluster.local", "x"),
            addresses(&["10.0.1.7"])
        );
        for name in [
            "10-0-1-7.other.pod.cluster.local",
            "10-0-1-8.demo.pod.cluster.local",
            "10-0-1.demo.pod.cluster.local",
            "10-0-1-7-9.demo.pod.cluster.local",
            "x.demo.pod.cluster.local",
        ] {
            assert_eq!(names.resolve(name, "demo"), Answer::NxDomain, "{name}");
        }
    }

    /// One random change to a small cluster: a namespace, a pod (moving between
    /// addresses, sometimes onto another's), a Service (cluster IP or headless,
    /// with a selector or its slices) or an EndpointSlice, added, changed or
    /// removed.
    fn random_change(rng: &mut fastrand::Rng, snapshot: &mut crate::config::Snapshot) {
        use crate::config::{EndpointSlice, Namespace, Pod, Service};
        let ns = format!("ns-{}", rng.usize(0..3));
        let name = format!("x-{}", rng.usize(0..5));
        let key = (ns.clone(), name.clone());
        let remove = rng.usize(0..4) == 0;
        let address = |rng: &mut fastrand::Rng| Ipv4Addr::new(10, 0, 0, rng.u8(1..8));
        match rng.usize(0..7) {
            0 if remove => drop(snapshot.namespaces.remove(&ns)),
            0 => drop(snapshot.namespaces.insert(
                ns.clone(),
                Namespace {
                    name: ns,
                    labels: Default::default(),
                    annotations: Default::default(),
                },
            )),
            1 | 2 if remove => drop(snapshot.pods.remove(&key)),
            1 | 2 => drop(snapshot.pods.insert(
                key,
                Pod {
                    uid: None,
                    name,
                    namespace: ns,
                    labels: std::sync::Arc::new(
                        [("app".to_string(), format!("a{}", rng.usize(0..2)))].into(),
                    ),
                    annotations: Default::default(),
                    service_account: "default".into(),
                    node_name: "n1".into(),
                    ip: (rng.usize(0..6) != 0).then(|| address(rng)),
                    netns: None,
                    cgroup: None,
                },
            )),
            3 | 4 if remove => drop(snapshot.services.remove(&key)),
            3 | 4 => drop(snapshot.services.insert(
                key,
                Service {
                    name,
                    namespace: ns,
                    labels: Default::default(),
                    cluster_ip: rng.bool().then(|| Ipv4Addr::new(10, 96, 0, rng.u8(1..4))),
                    ports: Vec::new(),
                    selector: match rng.bool() {
                        true => [("app".to_string(), format!("a{}", rng.usize(0..2)))].into(),
                        false => Default::default(),
                    },
                },
            )),
            _ if remove => drop(snapshot.endpoint_slices.remove(&key)),
            _ => drop(snapshot.endpoint_slices.insert(
                key,
                EndpointSlice {
                    namespace: ns,
                    service: Some(format!("x-{}", rng.usize(0..5))),
                    name,
                    addresses: (0..rng.usize(0..3)).map(|_| address(rng)).collect(),
                    ports: Vec::new(),
                },
            )),
        }
    }

    #[test]
    fn names_updated_change_by_change_are_the_names_built_from_scratch() {
        let settings = crate::state::MeshSettings::new("n1", "cluster.local");
        for seed in 1..=40u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut snapshot = crate::config::Snapshot::default();
            let mut state = State::build(Arc::new(snapshot.clone()), &settings);
            let mut names = MeshNames::from_state(&state, "cluster.local");
            for step in 0..100 {
                // Mostly one change at a time, as a watch delivers them.
                for _ in 0..1 + usize::from(rng.usize(0..5) == 0) * rng.usize(0..6) {
                    random_change(&mut rng, &mut snapshot);
                }
                let next = state.update(Arc::new(snapshot.clone()));
                let before = names.clone();
                names = names.update(&state, &next);
                assert_eq!(
                    names,
                    MeshNames::from_state(&next, "cluster.local"),
                    "seed {seed}, step {step}"
                );
                // The names before are untouched (readers may hold them).
                assert_eq!(before, MeshNames::from_state(&state, "cluster.local"));
                state = next;
            }
        }
    }

    #[test]
    fn a_name_that_only_ends_like_the_domain_is_not_in_it() {
        let names = mesh();
        assert_eq!(
            names.resolve("server.demo.svc.notcluster.local", "demo"),
            Answer::NotMesh
        );
    }
}
