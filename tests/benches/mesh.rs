//! `cargo xtask bench mesh [--peer]`: the mesh against the same pods without it
//! and, with `--peer`, against Istio's own ztunnel, in one run.
//!
//! Pairs of pods across the two nodes of a testbed cluster, each pair through one
//! data plane:
//! - `client → server`, in an ambient namespace: through our tunnels (one per node,
//!   HBONE over mTLS);
//! - `legacy-client → legacy-server`, outside the mesh: direct over the veths and
//!   the bridge;
//! - with `--peer`, `istio-client → istio-server`: through Istio's ztunnel in
//!   dedicated mode in each pod (HBONE over mTLS, certificates from our CA).
//!
//! Every proxy runs the same number of tokio workers (`ZTB_WORKERS`, 1 here). The
//! rounds of each measurement alternate between the paths (the machine is shared
//! and noisy), and the figures are reported as ratios: ours/Istio and ours/direct.
//! - single-stream and 8-stream throughput (1 GiB);
//! - proxy CPU seconds per GB (utime + stime of the path's two proxies, from
//!   /proc/<pid>/stat, over the single-stream runs);
//! - 1-byte request/response latency p50/p99, unpinned, then with every process
//!   on CPU 0 (both ends share a CPU, as the figures assume); "added" is
//!   the path's latency minus the direct path's;
//! - new connections per second (connect, 1-byte exchange, close);
//! - proxy RSS at idle, with 1,000 idle proxied connections, and per connection.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use testbed::{
    app::{pin_process, BenchMode, BenchServer},
    host::cpu_seconds,
    istio::{self, IstioProxy},
    mesh::{Mesh, WorkloadSpec},
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");
const BYTES: u64 = 1 << 30; // 1 GiB per throughput run
/// Rounds of each measurement (ZTB_ROUNDS overrides, for tuning runs).
fn rounds() -> usize {
    std::env::var("ZTB_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
}
const IDLE: usize = 1_000;
/// The peer's pods: outside the ambient namespace, so our tunnels leave them alone.
const PEER_NS: &str = "peer";
const SINK: u16 = 9000;
const ECHO: u16 = 9001;
const PINNED_ECHO: u16 = 9002;

/// One way from a client pod to a server pod, and the proxies it crosses.
struct Path {
    name: &'static str,
    from: &'static str,
    to: &'static str,
    proxies: Vec<u32>,
}

/// tb-probe run in `pod`; its output.
fn probe_in(mesh: &Mesh, pod: &str, args: &[&str]) -> Result<String> {
    let out = mesh.cluster.pod(pod).run(PROBE, args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(out.status.success(), "tb-probe {args:?} in {pod}: {stdout}");
    Ok(stdout)
}

/// A figure per path (by name).
type Figures = BTreeMap<&'static str, f64>;

struct Bench {
    mesh: Mesh,
    paths: Vec<Path>,
}

impl Bench {
    fn probe(&self, pod: &str, args: &[&str]) -> Result<String> {
        probe_in(&self.mesh, pod, args)
    }

    fn target(&self, pod: &str, port: u16) -> String {
        self.mesh.addr(pod, port)
    }

    /// Runs `measure` on every path, rounds() times, the paths alternating within
    /// each round; the median per path of each of the values it returns.
    fn rounds<const N: usize>(
        &self,
        mut measure: impl FnMut(&Path) -> Result<[f64; N]>,
    ) -> Result<[Figures; N]> {
        let mut samples: BTreeMap<&str, Vec<[f64; N]>> = BTreeMap::new();
        for _ in 0..rounds() {
            for path in &self.paths {
                samples.entry(path.name).or_default().push(measure(path)?);
            }
        }
        Ok(std::array::from_fn(|i| {
            samples
                .iter()
                .map(|(name, s)| (*name, median(s.iter().map(|v| v[i]).collect())))
                .collect()
        }))
    }

    /// The proxies' RSS (KiB) on every path (0 for the direct one).
    fn rss(&self) -> Result<Figures> {
        self.paths
            .iter()
            .map(|p| {
                Ok((
                    p.name,
                    p.proxies
                        .iter()
                        .map(|&pid| rss_kib(pid))
                        .sum::<Result<f64>>()?,
                ))
            })
            .collect()
    }
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

/// A process's resident pages backed by files and anonymous ones (KiB), from
/// /proc/<pid>/smaps_rollup.
fn rss_file_and_anon_kib(pid: u32) -> Result<(f64, f64)> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> Result<f64> {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} in smaps_rollup"))
    };
    let (rss, anon) = (field("Rss:")?, field("Anonymous:")?);
    Ok((rss - anon, anon))
}

/// One line of the report: each path's figure, and the ratios of ours to the others.
fn report(label: &str, unit: &str, figures: &Figures, note: &str) {
    let ours = figures["ours"];
    let mut line = format!("mesh/{label:<22}");
    for (name, v) in figures {
        line += &format!(" {name} {v:.2}{unit},");
    }
    for other in ["istio", "direct"] {
        if let Some(v) = figures.get(other).filter(|v| **v != 0.0) {
            line += &format!(" ours/{other} {:.2},", ours / v);
        }
    }
    println!("{} ({note})", line.trim_end_matches(','));
}

/// Latency added by each proxied path: its figure minus the direct path's.
fn added(figures: &Figures) -> Figures {
    figures
        .iter()
        .filter(|(name, _)| **name != "direct")
        .map(|(name, v)| (*name, v - figures["direct"]))
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let peer = std::env::args().any(|a| a == "--peer");
    let istio = match peer {
        true => Some(
            istio::find()
                .context("--peer: Istio's ztunnel is absent, so nothing can be compared with it")?,
        ),
        false => None,
    };
    // One tokio worker per proxy: six busy processes share this machine's two
    // CPUs, and one worker measured faster than two (ZTB_WORKERS overrides).
    if std::env::var_os("ZTB_WORKERS").is_none() {
        std::env::set_var("ZTB_WORKERS", "1");
    }
    // 1,000 idle connections hold thousands of descriptors in the proxies and the
    // servers: every process started from here may use as many as allowed.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    println!(
        "mesh/setup        {} tokio worker(s) in each proxy; {}",
        testbed::mesh::worker_threads(),
        match &istio {
            Some(path) => format!("peer: Istio's ztunnel ({}), dedicated mode", path.display()),
            None => "no peer (--peer compares with Istio's ztunnel)".into(),
        }
    );
    // ZTB_BENCH=same-node runs only the same-node section (below).
    if std::env::var("ZTB_BENCH").is_ok_and(|b| b == "same-node") {
        return same_node().await;
    }
    // ZTB_BENCH=pods runs only the enrolled-pods memory section (below).
    if std::env::var("ZTB_BENCH").is_ok_and(|b| b == "pods") {
        return enrolled_pods().await;
    }
    across_nodes(istio).await?;
    if std::env::var_os("ZTB_BENCH").is_none() {
        enrolled_pods().await?;
    }
    // ZTB_BENCH=throughput, =memory, =latency and =hold are tuning runs of the
    // cross-node part only.
    if std::env::var("ZTB_BENCH")
        .is_ok_and(|b| ["throughput", "memory", "latency", "hold"].contains(&b.as_str()))
    {
        return Ok(());
    }
    same_node().await
}

/// Two nodes: our tunnels, Istio's (with --peer) and direct, rounds interleaved.
/// Everything it starts is gone when it returns.
async fn across_nodes(istio: Option<std::path::PathBuf>) -> Result<()> {
    // Kernel TLS would move HBONE's record encryption into the kernel; say whether
    // this kernel has it (both proxies encrypt in user space either way).
    let ulps = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
    println!(
        "mesh/ktls          kernel TLS {} (tcp_available_ulp: {})",
        match ulps.split_whitespace().any(|u| u == "tls") {
            true => "available",
            false => "unavailable on this kernel",
        },
        ulps.trim()
    );
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client", "legacy-client", "istio-client"])
            .node("node-b", ["server", "legacy-server", "istio-server"]),
    )?;
    let workloads = [
        WorkloadSpec::new("client", "bench", "client"),
        WorkloadSpec::new("server", "bench", "server"),
        WorkloadSpec::new("legacy-client", "legacy", "default"),
        WorkloadSpec::new("legacy-server", "legacy", "default"),
        WorkloadSpec::new("istio-client", PEER_NS, "istio-client"),
        WorkloadSpec::new("istio-server", PEER_NS, "istio-server"),
    ];
    let mesh = Mesh::start(cluster, &workloads, &["bench"]).await?;
    let ours = ["node-a", "node-b"]
        .map(|n| {
            mesh.tunnel_pid(n)
                .with_context(|| format!("our tunnel on {n}"))
        })
        .into_iter()
        .collect::<Result<Vec<u32>>>()?;
    let mut peers = Vec::new();
    if let Some(binary) = &istio {
        let config: String = ["istio-client", "istio-server"]
            .iter()
            .map(|p| {
                let pod = mesh.cluster.pod(p);
                istio::workload_yaml(PEER_NS, p, p, &pod.ip.to_string(), &pod.node)
            })
            .collect();
        for pod in ["istio-client", "istio-server"] {
            let workload = format!("{PEER_NS}/{pod}/{pod}");
            let ports = [SINK, ECHO, PINNED_ECHO];
            peers.push(
                IstioProxy::start_dedicated(&mesh, binary, pod, &workload, &config, "", &ports)
                    .await?,
            );
        }
    }
    let mut paths = vec![
        Path {
            name: "ours",
            from: "client",
            to: "server",
            proxies: ours.clone(),
        },
        Path {
            name: "direct",
            from: "legacy-client",
            to: "legacy-server",
            proxies: Vec::new(),
        },
    ];
    if !peers.is_empty() {
        paths.push(Path {
            name: "istio",
            from: "istio-client",
            to: "istio-server",
            proxies: peers.iter().map(IstioProxy::pid).collect(),
        });
    }
    let bench = Bench { mesh, paths };
    let servers = ["server", "legacy-server", "istio-server"];
    let _servers = servers
        .iter()
        .flat_map(|p| [(p, SINK, BenchMode::Sink), (p, ECHO, BenchMode::Echo)])
        .map(|(p, port, mode)| BenchServer::start(bench.mesh.cluster.pod(p), port, mode, None))
        .collect::<Result<Vec<_>>>()?;

    // Every path once end to end (certificates fetched, pools warm), then idle.
    for path in &bench.paths {
        bench.probe(
            path.from,
            &["rr", &bench.target(path.to, ECHO), "10", "any"],
        )?;
    }
    let idle_rss = bench.rss()?;
    // What the idle memory is: pages of files (code, read-only data, libraries:
    // shared with the page cache, dropped and read again under pressure) and
    // anonymous pages (heap, stacks).
    for path in bench.paths.iter().filter(|p| !p.proxies.is_empty()) {
        let mut line = format!("mesh/rss-idle-breakdown  {}:", path.name);
        for &pid in &path.proxies {
            let (file, anon) = rss_file_and_anon_kib(pid)?;
            line += &format!(
                " [{:.1} MiB file-backed, {:.1} MiB anonymous, {} threads]",
                file / 1024.0,
                anon / 1024.0,
                threads(pid)?
            );
        }
        println!("{line} (each proxy, after one exchange)");
    }

    // ZTB_BENCH=hold keeps everything up for profiling by hand, until asked to stop.
    if std::env::var("ZTB_BENCH").is_ok_and(|b| b == "hold") {
        return hold(&bench, &servers);
    }
    // ZTB_BENCH=memory measures only memory (for tuning runs and heap profiles);
    // ZTB_BENCH=latency only round trips and connections/s (tuning runs).
    let memory_only = std::env::var("ZTB_BENCH").is_ok_and(|b| b == "memory");
    let latency_only = std::env::var("ZTB_BENCH").is_ok_and(|b| b == "latency");
    if !memory_only {
        if !latency_only {
            throughput(&bench)?;
        }
        // ZTB_BENCH=throughput stops here (for tuning runs).
        if std::env::var("ZTB_BENCH").is_ok_and(|b| b == "throughput") {
            return Ok(());
        }
        latency_and_connections(&bench, !latency_only)?;
    }

    let bench = &bench;
    if !latency_only {
        memory(bench, &idle_rss)?;
    }
    if memory_only {
        return Ok(());
    }
    pinned_rr(bench, &servers)?;
    drop(peers);
    Ok(())
}

/// Memory: idle (`idle_rss`, measured before), then with 1,000 idle proxied
/// connections on each path in turn.
fn memory(bench: &Bench, idle_rss: &Figures) -> Result<()> {
    // Memory: idle, then with 1,000 idle proxied connections on each path in turn.
    let mut held = Figures::new();
    for path in &bench.paths {
        let mut holder = bench
            .mesh
            .cluster
            .pod(path.from)
            .command(PROBE)?
            .args(["idle", &bench.target(path.to, ECHO), &IDLE.to_string()])
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
            "{}: idle connections: {line}",
            path.name
        );
        held.insert(path.name, bench.rss()?[path.name]);
        drop(holder.stdin.take());
        holder.wait()?;
    }
    let proxied = |f: &Figures| -> Figures {
        f.iter()
            .filter(|(n, _)| **n != "direct")
            .map(|(n, v)| (*n, *v / 1024.0))
            .collect()
    };
    report(
        "rss-idle",
        " MiB",
        &proxied(&idle_rss),
        "both proxies, after one exchange",
    );
    report(
        "rss-1000-idle",
        " MiB",
        &proxied(&held),
        "both proxies, 1,000 idle connections open",
    );
    let per_connection: Figures = held
        .iter()
        .filter(|(n, _)| **n != "direct")
        .map(|(n, v)| (*n, (v - idle_rss[n]) / IDLE as f64))
        .collect();
    report(
        "rss-per-connection",
        " KiB",
        &per_connection,
        "both proxies' RSS growth / 1,000",
    );
    Ok(())
}

/// Pins every proxy to CPU 0 and starts the pinned echo servers (kept while the
/// returned servers live).
fn pin_all(bench: &Bench, servers: &[&str]) -> Result<Vec<BenchServer>> {
    for pid in bench.paths.iter().flat_map(|p| &p.proxies) {
        pin_process(*pid, 0)?;
    }
    servers
        .iter()
        .map(|p| {
            BenchServer::start(
                bench.mesh.cluster.pod(p),
                PINNED_ECHO,
                BenchMode::Echo,
                Some(0),
            )
        })
        .collect::<Result<Vec<_>>>()
}

/// Round trips with everything on CPU 0.
fn pinned_rr(bench: &Bench, servers: &[&str]) -> Result<()> {
    // Latency with everything on CPU 0.
    let _pinned = pin_all(bench, servers)?;
    let [p50, p99] = rr(bench, PINNED_ECHO, "0")?;
    report(
        "rr-pinned-p50",
        " µs",
        &p50,
        "all processes on CPU 0, median of rounds x 20,000",
    );
    report("rr-pinned-p50-added", " µs", &added(&p50), "minus direct");
    report("rr-pinned-p99", " µs", &p99, "all on CPU 0");
    report("rr-pinned-p99-added", " µs", &added(&p99), "minus direct");
    Ok(())
}

/// Keeps the paths up, pinned to CPU 0 with their pinned echo servers, until
/// /tmp/ztb-hold is removed; prints what a profiling session needs: each path's
/// proxies and how to run tb-probe in its client pod.
fn hold(bench: &Bench, servers: &[&str]) -> Result<()> {
    let _pinned = pin_all(bench, servers)?;
    std::fs::write("/tmp/ztb-hold", "")?;
    for path in &bench.paths {
        let pod = bench.mesh.cluster.pod(path.from);
        println!(
            "hold/{} proxies={:?} netns={} cgroup={} probe={PROBE} echo={} pinned={}",
            path.name,
            path.proxies,
            pod.netns_path().display(),
            pod.cgroup.display(),
            bench.target(path.to, ECHO),
            bench.target(path.to, PINNED_ECHO),
        );
    }
    println!("hold: until /tmp/ztb-hold is removed");
    while std::path::Path::new("/tmp/ztb-hold").exists() {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    Ok(())
}

/// Pods on one node, enrolled in the mesh or not.
const PODS: usize = 100;

/// The tunnel's memory per enrolled pod: its RSS and threads with `PODS` pods on
/// its node outside the mesh, then with their namespace in the mesh (each pod
/// enrolled: listeners in its namespace, its socket thread, its certificate).
async fn enrolled_pods() -> Result<()> {
    let names: Vec<String> = (0..PODS).map(|i| format!("p{i:03}")).collect();
    let cluster = Cluster::new(&ClusterSpec::new().node("node-a", &names))?;
    let workloads: Vec<WorkloadSpec> = names
        .iter()
        .map(|p| WorkloadSpec::new(p, "many", "default"))
        .collect();
    let mesh = Mesh::start(cluster, &workloads, &[]).await?;
    let pid = mesh.tunnel_pid("node-a").context("our tunnel")?;
    // What the last change started (enrolment, certificates) is done before
    // memory is read: RSS is measured once it holds still.
    let settled = || -> Result<(f64, usize)> {
        let mut last = rss_kib(pid)?;
        for _ in 0..20 {
            std::thread::sleep(std::time::Duration::from_millis(500));
            let now = rss_kib(pid)?;
            if now == last {
                break;
            }
            last = now;
        }
        Ok((last, threads(pid)?))
    };
    anyhow::ensure!(enrolled(&mesh).await == 0, "pods enrolled outside the mesh");
    let (rss_none, threads_none) = settled()?;
    mesh.write_config("ns-many.yaml", &testbed::mesh::namespace_yaml("many", true))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while enrolled(&mesh).await < PODS {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "only {} of {PODS} pods enrolled",
            enrolled(&mesh).await
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (rss_all, threads_all) = settled()?;
    println!(
        "mesh/rss-per-100-pods   {:.2} MiB with 0 pods enrolled, {:.2} MiB with {PODS}: {:.1} KiB per enrolled pod; threads {threads_none} -> {threads_all} (our tunnel, {PODS} pods on its node)",
        rss_none / 1024.0,
        rss_all / 1024.0,
        (rss_all - rss_none) / PODS as f64
    );
    Ok(())
}

/// Pods the node-a tunnel has enrolled (its /config_dump).
async fn enrolled(mesh: &Mesh) -> usize {
    mesh.config_dump("node-a").await["enrolled"]
        .as_array()
        .map_or(0, Vec::len)
}

fn threads(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?.count())
}

/// 1-byte round trips to `port` (p50, p99 in µs), the client on `cpu` ("any": unpinned).
fn rr(bench: &Bench, port: u16, cpu: &str) -> Result<[Figures; 2]> {
    bench.rounds(move |path| {
        let out = bench.probe(
            path.from,
            &["rr", &bench.target(path.to, port), "20000", cpu],
        )?;
        Ok([
            value(&out, "median_ns")? / 1e3,
            value(&out, "p99_ns")? / 1e3,
        ])
    })
}

/// Throughput with 1 stream and the proxies' CPU per GB (from /proc).
fn throughput(bench: &Bench) -> Result<()> {
    let bytes = BYTES.to_string();
    let [single, cpu_per_gb] = bench.rounds(|path| {
        let cpu = |p: &Path| {
            p.proxies
                .iter()
                .map(|&pid| cpu_seconds(pid))
                .sum::<Result<f64>>()
        };
        let before = cpu(path)?;
        let out = bench.probe(
            path.from,
            &["throughput", &bench.target(path.to, SINK), &bytes],
        )?;
        Ok([
            value(&out, "bits_per_second")? / 1e9,
            (cpu(path)? - before) / (BYTES as f64 / 1e9),
        ])
    })?;
    report(
        "throughput",
        " Gbit/s",
        &single,
        "single stream, 1 GiB, median of rounds",
    );
    let cpu_per_gb: Figures = cpu_per_gb
        .into_iter()
        .filter(|(n, _)| *n != "direct")
        .collect();
    report(
        "cpu-per-gb",
        " s",
        &cpu_per_gb,
        "proxy CPU seconds per GB, both proxies, single stream",
    );
    Ok(())
}

/// Throughput with 8 streams, round trips (unpinned) and new connections per second.
fn latency_and_connections(bench: &Bench, multi_stream: bool) -> Result<()> {
    if multi_stream {
        let bytes = BYTES.to_string();
        let [multi] = bench.rounds(|path| {
            let target = bench.target(path.to, SINK);
            Ok([value(
                &bench.probe(path.from, &["throughput", &target, &bytes, "8"])?,
                "bits_per_second",
            )? / 1e9])
        })?;
        report(
            "throughput-8",
            " Gbit/s",
            &multi,
            "8 streams at once, 1 GiB in all",
        );
    }

    // Latency, unpinned.
    let [p50, p99] = rr(bench, ECHO, "any")?;
    report(
        "rr-p50",
        " µs",
        &p50,
        "1-byte round trip, unpinned, median of rounds x 20,000",
    );
    report("rr-p50-added", " µs", &added(&p50), "minus direct");
    report("rr-p99", " µs", &p99, "unpinned");
    report("rr-p99-added", " µs", &added(&p99), "minus direct");

    // New connections per second.
    let [cps] = bench.rounds(|path| {
        let out = bench.probe(path.from, &["conns", &bench.target(path.to, ECHO), "1000"])?;
        Ok([value(&out, "per_second")?])
    })?;
    report(
        "connections",
        "/s",
        &cps,
        "connect + 1-byte exchange + close, sequential",
    );

    Ok(())
}

/// Same-node section: pods on one node, through the tunnel with
/// `--same-node-splice=kernel` (joined in the kernel), with `user` (relayed in
/// user space without HBONE), with `off` (HBONE on the same tunnel), and direct (outside the mesh). Throughput and 1-byte round trips
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
    for mode in ["kernel", "user", "off"] {
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
        for _ in 0..rounds() {
            for (i, (_, from, to)) in paths.iter().enumerate() {
                let out = probe_in(
                    &mesh,
                    from,
                    &["throughput", &target(&mesh, to, 9000), &BYTES.to_string()],
                )?;
                bps[i].push(value(&out, "bits_per_second")?);
                let out = probe_in(&mesh, from, &["rr", &target(&mesh, to, 9002), "20000", "0"])?;
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
    for (name, label) in [
        ("kernel", "spliced"),
        ("user", "user   "),
        ("off", "hbone  "),
    ] {
        let (_, b, r) = results.iter().find(|r| r.0 == name).context("a result")?;
        println!(
            "same-node/{label} throughput {:.2} Gbit/s vs direct {:.2}: ratio {:.2}; 1-byte round trip {:.1} µs vs direct {:.1}: ratio {:.2} (median of {}; round trips on CPU 0)",
            b / 1e9, d_bps / 1e9, b / d_bps, r / 1e3, d_rtt / 1e3, r / d_rtt, rounds()
        );
    }
    println!(
        "same-node/check    {spliced} of {} same-node connections spliced in the kernel",
        2 * rounds()
    );
    Ok(())
}
