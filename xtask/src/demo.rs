//! `cargo xtask demo`: builds a testbed cluster and shows pods talking across it.

use std::{net::SocketAddr, path::Path};

use anyhow::{Context, Result};
use testbed::{app, Cluster, ClusterSpec};

const APP_PORT: u16 = 8080;

pub fn run(spec_path: &Path) -> Result<()> {
    let spec = ClusterSpec::from_file(spec_path)?;
    let cluster = Cluster::new(&spec)?;
    println!("{cluster}");

    let servers = cluster
        .pods()
        .iter()
        .map(|pod| app::EchoServer::start(pod, APP_PORT))
        .collect::<Result<Vec<_>>>()?;
    println!("every pod runs an echo server on port {APP_PORT}\n");

    for from in cluster.pods() {
        for to in cluster.pods().iter().filter(|to| to.name != from.name) {
            let target = SocketAddr::new(to.ip.into(), APP_PORT);
            let message = format!("hello from {}", from.name);
            let reply = from
                .spawn_task(move || async move { app::exchange(target, &message).await })?
                .join()
                .map_err(|_| anyhow::anyhow!("client task panicked"))?
                .with_context(|| format!("{} -> {}", from.name, to.name))?;
            let path = if from.node == to.node {
                "same node"
            } else {
                "across nodes"
            };
            println!(
                "  {:<10} -> {:<10} {:<12} reply {reply:?}",
                from.name, to.name, path
            );
        }
    }
    drop(servers);
    let prefix = cluster.prefix().to_owned();
    cluster.cleanup()?;
    println!("\ncluster {prefix} removed");
    println!("(the mesh is not in the demo yet: this is the plain testbed network it runs on)");
    Ok(())
}
