//! Workload identity end to end: the CA's decisions, the certificate manager's
//! renewals, and peer verification over real TLS on loopback; on the testbed, the
//! mesh through a CA outage.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::registry::Registry;
use rcgen::{CertificateParams, DistinguishedName, Issuer, KeyPair, SanType};
use rustls::pki_types::ServerName;
use testbed::{
    app::EchoServer,
    capture::Capture,
    faults::{assert_no_crash, assert_nothing_plaintext, on_every_node, tunnels, Load},
    mesh::{eventually, LocalCa, Mesh, PodOnNode, WorkloadSpec},
    Cluster, ClusterSpec,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use ztunnel::{
    ca::client::CaError,
    certs::{CertManager, CertManagerConfig, WorkloadCert},
    identity::Identity,
    tls,
};

const TD: &str = "cluster.local";

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TD, ns, sa).unwrap()
}

/// sleep/web on node-a, other on node-b.
async fn ca() -> LocalCa {
    LocalCa::start(
        TD,
        &[
            PodOnNode {
                namespace: "demo",
                service_account: "sleep",
                node: "node-a",
            },
            PodOnNode {
                namespace: "demo",
                service_account: "web",
                node: "node-a",
            },
            PodOnNode {
                namespace: "demo",
                service_account: "other",
                node: "node-b",
            },
        ],
    )
    .await
    .unwrap()
}

fn manager(ca: &LocalCa, node: &str, ttl: Duration) -> Arc<CertManager> {
    let mut config = CertManagerConfig::new(TD);
    config.ttl = ttl;
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(400);
    CertManager::new(
        Arc::new(ca.client(node).unwrap()),
        config,
        &mut Registry::default(),
    )
}

/// A CSR for these SANs, as a (possibly misbehaving) tunnel would send it.
fn csr(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(text: &str) -> SanType {
    SanType::URI(text.try_into().unwrap())
}

fn refused_code(result: Result<Vec<String>, CaError>) -> (i32, String) {
    match result {
        Err(CaError::Refused { code, message }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ca_signs_a_workload_on_the_callers_node() {
    let ca = ca().await;
    let certs = manager(&ca, "node-a", Duration::from_secs(3600));
    let cert = certs.fetch(&id("demo", "sleep")).await.unwrap();

    assert_eq!(
        tls::identity_of(&cert.chain[0]).unwrap(),
        id("demo", "sleep")
    );
    let (_, x509) = x509_parser::parse_x509_certificate(&cert.chain[0]).unwrap();
    let usage = x509.key_usage().unwrap().unwrap().value;
    assert!(usage.digital_signature() && usage.key_encipherment());
    assert!(
        !usage.key_cert_sign(),
        "a workload certificate must not sign certificates"
    );
    let eku = x509.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!x509.is_ca());
    let lifetime = cert.info.not_after - cert.info.not_before;
    assert!(
        (3600..=3600 + 120).contains(&lifetime),
        "lifetime {lifetime}s"
    );
    assert!(
        ca.metrics()
            .contains("citadel_server_success_cert_issuance_count_total 1"),
        "{}",
        ca.metrics()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ca_refuses_what_it_cannot_vouch_for_and_says_why() {
    let ca = ca().await;
    let node_a = ca.client("node-a").unwrap();
    let ttl = Duration::from_secs(3600);

    // A workload that runs on another node.
    let other = id("demo", "other");
    let (code, message) = refused_code(
        node_a
            .create_certificate(&csr(vec![uri(&other.to_string())]), &other, ttl)
            .await,
    );
    assert_eq!(code, 7, "PermissionDenied");
    assert!(message.contains("node-a"), "{message}");

    // A foreign trust domain.
    let foreign = Identity::new("evil.example", "demo", "sleep").unwrap();
    let (code, message) = refused_code(
        node_a
            .create_certificate(&csr(vec![uri(&foreign.to_string())]), &foreign, ttl)
            .await,
    );
    assert_eq!(code, 3, "InvalidArgument");
    assert!(message.contains("trust domain"), "{message}");

    // Two SANs.
    let sleep = id("demo", "sleep");
    let two = csr(vec![
        uri(&sleep.to_string()),
        SanType::DnsName("sleep.demo".try_into().unwrap()),
    ]);
    let (code, message) = refused_code(node_a.create_certificate(&two, &sleep, ttl).await);
    assert_eq!(code, 3);
    assert!(message.contains("exactly one URI SAN"), "{message}");

    // An unauthenticated caller.
    let stranger = ca.client_with_token("not-a-token-anyone-has").unwrap();
    let (code, message) = refused_code(
        stranger
            .create_certificate(&csr(vec![uri(&sleep.to_string())]), &sleep, ttl)
            .await,
    );
    assert_eq!(code, 16, "Unauthenticated");
    assert!(message.contains("not authenticated"), "{message}");

    // Longer than the CA allows.
    let (code, message) = refused_code(
        node_a
            .create_certificate(
                &csr(vec![uri(&sleep.to_string())]),
                &sleep,
                Duration::from_secs(365 * 86_400),
            )
            .await,
    );
    assert_eq!(code, 3);
    assert!(message.contains("exceeds the maximum"), "{message}");

    let metrics = ca.metrics();
    for reason in [
        "not_on_caller_node",
        "foreign_trust_domain",
        "san_count",
        "unauthenticated",
        "ttl_too_long",
    ] {
        assert!(
            metrics.contains(&format!(
                "ztunnel_ca_csr_refused_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason} not counted:\n{metrics}"
        );
    }
    // ... and it keeps serving everyone else.
    assert!(node_a
        .create_certificate(&csr(vec![uri(&sleep.to_string())]), &sleep, ttl)
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_first_requests_share_one_csr() {
    let ca = ca().await;
    let certs = manager(&ca, "node-a", Duration::from_secs(3600));
    let sleep = id("demo", "sleep");
    let fetches: Vec<_> = (0..20)
        .map(|_| {
            let (certs, sleep) = (certs.clone(), sleep.clone());
            tokio::spawn(async move { certs.fetch(&sleep).await.unwrap().info.serial.clone() })
        })
        .collect();
    let mut serials = Vec::new();
    for f in fetches {
        serials.push(f.await.unwrap());
    }
    serials.dedup();
    assert_eq!(serials.len(), 1, "one certificate for all");
    assert!(
        ca.metrics().contains("citadel_server_csr_count_total 1"),
        "{}",
        ca.metrics()
    );

    // A workload that left the node: its certificate is dropped.
    certs.retain(|identity| identity != &sleep);
    assert!(certs.certificates().is_empty());
}

/// Completes an mTLS handshake: `server` presents its certificate and `client`
/// expects `expected`. Returns the identity the server saw.
async fn handshake(
    server: &WorkloadCert,
    client: &WorkloadCert,
    expected: Identity,
) -> Result<Identity, String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server.server_config().unwrap());
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer =
            tls::peer_identity(tls.get_ref().1.peer_certificates()).map_err(|e| e.to_string());
        let _ = tls.write_all(b"x").await;
        peer
    });
    let connector = TlsConnector::from(client.client_config(expected).unwrap());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("workload").unwrap();
    let client_result = async {
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        // TLS 1.3: the server checks the client certificate after the client
        // finishes; reading the server's byte proves both sides agreed.
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    }
    .await;
    let server_result = accept.await.unwrap();
    client_result?;
    server_result
}

#[tokio::test(flavor = "multi_thread")]
async fn workloads_handshake_with_their_identities() {
    let ca = ca().await;
    let certs = manager(&ca, "node-a", Duration::from_secs(3600));
    let (sleep, web) = (id("demo", "sleep"), id("demo", "web"));
    let (sleep_cert, web_cert) = (
        certs.fetch(&sleep).await.unwrap(),
        certs.fetch(&web).await.unwrap(),
    );
    assert_eq!(
        handshake(&web_cert, &sleep_cert, web.clone())
            .await
            .unwrap(),
        sleep
    );

    // Secure naming: the server is not who the client asked for.
    let err = handshake(&web_cert, &sleep_cert, sleep.clone())
        .await
        .unwrap_err();
    assert!(err.contains("peer is spiffe://cluster.local/ns/demo/sa/web, expected spiffe://cluster.local/ns/demo/sa/sleep"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn peers_with_bad_certificates_are_refused() {
    let ca = ca().await;
    let certs = manager(&ca, "node-a", Duration::from_secs(3600));
    let (sleep, web) = (id("demo", "sleep"), id("demo", "web"));
    let sleep_cert = certs.fetch(&sleep).await.unwrap();
    let now = time::OffsetDateTime::now_utc();

    // From a root we do not trust: another CA for the same trust domain.
    let stranger_ca = LocalCa::start(
        TD,
        &[PodOnNode {
            namespace: "demo",
            service_account: "web",
            node: "node-a",
        }],
    )
    .await
    .unwrap();
    let stranger = manager(&stranger_ca, "node-a", Duration::from_secs(3600))
        .fetch(&web)
        .await
        .unwrap();
    let err = handshake(&stranger, &sleep_cert, web.clone())
        .await
        .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    // ... in either direction.
    let web_cert = certs.fetch(&web).await.unwrap();
    assert!(handshake(&web_cert, &stranger, web.clone()).await.is_err());

    // Expired.
    let expired = ca
        .forge(
            &web.to_string(),
            now - time::Duration::hours(2),
            now - time::Duration::hours(1),
        )
        .unwrap();
    let err = handshake(&expired, &sleep_cert, web.clone())
        .await
        .unwrap_err();
    assert!(err.contains("Expired"), "{err}");

    // A valid certificate with another identity than the one expected.
    let err = handshake(&web_cert, &sleep_cert, id("demo", "db"))
        .await
        .unwrap_err();
    assert!(
        err.contains("expected spiffe://cluster.local/ns/demo/sa/db"),
        "{err}"
    );

    // A trust domain that is neither ours nor an alias.
    let old = ca
        .forge(
            "spiffe://old.local/ns/demo/sa/web",
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
        .unwrap();
    let err = handshake(&old, &sleep_cert, web.clone()).await.unwrap_err();
    assert!(err.contains("old.local"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alias_trust_domain_is_accepted() {
    let ca = ca().await;
    let mut config = CertManagerConfig::new(TD);
    config.trust_domain_aliases = vec!["old.local".into()];
    let certs = CertManager::new(
        Arc::new(ca.client("node-a").unwrap()),
        config,
        &mut Registry::default(),
    );
    let sleep_cert = certs.fetch(&id("demo", "sleep")).await.unwrap();
    let now = time::OffsetDateTime::now_utc();
    let old = ca
        .forge(
            "spiffe://old.local/ns/demo/sa/web",
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
        .unwrap();
    // We expect cluster.local's web; old.local's web is the same workload.
    handshake(&old, &sleep_cert, id("demo", "web"))
        .await
        .unwrap();
}

async fn wait_for_new_serial(
    certs: &Arc<CertManager>,
    identity: &Identity,
    old: &str,
    within: Duration,
) -> Arc<WorkloadCert> {
    let deadline = Instant::now() + within;
    loop {
        let cert = certs.fetch(identity).await.unwrap();
        if cert.info.serial != old {
            return cert;
        }
        assert!(Instant::now() < deadline, "no renewal within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tunnel_keeps_serving_while_the_ca_is_down_and_renews_when_it_returns() {
    let mut ca = ca().await;
    // Short certificates: renewal due after about 3 s.
    let certs = manager(&ca, "node-a", Duration::from_secs(6));
    let (sleep, web) = (id("demo", "sleep"), id("demo", "web"));
    let first = certs.fetch(&sleep).await.unwrap();
    let web_cert = certs.fetch(&web).await.unwrap();

    ca.stop().await;
    // Renewal comes due and fails against the stopped CA ...
    let deadline = Instant::now() + Duration::from_secs(10);
    while certs.request_failures() < 2 {
        assert!(Instant::now() < deadline, "no renewal attempt within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and the still-valid certificate keeps serving.
    let still = certs.fetch(&sleep).await.unwrap();
    assert_eq!(still.info.serial, first.info.serial);
    handshake(&web_cert, &still, web.clone()).await.unwrap();

    ca.run().await.unwrap();
    let renewed =
        wait_for_new_serial(&certs, &sleep, &first.info.serial, Duration::from_secs(5)).await;
    assert!(renewed.info.not_after > first.info.not_after);
}

/// The serial of the certificate `identity` holds on `node`'s tunnel (`/certs`).
async fn serial_on(mesh: &Mesh, node: &str, identity: &str) -> Option<String> {
    let (_, body) = mesh.http_get(node, 15000, "/certs").await.ok()?;
    let certs: Vec<serde_json::Value> = serde_json::from_str(&body).ok()?;
    certs
        .iter()
        .find(|c| c["identity"] == identity)
        .and_then(|c| c["serial"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_ca_down_through_a_rotation_the_mesh_serves_on_and_renews_when_it_returns() {
    const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client"])
            .node("node-b", ["server"]),
    )
    .unwrap();
    let workloads = [
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("server", "demo", "server"),
    ];
    let mut mesh = Mesh::start(cluster, &workloads, &["demo"]).await.unwrap();
    // Short certificates: renewal falls due about 10 s after issue, expiry at 20 s.
    for node in ["node-a", "node-b"] {
        mesh.kill_tunnel(node);
        mesh.tunnel_args
            .insert(node.into(), vec!["--cert-ttl".into(), "20s".into()]);
        mesh.start_tunnel(node).await.unwrap();
    }
    let _echo = EchoServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let target = mesh.addr("server", 8080);
    fn exchange(mesh: &Mesh, target: &str, message: &str) {
        let out = mesh.output("client", PROBE, &["connect", target, message]);
        assert!(out.contains(&format!("reply=server:{message}")), "{out}");
    }
    exchange(&mesh, &target, "issued");
    let holders = [
        ("node-a", "spiffe://cluster.local/ns/demo/sa/client"),
        ("node-b", "spiffe://cluster.local/ns/demo/sa/server"),
    ];
    let mut issued = Vec::new();
    for (node, identity) in holders {
        issued.push(
            serial_on(&mesh, node, identity)
                .await
                .expect("a certificate"),
        );
    }
    let before = tunnels(&mesh);
    let capture = Capture::start(&mesh.cluster.fabric_netns()).unwrap();
    let marker = "CA-DOWN-MARKER-e41f";
    mesh.ca.stop().await;
    let load = Load::start(&mesh, PROBE, "client", &target, 12_000, marker);

    // Renewal falls due and fails on both nodes; the current certificates serve.
    eventually(
        Duration::from_secs(20),
        "renewals failing against the stopped CA",
        || {
            on_every_node(&mesh, "ztunnel_workload_cert_request_failures_total", |n| {
                n > 0.0
            })
        },
    )
    .await;
    for ((node, identity), serial) in holders.iter().zip(&issued) {
        assert_eq!(
            serial_on(&mesh, node, identity).await.as_ref(),
            Some(serial)
        );
    }
    exchange(&mesh, &target, "ca-down");

    // Back: each tunnel renews (a new serial) before its certificate expires.
    mesh.ca.run().await.unwrap();
    for ((node, identity), serial) in holders.iter().zip(&issued) {
        eventually(Duration::from_secs(8), "a renewed certificate", || async {
            serial_on(&mesh, node, identity)
                .await
                .is_some_and(|s| s != *serial)
        })
        .await;
    }
    exchange(&mesh, &target, "renewed");
    let (ok, failed) = load.finish();
    assert!(ok > 0 && failed == 0, "ok={ok} failed={failed}");
    assert_no_crash(&mesh, &before);
    assert_nothing_plaintext(&mesh, &capture.stop(), marker);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tunnel_trusts_the_cas_new_root_once_its_roots_file_has_it() {
    let mut ca = ca().await;
    let dir = testbed::mesh::TempDir::new("ca-roots").unwrap();
    let roots = dir.path().join("root-cert.pem");
    std::fs::write(&roots, ca.root_pem()).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, std::fs::read(ca.token_file("node-a")).unwrap()).unwrap();
    let config = ztunnel_ca::client::CaClientConfig::from_files(
        &ca.addr.to_string(),
        testbed::mesh::CA_SERVER_NAME,
        &roots,
        &token,
    )
    .unwrap();
    let client = ztunnel_ca::client::CaClient::new(config).unwrap();
    let sleep = id("demo", "sleep");
    let request = csr(vec![SanType::URI(sleep.to_string().try_into().unwrap())]);
    let ask = || client.create_certificate(&request, &sleep, Duration::from_secs(3600));
    ask().await.unwrap();
    // A CA restart costs no failed call, though the client may not have seen its
    // connection close yet.
    ca.stop().await;
    ca.run().await.unwrap();
    ask().await.unwrap();

    let old_root = ca.root_pem();
    ca.new_root().await.unwrap();
    assert_ne!(ca.root_pem(), old_root);
    // Still trusting the old root: the CA's new certificate is refused.
    let err = ask().await.unwrap_err();
    assert!(
        matches!(&err, CaError::Unreachable(e) if e.contains("TLS handshake")),
        "{err}"
    );
    // A root file that is not PEM leaves the old trust in place ...
    std::fs::write(&roots, "not a certificate").unwrap();
    assert!(ask().await.is_err());
    // ... and the new root, once there, is trusted on the next connection.
    std::fs::write(&roots, ca.root_pem()).unwrap();
    let chain = ask().await.unwrap();
    assert_eq!(chain.last().map(|r| r.trim()), Some(ca.root_pem().trim()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_under_a_live_mtls_connection_drops_no_byte() {
    let ca = ca().await;
    let certs = manager(&ca, "node-a", Duration::from_secs(4));
    let (sleep, web) = (id("demo", "sleep"), id("demo", "web"));
    let (client_cert, server_cert) = (
        certs.fetch(&sleep).await.unwrap(),
        certs.fetch(&web).await.unwrap(),
    );

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server_cert.server_config().unwrap());
    // The server counts and checksums everything until EOF.
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let (mut total, mut sum) = (0u64, 0u64);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tls.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
            sum = buf[..n]
                .iter()
                .fold(sum, |s, b| s.wrapping_mul(31).wrapping_add(*b as u64));
        }
        tls.write_all(format!("{total} {sum}").as_bytes())
            .await
            .unwrap();
        tls.shutdown().await.unwrap();
    });
    let connector = TlsConnector::from(client_cert.client_config(web.clone()).unwrap());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("web").unwrap(), tcp)
        .await
        .unwrap();

    // Stream until both certificates have been renewed.
    let (mut total, mut sum, mut i) = (0u64, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let chunk: Vec<u8> = (0..16 * 1024).map(|j| ((i + j) % 251) as u8).collect();
        tls.write_all(&chunk).await.unwrap();
        total += chunk.len() as u64;
        sum = chunk
            .iter()
            .fold(sum, |s, b| s.wrapping_mul(31).wrapping_add(*b as u64));
        i += 1;
        let (c, s) = (
            certs.fetch(&sleep).await.unwrap(),
            certs.fetch(&web).await.unwrap(),
        );
        if c.info.serial != client_cert.info.serial && s.info.serial != server_cert.info.serial {
            break;
        }
        assert!(Instant::now() < deadline, "no rotation within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tls.shutdown().await.unwrap();
    let mut reply = String::new();
    tls.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, format!("{total} {sum}"));
    server.await.unwrap();

    // New connections present the new certificates.
    let (new_client, new_server) = (
        certs.fetch(&sleep).await.unwrap(),
        certs.fetch(&web).await.unwrap(),
    );
    assert_eq!(
        handshake(&new_server, &new_client, web).await.unwrap(),
        sleep
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ztunnel_certs_lists_what_the_tunnel_holds_without_keys() {
    let ca = ca().await;
    let certs = manager(&ca, "node-a", Duration::from_secs(3600));
    let cert = certs.fetch(&id("demo", "sleep")).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    tokio::spawn(ztunnel::http_server::serve(
        listener,
        ztunnel::admin::handler(certs.clone()),
    ));

    let out = tokio::process::Command::new(testbed::mesh::ztunnel_binary())
        .args(["certs", "--admin", &admin.to_string()])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("spiffe://cluster.local/ns/demo/sa/sleep"),
        "{stdout}"
    );
    assert!(stdout.contains(&cert.info.serial), "{stdout}");
    let json = tokio::process::Command::new(testbed::mesh::ztunnel_binary())
        .args(["certs", "--admin", &admin.to_string(), "-o", "json"])
        .output()
        .await
        .unwrap();
    let json = String::from_utf8_lossy(&json.stdout);
    assert!(json.contains("\"not_after\""), "{json}");
    assert!(!json.contains("PRIVATE"), "keys must never be shown");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugged_in_intermediate_signs_and_chains_to_its_root() {
    // Istio's cacerts layout: an intermediate signs, the root is only trusted.
    let ca = LocalCa::start_with(
        TD,
        &[PodOnNode {
            namespace: "demo",
            service_account: "sleep",
            node: "node-a",
        }],
        |dir| {
            let root_key = KeyPair::generate()?;
            let mut root = CertificateParams::default();
            root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            root.distinguished_name
                .push(rcgen::DnType::CommonName, "offline root");
            root.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            let root_cert = root.self_signed(&root_key)?;
            let inter_key = KeyPair::generate()?;
            let mut inter = CertificateParams::default();
            inter.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
            inter
                .distinguished_name
                .push(rcgen::DnType::CommonName, "cluster intermediate");
            inter.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            let inter_cert = inter.signed_by(&inter_key, &Issuer::new(root, &root_key))?;
            std::fs::write(dir.join("ca-cert.pem"), inter_cert.pem())?;
            std::fs::write(dir.join("ca-key.pem"), inter_key.serialize_pem())?;
            std::fs::write(dir.join("root-cert.pem"), root_cert.pem())?;
            std::fs::write(
                dir.join("cert-chain.pem"),
                format!("{}{}", inter_cert.pem(), root_cert.pem()),
            )?;
            Ok(())
        },
    )
    .await
    .unwrap();
    let certs = manager(&ca, "node-a", Duration::from_secs(3600));
    let sleep = id("demo", "sleep");
    let cert = certs.fetch(&sleep).await.unwrap();
    assert!(
        cert.chain.len() >= 2,
        "the leaf travels with its intermediate"
    );
    let (_, root) = x509_parser::parse_x509_certificate(&cert.bundle.roots()[0]).unwrap();
    assert!(root.subject().to_string().contains("offline root"));
    // Two workloads of this CA trust each other through the intermediate.
    let other = certs.fetch(&sleep).await.unwrap();
    assert_eq!(
        handshake(&cert, &other, sleep.clone()).await.unwrap(),
        sleep
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn during_a_root_rotation_both_roots_are_trusted() {
    let mut old = ca().await;
    let mut new = LocalCa::start(
        TD,
        &[PodOnNode {
            namespace: "demo",
            service_account: "web",
            node: "node-a",
        }],
    )
    .await
    .unwrap();
    let (sleep, web) = (id("demo", "sleep"), id("demo", "web"));
    let web_from_new_root = manager(&new, "node-a", Duration::from_secs(3600))
        .fetch(&web)
        .await
        .unwrap();
    let sleep_cert = manager(&old, "node-a", Duration::from_secs(3600))
        .fetch(&sleep)
        .await
        .unwrap();
    assert!(handshake(&web_from_new_root, &sleep_cert, web.clone())
        .await
        .is_err());

    // The operator puts both roots in the bundle each CA hands out.
    let bundle = format!("{}{}", old.root_pem(), new.root_pem());
    for ca in [&mut old, &mut new] {
        ca.stop().await;
        std::fs::write(ca.dir.path().join("cacerts/root-cert.pem"), &bundle).unwrap();
        ca.run().await.unwrap();
    }
    let web_from_new_root = manager(&new, "node-a", Duration::from_secs(3600))
        .fetch(&web)
        .await
        .unwrap();
    let sleep_cert = manager(&old, "node-a", Duration::from_secs(3600))
        .fetch(&sleep)
        .await
        .unwrap();
    assert_eq!(sleep_cert.bundle.roots().len(), 2);
    assert_eq!(
        handshake(&web_from_new_root, &sleep_cert, web)
            .await
            .unwrap(),
        sleep
    );
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `ztunnel-ca` as a process, serving the files of a stopped [`LocalCa`] on
/// 127.0.0.1, its log in the CA's directory.
struct CaProcess {
    files: LocalCa,
    child: tokio::process::Child,
    api: u16,
    metrics: u16,
    log: std::path::PathBuf,
}

impl CaProcess {
    async fn start(extra: &[&str]) -> Self {
        let mut files = ca().await;
        files.stop().await;
        let (api, metrics) = (free_port(), free_port());
        files.addr = format!("127.0.0.1:{api}").parse().unwrap();
        let log = files.dir.path().join("ca.log");
        let mut process = Self {
            child: Self::spawn(&files, api, metrics, &log, extra),
            files,
            api,
            metrics,
            log,
        };
        process.wait_serving().await;
        process
    }

    fn spawn(
        files: &LocalCa,
        api: u16,
        metrics: u16,
        log: &std::path::Path,
        extra: &[&str],
    ) -> tokio::process::Child {
        let dir = files.dir.path();
        tokio::process::Command::new(testbed::mesh::ca_binary())
            .args([
                "--trust-domain",
                TD,
                "--server-name",
                testbed::mesh::CA_SERVER_NAME,
            ])
            .arg("--dir")
            .arg(dir.join("cacerts"))
            .arg("--node-tokens")
            .arg(dir.join("node-tokens.yaml"))
            .arg("--config")
            .arg(dir.join("config"))
            .args([
                "--listen",
                &format!("127.0.0.1:{api}"),
                "--metrics-addr",
                &format!("127.0.0.1:{metrics}"),
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            )
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    async fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.metrics))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "ztunnel-ca did not start");
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "ztunnel-ca exited: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Killed (no clean-up at all) and started again over the same directory.
    async fn kill_and_restart(&mut self) {
        self.child.kill().await.unwrap();
        self.child = Self::spawn(&self.files, self.api, self.metrics, &self.log, &[]);
        self.wait_serving().await;
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn metrics(&self) -> String {
        let mut tcp = TcpStream::connect(("127.0.0.1", self.metrics))
            .await
            .unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut page = String::new();
        tcp.read_to_string(&mut page).await.unwrap();
        page
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ztunnel_ca_command_serves_the_ca_api_and_metrics() {
    let ca = CaProcess::start(&[]).await;
    let certs = manager(&ca.files, "node-a", Duration::from_secs(3600));
    let cert = certs.fetch(&id("demo", "sleep")).await.unwrap();
    assert_eq!(cert.identity, id("demo", "sleep"));
    let other = id("demo", "other");
    let refused = ca
        .files
        .client("node-a")
        .unwrap()
        .create_certificate(
            &csr(vec![uri(&other.to_string())]),
            &other,
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(refused_code(refused).0, 7);

    let page = ca.metrics().await;
    assert!(
        page.contains("citadel_server_success_cert_issuance_count_total 1"),
        "{page}"
    );
    assert!(
        page.contains("ztunnel_ca_csr_refused_total{reason=\"not_on_caller_node\"} 1"),
        "{page}"
    );
    assert!(
        page.contains("citadel_server_root_cert_expiry_timestamp"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_log_format_json_every_log_line_is_a_json_object_with_the_event_fields() {
    let ca = CaProcess::start(&["--log-format", "json"]).await;
    // A refusal: logged at warn with fields (the caller's address, the reason).
    let other = id("demo", "other");
    let refused = ca
        .files
        .client("node-a")
        .unwrap()
        .create_certificate(
            &csr(vec![uri(&other.to_string())]),
            &other,
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(refused_code(refused).0, 7);
    let mut lines = Vec::new();
    eventually(Duration::from_secs(10), "the refusal logged", || {
        lines = ca.log().lines().map(str::to_owned).collect();
        let found = lines.iter().any(|l| l.contains("CSR refused"));
        async move { found }
    })
    .await;
    for line in &lines {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for key in ["timestamp", "level", "target", "message"] {
            assert!(event[key].is_string(), "no {key}: {line}");
        }
    }
    let refusal: serde_json::Value = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .find(|e: &serde_json::Value| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("CSR refused"))
        })
        .unwrap();
    assert_eq!(refusal["level"], "WARN", "{refusal}");
    assert_eq!(refusal["reason"], "not_on_caller_node", "{refusal}");
    assert!(refusal["source"].is_string(), "{refusal}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ca_restarts_over_the_files_it_left() {
    let mut ca = CaProcess::start(&[]).await;
    let root = ca.files.root_pem();
    let sleep = id("demo", "sleep");
    let ask = |ca: &CaProcess| {
        let client = ca.files.client("node-a").unwrap();
        let (request, sleep) = (csr(vec![uri(&sleep.to_string())]), sleep.clone());
        async move {
            client
                .create_certificate(&request, &sleep, Duration::from_secs(3600))
                .await
        }
    };
    ask(&ca).await.unwrap();
    // A container restart over the same emptyDir: every file is already there.
    ca.kill_and_restart().await;
    let chain = ask(&ca).await.unwrap();
    assert_eq!(ca.files.root_pem(), root, "the root adopted, not replaced");
    assert_eq!(chain.last().unwrap().trim(), root.trim());
    assert!(!ca.log().contains("File exists"), "{}", ca.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ca_adopts_the_root_secret_over_files_already_in_its_directory() {
    use ztunnel_ca::{kube::sync_root_secret, Authority, AuthorityOptions};
    let api = testbed::kube_api::FakeApiServer::start().await.unwrap();
    let dir = testbed::mesh::TempDir::new("ca-secret-restart").unwrap();
    let client = api.client(dir.path()).await.unwrap();
    let options = |sub: &str| AuthorityOptions {
        dir: dir.path().join(sub),
        trust_domain: TD.into(),
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(7200),
    };
    let sync = |options: AuthorityOptions| {
        let client = client.clone();
        async move {
            let dir = options.dir.clone();
            sync_root_secret(client, "istio-system", "ztunnel-ca", &dir, |_| {
                Authority::load_or_create(options).map(drop)
            })
            .await
        }
    };
    sync(options("first")).await.unwrap();
    let root = Authority::load_or_create(options("first"))
        .unwrap()
        .root_pem()
        .to_owned();
    // Restarted over the same directory: the Secret's files are already there.
    sync(options("first")).await.unwrap();
    // A replica that lost the race made its own root first: the Secret's wins.
    Authority::load_or_create(options("loser")).unwrap();
    sync(options("loser")).await.unwrap();
    for sub in ["first", "loser"] {
        let authority = Authority::load_or_create(options(sub)).unwrap();
        assert_eq!(authority.root_pem(), root, "{sub}");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

/// The descriptors `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ca_keeps_serving_when_it_runs_out_of_file_descriptors() {
    let ca = CaProcess::start(&["--handshake-timeout", "500ms"]).await;
    let sleep = id("demo", "sleep");
    let client = ca.files.client("node-a").unwrap();
    let request = csr(vec![uri(&sleep.to_string())]);
    let ask = || client.create_certificate(&request, &sleep, Duration::from_secs(3600));
    ask().await.unwrap();
    // A few descriptors to spare, then sockets that never say a word.
    let limit = open_fds(ca.pid()) + 6;
    let out = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", ca.pid()))
        .arg(format!("--nofile={limit}:{limit}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "prlimit: {out:?}");
    let mut silent = Vec::new();
    for _ in 0..60 {
        silent.push(TcpStream::connect(("127.0.0.1", ca.api)).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ca.log().contains("accepting a connection failed") {
        assert!(Instant::now() < deadline, "no EMFILE: {}", ca.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ca.log().contains("Too many open files"), "{}", ca.log());

    // Silent sockets are dropped after the handshake timeout, which frees what
    // accept lacked: a real client is served while the others still hold theirs.
    let started = Instant::now();
    let result = loop {
        match ask().await {
            Ok(chain) => break chain,
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(30),
                "never served again: {e}\n{}",
                ca.log()
            ),
        }
    };
    assert!(result.len() >= 2);
    let mut first = silent.remove(0);
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), first.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent socket must be closed by the CA: {closed:?}"
    );
    // Warned about, not flooded with: one line per 5 s at most (plus the first).
    let warnings = ca.log().matches("accepting a connection failed").count();
    let bound = 2 + started.elapsed().as_secs() as usize / 5;
    assert!(warnings <= bound, "{warnings} warnings:\n{}", ca.log());
    assert!(
        ca.metrics()
            .await
            .contains("ztunnel_ca_accept_errors_total"),
        "counted"
    );
}

/// A TLS connection to the CA from `source`, or the error that ended it.
async fn tls_from(
    source: std::net::IpAddr,
    ca: &CaProcess,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((source, 0).into())?;
    let tcp = socket.connect(([127, 0, 0, 1], ca.api).into()).await?;
    let mut roots = rustls::RootCertStore::empty();
    for root in tls::parse_certs(&ca.files.root_pem()).unwrap() {
        roots.add(root).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    let name = ServerName::try_from(testbed::mesh::CA_SERVER_NAME).unwrap();
    let mut stream = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    // TLS 1.3: the server may close right after its handshake; a read tells.
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await {
        Ok(Ok(0)) => Err(std::io::ErrorKind::UnexpectedEof.into()),
        Ok(Err(e)) => Err(e),
        _ => Ok(stream),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_client_holding_idle_connections_cannot_take_the_ca() {
    let ca = CaProcess::start(&["--max-connections-per-source", "4", "--idle-timeout", "5s"]).await;
    // The attacker, from 127.0.0.2, opens many connections and says nothing.
    let attacker: std::net::IpAddr = [127, 0, 0, 2].into();
    let attempts = futures_util::future::join_all((0..10).map(|_| tls_from(attacker, &ca))).await;
    let started = Instant::now();
    let mut held: Vec<_> = attempts.into_iter().filter_map(Result::ok).collect();
    assert_eq!(held.len(), 4, "only the per-source cap is served");
    // Everyone else is served meanwhile.
    let sleep = id("demo", "sleep");
    ca.files
        .client("node-a")
        .unwrap()
        .create_certificate(
            &csr(vec![uri(&sleep.to_string())]),
            &sleep,
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    // The idle ones are closed once idle for the timeout.
    for stream in &mut held {
        let mut buf = [0u8; 256];
        let end = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue, // HTTP/2 settings, then GOAWAY
                }
            }
        })
        .await;
        assert!(end.is_ok(), "an idle connection stayed open");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "closed before the idle timeout"
    );
    let page = ca.metrics().await;
    assert!(
        page.contains("ztunnel_ca_connections_refused_total{reason=\"source_cap\"} 6"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_tokens_cannot_amplify_load_on_the_api_server() {
    use ztunnel_ca::{
        auth::LocalPods,
        kube::{TokenReview, FAILURE_BURST},
        server::{CaMetrics, CaServer},
        Authority, AuthorityOptions,
    };
    let api = testbed::kube_api::FakeApiServer::start().await.unwrap();
    api.on_token_review(|token| match token {
        "tunnel-a" => serde_json::json!({"authenticated": true, "audiences": ["istio-ca"],
            "user": {"username": "system:serviceaccount:istio-system:ztunnel",
            "extra": {"authentication.kubernetes.io/node-name": ["node-a"]}}}),
        _ => serde_json::json!({"authenticated": false, "error": "invalid bearer token"}),
    });
    let reviews = || {
        api.calls()
            .iter()
            .filter(|c| c.resource.ends_with("/tokenreviews"))
            .count()
    };
    // The local CA's files, served with TokenReview as the authenticator.
    let mut files = ca().await;
    files.stop().await;
    let authority = Arc::new(
        Authority::load_or_create(AuthorityOptions {
            dir: files.dir.path().join("cacerts"),
            trust_domain: TD.into(),
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(7200),
        })
        .unwrap(),
    );
    let review = TokenReview::new(
        api.client(files.dir.path()).await.unwrap(),
        vec!["istio-system/ztunnel".into()],
        vec!["istio-ca".into()],
    );
    let mut registry = Registry::default();
    let server = CaServer::new(
        authority,
        Arc::new(review),
        Arc::new(LocalPods::new(files.config_dir.clone())),
        CaMetrics::register(&mut registry),
    );
    let tls_config = server
        .tls_config(&[testbed::mesh::CA_SERVER_NAME.into()])
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    files.addr = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener, tls_config));

    let sleep = id("demo", "sleep");
    let request = csr(vec![uri(&sleep.to_string())]);
    let tunnel_token = files.dir.path().join("tunnel-a.token");
    std::fs::write(&tunnel_token, "tunnel-a").unwrap();
    let tunnel = ztunnel_ca::client::CaClient::new(ztunnel_ca::client::CaClientConfig {
        address: files.addr.to_string(),
        server_name: testbed::mesh::CA_SERVER_NAME.into(),
        roots_pem: files.root_pem(),
        roots_file: None,
        token_file: tunnel_token,
    })
    .unwrap();
    tunnel
        .create_certificate(&request, &sleep, Duration::from_secs(3600))
        .await
        .unwrap();
    let forged = Arc::new(files.client_with_token("forged-token").unwrap());
    let before = reviews();
    let attack: Vec<_> = (0..40)
        .map(|_| {
            let (forged, request, sleep) = (forged.clone(), request.clone(), sleep.clone());
            tokio::spawn(async move {
                forged
                    .create_certificate(&request, &sleep, Duration::from_secs(3600))
                    .await
            })
        })
        .collect();
    let mut codes = Vec::new();
    for call in attack {
        codes.push(refused_code(call.await.unwrap()).0);
    }
    let reviewed = reviews() - before;
    assert!(
        reviewed <= FAILURE_BURST as usize,
        "{reviewed} reviews for 40 refused calls"
    );
    assert_eq!(codes.iter().filter(|&&c| c == 16).count(), reviewed);
    assert_eq!(
        codes.iter().filter(|&&c| c == 8).count(),
        40 - reviewed,
        "the rest: ResourceExhausted"
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(&format!(
            "ztunnel_ca_csr_refused_total{{reason=\"rate_limited\"}} {}",
            40 - reviewed
        )),
        "{text}"
    );
    // The tunnel, already authenticated, is served without another review.
    let before = reviews();
    tunnel
        .create_certificate(&request, &sleep, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(reviews(), before);
}

/// A unary call in Istio's wire format, framed and decoded by hand (independent of
/// our generated code): returns the response message's bytes, or the gRPC status.
async fn raw_call(ca: &LocalCa, token: &str, message: &[u8]) -> Result<bytes::Bytes, String> {
    use http_body_util::BodyExt;
    let mut roots = rustls::RootCertStore::empty();
    for root in tls::parse_certs(&ca.root_pem()).unwrap() {
        roots.add(root).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    let tcp = TcpStream::connect(ca.addr).await.unwrap();
    let name = ServerName::try_from(testbed::mesh::CA_SERVER_NAME).unwrap();
    let stream = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let mut framed = vec![0u8];
    framed.extend((message.len() as u32).to_be_bytes());
    framed.extend(message);
    let request = http::Request::post(format!(
        "https://{}/istio.v1.auth.IstioCertificateService/CreateCertificate",
        testbed::mesh::CA_SERVER_NAME
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("authorization", format!("Bearer {token}"))
    .body(http_body_util::Full::new(bytes::Bytes::from(framed)))
    .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = trailers
        .get("grpc-status")
        .or(parts.headers.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_owned());
    if status.as_deref() != Some("0") {
        return Err(format!("grpc-status {status:?}"));
    }
    let data = collected.to_bytes();
    let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
    assert_eq!(data.len(), 5 + len);
    Ok(data.slice(5..))
}

#[tokio::test(flavor = "multi_thread")]
async fn our_ca_speaks_istios_field_numbers() {
    use prost::encoding::{decode_key, decode_varint, encode_key, encode_varint, WireType};
    let ca = ca().await;
    let token = std::fs::read_to_string(ca.token_file("node-a")).unwrap();
    let sleep = id("demo", "sleep");
    // IstioCertificateRequest: csr = 1, validity_duration = 3 (Istio's citadel.proto).
    let request_csr = csr(vec![uri(&sleep.to_string())]);
    let mut message = Vec::new();
    encode_key(1, WireType::LengthDelimited, &mut message);
    encode_varint(request_csr.len() as u64, &mut message);
    message.extend(request_csr.as_bytes());
    encode_key(3, WireType::Varint, &mut message);
    encode_varint(3600, &mut message);
    let mut response = raw_call(&ca, &token, &message).await.unwrap();
    // IstioCertificateResponse: every entry is cert_chain, field 1, a string.
    let mut chain = Vec::new();
    while !response.is_empty() {
        let (field, wire_type) = decode_key(&mut response).unwrap();
        assert_eq!(
            (field, wire_type),
            (1, WireType::LengthDelimited),
            "cert_chain is field 1"
        );
        let len = decode_varint(&mut response).unwrap() as usize;
        chain.push(String::from_utf8(response.split_to(len).to_vec()).unwrap());
    }
    assert_eq!(chain.len(), 2, "leaf and root");
    assert_eq!(
        tls::identity_of(&tls::parse_certs(&chain[0]).unwrap()[0]).unwrap(),
        sleep
    );
    assert_eq!(chain[1].trim(), ca.root_pem().trim(), "the root last");
}

/// A CA that answers every call with `message` (a gRPC OK).
async fn answering_ca(ca: &LocalCa, message: Vec<u8>) -> std::net::SocketAddr {
    use ztunnel_ca::{Authority, AuthorityOptions};
    let authority = Authority::load_or_create(AuthorityOptions {
        dir: ca.dir.path().join("cacerts"),
        trust_domain: TD.into(),
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(7200),
    })
    .unwrap();
    let (chain, key) = authority
        .serving_certificate(&[testbed::mesh::CA_SERVER_NAME.into()])
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            tls::parse_certs(&chain).unwrap(),
            tls::parse_key(&key).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut framed = vec![0u8];
    framed.extend((message.len() as u32).to_be_bytes());
    framed.extend(message);
    let framed = bytes::Bytes::from(framed);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, framed) = (acceptor.clone(), framed.clone());
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.unwrap();
                let service = hyper::service::service_fn(move |_req| {
                    // The framed message, then the status (OK) in trailers.
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let frames = [
                        hyper::body::Frame::data(framed.clone()),
                        hyper::body::Frame::trailers(trailers),
                    ];
                    let body = http_body_util::StreamBody::new(futures_util::stream::iter(
                        frames.map(Ok::<_, std::convert::Infallible>),
                    ));
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_in_the_wrong_field_is_a_protocol_error_naming_field_1() {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let mut ca = ca().await;
    // The chain as field 200 (what this project once sent): it decodes to nothing.
    let mut message = Vec::new();
    for pem in ["leaf", "root"] {
        encode_key(200, WireType::LengthDelimited, &mut message);
        encode_varint(pem.len() as u64, &mut message);
        message.extend(pem.as_bytes());
    }
    ca.addr = answering_ca(&ca, message).await;
    let sleep = id("demo", "sleep");
    let err = ca
        .client("node-a")
        .unwrap()
        .create_certificate(
            &csr(vec![uri(&sleep.to_string())]),
            &sleep,
            Duration::from_secs(3600),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CaError::Protocol("IstioCertificateResponse.cert_chain (field 1) is empty".into())
    );
    assert!(!err.to_string().contains("unreachable"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn our_client_reads_the_chain_from_field_1_as_istio_sends_it() {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let mut ca = ca().await;
    // Encoded by hand, as istiod would: cert_chain is field 1.
    let mut message = Vec::new();
    for pem in ["leaf", "root"] {
        encode_key(1, WireType::LengthDelimited, &mut message);
        encode_varint(pem.len() as u64, &mut message);
        message.extend(pem.as_bytes());
    }
    ca.addr = answering_ca(&ca, message).await;
    let sleep = id("demo", "sleep");
    let chain = ca
        .client("node-a")
        .unwrap()
        .create_certificate(
            &csr(vec![uri(&sleep.to_string())]),
            &sleep,
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    assert_eq!(chain, ["leaf", "root"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_review_authenticates_tunnels_for_their_node_and_workloads_for_themselves() {
    use ztunnel_ca::{
        auth::{Authenticator, Caller},
        kube::TokenReview,
    };
    // A stand-in API server: it knows three tokens.
    let api = testbed::kube_api::FakeApiServer::start().await.unwrap();
    api.on_token_review(|token| match token {
        "tunnel-a" => serde_json::json!({"authenticated": true, "audiences": ["istio-ca"],
            "user": {"username": "system:serviceaccount:istio-system:ztunnel",
            "extra": {"authentication.kubernetes.io/node-name": ["node-a"]}}}),
        "app" => serde_json::json!({"authenticated": true, "audiences": ["istio-ca"],
            "user": {"username": "system:serviceaccount:demo:sleep"}}),
        "unbound" => serde_json::json!({"authenticated": true, "audiences": ["istio-ca"],
            "user": {"username": "system:serviceaccount:istio-system:ztunnel"}}),
        // An authenticator deaf to audiences: valid, but not confirmed for ours.
        "other-audience" => serde_json::json!({"authenticated": true,
            "user": {"username": "system:serviceaccount:demo:sleep"}}),
        _ => serde_json::json!({"authenticated": false, "error": "invalid bearer token"}),
    });
    let dir = testbed::mesh::TempDir::new("token-review").unwrap();
    let review = TokenReview::new(
        api.client(dir.path()).await.unwrap(),
        vec!["istio-system/ztunnel".into()],
        vec!["istio-ca".into()],
    );
    let reviews = || {
        api.calls()
            .iter()
            .filter(|c| c.resource.ends_with("/tokenreviews"))
            .count()
    };
    // Each part from its own address: refusals are budgeted per source.
    let (first, second) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
    assert_eq!(
        review.authenticate("tunnel-a", first).await.unwrap(),
        Caller::Node("node-a".into())
    );
    assert_eq!(
        review.authenticate("app", first).await.unwrap(),
        Caller::Workload {
            namespace: "demo".into(),
            service_account: "sleep".into()
        }
    );
    let err = review.authenticate("unbound", first).await.unwrap_err();
    assert!(err.to_string().contains("not bound to a pod"), "{err}");
    let err = review.authenticate("forged", first).await.unwrap_err();
    assert!(err.to_string().contains("invalid bearer token"), "{err}");
    let err = review
        .authenticate("other-audience", first)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not confirmed for the audience"),
        "{err}"
    );

    // A caller authenticated a moment ago is not reviewed again; a refused one is.
    let before = reviews();
    for _ in 0..3 {
        assert_eq!(
            review.authenticate("tunnel-a", second).await.unwrap(),
            Caller::Node("node-a".into())
        );
        assert!(review.authenticate("forged", second).await.is_err());
    }
    assert_eq!(
        reviews() - before,
        3,
        "one review per refusal, none for the tunnel"
    );
}

/// SIGTERM: the CA stops accepting, closes the connections it holds (one in its
/// TLS handshake, one idle after a call; a keep-alive metrics client) rather than
/// waiting for them, and exits 0 well within its grace period.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_the_ca_and_it_exits_0_within_the_grace_period() {
    let mut ca = CaProcess::start(&["--drain-grace", "30s"]).await;
    let certs = manager(&ca.files, "node-a", Duration::from_secs(3600));
    certs.fetch(&id("demo", "sleep")).await.unwrap();
    let mut silent = TcpStream::connect(("127.0.0.1", ca.api)).await.unwrap();
    let mut metrics = TcpStream::connect(("127.0.0.1", ca.metrics)).await.unwrap();
    metrics
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: ca\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 15];
    metrics.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200 OK");

    let started = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ca.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), ca.child.wait())
        .await
        .expect("ztunnel-ca exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status}: {}", ca.log());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "exited after {:?}: it waited for idle connections",
        started.elapsed()
    );
    // Both held connections were closed (end of stream after what was sent).
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "still open");
    let read = tokio::time::timeout(Duration::from_secs(5), metrics.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "still open");
    // Nothing accepts any more.
    assert!(TcpStream::connect(("127.0.0.1", ca.api)).await.is_err());
    assert!(TcpStream::connect(("127.0.0.1", ca.metrics)).await.is_err());
    let log = ca.log();
    assert!(
        log.contains("CA draining") && log.contains("CA drained"),
        "{log}"
    );
}
