//! `cargo xtask bench dns`: the DNS proxy in one run. From an enrolled pod, 8
//! sockets each asking in turn:
//! - a mesh name (a Service), answered by the proxy from the state;
//! - a forwarded name asked again and again (the proxy's cache answers);
//! - forwarded names all different (each one goes to the upstream);
//!
//! and, for comparison, the same kind of all-different names sent straight to the
//! upstream from a pod outside the mesh. Queries per second, p50 and p99, medians
//! of 3 rounds; the ratios are what compare (the machine is shared).

use anyhow::{Context, Result};
use testbed::{
    dns::{start_upstream, CLUSTER_DNS},
    mesh::{Mesh, WorkloadSpec},
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");
const QUERIES: usize = 20_000;
const CONCURRENCY: &str = "8";
const ROUNDS: usize = 3;

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: server, namespace: bench}
spec:
  clusterIP: 10.96.0.90
  selector: {app: server}
  ports: [{port: 80}]
";

fn value(out: &str, key: &str) -> Result<f64> {
    out.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .with_context(|| format!("no {key} in {out:?}"))?
        .parse()
        .context("a number")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[derive(Default)]
struct Figures {
    rate: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    failed: f64,
}

impl Figures {
    fn add(&mut self, out: &str) -> Result<()> {
        self.rate.push(value(out, "rate")?);
        self.p50.push(value(out, "p50_us")?);
        self.p99.push(value(out, "p99_us")?);
        self.failed += value(out, "failed")?;
        Ok(())
    }

    fn medians(&self) -> (f64, f64, f64) {
        (
            median(self.rate.clone()),
            median(self.p50.clone()),
            median(self.p99.clone()),
        )
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cluster =
        Cluster::new(&ClusterSpec::new().node("node-a", ["client", "plain", "upstream"]))?;
    let workloads = [WorkloadSpec::new("client", "bench", "client")];
    let mut mesh = Mesh::start(cluster, &workloads, &["bench"]).await?;
    mesh.write_config("service.yaml", SERVICE)?;
    let upstream = start_upstream(mesh.cluster.pod("upstream"))?;
    let upstream_addr = format!("{}:53", mesh.cluster.pod("upstream").ip);
    mesh.kill_tunnel("node-a");
    mesh.tunnel_args.insert(
        "node-a".into(),
        vec!["--dns-upstream".into(), upstream_addr.clone()],
    );
    mesh.start_tunnel("node-a").await?;
    let proxy = format!("{CLUSTER_DNS}:53");
    let mesh_name = "server.bench.svc.cluster.local.";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !mesh
        .output("client", PROBE, &["dnsquery", &proxy, mesh_name])
        .contains("a=10.96.0.90")
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the Service never answered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let n = QUERIES.to_string();
    let bench = |pod: &str, server: &str, name: &str| {
        mesh.output(pod, PROBE, &["dnsbench", server, &n, name, CONCURRENCY])
    };
    let (mut from_mesh, mut cached, mut forwarded, mut direct) = Default::default();
    for round in 0..ROUNDS {
        Figures::add(&mut from_mesh, &bench("client", &proxy, mesh_name))?;
        Figures::add(&mut cached, &bench("client", &proxy, "www.test."))?;
        let fresh = format!("r{round}-{{i}}.fwd.test.");
        Figures::add(&mut forwarded, &bench("client", &proxy, &fresh))?;
        let fresh = format!("r{round}-{{i}}.direct.test.");
        Figures::add(&mut direct, &bench("plain", &upstream_addr, &fresh))?;
    }
    let rows: [(&str, &Figures); 4] = [
        ("mesh name, answered by the proxy", &from_mesh),
        ("forwarded, answered from the cache", &cached),
        ("forwarded, each name new (upstream)", &forwarded),
        ("straight to the upstream (no mesh)", &direct),
    ];
    println!("DNS: {QUERIES} A queries per run, {CONCURRENCY} sockets, median of {ROUNDS} rounds");
    println!(
        "{:<40} {:>10} {:>9} {:>9} {:>7}",
        "", "queries/s", "p50 µs", "p99 µs", "failed"
    );
    for (label, figures) in rows {
        let (rate, p50, p99) = figures.medians();
        println!(
            "{label:<40} {rate:>10.0} {p50:>9.0} {p99:>9.0} {:>7.0}",
            figures.failed
        );
    }
    let direct_rate = direct.medians().0;
    println!(
        "ratios to straight-to-upstream queries/s: mesh name {:.2}, forwarded (new names) {:.2}, cached {:.2}",
        from_mesh.medians().0 / direct_rate,
        forwarded.medians().0 / direct_rate,
        cached.medians().0 / direct_rate,
    );
    println!(
        "upstream saw {} UDP and {} TCP queries",
        upstream.udp.load(std::sync::atomic::Ordering::SeqCst),
        upstream.tcp.load(std::sync::atomic::Ordering::SeqCst)
    );
    drop(mesh);
    Ok(())
}
