//! Resource exhaustion, performed: out of file descriptors, idle clients holding
//! sockets, DNS floods, dials to a dead destination, a closed output pipe. Each
//! asserts the secure outcome and that everyone else keeps being served.

use std::{
    io::Read,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use testbed::{
    app::EchoServer,
    capture::Capture,
    faults::{
        assert_no_crash, assert_nothing_plaintext, on_every_node, refused_by_policy, tunnels, Load,
    },
    mesh::{eventually, metric, open_fds, set_fd_limit, Mesh, WorkloadSpec},
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");
/// The identities of pods client and server.
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";

/// node-a: client, client-2 (service account `other`); node-b: server, rogue (not
/// in the mesh).
async fn mesh() -> Mesh {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client", "client-2"])
            .node("node-b", ["server", "rogue"]),
    )
    .unwrap();
    let workloads = [
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("client-2", "demo", "other"),
        WorkloadSpec::new("server", "demo", "server"),
    ];
    Mesh::start(cluster, &workloads, &["demo"]).await.unwrap()
}

fn probe(mesh: &Mesh, pod: &str, args: &[&str]) -> String {
    mesh.output(pod, PROBE, args)
}

fn addr(mesh: &Mesh, pod: &str, port: u16) -> String {
    mesh.addr(pod, port)
}

/// The client reaches the server through the mesh.
fn served(mesh: &Mesh, message: &str) {
    let out = probe(
        mesh,
        "client",
        &["connect", &addr(mesh, "server", 8080), message],
    );
    assert!(out.contains(&format!("reply=server:{message}")), "{out}");
}

/// Restarts the node's tunnel with extra arguments.
async fn restart_with(mesh: &mut Mesh, node: &str, args: &[&str]) {
    mesh.kill_tunnel(node);
    mesh.tunnel_args
        .insert(node.into(), args.iter().map(|a| a.to_string()).collect());
    mesh.start_tunnel(node).await.unwrap();
}

/// Whether a held connection has been closed by the server (EOF or reset), waiting
/// up to `within` for it.
fn closed_within(mut stream: &TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readiness_server_survives_fd_exhaustion() {
    let mesh = mesh().await;
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let pid = mesh.tunnel_pid("node-b").unwrap();
    // A few descriptors to spare, then none: every listener's accept fails (EMFILE).
    let old = set_fd_limit(pid, open_fds(pid) as u64 + 3).unwrap();
    let node = mesh.cluster.node("node-b");
    let held = node
        .in_netns(|| {
            (0..40)
                .filter_map(|_| TcpStream::connect(("127.0.0.1", 15021)).ok())
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert!(held.len() > 10, "the kernel queues the connections");
    eventually(
        Duration::from_secs(10),
        "the readiness listener out of descriptors",
        || async {
            mesh.log("node-b")
                .lines()
                .any(|l| l.contains("accept failed") && l.contains("readiness"))
        },
    )
    .await;
    // It keeps retrying, backed off, not spinning; then serves once descriptors are back.
    let exhausted = Instant::now();
    eventually(
        Duration::from_secs(10),
        "more retries over time",
        || async { exhausted.elapsed() > Duration::from_secs(2) },
    )
    .await;
    drop(held);
    set_fd_limit(pid, old).unwrap();
    eventually(Duration::from_secs(10), "ready again", || async {
        mesh.http_get("node-b", 15021, "/healthz/ready")
            .await
            .is_ok_and(|(code, _)| code == 200)
    })
    .await;
    served(&mesh, "after-exhaustion");
    let page = mesh.metrics("node-b").await;
    let errors = metric(
        &page,
        "ztunnel_accept_errors_total",
        &["listener=\"readiness\""],
    );
    assert!(
        errors >= 1.0 && errors < 100.0,
        "accept errors counted and backed off, not spun: {errors}"
    );
    let warnings = mesh
        .log("node-b")
        .lines()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert!(warnings < 30, "warnings rate-limited: {warnings}");
}

/// node-b's HBONE connections refused for `reason`.
async fn refused(mesh: &Mesh, reason: &str) -> f64 {
    metric(
        &mesh.metrics("node-b").await,
        "ztunnel_connections_refused_total",
        &["listener=\"hbone\"", &format!("reason=\"{reason}\"")],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_unauthenticated_client_cannot_hold_the_hbone_port() {
    let mut mesh = mesh().await;
    restart_with(
        &mut mesh,
        "node-b",
        &[
            "--handshake-timeout",
            "1500ms",
            "--max-connections-per-source",
            "8",
        ],
    )
    .await;
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    // From a pod outside the mesh: 20 TCP connections to the server's HBONE port,
    // never a TLS byte.
    let hbone = SocketAddr::new(mesh.cluster.pod("server").ip.into(), 15008);
    let opened = Instant::now();
    let idle = mesh
        .cluster
        .pod("rogue")
        .in_netns(move || {
            (0..20)
                .map(|_| TcpStream::connect_timeout(&hbone, Duration::from_secs(5)).unwrap())
                .collect::<Vec<_>>()
        })
        .unwrap();
    // Over the per-source cap: closed at once, counted. The rest hold their slots
    // for now, and the client, another source, is served meanwhile.
    eventually(Duration::from_secs(5), "12 refused", || async {
        refused(&mesh, "per_source_limit").await == 12.0
    })
    .await;
    let closed = idle
        .iter()
        .filter(|s| closed_within(s, Duration::from_millis(10)))
        .count();
    assert_eq!(closed, 12, "all but the per-source cap closed at once");
    served(&mesh, "while-idle-clients-hold");
    // Then the handshake timeout frees the others.
    for stream in &idle {
        assert!(closed_within(stream, Duration::from_secs(10)));
    }
    let held = opened.elapsed();
    assert!(held < Duration::from_secs(6), "held for {held:?}");
    assert_eq!(refused(&mesh, "handshake_timeout").await, 8.0);
    assert_eq!(refused(&mesh, "per_source_limit").await, 12.0);
    served(&mesh, "after");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_dials_to_an_unreachable_destination_fail_together() {
    let mesh = mesh().await;
    // A mesh workload whose address answers nothing: node-a routes it to a
    // neighbour that does not exist, so a dial fails when ARP gives up (~3 s).
    let ghost = "10.244.1.250";
    mesh.write_config(
        "ghost.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: ghost, namespace: demo}}\nspec: {{serviceAccountName: server, nodeName: node-b}}\nstatus: {{podIP: {ghost}}}\n"),
    )
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the ghost in node-a's state",
        || async {
            mesh.config_dump("node-a").await["workloads"]
                .as_array()
                .is_some_and(|w| w.iter().any(|w| w["ip"] == ghost))
        },
    )
    .await;
    let out = mesh
        .cluster
        .node("node-a")
        .command("ip")
        .unwrap()
        .args(["route", "add", &format!("{ghost}/32"), "via", "172.30.0.99"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = probe(
        &mesh,
        "client",
        &["parallel", &format!("{ghost}:8080"), "4", "x"],
    );
    assert!(out.contains("ok=0"), "{out}");
    let elapsed: Vec<u64> = out
        .lines()
        .filter_map(|l| l.strip_prefix("elapsed_ms=")?.parse().ok())
        .collect();
    assert_eq!(elapsed.len(), 4, "{out}");
    let (first, last) = (elapsed.iter().min().unwrap(), elapsed.iter().max().unwrap());
    // One dial's time, not four in a row (serialized: 3, 6, 9, 12 s).
    assert!(
        last - first < 1500 && *last < 8000,
        "the failures came at {elapsed:?} ms"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_20000_dns_queries_is_bounded_and_counted() {
    let mut mesh = mesh().await;
    // The upstream, in node-a's namespace (testbed::dns's zone): it never answers
    // names under `silent.test.`, so each forwarded one holds its socket until
    // the tunnel gives up on it.
    let sockets = mesh
        .cluster
        .node("node-a")
        .in_netns(|| testbed::dns::bind_upstream("127.0.0.1:0".parse().unwrap()))
        .unwrap()
        .unwrap();
    let upstream_addr = sockets.0.local_addr().unwrap();
    let _seen = testbed::dns::serve_upstream(sockets).unwrap();
    restart_with(
        &mut mesh,
        "node-a",
        &["--dns-upstream", &upstream_addr.to_string()],
    )
    .await;
    let pid = mesh.tunnel_pid("node-a").unwrap();
    let before = open_fds(pid);
    // Every query a different name: none shares an upstream request or the cache.
    let out = probe(
        &mesh,
        "client",
        &["dnsflood", "10.96.0.10:53", "20000", "q{i}.silent.test."],
    );
    assert!(out.contains("sent=20000"), "{out}");
    eventually(Duration::from_secs(10), "drops counted", || async {
        metric(
            &mesh.metrics("node-a").await,
            "ztunnel_dns_queries_dropped_total",
            &["reason=\"pod_limit\""],
        ) > 0.0
    })
    .await;
    // While the flood's queries are in flight: the descriptors stay within the
    // pod's share (a socket per query in flight), the node's budget of sockets
    // for resends (64) and a few of the tunnel's own; another pod is answered.
    let during = open_fds(pid);
    if during > before + 256 + 64 + 16 {
        let kinds = testbed::mesh::fd_kinds(pid);
        let page = mesh.metrics("node-a").await;
        let count = |name| metric(&page, name, &[]);
        panic!(
            "{before} descriptors before, {during} during the flood: {kinds}; forwarded {}, resends withheld {}",
            count("istio_dns_upstream_requests_total"),
            count("ztunnel_dns_upstream_resends_withheld_total"),
        );
    }
    let out = probe(
        &mesh,
        "client-2",
        &["dnsquery", "10.96.0.10:53", "ok.test."],
    );
    assert!(out.contains("code=0\na=192.0.2.10"), "{out}");
    let page = mesh.metrics("node-a").await;
    let forwarded = metric(&page, "istio_dns_upstream_requests_total", &[]);
    assert!(
        forwarded <= 256.0 + 1.0 + 64.0,
        "at most the pod's share (and the other pod's query) forwarded: {forwarded}"
    );
    // Unanswered, the flood's queries would each be resent twice on new sockets:
    // the resends over the node's budget are withheld, and counted.
    eventually(Duration::from_secs(5), "resends withheld", || async {
        metric(
            &mesh.metrics("node-a").await,
            "ztunnel_dns_upstream_resends_withheld_total",
            &[],
        ) > 0.0
    })
    .await;
    // The flooding pod itself is served again once its queries time out, and the
    // descriptors are given back.
    eventually(
        Duration::from_secs(15),
        "the flooder answered again",
        || async {
            probe(
                &mesh,
                "client",
                &["dnsquery", "10.96.0.10:53", "ok-again.test."],
            )
            .contains("a=192.0.2.10")
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "descriptors given back",
        || async { open_fds(pid) < before + 16 },
    )
    .await;
}

#[test]
fn policy_check_into_a_closed_pipe_exits_quietly() {
    let config = testbed::mesh::TempDir::new("closed-pipe").unwrap();
    std::fs::write(
        config.path().join("config.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: demo}\nspec: {serviceAccountName: a, nodeName: n}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: demo}\nspec: {serviceAccountName: b, nodeName: n}\nstatus: {podIP: 10.0.0.2}\n",
    )
    .unwrap();
    // A pipe whose reader is gone before the command writes a byte (`| head -0`).
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(testbed::mesh::ztunnel_binary())
        .args(["policy", "check", "--config"])
        .arg(config.path())
        .args(["--from", "demo/a", "--to", "demo/b:80", "-o", "json"])
        .stdout(std::process::Stdio::from(writer))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "the decision's status: {stderr}"
    );
    assert!(stderr.is_empty(), "quiet: {stderr}");
}

// The fault matrix: each fault asserts that nothing plaintext crossed between the
// nodes, that nothing crashed, and that service comes back.

/// Denies `other` (client-2) the server: a decision that must hold through faults.
const DENY_OTHER: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-other, namespace: demo}\nspec:\n  action: DENY\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/demo/sa/other]}}]\n";

/// client-2 is refused the server by [`DENY_OTHER`] itself.
async fn denied_by_policy(mesh: &Mesh) -> bool {
    let target = addr(mesh, "server", 8080);
    refused_by_policy(
        mesh,
        PROBE,
        "client-2",
        &target,
        "node-b",
        "demo/deny-other",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn tunnels_killed_and_restarted_under_load_let_no_plaintext_cross() {
    let mut mesh = mesh().await;
    mesh.write_config("deny.yaml", DENY_OTHER).unwrap();
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    eventually(Duration::from_secs(10), "the deny policy applied", || {
        denied_by_policy(&mesh)
    })
    .await;
    let capture = Capture::start(&mesh.cluster.fabric_netns()).unwrap();
    let marker = "FAULT-MARKER-1b7e";
    let load = Load::start(
        &mesh,
        PROBE,
        "client",
        &addr(&mesh, "server", 8080),
        6000,
        marker,
    );
    for node in ["node-a", "node-b"] {
        // Under load: SIGKILL (no draining, pins left behind), then a new process.
        eventually(Duration::from_secs(10), "load flowing", || async {
            metric(
                &mesh.metrics("node-a").await,
                "istio_tcp_connections_closed_total",
                &["reporter=\"source\""],
            ) > 0.0
        })
        .await;
        mesh.kill_tunnel(node);
        mesh.start_tunnel(node).await.unwrap();
        // The restarted tunnel adopted its pinned state and serves its pods.
        let pod = if node == "node-a" { "client" } else { "server" };
        mesh.wait_enrolled(node, pod, true).await.unwrap();
    }
    let (ok, failed) = load.finish();
    assert!(ok > 0, "ok={ok} failed={failed}");
    served(&mesh, "after-restarts");
    assert!(
        denied_by_policy(&mesh).await,
        "still denied after the restarts"
    );
    assert_nothing_plaintext(&mesh, &capture.stop(), marker);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_tunnel_reset_mid_stream_ends_the_stream_and_the_next_is_served() {
    let mut mesh = mesh().await;
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let capture = Capture::start(&mesh.cluster.fabric_netns()).unwrap();
    let marker = "RESET-MARKER-5d21";
    // A stream open across the fault: sends, waits, then half-closes and reads.
    let slow = mesh
        .cluster
        .pod("client")
        .command(PROBE)
        .unwrap()
        .args(["slow", &addr(&mesh, "server", 8080), "3000", marker])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "the stream open", || async {
        metric(
            &mesh.metrics("node-b").await,
            "istio_tcp_connections_opened_total",
            &["reporter=\"destination\""],
        ) > 0.0
    })
    .await;
    let node_a = mesh.tunnel_pid("node-a").unwrap();
    mesh.kill_tunnel("node-b");
    let started = Instant::now();
    let out = slow.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !out.contains(&format!("reply=server:{marker}")),
        "the stream cannot have completed: {out}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    mesh.start_tunnel("node-b").await.unwrap();
    // The source tunnel did not crash, dropped the broken pooled connection and
    // serves the next stream.
    assert_eq!(mesh.tunnel_pid("node-a"), Some(node_a));
    served(&mesh, "after-reset");
    assert_nothing_plaintext(&mesh, &capture.stop(), marker);
}

/// A peer holding a valid certificate of the mesh floods a pod's HBONE port
/// with HTTP/2 rapid reset (CVE-2023-44487): streams opened and cancelled at
/// once. Its connection is told to calm down and closed, the tunnel warns and
/// counts it, and serves everyone else meanwhile and after.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_flooding_hbone_with_rapid_reset_is_cut_off_and_others_are_served() {
    use testbed::l7::raw_h2;
    let mesh = mesh().await;
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let flood = mesh
        .hbone_peer("rogue", CLIENT, "server", SERVER, |mut tls| async move {
            use tokio::io::AsyncWriteExt;
            let mut sent = raw_h2::start();
            sent.extend(raw_h2::rapid_reset("server", 1000));
            // Cut off before it is all taken: the write may fail.
            let _ = tls.write_all(&sent).await;
            raw_h2::read_until_closed(&mut tls, Duration::from_secs(30), true).await
        })
        .unwrap();
    served(&mesh, "meanwhile");
    let seen = flood.join().unwrap();
    assert!(
        seen.closed_after.is_some(),
        "closed, not left open: {seen:?}"
    );
    // The GOAWAY, when it reaches the flood: the bytes the tunnel left unread may
    // reset the connection first. The count below is the tunnel's word for it.
    assert!(matches!(seen.goaway, None | Some(11)), "{seen:?}");
    eventually(Duration::from_secs(15), "the flood counted", || async {
        mesh.metrics("node-b")
            .await
            .contains("ztunnel_hbone_protocol_errors_total{reason=\"ENHANCE_YOUR_CALM\"} 1")
    })
    .await;
    assert!(
        mesh.log("node-b")
            .contains("HBONE connection closed: the peer broke HTTP/2 (ENHANCE_YOUR_CALM)"),
        "{}",
        mesh.log("node-b")
    );
    served(&mesh, "after");
}

/// CONNECTs to an application that does not accept (its backlog full: each
/// dial waits for its timeout), cancelled by the peer: the tunnel stops each
/// dial when its CONNECT is cancelled. A cancelled stream frees its place under
/// the connection's stream limit at once, so dials left running behind them
/// would let one peer hold any number of the tunnel's sockets.
#[tokio::test(flavor = "multi_thread")]
async fn cancelled_connects_stop_their_dials_to_a_stalled_application() {
    const CONNECTS: usize = 30;
    let mesh = mesh().await;
    // The application: listening with a one-place backlog, never accepting,
    // the backlog filled from inside the pod (over loopback, not captured).
    let (_app, _held) = mesh
        .cluster
        .pod("server")
        .spawn_task(|| async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("0.0.0.0:8081".parse().unwrap()).unwrap();
            let listener = socket.listen(0).unwrap();
            let mut held = Vec::new();
            while let Ok(Ok(stream)) = tokio::time::timeout(
                Duration::from_millis(300),
                tokio::net::TcpStream::connect("127.0.0.1:8081"),
            )
            .await
            {
                held.push(stream.into_std().unwrap());
            }
            (listener.into_std().unwrap(), held)
        })
        .unwrap()
        .join()
        .unwrap();
    let tunnel = mesh.tunnel_pid("node-b").unwrap();
    let before = open_fds(tunnel);
    let server = mesh.cluster.pod("server").ip;
    let (dialing_tx, dialing_rx) = std::sync::mpsc::channel();
    let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
    let (cancelled_tx, cancelled_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let peer = mesh
        .hbone_peer("rogue", CLIENT, "server", SERVER, move |tls| async move {
            let (mut sender, connection) = h2::client::handshake(tls).await.unwrap();
            tokio::spawn(connection);
            let mut streams = Vec::new();
            for _ in 0..CONNECTS {
                let request = http::Request::connect(format!("{server}:8081"))
                    .body(())
                    .unwrap();
                sender = sender.ready().await.unwrap();
                streams.push(sender.send_request(request, false).unwrap());
            }
            dialing_tx.send(()).unwrap();
            // Dropped: each stream is reset (CANCEL). The connection stays
            // open until the test is done: only the streams go.
            let _ = cancel_rx.await;
            drop(streams);
            cancelled_tx.send(()).unwrap();
            let _ = done_rx.await;
            drop(sender);
        })
        .unwrap();
    dialing_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    eventually(Duration::from_secs(10), "the dials under way", || async {
        open_fds(tunnel) >= before + CONNECTS
    })
    .await;
    cancel_tx.send(()).unwrap();
    cancelled_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // Well within the 10 s the dials would otherwise wait.
    eventually(Duration::from_secs(5), "the dials stopped", || async {
        open_fds(tunnel) < before + CONNECTS / 3
    })
    .await;
    let _ = done_tx.send(());
    peer.join().unwrap();
    // And the tunnel serves on.
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    served(&mesh, "after");
}

#[tokio::test(flavor = "multi_thread")]
async fn at_the_fd_limit_the_tunnel_backs_off_and_serves_again() {
    let mesh = mesh().await;
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let capture = Capture::start(&mesh.cluster.fabric_netns()).unwrap();
    let marker = "FDLIMIT-MARKER-99c0";
    served(&mesh, "before");
    // node-a's tunnel can open no descriptor at all (0-2 are taken): its outbound
    // accept fails (EMFILE) and is retried; the connections wait in the backlog.
    let pid = mesh.tunnel_pid("node-a").unwrap();
    let old = set_fd_limit(pid, 3).unwrap();
    let parallel = mesh
        .cluster
        .pod("client")
        .command(PROBE)
        .unwrap()
        .args(["parallel", &addr(&mesh, "server", 8080), "20", marker])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "outbound accept failing",
        || async {
            mesh.log("node-a")
                .lines()
                .any(|l| l.contains("accept failed") && l.contains("outbound"))
        },
    )
    .await;
    let exhausted = Instant::now();
    eventually(Duration::from_secs(10), "a while at the limit", || async {
        exhausted.elapsed() > Duration::from_secs(2)
    })
    .await;
    set_fd_limit(pid, old).unwrap();
    // The queued connections are taken once descriptors are back.
    let out = parallel.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.contains("ok=20"), "{out}");
    assert_eq!(mesh.tunnel_pid("node-a"), Some(pid));
    let errors = metric(
        &mesh.metrics("node-a").await,
        "ztunnel_accept_errors_total",
        &["listener=\"outbound\""],
    );
    assert!((1.0..100.0).contains(&errors), "backed off: {errors}");
    served(&mesh, "after-fd-limit");
    assert_nothing_plaintext(&mesh, &capture.stop(), marker);
}

/// A directory replaced by a corrupt file, put back on drop (even when a test
/// fails, so that the mesh's cleanup finds it).
struct Replaced {
    dir: std::path::PathBuf,
    aside: std::path::PathBuf,
}

impl Replaced {
    fn new(dir: &std::path::Path) -> Self {
        let aside = dir.with_extension("aside");
        std::fs::rename(dir, &aside).unwrap();
        std::fs::write(dir, CORRUPT).unwrap();
        Self {
            dir: dir.to_owned(),
            aside,
        }
    }
}

impl Drop for Replaced {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.dir);
        let _ = std::fs::rename(&self.aside, &self.dir);
    }
}

/// Not YAML at all: what a truncated write or a stray binary leaves.
const CORRUPT: &str = "\u{1}\u{2}kind: [Pod\n  {{{ not yaml: - :\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_config_keeps_the_last_good_state_and_its_decisions_until_fixed() {
    let mesh = mesh().await;
    mesh.write_config("deny.yaml", DENY_OTHER).unwrap();
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    eventually(Duration::from_secs(10), "the deny policy applied", || {
        denied_by_policy(&mesh)
    })
    .await;
    let before = tunnels(&mesh);
    let capture = Capture::start(&mesh.cluster.fabric_netns()).unwrap();
    let marker = "CORRUPT-MARKER-3c8e";
    let target = addr(&mesh, "server", 8080);
    let nodes = ["node-a", "node-b"];

    // The pods' and the policy's files overwritten with garbage: each refused,
    // counted and logged; every object they held stays as it was.
    let workloads = std::fs::read_to_string(mesh.config.path().join("workloads.yaml")).unwrap();
    mesh.write_config("workloads.yaml", CORRUPT).unwrap();
    mesh.write_config("deny.yaml", CORRUPT).unwrap();
    eventually(
        Duration::from_secs(10),
        "both files refused on both nodes",
        || on_every_node(&mesh, "ztunnel_config_refused_objects", |n| n == 2.0),
    )
    .await;
    for node in nodes {
        let log = mesh.log(node);
        for file in ["workloads.yaml", "deny.yaml"] {
            assert!(
                log.lines()
                    .any(|l| l.contains("config refused") && l.contains(file)),
                "{node} names {file} in its log"
            );
        }
    }
    // The client's first connections: its certificate is issued now, by a CA
    // reading the same directory, from the pods it last read.
    let load = Load::start(&mesh, PROBE, "client", &target, 6000, marker);
    served(&mesh, "files-corrupt");
    assert!(denied_by_policy(&mesh).await, "the DENY still denies");

    // The directory itself replaced by a file: the source fails, counted and
    // logged, and the state stays.
    let replaced = Replaced::new(mesh.config.path());
    eventually(
        Duration::from_secs(10),
        "the source's failure counted on both nodes",
        || on_every_node(&mesh, "ztunnel_config_source_errors_total", |n| n > 0.0),
    )
    .await;
    for node in nodes {
        assert!(
            mesh.log(node).contains("keeping the last good state"),
            "{node} logs the failure"
        );
    }
    served(&mesh, "directory-corrupt");
    assert!(denied_by_policy(&mesh).await, "the DENY still denies");
    mesh.wait_enrolled("node-b", "server", true).await.unwrap();

    // Fixed, with a change: the DENY now names nobody. Applied: client-2 served.
    drop(replaced);
    mesh.write_config("workloads.yaml", &workloads).unwrap();
    mesh.write_config("deny.yaml", &DENY_OTHER.replace("sa/other", "sa/nobody"))
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "no refusal left on either node",
        || on_every_node(&mesh, "ztunnel_config_refused_objects", |n| n == 0.0),
    )
    .await;
    eventually(Duration::from_secs(10), "client-2 served", || async {
        probe(&mesh, "client-2", &["connect", &target, "allowed"]).contains("reply=server:allowed")
    })
    .await;

    let (ok, failed) = load.finish();
    assert!(ok > 0 && failed == 0, "ok={ok} failed={failed}");
    served(&mesh, "fixed");
    assert_no_crash(&mesh, &before);
    assert_nothing_plaintext(&mesh, &capture.stop(), marker);
}
