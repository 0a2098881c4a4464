//! `cargo xtask bench waypoint`: HTTP requests through a waypoint versus the same
//! pods through the mesh without it (pod-addressed traffic skips a service
//! waypoint), in one run: requests per second and p99 latency, one keep-alive
//! connection, sequential requests.

use anyhow::{Context, Result};
use testbed::{
    app::HttpServer,
    mesh::{Mesh, WorkloadSpec},
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");
const REQUESTS: &str = "5000";
const ROUNDS: usize = 3;

const CONFIG: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bench}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: bench, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.80
  selector: {app: server}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gets, namespace: bench}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules: [{to: [{operation: {methods: [GET], paths: ["/public/*"]}}]}]
"#;

fn value(out: &str, key: &str) -> Result<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .with_context(|| format!("no {key} in {out:?}"))?
        .trim()
        .parse()
        .context("a number")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client"])
            .node("node-b", ["server", "waypoint"]),
    )?;
    let workloads = [
        WorkloadSpec::new("client", "bench", "client"),
        WorkloadSpec::new("server", "bench", "server"),
        WorkloadSpec::new("waypoint", "bench", "waypoint")
            .label("gateway.networking.k8s.io/gateway-name", "waypoint"),
    ];
    let mut mesh = Mesh::start(cluster, &workloads, &["bench"]).await?;
    mesh.write_config("waypoint.yaml", CONFIG)?;
    testbed::mesh::eventually(
        std::time::Duration::from_secs(5),
        "the config loaded",
        || async {
            mesh.config_dump("node-a").await["services"]
                .as_array()
                .is_some_and(|s| !s.is_empty())
        },
    )
    .await;
    mesh.start_waypoint("waypoint", "bench", "waypoint").await?;
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080)?;
    let direct = format!("{}:8080", mesh.cluster.pod("server").ip);
    let (mut w_rps, mut w_p99, mut m_rps, mut m_p99) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        for (via, target) in [("waypoint", "10.96.0.80:80"), ("mesh", direct.as_str())] {
            let out = mesh
                .cluster
                .pod("client")
                .run(PROBE, ["httpload", target, REQUESTS])?;
            let out = String::from_utf8_lossy(&out.stdout).into_owned();
            let (rps, p99) = (value(&out, "per_second")?, value(&out, "p99_us")?);
            if via == "waypoint" {
                w_rps.push(rps);
                w_p99.push(p99);
            } else {
                m_rps.push(rps);
                m_p99.push(p99);
            }
        }
    }
    let (w, m) = (median(w_rps), median(m_rps));
    let (wp, mp) = (median(w_p99), median(m_p99));
    println!("waypoint/rps      through the waypoint {w:.0}/s, mesh without it {m:.0}/s: ratio {:.2} (one keep-alive connection, {REQUESTS} GETs, median of {ROUNDS})", w / m);
    println!("waypoint/p99      through the waypoint {wp:.0} µs, mesh without it {mp:.0} µs: ratio {:.2}", wp / mp);
    Ok(())
}
