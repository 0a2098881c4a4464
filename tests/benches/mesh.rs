//! `cargo xtask bench mesh`: the mesh against the same pods without it, in one run.
//!
//! Two pairs of pods across the two nodes of a testbed cluster: `client → server`
//! in an ambient namespace (through both tunnels, HBONE over mTLS) and
//! `legacy-client → legacy-server` outside the mesh (direct over the veths and the
//! bridge). Reported as ratios, since the machine is shared and noisy:
//! - single-stream throughput;
//! - new connections per second (connect, 1-byte exchange, close);
//! - memory per idle proxied connection (RSS of both tunnels, 1,000 connections);
//! - 1-byte request/response latency, every process pinned to CPU 0 (both ends
//!   share a CPU, as the figures in the issue assume).

use anyhow::{Context, Result};
use testbed::{
    app::{pin_process, BenchMode, BenchServer},
    mesh::{Mesh, WorkloadSpec},
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");
const BYTES: &str = "1073741824"; // 1 GiB per throughput run
const ROUNDS: usize = 3;
const IDLE: usize = 1_000;

fn probe(mesh: &Mesh, pod: &str, args: &[&str]) -> Result<String> {
    let out = mesh.cluster.pod(pod).run(PROBE, args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(out.status.success(), "tb-probe {args:?} in {pod}: {stdout}");
    Ok(stdout)
}

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

fn rss_kib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")
}

#[tokio::main]
async fn main() -> Result<()> {
    // One tokio worker per tunnel: four busy processes share this machine's two
    // CPUs, and one worker measured faster than two (ZTB_WORKERS overrides).
    if std::env::var_os("ZTB_WORKERS").is_none() {
        std::env::set_var("ZTB_WORKERS", "1");
    }
    println!(
        "mesh/setup        tunnels with {} tokio worker(s) each",
        std::env::var("ZTB_WORKERS").unwrap_or_default()
    );
    // ZTB_BENCH=same-node runs only the same-node section (below).
    if std::env::var("ZTB_BENCH").is_ok_and(|b| b == "same-node") {
        return same_node().await;
    }
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client", "legacy-client"])
            .node("node-b", ["server", "legacy-server"]),
    )?;
    let workloads = [
        WorkloadSpec::new("client", "bench", "client"),
        WorkloadSpec::new("server", "bench", "server"),
        WorkloadSpec::new("legacy-client", "legacy", "default"),
        WorkloadSpec::new("legacy-server", "legacy", "default"),
    ];
    let mesh = Mesh::start(cluster, &workloads, &["bench"]).await?;
    let target = |pod: &str, port: u16| format!("{}:{port}", mesh.cluster.pod(pod).ip);
    let paths = [
        ("mesh", "client", "server"),
        ("direct", "legacy-client", "legacy-server"),
    ];
    let _sinks: Vec<_> = ["server", "legacy-server"]
        .iter()
        .map(|p| BenchServer::start(mesh.cluster.pod(p), 9000, BenchMode::Sink, None))
        .collect::<Result<_>>()?;
    let _echoes: Vec<_> = ["server", "legacy-server"]
        .iter()
        .map(|p| BenchServer::start(mesh.cluster.pod(p), 9001, BenchMode::Echo, None))
        .collect::<Result<_>>()?;

    // Throughput: rounds alternate between the paths.
    let (mut mesh_bps, mut direct_bps) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for (name, from, to) in paths {
            let bps = value(
                &probe(&mesh, from, &["throughput", &target(to, 9000), BYTES])?,
                "bits_per_second",
            )?;
            match name {
                "mesh" => mesh_bps.push(bps),
                _ => direct_bps.push(bps),
            }
        }
    }
    let (m, d) = (median(mesh_bps), median(direct_bps));
    println!("mesh/throughput   mesh {:.2} Gbit/s, direct {:.2} Gbit/s: ratio {:.2} (single stream, 1 GiB, median of {ROUNDS})", m / 1e9, d / 1e9, m / d);

    // ZTB_BENCH=throughput stops here (for tuning runs).
    if std::env::var("ZTB_BENCH").is_ok_and(|b| b == "throughput") {
        return Ok(());
    }

    // New connections per second.
    let (mut mesh_cps, mut direct_cps) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for (name, from, to) in paths {
            let cps = value(
                &probe(&mesh, from, &["conns", &target(to, 9001), "1000"])?,
                "per_second",
            )?;
            match name {
                "mesh" => mesh_cps.push(cps),
                _ => direct_cps.push(cps),
            }
        }
    }
    let (m, d) = (median(mesh_cps), median(direct_cps));
    println!("mesh/connections  mesh {m:.0}/s, direct {d:.0}/s: ratio {:.2} (connect + 1-byte exchange + close, sequential)", m / d);

    // Memory per idle proxied connection, both tunnels together.
    let pids = [
        mesh.tunnel_pid("node-a").context("node-a")?,
        mesh.tunnel_pid("node-b").context("node-b")?,
    ];
    let before: f64 = pids.iter().map(|p| rss_kib(*p)).sum::<Result<f64>>()?;
    let mut holder = mesh
        .cluster
        .pod("client")
        .command(PROBE)?
        .args(["idle", &target("server", 9001), &IDLE.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().context("stdout")?),
        &mut line,
    )?;
    anyhow::ensure!(
        line.trim() == format!("open={IDLE}"),
        "idle connections: {line}"
    );
    let after: f64 = pids.iter().map(|p| rss_kib(*p)).sum::<Result<f64>>()?;
    drop(holder.stdin.take());
    holder.wait()?;
    println!(
        "mesh/idle-memory  {:.1} KiB per idle proxied connection (both tunnels' RSS: {before:.0} -> {after:.0} KiB for {IDLE})",
        (after - before) / IDLE as f64
    );

    // Latency, everything on CPU 0.
    for pid in pids {
        pin_process(pid, 0)?;
    }
    let _pinned: Vec<_> = ["server", "legacy-server"]
        .iter()
        .map(|p| BenchServer::start(mesh.cluster.pod(p), 9002, BenchMode::Echo, Some(0)))
        .collect::<Result<_>>()?;
    let (mut mesh_rtt, mut direct_rtt) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for (name, from, to) in paths {
            let ns = value(
                &probe(&mesh, from, &["rr", &target(to, 9002), "20000", "0"])?,
                "median_ns",
            )?;
            match name {
                "mesh" => mesh_rtt.push(ns),
                _ => direct_rtt.push(ns),
            }
        }
    }
    let (m, d) = (median(mesh_rtt), median(direct_rtt));
    println!(
        "mesh/latency      mesh {:.1} µs, direct {:.1} µs per 1-byte round trip: ratio {:.2}, {:.1} µs added (all processes on CPU 0, median of {ROUNDS} x 20,000)",
        m / 1e3, d / 1e3, m / d, (m - d) / 1e3
    );
    drop(mesh);
    same_node().await
}

/// Same-node section: pods on one node, through the tunnel with
/// `--same-node-splice=kernel` (joined in the kernel), with `off` (HBONE on the
/// same tunnel), and direct (outside the mesh). Throughput and 1-byte round trips
/// (everything on CPU 0), as ratios to direct. Goals (issue 18): spliced
/// throughput >= 0.8x direct, round trip <= 1.3x direct.
async fn same_node() -> Result<()> {
    let cluster = Cluster::new(&ClusterSpec::new().node(
        "node-a",
        ["client", "server", "legacy-client", "legacy-server"],
    ))?;
    let workloads = [
        WorkloadSpec::new("client", "bench", "client"),
        WorkloadSpec::new("server", "bench", "server"),
        WorkloadSpec::new("legacy-client", "legacy", "default"),
        WorkloadSpec::new("legacy-server", "legacy", "default"),
    ];
    let mut mesh = Mesh::start(cluster, &workloads, &["bench"]).await?;
    let target = |mesh: &Mesh, pod: &str, port: u16| format!("{}:{port}", mesh.cluster.pod(pod).ip);
    let _servers: Vec<_> = ["server", "legacy-server"]
        .iter()
        .flat_map(|p| {
            [
                BenchServer::start(mesh.cluster.pod(p), 9000, BenchMode::Sink, None),
                BenchServer::start(mesh.cluster.pod(p), 9002, BenchMode::Echo, Some(0)),
            ]
        })
        .collect::<Result<_>>()?;
    // (path, client, server, tunnel mode), rounds interleaved per mode.
    let mut results: Vec<(&str, f64, f64)> = Vec::new();
    let mut spliced = 0.0;
    for mode in ["kernel", "off"] {
        mesh.stop_tunnel("node-a").await?;
        mesh.tunnel_args.insert(
            "node-a".into(),
            vec!["--same-node-splice".into(), mode.into()],
        );
        mesh.start_tunnel("node-a").await?;
        pin_process(mesh.tunnel_pid("node-a").context("node-a")?, 0)?;
        let paths = [
            (mode, "client", "server"),
            ("direct", "legacy-client", "legacy-server"),
        ];
        let (mut bps, mut rtt) = (vec![Vec::new(); 2], vec![Vec::new(); 2]);
        for _ in 0..ROUNDS {
            for (i, (_, from, to)) in paths.iter().enumerate() {
                let out = probe(
                    &mesh,
                    from,
                    &["throughput", &target(&mesh, to, 9000), BYTES],
                )?;
                bps[i].push(value(&out, "bits_per_second")?);
                let out = probe(&mesh, from, &["rr", &target(&mesh, to, 9002), "20000", "0"])?;
                rtt[i].push(value(&out, "median_ns")?);
            }
        }
        if mode == "kernel" {
            // Every mesh connection of the rounds: 2 per round (one throughput, one RR).
            spliced = testbed::mesh::metric(
                &mesh.metrics("node-a").await,
                "ztunnel_same_node_connections_total",
                &["result=\"spliced\""],
            );
        }
        for (i, (name, _, _)) in paths.iter().enumerate() {
            results.push((name, median(bps[i].clone()), median(rtt[i].clone())));
        }
    }
    let direct: Vec<_> = results.iter().filter(|r| r.0 == "direct").collect();
    let (d_bps, d_rtt) = (
        median(direct.iter().map(|r| r.1).collect()),
        median(direct.iter().map(|r| r.2).collect()),
    );
    for (name, label) in [("kernel", "spliced"), ("off", "hbone   ")] {
        let (_, b, r) = results.iter().find(|r| r.0 == name).context("a result")?;
        println!(
            "same-node/{label} throughput {:.2} Gbit/s vs direct {:.2}: ratio {:.2}; 1-byte round trip {:.1} µs vs direct {:.1}: ratio {:.2} (median of {ROUNDS}; round trips on CPU 0)",
            b / 1e9, d_bps / 1e9, b / d_bps, r / 1e3, d_rtt / 1e3, r / d_rtt
        );
    }
    println!(
        "same-node/check    {spliced} of {} same-node connections spliced in the kernel",
        2 * ROUNDS
    );
    Ok(())
}
