//! The Kubernetes source: a reflector (list, then watch, relisting with backoff
//! after errors) per kind the mesh reads — the [`k8s::CONFIG`] list — whose stores
//! are translated into the same [`Snapshot`] the local source builds, through the
//! same typed parsing and validation.
//!
//! The first snapshot waits until every kind has been listed once: a tunnel that
//! served before it knew the AuthorizationPolicies would fail open. After that, an
//! API server outage changes nothing: the stores keep the last state while the
//! watchers retry. The snapshot is rebuilt on every change and at least every
//! `resync`, which is also how pods whose runtime was not on the node yet are found.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Result;
use futures_util::StreamExt;
use kube::{
    api::{Api, DynamicObject},
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt,
    },
};
use serde_json::Value;
use tokio::sync::{watch, Notify};

use super::{
    local::{self, Key, Object},
    ConfigMetrics, Snapshot,
};
use crate::{discovery, k8s};

/// What the Kubernetes source needs besides a client.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// This node (`spec.nodeName` of the pods it serves).
    pub node: String,
    /// The node's pod cgroup root (kubepods), where the pods' cgroups are found by
    /// UID; None for a waypoint, which enrolls nothing.
    pub pod_cgroup_root: Option<PathBuf>,
    /// The longest time between rebuilds of the snapshot.
    pub resync: Duration,
}

/// How often a pod on this node whose cgroup or process is not there yet is looked
/// for again.
const RUNTIME_RETRY: Duration = Duration::from_secs(1);

/// Starts the watchers; returns once every kind has been listed, with the first
/// snapshot.
pub async fn watch(
    client: kube::Client,
    options: KubeOptions,
    metrics: ConfigMetrics,
) -> Result<watch::Receiver<Arc<Snapshot>>> {
    let changed = Arc::new(Notify::new());
    let mut stores = Vec::new();
    for access in k8s::CONFIG {
        let resource = access.resource;
        let api_resource = resource.api_resource();
        let api = Api::<DynamicObject>::all_with(client.clone(), &api_resource);
        let writer = reflector::store::Writer::new(api_resource);
        stores.push((resource, writer.as_reader()));
        let changed = changed.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let events = watcher(api, watcher::Config::default())
                .default_backoff()
                // What the API server keeps for itself is a large share of every object.
                .modify(|object| object.metadata.managed_fields = None)
                .reflect(writer);
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(
                        watcher::Event::Apply(_)
                        | watcher::Event::Delete(_)
                        | watcher::Event::InitDone,
                    ) => changed.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(
                            kind = resource.kind,
                            "watching the API server: {e}; retrying, the last state stays"
                        );
                        metrics.source_errors.inc();
                    }
                }
            }
        });
    }
    for (resource, store) in &stores {
        loop {
            tokio::select! {
                ready = store.wait_until_ready() => {
                    ready?;
                    break;
                }
                _ = tokio::time::sleep(Duration::from_secs(10)) => tracing::warn!(
                    kind = resource.kind,
                    "still waiting for the first list; nothing is served until every kind is known"
                ),
            }
        }
    }
    let mut builder = Builder {
        stores,
        options,
        translator: Translator::default(),
        runtimes: HashMap::new(),
        reported: Vec::new(),
        metrics,
    };
    let (first, mut incomplete) = builder.build();
    builder.metrics.updates.inc();
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut resync = tokio::time::interval(builder.options.resync);
        resync.tick().await;
        loop {
            tokio::select! {
                _ = changed.notified() => {}
                _ = resync.tick() => {}
                _ = tokio::time::sleep(RUNTIME_RETRY), if incomplete => {}
            }
            // Building walks every object (and the node's cgroups): not on the
            // proxy's threads.
            let (b, (snapshot, missing)) = tokio::task::spawn_blocking(move || {
                let built = builder.build();
                (builder, built)
            })
            .await
            .expect("the snapshot builder does not panic");
            builder = b;
            incomplete = missing;
            let stop = tx.is_closed();
            if tx.send_if_modified(|current| {
                let changed = **current != snapshot;
                if changed {
                    *current = Arc::new(snapshot);
                }
                changed
            }) {
                builder.metrics.updates.inc();
            }
            if stop {
                return;
            }
        }
    });
    Ok(rx)
}

/// Turns the stores into snapshots.
struct Builder {
    stores: Vec<(k8s::Resource, Store<DynamicObject>)>,
    options: KubeOptions,
    translator: Translator,
    /// Pods of this node already found, by UID.
    runtimes: HashMap<String, discovery::PodRuntime>,
    /// The refusals last logged, so a resync does not repeat them.
    reported: Vec<String>,
    metrics: ConfigMetrics,
}

impl Builder {
    /// The snapshot, and whether a pod of this node still lacks its runtime.
    fn build(&mut self) -> (Snapshot, bool) {
        let objects = self.stores.iter().flat_map(|(resource, store)| {
            store.state().into_iter().filter_map(move |object| {
                // List items come without apiVersion and kind: the store says which.
                let mut value = serde_json::to_value(&*object).ok()?;
                value["apiVersion"] = resource.api_version().into();
                value["kind"] = resource.kind.into();
                Some(value)
            })
        });
        let (mut snapshot, errors) = self.translator.translate(objects);
        for error in errors.iter().filter(|e| !self.reported.contains(e)) {
            tracing::warn!("config refused: {error}");
        }
        self.metrics.built(errors.len());
        self.reported = errors;
        let incomplete = match &self.options.pod_cgroup_root {
            Some(root) => {
                attach_runtimes(&mut snapshot, &self.options.node, root, &mut self.runtimes)
            }
            None => false,
        };
        (snapshot, incomplete)
    }
}

/// Fills in where this node's pods live (their network namespace and cgroup), found
/// from their UID. Returns whether some pod could not be found yet.
fn attach_runtimes(
    snapshot: &mut Snapshot,
    node: &str,
    root: &std::path::Path,
    known: &mut HashMap<String, discovery::PodRuntime>,
) -> bool {
    let local = |pod: &super::Pod| pod.node_name == node && pod.ip.is_some();
    let uids: Vec<String> = snapshot
        .pods
        .values()
        .filter(|p| local(p))
        .filter_map(|p| p.uid.clone())
        .collect();
    // A runtime is stale once its process is gone (the sandbox was recreated).
    known.retain(|uid, runtime| uids.contains(uid) && runtime.netns.exists());
    let mut incomplete = false;
    let missing: Vec<&String> = uids.iter().filter(|u| !known.contains_key(*u)).collect();
    if !missing.is_empty() {
        match discovery::pod_cgroups(root) {
            Ok(cgroups) => {
                for uid in missing {
                    match cgroups.get(uid).map(|c| discovery::runtime_of(c)) {
                        Some(Ok(Some(runtime))) => {
                            known.insert(uid.clone(), runtime);
                        }
                        Some(Err(e)) => {
                            tracing::warn!(uid = %uid, "reading the pod's cgroup: {e}");
                            incomplete = true;
                        }
                        _ => incomplete = true,
                    }
                }
            }
            Err(e) => {
                tracing::warn!(root = %root.display(), "listing the node's pod cgroups: {e}");
                incomplete = true;
            }
        }
    }
    for pod in snapshot.pods.values_mut().filter(|p| local(p)) {
        if let Some(runtime) = pod.uid.as_ref().and_then(|uid| known.get(uid)) {
            pod.netns = Some(runtime.netns.clone());
            pod.cgroup = Some(runtime.cgroup.clone());
        }
    }
    incomplete
}

/// Translates API objects, remembering the last good version of every object: a
/// bad update is refused and the version before it stays.
#[derive(Default)]
pub struct Translator {
    last_good: HashMap<Key, Object>,
}

impl Translator {
    /// The snapshot of these objects, and one message per object refused
    /// (`Kind namespace/name: field: problem`). Kinds the mesh does not read are
    /// skipped.
    pub fn translate(
        &mut self,
        objects: impl IntoIterator<Item = Value>,
    ) -> (Snapshot, Vec<String>) {
        let mut parsed = HashMap::new();
        let mut errors = Vec::new();
        for object in objects {
            let value: serde_yaml::Value = match serde_yaml::to_value(&object) {
                Ok(v) => v,
                Err(e) => {
                    errors.push(format!("not an object: {e}"));
                    continue;
                }
            };
            let key = match local::identify(&value) {
                Ok(Some(key)) => key,
                Ok(None) => continue,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            match local::parse(&key, value) {
                Ok(object) => {
                    parsed.insert(key, object);
                }
                Err(e) => {
                    errors.push(format!("{} {}/{}: {e:#}", key.0, key.1, key.2));
                    if let Some(previous) = self.last_good.get(&key) {
                        parsed.insert(key, previous.clone());
                    }
                }
            }
        }
        errors.sort();
        self.last_good = parsed;
        (local::build_snapshot(self.last_good.iter()), errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Objects as an API server returns them: managed fields, owner references,
    /// status beyond what the mesh reads.
    fn recorded() -> Vec<Value> {
        serde_json::from_str(
            r#"[
  {"apiVersion": "v1", "kind": "Namespace",
   "metadata": {"name": "shop", "uid": "a1", "resourceVersion": "100",
                "labels": {"istio.io/dataplane-mode": "ambient", "kubernetes.io/metadata.name": "shop"}},
   "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}},
  {"apiVersion": "v1", "kind": "Pod",
   "metadata": {"name": "web-7d9f-abc", "namespace": "shop", "uid": "5f0c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
                "labels": {"app": "web", "pod-template-hash": "7d9f"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f", "uid": "x", "controller": true}],
                "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1"}]},
   "spec": {"serviceAccountName": "web", "nodeName": "node-a",
            "containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 8080}]}]},
   "status": {"phase": "Running", "podIP": "10.244.0.5", "podIPs": [{"ip": "10.244.0.5"}], "hostIP": "172.18.0.2"}},
  {"apiVersion": "v1", "kind": "Service",
   "metadata": {"name": "web", "namespace": "shop", "uid": "s1"},
   "spec": {"clusterIP": "10.96.12.34", "clusterIPs": ["10.96.12.34"], "type": "ClusterIP",
            "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
   "status": {"loadBalancer": {}}},
  {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop"}},
  {"apiVersion": "v1", "kind": "Service",
   "metadata": {"name": "web-named", "namespace": "shop"},
   "spec": {"clusterIP": "10.96.12.35", "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": "web-http"}, {"name": "admin", "port": 9000, "targetPort": "admin"}]}},
  {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
   "metadata": {"name": "web-named-x7k2p", "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "web-named", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
   "addressType": "IPv4",
   "endpoints": [{"addresses": ["10.244.0.5"], "conditions": {"ready": true}, "nodeName": "node-a",
                  "targetRef": {"kind": "Pod", "name": "web-7d9f-abc", "namespace": "shop"}}],
   "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]},
  {"apiVersion": "v1", "kind": "Service",
   "metadata": {"name": "by-hand", "namespace": "shop"},
   "spec": {"clusterIP": "10.96.12.36", "ports": [{"port": 5432}]}},
  {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
   "metadata": {"name": "by-hand-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "by-hand"}},
   "addressType": "IPv4",
   "endpoints": [{"addresses": ["10.244.0.5"]}, {"addresses": ["10.244.9.9"], "conditions": {"ready": false}}],
   "ports": [{"port": 5432}]},
  {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
   "metadata": {"name": "allow-front", "namespace": "shop", "generation": 2},
   "spec": {"selector": {"matchLabels": {"app": "web"}},
            "rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]}},
  {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
   "metadata": {"name": "broken", "namespace": "shop"}, "spec": {"mtls": {"mode": "STRICTEST"}}}
]"#,
        )
        .unwrap()
    }

    #[test]
    fn api_objects_become_the_same_snapshot_the_local_source_builds() {
        let (snapshot, errors) = Translator::default().translate(recorded());
        assert_eq!(
            snapshot.namespaces["shop"].labels["istio.io/dataplane-mode"],
            "ambient"
        );
        let pod = &snapshot.pods[&("shop".into(), "web-7d9f-abc".into())];
        assert_eq!(
            pod.uid.as_deref(),
            Some("5f0c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b")
        );
        assert_eq!(pod.ip, Some("10.244.0.5".parse().unwrap()));
        assert_eq!(
            (pod.service_account.as_str(), pod.node_name.as_str()),
            ("web", "node-a")
        );
        let svc = &snapshot.services[&("shop".into(), "web".into())];
        assert_eq!(
            (svc.cluster_ip, svc.ports[0].target_port),
            (Some("10.96.12.34".parse().unwrap()), 8080)
        );
        assert_eq!(
            snapshot.policies.len(),
            1,
            "the broken PeerAuthentication is refused"
        );
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("PeerAuthentication shop/broken: spec.mtls.mode"),
            "{errors:?}"
        );
        // ... and the state built from it is the mesh's.
        let state = crate::state::State::build(
            std::sync::Arc::new(snapshot),
            &crate::state::MeshSettings::new("node-a", "cluster.local"),
        );
        let local: Vec<&str> = state.local_workloads().map(|w| w.name.as_str()).collect();
        assert_eq!(local, vec!["web-7d9f-abc"]);
        // A named target port takes its number from the EndpointSlice; a port its
        // slices do not resolve yet is left out.
        let named = state
            .service_by_vip("10.96.12.35".parse().unwrap())
            .unwrap();
        let ports: Vec<(u16, u16)> = named
            .ports
            .iter()
            .map(|p| (p.port, p.target_port))
            .collect();
        assert_eq!(ports, vec![(80, 8080)]);
        // A service without a selector has the endpoints its slices list (ready ones).
        let by_hand = state
            .service_by_vip("10.96.12.36".parse().unwrap())
            .unwrap();
        let endpoints: Vec<&str> = by_hand.endpoints.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(endpoints, vec!["web-7d9f-abc"]);
    }
}
