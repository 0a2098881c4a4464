//! `cargo xtask bench waypoint`: HTTP requests through a waypoint versus the same
//! pods through the mesh without it (pod-addressed traffic skips a service
//! waypoint), in one run: over HTTP/1.1 (one keep-alive connection per client)
//! and HTTP/2 (one connection, a stream per client), with 1 and 64 clients at
//! once: requests per second, p50 and p99 latency, and the issue's goal beside
//! the measured figure (reported, not asserted: the machine is shared).

use anyhow::{Context, Result};
use testbed::{
    l7::L7Server,
    mesh::{Mesh, WorkloadSpec},
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");
/// Requests per run; WAYPOINT_BENCH_REQUESTS overrides it (longer runs to profile).
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
  ports: [{port: 80, targetPort: 9000}]
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

/// Medians over the rounds of one path's runs.
#[derive(Default)]
struct Figures {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

impl Figures {
    fn add(&mut self, out: &str) -> Result<()> {
        self.rps.push(value(out, "per_second")?);
        self.p50.push(value(out, "p50_us")?);
        self.p99.push(value(out, "p99_us")?);
        Ok(())
    }

    fn medians(self) -> (f64, f64, f64) {
        (median(self.rps), median(self.p50), median(self.p99))
    }
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
    let _server = L7Server::start(mesh.cluster.pod("server"), 9000)?;
    let direct = format!("{}:9000", mesh.cluster.pod("server").ip);
    let requests = std::env::var("WAYPOINT_BENCH_REQUESTS").unwrap_or(REQUESTS.into());
    println!("waypoint/setup    {requests} GETs per run, median of {ROUNDS} runs alternating the paths; goal: through the waypoint >= 0.7x the mesh's requests/s at 64 clients, <= 1 ms added p99");
    // WAYPOINT_BENCH_ONLY=h2/c64,...: only those cases (quicker profiling runs).
    let only = std::env::var("WAYPOINT_BENCH_ONLY").unwrap_or_default();
    for version in ["h1", "h2"] {
        for clients in ["1", "64"] {
            if !only.is_empty()
                && !only
                    .split(',')
                    .any(|c| c == format!("{version}/c{clients}"))
            {
                continue;
            }
            let (mut waypoint, mut meshed) = (Figures::default(), Figures::default());
            for _ in 0..ROUNDS {
                for (figures, target) in [
                    (&mut waypoint, "10.96.0.80:80"),
                    (&mut meshed, direct.as_str()),
                ] {
                    let out = mesh
                        .cluster
                        .pod("client")
                        .run(PROBE, ["httpbench", target, version, clients, &requests])?;
                    let out = String::from_utf8_lossy(&out.stdout).into_owned();
                    figures
                        .add(&out)
                        .with_context(|| format!("{version} c={clients} to {target}"))?;
                }
            }
            let ((w, w50, w99), (m, m50, m99)) = (waypoint.medians(), meshed.medians());
            let name = match version {
                "h1" => "HTTP/1.1",
                _ => "HTTP/2",
            };
            let goal = match clients {
                "64" => format!(
                    " (goal >= 0.70: {})",
                    if w / m >= 0.7 { "met" } else { "missed" }
                ),
                _ => String::new(),
            };
            println!("waypoint/{version}/c{clients:<2}  {name}, {clients} at once: waypoint {w:.0}/s, mesh {m:.0}/s: ratio {:.2}{goal}", w / m);
            let added = (w99 - m99) / 1000.0;
            println!("waypoint/{version}/c{clients:<2}  p50 waypoint {w50:.0} µs, mesh {m50:.0} µs: ratio {:.2}; p99 waypoint {w99:.0} µs, mesh {m99:.0} µs: ratio {:.2}, added {added:.2} ms (goal <= 1 ms: {})", w50 / m50, w99 / m99, if added <= 1.0 { "met" } else { "missed" });
        }
    }
    Ok(())
}
