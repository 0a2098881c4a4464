//! Interoperability with Istio's own ztunnel (a test peer, never part of the
//! product): `$ISTIO_ZTUNNEL`, or `shared/peers/istio-ztunnel` beside the checkout.
//! Run alone with `cargo xtask interop`.
//!
//! Here Istio's ztunnel gets its certificates from our CA (`ztunnel ca`, in a
//! testbed node), over Istio's CA API, in both of its modes.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use testbed::{
    mesh::{LocalCa, PodOnNode, TempDir, CA_SERVER_NAME},
    Cluster, ClusterSpec,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TD: &str = "cluster.local";
const CA_PORT: u16 = 15012;

/// Istio's ztunnel: `$ISTIO_ZTUNNEL`, or `shared/peers/istio-ztunnel` in the
/// nearest directory above the workspace that has one. Its absence fails the test
/// loudly: CI has it.
fn istio_ztunnel() -> PathBuf {
    if let Some(path) = std::env::var_os("ISTIO_ZTUNNEL") {
        let path = PathBuf::from(path);
        assert!(
            path.exists(),
            "ISTIO_ZTUNNEL={} does not exist: the interop tests need Istio's ztunnel",
            path.display()
        );
        return path;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    workspace
        .ancestors()
        .map(|dir| dir.join("../shared/peers/istio-ztunnel"))
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            panic!(
                "Istio's ztunnel was not found (shared/peers/istio-ztunnel beside the \
                 checkout, or set ISTIO_ZTUNNEL): the interop tests need it"
            )
        })
}

/// A process killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Our CA (`ztunnel ca`) in node-a's network namespace, knowing `pods`.
struct OurCa {
    files: LocalCa,
    addr: SocketAddr,
    log: PathBuf,
    _process: Running,
}

impl OurCa {
    async fn start(cluster: &Cluster, pods: &[PodOnNode<'_>]) -> Self {
        // A LocalCa lays out the files (root, node tokens, pods); the CA serving
        // them is the `ztunnel ca` binary.
        let mut files = LocalCa::start(TD, pods).await.unwrap();
        files.stop().await;
        let node = cluster.node("node-a");
        let addr = SocketAddr::new(node.ip.into(), CA_PORT);
        let dir = files.dir.path().to_owned();
        let log = dir.join("ca.log");
        let process = node
            .command(testbed::mesh::ztunnel_binary())
            .unwrap()
            .args(["ca", "--trust-domain", TD, "--server-name", CA_SERVER_NAME])
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
        let deadline = Instant::now() + within;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "the CA's log never said {text:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The environment that points Istio's ztunnel at this CA as `node`'s proxy.
    fn env_for(&self, node: &str) -> Vec<(String, String)> {
        [
            ("CA_ADDRESS", format!("https://{}", self.addr)),
            ("ALT_CA_HOSTNAME", CA_SERVER_NAME.to_owned()),
            (
                "CA_ROOT_CA",
                self.files
                    .dir
                    .path()
                    .join("cacerts/root-cert.pem")
                    .display()
                    .to_string(),
            ),
            (
                "AUTH_TOKEN",
                self.files.token_file(node).display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// Istio's local-config entry for a workload.
fn workload_yaml(name: &str, service_account: &str, ip: &str, node: &str) -> String {
    format!(
        "- uid: Kubernetes//Pod/mesh/{name}\n  name: {name}\n  namespace: mesh\n  \
         serviceAccount: {service_account}\n  trustDomain: {TD}\n  workloadIps: [{ip}]\n  \
         protocol: HBONE\n  node: {node}\n  network: \"\"\n  services: {{}}\n"
    )
}

/// Starts Istio's ztunnel through `command` (which enters a pod's or a node's
/// network namespace) with its local config `workloads` and `env`.
fn start_istio(
    mut command: std::process::Command,
    dir: &Path,
    workloads: &str,
    env: &[(String, String)],
) -> Running {
    let config = dir.join("istio-local.yaml");
    std::fs::write(
        &config,
        format!("workloads:\n{workloads}policies: []\nservices: []\n"),
    )
    .unwrap();
    command
        .env_clear()
        .env("XDS_ADDRESS", "")
        .env("LOCAL_XDS_PATH", &config)
        .env("ENABLE_ORIG_SRC", "false")
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::fs::File::create(dir.join("istio.log")).unwrap())
        .stderr(Stdio::null());
    Running(command.spawn().unwrap())
}

/// Istio's ztunnel's `/config_dump`, read from inside `netns`.
fn config_dump(netns: PathBuf) -> Option<serde_json::Value> {
    let body = ztunnel::netns::run_in(&netns, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let mut tcp = tokio::net::TcpStream::connect("127.0.0.1:15000").await?;
            tcp.write_all(
                b"GET /config_dump HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            .await?;
            let mut response = Vec::new();
            tcp.read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        })
    })
    .ok()?;
    let text = String::from_utf8_lossy(&body);
    let (_, json) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(json).ok()
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
    let _istio = start_istio(
        pod.command(&istio).unwrap(),
        dir.path(),
        &workload_yaml("istio-a", "a1", &pod.ip.to_string(), "node-a"),
        &env,
    );

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
    let _istio = start_istio(node.command(&istio).unwrap(), dir.path(), &workloads, &env);

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
