//! The mesh end to end: `ztunnel run` on every testbed node, the CA, real pods.

use std::time::Duration;

use testbed::{
    app::EchoServer,
    mesh::{
        assert_refused_after_connect, eventually, is_reset, refused_after_connect, Mesh,
        WorkloadSpec,
    },
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");

/// node-a: client, local-server; node-b: server, server-2, plain (namespace "plain",
/// not ambient), and rogue (not in the config unless a test declares it).
async fn mesh() -> Mesh {
    mesh_with(Vec::new()).await
}

async fn mesh_with(extra: Vec<WorkloadSpec>) -> Mesh {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client", "local-server"])
            .node("node-b", ["server", "server-2", "plain", "rogue"]),
    )
    .unwrap();
    let mut workloads = vec![
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("local-server", "demo", "server").label("app", "server"),
        WorkloadSpec::new("server", "demo", "server"),
        WorkloadSpec::new("server-2", "demo", "server").label("app", "server"),
        WorkloadSpec::new("plain", "plain", "default"),
    ];
    workloads.extend(extra);
    Mesh::start(cluster, &workloads, &["demo"]).await.unwrap()
}

fn probe(mesh: &Mesh, pod: &str, args: &[&str]) -> String {
    mesh.output(pod, PROBE, args)
}

fn addr(mesh: &Mesh, pod: &str, port: u16) -> String {
    mesh.addr(pod, port)
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_talk_across_nodes_through_the_mesh_with_their_identities() {
    let mesh = mesh().await;
    let server = mesh.cluster.pod("server");
    let echo = EchoServer::start(server, 8080).unwrap();

    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 8080), "hello"],
    );
    assert!(out.contains("reply=server:hello"), "{out}");
    // The application was reached by its node's tunnel, from the client's address.
    let peers = echo.stop().unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].ip(), mesh.cluster.pod("client").ip);

    // Counted on both sides with Istio's names and labels (at close: wait for it).
    eventually(Duration::from_secs(15), "source metrics", || async {
        mesh.metrics("node-a").await.lines().any(|l| {
            l.starts_with("istio_tcp_connections_closed_total{")
                && l.contains("reporter=\"source\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"")
                && l.contains("destination_principal=\"spiffe://cluster.local/ns/demo/sa/server\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
        })
    })
    .await;
    eventually(Duration::from_secs(15), "destination metrics", || async {
        mesh.metrics("node-b").await.lines().any(|l| {
            l.starts_with("istio_tcp_received_bytes_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_workload=\"client\"")
                && l.ends_with(" 5")
        })
    })
    .await;
    eventually(Duration::from_secs(15), "an access-log line", || async {
        mesh.log("node-b")
            .contains("src.identity=spiffe://cluster.local/ns/demo/sa/client")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_on_the_same_node_talk_through_the_mesh() {
    let mesh = mesh().await;
    let local = mesh.cluster.pod("local-server");
    let echo = EchoServer::start(local, 8080).unwrap();
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "local-server", 8080), "near"],
    );
    assert!(out.contains("reply=local-server:near"), "{out}");
    assert_eq!(
        echo.stop().unwrap()[0].ip(),
        mesh.cluster.pod("client").ip,
        "delivered by the tunnel from the client's address"
    );
    eventually(
        Duration::from_secs(15),
        "HBONE on the same node",
        || async {
            mesh.metrics("node-a").await.lines().any(|l| {
                l.starts_with("istio_tcp_connections_opened_total{")
                    && l.contains("reporter=\"destination\"")
                    && l.contains("destination_workload=\"server\"")
                    && l.contains("connection_security_policy=\"mutual_tls\"")
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn large_transfers_and_half_close_deliver_every_byte_both_ways() {
    let mesh = mesh().await;
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let out = probe(
        &mesh,
        "client",
        &["bulk", &addr(&mesh, "server", 8080), "8000000"],
    );
    assert!(out.contains("ok sent=8000000 received=8000000"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn many_concurrent_streams_share_one_pooled_connection() {
    let mesh = mesh().await;
    let echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let out = probe(
        &mesh,
        "client",
        &["parallel", &addr(&mesh, "server", 8080), "50", "m"],
    );
    assert!(out.contains("ok=50"), "{out}");
    assert_eq!(echo.stop().unwrap().len(), 50);
    let dump = mesh.config_dump("node-a").await;
    assert_eq!(dump["pooled_connections"], 1, "{dump}");
}

#[tokio::test(flavor = "multi_thread")]
async fn between_nodes_the_traffic_is_tls_on_15008_never_the_payload() {
    let mesh = mesh().await;
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let capture = testbed::capture::Capture::start(&mesh.cluster.fabric_netns()).unwrap();
    let marker = "PLAINTEXT-MARKER-7f3a9c";
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 8080), marker],
    );
    assert!(out.contains(&format!("reply=server:{marker}")), "{out}");
    let packets = capture.stop();
    let hbone = packets
        .iter()
        .filter(|p| p.tcp_ports().is_some_and(|(s, d)| s == 15008 || d == 15008))
        .count();
    assert!(
        hbone > 0,
        "no packet to or from port 15008 crossed the fabric ({} packets)",
        packets.len()
    );
    assert!(
        packets.iter().all(|p| p
            .tcp_ports()
            .is_none_or(|(s, d)| s == 15008 || d == 15008 || s == 15012 || d == 15012)),
        "TCP other than HBONE (and the CA) crossed the fabric"
    );
    let bytes: Vec<u8> = packets.iter().flat_map(|p| p.data.clone()).collect();
    assert!(
        !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the payload crossed the fabric in the clear"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_vip_reaches_all_its_endpoints() {
    let mesh = mesh().await;
    mesh.write_config(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: server, namespace: demo}\nspec:\n  clusterIP: 10.96.0.50\n  selector: {app: server}\n  ports:\n  - {port: 80, targetPort: 8080}\n",
    )
    .unwrap();
    eventually(
        Duration::from_secs(15),
        "the service in node-a's state",
        || async {
            mesh.config_dump("node-a").await["services"]
                .as_array()
                .is_some_and(|s| !s.is_empty())
        },
    )
    .await;
    let echoes: Vec<_> = ["server", "server-2", "local-server"]
        .iter()
        .map(|p| EchoServer::start(mesh.cluster.pod(p), 8080).unwrap())
        .collect();
    for i in 0..30 {
        let out = probe(
            &mesh,
            "client",
            &["connect", "10.96.0.50:80", &format!("r{i}")],
        );
        assert!(
            out.contains(&format!("server:r{i}")) || out.contains(&format!("server-2:r{i}")),
            "{out}"
        );
    }
    // In turn (the tunnel's round robin, shared with the waypoint): 10 each.
    for echo in echoes {
        let got = echo.stop().unwrap();
        assert_eq!(got.len(), 10, "round robin over 3 endpoints: {got:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spoofed_source_address_is_refused() {
    let mesh = mesh().await;
    let echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let client = mesh.cluster.pod("client");
    let out = client
        .run("ip", ["addr", "add", "10.244.0.200/32", "dev", "eth0"])
        .unwrap();
    assert!(out.status.success());
    let out = probe(
        &mesh,
        "client",
        &[
            "connect-from",
            "10.244.0.200",
            &addr(&mesh, "server", 8080),
            "spoof",
        ],
    );
    assert_refused_after_connect(&out);
    assert!(
        echo.stop().unwrap().is_empty(),
        "the spoofed connection reached the server"
    );
    eventually(Duration::from_secs(15), "the refusal counted", || async {
        mesh.metrics("node-a").await.lines().any(|l| {
            l.starts_with("istio_tcp_connections_closed_total{")
                && l.contains("response_flags=\"DENY\"")
        })
    })
    .await;
    assert!(
        mesh.log("node-a").contains("spoofed source address"),
        "{}",
        mesh.log("node-a")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_edit_is_picked_up_without_restart_and_broken_yaml_is_ignored() {
    let mesh = mesh().await;
    let plain = mesh.cluster.pod("plain");
    let echo = EchoServer::start(plain, 8080).unwrap();
    // "plain" is out of the mesh: the client's tunnel passes the connection through.
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "plain", 8080), "a"],
    );
    assert!(out.contains("reply=plain:a"), "{out}");

    mesh.write_config("broken.yaml", "kind: [unclosed\n")
        .unwrap();
    mesh.write_config(
        "ns-plain.yaml",
        &testbed::mesh::namespace_yaml("plain", true),
    )
    .unwrap();
    mesh.wait_enrolled("node-b", "plain", true).await.unwrap();
    // ... and the client's node sees it in the mesh too.
    eventually(
        Duration::from_secs(15),
        "node-a sees plain captured",
        || async {
            let dump = mesh.config_dump("node-a").await;
            dump["workloads"].as_array().is_some_and(|ws| {
                ws.iter()
                    .any(|w| w["name"] == "plain" && w["captured"] == true)
            })
        },
    )
    .await;
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "plain", 8080), "b"],
    );
    assert!(out.contains("reply=plain:b"), "{out}");
    let peers = echo.stop().unwrap();
    assert_eq!(
        peers[0].ip(),
        mesh.cluster.pod("client").ip,
        "passthrough comes from the client pod, never the node"
    );
    assert_eq!(
        peers[1].ip(),
        mesh.cluster.pod("client").ip,
        "through the mesh it is delivered from the client's address"
    );
    for node in ["node-a", "node-b"] {
        eventually(Duration::from_secs(15), "broken.yaml reported", || async {
            let log = mesh.log(node);
            log.contains("broken.yaml") && log.contains("not valid YAML")
        })
        .await;
        let metrics = mesh.metrics(node).await;
        assert!(
            metrics
                .lines()
                .any(|l| l == "ztunnel_config_refused_objects 1"),
            "{node} counts the broken file"
        );
    }

    // Taking the label away un-enrolls the pod.
    mesh.write_config(
        "ns-plain.yaml",
        &testbed::mesh::namespace_yaml("plain", false),
    )
    .unwrap();
    mesh.wait_enrolled("node-b", "plain", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_presenting_the_wrong_identity_is_refused() {
    // The config says 10.244.1.5 is demo/server (on a node with no tunnel); what
    // answers on its port 15008 holds a valid certificate of the mesh, for another
    // identity.
    let mesh = mesh_with(vec![
        WorkloadSpec::new("rogue", "demo", "server").declared_on("node-z")
    ])
    .await;
    let now = time::OffsetDateTime::now_utc();
    let impostor = mesh
        .ca
        .forge(
            "spiffe://cluster.local/ns/demo/sa/other",
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
        .unwrap();
    let config = impostor.server_config().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let rogue = mesh
        .cluster
        .pod("rogue")
        .spawn_task(move || async move {
            let listener = tokio::net::TcpListener::bind("0.0.0.0:15008")
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let (tcp, _) = listener.accept().await.unwrap();
            // The handshake fails on the client's side: it checks who we are.
            acceptor.accept(tcp).await.is_ok()
        })
        .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();

    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "rogue", 8080), "secret"],
    );
    assert_refused_after_connect(&out);
    let _ = rogue.join();
    eventually(Duration::from_secs(15), "the refusal in the log", || async {
        mesh.log("node-a").contains("peer is spiffe://cluster.local/ns/demo/sa/other, expected spiffe://cluster.local/ns/demo/sa/server")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_application_and_garbage_hbone_are_refused_and_the_tunnel_serves_on() {
    let mesh = mesh().await;
    // Nothing listens on port 9999 in the server pod: HBONE answers 503.
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 9999), "x"],
    );
    assert_refused_after_connect(&out);
    // Flagged as Istio's ztunnel flags an unreachable upstream, on both sides:
    // the server's tunnel could not reach the application, the client's got 503.
    eventually(
        Duration::from_secs(15),
        "503 counted as an upstream failure on both sides",
        || async {
            let flagged = |metrics: String, reporter: &str| {
                metrics.lines().any(|l| {
                    l.starts_with("istio_tcp_connections_closed_total{")
                        && l.contains(&format!("reporter=\"{reporter}\""))
                        && l.contains("response_flags=\"CONNECT\"")
                })
            };
            flagged(mesh.metrics("node-b").await, "destination")
                && flagged(mesh.metrics("node-a").await, "source")
        },
    )
    .await;
    assert!(
        access_line(
            &mesh.log("node-b"),
            &["response_flags=CONNECT", ":9999", "application unreachable"]
        ),
        "{}",
        mesh.log("node-b")
    );
    assert!(
        access_line(
            &mesh.log("node-a"),
            &["response_flags=CONNECT", ":9999", "503"]
        ),
        "{}",
        mesh.log("node-a")
    );
    assert!(mesh.log("node-a").contains("503"), "{}", mesh.log("node-a"));
    // The refusal itself reached the tunnel's delivery socket (bound to the
    // client's address), not a connect timeout.
    let log = mesh.log("node-b");
    assert!(
        log.lines()
            .any(|l| l.contains("application unreachable") && l.contains("Connection refused")),
        "{log}"
    );

    // Garbage to port 15008.
    let server_ip = mesh.cluster.pod("server").ip;
    let closed = mesh
        .cluster
        .node("node-a")
        .in_netns(move || -> std::io::Result<usize> {
            use std::io::{Read, Write};
            let mut tcp = std::net::TcpStream::connect((server_ip, 15008))?;
            tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff garbage")?;
            let mut buf = Vec::new();
            let _ = tcp.read_to_end(&mut buf);
            Ok(buf.len())
        })
        .unwrap();
    assert!(closed.is_ok(), "the connection was not closed: {closed:?}");

    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 8080), "still"],
    );
    assert!(out.contains("reply=server:still"), "{out}");
}

/// A draining tunnel tells its HBONE peers with GOAWAY (NO_ERROR), so that they
/// open no more streams on a connection about to go and dial afresh; a
/// connection with no stream open then closes at once, not at the end of the
/// grace period.
#[tokio::test(flavor = "multi_thread")]
async fn a_draining_tunnel_sends_goaway_on_its_hbone_connections() {
    use testbed::l7::raw_h2;
    let mut mesh = mesh().await;
    let (connected_tx, connected_rx) = std::sync::mpsc::channel();
    let peer = mesh
        .hbone_peer(
            "rogue",
            "spiffe://cluster.local/ns/demo/sa/client",
            "server",
            "spiffe://cluster.local/ns/demo/sa/server",
            move |mut tls| async move {
                use tokio::io::AsyncWriteExt;
                tls.write_all(&raw_h2::start()).await.unwrap();
                connected_tx.send(()).unwrap();
                raw_h2::read_until_closed(&mut tls, Duration::from_secs(30), true).await
            },
        )
        .unwrap();
    connected_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let status = mesh.stop_tunnel("node-b").await.unwrap();
    assert!(status.success(), "exit status {status}");
    let seen = peer.join().unwrap();
    assert_eq!(seen.goaway, Some(0), "GOAWAY(NO_ERROR): {seen:?}");
    // Closed at once, so the drain waited for nothing (not the grace period).
    let log = mesh.log("node-b");
    assert!(
        log.contains("drained") && !log.contains("still open at the drain deadline"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_open_connections_then_the_pod_fails_closed() {
    let mut mesh = mesh().await;
    let echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let (mut slow, mut stdout) = slow_exchange(&mesh, 3000, "patience");
    eventually(
        Duration::from_secs(15),
        "the connection open at the source",
        || async {
            mesh.metrics("node-a").await.lines().any(|l| {
                l.starts_with("istio_tcp_connections_opened_total{")
                    && l.contains("reporter=\"source\"")
            })
        },
    )
    .await;

    let pid = mesh.tunnel_pid("node-a").unwrap();
    let started = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // Draining: a new connection is refused (the pod's listeners are closed, it
    // fails closed) while the open one is still being served. (One made before
    // the listeners closed is served.)
    let served_late = std::sync::atomic::AtomicUsize::new(0);
    eventually(
        Duration::from_secs(3),
        "new connections refused while draining",
        || async {
            let out = probe(
                &mesh,
                "client",
                &["connect", &addr(&mesh, "server", 8080), "late"],
            );
            if out.contains("reply=server:late") {
                served_late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            out.contains("error=Connection refused")
        },
    )
    .await;
    assert!(
        slow.try_wait().unwrap().is_none(),
        "the open connection was still in flight"
    );
    // A second SIGTERM changes nothing: the drain goes on.
    let status = mesh.stop_tunnel("node-a").await.unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(5 + 2),
        "exited {:?} after SIGTERM: the grace period is 5 s",
        started.elapsed()
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(
        rest.contains("reply=server:patience"),
        "the open connection was cut: {rest}"
    );
    assert!(slow.wait().unwrap().success());
    assert!(
        mesh.log("node-a").contains("draining"),
        "{}",
        mesh.log("node-a")
    );

    // The tunnel is gone: the pod fails closed.
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 8080), "leak?"],
    );
    assert!(out.contains("error=Connection refused"), "{out}");
    assert_eq!(
        echo.stop().unwrap().len(),
        1 + served_late.into_inner(),
        "nothing reached the server but the open connection and those made before the listeners closed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_from_outside_the_mesh_is_delivered_with_no_identity() {
    let mesh = mesh().await;
    let server = mesh.cluster.pod("server");
    let echo = EchoServer::start(server, 8080).unwrap();
    let out = probe(
        &mesh,
        "plain",
        &["connect", &addr(&mesh, "server", 8080), "clear"],
    );
    assert!(out.contains("reply=server:clear"), "{out}");
    assert_eq!(
        echo.stop().unwrap()[0].ip(),
        mesh.cluster.pod("plain").ip,
        "delivered by the tunnel from the client's address"
    );
    // Its address names a workload, but nothing proves it: no principal.
    eventually(
        Duration::from_secs(15),
        "plaintext counted without identity",
        || async {
            mesh.metrics("node-b").await.lines().any(|l| {
                l.starts_with("istio_tcp_connections_closed_total{")
                    && l.contains("source_workload=\"plain\"")
                    && l.contains("source_principal=\"unknown\"")
                    && l.contains("connection_security_policy=\"unknown\"")
            })
        },
    )
    .await;
}

const ALLOW_CLIENT: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-from-client, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_real_policy_allows_and_refuses_real_connections() {
    let mesh = mesh().await;
    mesh.write_config("policy.yaml", ALLOW_CLIENT).unwrap();
    eventually(
        Duration::from_secs(15),
        "the policy loaded on node-b",
        || async {
            mesh.config_dump("node-b").await["policies"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
        },
    )
    .await;
    let echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 8080), "ok"],
    );
    assert!(out.contains("reply=server:ok"), "{out}");
    // local-server runs as demo/server: not allowed.
    let out = probe(
        &mesh,
        "local-server",
        &["connect", &addr(&mesh, "server", 8080), "no"],
    );
    assert_refused_after_connect(&out);
    assert_eq!(
        echo.stop().unwrap().len(),
        1,
        "the denied connection never reached the app"
    );
    eventually(
        Duration::from_secs(15),
        "the denial explained and counted",
        || async {
            mesh.log("node-b")
                .contains("connection denied: no ALLOW policy matched")
                && mesh.metrics("node-b").await.contains(
                    "ztunnel_connections_denied_total{policy=\"none\",kind=\"authorization\"} 1",
                )
        },
    )
    .await;
    let log = mesh.log("node-b");
    let line = log
        .lines()
        .find(|l| l.contains("connection denied"))
        .unwrap();
    assert!(
        line.contains("spiffe://cluster.local/ns/demo/sa/server") && line.contains("port=8080"),
        "{line}"
    );
    // Flagged DENY, as Istio's ztunnel flags a policy refusal: in the access log
    // and in Istio's TCP metrics.
    assert!(
        access_line(
            &log,
            &[
                "response_flags=DENY",
                "src.workload=demo/local-server",
                "no ALLOW policy matched"
            ]
        ),
        "{log}"
    );
    eventually(
        Duration::from_secs(15),
        "the denial flagged DENY",
        || async {
            mesh.metrics("node-b").await.lines().any(|l| {
                l.starts_with("istio_tcp_connections_closed_total{")
                    && l.contains("reporter=\"destination\"")
                    && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/server\"")
                    && l.contains("response_flags=\"DENY\"")
            })
        },
    )
    .await;

    // A DENY policy names itself (the application is up: only policy stops it).
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    // Loaded first, then one connection: a connection failing for any other reason
    // must not pass for the policy's work (and leave nothing to count).
    deny_the_client(&mesh).await;
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 8080), "x"],
    );
    // Refused by node-b's tunnel, not failed on the way: anything else fails
    // here, with the probe's output (not later, as a missing count).
    assert_refused_after_connect(&out);
    eventually(Duration::from_secs(15), "the DENY counted by name", || async {
        mesh.metrics("node-b").await.contains("ztunnel_connections_denied_total{policy=\"demo/no-client\",kind=\"authorization\"}")
    })
    .await;
}

/// DENY policy demo/no-client (the client's service account), loaded on node-b.
async fn deny_the_client(mesh: &Mesh) {
    mesh.write_config(
        "deny.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-client, namespace: demo}\nspec:\n  action: DENY\n  rules: [{from: [{source: {principals: ['*/sa/client']}}]}]\n",
    )
    .unwrap();
    eventually(
        Duration::from_secs(15),
        "the DENY policy loaded on node-b",
        || async {
            mesh.config_dump("node-b").await["policies"]
                .to_string()
                .contains("no-client")
        },
    )
    .await;
}

/// A refused connection ends in a reset, never in an orderly close that the
/// client could take for an empty answer, however the refusal races the client's
/// first bytes: many at once, so that some refusals arrive after the source
/// tunnel has read those bytes and before it has passed them on.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_connection_is_reset_never_closed_as_if_answered() {
    const CONNECTIONS: usize = 40;
    let mesh = mesh().await;
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    deny_the_client(&mesh).await;
    let out = probe(
        &mesh,
        "client",
        &[
            "parallel",
            &addr(&mesh, "server", 8080),
            &CONNECTIONS.to_string(),
            "x",
        ],
    );
    // An orderly close shows as "a reply did not match" (an empty reply).
    let resets = out.lines().filter(|l| is_reset(l)).count();
    assert_eq!(resets, CONNECTIONS, "every refusal a reset:\n{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn strict_refuses_a_client_outside_the_mesh() {
    let mesh = mesh().await;
    let echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    mesh.write_config("pa.yaml", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n")
        .unwrap();
    eventually(
        Duration::from_secs(15),
        "the policy loaded on node-b",
        || async {
            mesh.config_dump("node-b").await["policies"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
        },
    )
    .await;
    let out = probe(
        &mesh,
        "plain",
        &["connect", &addr(&mesh, "server", 8080), "clear"],
    );
    assert_refused_after_connect(&out);
    // Mesh traffic is mTLS: unaffected.
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 8080), "tls"],
    );
    assert!(out.contains("reply=server:tls"), "{out}");
    assert_eq!(echo.stop().unwrap().len(), 1);
    assert!(
        mesh.log("node-b")
            .contains("plaintext refused: PeerAuthentication demo/strict is STRICT"),
        "{}",
        mesh.log("node-b")
    );
    assert!(mesh.metrics("node-b").await.contains(
        "ztunnel_connections_denied_total{policy=\"demo/strict\",kind=\"peer_authentication\"}"
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_edit_closes_a_live_connection() {
    let mesh = mesh().await;
    let echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let (mut slow, mut stdout) = slow_exchange(&mesh, 4000, "doomed");
    eventually(
        Duration::from_secs(15),
        "the connection open at the destination",
        || async {
            mesh.metrics("node-b").await.lines().any(|l| {
                l.starts_with("istio_tcp_connections_opened_total{")
                    && l.contains("reporter=\"destination\"")
            })
        },
    )
    .await;
    mesh.deny_all_and_wait_for_a_live_connection_closed("node-b")
        .await;
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
    let _ = slow.wait();
    assert!(
        !rest.contains("server:doomed"),
        "the denied connection carried on: {rest}"
    );
    let _ = echo.stop();
}

/// Starts a slow exchange from the client to the server (connect, send, wait
/// `millis`, then half-close and read); returns once it is connected.
fn slow_exchange(
    mesh: &Mesh,
    millis: u64,
    message: &str,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
) {
    let mut slow = mesh
        .cluster
        .pod("client")
        .command(PROBE)
        .unwrap()
        .args([
            "slow",
            &addr(mesh, "server", 8080),
            &millis.to_string(),
            message,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(slow.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    (slow, stdout)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_that_left_the_mesh_while_the_tunnel_was_down_is_released() {
    let mut mesh = mesh().await;
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    // The tunnel dies; meanwhile the client's namespace leaves the mesh.
    mesh.kill_tunnel("node-a");
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 8080), "x"],
    );
    assert!(
        out.contains("error=Connection refused"),
        "fail closed while away: {out}"
    );
    mesh.write_config(
        "ns-demo.yaml",
        &testbed::mesh::namespace_yaml("demo", false),
    )
    .unwrap();
    mesh.start_tunnel("node-a").await.unwrap();
    // Back, it releases the client: its traffic flows directly (plaintext: the
    // server's namespace is not ambient either now).
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 8080), "free"],
    );
    assert!(out.contains("reply=server:free"), "{out}");
    assert!(
        mesh.log("node-a")
            .contains("released a pod a previous run enrolled"),
        "{}",
        mesh.log("node-a")
    );
}

/// Writes a policy and waits until node-b's tunnel has it in force.
async fn apply_policy(mesh: &Mesh, file: &str, name: &str, yaml: &str) {
    mesh.write_config(file, yaml).unwrap();
    eventually(
        Duration::from_secs(15),
        &format!("{name} in force on node-b"),
        || async {
            mesh.config_dump("node-b").await["policies"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["name"] == name))
        },
    )
    .await;
}

/// Istio's "require mutual TLS" DENY: a plaintext peer's principal is empty, which
/// `notPrincipals: ['*']` matches (ISTIO-SECURITY-2021-004).
#[tokio::test(flavor = "multi_thread")]
async fn a_plaintext_peer_matches_not_principals_in_a_deny() {
    let mesh = mesh().await;
    let echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    apply_policy(&mesh, "require-mtls.yaml", "require-mtls", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: require-mtls, namespace: demo}\nspec:\n  action: DENY\n  rules: [{from: [{source: {notPrincipals: ['*']}}]}]\n").await;
    // The attack: plaintext from outside the mesh (namespace "plain").
    let out = probe(
        &mesh,
        "plain",
        &["connect", &addr(&mesh, "server", 8080), "clear"],
    );
    assert_refused_after_connect(&out);
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 8080), "tls"],
    );
    assert!(out.contains("reply=server:tls"), "mTLS refused: {out}");
    assert_eq!(
        echo.stop().unwrap().len(),
        1,
        "only the mTLS connection arrived"
    );
    eventually(Duration::from_secs(15), "the denial named", || async {
        mesh.log("node-b")
            .contains("denied by DENY policy demo/require-mtls")
    })
    .await;
}

/// An ALLOW policy with one invalid rule stays in force: the workload stays closed
/// to everyone its valid rules do not allow.
#[tokio::test(flavor = "multi_thread")]
async fn an_allow_policy_with_an_invalid_rule_keeps_the_workload_closed() {
    let mesh = mesh().await;
    let echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    apply_policy(&mesh, "half-bad.yaml", "half-bad", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: half-bad, namespace: demo}\nspec:\n  rules:\n  - from: [{source: {ipBlocks: [10.244.0.0/33]}}]\n  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]\n").await;
    // local-server runs as demo/server, plain has no identity: neither is allowed.
    for pod in ["local-server", "plain"] {
        let out = probe(&mesh, pod, &["connect", &addr(&mesh, "server", 8080), "in"]);
        assert!(refused_after_connect(&out), "{pod}: not refused: {out}");
    }
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 8080), "ok"],
    );
    assert!(out.contains("reply=server:ok"), "the valid rule: {out}");
    assert_eq!(echo.stop().unwrap().len(), 1);
    // The refusal stays visible.
    assert!(mesh
        .metrics("node-b")
        .await
        .lines()
        .any(|l| l == "ztunnel_config_refused_objects 1"));
    assert!(mesh
        .log("node-b")
        .contains("rules[0].from[0].source.ipBlocks"));
}

/// A DENY policy that cannot be compiled denies all traffic to what it selects.
#[tokio::test(flavor = "multi_thread")]
async fn a_deny_policy_that_cannot_compile_denies_everything() {
    let mesh = mesh().await;
    let echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let out = probe(
        &mesh,
        "client",
        &["connect", &addr(&mesh, "server", 8080), "before"],
    );
    assert!(out.contains("reply=server:before"), "{out}");
    apply_policy(&mesh, "broken-deny.yaml", "broken-deny", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: broken-deny, namespace: demo}\nspec:\n  action: DENY\n  rules: [{from: [{source: {ipBlocks: [10.244.1.0/99]}}]}]\n").await;
    for pod in ["client", "local-server", "plain"] {
        let out = probe(
            &mesh,
            pod,
            &["connect", &addr(&mesh, "server", 8080), "after"],
        );
        assert!(refused_after_connect(&out), "{pod}: not refused: {out}");
    }
    assert_eq!(
        echo.stop().unwrap().len(),
        1,
        "only the connection before the policy"
    );
    eventually(Duration::from_secs(15), "the denial explained", || async {
        mesh.log("node-b")
            .contains("denied by DENY policy demo/broken-deny (refused as invalid")
    })
    .await;
    assert!(mesh
        .metrics("node-b")
        .await
        .lines()
        .any(|l| l == "ztunnel_config_refused_objects 1"));
}

/// `portLevelMtls` keys are YAML integers in Istio's examples: such a policy is
/// accepted and its STRICT workload stays STRICT where it says so.
#[tokio::test(flavor = "multi_thread")]
async fn integer_port_level_mtls_keys_keep_a_port_strict() {
    let mesh = mesh().await;
    let server = mesh.cluster.pod("server-2");
    let _strict = EchoServer::start(server, 8080).unwrap();
    let _open = EchoServer::start(server, 8081).unwrap();
    apply_policy(&mesh, "pa.yaml", "server-strict", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: server-strict, namespace: demo}\nspec:\n  selector: {matchLabels: {app: server}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8081:\n      mode: PERMISSIVE\n").await;
    let out = probe(
        &mesh,
        "plain",
        &["connect", &addr(&mesh, "server-2", 8080), "clear"],
    );
    assert_refused_after_connect(&out);
    let out = probe(
        &mesh,
        "plain",
        &["connect", &addr(&mesh, "server-2", 8081), "open"],
    );
    assert!(
        out.contains("reply=server-2:open"),
        "the PERMISSIVE port: {out}"
    );
    eventually(Duration::from_secs(15), "the refusal named", || async {
        mesh.log("node-b")
            .contains("plaintext refused: PeerAuthentication demo/server-strict is STRICT")
    })
    .await;
    assert!(mesh
        .metrics("node-b")
        .await
        .lines()
        .any(|l| l == "ztunnel_config_refused_objects 0"));
}

/// A CA that takes connections and never answers holds only the HBONE connections
/// waiting for a certificate, each within its own handshake deadline: the pod's
/// listener keeps accepting (the certificate is not awaited in the accept loop).
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_ca_does_not_stall_hbone_accepts() {
    let mut mesh = mesh().await;
    // Bound where the CA listens, never accepted from: TCP connects (the kernel's
    // backlog), TLS never answers.
    let (ip, netns) = (mesh.ca.addr.ip(), mesh.ca.netns.clone());
    let bind = move || std::net::TcpListener::bind((ip, 0));
    let stalled = match &netns {
        Some(netns) => ztunnel::netns::run_in(netns, bind).unwrap(),
        None => bind().unwrap(),
    };
    mesh.stop_tunnel("node-b").await.unwrap();
    mesh.ca.addr = stalled.local_addr().unwrap();
    mesh.tunnel_args.insert(
        "node-b".into(),
        vec!["--handshake-timeout".into(), "1s".into()],
    );
    mesh.start_tunnel("node-b").await.unwrap();

    // Four connections to the server's HBONE port (from outside the mesh): the
    // new tunnel has no certificate for it and cannot get one.
    let target = addr(&mesh, "server", 15008);
    let probes: Vec<_> = (0..4)
        .map(|_| {
            let (pod, target) = (mesh.cluster.pod("plain").clone(), target.clone());
            std::thread::spawn(move || pod.run(PROBE, ["connect", target.as_str(), "hello"]))
        })
        .collect();
    // Each accepted and closed at its own deadline. Were the accept loop waiting
    // for the CA (5 s per attempt), none would be timed out in the handshake.
    eventually(
        Duration::from_secs(8),
        "four HBONE connections accepted and timed out in their handshakes",
        || async {
            testbed::mesh::metric(
                &mesh.metrics("node-b").await,
                "ztunnel_connections_refused_total",
                &["listener=\"hbone\"", "reason=\"handshake_timeout\""],
            ) >= 4.0
        },
    )
    .await;
    for probe in probes {
        let out = probe.join().unwrap().unwrap();
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_refused_after_connect(&out);
    }
    drop(stalled);
}

/// Whether `log` has an access-log line (a connection's) holding every one of `needles`.
fn access_line(log: &str, needles: &[&str]) -> bool {
    log.lines()
        .filter(|l| l.contains(" access: ") && l.contains("connection"))
        .any(|l| needles.iter().all(|n| l.contains(n)))
}
