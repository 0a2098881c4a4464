//! The testbed itself: connectivity, isolation between parallel clusters, cleanup.
//! Run as root (CI does); without root these fail rather than skip.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
};

use testbed::{app::EchoServer, host, Cluster, ClusterSpec};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");

fn two_nodes() -> ClusterSpec {
    ClusterSpec::new()
        .node("node-a", ["client", "neighbour"])
        .node("node-b", ["server"])
}

/// Runs tb-probe in `pod` and returns its `key=value` output.
fn probe(cluster: &Cluster, pod: &str, target: SocketAddr, message: &str) -> String {
    let out = cluster
        .pod(pod)
        .run(PROBE, ["connect", &target.to_string(), message])
        .expect("running tb-probe");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tb-probe failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn pod_to_pod_tcp_across_nodes() {
    let cluster = Cluster::new(&two_nodes()).unwrap();
    let server = cluster.pod("server");
    let client = cluster.pod("client");
    let echo = EchoServer::start(server, 8080).unwrap();

    let out = probe(
        &cluster,
        "client",
        SocketAddr::new(server.ip.into(), 8080),
        "hello",
    );
    assert!(out.contains("reply=server:hello"), "{out}");

    // A tokio task in the pod works the same way, and the server sees the pod's IP:
    // no NAT anywhere on the path.
    let target = SocketAddr::new(server.ip.into(), 8080);
    let reply = client
        .spawn_task(move || testbed::app::exchange(target, "from a task"))
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(reply, "server:from a task");
    let peers = echo.stop().unwrap();
    assert_eq!(peers.len(), 2);
    assert!(peers.iter().all(|p| p.ip() == client.ip), "{peers:?}");
}

#[test]
fn pod_to_pod_tcp_on_the_same_node() {
    let cluster = Cluster::new(&two_nodes()).unwrap();
    let neighbour = cluster.pod("neighbour");
    let echo = EchoServer::start(neighbour, 9000).unwrap();
    let out = probe(
        &cluster,
        "client",
        SocketAddr::new(neighbour.ip.into(), 9000),
        "hi",
    );
    assert!(out.contains("reply=neighbour:hi"), "{out}");
    assert_eq!(echo.stop().unwrap()[0].ip(), cluster.pod("client").ip);
}

#[test]
fn pods_reach_their_node_and_the_other_node() {
    let cluster = Cluster::new(&two_nodes()).unwrap();
    for node in cluster.nodes() {
        let out = cluster
            .pod("client")
            .run("ip", ["route", "get", &node.ip.to_string()])
            .unwrap();
        assert!(out.status.success());
    }
    // A process started in a pod is in the pod's cgroup.
    let mut child = cluster
        .pod("client")
        .command("sleep")
        .unwrap()
        .arg("60")
        .spawn()
        .unwrap();
    let procs = fs::read_to_string(cluster.pod("client").cgroup.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l == child.id().to_string()),
        "{procs}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn parallel_clusters_do_not_collide() {
    // The same spec, the same pod IPs, twice at once: each cluster is its own world.
    let spec = two_nodes();
    let a = Cluster::new(&spec).unwrap();
    let b = Cluster::new(&spec).unwrap();
    assert_ne!(a.prefix(), b.prefix());
    let (names_a, names_b) = (a.netns_names(), b.netns_names());
    assert!(names_a.iter().all(|n| !names_b.contains(n)));

    let echo_a = EchoServer::start(a.pod("server"), 8080).unwrap();
    let echo_b = EchoServer::start(b.pod("server"), 8080).unwrap();
    let target = SocketAddr::new(a.pod("server").ip.into(), 8080);
    assert!(probe(&a, "client", target, "to-a").contains("reply=server:to-a"));
    assert!(probe(&b, "client", target, "to-b").contains("reply=server:to-b"));
    assert_eq!(echo_a.stop().unwrap().len(), 1);
    assert_eq!(echo_b.stop().unwrap().len(), 1);
}

/// What a cluster leaves on the machine, checked after it is gone.
fn assert_nothing_left(prefix: &str, cgroup: &Path, bpffs: &Path) {
    let left: Vec<_> = host::netns_names()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    assert!(left.is_empty(), "network namespaces left: {left:?}");
    assert!(!cgroup.exists(), "cgroup left: {}", cgroup.display());
    assert!(!bpffs.exists(), "bpffs pins left: {}", bpffs.display());
}

fn root_veths() -> Vec<String> {
    let out = host::ip(&["-o", "link", "show", "type", "veth"]).unwrap();
    out.lines().map(str::to_owned).collect()
}

#[test]
fn cleanup_leaves_nothing_behind() {
    let veths_before = root_veths();
    let cluster = Cluster::new(&two_nodes()).unwrap();
    let (prefix, cgroup, bpffs) = (
        cluster.prefix().to_owned(),
        cluster.cgroup().to_owned(),
        cluster.bpffs().to_owned(),
    );
    // A process still running in a pod, and the redirection programs pinned and
    // attached by a node's tunnel, with a pod enrolled.
    let mut sleeper = cluster
        .pod("client")
        .command("sleep")
        .unwrap()
        .arg("600")
        .spawn()
        .unwrap();
    let node = cluster.node("node-a");
    let pod = cluster.pod("client");
    let mut redirector = ztunnel::redirect::Redirector::start(ztunnel::redirect::RedirectConfig {
        pin_dir: node.bpffs.join("ztunnel"),
        pod_cgroup_root: node.pod_cgroup_root.clone(),
    })
    .unwrap();
    let _listeners = redirector
        .enroll(&ztunnel::redirect::PodNetwork {
            netns: pod.netns_path(),
            cgroup: pod.cgroup.clone(),
            ip: pod.ip,
            allow_plaintext_udp: false,
            dns_capture: true,
        })
        .unwrap();
    assert!(node.bpffs.join("ztunnel/links/connect4").exists());
    drop(redirector);

    cluster.cleanup().unwrap();
    assert_nothing_left(&prefix, &cgroup, &bpffs);
    let status = sleeper.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the pod's process was killed with the cluster"
    );
    assert_eq!(
        root_veths(),
        veths_before,
        "veths appeared in the root namespace"
    );
}

#[test]
fn cleanup_runs_when_a_test_panics() {
    let mut made = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = Cluster::new(&two_nodes()).unwrap();
        made = Some((
            cluster.prefix().to_owned(),
            cluster.cgroup().to_owned(),
            cluster.bpffs().to_owned(),
        ));
        panic!("a failing test");
    }));
    assert!(result.is_err());
    let (prefix, cgroup, bpffs) = made.expect("cluster was built");
    assert_nothing_left(&prefix, &cgroup, &bpffs);
}

#[test]
fn leftovers_of_a_killed_run_are_swept() {
    let spec = std::env::temp_dir().join(format!("ztb-spec-{}.yaml", std::process::id()));
    fs::write(&spec, "nodes:\n  - name: lone\n    pods: [p]\n").unwrap();
    let mut holder = Command::new(PROBE)
        .args(["hold-cluster", spec.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let prefix = line
        .trim()
        .strip_prefix("prefix=")
        .expect("holder printed its prefix")
        .to_owned();
    assert!(host::netns_names()
        .unwrap()
        .iter()
        .any(|n| n.starts_with(&prefix)));
    holder.kill().unwrap(); // SIGKILL: no destructor runs
    holder.wait().unwrap();
    fs::remove_file(&spec).unwrap();

    let cgroup = host::testbed_cgroup().unwrap().join(&prefix);
    let bpffs = host::testbed_bpffs().unwrap().join(&prefix);
    assert!(cgroup.exists(), "the killed run left its cgroup");
    testbed::cluster::sweep_stale().unwrap();
    assert_nothing_left(&prefix, &cgroup, &bpffs);
}

#[test]
fn cluster_specs_are_validated() {
    let err = ClusterSpec::from_yaml("nodes:\n  - name: a\n    pods: [x, x]\n").unwrap_err();
    assert!(format!("{err:#}").contains("appears twice"), "{err:#}");
    let err = ClusterSpec::from_yaml("nodes:\n  - name: A_B\n").unwrap_err();
    assert!(format!("{err:#}").contains("a-z"), "{err:#}");
    let err = ClusterSpec::from_yaml("nodez: []\n").unwrap_err();
    assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
    let spec = ClusterSpec::from_file(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clusters/demo.yaml"
    )))
    .unwrap();
    assert_eq!(spec.nodes.len(), 2);
}
