//! `cargo xtask bench waypoint`: HTTP requests through a waypoint versus the same
//! pods through the mesh without it (pod-addressed traffic skips a service
//! waypoint), in one run: over HTTP/1.1 (one keep-alive connection per client)
//! and HTTP/2 (one connection, a stream per client), with 1 and 64 clients at
//! once (closed loop: each client sends its next GET when the last is done):
//! requests per second, p50 and p99 latency, the waypoint's CPU per request, and
//! the issue's goal beside the measured figure (reported, not asserted: the
//! machine is shared). Each round runs for a fixed time, the two paths
//! alternating; figures are medians of the rounds.
//!
//! At 64 clients both paths saturate the machine's cores, so a closed loop's
//! latency is mostly queueing (Little's law: mean latency = 64 / rate); what the
//! rates predict is printed beside it. A proxy's own added latency shows when it
//! is not saturated: an open-loop run at a fixed rate (half the waypoint's
//! closed-loop capacity, the same for both paths) reports that too.

use anyhow::{Context, Result};
use testbed::{
    host::cpu_seconds,
    l7::L7Server,
    mesh::{Mesh, WorkloadSpec},
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");
/// How long each round runs (`<ms>ms`; or `<n>` GETs); WAYPOINT_BENCH_RUN
/// overrides it (longer runs to profile).
const RUN: &str = "2000ms";
/// The open loop's rounds, each this long.
const OPEN_LOOP_MS: &str = "2000";
const ROUNDS: usize = 3;
/// The open loop's rate: this share of the waypoint's closed-loop rate at 64.
const OPEN_LOOP_LOAD: f64 = 0.5;

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
apiVersion: v1
kind: Service
metadata: {name: server-tcp, namespace: bench, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.81
  selector: {app: server}
  ports: [{name: tcp-web, port: 80, targetPort: 9000}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: any-connection, namespace: bench}
spec:
  targetRefs: [{kind: Service, group: "", name: server-tcp}]
  rules: [{}]
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
    /// The waypoint's CPU (user + system) per request, µs.
    cpu_us: Vec<f64>,
}

struct Medians {
    rps: f64,
    p50: f64,
    p99: f64,
    cpu_us: Option<f64>,
}

impl Figures {
    fn add(&mut self, out: &str) -> Result<()> {
        self.rps.push(value(out, "per_second")?);
        self.p50.push(value(out, "p50_us")?);
        self.p99.push(value(out, "p99_us")?);
        Ok(())
    }

    fn medians(self) -> Medians {
        Medians {
            rps: median(self.rps),
            p50: median(self.p50),
            p99: median(self.p99),
            cpu_us: (!self.cpu_us.is_empty()).then(|| median(self.cpu_us)),
        }
    }
}

/// The Service through the waypoint as HTTP (L7 policy), and the same pods'
/// Service whose port is declared `tcp`: the waypoint relays its bytes.
const VIA_WAYPOINT: &str = "10.96.0.80:80";
const VIA_WAYPOINT_L4: &str = "10.96.0.81:80";

/// One bench's run from the client pod to each path (`via` the waypoint, and
/// `direct`), `ROUNDS` times alternating: the waypoint's figures (with its CPU
/// per request), the mesh's.
fn rounds(
    mesh: &Mesh,
    waypoint_pid: u32,
    via: &str,
    direct: &str,
    args: &[&str],
    case: &str,
) -> Result<(Medians, Medians)> {
    let (mut waypoint, mut meshed) = (Figures::default(), Figures::default());
    for _ in 0..ROUNDS {
        for (through_waypoint, target) in [(true, via), (false, direct)] {
            let cpu_before = cpu_seconds(waypoint_pid)?;
            let out = mesh
                .cluster
                .pod("client")
                .run(PROBE, [args[0], target].iter().chain(&args[1..]))?;
            let cpu = cpu_seconds(waypoint_pid)? - cpu_before;
            let out = String::from_utf8_lossy(&out.stdout).into_owned();
            let figures = match through_waypoint {
                true => &mut waypoint,
                false => &mut meshed,
            };
            figures
                .add(&out)
                .with_context(|| format!("{case} to {target}"))?;
            if through_waypoint {
                let requests = value(&out, "requests")? + value(&out, "warmup")?;
                figures.cpu_us.push(cpu * 1e6 / requests);
            }
        }
    }
    Ok((waypoint.medians(), meshed.medians()))
}

fn met(yes: bool) -> &'static str {
    if yes {
        "met"
    } else {
        "missed"
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
    let waypoint_pid = mesh
        .tunnel_pid("waypoint-waypoint")
        .context("the waypoint's process")?;
    let _server = L7Server::start(mesh.cluster.pod("server"), 9000)?;
    let direct = format!("{}:9000", mesh.cluster.pod("server").ip);
    let run = std::env::var("WAYPOINT_BENCH_RUN").unwrap_or(RUN.into());
    println!("waypoint/setup    GETs for {run} per round, median of {ROUNDS} rounds alternating the paths; goal: through the waypoint >= 0.7x the mesh's requests/s at 64 clients, <= 1 ms added p99");
    // WAYPOINT_BENCH_ONLY=h2/c64,...: only those cases (quicker profiling runs);
    // h2/open: the open loop at 64; h2/l4: the waypoint relaying bytes at 64.
    let only = std::env::var("WAYPOINT_BENCH_ONLY").unwrap_or_default();
    let wanted = |case: &str| only.is_empty() || only.split(',').any(|c| c == case);
    for version in ["h1", "h2"] {
        let name = match version {
            "h1" => "HTTP/1.1",
            _ => "HTTP/2",
        };
        for clients in ["1", "64"] {
            let case = format!("{version}/c{clients}");
            if !wanted(&case) {
                continue;
            }
            let (w, m) = rounds(
                &mesh,
                waypoint_pid,
                VIA_WAYPOINT,
                &direct,
                &["httpbench", version, clients, &run],
                &case,
            )?;
            let goal = match clients {
                "64" => format!(" (goal >= 0.70: {})", met(w.rps / m.rps >= 0.7)),
                _ => String::new(),
            };
            println!("waypoint/{case:<6}  {name}, {clients} at once: waypoint {:.0}/s, mesh {:.0}/s: ratio {:.2}{goal}; waypoint CPU {:.1} µs/request", w.rps, m.rps, w.rps / m.rps, w.cpu_us.unwrap_or_default());
            let (added50, added) = ((w.p50 - m.p50) / 1000.0, (w.p99 - m.p99) / 1000.0);
            println!("waypoint/{case:<6}  p50 waypoint {:.0} µs, mesh {:.0} µs: ratio {:.2}, added {added50:.2} ms; p99 waypoint {:.0} µs, mesh {:.0} µs: ratio {:.2}, added {added:.2} ms (goal <= 1 ms: {})", w.p50, m.p50, w.p50 / m.p50, w.p99, m.p99, w.p99 / m.p99, met(added <= 1.0));
            if clients != "64" {
                continue;
            }
            // Saturated, closed loop: latency is queueing behind the other
            // clients, 64 / rate on average, whatever the proxy adds itself.
            let queueing = 64.0 / w.rps - 64.0 / m.rps;
            println!("waypoint/{case:<6}  saturated: Little's law predicts {:.2} ms added mean latency from the rates alone (64/waypoint - 64/mesh)", queueing * 1000.0);
            // The floor: any waypoint on this path terminates and re-originates
            // HBONE; here it does only that (the same GETs to a port declared
            // tcp, relayed unread), what an L7 waypoint can at best approach.
            let l4 = format!("{version}/l4");
            if wanted(&l4) {
                let (lw, lm) = rounds(
                    &mesh,
                    waypoint_pid,
                    VIA_WAYPOINT_L4,
                    &direct,
                    &["httpbench", version, clients, &run],
                    &l4,
                )?;
                println!("waypoint/{l4:<6}  {name}, {clients} at once, the waypoint relaying bytes only (port declared tcp): waypoint {:.0}/s, mesh {:.0}/s: ratio {:.2}, the ceiling for any waypoint on this path; waypoint CPU {:.1} µs/request; p99 added {:.2} ms", lw.rps, lm.rps, lw.rps / lm.rps, lw.cpu_us.unwrap_or_default(), (lw.p99 - lm.p99) / 1000.0);
            }
            let open = format!("{version}/open");
            if !wanted(&open) {
                continue;
            }
            let rate = format!("{:.0}", w.rps * OPEN_LOOP_LOAD);
            let (ow, om) = rounds(
                &mesh,
                waypoint_pid,
                VIA_WAYPOINT,
                &direct,
                &["httprate", version, clients, &rate, OPEN_LOOP_MS],
                &open,
            )?;
            let (added50, added99) = ((ow.p50 - om.p50) / 1000.0, (ow.p99 - om.p99) / 1000.0);
            println!("waypoint/{open:<6}  open loop, {rate}/s offered ({:.0}% of the waypoint's rate at 64) on {clients} clients: waypoint {:.0}/s, mesh {:.0}/s; p50 waypoint {:.0} µs, mesh {:.0} µs: added {added50:.2} ms; p99 waypoint {:.0} µs, mesh {:.0} µs: added {added99:.2} ms (goal <= 1 ms: {}); waypoint CPU {:.1} µs/request", OPEN_LOOP_LOAD * 100.0, ow.rps, om.rps, ow.p50, om.p50, ow.p99, om.p99, met(added99 <= 1.0), ow.cpu_us.unwrap_or_default());
        }
    }
    Ok(())
}
