//! Fixtures for tests of the mesh itself: a local CA, temporary directories, and the
//! path of the built `ztunnel` binary.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
};

use anyhow::{Context, Result};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use ztunnel::ca::{
    auth::{LocalPods, NodeTokens},
    client::{CaClient, CaClientConfig},
    server::{CaMetrics, CaServer},
    Authority, AuthorityOptions,
};

/// The CA's TLS name in tests.
pub const CA_SERVER_NAME: &str = "ztunnel-ca.istio-system.svc";

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "{}-{}-{}-{name}",
            crate::host::PREFIX,
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A workload the CA knows: a pod with this service account runs on this node.
pub struct PodOnNode<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub node: &'a str,
}

/// The CA (`ztunnel::ca`) serving on 127.0.0.1 inside the test's runtime, in local
/// mode: a token per node, the pods in a config directory.
pub struct LocalCa {
    pub dir: TempDir,
    pub addr: SocketAddr,
    pub trust_domain: String,
    pub registry: Arc<Mutex<Registry>>,
    nodes: Vec<String>,
    task: Option<(oneshot::Sender<()>, JoinHandle<Result<()>>)>,
}

impl LocalCa {
    pub async fn start(trust_domain: &str, pods: &[PodOnNode<'_>]) -> Result<Self> {
        Self::start_with(trust_domain, pods, |_| Ok(())).await
    }

    /// Like [`LocalCa::start`], with `cacerts` prepared by `prepare` (given the
    /// directory) instead of a generated root.
    pub async fn start_with(
        trust_domain: &str,
        pods: &[PodOnNode<'_>],
        prepare: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Self> {
        let dir = TempDir::new("ca")?;
        for sub in ["cacerts", "config", "tokens"] {
            fs::create_dir(dir.path().join(sub))?;
        }
        prepare(&dir.path().join("cacerts"))?;
        let mut nodes: Vec<String> = pods.iter().map(|p| p.node.to_owned()).collect();
        nodes.sort();
        nodes.dedup();
        let tokens: BTreeMap<&str, String> =
            nodes.iter().map(|n| (n.as_str(), token_for(n))).collect();
        fs::write(
            dir.path().join("node-tokens.yaml"),
            serde_yaml::to_string(&tokens)?,
        )?;
        for node in &nodes {
            fs::write(dir.path().join("tokens").join(node), token_for(node))?;
        }
        let mut yaml = String::new();
        for (i, pod) in pods.iter().enumerate() {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{i}\n  namespace: {}\nspec:\n  serviceAccountName: {}\n  nodeName: {}\n",
                pod.namespace, pod.service_account, pod.node
            ));
        }
        fs::write(dir.path().join("config/pods.yaml"), yaml)?;
        let mut ca = Self {
            dir,
            addr: "127.0.0.1:0".parse()?,
            trust_domain: trust_domain.to_owned(),
            registry: Arc::new(Mutex::new(Registry::default())),
            nodes,
            task: None,
        };
        ca.run().await?;
        Ok(ca)
    }

    /// (Re)starts serving, on the same port as before if there was one.
    pub async fn run(&mut self) -> Result<()> {
        let authority = Arc::new(Authority::load_or_create(AuthorityOptions {
            dir: self.dir.path().join("cacerts"),
            trust_domain: self.trust_domain.clone(),
            default_ttl: std::time::Duration::from_secs(24 * 3600),
            max_ttl: std::time::Duration::from_secs(90 * 86_400),
        })?);
        let mut registry = Registry::default();
        let metrics = CaMetrics::register(&mut registry);
        *self.registry.lock().unwrap() = registry;
        let server = CaServer::new(
            authority,
            Arc::new(NodeTokens::from_file(
                &self.dir.path().join("node-tokens.yaml"),
            )?),
            Arc::new(LocalPods::new(self.dir.path().join("config"))),
            metrics,
        );
        let tls = server.tls_config(&[CA_SERVER_NAME.to_owned()])?;
        let listener = TcpListener::bind(self.addr)
            .await
            .context("binding the CA")?;
        self.addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve_until(listener, tls, async {
            let _ = stopped.await;
        }));
        self.task = Some((stop, task));
        Ok(())
    }

    /// Stops serving and closes every connection: the CA is down.
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.task.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
    }

    pub fn root_pem(&self) -> String {
        fs::read_to_string(self.dir.path().join("cacerts/root-cert.pem"))
            .expect("the CA wrote its root")
    }

    /// A client authenticated as `node`'s tunnel.
    pub fn client(&self, node: &str) -> Result<CaClient> {
        assert!(
            self.nodes.iter().any(|n| n == node),
            "the CA has no token for {node}"
        );
        CaClient::new(CaClientConfig {
            address: self.addr.to_string(),
            server_name: CA_SERVER_NAME.into(),
            roots_pem: self.root_pem(),
            token_file: self.dir.path().join("tokens").join(node),
        })
    }

    /// A client whose token the CA does not know.
    pub fn client_with_token(&self, token: &str) -> Result<CaClient> {
        let path = self.dir.path().join("tokens/unknown");
        fs::write(&path, token)?;
        CaClient::new(CaClientConfig {
            address: self.addr.to_string(),
            server_name: CA_SERVER_NAME.into(),
            roots_pem: self.root_pem(),
            token_file: path,
        })
    }

    /// The CA's metrics in Prometheus text form.
    pub fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry.lock().unwrap())
            .unwrap();
        text
    }
}

fn token_for(node: &str) -> String {
    format!("token-of-{node}-0123456789abcdef")
}

/// The built `ztunnel` binary (next to this test binary's directory). `cargo xtask
/// test` builds it with the rest of the workspace.
pub fn ztunnel_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let binary = dir.join("ztunnel");
    assert!(
        binary.exists(),
        "{} is missing: build it with `cargo build -p ztunnel` (cargo xtask test does)",
        binary.display()
    );
    binary
}
