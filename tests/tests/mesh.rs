//! The mesh end to end: `ztunnel run` on every testbed node, the CA, real pods.

use std::{net::SocketAddr, time::Duration};

use testbed::{
    app::EchoServer,
    mesh::{eventually, Mesh, WorkloadSpec},
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");

/// node-a: client, local-server; node-b: server, server-2, plain (namespace "plain",
/// not ambient).
async fn mesh() -> Mesh {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client", "local-server"])
            .node("node-b", ["server", "server-2", "plain"]),
    )
    .unwrap();
    let workloads = [
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("local-server", "demo", "server").label("app", "server"),
        WorkloadSpec::new("server", "demo", "server"),
        WorkloadSpec::new("server-2", "demo", "server").label("app", "server"),
        WorkloadSpec::new("plain", "plain", "default"),
    ];
    Mesh::start(cluster, &workloads, &["demo"]).await.unwrap()
}

fn probe(mesh: &Mesh, pod: &str, args: &[&str]) -> String {
    let out = mesh.cluster.pod(pod).run(PROBE, args).unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn addr(mesh: &Mesh, pod: &str, port: u16) -> String {
    SocketAddr::new(mesh.cluster.pod(pod).ip.into(), port).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_talk_across_nodes_through_the_mesh_with_their_identities() {
    let mesh = mesh().await;
    let server = mesh.cluster.pod("server");
    let echo = EchoServer::start(server, 8080).unwrap();

    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 8080), "hello"],
    );
    assert!(out.contains("reply=server:hello"), "{out}");
    // The application was reached by its node's tunnel, from inside the pod.
    let peers = echo.stop().unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].ip(), server.ip);

    // Counted on both sides with Istio's names and labels (at close: wait for it).
    eventually(Duration::from_secs(5), "source metrics", || async {
        mesh.metrics("node-a").await.lines().any(|l| {
            l.starts_with("istio_tcp_connections_closed_total{")
                && l.contains("reporter=\"source\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"")
                && l.contains("destination_principal=\"spiffe://cluster.local/ns/demo/sa/server\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
        })
    })
    .await;
    eventually(Duration::from_secs(5), "destination metrics", || async {
        mesh.metrics("node-b").await.lines().any(|l| {
            l.starts_with("istio_tcp_received_bytes_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_workload=\"client\"")
                && l.ends_with(" 5")
        })
    })
    .await;
    eventually(Duration::from_secs(5), "an access-log line", || async {
        mesh.log("node-b")
            .contains("src.identity=spiffe://cluster.local/ns/demo/sa/client")
    })
    .await;
}
