//! A cluster of nodes and pods made of network namespaces, veth pairs, a bridge and
//! cgroup v2 groups.
//!
//! ```text
//!  fabric netns:  br0 ── n0 ─┐        ┌─ n1 ── (more nodes)
//!                            │        │
//!  node netns:        eth0 172.30.0.10/24          (node 0; node i is .10+i)
//!                     p0 ── 10.244.0.1/32 (gateway on every pod link)
//!                      │
//!  pod netns:         eth0 10.244.0.2/32, default via 10.244.0.1
//! ```
//!
//! Node `i` owns the pod range 10.244.i.0/24 and routes the other nodes' ranges via
//! their fabric addresses. Interfaces are created inside the namespaces, so their
//! short names never meet another cluster's. Namespaces, cgroups and bpffs pins are
//! named `ztb-<pid>-<seq>-…`, unique per cluster; the pid lets a later run tell
//! leftovers of a killed process (swept at start) from a live parallel test.

use std::{
    collections::HashSet,
    ffi::OsStr,
    fmt, fs,
    future::Future,
    io,
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use crate::host::{self, ip, PREFIX};

/// The shape of a cluster: nodes, each with its pods.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub nodes: Vec<NodeSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    #[serde(default)]
    pub pods: Vec<String>,
}

impl ClusterSpec {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node with the given pods.
    pub fn node<I, S>(mut self, name: &str, pods: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.nodes.push(NodeSpec {
            name: name.to_owned(),
            pods: pods.into_iter().map(Into::into).collect(),
        });
        self
    }

    pub fn from_yaml(text: &str) -> Result<Self> {
        let spec: Self = serde_yaml::from_str(text).context("parsing the cluster spec")?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_yaml(&text).with_context(|| format!("in {}", path.display()))
    }

    fn validate(&self) -> Result<()> {
        ensure!(!self.nodes.is_empty(), "a cluster needs at least one node");
        ensure!(self.nodes.len() <= 200, "at most 200 nodes");
        let mut names = HashSet::new();
        for node in &self.nodes {
            check_name(&node.name)?;
            ensure!(
                names.insert(("node", &node.name)),
                "node {:?} appears twice",
                node.name
            );
            ensure!(
                node.pods.len() <= 250,
                "node {:?}: at most 250 pods",
                node.name
            );
            for pod in &node.pods {
                check_name(pod)?;
                ensure!(names.insert(("pod", pod)), "pod {pod:?} appears twice");
            }
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ensure!(
        ok,
        "{name:?}: names are 1-40 characters of a-z, 0-9 and '-'"
    );
    Ok(())
}

/// A running cluster. Dropping it removes everything it made.
pub struct Cluster {
    prefix: String,
    fabric: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    cgroup: PathBuf,
    bpffs: PathBuf,
    cleaned: bool,
}

/// A node: a network namespace on the fabric, where the node's tunnel runs.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    /// The namespace name (`ip netns`).
    pub netns: String,
    /// The node's address on the fabric.
    pub ip: Ipv4Addr,
    /// The cgroup holding every pod's cgroup: where the tunnel attaches its programs.
    pub pod_cgroup_root: PathBuf,
    /// The cgroup for the node's own processes (the tunnel).
    pub cgroup: PathBuf,
    /// A bpffs directory for the node's tunnel to pin into.
    pub bpffs: PathBuf,
}

/// A pod: a network namespace in its own cgroup, wired to its node.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub cgroup: PathBuf,
}

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// Builds the cluster, first sweeping leftovers of killed runs.
    pub fn new(spec: &ClusterSpec) -> Result<Self> {
        spec.validate()?;
        host::require_root()?;
        host::require_iproute2()?;
        sweep_stale()?;
        let seq = NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{PREFIX}-{}-{seq}", std::process::id());
        let mut cluster = Cluster {
            fabric: format!("{prefix}-fabric"),
            cgroup: host::testbed_cgroup()?.join(&prefix),
            bpffs: host::testbed_bpffs()?.join(&prefix),
            prefix,
            nodes: Vec::new(),
            pods: Vec::new(),
            cleaned: false,
        };
        // On error `cluster` is dropped here, removing whatever was made.
        cluster.build(spec)?;
        Ok(cluster)
    }

    fn build(&mut self, spec: &ClusterSpec) -> Result<()> {
        // create_dir_all: another cluster's cleanup may just have removed the parent.
        for dir in [&self.cgroup, &self.bpffs] {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let fabric = self.fabric.clone();
        add_netns(&fabric)?;
        ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &fabric, "link", "set", "br0", "up"])?;

        for (i, node_spec) in spec.nodes.iter().enumerate() {
            let node = self.add_node(i, &node_spec.name)?;
            for (j, pod_name) in node_spec.pods.iter().enumerate() {
                self.add_pod(i, j, &node, pod_name)?;
            }
            self.nodes.push(node);
        }
        for (i, node) in self.nodes.iter().enumerate() {
            for (k, other) in self.nodes.iter().enumerate() {
                if i != k {
                    let range = format!("10.244.{k}.0/24");
                    ip(&[
                        "-n",
                        &node.netns,
                        "route",
                        "add",
                        &range,
                        "via",
                        &other.ip.to_string(),
                    ])?;
                }
            }
        }
        Ok(())
    }

    fn add_node(&mut self, i: usize, name: &str) -> Result<Node> {
        let netns = format!("{}-node-{name}", self.prefix);
        add_netns(&netns)?;
        let port = format!("n{i}");
        ip(&[
            "-n",
            &self.fabric,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ])?;
        ip(&[
            "-n",
            &self.fabric,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ])?;
        let node_ip = Ipv4Addr::new(172, 30, 0, 10 + i as u8);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{node_ip}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        in_netns_path(&netns_path(&netns), || {
            fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        })
        .and_then(|written| Ok(written?))
        .context("enabling forwarding on the node")?;

        let node_cgroup = self.cgroup.join(name);
        let node = Node {
            name: name.to_owned(),
            netns,
            ip: node_ip,
            pod_cgroup_root: node_cgroup.join("pods"),
            cgroup: node_cgroup.join("tunnel"),
            bpffs: self.bpffs.join(name),
        };
        for dir in [
            &node_cgroup,
            &node.pod_cgroup_root,
            &node.cgroup,
            &node.bpffs,
        ] {
            fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(node)
    }

    fn add_pod(&mut self, i: usize, j: usize, node: &Node, name: &str) -> Result<()> {
        let netns = format!("{}-pod-{name}", self.prefix);
        add_netns(&netns)?;
        let gateway = Ipv4Addr::new(10, 244, i as u8, 1);
        let pod_ip = Ipv4Addr::new(10, 244, i as u8, 2 + j as u8);
        let link = format!("p{j}");
        let n = node.netns.as_str();
        ip(&[
            "-n", n, "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])?;
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{gateway}/32"),
            "dev",
            &link,
        ])?;
        ip(&["-n", n, "link", "set", &link, "up"])?;
        ip(&[
            "-n",
            n,
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            &link,
        ])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            &gateway.to_string(),
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
            "dev",
            "eth0",
        ])?;
        let cgroup = node.pod_cgroup_root.join(name);
        fs::create_dir(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        self.pods.push(Pod {
            name: name.to_owned(),
            node: node.name.clone(),
            netns,
            ip: pod_ip,
            cgroup,
        });
        Ok(())
    }

    /// The namespace holding the bridge between the nodes (for captures).
    pub fn fabric_netns(&self) -> PathBuf {
        netns_path(&self.fabric)
    }

    /// The per-cluster prefix of every name it made.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The node called `name`; panics if there is none (a test bug).
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name:?} in the cluster"))
    }

    /// The pod called `name`; panics if there is none (a test bug).
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name:?} in the cluster"))
    }

    /// The cgroup holding all of the cluster's cgroups.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The bpffs directory holding all of the cluster's pins.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Every network namespace the cluster made.
    pub fn netns_names(&self) -> Vec<String> {
        let mut names = vec![self.fabric.clone()];
        names.extend(self.nodes.iter().map(|n| n.netns.clone()));
        names.extend(self.pods.iter().map(|p| p.netns.clone()));
        names
    }

    /// Removes everything, reporting what could not be removed. Dropping the cluster
    /// does the same and prints the errors instead.
    pub fn cleanup(mut self) -> Result<()> {
        self.cleaned = true;
        remove_cluster(&self.prefix)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.cleaned {
            if let Err(e) = remove_cluster(&self.prefix) {
                eprintln!("testbed: cleaning up {}: {e:#}", self.prefix);
            }
        }
    }
}

impl fmt::Display for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "cluster {} (fabric netns {})", self.prefix, self.fabric)?;
        for node in &self.nodes {
            writeln!(
                f,
                "  node {:<12} {:<15} netns {}",
                node.name, node.ip, node.netns
            )?;
            for pod in self.pods.iter().filter(|p| p.node == node.name) {
                writeln!(
                    f,
                    "    pod {:<12} {:<15} netns {}",
                    pod.name, pod.ip, pod.netns
                )?;
            }
        }
        Ok(())
    }
}

impl Node {
    /// A command that runs in the node's network namespace and cgroup.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        enter_command(program, &self.netns, &self.cgroup)
    }

    /// A command that runs in the node's network namespace and in `cgroup` (e.g. a
    /// group under the pod cgroup root, where a Kubernetes node keeps its tunnel).
    pub fn command_in_cgroup(&self, program: impl AsRef<OsStr>, cgroup: &Path) -> Result<Command> {
        enter_command(program, &self.netns, cgroup)
    }

    /// Runs `f` on a thread inside the node's network namespace.
    pub fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        in_netns_path(&netns_path(&self.netns), f)
    }
}

impl Pod {
    /// A command that runs in the pod: its network namespace and its cgroup.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        enter_command(program, &self.netns, &self.cgroup)
    }

    /// Runs a command in the pod to completion.
    pub fn run<I, S>(&self, program: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program)?;
        cmd.args(args);
        cmd.output()
            .with_context(|| format!("running {program} in pod {}", self.name))
    }

    /// The pod's network namespace as a path (for setns and BPF attachment).
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// Runs `f` on a thread inside the pod's network namespace. The thread stays in
    /// the test process's cgroup: cgroup-based capture applies to processes started
    /// with [`Pod::command`], not to this.
    pub fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        in_netns_path(&self.netns_path(), f)
    }

    /// Starts a tokio task inside the pod's network namespace, on a thread of its own
    /// with a current-thread runtime; join the handle for its output. (Same cgroup
    /// caveat as [`Pod::in_netns`].)
    pub fn spawn_task<F, Fut>(&self, f: F) -> Result<thread::JoinHandle<Fut::Output>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        let ns = fs::File::open(self.netns_path())
            .with_context(|| format!("opening the netns of pod {}", self.name))?;
        let handle = thread::Builder::new()
            .name(format!("pod-{}", self.name))
            .spawn(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("entering the pod's network namespace");
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("building a tokio runtime");
                runtime.block_on(f())
            })?;
        Ok(handle)
    }
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

fn add_netns(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

fn in_netns_path<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let ns = fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    thread::spawn(move || -> Result<T> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering the network namespace")?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread inside {} panicked", netns.display()))?
}

fn enter_command(program: impl AsRef<OsStr>, netns: &str, cgroup: &Path) -> Result<Command> {
    let ns = fs::File::open(netns_path(netns)).with_context(|| format!("opening netns {netns}"))?;
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
    let mut cmd = Command::new(program);
    // SAFETY: between fork and exec only async-signal-safe syscalls run: write(2)
    // moves the child into the cgroup ("0" means the writer), setns(2) enters the
    // network namespace. Both files are close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Removes every namespace, cgroup and pin named with `prefix`.
fn remove_cluster(prefix: &str) -> Result<()> {
    let mut errors = Vec::new();
    let cgroup = host::testbed_cgroup()?.join(prefix);
    if let Err(e) = remove_cgroup_tree(&cgroup).or_else(|e| match cgroup.exists() {
        false => Ok(()),
        true => Err(e),
    }) {
        errors.push(format!("cgroup {}: {e:#}", cgroup.display()));
    }
    for name in host::netns_names()? {
        if name.starts_with(&format!("{prefix}-")) {
            // Another process sweeping the same leftovers may have won the race.
            if let Err(e) = ip(&["netns", "del", &name]) {
                if host::netns_names()?.contains(&name) {
                    errors.push(format!("netns {name}: {e:#}"));
                }
            }
        }
    }
    let pins = host::testbed_bpffs()?.join(prefix);
    if let Err(e) = host::ignore_missing(fs::remove_dir_all(&pins)) {
        errors.push(format!("bpffs {}: {e}", pins.display()));
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    // The shared parents go too once the last cluster is gone; while another cluster
    // lives they are not empty and stay.
    let _ = fs::remove_dir(host::testbed_cgroup()?);
    let _ = fs::remove_dir(host::testbed_bpffs()?);
    Ok(())
}

/// Kills every process in the cgroup tree, waits for them to go, removes the groups.
fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // cgroup.kill (Linux 5.14) kills the whole subtree at once.
    fs::write(dir.join("cgroup.kill"), "1")
        .with_context(|| format!("killing {}", dir.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while populated(dir)? {
        ensure!(
            Instant::now() < deadline,
            "processes in {} did not exit",
            dir.display()
        );
        thread::sleep(Duration::from_millis(5));
    }
    remove_cgroup_dirs(dir)
}

fn populated(dir: &Path) -> Result<bool> {
    let events = fs::read_to_string(dir.join("cgroup.events"))?;
    Ok(events.lines().any(|l| l == "populated 1"))
}

fn remove_cgroup_dirs(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_dirs(&entry.path())?;
        }
    }
    host::ignore_missing(fs::remove_dir(dir)).with_context(|| format!("removing {}", dir.display()))
}

/// Removes what clusters of processes that no longer run left behind.
pub fn sweep_stale() -> Result<()> {
    let mut stale = HashSet::new();
    let is_stale = |name: &str| -> Option<String> {
        let rest = name.strip_prefix(&format!("{PREFIX}-"))?;
        let mut parts = rest.splitn(3, '-');
        let pid: u32 = parts.next()?.parse().ok()?;
        let seq: u32 = parts.next()?.parse().ok()?;
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        (!alive).then(|| format!("{PREFIX}-{pid}-{seq}"))
    };
    for name in host::netns_names()? {
        stale.extend(is_stale(&name));
    }
    for dir in [host::testbed_cgroup()?, host::testbed_bpffs()?] {
        let entries = match fs::read_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            entries => entries?,
        };
        for entry in entries {
            stale.extend(is_stale(&entry?.file_name().to_string_lossy()));
        }
    }
    for prefix in stale {
        // Another test may be sweeping the same leftovers: missing pieces are fine.
        remove_cluster(&prefix).with_context(|| format!("sweeping {prefix}"))?;
    }
    Ok(())
}
