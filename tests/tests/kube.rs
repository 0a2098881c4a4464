//! The Kubernetes source and the CA's Kubernetes calls, against a stand-in API
//! server (no cluster runs on this machine): real watches over HTTP, real
//! enrollment on the testbed from pods found by UID in kubelet-style cgroups.

use std::{net::SocketAddr, time::Duration};

use serde_json::json;
use testbed::{
    app::EchoServer,
    capture::Capture,
    faults::{
        assert_no_crash, assert_nothing_plaintext, on_every_node, refused_by_policy, tunnels, Load,
    },
    kube_api::{Call, FakeApiServer},
    mesh::{eventually, Mesh, TempDir, WorkloadSpec},
    Cluster, ClusterSpec,
};
use ztunnel::k8s::{self, Access, Scope};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");

fn probe(mesh: &Mesh, pod: &str, target: &str, message: &str) -> String {
    let out = mesh
        .cluster
        .pod(pod)
        .run(PROBE, ["connect", target, message])
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every call is one the list grants: the verb, the resource, the object's name
/// where the grant names objects, and for a grant in the caller's own namespace,
/// that namespace.
fn assert_granted(calls: &[Call], list: &[Access], own_namespace: &str) {
    assert!(!calls.is_empty(), "no calls recorded");
    for call in calls {
        let granted = list.iter().any(|a| {
            format!("{}/{}", a.resource.group, a.resource.plural) == call.resource
                && a.allows(&call.verb, call.name.as_deref())
                && match a.scope {
                    Scope::Cluster => true,
                    Scope::OwnNamespace => call.namespace.as_deref() == Some(own_namespace),
                }
        });
        assert!(granted, "{call:?} is not in the access list");
    }
}

/// Whether node-b reports `n` pods of its own not found on the node.
async fn unlocated(mesh: &Mesh, n: u32) -> bool {
    let line = format!("ztunnel_pods_unlocated {n}");
    mesh.metrics("node-b").await.lines().any(|l| l == line)
}

/// Waits until `node`'s state has the policy `name` (or, `present` false, no
/// longer has it).
async fn policy_on(mesh: &Mesh, node: &str, name: &str, present: bool) {
    let what = format!("{name} in force on {node}: {present}");
    eventually(Duration::from_secs(30), &what, || async {
        mesh.config_dump(node).await["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == name) == present)
    })
    .await;
}

const DENY_CLIENT: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: demo}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]
";

/// Refused, and in force fail closed for the workloads it selects (none here).
const MALFORMED_POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: maybe, namespace: demo}
spec:
  selector: {matchLabels: {app: nobody}}
  action: PERHAPS
";

#[tokio::test(flavor = "multi_thread")]
async fn tunnels_watching_the_api_server_enroll_their_ambient_pods_and_follow_changes() {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client"])
            .node("node-b", ["server", "plain"]),
    )
    .unwrap();
    let workloads = [
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("server", "demo", "server"),
        WorkloadSpec::new("plain", "plain", "default"),
    ];
    let mut mesh = Mesh::start_kube(cluster, &workloads, &["demo"])
        .await
        .unwrap();
    // Each tunnel enrolls exactly its own node's ambient pods, found by UID.
    mesh.wait_enrolled("node-a", "client", true).await.unwrap();
    mesh.wait_enrolled("node-b", "server", true).await.unwrap();
    mesh.wait_enrolled("node-b", "plain", false).await.unwrap();
    mesh.wait_enrolled("node-a", "server", false).await.unwrap();

    let server = SocketAddr::new(mesh.cluster.pod("server").ip.into(), 8080).to_string();
    let echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let out = probe(&mesh, "client", &server, "hello");
    assert!(out.contains("reply=server:hello"), "{out}");
    eventually(
        Duration::from_secs(15),
        "an mTLS connection counted",
        || async {
            mesh.metrics("node-b").await.lines().any(|l| {
                l.starts_with("istio_tcp_connections_opened_total{")
                    && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"")
                    && l.contains("connection_security_policy=\"mutual_tls\"")
            })
        },
    )
    .await;

    // A policy created in the API applies; a malformed one beside it is refused,
    // logged and counted, and does not hold the good one back.
    mesh.api().apply_yaml(MALFORMED_POLICY);
    mesh.api().apply_yaml(DENY_CLIENT);
    policy_on(&mesh, "node-b", "deny-client", true).await;
    assert!(
        mesh.metrics("node-b")
            .await
            .lines()
            .any(|l| l == "ztunnel_config_refused_objects 1"),
        "the malformed policy is counted"
    );
    assert!(
        mesh.log("node-b").contains("demo/maybe"),
        "the refusal names the object"
    );
    let out = probe(&mesh, "client", &server, "denied");
    testbed::mesh::assert_refused_after_connect(&out);

    // Deleting the policy lets traffic in (an outage in between: see
    // through_an_api_server_outage_the_tunnels_keep_serving_and_enforcing_then_follow_changes).
    mesh.api()
        .delete(&serde_yaml::from_str(DENY_CLIENT).unwrap());
    policy_on(&mesh, "node-b", "deny-client", false).await;
    let out = probe(&mesh, "client", &server, "again");
    assert!(out.contains("reply=server:again"), "{out}");

    // Removing the namespace label un-enrolls; deleting a pod does too.
    mesh.api()
        .apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "demo", "labels": {}}}));
    mesh.wait_enrolled("node-a", "client", false).await.unwrap();
    mesh.wait_enrolled("node-b", "server", false).await.unwrap();
    let pod = mesh.api().get(&json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "server", "namespace": "demo"}}));
    mesh.api()
        .apply_yaml(&testbed::mesh::namespace_yaml("demo", true));
    mesh.wait_enrolled("node-b", "server", true).await.unwrap();
    let mut pod = pod.expect("the server pod");
    mesh.api().delete(&pod);
    mesh.wait_enrolled("node-b", "server", false).await.unwrap();

    // Recreated, with a new UID: in the state at once, enrolled as soon as the
    // node has its sandbox.
    let uid = "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6";
    pod["metadata"]["uid"] = uid.into();
    mesh.api().apply(pod);
    eventually(
        Duration::from_secs(15),
        "the recreated pod in node-b's state",
        || async {
            mesh.config_dump("node-b").await["workloads"]
                .as_array()
                .is_some_and(|ws| ws.iter().any(|w| w["name"] == "server"))
        },
    )
    .await;
    mesh.wait_enrolled("node-b", "server", false).await.unwrap();
    eventually(
        Duration::from_secs(15),
        "the pod counted as not found",
        || unlocated(&mesh, 1),
    )
    .await;
    mesh.start_sandbox("server", uid).unwrap();
    mesh.wait_enrolled("node-b", "server", true).await.unwrap();
    eventually(Duration::from_secs(15), "no pod left unfound", || {
        unlocated(&mesh, 0)
    })
    .await;
    let out = probe(&mesh, "client", &server, "recreated");
    assert!(out.contains("reply=server:recreated"), "{out}");
    drop(echo);

    // Everything the tunnels asked the API server for is in the list RBAC grants.
    assert_granted(&mesh.api().calls(), k8s::CONFIG, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ca_keeps_its_root_in_a_secret_publishes_it_and_knows_which_node_runs_what() {
    use ztunnel_ca::{
        auth::{Authenticator, Caller, NodeAuthorizer},
        kube::{
            publish_root, publish_root_in_ambient_namespaces, sync_root_secret, KubePods,
            TokenReview,
        },
        Authority, AuthorityOptions,
    };
    let api = FakeApiServer::start().await.unwrap();
    let dir = TempDir::new("kube-ca").unwrap();
    let client = api.client(dir.path()).await.unwrap();
    let options = |sub: &str| AuthorityOptions {
        dir: dir.path().join(sub),
        trust_domain: "cluster.local".into(),
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(7200),
    };

    // The first CA creates the root and stores it; the next one takes it.
    let first = options("first");
    sync_root_secret(
        client.clone(),
        "istio-system",
        "ztunnel-ca",
        &first.dir,
        |_| Authority::load_or_create(first.clone()).map(drop),
    )
    .await
    .unwrap();
    let second = options("second");
    sync_root_secret(
        client.clone(),
        "istio-system",
        "ztunnel-ca",
        &second.dir,
        |_| panic!("the root exists: nothing to create"),
    )
    .await
    .unwrap();
    let a = Authority::load_or_create(first).unwrap();
    let b = Authority::load_or_create(second).unwrap();
    assert_eq!(a.root_pem(), b.root_pem(), "one root for every replica");

    publish_root(
        client.clone(),
        "istio-system",
        "ztunnel-ca-root",
        a.root_pem(),
    )
    .await
    .unwrap();
    let published = api
        .get(&json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "ztunnel-ca-root", "namespace": "istio-system"}}))
        .expect("the root ConfigMap");
    assert_eq!(published["data"]["root-cert.pem"], a.root_pem());
    // A rotated root replaces it.
    publish_root(
        client.clone(),
        "istio-system",
        "ztunnel-ca-root",
        "NEW ROOT",
    )
    .await
    .unwrap();
    let published = api
        .get(&json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "ztunnel-ca-root", "namespace": "istio-system"}}))
        .unwrap();
    assert_eq!(published["data"]["root-cert.pem"], "NEW ROOT");

    // ... and in every ambient namespace, for the waypoints there; a namespace
    // labelled later gets it too, one without the label does not.
    api.apply_yaml(&testbed::mesh::namespace_yaml("demo", true));
    api.apply_yaml(&testbed::mesh::namespace_yaml("plain", false));
    let publisher = tokio::spawn(publish_root_in_ambient_namespaces(
        client.clone(),
        "ztunnel-ca-root".into(),
        "NEW ROOT".into(),
    ));
    let root_in = |ns: &str| {
        api.get(&json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "ztunnel-ca-root", "namespace": ns}}))
            .map(|cm| cm["data"]["root-cert.pem"].clone())
    };
    eventually(Duration::from_secs(15), "the root in demo", || async {
        root_in("demo") == Some(json!("NEW ROOT"))
    })
    .await;
    assert_eq!(root_in("plain"), None);
    api.apply_yaml(&testbed::mesh::namespace_yaml("later", true));
    eventually(Duration::from_secs(15), "the root in later", || async {
        root_in("later") == Some(json!("NEW ROOT"))
    })
    .await;
    assert_eq!(root_in("plain"), None);
    // A namespace deleted (with its ConfigMap) and created again gets the root
    // again, without waiting for the periodic check. "another" marks a pass made
    // after the deletion.
    let later = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "later"}});
    api.delete(&json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "ztunnel-ca-root", "namespace": "later"}}));
    api.delete(&later);
    api.apply_yaml(&testbed::mesh::namespace_yaml("another", true));
    eventually(Duration::from_secs(15), "the root in another", || async {
        root_in("another").is_some()
    })
    .await;
    api.apply_yaml(&testbed::mesh::namespace_yaml("later", true));
    eventually(
        Duration::from_secs(15),
        "the root in later again",
        || async { root_in("later") == Some(json!("NEW ROOT")) },
    )
    .await;
    publisher.abort();

    // Which node runs which workload, from the watched pods.
    let sleep = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "sleep-1", "namespace": "demo"},
        "spec": {"serviceAccountName": "sleep", "nodeName": "node-a"},
        "status": {"phase": "Running"}});
    api.apply(sleep.clone());
    let pods = KubePods::start(client.clone());
    pods.synced().await.unwrap();
    let identity: ztunnel::identity::Identity =
        "spiffe://cluster.local/ns/demo/sa/sleep".parse().unwrap();
    assert_eq!(pods.runs_on(&identity, "node-a"), Ok(true));
    assert_eq!(pods.runs_on(&identity, "node-b"), Ok(false));
    api.delete(&sleep);
    eventually(Duration::from_secs(15), "the deletion seen", || async {
        pods.runs_on(&identity, "node-a") == Ok(false)
    })
    .await;

    // Callers by TokenReview.
    api.on_token_review(|token| match token {
        "tunnel" => json!({"authenticated": true, "audiences": ["istio-ca"], "user": {
            "username": "system:serviceaccount:istio-system:ztunnel",
            "extra": {"authentication.kubernetes.io/node-name": ["node-a"]}}}),
        _ => json!({"authenticated": false, "error": "invalid bearer token"}),
    });
    let review = TokenReview::new(
        client,
        vec!["istio-system/ztunnel".into()],
        vec!["istio-ca".into()],
    );
    assert_eq!(
        review.authenticate("tunnel", [10, 0, 0, 1].into()).await,
        Ok(Caller::Node("node-a".into()))
    );
    assert!(review
        .authenticate("forged", [10, 0, 0, 1].into())
        .await
        .is_err());

    assert_granted(&api.calls(), k8s::CA, "istio-system");
}

#[tokio::test(flavor = "multi_thread")]
async fn through_an_api_server_outage_the_tunnels_keep_serving_and_enforcing_then_follow_changes() {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client", "client-2"])
            .node("node-b", ["server"]),
    )
    .unwrap();
    let workloads = [
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("client-2", "demo", "other"),
        WorkloadSpec::new("server", "demo", "server"),
    ];
    let mesh = Mesh::start_kube(cluster, &workloads, &["demo"])
        .await
        .unwrap();
    for (node, pod) in [
        ("node-a", "client"),
        ("node-a", "client-2"),
        ("node-b", "server"),
    ] {
        mesh.wait_enrolled(node, pod, true).await.unwrap();
    }
    let server = SocketAddr::new(mesh.cluster.pod("server").ip.into(), 8080).to_string();
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let denied = || {
        refused_by_policy(
            &mesh,
            PROBE,
            "client",
            &server,
            "node-b",
            "demo/deny-client",
        )
    };
    let served = |pod: &str, message: &str| {
        let out = probe(&mesh, pod, &server, message);
        assert!(out.contains(&format!("reply=server:{message}")), "{out}");
    };
    mesh.api().apply_yaml(DENY_CLIENT);
    eventually(Duration::from_secs(15), "the DENY in force", denied).await;

    let before = tunnels(&mesh);
    let capture = Capture::start(&mesh.cluster.fabric_netns()).unwrap();
    let marker = "API-OUTAGE-MARKER-0a9d";
    let load = Load::start(&mesh, PROBE, "client-2", &server, 6000, marker);
    // Down: every request refused, the watches cut. Both tunnels notice, count it
    // and keep the last state: still enrolled, still serving, still denying.
    mesh.api().set_available(false);
    eventually(
        Duration::from_secs(15),
        "both tunnels count the outage",
        || on_every_node(&mesh, "ztunnel_config_source_errors_total", |n| n > 0.0),
    )
    .await;
    for node in ["node-a", "node-b"] {
        assert!(
            mesh.log(node).contains("watching the API server"),
            "{node} logs the outage"
        );
    }
    for (node, pod) in [
        ("node-a", "client"),
        ("node-a", "client-2"),
        ("node-b", "server"),
    ] {
        mesh.wait_enrolled(node, pod, true).await.unwrap();
    }
    served("client-2", "during-outage");
    assert!(denied().await, "the DENY still denies during the outage");

    // Back, then a change: the policy deleted. The tunnels reconnect and follow.
    mesh.api().set_available(true);
    mesh.api()
        .delete(&serde_yaml::from_str(DENY_CLIENT).unwrap());
    policy_on(&mesh, "node-b", "deny-client", false).await;
    served("client", "after-outage");
    let (ok, failed) = load.finish();
    assert!(ok > 0 && failed == 0, "ok={ok} failed={failed}");
    assert_no_crash(&mesh, &before);
    assert_nothing_plaintext(&mesh, &capture.stop(), marker);
}

const ALLOW_CLIENT: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]
";

/// Two nodes under the Kubernetes source: `client` and `other` on node-a, an echo
/// server (labelled app=server) on node-b, all enrolled; with the server's address.
async fn client_other_and_server() -> (Mesh, String, EchoServer) {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client", "other"])
            .node("node-b", ["server"]),
    )
    .unwrap();
    let workloads = [
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("other", "demo", "other"),
        WorkloadSpec::new("server", "demo", "server").label("app", "server"),
    ];
    let mesh = Mesh::start_kube(cluster, &workloads, &["demo"])
        .await
        .unwrap();
    for (node, pod) in [
        ("node-a", "client"),
        ("node-a", "other"),
        ("node-b", "server"),
    ] {
        mesh.wait_enrolled(node, pod, true).await.unwrap();
    }
    let server = SocketAddr::new(mesh.cluster.pod("server").ip.into(), 8080).to_string();
    let echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    (mesh, server, echo)
}

/// Whether node-b counts exactly `n` objects refused.
async fn refused_objects(mesh: &Mesh, n: u32) -> bool {
    let line = format!("ztunnel_config_refused_objects {n}");
    mesh.metrics("node-b").await.lines().any(|l| l == line)
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_api_objects_are_refused_one_by_one_and_a_malformed_policy_opens_nothing() {
    let (mut mesh, server, _echo) = client_other_and_server().await;
    let served = |mesh: &Mesh, pod: &str, message: &str| {
        let out = probe(mesh, pod, &server, message);
        assert!(out.contains(&format!("reply=server:{message}")), "{out}");
    };
    mesh.api().apply_yaml(ALLOW_CLIENT);
    eventually(Duration::from_secs(15), "the ALLOW in force", || {
        refused_by_policy(&mesh, PROBE, "other", &server, "node-b", "none")
    })
    .await;
    served(&mesh, "client", "allowed");

    // Two pods the API server should never send: a field of the wrong JSON type,
    // and an address that is not one. Each is refused and named; the rest of
    // the mesh is served as before.
    mesh.api().apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "wrong-type", "namespace": "demo", "uid": "u-wrong-type"},
        "spec": {"serviceAccountName": "other", "nodeName": "node-b"},
        "status": {"phase": "Running", "podIP": 42}}));
    mesh.api().apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "not-an-ip", "namespace": "demo", "uid": "u-not-an-ip"},
        "spec": {"serviceAccountName": "other", "nodeName": "node-b"},
        "status": {"phase": "Running", "podIP": "10.0.0.300"}}));
    eventually(
        Duration::from_secs(15),
        "both pods counted as refused",
        || refused_objects(&mesh, 2),
    )
    .await;
    let log = mesh.log("node-b");
    assert!(
        log.contains(
            "Pod demo/wrong-type: not a valid object of its kind: status.podIP: invalid type: integer `42`"
        ),
        "the refusal names the pod and the field's path: {log}"
    );
    assert!(log.contains("Pod demo/not-an-ip: status.podIP"), "{log}");
    served(&mesh, "client", "beside-malformed-pods");

    // The policy updated with a field of the wrong type, naming `other` where a
    // list belongs: refused, counted, and in force fail closed. Its one rule is
    // unreadable, so the ALLOW allows nobody: never more than before.
    mesh.api().apply_yaml(&ALLOW_CLIENT.replace(
        "[cluster.local/ns/demo/sa/client]",
        "cluster.local/ns/demo/sa/other",
    ));
    eventually(
        Duration::from_secs(15),
        "the policy counted as refused",
        || refused_objects(&mesh, 3),
    )
    .await;
    let log = mesh.log("node-b");
    assert!(
        log.contains("AuthorizationPolicy demo/allow-client: spec.rules[0].from[0].source.principals: invalid type: string"),
        "the refusal names the policy and the field's path: {log}"
    );
    for pod in ["other", "client"] {
        assert!(
            refused_by_policy(&mesh, PROBE, pod, &server, "node-b", "none").await,
            "{pod} refused under the malformed ALLOW"
        );
    }

    // A tunnel starting now lists the malformed objects with the rest: it comes
    // up, serves the good ones and refuses the bad ones the same way.
    mesh.stop_tunnel("node-b").await.unwrap();
    mesh.start_tunnel("node-b").await.unwrap();
    mesh.wait_enrolled("node-b", "server", true).await.unwrap();
    eventually(
        Duration::from_secs(15),
        "the restarted tunnel counts all three",
        || refused_objects(&mesh, 3),
    )
    .await;
    assert!(
        refused_by_policy(&mesh, PROBE, "other", &server, "node-b", "none").await,
        "other refused after the restart"
    );

    // Fixed: followed at once, the watches alive through it all.
    mesh.api().apply_yaml(ALLOW_CLIENT);
    eventually(Duration::from_secs(15), "only the two pods refused", || {
        refused_objects(&mesh, 2)
    })
    .await;
    served(&mesh, "client", "fixed");
    assert!(
        refused_by_policy(&mesh, PROBE, "other", &server, "node-b", "none").await,
        "other still refused"
    );
}

const ALLOW_OTHER: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-other, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/other]}}]}]
";

/// The attack: while the tunnels' watches are down, a pod and the policy that let
/// `other` in are deleted, and the API server compacts its history, so no DELETED
/// is ever sent. Told their place is gone, the watches list again: both must go
/// from the tunnels' state (nothing the API server no longer has stays allowed),
/// and nothing else may move.
#[tokio::test(flavor = "multi_thread")]
async fn a_relist_after_missed_deletes_removes_the_pod_and_the_policy_and_nothing_else() {
    let (mesh, server, _echo) = client_other_and_server().await;
    let served = |pod: &str, message: &str| {
        let out = probe(&mesh, pod, &server, message);
        assert!(out.contains(&format!("reply=server:{message}")), "{out}");
    };
    mesh.api().apply_yaml(ALLOW_CLIENT);
    mesh.api().apply_yaml(ALLOW_OTHER);
    policy_on(&mesh, "node-b", "allow-other", true).await;
    served("client", "before");
    served("other", "before");
    let pod_lists = || {
        mesh.api()
            .calls()
            .iter()
            .filter(|c| c.verb == "list" && c.resource == "/pods")
            .count()
    };
    let listed = pod_lists();

    mesh.api().set_available(false);
    eventually(
        Duration::from_secs(15),
        "both tunnels count the outage",
        || on_every_node(&mesh, "ztunnel_config_source_errors_total", |n| n > 0.0),
    )
    .await;
    let client = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "client", "namespace": "demo"}});
    let client = mesh.api().get(&client).expect("the client pod");
    mesh.api().delete(&client);
    mesh.api()
        .delete(&serde_yaml::from_str(ALLOW_OTHER).unwrap());
    mesh.api().compact();
    mesh.api().set_available(true);

    // Listed again: the policy and the pod are gone.
    policy_on(&mesh, "node-b", "allow-other", false).await;
    for node in ["node-a", "node-b"] {
        eventually(
            Duration::from_secs(30),
            &format!("the deleted pod gone from {node}'s state"),
            || async {
                mesh.config_dump(node).await["workloads"]
                    .as_array()
                    .is_some_and(|ws| !ws.iter().any(|w| w["name"] == "client"))
            },
        )
        .await;
    }
    mesh.wait_enrolled("node-a", "client", false).await.unwrap();
    assert!(pod_lists() > listed, "the pods were listed again");
    assert!(
        refused_by_policy(&mesh, PROBE, "other", &server, "node-b", "none").await,
        "other is no longer allowed"
    );

    // Nothing else moved: the other policy, the other pods.
    policy_on(&mesh, "node-b", "allow-client", true).await;
    mesh.wait_enrolled("node-a", "other", true).await.unwrap();
    mesh.wait_enrolled("node-b", "server", true).await.unwrap();
    let dump = mesh.config_dump("node-b").await;
    let names: Vec<&str> = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert!(
        names.contains(&"other") && names.contains(&"server"),
        "{names:?}"
    );
}
