//! The Kubernetes source's translation: API objects (as the watchers hand them
//! over, JSON) into the same [`Snapshot`] the local source builds, through the same
//! typed parsing and validation. The watchers themselves (kube-rs reflectors) are
//! not here yet.

use serde_json::Value;

use super::{local, Snapshot};

/// The snapshot of these objects, and one message per object refused
/// (`Kind namespace/name: field: problem`). Kinds the mesh does not read are skipped.
pub fn translate(objects: impl IntoIterator<Item = Value>) -> (Snapshot, Vec<String>) {
    let mut parsed = Vec::new();
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
            Ok(object) => parsed.push((key, object)),
            Err(e) => errors.push(format!("{} {}/{}: {e:#}", key.0, key.1, key.2)),
        }
    }
    (
        local::build_snapshot(parsed.iter().map(|(k, o)| (k, o))),
        errors,
    )
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
    }
}
