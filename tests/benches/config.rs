//! `cargo xtask bench config`: what the configuration costs a tunnel in a large
//! cluster. Every tunnel keeps every pod of the cluster, so the figures are per
//! pod: bytes kept (as the API server sends a pod against what the store keeps
//! after pruning); then, at 1,000, 10,000 and 100,000 pods, the first build
//! (stores → snapshot → state), one pod change applied (p50/p99 of 200 changes:
//! labels changed, a pod deleted, one added), and the memory per pod, counted by
//! this binary's allocator (bytes asked for and live; the allocator's own
//! overhead not included): the state's (what stays live of the build once the
//! source's translator is dropped: the snapshot the state holds, its indexes,
//! the labels and identities they share) and the source's (its stores' objects,
//! and what the translator alone holds: its last good version of each object,
//! its record of what it has seen). Then the same change as the Kubernetes source takes it from a watch
//! (the one object applied or deleted, the snapshot made, the state updated: what
//! it costs per event, where its store walk was paid on every event before), and
//! the DNS names updated from that state (against their build from scratch).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        atomic::{AtomicIsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};
use ztunnel::{
    config::{
        kube::{Builder, KubeOptions, Objects, Scope, Translator},
        objects::{self, Prune, Stored},
        ConfigMetrics, Snapshot,
    },
    dns::names::{Answer, MeshNames},
    k8s::{self, Checked},
    state::{MeshSettings, State},
};

/// Counts the bytes live on the heap.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Relaxed)
}

/// A pod as a kubelet reports it: one app container with the usual env, mounts and
/// probes, and the status the kubelet writes.
fn pod(i: usize) -> Value {
    let ns = format!("team-{}", i / 100);
    let app = format!("app-{}", i / 10);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{app}-7d9f8c6b5-{i:05}"), "namespace": ns,
            "uid": format!("00000000-0000-4000-8000-{i:012}"),
            "resourceVersion": format!("{}", 1000 + i),
            "creationTimestamp": "2026-11-30T10:00:00Z",
            "generateName": format!("{app}-7d9f8c6b5-"),
            "labels": {"app": app, "pod-template-hash": "7d9f8c6b5", "version": "v1"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-30T09:59:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{app}-7d9f8c6b5"), "uid": "11111111-2222-4333-8444-555555555555",
                "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                 "time": "2026-11-30T10:00:00Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}}},
                              "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:image": {}, "f:env": {}}}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "subresource": "status",
                 "time": "2026-11-30T10:00:05Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:podIP": {}, "f:podIPs": {}}}}
            ]
        },
        "spec": {
            "serviceAccountName": app, "serviceAccount": app,
            "nodeName": format!("node-{}", i % 50),
            "containers": [{
                "name": "app", "image": "registry.example.com/team/app:1.42.0", "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 5},
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"
            }],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}],
            "restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
            "terminationGracePeriodSeconds": 30, "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": {
            "phase": "Running", "hostIP": "172.18.0.2", "podIP": format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256),
            "podIPs": [{"ip": format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256)}],
            "qosClass": "Burstable", "startTime": "2026-11-30T10:00:01Z",
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": "2026-11-30T10:00:01Z"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-30T10:00:05Z"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-11-30T10:00:05Z"},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-30T10:00:00Z"}
            ],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "started": true,
                "image": "registry.example.com/team/app:1.42.0",
                "imageID": "registry.example.com/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "containerID": "containerd://0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "state": {"running": {"startedAt": "2026-11-30T10:00:03Z"}}, "lastState": {}}]
        }
    })
}

/// Namespaces, a Service per ten pods and a policy per namespace around the pods,
/// each with a resourceVersion as the API server gives them (an object without one
/// is translated again on every walk).
fn cluster(pods: usize) -> Vec<(k8s::Resource, Value)> {
    let mut objects = Vec::new();
    for n in 0..pods.div_ceil(100) {
        objects.push((k8s::NAMESPACES, json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("team-{n}"), "resourceVersion": "1", "labels": {"istio.io/dataplane-mode": "ambient"}}})));
        objects.push((
            k8s::AUTHORIZATION_POLICIES,
            json!({"apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "allow-team", "namespace": format!("team-{n}"), "resourceVersion": "1"},
            "spec": {"rules": [{"from": [{"source": {"namespaces": [format!("team-{n}")]}}]}]}}),
        ));
    }
    for s in 0..pods / 10 {
        objects.push((k8s::SERVICES, json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("app-{s}"), "namespace": format!("team-{}", s / 10), "resourceVersion": "1"},
            "spec": {"clusterIP": format!("10.96.{}.{}", s / 256, s % 256), "selector": {"app": format!("app-{s}")},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})));
    }
    objects.extend((0..pods).map(|i| (k8s::PODS, pod(i))));
    objects
}

/// An object as the reflector stores it: typed, pruned.
fn stored(resource: k8s::Resource, value: Value) -> Arc<dyn Stored> {
    objects::typed(resource).unwrap().decode(value).unwrap()
}

/// The store's objects (the pods last).
fn store(pods: usize) -> Vec<(k8s::Resource, Arc<dyn Stored>)> {
    cluster(pods)
        .into_iter()
        .map(|(resource, value)| (resource, stored(resource, value)))
        .collect()
}

fn translate(translator: &mut Translator, store: &[(k8s::Resource, Arc<dyn Stored>)]) -> Snapshot {
    let (snapshot, errors) = translator.translate_stored(store.iter().map(|(r, o)| (*r, &**o)));
    assert!(errors.is_empty(), "{errors:?}");
    snapshot
}

fn pod_ip(i: usize) -> std::net::Ipv4Addr {
    pod(i)["status"]["podIP"].as_str().unwrap().parse().unwrap()
}

/// The p-th percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize]
}

struct Row {
    pods: usize,
    first: f64,
    /// One pod change, the snapshot handed over: the state updated.
    update: Vec<f64>,
    /// The same, with the Kubernetes source's walk of its stores before it.
    walk: Vec<f64>,
    state_bytes: f64,
    source_bytes: f64,
    /// One pod change as the Kubernetes source takes it from a watch, the state
    /// updated.
    event: Vec<f64>,
    /// The DNS names updated from that state, and built from scratch (once).
    names: Vec<f64>,
    names_built: f64,
}

/// A pod's key in the snapshot, and the pod changed as a watch delivers a change
/// (labels changed in a rollout, a new resourceVersion).
fn changed_pod(i: usize, round: usize) -> ((String, String), Value) {
    let key = (
        format!("team-{}", i / 100),
        pod(i)["metadata"]["name"].as_str().unwrap().to_owned(),
    );
    let mut changed = pod(i);
    changed["metadata"]["resourceVersion"] = format!("changed-{round}").into();
    changed["metadata"]["labels"]["round"] = round.to_string().into();
    (key, changed)
}

/// One pod change (applied, or deleted one round in four) through the
/// Kubernetes source's builder as a watch reports it, then the state updated
/// from the snapshot, then the DNS names from the state; each round then puts the
/// pod back. Returns the times of the first two, and of the names built from
/// scratch. The builder runs as a waypoint's (no cgroup root): a tunnel's also
/// looks at the changed pod on the node, if it is this node's.
fn measure_events(
    pods: usize,
    store: &[(k8s::Resource, Arc<dyn Stored>)],
    settings: &MeshSettings,
) -> (Vec<f64>, Vec<f64>, f64) {
    let stores = k8s::CONFIG
        .iter()
        .map(|a| {
            let objects: Vec<Arc<dyn Stored>> = store
                .iter()
                .filter(|(r, _)| *r == a.resource)
                .map(|(_, o)| o.clone())
                .collect();
            (
                a.resource,
                Box::new(Mutex::new(objects)) as Box<dyn Objects>,
            )
        })
        .collect();
    let options = KubeOptions {
        node: "node-0".into(),
        pod_cgroup_root: None,
        resync: Duration::from_secs(60),
    };
    let mut builder = Builder::new(stores, options, ConfigMetrics::default());
    let first = builder
        .build(Scope::Everything)
        .0
        .expect("a first snapshot");
    let mut state = State::build(Arc::new(first), settings);
    let started = Instant::now();
    let mut names = MeshNames::from_state(&state, "cluster.local");
    let names_built = started.elapsed().as_secs_f64();
    let (mut event, mut dns) = (Vec::new(), Vec::new());
    for round in 0..200usize {
        let i = (round * 7919) % pods;
        let (key, changed) = changed_pod(i, round);
        let deleted = round % 4 == 1;
        let original = stored(k8s::PODS, pod(i));
        let change = match deleted {
            true => k8s::Change::Deleted(original.clone()),
            false => k8s::Change::Applied(stored(k8s::PODS, changed)),
        };
        let started = Instant::now();
        let snapshot = builder.build(Scope::Changes(vec![(k8s::PODS, change)])).0;
        let next = state.update(Arc::new(snapshot.expect("a snapshot")));
        event.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let next_names = names.update(&state, &next);
        dns.push(started.elapsed().as_secs_f64());
        let ip = pod_ip(i);
        let dashed = format!(
            "{}.{}.pod.cluster.local",
            ip.to_string().replace('.', "-"),
            key.0
        );
        match deleted {
            true => {
                assert!(next.workload_by_ip(ip).is_none(), "the deletion is seen");
                assert_eq!(next_names.resolve(&dashed, "x"), Answer::NxDomain);
            }
            false => {
                assert_eq!(
                    next.workload_by_ip(ip).expect("the changed pod").labels["round"],
                    round.to_string(),
                    "the change is seen"
                );
                assert_eq!(
                    next_names.resolve(&dashed, "x"),
                    Answer::Addresses(vec![ip])
                );
            }
        }
        (state, names) = (next, next_names);
        // Back as it was.
        let snapshot = builder.build(Scope::Changes(vec![(
            k8s::PODS,
            k8s::Change::Applied(original),
        )]));
        let next = state.update(Arc::new(snapshot.0.expect("a snapshot")));
        names = names.update(&state, &next);
        state = next;
    }
    assert_eq!(names, MeshNames::from_state(&state, "cluster.local"));
    event.sort_by(f64::total_cmp);
    dns.sort_by(f64::total_cmp);
    (event, dns, names_built)
}

fn measure(pods: usize) -> Row {
    let settings = MeshSettings::new("node-0", "cluster.local");
    let before_store = live();
    let store = store(pods);
    let source_objects = live() - before_store;
    let offset = store.len() - pods;
    let mut translator = Translator::default();
    let before = live();
    let started = Instant::now();
    let state = State::build(Arc::new(translate(&mut translator, &store)), &settings);
    let first = started.elapsed().as_secs_f64();
    assert_eq!(state.local_workloads().count(), pods / 50);
    let with_translator = live() - before;
    // The state's share is what stays once the translator is gone; the
    // translator's own record of each object (its last good version, what it
    // saw) counts for the source, with the store.
    drop(translator);
    let state_only = live() - before;
    let state_bytes = state_only as f64 / pods as f64;
    let source_bytes = (source_objects + with_translator - state_only) as f64 / pods as f64;
    drop(state);
    // The changes go through a translator: the same build again.
    let mut translator = Translator::default();
    let snapshot = Arc::new(translate(&mut translator, &store));
    let mut state = State::build(snapshot.clone(), &settings);

    let mut update = Vec::new();
    let mut walk = Vec::new();
    let mut snapshot = snapshot;
    for round in 0..200usize {
        let i = (round * 7919) % pods;
        // A change as a watch delivers it: labels changed (a rollout), or the
        // pod deleted, or added back.
        let (key, changed) = changed_pod(i, round);
        let deleted = round % 4 == 1 && snapshot.pods.contains_key(&key);
        // The source's path: its stores walked, the snapshot made (shared with
        // the last one but for the pod), the state updated.
        let mut walked_store = store.clone();
        if deleted {
            walked_store.remove(offset + i);
        } else {
            walked_store[offset + i] = (k8s::PODS, stored(k8s::PODS, changed.clone()));
        }
        let started = Instant::now();
        let next = Arc::new(translate(&mut translator, &walked_store));
        let walked = state.update(next.clone());
        walk.push(started.elapsed().as_secs_f64());
        drop(walked);
        // The state's part alone: the next snapshot handed over.
        let started = Instant::now();
        let next_state = state.update(next.clone());
        update.push(started.elapsed().as_secs_f64());
        match deleted {
            true => assert!(
                next_state.workload_by_ip(pod_ip(i)).is_none(),
                "the deletion is seen"
            ),
            false => assert_eq!(
                next_state
                    .workload_by_ip(pod_ip(i))
                    .expect("the changed pod")
                    .labels["round"],
                round.to_string(),
                "the change is seen"
            ),
        }
        state = next_state;
        snapshot = next;
        // Back as it was, so every round changes one pod of the full cluster.
        let restored = translate(&mut translator, &store);
        state = state.update(Arc::new(restored));
    }
    update.sort_by(f64::total_cmp);
    walk.sort_by(f64::total_cmp);
    drop((state, snapshot, translator));
    let (event, names, names_built) = measure_events(pods, &store, &settings);
    Row {
        pods,
        first,
        update,
        walk,
        state_bytes,
        source_bytes,
        event,
        names,
        names_built,
    }
}

fn main() {
    let full = serde_json::to_vec(&pod(1)).unwrap().len();
    let mut kept: Checked<Pod> = serde_json::from_value(pod(1)).unwrap();
    kept.prune();
    let Checked::Valid(kept) = kept else {
        panic!("a valid pod")
    };
    let kept = serde_json::to_vec(&kept).unwrap().len();
    println!(
        "config: a pod as sent {full} B, as kept {kept} B: kept/sent = {:.2}",
        kept as f64 / full as f64
    );
    let sizes: Vec<usize> = match std::env::var("ZTUNNEL_BENCH_CONFIG_PODS") {
        Ok(list) => list
            .split(',')
            .map(|n| n.trim().parse().expect("pod counts"))
            .collect(),
        Err(_) => vec![1_000, 10_000, 100_000],
    };
    println!(
        "config: |    pods | first build | one pod change: state update p50 / p99 | with the kube source's store walk p50 / p99 | state B/pod | source B/pod | kube source event + state p50 / p99 | DNS names update p50 / p99 | DNS names from scratch |"
    );
    let ms = |s: f64| s * 1e3;
    for pods in sizes {
        let row = measure(pods);
        println!(
            "config: | {:>7} | {:>8.1} ms | {:>17.3} ms / {:>7.3} ms | {:>22.2} ms / {:>7.2} ms | {:>11.0} | {:>12.0} | {:>16.3} ms / {:>7.3} ms | {:>11.3} ms / {:>7.3} ms | {:>19.2} ms |",
            row.pods,
            ms(row.first),
            ms(percentile(&row.update, 50.0)),
            ms(percentile(&row.update, 99.0)),
            ms(percentile(&row.walk, 50.0)),
            ms(percentile(&row.walk, 99.0)),
            row.state_bytes,
            row.source_bytes,
            ms(percentile(&row.event, 50.0)),
            ms(percentile(&row.event, 99.0)),
            ms(percentile(&row.names, 50.0)),
            ms(percentile(&row.names, 99.0)),
            ms(row.names_built),
        );
    }
    println!(
        "config: goals: one pod change <= 1 ms p99 at 100,000 pods (state update), first build <= 5 s, state <= 1024 B/pod"
    );
}
