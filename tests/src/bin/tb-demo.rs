//! `cargo xtask demo`: the mesh on a two-node testbed, shown to a newcomer.
//!
//! Namespace `shop` is ambient (in the mesh), `legacy` is not. Every client talks to
//! every server; the tunnels' access logs then tell which flows went through the
//! mesh, with which identities, and how many bytes.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use testbed::{
    app::EchoServer,
    mesh::{Mesh, WorkloadSpec},
    Cluster, ClusterSpec,
};

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("the demo's directory")?.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build the workspace's binaries",
        path.display()
    );
    Ok(path)
}

#[tokio::main]
async fn main() -> Result<()> {
    let probe = sibling("tb-probe")?;
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["shop-client", "legacy-client"])
            .node("node-b", ["shop-server", "legacy-server"]),
    )?;
    println!("{cluster}");
    let workloads = [
        WorkloadSpec::new("shop-client", "shop", "client"),
        WorkloadSpec::new("shop-server", "shop", "server"),
        WorkloadSpec::new("legacy-client", "legacy", "default"),
        WorkloadSpec::new("legacy-server", "legacy", "default"),
    ];
    println!("namespaces: shop (istio.io/dataplane-mode=ambient), legacy (not in the mesh)");
    println!("starting the CA and a ztunnel on each node ...");
    let mesh = Mesh::start(cluster, &workloads, &["shop"]).await?;
    println!("ready: every shop pod is enrolled; legacy pods are untouched\n");

    let servers = ["shop-server", "legacy-server"]
        .iter()
        .map(|p| EchoServer::start(mesh.cluster.pod(p), 8080))
        .collect::<Result<Vec<_>>>()?;
    println!("{:<15} {:<15} REPLY", "FROM", "TO");
    for from in ["shop-client", "legacy-client"] {
        for to in ["shop-server", "legacy-server"] {
            let target = format!("{}:8080", mesh.cluster.pod(to).ip);
            let out = mesh
                .cluster
                .pod(from)
                .run(probe.to_str().unwrap(), ["connect", &target, "hello"])?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let reply = stdout
                .lines()
                .find_map(|l| l.strip_prefix("reply="))
                .unwrap_or("(no reply)");
            println!("{from:<15} {to:<15} {reply:?}");
        }
    }
    drop(servers);
    // Access-log lines are written as connections close: four flows touched a
    // tunnel, one of them two.
    let lines = || {
        ["node-a", "node-b"]
            .iter()
            .map(|n| mesh.log(n).matches(" access: ").count())
            .sum::<usize>()
    };
    testbed::mesh::eventually(Duration::from_secs(10), "the access logs", || async {
        lines() >= 4
    })
    .await;

    println!("\nwhat the tunnels saw (their access logs):");
    for node in ["node-a", "node-b"] {
        for line in mesh.log(node).lines().filter(|l| l.contains(" access: ")) {
            let field = |name: &str| -> String {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(&format!("{name}=")))
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_owned()
            };
            let path = if field("mtls") == "true" {
                "HBONE, mutual TLS"
            } else {
                "plaintext"
            };
            let identity = |s: String| if s.is_empty() { "(none)".to_owned() } else { s };
            println!(
                "  {node} as {:<11} {} -> {}  [{path}]\n      identities: {} -> {}\n      bytes: {} in, {} out",
                field("reporter"),
                field("src.workload"),
                field("dst.workload"),
                identity(field("src.identity")),
                identity(field("dst.identity")),
                field("bytes_received"),
                field("bytes_sent"),
            );
        }
    }
    println!("\n(legacy-client -> legacy-server never touched a tunnel: nothing to log)");

    println!("\nnode-b's metrics (http://<node>:15020/metrics), an excerpt:");
    for line in mesh
        .metrics("node-b")
        .await
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
    {
        println!("  {line}");
    }
    Ok(())
}
