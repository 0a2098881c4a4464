//! Original source: the application in the destination pod sees the client pod's
//! address as its peer, with no iptables (policy routing the tunnel sets in the
//! pod's namespace, see ztunnel/src/orig_src.rs), and that routing comes and goes
//! with the pod's enrollment.

use std::time::Duration;

use testbed::{
    app::{EchoServer, HttpServer},
    mesh::{eventually, metric, namespace_yaml, ztunnel_binary, Mesh, WorkloadSpec},
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");
/// `ORIG_SRC_MARK`, its table and its rule priority (ztunnel-ebpf/common).
const RULE: &str = "1338:\tfrom all fwmark 0x53a lookup 1338";

/// node-a: client, local-server; node-b: server, solo and gone (namespaces "solo"
/// and "away", ambient), plain (namespace "plain", not ambient).
async fn mesh() -> Mesh {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client", "local-server"])
            .node("node-b", ["server", "solo", "gone", "plain"]),
    )
    .unwrap();
    let workloads = [
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("local-server", "demo", "local"),
        WorkloadSpec::new("server", "demo", "server").label("app", "server"),
        WorkloadSpec::new("solo", "solo", "default"),
        WorkloadSpec::new("gone", "away", "default"),
        WorkloadSpec::new("plain", "plain", "default"),
    ];
    Mesh::start(cluster, &workloads, &["demo", "solo", "away"])
        .await
        .unwrap()
}

fn probe(mesh: &Mesh, pod: &str, args: &[&str]) -> String {
    mesh.output(pod, PROBE, args)
}

/// The lines of `ip rule` in the pod that are the tunnel's.
fn rules(mesh: &Mesh, pod: &str) -> Vec<String> {
    mesh.output(pod, "ip", &["rule", "show"])
        .lines()
        .filter(|l| l.contains("0x53a"))
        .map(str::to_owned)
        .collect()
}

fn table(mesh: &Mesh, pod: &str) -> String {
    mesh.output(pod, "ip", &["route", "show", "table", "1338"])
}

#[tokio::test(flavor = "multi_thread")]
async fn the_application_sees_the_client_pod_as_its_peer() {
    let mesh = mesh().await;
    let client_ip = mesh.cluster.pod("client").ip;
    let server = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let local = EchoServer::start(mesh.cluster.pod("local-server"), 8080).unwrap();

    // HBONE across nodes, HBONE on one node, plaintext from a pod outside the mesh
    // (PERMISSIVE).
    let out = probe(
        &mesh,
        "client",
        &["connect", &mesh.addr("server", 8080), "far"],
    );
    assert!(out.contains("reply=server:far"), "{out}");
    let out = probe(
        &mesh,
        "client",
        &["connect", &mesh.addr("local-server", 8080), "near"],
    );
    assert!(out.contains("reply=local-server:near"), "{out}");
    let out = probe(
        &mesh,
        "plain",
        &["connect", &mesh.addr("server", 8080), "clear"],
    );
    assert!(out.contains("reply=server:clear"), "{out}");
    // Many at once: each from the client's address, none colliding.
    let out = probe(
        &mesh,
        "client",
        &["parallel", &mesh.addr("server", 8080), "40", "many"],
    );
    assert!(out.contains("ok=40"), "{out}");
    // A long transfer with half-close, both ways, every byte.
    let out = probe(
        &mesh,
        "client",
        &["bulk", &mesh.addr("server", 8080), "8000000"],
    );
    assert!(out.contains("ok sent=8000000 received=8000000"), "{out}");

    let peers = server.stop().unwrap();
    assert_eq!(peers.len(), 43, "{peers:?}");
    assert_eq!(peers[0].ip(), client_ip, "across nodes");
    assert_eq!(peers[1].ip(), mesh.cluster.pod("plain").ip, "plaintext");
    assert!(peers[2..].iter().all(|p| p.ip() == client_ip), "{peers:?}");
    assert_eq!(local.stop().unwrap()[0].ip(), client_ip, "on one node");

    // The routing that brings the replies back: set once in each enrolled pod.
    for pod in ["server", "local-server", "client", "solo"] {
        assert_eq!(rules(&mesh, pod), [RULE], "{pod}");
        let table = table(&mesh, pod);
        assert!(table.contains("local default dev lo"), "{pod}: {table}");
        let accept = mesh.output(pod, "cat", &["/proc/sys/net/ipv4/tcp_fwmark_accept"]);
        assert_eq!(accept.trim(), "1", "{pod}");
    }
    assert!(
        rules(&mesh, "plain").is_empty(),
        "an unenrolled pod is untouched"
    );
    for node in ["node-a", "node-b"] {
        let page = mesh.metrics(node).await;
        assert_eq!(
            metric(&page, "ztunnel_original_source_fallbacks_total", &[]),
            0.0,
            "{node}: {page}"
        );
    }
}

const ALLOW_CLIENT_IP: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-from-client-ip, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from: [{source: {ipBlocks: [CLIENT/32]}}]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_source_ip_policy_at_the_destination_still_decides() {
    let mesh = mesh().await;
    let client_ip = mesh.cluster.pod("client").ip;
    mesh.write_config(
        "policy.yaml",
        &ALLOW_CLIENT_IP.replace("CLIENT", &client_ip.to_string()),
    )
    .unwrap();
    eventually(Duration::from_secs(15), "the policy in force", || async {
        mesh.config_dump("node-b").await["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == "server-from-client-ip"))
    })
    .await;
    let echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let target = mesh.addr("server", 8080);
    let out = probe(&mesh, "client", &["connect", &target, "mine"]);
    assert!(out.contains("reply=server:mine"), "{out}");
    // Another mesh pod (HBONE) and a plaintext pod: not that address, denied.
    for pod in ["local-server", "plain"] {
        let out = probe(&mesh, pod, &["connect", &target, "other"]);
        assert!(
            testbed::mesh::refused_after_connect(&out),
            "{pod}: not refused: {out}"
        );
    }
    let peers = echo.stop().unwrap();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].ip(), client_ip);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_routing_is_set_once_across_restarts_and_leaves_with_the_pod() {
    let mut mesh = mesh().await;
    let client_ip = mesh.cluster.pod("client").ip;
    assert_eq!(rules(&mesh, "solo"), [RULE]);
    // Restarted (twice), the tunnel finds its rule in place: still exactly one.
    for _ in 0..2 {
        assert!(mesh.stop_tunnel("node-b").await.unwrap().success());
        mesh.start_tunnel("node-b").await.unwrap();
        mesh.wait_enrolled("node-b", "solo", true).await.unwrap();
    }
    assert_eq!(rules(&mesh, "solo"), [RULE]);
    let echo = EchoServer::start(mesh.cluster.pod("solo"), 8080).unwrap();
    let out = probe(
        &mesh,
        "client",
        &["connect", &mesh.addr("solo", 8080), "again"],
    );
    assert!(out.contains("reply=solo:again"), "{out}");
    assert_eq!(echo.stop().unwrap()[0].ip(), client_ip);

    // The pod leaves the mesh: its rule and table go with it.
    mesh.write_config("ns-solo.yaml", &namespace_yaml("solo", false))
        .unwrap();
    mesh.wait_enrolled("node-b", "solo", false).await.unwrap();
    assert!(rules(&mesh, "solo").is_empty());
    assert_eq!(table(&mesh, "solo").trim(), "");
    assert_eq!(rules(&mesh, "server"), [RULE], "other pods keep theirs");

    // One leaves while the tunnel is away: released when it is back, its routing too.
    assert!(mesh.stop_tunnel("node-b").await.unwrap().success());
    mesh.write_config("ns-away.yaml", &namespace_yaml("away", false))
        .unwrap();
    mesh.start_tunnel("node-b").await.unwrap();
    eventually(Duration::from_secs(15), "gone's rule removed", || async {
        rules(&mesh, "gone").is_empty()
    })
    .await;
    assert_eq!(table(&mesh, "gone").trim(), "");
    assert_eq!(rules(&mesh, "server"), [RULE]);

    // `ztunnel uninstall` removes it from every pod the tunnel enrolled.
    assert!(mesh.stop_tunnel("node-b").await.unwrap().success());
    let node = mesh.cluster.node("node-b");
    let out = node
        .command(ztunnel_binary())
        .unwrap()
        .arg("uninstall")
        .arg("--pin-dir")
        .arg(node.bpffs.join("ztunnel"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("removed the original-source routing from 1 pods"),
        "{text}"
    );
    assert!(rules(&mesh, "server").is_empty());
    assert_eq!(table(&mesh, "server").trim(), "");
    assert_eq!(
        rules(&mesh, "client"),
        [RULE],
        "another node's pods are not this uninstall's"
    );
}

/// Through a waypoint, as with Istio's ztunnel, the application sees the original
/// client (which the waypoint forwards for), not the waypoint.
#[tokio::test(flavor = "multi_thread")]
async fn through_a_waypoint_the_application_sees_the_original_client() {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client"])
            .node("node-b", ["server", "waypoint"]),
    )
    .unwrap();
    let workloads = [
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("server", "demo", "server").label("app", "server"),
        WorkloadSpec::new("waypoint", "demo", "waypoint")
            .label("gateway.networking.k8s.io/gateway-name", "waypoint"),
    ];
    let mut mesh = Mesh::start(cluster, &workloads, &["demo"]).await.unwrap();
    mesh.write_config("waypoint.yaml", testbed::mesh::WAYPOINT_FOR_SERVER)
        .unwrap();
    eventually(Duration::from_secs(15), "the service known", || async {
        mesh.config_dump("node-a").await["services"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    })
    .await;
    mesh.start_waypoint("waypoint", "demo", "waypoint")
        .await
        .unwrap();
    let server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let out = probe(&mesh, "client", &["http", "10.96.0.80:80", "GET", "/x"]);
    assert!(out.contains("status=200"), "{out}");
    assert_eq!(
        server.requests(),
        ["GET /x"],
        "it went through the waypoint"
    );
    let peers = server.stop().unwrap();
    assert!(!peers.is_empty());
    assert!(
        peers
            .iter()
            .all(|p| p.ip() == mesh.cluster.pod("client").ip),
        "{peers:?}"
    );
}

/// An HBONE client whose address is not its identity's and that names no address
/// it acts for: the client's address is unknown, so the application sees the pod's
/// own (as before), logged once and counted; the connection still works.
#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_client_address_falls_back_to_the_pods_own_and_is_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = mesh().await;
    let server = mesh.cluster.pod("server");
    let echo = EchoServer::start(server, 8080).unwrap();
    let now = time::OffsetDateTime::now_utc();
    // The client's identity, presented from the plain pod's address.
    let cert = std::sync::Arc::new(
        mesh.ca
            .forge(
                "spiffe://cluster.local/ns/demo/sa/client",
                now - time::Duration::minutes(1),
                now + time::Duration::hours(1),
            )
            .unwrap(),
    );
    let server_id: ztunnel::identity::Identity =
        "spiffe://cluster.local/ns/demo/sa/server".parse().unwrap();
    let hbone = std::net::SocketAddr::new(server.ip.into(), 15008);
    let app = std::net::SocketAddr::new(server.ip.into(), 8080);
    let reply = mesh
        .cluster
        .pod("plain")
        .spawn_task(move || async move {
            let pool = ztunnel::proxy::pool::Pool::new(Default::default());
            let mut replies = Vec::new();
            for _ in 0..2 {
                let (mut io, _guard) = pool
                    .connect(&cert, &server_id, hbone, app, http::HeaderMap::new())
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                io.write_all(b"who").await.map_err(|e| e.to_string())?;
                io.shutdown().await.map_err(|e| e.to_string())?;
                let mut reply = Vec::new();
                tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut reply))
                    .await
                    .map_err(|_| "no reply".to_owned())?
                    .map_err(|e| e.to_string())?;
                replies.push(String::from_utf8_lossy(&reply).into_owned());
            }
            Ok::<_, String>(replies)
        })
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(reply, ["server:who", "server:who"]);
    let peers = echo.stop().unwrap();
    assert_eq!(peers.len(), 2);
    assert!(peers.iter().all(|p| p.ip() == server.ip), "{peers:?}");
    eventually(Duration::from_secs(15), "the fallbacks counted", || async {
        let page = mesh.metrics("node-b").await;
        metric(
            &page,
            "ztunnel_original_source_fallbacks_total",
            &["reason=\"source_unknown\""],
        ) == 2.0
    })
    .await;
    let log = mesh.log("node-b");
    assert_eq!(
        log.matches("original source: delivering from the pod's own address")
            .count(),
        1,
        "logged once: {log}"
    );
}
