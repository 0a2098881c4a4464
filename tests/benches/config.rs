//! `cargo xtask bench config`: what the Kubernetes source costs a tunnel in a large
//! cluster. Every tunnel keeps every pod of the cluster, so the figures are per pod:
//! bytes kept (as the API server sends a pod against what the store keeps after
//! pruning), and the time to rebuild the mesh state from the stores after a change,
//! at 1,000 and at 10,000 pods (the ratio says whether it grows with the cluster
//! and nothing else).

use std::{sync::Arc, time::Instant};

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};
use ztunnel::{
    config::{
        kube::Translator,
        objects::{self, Prune, Stored},
    },
    k8s::{self, Checked},
    state::{MeshSettings, State},
};

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

/// Namespaces, a Service per ten pods and a policy per namespace around the pods.
fn cluster(pods: usize) -> Vec<(k8s::Resource, Value)> {
    let mut objects = Vec::new();
    for n in 0..pods.div_ceil(100) {
        objects.push((k8s::NAMESPACES, json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("team-{n}"), "labels": {"istio.io/dataplane-mode": "ambient"}}})));
        objects.push((
            k8s::AUTHORIZATION_POLICIES,
            json!({"apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "allow-team", "namespace": format!("team-{n}")},
            "spec": {"rules": [{"from": [{"source": {"namespaces": [format!("team-{n}")]}}]}]}}),
        ));
    }
    for s in 0..pods / 10 {
        objects.push((k8s::SERVICES, json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("app-{s}"), "namespace": format!("team-{}", s / 10)},
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

/// The store's objects.
fn store(objects: &[(k8s::Resource, Value)]) -> Vec<(k8s::Resource, Arc<dyn Stored>)> {
    objects
        .iter()
        .map(|(resource, value)| (*resource, stored(*resource, value.clone())))
        .collect()
}

/// One rebuild, as the source does it after a change: stores → snapshot → state.
fn rebuild(
    translator: &mut Translator,
    store: &[(k8s::Resource, Arc<dyn Stored>)],
    settings: &MeshSettings,
) -> State {
    let (snapshot, errors) = translator.translate_stored(store.iter().map(|(r, o)| (*r, &**o)));
    assert!(errors.is_empty(), "{errors:?}");
    State::build(Arc::new(snapshot), settings)
}

/// Seconds for the first build and per rebuild after one pod changed (best of a
/// few), at this size.
fn build_times(pods: usize) -> (f64, f64) {
    let mut store = store(&cluster(pods));
    let settings = MeshSettings::new("node-0", "cluster.local");
    let mut translator = Translator::default();
    let started = Instant::now();
    let state = rebuild(&mut translator, &store, &settings);
    let first = started.elapsed().as_secs_f64();
    assert_eq!(state.local_workloads().count(), pods / 50);
    let again = (0..5)
        .map(|round| {
            // A pod's labels change, as a rollout's would.
            let mut changed = pod(pods - 1);
            changed["metadata"]["resourceVersion"] = format!("changed-{round}").into();
            changed["metadata"]["labels"]["round"] = round.to_string().into();
            *store.last_mut().unwrap() = (k8s::PODS, stored(k8s::PODS, changed));
            let started = Instant::now();
            let state = rebuild(&mut translator, &store, &settings);
            let elapsed = started.elapsed().as_secs_f64();
            let last = state
                .workload_by_ip(last_ip(pods))
                .expect("the changed pod");
            assert_eq!(
                last.labels["round"],
                round.to_string(),
                "the change is seen"
            );
            elapsed
        })
        .fold(f64::INFINITY, f64::min);
    (first, again)
}

fn last_ip(pods: usize) -> std::net::Ipv4Addr {
    pod(pods - 1)["status"]["podIP"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
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

    let (_, small) = build_times(1_000);
    let (first, large) = build_times(10_000);
    println!(
        "config: rebuild after a change: {:.1} ms at 1,000 pods, {:.1} ms at 10,000 pods; \
         per pod, 10,000/1,000 = {:.2} (1.00 = linear)",
        small * 1e3,
        large * 1e3,
        (large / 10_000.0) / (small / 1_000.0)
    );
    println!(
        "config: at 10,000 pods, rebuild after a change / first build = {:.2} \
         (unchanged objects are not parsed again)",
        large / first
    );
}
