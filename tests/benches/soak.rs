//! `cargo xtask bench soak`: 10,000 concurrent connections through the mesh with
//! churn for a bounded time, then back to quiet: do the tunnels give back what they
//! took?
//!
//! node-a holds five client pods, 2,000 idle proxied connections each, plus one pod
//! opening and closing connections the whole time; node-b the echo server. Before
//! the soak and after it (the idle connections closed), it reports each tunnel's
//! open file descriptors, RSS and the p99 of 1-byte round trips, and fails when the
//! growth passes the bounds stated below. `ZTB_SOAK_ROUNDS` rounds (default 3);
//! `ZTB_SOAK_SECS` sets each one's churn (default 15 s).
//!
//! The bounds, per tunnel: descriptors back within +64 of before after each round;
//! RSS at any point at most 32 KiB per held connection over before (the allocator
//! keeps what the peak took, so "after" is measured against the peak's budget: a
//! relay with two 64 KiB buffers per connection needed 128 KiB for those alone);
//! RSS after the last round within +10% of the round before (no growth per round);
//! p99 after within 2x of before.

use std::{
    io::BufRead,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use testbed::{
    app::{BenchMode, BenchServer, EchoServer},
    mesh::{metric, open_fds, Mesh, WorkloadSpec},
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");
const HOLDERS: usize = 5;
const PER_HOLDER: usize = 2_000;
const HELD: usize = HOLDERS * PER_HOLDER;
/// Allowed growth, after the soak, over the figures before it.
const FD_BOUND: usize = 64;
/// RSS over before, per held connection, during the soak and after it.
const RSS_PER_CONNECTION_KIB: f64 = 32.0;
/// RSS after the last round over the round before: the allocator converges once
/// memory is recycled; leaked per-connection state would add as much every round.
const RSS_BOUND: f64 = 0.10;
const P99_BOUND: f64 = 2.0;

fn rss_kib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")
}

struct Figures {
    fds: [usize; 2],
    rss_kib: [f64; 2],
    p99_us: f64,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fds node-a {} node-b {}, RSS node-a {:.1} MiB node-b {:.1} MiB, p99 {:.0} µs",
            self.fds[0],
            self.fds[1],
            self.rss_kib[0] / 1024.0,
            self.rss_kib[1] / 1024.0,
            self.p99_us
        )
    }
}

fn measure(mesh: &Mesh, pids: [u32; 2], target: &str) -> Result<Figures> {
    let out = mesh
        .cluster
        .pod("probe")
        .run(PROBE, ["rr", target, "5000", "0"])?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(Figures {
        fds: pids.map(open_fds),
        rss_kib: [rss_kib(pids[0])?, rss_kib(pids[1])?],
        p99_us: value(&out, "p99_ns")? / 1e3,
    })
}

/// Starts a pod holding `n` idle proxied connections; returns once all are open.
fn hold(mesh: &Mesh, pod: &str, target: &str, n: usize) -> Result<Child> {
    let mut holder = mesh
        .cluster
        .pod(pod)
        .command(PROBE)?
        .args(["idle", target, &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().context("stdout")?).read_line(&mut line)?;
    anyhow::ensure!(line.trim() == format!("open={n}"), "{pod}: {line:?}");
    Ok(holder)
}

#[tokio::main]
async fn main() -> Result<()> {
    let secs: u64 = std::env::var("ZTB_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let holders: Vec<String> = (0..HOLDERS).map(|i| format!("holder-{i}")).collect();
    let mut node_a: Vec<&str> = holders.iter().map(String::as_str).collect();
    node_a.extend(["churn", "probe"]);
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", node_a.clone())
            .node("node-b", ["server"]),
    )?;
    let mut workloads: Vec<WorkloadSpec> = node_a
        .iter()
        .map(|p| WorkloadSpec::new(p, "soak", "client"))
        .collect();
    workloads.push(WorkloadSpec::new("server", "soak", "server"));
    let mut mesh = Mesh::start(cluster, &workloads, &["soak"]).await?;
    // This machine's descriptor limit (20,000) would cap a tunnel at 9,872
    // connections by default (two descriptors per relayed connection); the
    // source tunnel holds one per connection, so allow the soak's 10,000.
    for node in ["node-a", "node-b"] {
        mesh.tunnel_args.insert(
            node.into(),
            vec!["--max-connections".into(), "12000".into()],
        );
        mesh.kill_tunnel(node);
        mesh.start_tunnel(node).await?;
    }
    let target = format!("{}:9001", mesh.cluster.pod("server").ip);
    let _echo = BenchServer::start(mesh.cluster.pod("server"), 9001, BenchMode::Echo, None)?;
    let churn_target = format!("{}:8080", mesh.cluster.pod("server").ip);
    let _churn_echo = EchoServer::start(mesh.cluster.pod("server"), 8080)?;
    let pids = [
        mesh.tunnel_pid("node-a").context("node-a")?,
        mesh.tunnel_pid("node-b").context("node-b")?,
    ];
    // Warm: certificates fetched, the pooled connection up.
    measure(&mesh, pids, &target)?;
    let before = measure(&mesh, pids, &target)?;
    println!("soak/before       {before}");

    // Rounds: what the allocator keeps after one for reuse is not growth; what a
    // later round adds on top of the one before is.
    let rounds: usize = std::env::var("ZTB_SOAK_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(2);
    let mut after = Vec::new();
    for _ in 0..rounds {
        after.push(round(&mesh, pids, &target, &churn_target, secs, &before).await?);
    }
    let (previous, last) = (&after[rounds - 2], &after[rounds - 1]);
    let rss_growth = (0..2)
        .map(|i| last.rss_kib[i] / previous.rss_kib[i] - 1.0)
        .fold(f64::MIN, f64::max);
    let p99_ratio = last.p99_us / before.p99_us;
    let fd_growth = |i: usize| last.fds[i] as i64 - before.fds[i] as i64;
    println!(
        "soak/bound        fds within +{FD_BOUND} of before after each round: last {:+} node-a, {:+} node-b",
        fd_growth(0),
        fd_growth(1)
    );
    println!(
        "soak/bound        RSS within {RSS_PER_CONNECTION_KIB} KiB per held connection over before, during and after each round: after the last, {}",
        per_connection(&before, last)
    );
    println!(
        "soak/bound        RSS after round {rounds} within +{:.0}% of round {}: {:+.1}%",
        RSS_BOUND * 100.0,
        rounds - 1,
        rss_growth * 100.0
    );
    println!("soak/bound        p99 after within {P99_BOUND}x of before: {p99_ratio:.2}x");
    anyhow::ensure!(
        rss_growth <= RSS_BOUND,
        "RSS grew by {:.1}%",
        rss_growth * 100.0
    );
    anyhow::ensure!(p99_ratio <= P99_BOUND, "p99 grew {p99_ratio:.2}x");
    Ok(())
}

/// One soak: 10,000 held connections and churn for `secs`, then everything closed;
/// the figures once the tunnels are quiet again.
async fn round(
    mesh: &Mesh,
    pids: [u32; 2],
    target: &str,
    churn_target: &str,
    secs: u64,
    before: &Figures,
) -> Result<Figures> {
    let started = Instant::now();
    let mut held = Vec::new();
    for pod in (0..HOLDERS).map(|i| format!("holder-{i}")) {
        held.push(hold(mesh, &pod, target, PER_HOLDER)?);
    }
    let opened = started.elapsed();
    let churn = mesh
        .cluster
        .pod("churn")
        .command(PROBE)?
        .args(["load", churn_target, &(secs * 1000).to_string(), "churn"])
        .stdout(Stdio::piped())
        .spawn()?;
    let during = measure(mesh, pids, target)?;
    println!(
        "soak/during       {HELD} connections held (opened in {:.1} s), churn running: {during}; RSS over before per held connection: {}",
        opened.as_secs_f64(),
        per_connection(before, &during)
    );
    within_rss_budget(before, &during)?;
    let churned = churn.wait_with_output()?;
    let churned = String::from_utf8_lossy(&churned.stdout).into_owned();
    let (ok, failed) = (value(&churned, "ok")?, value(&churned, "failed")?);
    for mut holder in held {
        drop(holder.stdin.take());
        holder.wait()?;
    }
    // Quiet again: wait for the tunnels to close what the clients closed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open = metric(
            &mesh.metrics("node-a").await,
            "ztunnel_connections_open",
            &["listener=\"outbound\""],
        );
        let fds = pids.map(open_fds);
        if open == 0.0 && fds[0] <= before.fds[0] + FD_BOUND && fds[1] <= before.fds[1] + FD_BOUND {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not back to quiet within 60 s: {open} connections open, fds {fds:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = measure(mesh, pids, target)?;
    println!("soak/after        {after}");
    within_rss_budget(before, &after)?;
    println!("soak/churn        {ok} connections opened and closed in {secs} s alongside, {failed} failed");
    anyhow::ensure!(failed == 0.0, "{failed} churn connections failed");
    Ok(after)
}

/// Each tunnel's RSS over before, per held connection.
fn per_connection(before: &Figures, now: &Figures) -> String {
    let kib = |i: usize| (now.rss_kib[i] - before.rss_kib[i]) / HELD as f64;
    format!("node-a {:.1} KiB, node-b {:.1} KiB", kib(0), kib(1))
}

fn within_rss_budget(before: &Figures, now: &Figures) -> Result<()> {
    let budget = RSS_PER_CONNECTION_KIB * HELD as f64;
    for (i, node) in ["node-a", "node-b"].iter().enumerate() {
        let over = now.rss_kib[i] - before.rss_kib[i];
        anyhow::ensure!(
            over <= budget,
            "{node}'s RSS is {:.1} MiB over before, past the bound of {:.1} MiB ({RSS_PER_CONNECTION_KIB} KiB per held connection)",
            over / 1024.0,
            budget / 1024.0
        );
    }
    Ok(())
}

fn value(out: &str, key: &str) -> Result<f64> {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .with_context(|| format!("no {key} in {out:?}"))?
        .parse()
        .context("a number")
}
