//! `cargo xtask bench ca`: CSRs signed per second (the CA's signing alone, and
//! through the gRPC API), and mTLS handshakes per second, all ECDSA P-256.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use prometheus_client::registry::Registry;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::ServerName;
use testbed::mesh::{LocalCa, PodOnNode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use ztunnel::{
    certs::{CertManager, CertManagerConfig},
    identity::Identity,
};
use ztunnel_ca::{Authority, AuthorityOptions};

const CSRS: usize = 2_000;
const HANDSHAKES: usize = 2_000;
const CONCURRENCY: usize = 8;

fn csr(identity: &Identity) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

#[tokio::main]
async fn main() -> Result<()> {
    let identity = Identity::new("cluster.local", "demo", "sleep")?;
    let ca = LocalCa::start(
        "cluster.local",
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
        ],
    )
    .await?;

    let started = Instant::now();
    let csrs: Vec<String> = (0..CSRS).map(|_| csr(&identity)).collect();
    let keygen = started.elapsed();
    println!(
        "ca/keygen+csr       {:>8.0} per second (the tunnel's side, one core)",
        rate(CSRS, keygen)
    );

    let authority = Authority::load_or_create(AuthorityOptions {
        dir: ca.dir.path().join("cacerts"),
        trust_domain: "cluster.local".into(),
        default_ttl: Duration::from_secs(86_400),
        max_ttl: Duration::from_secs(86_400),
    })?;
    let started = Instant::now();
    for pem in &csrs {
        let (id, params) = authority
            .check_csr(pem)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        authority
            .sign(&id, &params, None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let signing = rate(CSRS, started.elapsed());
    println!("ca/sign             {signing:>8.0} CSRs per second (verify CSR + sign, one core)");

    let client = Arc::new(ca.client("node-a")?);
    let csrs = Arc::new(csrs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let (client, csrs, identity) = (client.clone(), csrs.clone(), identity.clone());
        tasks.push(tokio::spawn(async move {
            for pem in csrs.iter().skip(worker).step_by(CONCURRENCY) {
                client
                    .create_certificate(pem, &identity, Duration::from_secs(3600))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let api = rate(CSRS, started.elapsed());
    println!(
        "ca/grpc             {api:>8.0} CSRs per second ({CONCURRENCY} in flight over one TLS connection); {:.2} of bare signing",
        api / signing
    );

    let certs = CertManager::new(
        client,
        CertManagerConfig::new("cluster.local"),
        &mut Registry::default(),
    );
    let web = Identity::new("cluster.local", "demo", "web")?;
    let (server_cert, client_cert) = (certs.fetch(&web).await?, certs.fetch(&identity).await?);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(server_cert.server_config()?);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"x").await;
                }
            });
        }
    });
    let connector = TlsConnector::from(client_cert.client_config(web.clone())?);
    let started = Instant::now();
    for _ in 0..HANDSHAKES {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = connector.connect(ServerName::try_from("web")?, tcp).await?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?; // the server accepted our certificate too
    }
    let handshakes = rate(HANDSHAKES, started.elapsed());
    println!("tls/mtls-handshake  {handshakes:>8.0} per second (TLS 1.3, P-256 both sides, sequential, client and server on this machine)");
    Ok(())
}
