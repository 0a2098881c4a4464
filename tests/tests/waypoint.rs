//! A real waypoint on the testbed: L7 AuthorizationPolicy on HTTP requests.

use std::time::Duration;

use testbed::{
    app::HttpServer,
    mesh::{eventually, Mesh, WorkloadSpec},
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");
const VIP: &str = "10.96.0.80:80";

/// Service demo/server (10.96.0.80:80 → 8080) uses waypoint demo/waypoint.
const CONFIG: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.80
  selector: {app: server}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: public-gets, namespace: demo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
    to: [{operation: {methods: [GET], paths: ["/public/*", /health]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-blocked, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: server}]
  action: DENY
  rules:
  - when: [{key: "request.headers[x-block]", values: ["yes"]}]
"#;

async fn mesh() -> Mesh {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client"])
            .node("node-b", ["server", "waypoint"]),
    )
    .unwrap();
    let workloads = [
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("server", "demo", "server"),
        WorkloadSpec::new("waypoint", "demo", "waypoint")
            .label("gateway.networking.k8s.io/gateway-name", "waypoint"),
    ];
    let mut mesh = Mesh::start(cluster, &workloads, &["demo"]).await.unwrap();
    mesh.write_config("waypoint.yaml", CONFIG).unwrap();
    eventually(Duration::from_secs(5), "the config loaded", || async {
        mesh.config_dump("node-a").await["services"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    })
    .await;
    mesh.start_waypoint("waypoint", "demo", "waypoint")
        .await
        .unwrap();
    mesh
}

fn http(mesh: &Mesh, target: &str, method: &str, path: &str, headers: &[&str]) -> (String, String) {
    let mut args = vec!["http", target, method, path];
    args.extend(headers);
    let out = mesh.cluster.pod("client").run(PROBE, &args).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .to_owned()
    };
    (
        field("status"),
        if field("error").is_empty() {
            field("body")
        } else {
            field("error")
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_waypoint_allows_get_and_denies_post_by_a_methods_rule() {
    let mesh = mesh().await;
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    assert_eq!(
        http(&mesh, VIP, "GET", "/public/a", &[]),
        ("200".into(), "server GET /public/a".into())
    );
    assert_eq!(
        http(&mesh, VIP, "POST", "/public/a", &[]),
        ("403".into(), "RBAC: access denied".into())
    );
    eventually(
        Duration::from_secs(5),
        "istio_requests_total at the waypoint",
        || async {
            let page = mesh.waypoint_metrics("waypoint").await;
            page.lines().any(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("response_code=\"403\"")
                    && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"")
            }) && page.lines().any(|l| {
                l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\"")
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn path_prefix_and_header_conditions_decide_at_the_waypoint() {
    let mesh = mesh().await;
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    assert_eq!(http(&mesh, VIP, "GET", "/health", &[]).0, "200");
    assert_eq!(
        http(&mesh, VIP, "GET", "/private", &[]).0,
        "403",
        "no ALLOW rule matches /private"
    );
    assert_eq!(
        http(&mesh, VIP, "GET", "/public/b", &["x-block: yes"]).0,
        "403",
        "DENY on a header"
    );
    assert_eq!(
        http(&mesh, VIP, "GET", "/public/b", &["x-block: no"]).0,
        "200"
    );
    assert!(
        mesh.log("waypoint-waypoint").contains("request denied"),
        "{}",
        mesh.log("waypoint-waypoint")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_addressed_traffic_skips_a_service_waypoint() {
    // waypoint-for defaults to service: the pod's own address goes straight through
    // the tunnels, with L4 policy only.
    let mesh = mesh().await;
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let pod = format!("{}:8080", mesh.cluster.pod("server").ip);
    assert_eq!(http(&mesh, &pod, "POST", "/anything", &[]).0, "200");
}
