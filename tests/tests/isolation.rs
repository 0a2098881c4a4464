//! Isolation, attacked from inside an ordinary enrolled pod: the node's localhost,
//! the tunnel itself and UDP are out of reach; enrollment fails closed; a PID that
//! names another namespace is caught; uninstalling the mesh frees the pods.

use std::time::Duration;

use testbed::{
    app::{EchoServer, UdpEcho},
    mesh::{eventually, ztunnel_binary, Mesh, TempDir, WorkloadSpec},
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");

/// node-a: client, local-server; node-b: server, plain (namespace "plain", not
/// ambient).
async fn mesh() -> Mesh {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client", "local-server"])
            .node("node-b", ["server", "plain"]),
    )
    .unwrap();
    let workloads = [
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("local-server", "demo", "server"),
        WorkloadSpec::new("server", "demo", "server"),
        WorkloadSpec::new("plain", "plain", "default"),
    ];
    Mesh::start(cluster, &workloads, &["demo"]).await.unwrap()
}

fn probe(mesh: &Mesh, pod: &str, args: &[&str]) -> String {
    mesh.output(pod, PROBE, args)
}

fn addr(mesh: &Mesh, pod: &str, port: u16) -> String {
    mesh.addr(pod, port)
}

/// Every other pod is still served: local-server → server through the mesh (out of
/// node-a's tunnel), plain → local-server (plaintext into it).
fn others_are_served(mesh: &Mesh) {
    let server = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let out = probe(
        mesh,
        "local-server",
        &["connect", &addr(mesh, "server", 8080), "still"],
    );
    assert!(out.contains("reply=server:still"), "{out}");
    drop(server);
    let local = EchoServer::start(mesh.cluster.pod("local-server"), 8080).unwrap();
    let out = probe(
        mesh,
        "plain",
        &["connect", &addr(mesh, "local-server", 8080), "near"],
    );
    assert!(out.contains("reply=local-server:near"), "{out}");
    drop(local);
}

fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Rewrites the client's `ztunnel.local/netns` annotation in the config.
fn point_client_netns(mesh: &Mesh, path: &str) {
    const KEY: &str = "    ztunnel.local/netns: ";
    let file = mesh.config.path().join("workloads.yaml");
    let yaml = std::fs::read_to_string(file).unwrap();
    let yaml: Vec<String> = yaml
        .split("---\n")
        .map(|pod| match pod.contains("\n  name: client\n") {
            false => pod.to_owned(),
            true => pod
                .lines()
                .map(|l| match l.starts_with(KEY) {
                    true => format!("{KEY}{path}\n"),
                    false => format!("{l}\n"),
                })
                .collect(),
        })
        .collect();
    mesh.write_config("workloads.yaml", &yaml.join("---\n"))
        .unwrap();
}

/// What `ztunnel policy check` says about the client's traffic to the server.
fn policy_check_notes(mesh: &Mesh) -> String {
    let out = std::process::Command::new(ztunnel_binary())
        .args([
            "policy",
            "check",
            "--from",
            "demo/client",
            "--to",
            "demo/server:8080",
        ])
        .arg("--config")
        .arg(mesh.config.path())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn pass_through_leaves_from_the_pod_address() {
    let mesh = mesh().await;
    // plain is outside the mesh: the connection is passed through, dialed from the
    // client's own namespace.
    let echo = EchoServer::start(mesh.cluster.pod("plain"), 8080).unwrap();
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "plain", 8080), "out"],
    );
    assert!(out.contains("reply=plain:out"), "{out}");
    let peers = echo.stop().unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(
        peers[0].ip(),
        mesh.cluster.pod("client").ip,
        "the pass-through left from the node, not the pod"
    );
    others_are_served(&mesh);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_cannot_reach_the_node_admin_through_0_0_0_0() {
    let mesh = mesh().await;
    let node_ip = mesh.cluster.node("node-a").ip;
    for target in [
        "0.0.0.0:15000".to_owned(),
        "0.1.2.3:15000".to_owned(),
        "127.0.0.1:15000".to_owned(),
        format!("{node_ip}:15000"),
        format!("{node_ip}:15020"),
        format!("{node_ip}:15021"),
    ] {
        let out = probe(
            &mesh,
            "client",
            &["connect", &target, "GET /config_dump HTTP/1.0\r\n\r\n"],
        );
        assert!(!out.contains("200 OK"), "{target}: {out}");
        assert!(!out.contains("workloads"), "{target}: {out}");
        assert!(!out.contains("ready"), "{target}: {out}");
    }
    // The tunnel's own ports on the node are refused, and said so.
    eventually(Duration::from_secs(15), "the self-call refused", || async {
        mesh.log("node-a")
            .contains("the destination is the tunnel itself")
    })
    .await;
    // The admin's state-changing endpoint takes POST only.
    let (code, _) = mesh
        .http_request("node-a", 15000, "GET", "/logging?level=trace")
        .await
        .unwrap();
    assert_eq!(code, 405);
    let (code, body) = mesh
        .http_request("node-a", 15000, "POST", "/logging?level=info")
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    others_are_served(&mesh);
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Lowers a process's RLIMIT_NOFILE, so that a loop exhausting it shows at once.
fn limit_fds(pid: u32, limit: u64) {
    let rlim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: a valid rlimit for the kernel to read; no old value asked for.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &rlim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_self_call_to_the_tunnel_port_is_refused_and_others_are_served() {
    let mesh = mesh().await;
    let pid = mesh.tunnel_pid("node-a").unwrap();
    let before = open_fds(pid);
    // Room for normal service, none for a loop.
    limit_fds(pid, before as u64 + 64);
    let client_ip = mesh.cluster.pod("client").ip;
    for target in [
        "127.0.0.1:15006".to_owned(),
        "127.0.0.1:15001".to_owned(),
        "127.0.0.1:15008".to_owned(),
        format!("{client_ip}:15006"),
        format!("{client_ip}:15008"),
        addr(&mesh, "local-server", 15006),
        addr(&mesh, "server", 15008),
    ] {
        let out = probe(&mesh, "client", &["parallel", &target, "20", "loop?"]);
        assert!(!out.contains("loop?"), "{target}: {out}");
    }
    eventually(Duration::from_secs(15), "the self-call refused", || async {
        mesh.log("node-a").contains("a call to the tunnel itself")
    })
    .await;
    // No fds piled up: back to about where it started (pooled HBONE connections
    // and the like aside).
    eventually(Duration::from_secs(15), "the fds released", || async {
        open_fds(pid) <= before + 16
    })
    .await;
    eprintln!(
        "tunnel fds: {before} before, {} after 140 self-calls",
        open_fds(pid)
    );
    assert!(!mesh.log("node-a").contains("Too many open files"));
    others_are_served(&mesh);
}

#[tokio::test(flavor = "multi_thread")]
async fn udp_from_an_ambient_pod_is_dropped_unless_its_namespace_opts_out() {
    let mesh = mesh().await;
    let echo = UdpEcho::start(mesh.cluster.pod("plain"), 9000).unwrap();
    let target = addr(&mesh, "plain", 9000);
    for mode in ["udp", "dns"] {
        let out = probe(&mesh, "client", &[mode, &target, "leak?"]);
        assert!(out.contains("error=Operation not permitted"), "{out}");
    }
    let note = policy_check_notes(&mesh);
    assert!(
        note.contains("UDP other than DNS from demo/client is refused"),
        "{note}"
    );
    // The namespace opts out: the same datagrams go through, in plaintext.
    mesh.write_config(
        "ns-demo.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels:\n    istio.io/dataplane-mode: ambient\n  annotations:\n    ztunnel.io/allow-plaintext-udp: \"true\"\n",
    )
    .unwrap();
    eventually(Duration::from_secs(15), "UDP let through", || async {
        probe(&mesh, "client", &["udp", &target, "allowed"]).contains("reply=plain:allowed")
    })
    .await;
    let note = policy_check_notes(&mesh);
    assert!(note.contains("leaves in plaintext, unjudged"), "{note}");
    let peers = echo.stop().unwrap();
    assert!(!peers.is_empty());
    assert!(peers
        .iter()
        .all(|p| p.ip() == mesh.cluster.pod("client").ip));
    others_are_served(&mesh);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_whose_enrollment_fails_at_restart_stays_captured_and_is_retried() {
    let mut mesh = mesh().await;
    let echo = EchoServer::start(mesh.cluster.pod("plain"), 8080).unwrap();
    mesh.kill_tunnel("node-a");
    // Meanwhile the client's namespace can no longer be found.
    let client_netns = mesh.cluster.pod("client").netns_path();
    point_client_netns(&mesh, "/run/netns/ztb-nowhere");
    mesh.start_tunnel("node-a").await.unwrap();
    eventually(Duration::from_secs(15), "the failure counted", || async {
        metric(
            &mesh.metrics("node-a").await,
            "ztunnel_enrollment_failures_total",
        ) >= 1.0
    })
    .await;
    // Still captured: refused, never sent in plaintext.
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "plain", 8080), "leak?"],
    );
    assert!(out.contains("error=Connection refused"), "{out}");
    assert!(
        !mesh.log("node-a").contains("released a pod"),
        "{}",
        mesh.log("node-a")
    );
    assert!(mesh.log("node-a").contains("enrolling failed"));
    others_are_served(&mesh);
    // Found again: retried and enrolled.
    point_client_netns(&mesh, client_netns.to_str().unwrap());
    mesh.wait_enrolled("node-a", "client", true).await.unwrap();
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "plain", 8080), "back"],
    );
    assert!(out.contains("reply=plain:back"), "{out}");
    assert_eq!(echo.stop().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_netns_path_whose_pid_lives_in_another_pod_is_refused() {
    let mesh = mesh().await;
    // A process of local-server (its namespace, its cgroup): what a reused PID in
    // /proc/<pid>/ns/net looks like from the client's side.
    let mut other = mesh
        .cluster
        .pod("local-server")
        .command("sleep")
        .unwrap()
        .arg("300")
        .spawn()
        .unwrap();
    let mut own = mesh
        .cluster
        .pod("client")
        .command("sleep")
        .unwrap()
        .arg("300")
        .spawn()
        .unwrap();
    point_client_netns(&mesh, &format!("/proc/{}/ns/net", other.id()));
    eventually(Duration::from_secs(15), "the PID refused", || async {
        mesh.log("node-a")
            .contains("which is not in the pod's cgroup")
    })
    .await;
    mesh.wait_enrolled("node-a", "client", false).await.unwrap();
    // Still captured meanwhile (fails closed), and local-server is untouched.
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "plain", 8080), "leak?"],
    );
    assert!(out.contains("error=Connection refused"), "{out}");
    others_are_served(&mesh);
    // The client's own process: accepted.
    point_client_netns(&mesh, &format!("/proc/{}/ns/net", own.id()));
    mesh.wait_enrolled("node-a", "client", true).await.unwrap();
    let echo = EchoServer::start(mesh.cluster.pod("plain"), 8080).unwrap();
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "plain", 8080), "mine"],
    );
    assert!(out.contains("reply=plain:mine"), "{out}");
    assert_eq!(echo.stop().unwrap()[0].ip(), mesh.cluster.pod("client").ip);
    let _ = other.kill();
    let _ = own.kill();
    let _ = other.wait();
    let _ = own.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_netns_path_that_comes_to_name_another_namespace_is_detected() {
    let mesh = mesh().await;
    let dir = TempDir::new("netns-link").unwrap();
    let link = dir.path().join("client");
    let point_link = |pod: &str| {
        let tmp = dir.path().join("tmp");
        std::os::unix::fs::symlink(mesh.cluster.pod(pod).netns_path(), &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
    };
    point_link("client");
    point_client_netns(&mesh, link.to_str().unwrap());
    let enrollments = || mesh.log("node-a").matches("enrolled pod=client").count();
    eventually(
        Duration::from_secs(15),
        "enrolled through the link",
        || async { enrollments() >= 2 },
    )
    .await;
    // The path now names local-server's namespace (as a reused PID would): noticed
    // without any change in the state, and never trusted.
    point_link("local-server");
    eventually(Duration::from_secs(15), "the change noticed", || async {
        metric(
            &mesh.metrics("node-a").await,
            "ztunnel_pod_netns_changed_total",
        ) >= 1.0
    })
    .await;
    assert!(mesh.log("node-a").contains("now names another namespace"));
    let echo = EchoServer::start(mesh.cluster.pod("plain"), 8080).unwrap();
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "plain", 8080), "leak?"],
    );
    assert!(out.contains("error=Connection refused"), "{out}");
    others_are_served(&mesh);
    // Back to the client's own namespace: enrolled again.
    point_link("client");
    mesh.wait_enrolled("node-a", "client", true).await.unwrap();
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "plain", 8080), "mine"],
    );
    assert!(out.contains("reply=plain:mine"), "{out}");
    assert_eq!(echo.stop().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_uninstall_a_formerly_enrolled_pod_reaches_another_pod_directly() {
    let mut mesh = mesh().await;
    let echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    for node in ["node-a", "node-b"] {
        assert!(mesh.stop_tunnel(node).await.unwrap().success());
    }
    // The mesh is deleted but its programs are pinned: the pods fail closed.
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 8080), "cut off"],
    );
    assert!(out.contains("error="), "{out}");
    for node in ["node-a", "node-b"] {
        let node = mesh.cluster.node(node);
        let pins = node.bpffs.join("ztunnel");
        let out = node
            .command(ztunnel_binary())
            .unwrap()
            .arg("uninstall")
            .arg("--pin-dir")
            .arg(&pins)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("pods are no longer captured"), "{text}");
        assert!(!pins.exists());
    }
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 8080), "direct"],
    );
    assert!(out.contains("reply=server:direct"), "{out}");
    let peers = echo.stop().unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(
        peers[0].ip(),
        mesh.cluster.pod("client").ip,
        "direct, not delivered by a tunnel"
    );
}
