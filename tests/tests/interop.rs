//! Interoperability with Istio's own ztunnel (a test peer, never part of the
//! product): `$ISTIO_ZTUNNEL`, or `shared/peers/istio-ztunnel` beside the checkout.
//! Run alone with `cargo xtask interop`.
//!
//! Here Istio's ztunnel gets its certificates from our CA (`ztunnel-ca`, in a
//! testbed node), over Istio's CA API, in both of its modes; and, in dedicated mode
//! in testbed pods, carries real traffic to and from pods our tunnel serves.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use base64::Engine as _;
use testbed::{
    app::EchoServer,
    istio::{self, ca_env, http_get, wait_for_line, IstioProxy, Running},
    mesh::{eventually, metric, LocalCa, Mesh, PodOnNode, TempDir, WorkloadSpec, CA_SERVER_NAME},
    Cluster, ClusterSpec,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TD: &str = "cluster.local";
const CA_PORT: u16 = 15012;

/// Istio's ztunnel. Its absence fails the test loudly: CI has it.
fn istio_ztunnel() -> PathBuf {
    istio::find().expect("the interop tests need Istio's ztunnel")
}

/// Our CA (`ztunnel-ca`) in node-a's network namespace, knowing `pods`.
struct OurCa {
    files: LocalCa,
    addr: SocketAddr,
    log: PathBuf,
    _process: Running,
}

impl OurCa {
    async fn start(cluster: &Cluster, pods: &[PodOnNode<'_>]) -> Self {
        // A LocalCa lays out the files (root, node tokens, pods); the CA serving
        // them is the `ztunnel-ca` binary.
        let mut files = LocalCa::start(TD, pods).await.unwrap();
        files.stop().await;
        let node = cluster.node("node-a");
        let addr = SocketAddr::new(node.ip.into(), CA_PORT);
        let dir = files.dir.path().to_owned();
        let log = dir.join("ca.log");
        let process = node
            .command(testbed::mesh::ca_binary())
            .unwrap()
            .args(["--trust-domain", TD, "--server-name", CA_SERVER_NAME])
            .arg("--dir")
            .arg(dir.join("cacerts"))
            .arg("--node-tokens")
            .arg(dir.join("node-tokens.yaml"))
            .arg("--config")
            .arg(dir.join("config"))
            .args(["--listen", &addr.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let ca = Self {
            files,
            addr,
            log,
            _process: Running(process),
        };
        ca.wait_for_log("CA serving", Duration::from_secs(10)).await;
        ca
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_for_log(&self, text: &str, within: Duration) {
        wait_for_line("the CA's log", || self.log(), &[text], within).await;
    }

    /// The environment that points Istio's ztunnel at this CA as `node`'s proxy.
    fn env_for(&self, node: &str) -> Vec<(String, String)> {
        ca_env(
            self.addr,
            &self.files.dir.path().join("cacerts/root-cert.pem"),
            &self.files.token_file(node),
        )
    }
}

/// Istio's local-config entry for a workload in `mesh`.
fn workload_yaml(name: &str, service_account: &str, ip: &str, node: &str) -> String {
    istio::workload_yaml(NS, name, service_account, ip, node)
}

/// Istio's ztunnel's `/config_dump`, read from inside `netns`.
fn config_dump(netns: PathBuf) -> Option<serde_json::Value> {
    let (_, json) = http_get(&netns, 15000, "/config_dump")?;
    serde_json::from_str(&json).ok()
}

/// The state Istio's ztunnel reports for the certificate of `identity`, once it has one.
async fn certificate_state(netns: &Path, identity: &str, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let netns = netns.to_owned();
        let dump = tokio::task::spawn_blocking(move || config_dump(netns))
            .await
            .unwrap();
        let found = dump.as_ref().and_then(|d| {
            d["certificates"]
                .as_array()?
                .iter()
                .find(|c| c["identity"] == identity)
                .cloned()
        });
        if let Some(cert) = found {
            let state = cert["state"].as_str().unwrap_or_default();
            // Settled: a certificate, or a refusal the CA explained.
            if state == "Available" || state.contains("gRPC error") {
                return cert;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Istio's ztunnel reports no certificate for {identity} within {within:?}: {dump:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pem_of(entry: &serde_json::Value) -> String {
    let encoded = entry["pem"].as_str().expect("a pem field");
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap(),
    )
    .unwrap()
}

/// Asserts that `cert` (from Istio's config dump) is a chain from our CA.
fn assert_issued_by(cert: &serde_json::Value, ca: &OurCa) {
    assert_eq!(cert["state"], "Available", "{cert:#}");
    let root = ca.files.root_pem();
    // Compared as DER: Istio's ztunnel wraps PEM lines its own way.
    let roots: Vec<_> = cert["rootCerts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|entry| ztunnel::tls::parse_certs(&pem_of(entry)).unwrap())
        .collect();
    assert_eq!(
        roots,
        ztunnel::tls::parse_certs(&root).unwrap(),
        "Istio's ztunnel trusts our root, last in cert_chain"
    );
    let leaf_pem = pem_of(&cert["certChain"][0]);
    let leaf = &ztunnel::tls::parse_certs(&leaf_pem).unwrap()[0];
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf).unwrap();
    let root_der = &ztunnel::tls::parse_certs(&root).unwrap()[0];
    let (_, root) = x509_parser::parse_x509_certificate(root_der).unwrap();
    assert_eq!(leaf.issuer(), root.subject(), "the leaf is our root's");
    assert_eq!(
        ztunnel::tls::identity_of(&ztunnel::tls::parse_certs(&leaf_pem).unwrap()[0])
            .unwrap()
            .to_string(),
        cert["identity"].as_str().unwrap()
    );
}

// Traffic between Istio's ztunnel and ours.

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");
/// The namespace of every workload in the traffic tests (ambient).
const NS: &str = "mesh";
/// The applications' port.
const ECHO_PORT: u16 = 8080;
/// A port where nothing listens.
const CLOSED_PORT: u16 = 8081;

/// The SPIFFE identity of service account `sa` in `mesh`.
fn spiffe(sa: &str) -> String {
    format!("spiffe://{TD}/ns/{NS}/sa/{sa}")
}

/// node-a runs our tunnel, serving `client` and `server`. node-b runs none of
/// ours: `istio-client` and `istio-server` there are each fronted by Istio's
/// ztunnel in dedicated mode once a test starts it. All four are in the ambient
/// namespace `mesh`, each with a service account named after it, and get their
/// certificates from the mesh's CA (ours).
struct Interop {
    mesh: Mesh,
    istio: PathBuf,
}

impl Interop {
    async fn start() -> Self {
        let istio = istio_ztunnel();
        let cluster = Cluster::new(
            &ClusterSpec::new()
                .node("node-a", ["client", "server"])
                .node("node-b", ["istio-client", "istio-server"]),
        )
        .unwrap();
        let workloads: Vec<WorkloadSpec> = ["client", "server", "istio-client", "istio-server"]
            .map(|pod| WorkloadSpec::new(pod, NS, pod))
            .into();
        let mesh = Mesh::start_beside(cluster, &workloads, &[NS], &["node-b"])
            .await
            .unwrap();
        Self { mesh, istio }
    }

    /// Istio's ztunnel in dedicated mode for `pod` (on node-b), with `policies`
    /// (YAML list items in Istio's XDS Authorization shape) in its local config,
    /// once it is ready; the pod's connections to the applications' ports are
    /// redirected into it, as istio-cni would.
    async fn istio(&self, pod: &str, policies: &str) -> IstioProxy {
        self.istio_as(pod, pod, policies).await
    }

    /// Like [`Interop::istio`], with the proxy told that it serves `workload` (one
    /// of the four; its certificate is then that workload's).
    async fn istio_as(&self, pod: &str, workload: &str, policies: &str) -> IstioProxy {
        let workloads: String = self
            .mesh
            .cluster
            .pods()
            .iter()
            .map(|p| workload_yaml(&p.name, &p.name, &p.ip.to_string(), &p.node))
            .collect();
        IstioProxy::start_dedicated(
            &self.mesh,
            &self.istio,
            pod,
            &format!("{NS}/{workload}/{workload}"),
            &workloads,
            policies,
            &[ECHO_PORT, CLOSED_PORT],
        )
        .await
        .unwrap()
    }

    /// Runs tb-probe in `pod`; its output.
    fn probe(&self, pod: &str, args: &[&str]) -> String {
        self.mesh.output(pod, PROBE, args)
    }

    fn addr(&self, pod: &str, port: u16) -> String {
        self.mesh.addr(pod, port)
    }

    /// An echo server on `pod`'s application port, and that address.
    fn echo(&self, pod: &str) -> (EchoServer, String) {
        let echo = EchoServer::start(self.mesh.cluster.pod(pod), ECHO_PORT).unwrap();
        (echo, self.addr(pod, ECHO_PORT))
    }

    /// Runs tb-probe in `client`, asserting that its output has `expected`.
    fn probe_expecting(&self, client: &str, args: &[&str], expected: &str, istio: &IstioProxy) {
        let out = self.probe(client, args);
        assert!(
            out.contains(expected),
            "{out}\nIstio's ztunnel's log:\n{}",
            istio.log()
        );
    }

    /// Connects from `client` to the application port of `server` (an echo server
    /// there) and asserts that the connection is refused: closed with no byte,
    /// the application never reached.
    fn assert_refused(&self, client: &str, server: &str, istio: &IstioProxy) {
        let (echo, addr) = self.echo(server);
        let out = self.probe(client, &["connect", &addr, "refused?"]);
        assert_closed_without_bytes(&out, &istio.log());
        assert!(
            echo.stop().unwrap().is_empty(),
            "the application at {addr} was reached: {out}"
        );
    }

    /// Waits for the line of our tunnel's log with every one of `parts`.
    async fn our_line(&self, parts: &[&str]) -> String {
        wait_for_line(
            "our tunnel's log",
            || self.mesh.log("node-a"),
            parts,
            Duration::from_secs(20),
        )
        .await
    }

    /// Waits until our tunnel's metrics count at least one `name` with `labels`.
    async fn our_metric(&self, name: &str, labels: &[&str]) {
        eventually(
            Duration::from_secs(20),
            &format!("our tunnel counts {name} with {labels:?}"),
            || async { metric(&self.mesh.metrics("node-a").await, name, labels) >= 1.0 },
        )
        .await;
    }
}

/// Asserts that a probe's connection was accepted (by the capturing proxy), then
/// closed (EOF, or reset however it surfaced) with no byte from the server, not
/// left hanging until the probe's read timeout.
fn assert_closed_without_bytes(out: &str, context: &str) {
    let connected = testbed::mesh::accepted(out);
    let got_bytes = out
        .lines()
        .any(|l| l.starts_with("reply=") && l != "reply=");
    // A read timeout surfaces as EAGAIN.
    let hung = out.contains("Resource temporarily unavailable") || out.contains("timed out");
    assert!(
        connected && !got_bytes && !hung,
        "expected a closed connection, no bytes: {out}\n{context}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn istios_ztunnel_in_dedicated_mode_gets_its_certificate_from_our_ca() {
    let istio = istio_ztunnel();
    let cluster = Cluster::new(&ClusterSpec::new().node("node-a", ["istio-a"])).unwrap();
    let ca = OurCa::start(
        &cluster,
        &[PodOnNode {
            namespace: "mesh",
            service_account: "a1",
            node: "node-a",
        }],
    )
    .await;
    let pod = cluster.pod("istio-a").clone();
    let dir = TempDir::new("istio-dedicated").unwrap();
    let mut env = ca.env_for("node-a");
    env.extend(
        [
            ("PROXY_MODE", "dedicated"),
            ("PROXY_WORKLOAD_INFO", "mesh/istio-a/a1"),
            ("NODE_NAME", "node-a"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let _istio = istio::start(
        pod.command(&istio).unwrap(),
        dir.path(),
        &workload_yaml("istio-a", "a1", &pod.ip.to_string(), "node-a"),
        "",
        &env,
    )
    .unwrap();

    // A dedicated proxy fetches its certificate when it first needs it: a TLS
    // connection to its HBONE port (refused afterwards: we present no certificate).
    let target = SocketAddr::new(pod.ip.into(), 15008);
    let deadline = Instant::now() + Duration::from_secs(20);
    let cert = loop {
        let _ = pod
            .spawn_task(move || async move {
                let mut tcp = tokio::net::TcpStream::connect(target).await?;
                // A TLS 1.3 ClientHello is what it waits for; any bytes start the handshake.
                let hello = client_hello();
                tcp.write_all(&hello).await?;
                let mut buf = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await;
                Ok::<_, std::io::Error>(())
            })
            .unwrap()
            .join();
        let dump = tokio::task::spawn_blocking({
            let netns = pod.netns_path();
            move || config_dump(netns)
        })
        .await
        .unwrap();
        let found = dump.as_ref().and_then(|d| {
            d["certificates"]
                .as_array()?
                .iter()
                .find(|c| c["identity"] == "spiffe://cluster.local/ns/mesh/sa/a1")
                .filter(|c| c["state"] == "Available")
                .cloned()
        });
        if let Some(cert) = found {
            break cert;
        }
        assert!(
            Instant::now() < deadline,
            "Istio's ztunnel got no certificate from our CA: {dump:?}\nCA log:\n{}",
            ca.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_issued_by(&cert, &ca);
    assert!(
        ca.log()
            .contains("certificate issued identity=spiffe://cluster.local/ns/mesh/sa/a1"),
        "{}",
        ca.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn istios_ztunnel_in_node_mode_gets_its_workloads_and_no_impostor() {
    let istio = istio_ztunnel();
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", Vec::<String>::new())
            .node("node-b", Vec::<String>::new()),
    )
    .unwrap();
    // What runs where, as our CA knows it: s1 on node-b; b1 on node-a only.
    let ca = OurCa::start(
        &cluster,
        &[
            PodOnNode {
                namespace: "mesh",
                service_account: "s1",
                node: "node-b",
            },
            PodOnNode {
                namespace: "mesh",
                service_account: "b1",
                node: "node-a",
            },
        ],
    )
    .await;
    let node = cluster.node("node-b").clone();
    let dir = TempDir::new("istio-shared").unwrap();
    let mut env = ca.env_for("node-b");
    env.extend(
        [
            ("PROXY_MODE", "shared".to_owned()),
            ("NODE_NAME", "node-b".to_owned()),
            // No CNI agent serves it: the proxy proxies nothing, but prefetches
            // the certificates of its node's workloads.
            (
                "INPOD_UDS",
                dir.path().join("no-cni.sock").display().to_string(),
            ),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    // node-b's proxy claims b1 too: an impostor identity for this node.
    let workloads = format!(
        "{}{}",
        workload_yaml("s1", "s1", "10.99.0.1", "node-b"),
        workload_yaml("b1", "b1", "10.99.0.2", "node-b"),
    );
    let _istio = istio::start(
        node.command(&istio).unwrap(),
        dir.path(),
        &workloads,
        "",
        &env,
    )
    .unwrap();

    let netns = testbed::cluster::netns_path(&node.netns);
    let s1 = certificate_state(
        &netns,
        "spiffe://cluster.local/ns/mesh/sa/s1",
        Duration::from_secs(20),
    )
    .await;
    assert_issued_by(&s1, &ca);
    // Istio's node proxy asks on the workload's behalf.
    assert!(
        ca.log().contains(
            "certificate issued identity=spiffe://cluster.local/ns/mesh/sa/s1 impersonated=true"
        ),
        "{}",
        ca.log()
    );

    let b1 = certificate_state(
        &netns,
        "spiffe://cluster.local/ns/mesh/sa/b1",
        Duration::from_secs(20),
    )
    .await;
    let state = b1["state"].as_str().unwrap();
    assert!(
        state.contains("no pod with service account b1 in namespace mesh runs on node node-b"),
        "{b1:#}"
    );
    assert!(b1["certChain"].as_array().unwrap().is_empty(), "{b1:#}");
    assert!(
        ca.log().contains("reason=\"not_on_caller_node\""),
        "{}",
        ca.log()
    );
}

/// A minimal TLS 1.3 ClientHello (X25519, TLS_AES_128_GCM_SHA256, ALPN h2): enough
/// for a server to begin its handshake, which is all the test needs.
fn client_hello() -> Vec<u8> {
    use std::sync::Arc;
    // Let rustls write it: a client connection's first flight.
    let roots = rustls::RootCertStore::empty();
    let mut config = rustls::ClientConfig::builder_with_provider(ztunnel::tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let mut connection = rustls::ClientConnection::new(
        Arc::new(config),
        rustls::pki_types::ServerName::try_from("istio-a").unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).unwrap();
    hello
}

#[tokio::test(flavor = "multi_thread")]
async fn istios_client_reaches_our_server_with_both_identities_in_both_logs() {
    let interop = Interop::start().await;
    let istio = interop.istio("istio-client", "").await;
    let (_echo, server) = interop.echo("server");
    interop.probe_expecting(
        "istio-client",
        &["connect", &server, "hello"],
        "reply=server:hello",
        &istio,
    );
    istio
        .access_line(&[
            "direction=\"outbound\"",
            &format!("src.identity=\"{}\"", spiffe("istio-client")),
            &format!("dst.identity=\"{}\"", spiffe("server")),
        ])
        .await;
    // Istio's `forwarded: for="ip:port"` names its client, whose identity it
    // proved: we attribute the connection to that workload, in log and metrics.
    interop
        .our_line(&[
            "reporter=\"destination\"",
            "src.workload=mesh/istio-client",
            &format!("src.identity={}", spiffe("istio-client")),
            &format!("dst.identity={}", spiffe("server")),
        ])
        .await;
    interop
        .our_metric(
            "istio_tcp_connections_closed_total",
            &[
                "reporter=\"destination\"",
                "source_workload=\"istio-client\"",
                "destination_workload=\"server\"",
                "connection_security_policy=\"mutual_tls\"",
            ],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn our_client_reaches_istios_server_with_both_identities_in_both_logs() {
    let interop = Interop::start().await;
    let istio = interop.istio("istio-server", "").await;
    let (_echo, server) = interop.echo("istio-server");
    interop.probe_expecting(
        "client",
        &["connect", &server, "hello"],
        "reply=istio-server:hello",
        &istio,
    );
    istio
        .access_line(&[
            "direction=\"inbound\"",
            &format!("src.identity=\"{}\"", spiffe("client")),
            &format!("dst.identity=\"{}\"", spiffe("istio-server")),
        ])
        .await;
    interop
        .our_line(&[
            "reporter=\"source\"",
            "src.workload=mesh/client",
            &format!("src.identity={}", spiffe("client")),
            &format!("dst.identity={}", spiffe("istio-server")),
            "error=\"\"",
        ])
        .await;
}

/// Our AuthorizationPolicy: `server` refuses Istio's client.
const OUR_DENY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-istio-client, namespace: mesh}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/mesh/sa/istio-client]}}]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn our_deny_refuses_istios_client_with_401() {
    let interop = Interop::start().await;
    interop.mesh.write_config("deny.yaml", OUR_DENY).unwrap();
    eventually(Duration::from_secs(15), "our DENY loaded", || async {
        interop.mesh.config_dump("node-a").await["policies"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    })
    .await;
    let istio = interop.istio("istio-client", "").await;
    interop.assert_refused("istio-client", "server", &istio);
    istio
        .access_line(&[
            "direction=\"outbound\"",
            &spiffe("server"),
            "error=\"http status: 401 Unauthorized\"",
        ])
        .await;
    interop
        .our_line(&["connection denied", "mesh/deny-istio-client"])
        .await;
    interop
        .our_metric(
            "ztunnel_connections_denied_total",
            &["policy=\"mesh/deny-istio-client\""],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn istios_deny_refuses_our_client_with_401() {
    let interop = Interop::start().await;
    let deny = format!(
        "- {{name: deny-client, namespace: {NS}, scope: Namespace, action: Deny, dryRun: false, \
         rules: [[[{{principals: [!Exact \"{TD}/ns/{NS}/sa/client\"]}}]]]}}\n"
    );
    let istio = interop.istio("istio-server", &deny).await;
    interop.assert_refused("client", "istio-server", &istio);
    interop
        .our_line(&[
            "reporter=\"source\"",
            &format!("dst.identity={}", spiffe("istio-server")),
            "401 Unauthorized",
        ])
        .await;
    istio
        .access_line(&[
            "direction=\"inbound\"",
            &format!("src.identity=\"{}\"", spiffe("client")),
            "explicitly denied by: mesh/deny-client",
        ])
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn half_close_and_a_refused_port_from_istios_client_to_our_server() {
    let interop = Interop::start().await;
    let istio = interop.istio("istio-client", "").await;
    let (_echo, server) = interop.echo("server");

    // The client shuts down its sending side; only then does the server answer
    // (a megabyte), and close.
    interop.probe_expecting(
        "istio-client",
        &["bulk", &server, "1000000"],
        "ok sent=1000000 received=1000000",
        &istio,
    );

    let closed = interop.addr("server", CLOSED_PORT);
    let out = interop.probe("istio-client", &["connect", &closed, "anyone?"]);
    assert_closed_without_bytes(&out, &istio.log());
    istio
        .access_line(&[
            "direction=\"outbound\"",
            &format!("dst.hbone_addr={closed}"),
            "error=\"http status: 503 Service Unavailable\"",
        ])
        .await;
    interop
        .our_line(&["application unreachable", &closed])
        .await;
    interop
        .our_metric(
            "istio_tcp_connections_closed_total",
            &[
                "reporter=\"destination\"",
                "source_workload=\"istio-client\"",
                "response_flags=\"CONNECT\"",
            ],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn half_close_and_a_refused_port_from_our_client_to_istios_server() {
    let interop = Interop::start().await;
    let istio = interop.istio("istio-server", "").await;
    let (_echo, server) = interop.echo("istio-server");
    interop.probe_expecting(
        "client",
        &["bulk", &server, "1000000"],
        "ok sent=1000000 received=1000000",
        &istio,
    );

    let closed = interop.addr("istio-server", CLOSED_PORT);
    let out = interop.probe("client", &["connect", &closed, "anyone?"]);
    assert_closed_without_bytes(&out, &istio.log());
    interop
        .our_line(&["reporter=\"source\"", &closed, "503 Service Unavailable"])
        .await;
    istio
        .access_line(&[
            "direction=\"inbound\"",
            &format!("dst.hbone_addr={closed}"),
            "Connection refused",
        ])
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn our_client_refuses_an_istio_proxy_presenting_another_identity() {
    let interop = Interop::start().await;
    // Istio's proxy in istio-server's pod, told it serves istio-client: it presents
    // istio-client's certificate (valid, from our CA) where istio-server's is due.
    let istio = interop.istio_as("istio-server", "istio-client", "").await;
    interop.assert_refused("client", "istio-server", &istio);
    interop
        .our_line(&[
            "reporter=\"source\"",
            &format!(
                "peer is {}, expected {}",
                spiffe("istio-client"),
                spiffe("istio-server")
            ),
        ])
        .await;
}

/// Istio's ALLOW admitting only HBONE from `ip` (a `sourceIps` rule).
fn istio_allow_from(ip: std::net::Ipv4Addr) -> String {
    format!(
        "- {{name: allow-from-ip, namespace: {NS}, scope: Namespace, action: Allow, \
         dryRun: false, rules: [[[{{sourceIps: [{ip}/32]}}]]]}}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn istios_allow_on_our_client_pods_ip_admits_it_and_the_same_allow_on_another_ip_refuses() {
    let interop = Interop::start().await;
    let client = interop.mesh.cluster.pod("client").ip;
    // Our HBONE leaves from the client pod's own address, as Istio's does.
    let from_client = format!("src.addr={client}:");
    {
        let istio = interop
            .istio("istio-server", &istio_allow_from(client))
            .await;
        let (_echo, server) = interop.echo("istio-server");
        interop.probe_expecting(
            "client",
            &["connect", &server, "admitted"],
            "reply=istio-server:admitted",
            &istio,
        );
        istio
            .access_line(&["direction=\"inbound\"", &from_client, "bytes_recv=8"])
            .await;
    }
    // The same ALLOW naming another address (our server pod's) refuses it.
    let other = interop.mesh.cluster.pod("server").ip;
    let istio = interop
        .istio("istio-server", &istio_allow_from(other))
        .await;
    interop.assert_refused("client", "istio-server", &istio);
    istio
        .access_line(&[
            "direction=\"inbound\"",
            &from_client,
            "allow policies exist, but none allowed",
        ])
        .await;
    interop
        .our_line(&["reporter=\"source\"", "401 Unauthorized"])
        .await;
}
