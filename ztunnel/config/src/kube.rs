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

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use futures_util::future::BoxFuture;
use kube::runtime::reflector::Store;
use tokio::sync::{watch, Notify};

use super::{
    local,
    objects::{self, Checked, Key, Kind, KindFn, Object, Stored},
    ConfigMetrics, Snapshot, SourceError,
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
/// for again: often at first, since until it is found it is not in the mesh, then
/// less for one that does not come (its sandbox failing, say).
const RUNTIME_RETRY: Duration = Duration::from_millis(100);
const RUNTIME_RETRY_SLOW: Duration = Duration::from_secs(1);
const RUNTIME_RETRY_FAST_FOR: Duration = Duration::from_secs(10);

/// Starts the watchers; returns once every kind has been listed, with the first
/// snapshot.
pub async fn watch(
    client: kube::Client,
    options: KubeOptions,
    metrics: ConfigMetrics,
) -> Result<watch::Receiver<Arc<Snapshot>>, SourceError> {
    let changed = Arc::new(Notify::new());
    let mut stores = Vec::new();
    for access in k8s::CONFIG {
        let changed = changed.clone();
        let metrics = metrics.clone();
        let start = Start {
            client: client.clone(),
            resource: access.resource,
            on_change: Box::new(move || changed.notify_one()),
            on_error: Box::new(move || {
                metrics.source_errors.inc();
            }),
        };
        let (store, ready) = objects::with_type(access.resource, start)
            .expect("the configuration's kinds each have a type");
        stores.push((access.resource, store, ready));
    }
    let mut ready_stores = Vec::new();
    for (resource, store, mut ready) in stores {
        loop {
            tokio::select! {
                ready = &mut ready => {
                    ready.map_err(|_| SourceError::NotListed(resource.kind))?;
                    break;
                }
                _ = tokio::time::sleep(Duration::from_secs(10)) => tracing::warn!(
                    kind = resource.kind,
                    "still waiting for the first list; nothing is served until every kind is known"
                ),
            }
        }
        ready_stores.push((resource, store));
    }
    let stores = ready_stores;
    let mut builder = Builder {
        stores,
        options,
        translator: Translator::default(),
        translated: Snapshot::default(),
        runtimes: HashMap::new(),
        unlocated_since: HashMap::new(),
        reported: Vec::new(),
        metrics,
    };
    let (first, mut retry) = builder.build(true);
    let first = first.expect("a build from the objects makes a snapshot");
    builder.metrics.updates.inc();
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut resync = tokio::time::interval(builder.options.resync);
        resync.tick().await;
        loop {
            // A retry only looks at the node again; the objects have not changed.
            let objects_changed = tokio::select! {
                _ = changed.notified() => true,
                _ = resync.tick() => true,
                _ = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => false,
            };
            // Building walks every object (and the node's cgroups): not on the
            // proxy's threads.
            let (b, (snapshot, next)) = tokio::task::spawn_blocking(move || {
                let built = builder.build(objects_changed);
                (builder, built)
            })
            .await
            .expect("the snapshot builder does not panic");
            builder = b;
            retry = next;
            let stop = tx.is_closed();
            if let Some(snapshot) = snapshot {
                if tx.send_if_modified(|current| {
                    let changed = **current != snapshot;
                    if changed {
                        *current = Arc::new(snapshot);
                    }
                    changed
                }) {
                    builder.metrics.updates.inc();
                }
            }
            if stop {
                return;
            }
        }
    });
    Ok(rx)
}

/// The reflector of one kind: its store, and when it has listed once.
struct Start {
    client: kube::Client,
    resource: k8s::Resource,
    on_change: Box<dyn Fn() + Send>,
    on_error: Box<dyn Fn() + Send>,
}

type Ready = BoxFuture<'static, Result<(), kube::runtime::reflector::store::WriterDropped>>;

impl KindFn<(Box<dyn Objects>, Ready)> for Start {
    fn call<K: Kind>(self) -> (Box<dyn Objects>, Ready) {
        let store = k8s::reflect::<K>(self.client, self.resource, self.on_change, self.on_error);
        let ready = store.clone();
        (
            Box::new(store),
            Box::pin(async move { ready.wait_until_ready().await }),
        )
    }
}

/// A store of one kind, whatever its type.
trait Objects: Send + Sync {
    fn objects(&self) -> Vec<Arc<dyn Stored>>;
}

impl<K: Kind> Objects for Store<Checked<K>> {
    fn objects(&self) -> Vec<Arc<dyn Stored>> {
        self.state()
            .into_iter()
            .map(|o| o as Arc<dyn Stored>)
            .collect()
    }
}

/// Turns the stores into snapshots.
struct Builder {
    stores: Vec<(k8s::Resource, Box<dyn Objects>)>,
    options: KubeOptions,
    translator: Translator,
    /// The objects' snapshot as last translated, before pods are located.
    translated: Snapshot,
    /// Pods of this node already found, by UID.
    runtimes: HashMap<String, discovery::PodRuntime>,
    /// Pods of this node not found yet, by UID: since when, whether that was
    /// reported, and the pod's `namespace/name`.
    unlocated_since: HashMap<String, (std::time::Instant, bool, String)>,
    /// The refusals last logged, so a resync does not repeat them.
    reported: Vec<String>,
    metrics: ConfigMetrics,
}

impl Builder {
    /// The snapshot (from the stores when `objects_changed`, else from the last
    /// translation; None when only the node was looked at and nothing was found),
    /// and when to look for this node's missing pods again (None: none missing).
    fn build(&mut self, objects_changed: bool) -> (Option<Snapshot>, Option<Duration>) {
        let node = self.options.node.clone();
        let node = node.as_str();
        if objects_changed {
            self.translate();
        } else if let Some(root) = &self.options.pod_cgroup_root {
            let before = self.runtimes.len();
            let lost = discover(&self.translated, node, root, &mut self.runtimes);
            if !lost && self.runtimes.len() == before {
                self.warn_overdue();
                return (None, self.retry());
            }
        }
        let mut snapshot = self.translated.clone();
        let unlocated = locate_pods(
            &mut snapshot,
            node,
            self.options.pod_cgroup_root.as_deref(),
            &mut self.runtimes,
        );
        let now = std::time::Instant::now();
        self.unlocated_since
            .retain(|uid, _| unlocated.iter().any(|(u, _)| u == uid));
        for (uid, pod) in unlocated {
            self.unlocated_since.entry(uid).or_insert((now, false, pod));
        }
        self.metrics
            .pods_unlocated
            .set(self.unlocated_since.len() as i64);
        self.warn_overdue();
        (Some(snapshot), self.retry())
    }

    /// Often while a pod has just been placed here, then less for one that does
    /// not come.
    fn retry(&self) -> Option<Duration> {
        let youngest = self
            .unlocated_since
            .values()
            .map(|(since, ..)| since.elapsed())
            .min()?;
        Some(match youngest < RUNTIME_RETRY_FAST_FOR {
            true => RUNTIME_RETRY,
            false => RUNTIME_RETRY_SLOW,
        })
    }

    /// Says which pods of this node are still not found after a while: until they
    /// are, their traffic is outside the mesh.
    fn warn_overdue(&mut self) {
        for (uid, (since, warned, pod)) in &mut self.unlocated_since {
            if !*warned && since.elapsed() >= RUNTIME_RETRY_FAST_FOR {
                *warned = true;
                tracing::warn!(
                    pod = %pod,
                    uid = %uid,
                    root = ?self.options.pod_cgroup_root,
                    "no cgroup with a process for this pod of this node: not in the mesh until there is"
                );
            }
        }
    }

    fn translate(&mut self) {
        let stored: Vec<(k8s::Resource, Arc<dyn Stored>)> = self
            .stores
            .iter()
            .flat_map(|(resource, store)| store.objects().into_iter().map(|o| (*resource, o)))
            .collect();
        let (snapshot, errors) = self
            .translator
            .translate_stored(stored.iter().map(|(r, o)| (*r, &**o)));
        for error in errors.iter().filter(|e| !self.reported.contains(e)) {
            tracing::warn!("config refused: {error}");
        }
        self.metrics.built(errors.len());
        self.reported = errors;
        self.translated = snapshot;
    }
}

/// A pod of this node not found on it (yet): its UID and `namespace/name`.
type Unlocated = (String, String);

/// Where this node's pods live. The node says, never the API: a pod annotated with
/// the local source's `ztunnel.local/netns` must not point the tunnel at the host's
/// namespace. Returns the pods of this node that could not be found yet.
fn locate_pods(
    snapshot: &mut Snapshot,
    node: &str,
    pod_cgroup_root: Option<&std::path::Path>,
    known: &mut HashMap<String, discovery::PodRuntime>,
) -> Vec<Unlocated> {
    // Translated pods carry neither (only the local source reads them from
    // annotations); this node's are set below. Only what differs is written, so
    // the snapshot keeps sharing the rest with the one before.
    let located: Vec<(String, String)> = snapshot
        .pods
        .iter()
        .filter(|(_, p)| p.netns.is_some() || p.cgroup.is_some())
        .map(|(k, _)| k.clone())
        .collect();
    for key in located {
        if let Some(pod) = snapshot.pods.get_mut(&key) {
            pod.netns = None;
            pod.cgroup = None;
        }
    }
    match pod_cgroup_root {
        Some(root) => attach_runtimes(snapshot, node, root, known),
        None => Vec::new(),
    }
}

/// This node's pods: those with an address (not on the host's network), by UID.
fn local_uids<'a>(snapshot: &'a Snapshot, node: &'a str) -> impl Iterator<Item = &'a String> {
    snapshot
        .pods
        .values()
        .filter(move |p| p.node_name == node && p.ip.is_some())
        .filter_map(|p| p.uid.as_ref())
}

/// Brings `known` up to date with the node: forgets pods gone (or whose sandbox
/// was replaced) and finds those not known yet. Returns whether some were
/// forgotten.
fn discover(
    snapshot: &Snapshot,
    node: &str,
    root: &std::path::Path,
    known: &mut HashMap<String, discovery::PodRuntime>,
) -> bool {
    let uids: HashSet<&String> = local_uids(snapshot, node).collect();
    let before = known.len();
    // A runtime is stale once its process left the pod's cgroup or the cgroup is
    // gone.
    known.retain(|uid, runtime| uids.contains(uid) && runtime.is_current());
    let lost = known.len() != before;
    let missing: Vec<&String> = uids
        .into_iter()
        .filter(|u| !known.contains_key(*u))
        .collect();
    if missing.is_empty() {
        return lost;
    }
    match discovery::pod_cgroups(root) {
        Ok(cgroups) => {
            for uid in missing {
                match cgroups.get(uid).map(|c| discovery::runtime_of(c)) {
                    Some(Ok(Some(runtime))) => {
                        known.insert(uid.clone(), runtime);
                    }
                    Some(Err(e)) => tracing::debug!(uid = %uid, "reading the pod's cgroup: {e}"),
                    _ => {}
                }
            }
        }
        Err(e) => tracing::debug!(root = %root.display(), "listing the node's pod cgroups: {e}"),
    }
    lost
}

/// Fills in where this node's pods live (their network namespace and cgroup), found
/// from their UID. Returns the pods not found.
fn attach_runtimes(
    snapshot: &mut Snapshot,
    node: &str,
    root: &std::path::Path,
    known: &mut HashMap<String, discovery::PodRuntime>,
) -> Vec<Unlocated> {
    discover(snapshot, node, root, known);
    let mut unlocated = Vec::new();
    let mut found = Vec::new();
    for (key, pod) in snapshot
        .pods
        .iter()
        .filter(|(_, p)| p.node_name == node && p.ip.is_some())
    {
        let Some(uid) = &pod.uid else { continue };
        match known.get(uid) {
            Some(runtime) => found.push((key.clone(), runtime)),
            None => unlocated.push((uid.clone(), format!("{}/{}", pod.namespace, pod.name))),
        }
    }
    // Written only where they change: the other pods stay shared.
    for (key, runtime) in found {
        if let Some(pod) = snapshot.pods.get_mut(&key) {
            pod.netns = Some(runtime.netns.clone());
            pod.cgroup = Some(runtime.cgroup.clone());
        }
    }
    unlocated
}

/// Translates API objects, remembering the last good version of every object: a
/// bad update is refused and the version before it stays.
#[derive(Default)]
pub struct Translator {
    last_good: HashMap<Key, Object>,
    /// The snapshot of `last_good`, kept up to date object by object: the next
    /// one shares all that did not change with it (see `CowMap`).
    snapshot: Snapshot,
    /// Keys whose last good version changed (or went) since the last snapshot.
    touched: HashSet<Key>,
    /// What each stored object came to at its resourceVersion: one that has not
    /// changed since the last build is not parsed again.
    seen: HashMap<(&'static str, String, String), Seen>,
}

/// An object as last translated: its resourceVersion and UID, and the outcome.
struct Seen {
    version: String,
    uid: Option<String>,
    outcome: Outcome,
}

/// What became of one object.
#[derive(Clone)]
enum Outcome {
    Parsed(Key),
    /// Refused (its last good version, if any, stays), with the message.
    Refused(Option<Key>, String),
}

impl Translator {
    /// The snapshot of the stores' objects, and one message per object refused
    /// (`Kind namespace/name: field: problem`). Only objects whose
    /// resourceVersion changed since the last call are translated again.
    pub fn translate_stored<'a>(
        &mut self,
        objects: impl IntoIterator<Item = (k8s::Resource, &'a dyn Stored)>,
    ) -> (Snapshot, Vec<String>) {
        let mut in_force = HashSet::new();
        let mut errors = Vec::new();
        let mut seen = HashMap::new();
        for (resource, object) in objects {
            let meta = object.meta();
            let id = (
                resource.kind,
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            );
            let version = meta.resource_version.clone();
            let uid = meta.uid.clone();
            let outcome = match self.seen.remove(&id) {
                Some(seen) if Some(&seen.version) == version.as_ref() => seen.outcome,
                previous => {
                    // Deleted and created again under the same name: what was good
                    // of the old object is not a version of this one.
                    if let Some(old) = previous.filter(|p| p.uid != uid) {
                        if let Outcome::Parsed(key) | Outcome::Refused(Some(key), _) = old.outcome {
                            self.last_good.remove(&key);
                            self.touched.insert(key);
                        }
                    }
                    self.translate_one(resource, object)
                }
            };
            file(&outcome, &mut in_force, &mut errors);
            if let Some(version) = version {
                seen.insert(
                    id,
                    Seen {
                        version,
                        uid,
                        outcome,
                    },
                );
            }
        }
        self.seen = seen;
        self.finish(in_force, errors)
    }

    fn translate_one(&mut self, resource: k8s::Resource, object: &dyn Stored) -> Outcome {
        let meta = object.meta();
        let Some(name) = meta.name.clone() else {
            return Outcome::Refused(None, format!("{}: metadata.name is missing", resource.kind));
        };
        let namespace = match resource == k8s::NAMESPACES {
            true => String::new(),
            false => meta.namespace.clone().unwrap_or_else(|| "default".into()),
        };
        let key: Key = (resource.kind.to_owned(), namespace, name);
        match object.translate(&key, &resource.api_version()) {
            Ok(object) => {
                let refused = objects::refused_policy(&object);
                self.last_good.insert(key.clone(), object);
                self.touched.insert(key.clone());
                match refused {
                    // In force fail closed, and reported.
                    Some(e) => Outcome::Refused(
                        Some(key.clone()),
                        format!("{} {}/{}: {e}", key.0, key.1, key.2),
                    ),
                    None => Outcome::Parsed(key),
                }
            }
            Err(e) => {
                let message = format!("{} {}/{}: {e}", key.0, key.1, key.2);
                Outcome::Refused(Some(key), message)
            }
        }
    }

    /// The snapshot of the objects in force: each one's last good version.
    fn finish(
        &mut self,
        in_force: HashSet<Key>,
        mut errors: Vec<String>,
    ) -> (Snapshot, Vec<String>) {
        errors.sort();
        let snapshot = &mut self.snapshot;
        self.last_good.retain(|key, _| {
            let keep = in_force.contains(key);
            if !keep {
                local::remove_object(snapshot, key);
            }
            keep
        });
        for key in self.touched.drain() {
            match self.last_good.get(&key) {
                Some(object) => local::insert_object(snapshot, &key, object.clone()),
                None => local::remove_object(snapshot, &key),
            }
        }
        (self.snapshot.clone(), errors)
    }
}

/// Records an object's outcome: its key is in force (for a refusal, its last good
/// version stays, if it had one).
fn file(outcome: &Outcome, in_force: &mut HashSet<Key>, errors: &mut Vec<String>) {
    let key = match outcome {
        Outcome::Parsed(key) => Some(key),
        Outcome::Refused(key, message) => {
            errors.push(message.clone());
            key.as_ref()
        }
    };
    if let Some(key) = key {
        in_force.insert(key.clone());
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

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
  {"apiVersion": "v1", "kind": "Service",
   "metadata": {"name": "single", "namespace": "shop"},
   "spec": {"clusterIP": "10.96.12.37", "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "web-http"}]}},
  {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
   "metadata": {"name": "single-q8z4n", "namespace": "shop", "labels": {"kubernetes.io/service-name": "single"}},
   "addressType": "IPv4",
   "endpoints": [{"addresses": ["10.244.0.5"], "conditions": {"ready": true}}],
   "ports": [{"name": "", "port": 8080, "protocol": "TCP"}]},
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

    /// The watched kind of a recorded object; None for kinds no store holds.
    fn resource_of(value: &Value) -> Option<k8s::Resource> {
        k8s::CONFIG
            .iter()
            .map(|a| a.resource)
            .find(|r| r.kind == value["kind"] && r.api_version() == value["apiVersion"])
    }

    /// The objects of the watched kinds as the reflectors store them.
    fn stored(values: &[Value]) -> Vec<(k8s::Resource, Arc<dyn Stored>)> {
        values
            .iter()
            .filter_map(|v| {
                let resource = resource_of(v)?;
                let typed = objects::typed(resource).unwrap();
                Some((resource, typed.decode(v.clone()).unwrap()))
            })
            .collect()
    }

    fn translate_with(
        translator: &mut Translator,
        objects: &[(k8s::Resource, Arc<dyn Stored>)],
    ) -> (Snapshot, Vec<String>) {
        translator.translate_stored(objects.iter().map(|(r, o)| (*r, &**o)))
    }

    fn translate(values: impl IntoIterator<Item = Value>) -> (Snapshot, Vec<String>) {
        let values: Vec<Value> = values.into_iter().collect();
        translate_with(&mut Translator::default(), &stored(&values))
    }

    #[test]
    fn api_objects_become_the_same_snapshot_the_local_source_builds() {
        let (snapshot, errors) = translate(recorded());
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
            2,
            "the broken PeerAuthentication is refused, and in force fail closed"
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
        // The one port of a Service has no name, and its slice says "" for it.
        let single = state
            .service_by_vip("10.96.12.37".parse().unwrap())
            .unwrap();
        assert_eq!(
            (single.ports[0].port, single.ports[0].target_port),
            (80, 8080)
        );
        // A service without a selector has the endpoints its slices list (ready ones).
        let by_hand = state
            .service_by_vip("10.96.12.36".parse().unwrap())
            .unwrap();
        let endpoints: Vec<&str> = by_hand.endpoints.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(endpoints, vec!["web-7d9f-abc"]);
    }

    /// The API server hands `portLevelMtls` keys over as JSON strings.
    #[test]
    fn port_level_mtls_keys_from_the_api_server_are_ports() {
        let pa: Value = serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"},
                     "portLevelMtls": {"8080": {"mode": "DISABLE"}}}});
        let (snapshot, errors) = translate([pa]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(snapshot.policies.len(), 1);
    }

    /// Translates an object as sent and as pruned, expecting the same.
    struct SamePruned(Value);

    impl KindFn<()> for SamePruned {
        fn call<K: Kind>(self) {
            let full: K = serde_json::from_value(self.0).unwrap();
            let mut pruned = full.clone();
            objects::Prune::prune(&mut pruned);
            let key = ("Kind".into(), "shop".into(), "name".into());
            assert_eq!(
                full.translate(&key, "v1"),
                pruned.translate(&key, "v1"),
                "{pruned:?}"
            );
        }
    }

    #[test]
    fn pruned_objects_translate_to_the_same_snapshot() {
        for value in recorded() {
            if let Some(resource) = resource_of(&value) {
                objects::with_type(resource, SamePruned(value)).unwrap();
            }
        }
        let pod = recorded().into_iter().find(|v| v["kind"] == "Pod").unwrap();
        let mut kept: Checked<k8s_openapi::api::core::v1::Pod> =
            serde_json::from_value(pod).unwrap();
        objects::Prune::prune(&mut kept);
        let Checked::Valid(kept) = kept else {
            panic!("a valid pod")
        };
        let kept = serde_json::to_value(kept).unwrap();
        // Required in the type: kept, empty.
        assert_eq!(kept["spec"]["containers"], serde_json::json!([]), "{kept}");
        assert!(kept["status"].get("podIPs").is_none(), "{kept}");
        assert!(kept["metadata"].get("managedFields").is_none(), "{kept}");
        assert!(kept["metadata"].get("ownerReferences").is_none(), "{kept}");
    }

    /// Removes the directory even when the test fails.
    struct TempDir(std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn where_a_pod_lives_comes_from_the_node_not_from_its_annotations() {
        let mut objects = recorded();
        let pod = objects.iter_mut().find(|v| v["kind"] == "Pod").unwrap();
        pod["metadata"]["annotations"] = serde_json::json!({
            crate::config::NETNS_ANNOTATION: "/proc/1/ns/net",
            crate::config::CGROUP_ANNOTATION: "/sys/fs/cgroup",
        });
        let (mut snapshot, _) = translate(objects);
        let key = ("shop".to_string(), "web-7d9f-abc".to_string());
        assert_eq!(
            snapshot.pods[&key].netns, None,
            "the local source's annotation is not even stored"
        );

        // Not on the node yet: nowhere, and looked for again.
        let root =
            TempDir(std::env::temp_dir().join(format!("ztunnel-kube-test-{}", std::process::id())));
        let pod_cgroup = root
            .0
            .join("kubepods/besteffort/pod5f0c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b");
        std::fs::create_dir_all(pod_cgroup.join("sandbox")).unwrap();
        let mut known = HashMap::new();
        let unlocated = locate_pods(&mut snapshot, "node-a", Some(&root.0), &mut known);
        let expected = (
            "5f0c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b".to_string(),
            "shop/web-7d9f-abc".to_string(),
        );
        assert_eq!(unlocated, vec![expected]);
        assert_eq!(snapshot.pods[&key].netns, None);
        assert_eq!(snapshot.pods[&key].cgroup, None);

        // Its sandbox runs: found by UID, in that process's namespace.
        std::fs::write(pod_cgroup.join("sandbox/cgroup.procs"), "4242\n").unwrap();
        let unlocated = locate_pods(&mut snapshot, "node-a", Some(&root.0), &mut known);
        assert!(unlocated.is_empty(), "{unlocated:?}");
        assert_eq!(
            snapshot.pods[&key].netns.as_deref(),
            Some(std::path::Path::new("/proc/4242/ns/net"))
        );
        assert_eq!(
            snapshot.pods[&key].cgroup.as_deref(),
            Some(pod_cgroup.as_path())
        );
    }

    #[test]
    fn stored_objects_are_parsed_again_only_when_their_version_changes() {
        let stored = |values: &[Value]| {
            let values: Vec<Value> = values
                .iter()
                .map(|v| {
                    let mut v = v.clone();
                    if v["metadata"]["resourceVersion"].is_null() {
                        v["metadata"]["resourceVersion"] = "1".into();
                    }
                    v
                })
                .collect();
            stored(&values)
        };
        let translate = translate_with;
        let mut values = recorded();
        let mut translator = Translator::default();
        let first = translate(&mut translator, &stored(&values));
        assert_eq!(first, super::tests::translate(recorded()));

        // The policy breaks: refused, and its new version in force (fail closed),
        // also on the rebuilds that do not parse it again.
        let policy = values
            .iter_mut()
            .find(|v| v["kind"] == "AuthorizationPolicy")
            .unwrap();
        policy["spec"]["action"] = "PERHAPS".into();
        policy["metadata"]["resourceVersion"] = "2".into();
        let objects = stored(&values);
        for _ in 0..2 {
            let (snapshot, errors) = translate(&mut translator, &objects);
            let key = (
                "AuthorizationPolicy".into(),
                "shop".into(),
                "allow-front".into(),
            );
            assert_eq!(snapshot.policies[&key].spec["action"], "PERHAPS");
            assert_eq!(errors.len(), 2, "{errors:?}");
            assert!(
                errors[0].starts_with("AuthorizationPolicy shop/allow-front"),
                "{errors:?}"
            );
        }

        // Deleted and created again, broken, between two builds: the new object
        // is in force (fail closed), reported.
        let policy = values
            .iter_mut()
            .find(|v| v["kind"] == "AuthorizationPolicy")
            .unwrap();
        policy["metadata"]["uid"] = "recreated".into();
        policy["metadata"]["resourceVersion"] = "4".into();
        let (snapshot, errors) = translate(&mut translator, &stored(&values));
        assert_eq!(snapshot.policies.len(), 2, "{:?}", snapshot.policies);
        assert_eq!(errors.len(), 2, "{errors:?}");

        // A changed pod is seen; a deleted policy is gone.
        let pod = values.iter_mut().find(|v| v["kind"] == "Pod").unwrap();
        pod["metadata"]["labels"]["app"] = "shop".into();
        pod["metadata"]["resourceVersion"] = "3".into();
        values.retain(|v| v["kind"] != "AuthorizationPolicy");
        let (snapshot, errors) = translate(&mut translator, &stored(&values));
        let pod = &snapshot.pods[&("shop".into(), "web-7d9f-abc".into())];
        assert_eq!(pod.labels["app"], "shop");
        assert_eq!(snapshot.policies.len(), 1, "only the PeerAuthentication");
        assert_eq!(
            errors.len(),
            1,
            "only the broken PeerAuthentication: {errors:?}"
        );
    }
}
