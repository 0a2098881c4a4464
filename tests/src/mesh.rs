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
use ztunnel_ca::{
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

/// The CA (`ztunnel_ca`) serving on 127.0.0.1 inside the test's runtime, in local
/// mode: a token per node, the pods in a config directory.
pub struct LocalCa {
    pub dir: TempDir,
    pub addr: SocketAddr,
    /// Where it finds the pods (default: its own directory's `config`).
    pub config_dir: PathBuf,
    /// The network namespace it listens in (default: the test's).
    pub netns: Option<PathBuf>,
    pub trust_domain: String,
    pub registry: Arc<Mutex<Registry>>,
    nodes: Vec<String>,
    task: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
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
            config_dir: dir.path().join("config"),
            netns: None,
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
            Arc::new(LocalPods::new(self.config_dir.clone())),
            metrics,
        );
        let tls = server.tls_config(&[CA_SERVER_NAME.to_owned()])?;
        let listener = match &self.netns {
            None => TcpListener::bind(self.addr)
                .await
                .context("binding the CA")?,
            Some(netns) => {
                let addr = self.addr;
                let std = ztunnel::netns::run_in(netns, move || {
                    let l = std::net::TcpListener::bind(addr)?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                })
                .context("binding the CA in its network namespace")?;
                TcpListener::from_std(std)?
            }
        };
        self.addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve_until(listener, tls, async {
            let _ = stopped.await;
        }));
        self.task = Some((stop, task));
        Ok(())
    }

    /// A CA for a mesh: pods from `config_dir`, a token for each node, listening on
    /// `addr` inside `netns` (a node's, so every node reaches it over the fabric).
    pub async fn for_mesh(
        trust_domain: &str,
        nodes: &[&str],
        config_dir: &Path,
        netns: &Path,
        addr: SocketAddr,
    ) -> Result<Self> {
        let pods: Vec<PodOnNode> = nodes
            .iter()
            .map(|node| PodOnNode {
                namespace: "unused",
                service_account: "unused",
                node,
            })
            .collect();
        let mut ca = Self::start(trust_domain, &pods).await?;
        ca.stop().await;
        ca.config_dir = config_dir.to_owned();
        ca.netns = Some(netns.to_owned());
        ca.addr = addr;
        ca.run().await?;
        Ok(ca)
    }

    pub fn token_file(&self, node: &str) -> PathBuf {
        self.dir.path().join("tokens").join(node)
    }

    /// Stops serving and closes every connection: the CA is down.
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.task.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
    }

    /// Starts again with a new root (as a CA whose root Secret was replaced).
    pub async fn new_root(&mut self) -> Result<()> {
        self.stop().await;
        fs::remove_dir_all(self.dir.path().join("cacerts"))?;
        self.run().await
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
        Ok(CaClient::new(CaClientConfig {
            address: self.addr.to_string(),
            server_name: CA_SERVER_NAME.into(),
            roots_pem: self.root_pem(),
            roots_file: None,
            token_file: self.dir.path().join("tokens").join(node),
        })?)
    }

    /// A client whose token the CA does not know.
    pub fn client_with_token(&self, token: &str) -> Result<CaClient> {
        let path = self.dir.path().join("tokens/unknown");
        fs::write(&path, token)?;
        Ok(CaClient::new(CaClientConfig {
            address: self.addr.to_string(),
            server_name: CA_SERVER_NAME.into(),
            roots_pem: self.root_pem(),
            roots_file: None,
            token_file: path,
        })?)
    }

    /// A certificate for `identity`, signed with this CA's key, with any validity:
    /// one the CA itself would never issue (impostors, expired peers).
    pub fn forge(
        &self,
        identity: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<ztunnel::certs::WorkloadCert> {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
        let cacerts = self.dir.path().join("cacerts");
        let ca_key = KeyPair::from_pem(&fs::read_to_string(cacerts.join("ca-key.pem"))?)?;
        let issuer =
            Issuer::from_ca_cert_pem(&fs::read_to_string(cacerts.join("ca-cert.pem"))?, ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
        params.not_before = not_before;
        params.not_after = not_after;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer)?;
        let roots = ztunnel::tls::parse_certs(&self.root_pem())?;
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let chain = vec![cert.der().clone()];
        Ok(ztunnel::certs::WorkloadCert {
            identity: identity.parse()?,
            key: ztunnel::tls::certified_key(chain.clone(), &key_der)?,
            chain,
            bundle: ztunnel::tls::TrustBundle::new(roots, &self.trust_domain, &[])?,
            info: ztunnel::certs::cert_info(cert.der())?,
        })
    }

    /// A certificate for `identity` valid now (for an hour), signed with this
    /// CA's key: a mesh peer's, without a tunnel.
    pub fn forge_valid(&self, identity: &str) -> Result<ztunnel::certs::WorkloadCert> {
        let now = time::OffsetDateTime::now_utc();
        self.forge(
            identity,
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
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

/// The built `ztunnel` binary, next to the running executable (a binary in
/// `target/<profile>/`) or one directory up (a test in `target/<profile>/deps/`).
/// `cargo xtask test` and `cargo xtask demo` build it.
pub fn ztunnel_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the executable's path");
    let dir = exe.parent().expect("the executable's directory");
    [dir.join("ztunnel"), dir.join("../ztunnel")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "no ztunnel binary near {}: build it with `cargo build -p ztunnel`",
                exe.display()
            )
        })
}

/// The built `ztunnel-ca` binary (the CA), next to [`ztunnel_binary`].
pub fn ca_binary() -> PathBuf {
    ztunnel_binary().with_file_name("ztunnel-ca")
}

/// A pod's place in the mesh config.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    pub pod: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
    /// Declares the pod on another node than the one it runs on (no tunnel then
    /// serves it: for impostor tests).
    pub node: Option<String>,
}

impl WorkloadSpec {
    pub fn new(pod: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            pod: pod.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
            labels: vec![("app".into(), pod.into())],
            node: None,
        }
    }

    pub fn declared_on(mut self, node: &str) -> Self {
        self.node = Some(node.into());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.retain(|(k, _)| k != key);
        self.labels.push((key.into(), value.into()));
        self
    }
}

pub const TRUST_DOMAIN: &str = "cluster.local";

/// Waypoint `demo/waypoint` (Gateway) and Service `demo/server` (10.96.0.80:80 →
/// 8080, pods `app: server`) bound to it.
pub const WAYPOINT_FOR_SERVER: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.80
  selector: {app: server}
  ports: [{port: 80, targetPort: 8080}]
"#;
const CA_PORT: u16 = 15012;

/// A running mesh on a testbed cluster: the config directory every node reads, the
/// CA (in the test process, listening in the first node's namespace) and a
/// `ztunnel run` process per node.
pub struct Mesh {
    pub cluster: crate::Cluster,
    pub ca: LocalCa,
    pub config: TempDir,
    tunnels: BTreeMap<String, std::process::Child>,
    /// Kubernetes mode: the stand-in API server the tunnels watch, their
    /// kubeconfig, and the processes standing for the pods' sandboxes in the
    /// kubelet-style cgroups the tunnels discover.
    pub api: Option<crate::kube_api::FakeApiServer>,
    kubeconfig: Option<PathBuf>,
    sandboxes: Vec<std::process::Child>,
    /// Extra arguments for `ztunnel run` by node (used at the next start).
    pub tunnel_args: BTreeMap<String, Vec<String>>,
    /// Extra environment for the waypoints (used at the next start).
    pub waypoint_env: Vec<(String, String)>,
}

/// Where the stand-in API server listens: in the first node's namespace.
const API_PORT: u16 = 6443;

/// The tokio workers of each tunnel (and of a peer proxy beside them):
/// `ZTB_WORKERS`, 2 by default.
pub fn worker_threads() -> String {
    std::env::var("ZTB_WORKERS").unwrap_or_else(|_| "2".into())
}

/// The UID the stand-in API server gives the n-th workload's pod.
pub fn pod_uid(n: usize) -> String {
    format!("0c0ffee0-0000-4000-8000-{n:012}")
}

impl Mesh {
    /// Runs `program` in `pod` and returns its stdout and stderr together.
    pub fn output(&self, pod: &str, program: &str, args: &[&str]) -> String {
        let out = self.cluster.pod(pod).run(program, args).unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `pod`'s address and `port`, as a probe takes it.
    pub fn addr(&self, pod: &str, port: u16) -> String {
        std::net::SocketAddr::new(self.cluster.pod(pod).ip.into(), port).to_string()
    }

    /// Writes the config (`ambient` namespaces labelled for the mesh, the others
    /// plain) and starts a tunnel on every node.
    pub async fn start(
        cluster: crate::Cluster,
        workloads: &[WorkloadSpec],
        ambient: &[&str],
    ) -> Result<Self> {
        Self::start_from(cluster, workloads, ambient, false, &[]).await
    }

    /// Like [`Mesh::start`], with no tunnel of ours on the `foreign` nodes: their
    /// pods are in the config (in the mesh, with identities the CA vouches for) but
    /// another data plane serves them (Istio's ztunnel, in the interop tests).
    pub async fn start_beside(
        cluster: crate::Cluster,
        workloads: &[WorkloadSpec],
        ambient: &[&str],
        foreign: &[&str],
    ) -> Result<Self> {
        Self::start_from(cluster, workloads, ambient, false, foreign).await
    }

    /// The same mesh, with tunnels that read a (stand-in) Kubernetes API server
    /// (`ztunnel run --kube`) and find their pods by UID in kubelet-style cgroups,
    /// as on a Kubernetes node. The CA keeps reading the config directory.
    pub async fn start_kube(
        cluster: crate::Cluster,
        workloads: &[WorkloadSpec],
        ambient: &[&str],
    ) -> Result<Self> {
        Self::start_from(cluster, workloads, ambient, true, &[]).await
    }

    async fn start_from(
        cluster: crate::Cluster,
        workloads: &[WorkloadSpec],
        ambient: &[&str],
        kube: bool,
        foreign: &[&str],
    ) -> Result<Self> {
        let config = TempDir::new("config")?;
        fs::write(
            config.path().join("workloads.yaml"),
            workloads_yaml(&cluster, workloads)?,
        )?;
        let mut namespaces: Vec<&str> = workloads.iter().map(|w| w.namespace.as_str()).collect();
        namespaces.sort();
        namespaces.dedup();
        for ns in namespaces {
            fs::write(
                config.path().join(format!("ns-{ns}.yaml")),
                namespace_yaml(ns, ambient.contains(&ns)),
            )?;
        }
        let first = &cluster.nodes()[0];
        let nodes: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
        let node_refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let addr = SocketAddr::new(first.ip.into(), CA_PORT);
        let ca = LocalCa::for_mesh(
            TRUST_DOMAIN,
            &node_refs,
            config.path(),
            &crate::cluster::netns_path(&first.netns),
            addr,
        )
        .await?;
        fs::write(
            config
                .path()
                .join("..")
                .join(format!("{}-root.pem", cluster.prefix())),
            ca.root_pem(),
        )?;
        let mut mesh = Self {
            cluster,
            ca,
            config,
            tunnels: BTreeMap::new(),
            api: None,
            kubeconfig: None,
            sandboxes: Vec::new(),
            tunnel_args: BTreeMap::new(),
            waypoint_env: Vec::new(),
        };
        if kube {
            mesh.start_api(workloads, ambient)?;
        }
        for node in nodes.iter().filter(|n| !foreign.contains(&n.as_str())) {
            mesh.start_tunnel(node).await?;
        }
        Ok(mesh)
    }

    /// Starts the stand-in API server with the namespaces, service accounts and
    /// pods (by UID, without the local-mode annotations), and lays out each pod's
    /// cgroup as the kubelet would, with a sandbox process in the pod's netns.
    fn start_api(&mut self, workloads: &[WorkloadSpec], ambient: &[&str]) -> Result<()> {
        let first = self.cluster.nodes()[0].clone();
        let addr = SocketAddr::new(first.ip.into(), API_PORT);
        let listener = first.in_netns(move || std::net::TcpListener::bind(addr))??;
        let api = crate::kube_api::FakeApiServer::start_on(listener)?;
        for w in workloads {
            api.apply_yaml(&namespace_yaml(
                &w.namespace,
                ambient.contains(&w.namespace.as_str()),
            ));
            api.apply(
                serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": w.service_account, "namespace": w.namespace}}),
            );
        }
        for (n, w) in workloads.iter().enumerate() {
            let pod = self.cluster.pod(&w.pod).clone();
            let uid = pod_uid(n);
            api.apply(serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": w.pod, "namespace": w.namespace, "uid": uid, "labels": w.labels.iter().cloned().collect::<BTreeMap<_, _>>()},
                "spec": {"serviceAccountName": w.service_account, "nodeName": w.node.as_deref().unwrap_or(&pod.node)},
                "status": {"phase": "Running", "podIP": pod.ip.to_string()}}));
            self.start_sandbox(&w.pod, &uid)?;
        }
        self.kubeconfig = Some(api.kubeconfig(self.config.path(), "tunnel")?);
        self.api = Some(api);
        Ok(())
    }

    /// Does on the pod's node what the kubelet does when the pod with this UID
    /// starts: its cgroup, named after the UID, with a sandbox process in the pod's
    /// network namespace.
    pub fn start_sandbox(&mut self, pod: &str, uid: &str) -> Result<()> {
        let pod = self.cluster.pod(pod).clone();
        let sandbox = self
            .cluster
            .node(&pod.node)
            .pod_cgroup_root
            .join(format!("kubepods/besteffort/pod{uid}/sandbox"));
        fs::create_dir_all(&sandbox)?;
        let child = pod.command("sleep")?.arg("3600").spawn()?;
        fs::write(sandbox.join("cgroup.procs"), child.id().to_string())?;
        self.sandboxes.push(child);
        Ok(())
    }

    /// The stand-in API server (Kubernetes mode).
    pub fn api(&self) -> &crate::kube_api::FakeApiServer {
        self.api.as_ref().expect("a mesh started with start_kube")
    }

    /// The CA's root certificate, as the tunnels are given it.
    pub fn root_file(&self) -> PathBuf {
        self.config
            .path()
            .join("..")
            .join(format!("{}-root.pem", self.cluster.prefix()))
    }

    /// The tunnel's log (stderr), for assertions on what it reported.
    pub fn log_file(&self, node: &str) -> PathBuf {
        self.ca.dir.path().join(format!("ztunnel-{node}.log"))
    }

    pub fn log(&self, node: &str) -> String {
        fs::read_to_string(self.log_file(node)).unwrap_or_default()
    }

    /// Starts `ztunnel run` on the node and waits until it is ready.
    pub async fn start_tunnel(&mut self, node_name: &str) -> Result<()> {
        let node = self.cluster.node(node_name).clone();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file(node_name))?;
        let mut cmd = node.command(ztunnel_binary())?;
        cmd.arg("run");
        match &self.kubeconfig {
            Some(kubeconfig) => cmd.arg("--kube").env("KUBECONFIG", kubeconfig),
            None => cmd.arg("--config").arg(self.config.path()),
        };
        cmd.args([
            "--config-poll",
            "100ms",
            "--node",
            node_name,
            "--trust-domain",
            TRUST_DOMAIN,
        ])
        .arg("--ca-address")
        .arg(self.ca.addr.to_string())
        .arg("--ca-root")
        .arg(self.root_file())
        .arg("--ca-token")
        .arg(self.ca.token_file(node_name))
        .arg("--pin-dir")
        .arg(node.bpffs.join("ztunnel"))
        .arg("--pod-cgroup-root")
        .arg(&node.pod_cgroup_root)
        .args(self.tunnel_args.get(node_name).into_iter().flatten())
        .env("ZTUNNEL_WORKER_THREADS", worker_threads())
        // ZTB_LOG overrides the tunnels' log filter when debugging a test.
        .env(
            "RUST_LOG",
            std::env::var("ZTB_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(log);
        let mut child = cmd.spawn().context("starting ztunnel run")?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "ztunnel on {node_name} exited ({status}):\n{}",
                    self.log(node_name)
                );
            }
            if self
                .http_get(node_name, 15021, "/healthz/ready")
                .await
                .is_ok_and(|(code, _)| code == 200)
            {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "ztunnel on {node_name} not ready:\n{}",
                self.log(node_name)
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.tunnels.insert(node_name.to_owned(), child);
        Ok(())
    }

    /// Starts the `waypoint` binary in `pod` (declared in the config as the pod of
    /// Gateway `namespace/name`), and waits until it serves.
    pub async fn start_waypoint(
        &mut self,
        pod_name: &str,
        namespace: &str,
        name: &str,
    ) -> Result<()> {
        self.start_waypoint_with(pod_name, namespace, name, None)
            .await
    }

    /// Like [`Mesh::start_waypoint`], with a MeshConfig file (extension providers).
    pub async fn start_waypoint_with(
        &mut self,
        pod_name: &str,
        namespace: &str,
        name: &str,
        mesh_config: Option<&Path>,
    ) -> Result<()> {
        let args: Vec<&std::ffi::OsStr> = match mesh_config {
            Some(path) => vec!["--mesh-config".as_ref(), path.as_os_str()],
            None => vec![],
        };
        self.start_waypoint_args(pod_name, namespace, name, &args)
            .await
    }

    /// Like [`Mesh::start_waypoint`], with more arguments to the waypoint.
    pub async fn start_waypoint_args(
        &mut self,
        pod_name: &str,
        namespace: &str,
        name: &str,
        args: &[&std::ffi::OsStr],
    ) -> Result<()> {
        let pod = self.cluster.pod(pod_name).clone();
        let log_name = format!("waypoint-{pod_name}");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file(&log_name))?;
        let binary = ztunnel_binary().with_file_name("waypoint");
        let mut cmd = pod.command(&binary)?;
        cmd.arg("--config")
            .arg(self.config.path())
            .args([
                "--config-poll",
                "100ms",
                "--name",
                name,
                "--namespace",
                namespace,
                "--pod",
                pod_name,
            ])
            .arg("--ca-address")
            .arg(self.ca.addr.to_string())
            .arg("--ca-root")
            .arg(self.root_file())
            .arg("--ca-token")
            .arg(self.ca.token_file(&pod.node))
            .env(
                "RUST_LOG",
                std::env::var("ZTB_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.waypoint_env.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::null())
            .stderr(log);
        cmd.args(args);
        let mut child = cmd.spawn().context("starting the waypoint")?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let ip = pod.ip;
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("the waypoint exited ({status}):\n{}", self.log(&log_name));
            }
            let listening =
                pod.in_netns(move || std::net::TcpStream::connect((ip, 15008)).is_ok())?;
            if listening {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the waypoint is not listening:\n{}",
                self.log(&log_name)
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.tunnels.insert(log_name, child);
        Ok(())
    }

    /// The waypoint's metrics page (it listens on 15020 inside its pod).
    pub async fn waypoint_metrics(&self, pod: &str) -> String {
        let pod = self.cluster.pod(pod);
        pod.in_netns(|| -> std::io::Result<String> {
            use std::io::{Read, Write};
            let mut tcp = std::net::TcpStream::connect(("127.0.0.1", 15020))?;
            tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
            let mut page = String::new();
            tcp.read_to_string(&mut page)?;
            Ok(page)
        })
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
    }

    /// The process id of the node's tunnel.
    pub fn tunnel_pid(&self, node: &str) -> Option<u32> {
        self.tunnels.get(node).map(|c| c.id())
    }

    /// Kills the node's tunnel (SIGKILL: no draining).
    pub fn kill_tunnel(&mut self, node: &str) {
        if let Some(mut child) = self.tunnels.remove(node) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for the tunnel to exit; returns its exit status.
    pub async fn stop_tunnel(&mut self, node: &str) -> Result<std::process::ExitStatus> {
        let mut child = self
            .tunnels
            .remove(node)
            .context("no tunnel on that node")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "ztunnel on {node} did not exit after SIGTERM"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// GET `path` from the node's tunnel on `port` (inside the node's namespace).
    pub async fn http_get(&self, node: &str, port: u16, path: &str) -> Result<(u16, String)> {
        self.http_request(node, port, "GET", path).await
    }

    /// One HTTP/1.0 request to the node's tunnel on `port` (inside the node's
    /// namespace): the status and the body.
    pub async fn http_request(
        &self,
        node: &str,
        port: u16,
        method: &str,
        path: &str,
    ) -> Result<(u16, String)> {
        let node = self.cluster.node(node);
        let (method, path) = (method.to_owned(), path.to_owned());
        node.in_netns(move || -> Result<(u16, String)> {
            use std::io::{Read, Write};
            let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
            tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            write!(
                tcp,
                "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
            )?;
            let mut response = String::new();
            tcp.read_to_string(&mut response)?;
            let code = response
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .context("no HTTP status")?;
            let body = response
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_owned())
                .unwrap_or_default();
            Ok((code, body))
        })?
    }

    /// The node's Prometheus metrics page.
    pub async fn metrics(&self, node: &str) -> String {
        self.http_get(node, 15020, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// The node's `/config_dump`.
    pub async fn config_dump(&self, node: &str) -> serde_json::Value {
        let (_, body) = self
            .http_get(node, 15000, "/config_dump")
            .await
            .expect("config_dump");
        serde_json::from_str(&body).expect("config_dump is JSON")
    }

    /// Writes (or replaces) a config file; the tunnels pick it up.
    pub fn write_config(&self, name: &str, yaml: &str) -> Result<()> {
        write_config_file(self.config.path(), name, yaml)
    }

    /// Denies everything in `demo`, then waits until `node`'s tunnel logs that it
    /// closed a live connection the new policy denies.
    pub async fn deny_all_and_wait_for_a_live_connection_closed(&self, node: &str) {
        self.write_config(
            "deny-all.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: demo}\nspec: {}\n",
        )
        .expect("writing deny-all.yaml");
        eventually(
            std::time::Duration::from_secs(15),
            &format!("{node} closed the live connection the new policy denies"),
            || async {
                self.log(node)
                    .contains("closing a connection the new policy denies")
            },
        )
        .await;
    }

    /// A config writer that outlives a borrow of the mesh (for a thread that
    /// changes the config while the test waits on the mesh).
    pub fn config_writer(&self) -> impl Fn(&str, &str) -> Result<()> + Send + 'static {
        let dir = self.config.path().to_owned();
        move |name, yaml| write_config_file(&dir, name, yaml)
    }

    /// The config's Pod object for this workload.
    pub fn workload_yaml(&self, workload: &WorkloadSpec) -> Result<String> {
        workloads_yaml(&self.cluster, std::slice::from_ref(workload))
    }

    /// Waits until the node's tunnel has `pod` enrolled (or not).
    pub async fn wait_enrolled(&self, node: &str, pod: &str, enrolled: bool) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let dump = self.config_dump(node).await;
            let list = dump["enrolled"].as_array().cloned().unwrap_or_default();
            let found = list
                .iter()
                .any(|e| e.as_str().is_some_and(|e| e.ends_with(&format!("/{pod}"))));
            if found == enrolled {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{pod} enrolled={found} on {node}, expected {enrolled}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Ok(dir) = std::env::var("ZTB_KEEP_LOGS") {
            for node in self.tunnels.keys() {
                let _ = fs::copy(
                    self.log_file(node),
                    Path::new(&dir).join(format!("{node}.log")),
                );
            }
        }
        for (_, mut child) in std::mem::take(&mut self.tunnels) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for mut child in std::mem::take(&mut self.sandboxes) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.root_file());
    }
}

pub fn namespace_yaml(name: &str, ambient: bool) -> String {
    let labels = if ambient {
        "\n  labels:\n    istio.io/dataplane-mode: ambient"
    } else {
        ""
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n")
}

fn write_config_file(dir: &Path, name: &str, yaml: &str) -> Result<()> {
    // Write then rename: a tunnel never reads half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, yaml)?;
    fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

fn workloads_yaml(cluster: &crate::Cluster, workloads: &[WorkloadSpec]) -> Result<String> {
    let mut yaml = String::new();
    for w in workloads {
        let pod = cluster.pod(&w.pod);
        let labels: String = w
            .labels
            .iter()
            .map(|(k, v)| format!("\n    {k}: {v}"))
            .collect();
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  labels:{labels}\n  annotations:\n    ztunnel.local/netns: {}\n    ztunnel.local/cgroup: {}\nspec:\n  serviceAccountName: {}\n  nodeName: {}\nstatus:\n  podIP: {}\n",
            w.pod,
            w.namespace,
            pod.netns_path().display(),
            pod.cgroup.display(),
            w.service_account,
            w.node.as_deref().unwrap_or(&pod.node),
            pod.ip
        ));
    }
    Ok(yaml)
}

/// Sets a process's soft RLIMIT_NOFILE (as `prlimit --nofile`); returns the old one.
pub fn set_fd_limit(pid: u32, soft: u64) -> Result<u64> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the current limit into `old`.
    if unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading the fd limit");
    }
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: sets the limit from a valid struct.
    if unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setting the fd limit");
    }
    Ok(old.rlim_cur)
}

/// How many file descriptors a process has open.
pub fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// What a process's descriptors are, for a failure message: counts by kind
/// (`udp`, `tcp`, `unix` sockets of its network namespace, `anon_inode:[eventfd]`,
/// files...).
pub fn fd_kinds(pid: u32) -> String {
    let mut sockets = std::collections::HashMap::new();
    for table in ["udp", "udp6", "tcp", "tcp6", "unix", "netlink", "raw"] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        // The inode column: the 7th for unix, the 10th for the others.
        let column = if table == "unix" { 6 } else { 9 };
        for line in text.lines().skip(1) {
            if let Some(inode) = line.split_whitespace().nth(column) {
                sockets.insert(inode.to_string(), table);
            }
        }
    }
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let target = fs::read_link(entry.path())
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default();
        let kind = match target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
        {
            Some(inode) => sockets.get(inode).copied().unwrap_or("socket").to_string(),
            None if target.starts_with('/') => "file".to_string(),
            None => target,
        };
        *kinds.entry(kind).or_default() += 1;
    }
    format!("{kinds:?}")
}

/// The value of a counter (or gauge) line of a metrics page, summed over the
/// lines whose labels contain every one of `labels`.
pub fn metric(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `check` until it returns true; fails after `within`.
pub async fn eventually<F, Fut>(within: std::time::Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Whether a `tb-probe connect` was refused by the mesh after it connected: the
/// connection was made (to a tunnel, which refused it), then closed or reset with
/// nothing received (a reset may show in a write, a broken pipe, or in the
/// half-close, not connected). A connect that failed, a timeout or any reply is not that.
pub fn refused_after_connect(out: &str) -> bool {
    let connected = accepted(out);
    let closed_empty = out.lines().any(|l| l == "reply=");
    let reset = out.lines().any(is_reset);
    connected && (closed_empty || reset)
}

/// Whether a probe's connection was accepted (by the capturing tunnel): it got
/// as far as printing its peer, or a reset beat its connect call back (the
/// tunnel took the connection and refused it at once; a refused SYN would say
/// "Connection refused").
pub fn accepted(out: &str) -> bool {
    out.lines().any(|l| {
        l.starts_with("peer=")
            || (l.starts_with("error=") && l.contains("Connection reset by peer"))
    })
}

/// Whether a probe's `error=` line is a reset, however it surfaced: in a write
/// (a broken pipe), in the half-close (not connected) or in a read.
pub fn is_reset(line: &str) -> bool {
    line.starts_with("error=")
        && [
            "Connection reset by peer",
            "Broken pipe",
            "Transport endpoint is not connected",
        ]
        .iter()
        .any(|reset| line.contains(reset))
}

/// Asserts [`refused_after_connect`], showing the probe's output otherwise.
#[track_caller]
pub fn assert_refused_after_connect(out: &str) {
    assert!(
        refused_after_connect(out),
        "expected: connected, then closed with nothing received (a refusal by the mesh); got:\n{out}"
    );
}

/// A raw HBONE peer's mTLS connection (see [`Mesh::hbone_peer`]).
pub type HboneTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

impl Mesh {
    /// Runs `f` in pod `from` (on a thread of its own; join the handle for its
    /// output) with an mTLS connection to pod `to`'s HBONE port: a mesh peer
    /// with a valid certificate for `identity` and no tunnel, for raw HTTP/2
    /// that no tunnel would send. The server must prove it is `to_identity`.
    pub fn hbone_peer<F, Fut>(
        &self,
        from: &str,
        identity: &str,
        to: &str,
        to_identity: &str,
        f: F,
    ) -> Result<std::thread::JoinHandle<Fut::Output>>
    where
        F: FnOnce(HboneTls) -> Fut + Send + 'static,
        Fut: std::future::Future + 'static,
        Fut::Output: Send + 'static,
    {
        let cert = self.ca.forge_valid(identity)?;
        let ip = self.cluster.pod(to).ip;
        let to_identity = to_identity.to_owned();
        self.cluster.pod(from).spawn_task(move || async move {
            let tls = hbone_tls(&cert, ip, &to_identity)
                .await
                .expect("an mTLS connection to the HBONE port");
            f(tls).await
        })
    }
}

/// An mTLS connection to `ip`'s HBONE port holding `cert`, requiring the
/// server to be `server` (a SPIFFE URI). Run inside a pod's namespace.
async fn hbone_tls(
    cert: &ztunnel::certs::WorkloadCert,
    ip: std::net::Ipv4Addr,
    server: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = cert.client_config(server.parse()?)?;
    let tcp = tokio::net::TcpStream::connect((ip, 15008)).await?;
    let name = rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::from(ip).into());
    Ok(tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?)
}
