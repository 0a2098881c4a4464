//! Where HBONE leaves from: the source pod's own address (the tunnel's socket is
//! made inside the pod's network namespace, as Istio's ztunnel does), one pooled
//! connection per source pod, closed when the pod leaves the mesh, and left for a
//! new one when its peer drains.

use std::{collections::BTreeSet, net::SocketAddrV4, time::Duration};

use testbed::{
    app::{EchoServer, HttpServer},
    capture::Capture,
    mesh::{eventually, LocalCa, Mesh, WorkloadSpec},
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");

/// node-a: client and client-2 (the same service account: one identity, two
/// pods); node-b: server.
fn workloads() -> Vec<WorkloadSpec> {
    vec![
        WorkloadSpec::new("client", "demo", "client").label("app", "client"),
        WorkloadSpec::new("client-2", "demo", "client"),
        WorkloadSpec::new("server", "demo", "server"),
    ]
}

async fn mesh() -> Mesh {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client", "client-2"])
            .node("node-b", ["server"]),
    )
    .unwrap();
    Mesh::start(cluster, &workloads(), &["demo"]).await.unwrap()
}

fn probe(mesh: &Mesh, pod: &str, args: &[&str]) -> String {
    mesh.output(pod, PROBE, args)
}

/// The established TCP connections in `pod`'s network namespace matching the `ss`
/// filter (e.g. `dport = :15008`): (local, peer).
fn established(mesh: &Mesh, pod: &str, filter: &str) -> Vec<(SocketAddrV4, SocketAddrV4)> {
    let mut args = vec!["-Htn", "state", "established"];
    args.extend(filter.split(' '));
    let out = mesh.cluster.pod(pod).run("ss", &args).unwrap();
    assert!(out.status.success(), "ss {args:?} in {pod}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut addrs = line.split_whitespace().filter_map(|w| w.parse().ok());
            Some((addrs.next()?, addrs.next()?))
        })
        .collect()
}

/// The HBONE connections `pod` holds (made by the tunnel inside it).
fn hbone_from(mesh: &Mesh, pod: &str) -> Vec<(SocketAddrV4, SocketAddrV4)> {
    established(mesh, pod, "dport = :15008")
}

#[tokio::test(flavor = "multi_thread")]
async fn hbone_leaves_from_the_client_pods_own_address_not_the_nodes() {
    let mesh = mesh().await;
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let client = mesh.cluster.pod("client").ip;
    let node = mesh.cluster.node("node-a").ip;
    let capture = Capture::start(&mesh.cluster.fabric_netns()).unwrap();
    let out = probe(
        &mesh,
        "client",
        &["connect", &mesh.addr("server", 8080), "hi"],
    );
    assert!(out.contains("reply=server:hi"), "{out}");
    let packets = capture.stop();

    // On the wire: every packet to 15008 comes from the client pod.
    let sources: BTreeSet<_> = packets
        .iter()
        .filter_map(|p| p.tcp_endpoints())
        .filter(|(_, to)| to.port() == 15008)
        .map(|(from, _)| *from.ip())
        .collect();
    assert_eq!(
        sources,
        BTreeSet::from([client]),
        "HBONE sources on the fabric (the node is {node})"
    );
    // The connection is the pod's own (in its namespace, from its address).
    let held = hbone_from(&mesh, "client");
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(*held[0].0.ip(), client);
    assert_eq!(held[0].1.to_string(), mesh.addr("server", 15008));

    // The destination tunnel sees the pod as the peer, and still attributes the
    // stream to it (its `forwarded` address belongs to the identity it proved).
    eventually(
        Duration::from_secs(15),
        "the peer in node-b's log",
        || async {
            mesh.log("node-b").lines().any(|l| {
                l.contains("HBONE connection accepted") && l.contains(&format!("peer={client}:"))
            })
        },
    )
    .await;
    assert!(
        !mesh.log("node-b").contains(&format!("peer={node}:")),
        "{}",
        mesh.log("node-b")
    );
    eventually(
        Duration::from_secs(15),
        "the destination's metrics",
        || async {
            mesh.metrics("node-b").await.lines().any(|l| {
                l.starts_with("istio_tcp_connections_closed_total{")
                    && l.contains("reporter=\"destination\"")
                    && l.contains("source_workload=\"client\"")
                    && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"")
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_pods_on_one_node_never_share_an_hbone_connection() {
    let mesh = mesh().await;
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let capture = Capture::start(&mesh.cluster.fabric_netns()).unwrap();
    // The same identity, the same destination, streams at once from each pod.
    for pod in ["client", "client-2"] {
        let out = probe(
            &mesh,
            pod,
            &["parallel", &mesh.addr("server", 8080), "20", "m"],
        );
        assert!(out.contains("ok=20"), "{pod}: {out}");
    }
    let packets = capture.stop();
    let connections: BTreeSet<SocketAddrV4> = packets
        .iter()
        .filter_map(|p| p.tcp_endpoints())
        .filter(|(_, to)| to.port() == 15008)
        .map(|(from, _)| from)
        .collect();
    let (a, b) = (
        mesh.cluster.pod("client").ip,
        mesh.cluster.pod("client-2").ip,
    );
    assert_eq!(connections.len(), 2, "{connections:?}");
    assert_eq!(
        connections.iter().map(|c| *c.ip()).collect::<BTreeSet<_>>(),
        BTreeSet::from([a, b]),
        "one HBONE connection from each pod's address"
    );
    for pod in ["client", "client-2"] {
        assert_eq!(hbone_from(&mesh, pod).len(), 1, "{pod}");
    }
    assert_eq!(mesh.config_dump("node-a").await["pooled_connections"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_removed_from_the_config_has_its_pooled_hbone_connection_closed() {
    let mesh = mesh().await;
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    for pod in ["client", "client-2"] {
        let out = probe(&mesh, pod, &["connect", &mesh.addr("server", 8080), pod]);
        assert!(out.contains(&format!("reply=server:{pod}")), "{out}");
        assert_eq!(hbone_from(&mesh, pod).len(), 1, "{pod}: pooled, idle");
    }
    let gone = mesh.cluster.pod("client-2").ip;
    let remaining = workloads()
        .iter()
        .filter(|w| w.pod != "client-2")
        .map(|w| mesh.workload_yaml(w).unwrap())
        .collect::<String>();
    mesh.write_config("workloads.yaml", &remaining).unwrap();
    mesh.wait_enrolled("node-a", "client-2", false)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "client-2's HBONE connection closed at both ends",
        || async {
            hbone_from(&mesh, "client-2").is_empty()
                && !established(&mesh, "server", "sport = :15008")
                    .iter()
                    .any(|(_, peer)| *peer.ip() == gone)
        },
    )
    .await;
    // The other pod's connection (same identity, same destination) stays.
    assert_eq!(hbone_from(&mesh, "client").len(), 1);
    assert_eq!(mesh.config_dump("node-a").await["pooled_connections"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_reaching_itself_through_its_service_is_served() {
    // Inside the pod its own address is local (the inbound capture does not take
    // it there): HBONE to itself is the one dialed from the node.
    let mesh = mesh().await;
    mesh.write_config(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: client, namespace: demo}\nspec:\n  clusterIP: 10.96.0.60\n  selector: {app: client}\n  ports:\n  - {port: 80, targetPort: 8080}\n",
    )
    .unwrap();
    eventually(Duration::from_secs(15), "the service on node-a", || async {
        mesh.config_dump("node-a").await["services"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    })
    .await;
    let _echo = EchoServer::start(mesh.cluster.pod("client"), 8080).unwrap();
    let out = probe(&mesh, "client", &["connect", "10.96.0.60:80", "me"]);
    assert!(out.contains("reply=client:me"), "{out}");
}

/// The client's tunnel reaches the waypoint from the client pod's address too.
#[tokio::test(flavor = "multi_thread")]
async fn hbone_to_a_waypoint_leaves_from_the_client_pod() {
    let workloads = vec![
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("server", "demo", "server").label("app", "server"),
        WorkloadSpec::new("waypoint", "demo", "waypoint")
            .label("gateway.networking.k8s.io/gateway-name", "waypoint"),
    ];
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client"])
            .node("node-b", ["server", "waypoint"]),
    )
    .unwrap();
    let mut mesh = Mesh::start(cluster, &workloads, &["demo"]).await.unwrap();
    mesh.write_config("waypoint.yaml", testbed::mesh::WAYPOINT_FOR_SERVER)
        .unwrap();
    eventually(Duration::from_secs(15), "the service on node-a", || async {
        mesh.config_dump("node-a").await["services"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    })
    .await;
    mesh.start_waypoint("waypoint", "demo", "waypoint")
        .await
        .unwrap();
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let out = probe(&mesh, "client", &["http", "10.96.0.80:80", "GET", "/x"]);
    assert!(out.contains("status=200"), "{out}");
    let client = mesh.cluster.pod("client").ip;
    let held = hbone_from(&mesh, "client");
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].1.to_string(), mesh.addr("waypoint", 15008));
    let peers: Vec<_> = established(&mesh, "waypoint", "sport = :15008")
        .into_iter()
        .map(|(_, peer)| *peer.ip())
        .collect();
    assert!(
        peers.contains(&client),
        "the waypoint's HBONE peers: {peers:?}"
    );
    let node = mesh.cluster.node("node-a").ip;
    assert!(
        !peers.contains(&node),
        "the waypoint's HBONE peers: {peers:?}"
    );
}

/// The peer drains (a rolling upgrade of a node tunnel or waypoint): it sends
/// GOAWAY and lets its open streams finish. A new CONNECT must not fail on that
/// connection for as long as they last: it goes on a new connection, while the
/// open stream still carries bytes both ways.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_peers_goaway_a_new_connect_dials_again_and_the_open_stream_still_flows() {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use ztunnel::proxy::stream::H2Stream;

    async fn first_line(stream: &mut H2Stream) -> String {
        let mut line = [0; 13];
        stream.read_exact(&mut line).await.unwrap();
        String::from_utf8_lossy(&line).into_owned()
    }

    let ca = LocalCa::start("cluster.local", &[]).await.unwrap();
    let now = time::OffsetDateTime::now_utc();
    let cert = |sa: &str| {
        let identity = format!("spiffe://cluster.local/ns/demo/sa/{sa}");
        let valid = (
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        );
        Arc::new(ca.forge(&identity, valid.0, valid.1).unwrap())
    };
    let (client, server) = (cert("client"), cert("server"));

    // The peer: each stream is told its connection's number and echoes what it
    // gets; the first connection starts draining at its first stream.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let tls = tokio_rustls::TlsAcceptor::from(server.server_config().unwrap());
    tokio::spawn(async move {
        for number in 0.. {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = tls.clone();
            tokio::spawn(async move {
                let tls = tls.accept(tcp).await.unwrap();
                let mut connection = h2::server::handshake(tls).await.unwrap();
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    if number == 0 {
                        // Queued before the stream's first bytes, so it reaches
                        // the client first.
                        connection.graceful_shutdown();
                    }
                    let send = respond
                        .send_response(http::Response::new(()), false)
                        .unwrap();
                    tokio::spawn(async move {
                        let mut stream = H2Stream::new(send, request.into_body());
                        stream
                            .write_all(format!("connection {number}\n").as_bytes())
                            .await
                            .unwrap();
                        let mut echo = Vec::new();
                        stream.read_to_end(&mut echo).await.unwrap();
                        stream.write_all(&echo).await.unwrap();
                        stream.shutdown().await.unwrap();
                    });
                }
            });
        }
    });

    let pool = ztunnel::proxy::pool::Pool::new(Default::default());
    let peer: ztunnel::identity::Identity =
        "spiffe://cluster.local/ns/demo/sa/server".parse().unwrap();
    let authority = "10.0.0.9:8080".parse().unwrap();
    let connect = || pool.connect(&client, &peer, address, authority, Default::default());
    let (mut open, _open_slot) = connect().await.unwrap();
    // Read after the GOAWAY: the client has seen it.
    assert_eq!(first_line(&mut open).await, "connection 0\n");

    let (mut next, _next_slot) = connect()
        .await
        .expect("a CONNECT after the peer's GOAWAY goes on a new connection");
    assert_eq!(first_line(&mut next).await, "connection 1\n");

    for (stream, bytes) in [
        (&mut open, &b"on the draining one"[..]),
        (&mut next, b"new"),
    ] {
        stream.write_all(bytes).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut echo = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut echo))
            .await
            .expect("the echo came back")
            .unwrap();
        assert_eq!(echo, bytes);
    }
}
