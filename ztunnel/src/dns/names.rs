//! The names the mesh answers itself, as kube-dns names them: Services
//! (`<svc>.<ns>.svc.<domain>`, a headless one's pods also as
//! `<pod>.<svc>.<ns>.svc.<domain>`) and pods (`<a-b-c-d>.<ns>.pod.<domain>`); and the
//! short forms a query can carry without the search list (`<svc>`, `<svc>.<ns>`,
//! `<svc>.<ns>.svc`), taken relative to the asking pod's namespace. Pure: built
//! from the state, no I/O.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use crate::state::State;

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

/// The mesh's names, indexed once per state.
#[derive(Debug, Default)]
pub struct MeshNames {
    /// The cluster domain's labels, lowercase (e.g. `cluster.local`).
    domain: String,
    /// (namespace, service) → its cluster IP, or a headless Service's endpoints.
    services: HashMap<(String, String), Vec<Ipv4Addr>>,
    /// (namespace, headless service, pod name) → the pod's address.
    service_pods: HashMap<(String, String, String), Ipv4Addr>,
    /// (namespace, pod address) of every pod the mesh knows.
    pods: HashSet<(String, Ipv4Addr)>,
    namespaces: HashSet<String>,
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
            names.namespaces.insert(ns.to_ascii_lowercase());
        }
        for svc in state.services() {
            names.add_service(&svc.namespace, &svc.name, vec![svc.vip]);
        }
        for ((ns, name), endpoints) in state.headless_services() {
            names.add_service(ns, name, endpoints.iter().map(|w| w.ip).collect());
            for pod in endpoints {
                names.service_pods.insert(
                    (
                        ns.to_ascii_lowercase(),
                        name.to_ascii_lowercase(),
                        pod.name.to_ascii_lowercase(),
                    ),
                    pod.ip,
                );
            }
        }
        for pod in state.workloads() {
            names.add_pod(&pod.namespace, pod.ip);
        }
        names
    }

    pub fn add_service(&mut self, namespace: &str, name: &str, addresses: Vec<Ipv4Addr>) {
        self.namespaces.insert(namespace.to_ascii_lowercase());
        self.services.insert(
            (namespace.to_ascii_lowercase(), name.to_ascii_lowercase()),
            addresses,
        );
    }

    pub fn add_pod(&mut self, namespace: &str, ip: Ipv4Addr) {
        self.namespaces.insert(namespace.to_ascii_lowercase());
        self.pods.insert((namespace.to_ascii_lowercase(), ip));
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
            [ns, "svc"] | [ns, "pod"] if self.namespaces.contains(*ns) => return exists_empty,
            [svc, ns, "svc"] => self.service(ns, svc).cloned(),
            [pod, svc, ns, "svc"] => self
                .service_pods
                .get(&(ns.to_string(), svc.to_string(), pod.to_string()))
                .map(|ip| vec![*ip]),
            [dashed, ns, "pod"] => dashed_ip(dashed)
                .filter(|ip| self.pods.contains(&(ns.to_string(), *ip)))
                .map(|ip| vec![ip]),
            _ => None,
        };
        found.map_or(Answer::NxDomain, Answer::Addresses)
    }

    fn service(&self, namespace: &str, name: &str) -> Option<&Vec<Ipv4Addr>> {
        self.services.get(&(namespace.to_owned(), name.to_owned()))
    }
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

    #[test]
    fn a_name_that_only_ends_like_the_domain_is_not_in_it() {
        let names = mesh();
        assert_eq!(
            names.resolve("server.demo.svc.notcluster.local", "demo"),
            Answer::NotMesh
        );
    }
}
