//! The Kubernetes source: a reflector (list, then watch, relisting with backoff
//! after errors) per kind the mesh reads — the [`k8s::CONFIG`] list — whose
//! changes are translated into the same [`Snapshot`] the local source builds,
//! through the same typed parsing and validation.
//!
//! The first snapshot waits until every kind has been listed once: a tunnel that
//! served before it knew the AuthorizationPolicies would fail open. After that, an
//! API server outage changes nothing: the stores keep the last state while the
//! watchers retry. Each change a watch reports is applied by itself: one pod
//! changed costs that pod, not the cluster. A relist (the watch lost its place) is
//! compared with what was known, so objects deleted while nobody watched go. At
//! least every `resync` the snapshot is checked against the stores in full (what
//! the changes kept is not trusted forever); and this node's pods whose runtime
//! was not there yet are looked for again until found.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::future::BoxFuture;
use kube::runtime::reflector::Store;
use tokio::sync::{mpsc, watch};
use ztunnel_core::intern::Interner;

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
    /// The longest time between checks of the snapshot against every stored object.
    pub resync: Duration,
}

/// How often a pod on this node whose cgroup or process is not there yet is looked
/// for again: often at first, since until it is found it is not in the mesh, then
/// less for one that does not come (its sandbox failing, say).
const RUNTIME_RETRY: Duration = Duration::from_millis(100);
const RUNTIME_RETRY_SLOW: Duration = Duration::from_secs(1);
const RUNTIME_RETRY_FAST_FOR: Duration = Duration::from_secs(10);

/// A change one of the watches reported, for an object of that kind.
pub type Event = (k8s::Resource, k8s::Change<Arc<dyn Stored>>);

/// Starts the watchers; returns once every kind has been listed, with the first
/// snapshot.
pub async fn watch(
    client: kube::Client,
    options: KubeOptions,
    metrics: ConfigMetrics,
) -> Result<watch::Receiver<Arc<Snapshot>>, SourceError> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut stores = Vec::new();
    for access in k8s::CONFIG {
        let metrics = metrics.clone();
        let start = Start {
            client: client.clone(),
            resource: access.resource,
            events: events_tx.clone(),
            on_error: Box::new(move || {
                metrics.source_errors.inc();
            }),
        };
        let (store, ready) = objects::with_type(access.resource, start)
            .expect("the configuration's kinds each have a type");
        stores.push((access.resource, store, ready));
    }
    drop(events_tx);
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
    // The stores already hold every change reported so far: the first build
    // reads them all.
    while events.try_recv().is_ok() {}
    let mut builder = Builder::new(ready_stores, options, metrics);
    let (first, mut retry) = builder.build(Scope::Everything);
    let first = first.expect("a build from the objects makes a snapshot");
    builder.metrics.updates.inc();
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut resync = tokio::time::interval(builder.options.resync);
        resync.tick().await;
        let mut batch = Vec::new();
        loop {
            let scope = tokio::select! {
                received = events.recv_many(&mut batch, usize::MAX) => match received {
                    // Every watch gone (they never end): nothing more will come.
                    0 => return,
                    _ => Scope::Changes(std::mem::take(&mut batch)),
                },
                _ = resync.tick() => Scope::Everything,
                // A retry only looks at the node again; the objects have not changed.
                _ = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => Scope::Node,
            };
            // A build may read the stores and the node's cgroups: not on the
            // proxy's threads.
            let (b, (snapshot, next)) = tokio::task::spawn_blocking(move || {
                let built = builder.build(scope);
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

/// The reflector of one kind: its store, and when it has listed once; its changes
/// go to `events`.
struct Start {
    client: kube::Client,
    resource: k8s::Resource,
    events: mpsc::UnboundedSender<Event>,
    on_error: Box<dyn Fn() + Send>,
}

type Ready = BoxFuture<'static, Result<(), kube::runtime::reflector::store::WriterDropped>>;

impl KindFn<(Box<dyn Objects>, Ready)> for Start {
    fn call<K: Kind>(self) -> (Box<dyn Objects>, Ready) {
        let (resource, events) = (self.resource, self.events);
        let on_change = move |change: k8s::Change<Checked<K>>| {
            // Fails only once the source is gone, and nobody reads the changes.
            let _ = events.send((resource, change.map(|o| Arc::new(o) as Arc<dyn Stored>)));
        };
        let store = k8s::reflect::<K>(self.client, resource, on_change, self.on_error);
        let ready = store.clone();
        (
            Box::new(store),
            Box::pin(async move { ready.wait_until_ready().await }),
        )
    }
}

/// A store of one kind, whatever its type.
pub trait Objects: Send + Sync {
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

/// A store kept by hand (tests, benchmarks).
impl Objects for Mutex<Vec<Arc<dyn Stored>>> {
    fn objects(&self) -> Vec<Arc<dyn Stored>> {
        self.lock().expect("a store's lock is not poisoned").clone()
    }
}

impl<T: Objects + ?Sized> Objects for Arc<T> {
    fn objects(&self) -> Vec<Arc<dyn Stored>> {
        (**self).objects()
    }
}

/// What a build looks at.
pub enum Scope {
    /// The changes the watches reported: only the objects they name (and, for a
    /// list, the objects of that kind).
    Changes(Vec<Event>),
    /// Every object of every store, and every pod of this node: the first build
    /// and the resync.
    Everything,
    /// Only the node, for its pods not found yet: the objects have not changed.
    Node,
}

/// Turns the stores' changes into snapshots.
pub struct Builder {
    stores: Vec<(k8s::Resource, Box<dyn Objects>)>,
    options: KubeOptions,
    /// Holds the snapshot, which this builder completes with where this node's
    /// pods live.
    translator: Translator,
    /// This node's pods with an address (those it may serve), by (namespace,
    /// name): their UID.
    local: HashMap<(String, String), String>,
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
    pub fn new(
        stores: Vec<(k8s::Resource, Box<dyn Objects>)>,
        options: KubeOptions,
        metrics: ConfigMetrics,
    ) -> Self {
        Self {
            stores,
            options,
            translator: Translator::default(),
            local: HashMap::new(),
            runtimes: HashMap::new(),
            unlocated_since: HashMap::new(),
            reported: Vec::new(),
            metrics,
        }
    }

    /// The snapshot after `scope` (None when only the node was looked at and
    /// nothing changed), and when to look for this node's missing pods again
    /// (None: none missing).
    pub fn build(&mut self, scope: Scope) -> (Option<Snapshot>, Option<Duration>) {
        let node_only = matches!(scope, Scope::Node);
        let pods = match scope {
            Scope::Changes(events) => {
                for event in events {
                    self.change(event);
                }
                self.translated()
            }
            Scope::Everything => {
                self.translate_all();
                let mut pods = self.translated();
                // This node's pods from the snapshot itself, and those the index
                // holds: what the changes kept is checked, not trusted.
                let node = &self.options.node;
                pods.extend(self.local.keys().cloned());
                pods.extend(
                    self.translator
                        .snapshot
                        .pods
                        .iter()
                        .filter(|(_, p)| p.node_name == *node && p.ip.is_some())
                        .map(|(k, _)| k.clone()),
                );
                pods.sort();
                pods.dedup();
                pods
            }
            Scope::Node => self.local.keys().cloned().collect(),
        };
        let relocated = self.locate(pods);
        self.metrics
            .pods_unlocated
            .set(self.unlocated_since.len() as i64);
        self.warn_overdue();
        match node_only && !relocated {
            true => (None, self.retry()),
            false => (Some(self.translator.snapshot.clone()), self.retry()),
        }
    }

    fn change(&mut self, (resource, change): Event) {
        match change {
            k8s::Change::Applied(object) => self.translator.apply(resource, &*object),
            k8s::Change::Deleted(object) => self.translator.delete(resource, &*object),
            k8s::Change::Listed => match self.stores.iter().find(|(r, _)| *r == resource) {
                Some((_, store)) => {
                    let objects = store.objects();
                    self.translator
                        .relist(Some(resource), objects.iter().map(|o| (resource, &**o)));
                }
                // Not a kind of these stores: everything from them.
                None => self.translate_all(),
            },
        }
    }

    /// Every object of every store; those known and not in them are gone.
    fn translate_all(&mut self) {
        let stored: Vec<(k8s::Resource, Arc<dyn Stored>)> = self
            .stores
            .iter()
            .flat_map(|(resource, store)| store.objects().into_iter().map(|o| (*resource, o)))
            .collect();
        self.translator
            .relist(None, stored.iter().map(|(r, o)| (*r, &**o)));
    }

    /// Writes what was translated into the snapshot and reports new refusals.
    /// Returns the pods written, by (namespace, name).
    fn translated(&mut self) -> Vec<(String, String)> {
        let written = self.translator.flush();
        let errors = self.translator.errors();
        for error in errors.iter().filter(|e| !self.reported.contains(e)) {
            tracing::warn!("config refused: {error}");
        }
        self.metrics.built(errors.len());
        self.reported = errors;
        written
            .into_iter()
            .filter(|(kind, ..)| kind == "Pod")
            .map(|(_, ns, name)| (ns, name))
            .collect()
    }

    /// Brings `pods` up to date with the node: whether each is this node's, and
    /// where it lives (its network namespace and cgroup, found by UID in the
    /// node's cgroups: the node says, never the API — a pod annotated with the
    /// local source's `ztunnel.local/netns` must not point the tunnel at the
    /// host's namespace). Written into the snapshot only where it differs, so the
    /// rest stays shared. Returns whether some pod's location changed.
    fn locate(&mut self, pods: Vec<(String, String)>) -> bool {
        let Some(root) = self.options.pod_cgroup_root.clone() else {
            // A waypoint enrolls nothing: its pods are located nowhere.
            return false;
        };
        let snapshot = &mut self.translator.snapshot;
        let mut mine = Vec::new();
        for key in pods {
            let uid = snapshot
                .pods
                .get(&key)
                .filter(|p| p.node_name == self.options.node && p.ip.is_some())
                .and_then(|p| p.uid.clone());
            let was = match &uid {
                Some(uid) => self.local.insert(key.clone(), uid.clone()),
                None => self.local.remove(&key),
            };
            // Gone from the node, or replaced by a pod of the same name.
            if let Some(was) = was.filter(|was| Some(was) != uid.as_ref()) {
                self.runtimes.remove(&was);
                self.unlocated_since.remove(&was);
            }
            mine.push((key, uid));
        }
        // A runtime is stale once its process left the pod's cgroup or the cgroup
        // is gone; the missing are looked for in one listing of the node's cgroups.
        let mut missing = Vec::new();
        for uid in mine.iter().filter_map(|(_, uid)| uid.as_ref()) {
            if self.runtimes.get(uid).is_some_and(|r| !r.is_current()) {
                self.runtimes.remove(uid);
            }
            if !self.runtimes.contains_key(uid) {
                missing.push(uid);
            }
        }
        if !missing.is_empty() {
            match discovery::pod_cgroups(&root) {
                Ok(cgroups) => {
                    for uid in missing {
                        match cgroups.get(uid).map(|c| discovery::runtime_of(c)) {
                            Some(Ok(Some(runtime))) => {
                                self.runtimes.insert(uid.clone(), runtime);
                            }
                            Some(Err(e)) => {
                                tracing::debug!(uid = %uid, "reading the pod's cgroup: {e}")
                            }
                            _ => {}
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(root = %root.display(), "listing the node's pod cgroups: {e}")
                }
            }
        }
        let now = std::time::Instant::now();
        let mut relocated = false;
        for (key, uid) in mine {
            let runtime = uid.as_ref().and_then(|u| self.runtimes.get(u));
            let netns = runtime.map(|r| r.netns.clone());
            let cgroup = runtime.map(|r| r.cgroup.clone());
            if snapshot
                .pods
                .get(&key)
                .is_some_and(|p| p.netns != netns || p.cgroup != cgroup)
            {
                if let Some(pod) = snapshot.pods.get_mut(&key) {
                    pod.netns = netns;
                    pod.cgroup = cgroup;
                    relocated = true;
                }
            }
            match (uid, runtime.is_some()) {
                (Some(uid), true) => {
                    self.unlocated_since.remove(&uid);
                }
                (Some(uid), false) => {
                    self.unlocated_since
                        .entry(uid)
                        .or_insert_with(|| (now, false, format!("{}/{}", key.0, key.1)));
                }
                (None, _) => {}
            }
        }
        relocated
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
}

/// An object as its store names it: (kind, namespace, name).
type Id = (&'static str, String, String);

fn id(resource: k8s::Resource, object: &dyn Stored) -> Id {
    let meta = object.meta();
    (
        resource.kind,
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Translates API objects, remembering the last good version of every object: a
/// bad update is refused and the version before it stays.
#[derive(Default)]
pub struct Translator {
    last_good: HashMap<Key, Object>,
    /// The snapshot of `last_good`, kept up to date object by object: the next
    /// one shares all that did not change with it (see `CowMap`).
    snapshot: Snapshot,
    /// Keys whose last good version changed (or went) since the last flush.
    touched: HashSet<Key>,
    /// What each stored object came to at its resourceVersion: one that has not
    /// changed is not parsed again.
    seen: HashMap<Id, Seen>,
    /// The refusals of the stored objects: one message each.
    refused: HashMap<Id, String>,
    /// One copy of each distinct set of pod labels.
    labels: Interner<BTreeMap<String, String>>,
}

/// An object as last translated: its resourceVersion and UID, and the outcome.
struct Seen {
    version: Option<String>,
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
    /// The snapshot of exactly these objects (those known and not among them are
    /// gone), and one message per object refused (`Kind namespace/name: field:
    /// problem`). Only objects whose resourceVersion changed since they were last
    /// seen are translated again.
    pub fn translate_stored<'a>(
        &mut self,
        objects: impl IntoIterator<Item = (k8s::Resource, &'a dyn Stored)>,
    ) -> (Snapshot, Vec<String>) {
        self.relist(None, objects);
        self.flush();
        (self.snapshot.clone(), self.errors())
    }

    /// An object created or updated (as a watch reports it): translated again
    /// unless its resourceVersion is the one last seen.
    pub fn apply(&mut self, resource: k8s::Resource, object: &dyn Stored) {
        self.applied(resource, object);
    }

    fn applied(&mut self, resource: k8s::Resource, object: &dyn Stored) -> Id {
        let id = id(resource, object);
        let meta = object.meta();
        let (version, uid) = (meta.resource_version.clone(), meta.uid.clone());
        let outcome = match self.seen.remove(&id) {
            Some(seen) if version.is_some() && seen.version == version => seen.outcome,
            previous => {
                // Deleted and created again under the same name: what was good
                // of the old object is not a version of this one.
                if let Some(old) = previous.filter(|p| p.uid != uid) {
                    self.forget(&old.outcome);
                }
                self.translate_one(resource, object)
            }
        };
        match &outcome {
            Outcome::Refused(_, message) => {
                self.refused.insert(id.clone(), message.clone());
            }
            Outcome::Parsed(_) => {
                self.refused.remove(&id);
            }
        }
        self.seen.insert(
            id.clone(),
            Seen {
                version,
                uid,
                outcome,
            },
        );
        id
    }

    /// An object deleted: its last good version goes with it.
    pub fn delete(&mut self, resource: k8s::Resource, object: &dyn Stored) {
        self.remove(&id(resource, object));
    }

    /// Every object of `kind` (None: of every kind), as a list gives them: each
    /// applied, and those known but not listed are gone (deleted while the watch
    /// was down, their deletion never reported).
    pub fn relist<'a>(
        &mut self,
        kind: Option<k8s::Resource>,
        objects: impl IntoIterator<Item = (k8s::Resource, &'a dyn Stored)>,
    ) {
        let mut listed = HashSet::new();
        for (resource, object) in objects {
            listed.insert(self.applied(resource, object));
        }
        let gone: Vec<Id> = self
            .seen
            .keys()
            .filter(|id| kind.is_none_or(|k| k.kind == id.0) && !listed.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.remove(&id);
        }
    }

    fn remove(&mut self, id: &Id) {
        if let Some(seen) = self.seen.remove(id) {
            self.forget(&seen.outcome);
        }
        self.refused.remove(id);
    }

    /// The object of `outcome` is no longer in force.
    fn forget(&mut self, outcome: &Outcome) {
        if let Outcome::Parsed(key) | Outcome::Refused(Some(key), _) = outcome {
            self.last_good.remove(key);
            self.touched.insert(key.clone());
        }
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
            Ok(mut object) => {
                object.share_labels(&mut self.labels);
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

    /// Writes each object whose last good version changed since the last flush
    /// into the snapshot (each in place of its previous version: the rest stays
    /// shared). Returns their keys.
    fn flush(&mut self) -> Vec<Key> {
        let written: Vec<Key> = self.touched.drain().collect();
        for key in &written {
            match self.last_good.get(key) {
                Some(object) => local::insert_object(&mut self.snapshot, key, object.clone()),
                None => local::remove_object(&mut self.snapshot, key),
            }
        }
        written
    }

    /// The refusals in force, sorted: one message per object refused.
    pub fn errors(&self) -> Vec<String> {
        let mut errors: Vec<String> = self.refused.values().cloned().collect();
        errors.sort();
        errors
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

    /// A store per watched kind, kept by hand, holding those of `values`.
    type HandStore = Arc<Mutex<Vec<Arc<dyn Stored>>>>;

    fn hand_stores(values: &[Value]) -> Vec<(k8s::Resource, HandStore)> {
        let objects = stored(values);
        k8s::CONFIG
            .iter()
            .map(|a| {
                let of_kind = objects
                    .iter()
                    .filter(|(r, _)| *r == a.resource)
                    .map(|(_, o)| o.clone())
                    .collect();
                (a.resource, Arc::new(Mutex::new(of_kind)))
            })
            .collect()
    }

    fn store_of(stores: &[(k8s::Resource, HandStore)], resource: k8s::Resource) -> &HandStore {
        &stores.iter().find(|(r, _)| *r == resource).unwrap().1
    }

    fn builder(
        stores: &[(k8s::Resource, HandStore)],
        node: &str,
        pod_cgroup_root: Option<PathBuf>,
    ) -> Builder {
        Builder::new(
            stores
                .iter()
                .map(|(r, s)| (*r, Box::new(s.clone()) as Box<dyn Objects>))
                .collect(),
            KubeOptions {
                node: node.into(),
                pod_cgroup_root,
                resync: Duration::from_secs(60),
            },
            ConfigMetrics::default(),
        )
    }

    /// Takes the object named like `value` out of its store (no event): returns it.
    fn take(stores: &[(k8s::Resource, HandStore)], value: &Value) -> Arc<dyn Stored> {
        let resource = resource_of(value).unwrap();
        let mut objects = store_of(stores, resource).lock().unwrap();
        let i = objects
            .iter()
            .position(|o| o.meta().name.as_deref() == value["metadata"]["name"].as_str())
            .unwrap();
        objects.remove(i)
    }

    /// Puts `value` in its store (no event), in place of the object of its name:
    /// returns it as stored.
    fn put(
        stores: &[(k8s::Resource, HandStore)],
        value: &Value,
    ) -> (k8s::Resource, Arc<dyn Stored>) {
        let resource = resource_of(value).unwrap();
        let object = objects::typed(resource)
            .unwrap()
            .decode(value.clone())
            .unwrap();
        let mut objects = store_of(stores, resource).lock().unwrap();
        let meta = object.meta();
        objects.retain(|o| o.meta().name != meta.name || o.meta().namespace != meta.namespace);
        objects.push(object.clone());
        (resource, object)
    }

    fn find<'a>(values: &'a mut [Value], kind: &str) -> &'a mut Value {
        values.iter_mut().find(|v| v["kind"] == kind).unwrap()
    }

    #[test]
    fn where_a_pod_lives_comes_from_the_node_not_from_its_annotations() {
        let mut objects = recorded();
        let pod = find(&mut objects, "Pod");
        pod["metadata"]["annotations"] = serde_json::json!({
            crate::config::NETNS_ANNOTATION: "/proc/1/ns/net",
            crate::config::CGROUP_ANNOTATION: "/sys/fs/cgroup",
        });
        pod["metadata"]["resourceVersion"] = "1".into();
        let root =
            TempDir(std::env::temp_dir().join(format!("ztunnel-kube-test-{}", std::process::id())));
        let pod_cgroup = root
            .0
            .join("kubepods/besteffort/pod5f0c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b");
        std::fs::create_dir_all(pod_cgroup.join("sandbox")).unwrap();
        let stores = hand_stores(&objects);
        let mut builder = builder(&stores, "node-a", Some(root.0.clone()));
        let key = ("shop".to_string(), "web-7d9f-abc".to_string());

        // Not on the node yet: nowhere, counted, and looked for again soon.
        let (snapshot, retry) = builder.build(Scope::Everything);
        let snapshot = snapshot.unwrap();
        assert_eq!(
            snapshot.pods[&key].netns, None,
            "the local source's annotation is not even stored"
        );
        assert_eq!(snapshot.pods[&key].cgroup, None);
        assert_eq!(retry, Some(RUNTIME_RETRY));
        assert_eq!(builder.metrics.pods_unlocated.get(), 1);
        assert!(
            builder.build(Scope::Node).0.is_none(),
            "nothing new on the node: nothing to publish"
        );

        // Its sandbox runs: found by UID, in that process's namespace.
        std::fs::write(pod_cgroup.join("sandbox/cgroup.procs"), "4242\n").unwrap();
        let (snapshot, retry) = builder.build(Scope::Node);
        let snapshot = snapshot.expect("the pod found");
        let located = |s: &Snapshot| (s.pods[&key].netns.clone(), s.pods[&key].cgroup.clone());
        let expected = (
            Some(PathBuf::from("/proc/4242/ns/net")),
            Some(pod_cgroup.clone()),
        );
        assert_eq!(located(&snapshot), expected);
        assert_eq!((retry, builder.metrics.pods_unlocated.get()), (None, 0));

        // Updated: translated again, and still where it lives.
        let pod = find(&mut objects, "Pod");
        pod["metadata"]["labels"]["version"] = "2".into();
        pod["metadata"]["resourceVersion"] = "2".into();
        let (resource, object) = put(&stores, pod);
        let changes = vec![(resource, k8s::Change::Applied(object))];
        let snapshot = builder.build(Scope::Changes(changes)).0.unwrap();
        assert_eq!(snapshot.pods[&key].labels["version"], "2");
        assert_eq!(located(&snapshot), expected);
        // A resync finds all as it was.
        assert_eq!(builder.build(Scope::Everything).0.unwrap(), snapshot);

        // Its sandbox gone: no longer located once the node is looked at.
        std::fs::remove_file(pod_cgroup.join("sandbox/cgroup.procs")).unwrap();
        let snapshot = builder.build(Scope::Everything).0.unwrap();
        assert_eq!(located(&snapshot), (None, None));
        assert_eq!(builder.metrics.pods_unlocated.get(), 1);

        // Deleted: forgotten.
        let gone = take(&stores, find(&mut objects, "Pod"));
        let changes = vec![(k8s::PODS, k8s::Change::Deleted(gone))];
        let (snapshot, retry) = builder.build(Scope::Changes(changes));
        assert!(!snapshot.unwrap().pods.contains_key(&key));
        assert_eq!((retry, builder.metrics.pods_unlocated.get()), (None, 0));
        assert!(builder.local.is_empty() && builder.unlocated_since.is_empty());
    }

    /// Istio's per-pod switch must survive the store's pruning, or a pod that
    /// asked to keep its own DNS would have it captured in a cluster.
    #[test]
    fn a_pods_dns_capture_annotation_is_kept_and_its_other_annotations_are_not() {
        let mut objects = recorded();
        let pod = find(&mut objects, "Pod");
        pod["metadata"]["annotations"] = serde_json::json!({
            crate::config::DNS_CAPTURE_ANNOTATION: "false",
            "kubectl.kubernetes.io/last-applied-configuration": "{\"big\": true}",
            "prometheus.io/scrape": "true",
        });
        let stores = hand_stores(&objects);
        let mut builder = builder(&stores, "node-a", None);
        let snapshot = builder.build(Scope::Everything).0.unwrap();
        let key = ("shop".to_string(), "web-7d9f-abc".to_string());
        let kept: Vec<_> = snapshot.pods[&key].annotations.iter().collect();
        assert_eq!(
            kept,
            [(
                &crate::config::DNS_CAPTURE_ANNOTATION.to_string(),
                &"false".to_string()
            )]
        );
    }

    /// The attack: while the watch is down, a pod and the policy that let it in
    /// are deleted; the API server's history is compacted, so no `Deleted` ever
    /// comes. The relist must take both out, and nothing else.
    #[test]
    fn a_relist_after_missed_deletes_removes_the_pod_and_its_policy_and_nothing_else() {
        let objects = recorded();
        let stores = hand_stores(&objects);
        let mut builder = builder(&stores, "node-a", None);
        let before = builder.build(Scope::Everything).0.unwrap();
        let settings = crate::state::MeshSettings::new("node-a", "cluster.local");
        let state = crate::state::State::build(Arc::new(before.clone()), &settings);
        let ip = "10.244.0.5".parse().unwrap();
        assert!(state.workload_by_ip(ip).is_some());
        let policy = (
            "AuthorizationPolicy".to_string(),
            "shop".to_string(),
            "allow-front".to_string(),
        );
        assert!(before.policies.contains_key(&policy));

        take(&stores, &objects[1]);
        take(&stores, policy_value(&objects));
        // Until the list is in, the last state stays (the stores' too).
        let stale = builder.build(Scope::Changes(Vec::new())).0.unwrap();
        assert_eq!(stale, before);

        let relisted = vec![
            (k8s::PODS, k8s::Change::Listed),
            (k8s::AUTHORIZATION_POLICIES, k8s::Change::Listed),
        ];
        let after = builder.build(Scope::Changes(relisted)).0.unwrap();
        assert!(after.pods.is_empty(), "{:?}", after.pods);
        assert!(!after.policies.contains_key(&policy));
        let state = state.update(Arc::new(after.clone()));
        assert!(
            state.workload_by_ip(ip).is_none(),
            "the deleted pod's address names nobody"
        );
        // The refused PeerAuthentication is still refused, and in force.
        assert_eq!(after.policies.len(), 1);
        assert_eq!(builder.translator.errors().len(), 1);
        // Everything else is as it was, shared.
        assert!(after.services.ptr_eq(&before.services));
        assert!(after.namespaces.ptr_eq(&before.namespaces));
        assert!(after.endpoint_slices.ptr_eq(&before.endpoint_slices));
        // And a resync from the stores agrees.
        assert_eq!(builder.build(Scope::Everything).0.unwrap(), after);
    }

    #[test]
    fn pods_labelled_alike_share_one_copy_of_their_labels() {
        let pod = |name: &str, app: &str| {
            serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "shop", "resourceVersion": "1",
                             "labels": {"app": app, "version": "v1"}},
                "spec": {"nodeName": "node-a"}, "status": {"podIP": "10.0.0.1"}})
        };
        let key = |name: &str| ("shop".to_string(), name.to_string());
        let mut translator = Translator::default();
        let objects = stored(&[pod("a", "web"), pod("b", "web"), pod("c", "db")]);
        let (s0, _) = translate_with(&mut translator, &objects);
        let labels = |s: &Snapshot, name: &str| s.pods[&key(name)].labels.clone();
        assert!(Arc::ptr_eq(&labels(&s0, "a"), &labels(&s0, "b")));
        assert!(!Arc::ptr_eq(&labels(&s0, "a"), &labels(&s0, "c")));
        // One pod relabelled: the other keeps its labels (and their copy).
        let mut b = pod("b", "api");
        b["metadata"]["resourceVersion"] = "2".into();
        let objects = stored(&[pod("a", "web"), b, pod("c", "db")]);
        let (s1, _) = translate_with(&mut translator, &objects);
        assert_eq!(s1.pods[&key("b")].labels["app"], "api");
        assert_eq!(s1.pods[&key("a")].labels["app"], "web");
        assert!(Arc::ptr_eq(&labels(&s1, "a"), &labels(&s0, "a")));
        // The labels no pod holds any more are swept; those in use stay shared.
        drop((s0, s1));
        translator.labels.sweep();
        assert_eq!(translator.labels.len(), 3, "web, api and db");
        let objects = stored(&[pod("a", "web")]);
        let (s2, _) = translate_with(&mut translator, &objects);
        drop(objects);
        translator.labels.sweep();
        assert_eq!(translator.labels.len(), 1, "only web");
        let d = stored(&[pod("d", "web")]);
        translator.apply(k8s::PODS, &*d[0].1);
        translator.flush();
        assert!(Arc::ptr_eq(
            &labels(&translator.snapshot, "d"),
            &labels(&s2, "a")
        ));
    }

    #[test]
    fn an_event_for_one_object_changes_that_object_and_shares_the_rest() {
        let mut objects = recorded();
        for v in &mut objects {
            v["metadata"]["resourceVersion"] = "1".into();
        }
        let stores = hand_stores(&objects);
        let mut builder = builder(&stores, "node-a", None);
        let s0 = builder.build(Scope::Everything).0.unwrap();
        let pod_key = ("shop".to_string(), "web-7d9f-abc".to_string());

        let pod = find(&mut objects, "Pod");
        pod["metadata"]["labels"]["app"] = "other".into();
        pod["metadata"]["resourceVersion"] = "2".into();
        let (resource, object) = put(&stores, pod);
        let s1 = builder
            .build(Scope::Changes(vec![(
                resource,
                k8s::Change::Applied(object),
            )]))
            .0
            .unwrap();
        assert_eq!(s1.pods[&pod_key].labels["app"], "other");
        assert_eq!(s1.pods.diff(&s0.pods).len(), 1);
        assert!(s1.services.ptr_eq(&s0.services) && s1.policies.ptr_eq(&s0.policies));
        assert!(s1.namespaces.ptr_eq(&s0.namespaces));
        assert!(s1.endpoint_slices.ptr_eq(&s0.endpoint_slices));

        // A malformed update of the policy: refused, in force fail closed; the
        // pod untouched.
        let policy = find(&mut objects, "AuthorizationPolicy");
        policy["spec"]["action"] = "PERHAPS".into();
        policy["metadata"]["resourceVersion"] = "3".into();
        let (resource, object) = put(&stores, policy);
        let s2 = builder
            .build(Scope::Changes(vec![(
                resource,
                k8s::Change::Applied(object),
            )]))
            .0
            .unwrap();
        assert_eq!(s2.policies.diff(&s1.policies).len(), 1);
        assert!(s2.pods.ptr_eq(&s1.pods) && s2.services.ptr_eq(&s1.services));
        let errors = builder.translator.errors();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(builder.metrics.refused.get(), 2);

        // The same version reported again (a resync, a relist) changes nothing.
        let (resource, object) = put(&stores, policy_value(&objects));
        let s3 = builder
            .build(Scope::Changes(vec![
                (resource, k8s::Change::Applied(object)),
                (k8s::PODS, k8s::Change::Listed),
            ]))
            .0
            .unwrap();
        assert!(s3.pods.ptr_eq(&s2.pods) && s3.policies.ptr_eq(&s2.policies));

        // A Service deleted: only the Services change.
        let svc = objects.iter().find(|v| v["kind"] == "Service").unwrap();
        let gone = take(&stores, svc);
        let s4 = builder
            .build(Scope::Changes(vec![(
                k8s::SERVICES,
                k8s::Change::Deleted(gone),
            )]))
            .0
            .unwrap();
        assert_eq!(s4.services.len() + 1, s3.services.len());
        assert!(s4.pods.ptr_eq(&s3.pods) && s4.policies.ptr_eq(&s3.policies));
    }

    fn policy_value(objects: &[Value]) -> &Value {
        objects
            .iter()
            .find(|v| v["kind"] == "AuthorizationPolicy")
            .unwrap()
    }

    /// A random object of a small cluster (a few names per kind, two UIDs per
    /// name, so that changes hit the same objects again, and objects are
    /// recreated), some of them malformed.
    fn random_object(rng: &mut fastrand::Rng, version: u64) -> Value {
        let ns = format!("ns-{}", rng.usize(0..3));
        let mut meta = serde_json::json!({
            "name": format!("o-{}", rng.usize(0..5)), "namespace": ns,
            "uid": format!("uid-{}", rng.usize(0..2)),
            "resourceVersion": version.to_string(),
            "labels": {"app": format!("a{}", rng.usize(0..3))}});
        match rng.usize(0..6) {
            0 => {
                meta["name"] = ns.into();
                meta["labels"]["istio.io/dataplane-mode"] = "ambient".into();
                serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
            }
            1 | 2 => {
                let ip = match rng.usize(0..10) {
                    0 => serde_json::json!(42),
                    1 => serde_json::json!("10.0.0.300"),
                    n => serde_json::json!(format!("10.0.0.{n}")),
                };
                serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                    "spec": {"serviceAccountName": "sa", "nodeName": format!("node-{}", rng.usize(0..2)), "containers": []},
                    "status": {"phase": "Running", "podIP": ip}})
            }
            3 => serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": meta,
                "spec": {"clusterIP": format!("10.96.0.{}", rng.usize(1..4)), "selector": {"app": "a1"},
                         "ports": [{"port": 80, "targetPort": 8080}]}}),
            _ => {
                let action = ["ALLOW", "DENY", "PERHAPS"][rng.usize(0..3)];
                serde_json::json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                    "metadata": meta,
                    "spec": {"action": action, "rules": [{"from": [{"source": {"namespaces": ["ns-1"]}}]}]}})
            }
        }
    }

    /// Applied one by one as the watches report them, with relists after
    /// changes no watch reported, the changes give the snapshot and refusals a
    /// walk of every stored object gives.
    #[test]
    fn random_changes_one_by_one_give_the_snapshot_a_walk_of_the_stores_gives() {
        for seed in 1..=30u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let stores = hand_stores(&[]);
            let mut builder = builder(&stores, "node-0", None);
            builder.build(Scope::Everything);
            let mut reference = Translator::default();
            let mut version = 0;
            for step in 0..120 {
                // Sometimes the watch was down: nothing reported until the list.
                let unreported = rng.usize(0..8) == 0;
                let mut changes = Vec::new();
                let mut changed = HashSet::new();
                let mut listed = Vec::new();
                for _ in 0..1 + rng.usize(0..3) {
                    version += 1;
                    let value = random_object(&mut rng, version);
                    let resource = resource_of(&value).unwrap();
                    let name = (
                        value["kind"].clone(),
                        value["metadata"]["namespace"].clone(),
                        value["metadata"]["name"].clone(),
                    );
                    // One change per object between two walks.
                    if !changed.insert(name) {
                        continue;
                    }
                    let exists = store_of(&stores, resource).lock().unwrap().iter().any(|o| {
                        o.meta().name.as_deref() == value["metadata"]["name"].as_str()
                            && o.meta().namespace.as_deref()
                                == value["metadata"]["namespace"].as_str()
                    });
                    let change = match exists && rng.usize(0..3) == 0 {
                        true => k8s::Change::Deleted(take(&stores, &value)),
                        false => k8s::Change::Applied(put(&stores, &value).1),
                    };
                    match unreported {
                        true if !listed.contains(&resource) => listed.push(resource),
                        true => {}
                        false => changes.push((resource, change)),
                    }
                }
                changes.extend(listed.into_iter().map(|r| (r, k8s::Change::Listed)));
                let snapshot = builder.build(Scope::Changes(changes)).0.unwrap();
                let all: Vec<(k8s::Resource, Arc<dyn Stored>)> = stores
                    .iter()
                    .flat_map(|(r, s)| s.objects().into_iter().map(|o| (*r, o)))
                    .collect();
                let (expected, errors) = translate_with(&mut reference, &all);
                assert_eq!(snapshot, expected, "seed {seed}, step {step}");
                assert_eq!(
                    builder.translator.errors(),
                    errors,
                    "seed {seed}, step {step}"
                );
            }
        }
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
