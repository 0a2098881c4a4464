//! Istio's own ztunnel as a test peer (never part of the product): found, given its
//! local config and our CA, started in dedicated mode in a testbed pod, and waited
//! for. Used by the interoperability tests and by `cargo xtask bench mesh --peer`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{
    mesh::{eventually, Mesh, TempDir, CA_SERVER_NAME, TRUST_DOMAIN},
    Pod,
};

/// Istio's ztunnel: `$ISTIO_ZTUNNEL`, or `shared/peers/istio-ztunnel` in the
/// nearest directory above the workspace that has one. The error says where it
/// was looked for.
pub fn find() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("ISTIO_ZTUNNEL") {
        let path = PathBuf::from(path);
        anyhow::ensure!(
            path.exists(),
            "ISTIO_ZTUNNEL={} does not exist",
            path.display()
        );
        return Ok(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    workspace
        .ancestors()
        .map(|dir| dir.join("../shared/peers/istio-ztunnel"))
        .find(|path| path.exists())
        .context(
            "Istio's ztunnel was not found (shared/peers/istio-ztunnel beside the checkout, \
             or set ISTIO_ZTUNNEL)",
        )
}

/// A process killed when dropped, however the test or benchmark ends.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The environment that points Istio's ztunnel at the CA at `addr`, trusting
/// `root`, authenticated with the node token in `token`.
pub fn ca_env(addr: SocketAddr, root: &Path, token: &Path) -> Vec<(String, String)> {
    [
        ("CA_ADDRESS", format!("https://{addr}")),
        ("ALT_CA_HOSTNAME", CA_SERVER_NAME.to_owned()),
        ("CA_ROOT_CA", root.display().to_string()),
        ("AUTH_TOKEN", token.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Istio's local-config entry for a workload (HBONE, in `namespace`).
pub fn workload_yaml(
    namespace: &str,
    name: &str,
    service_account: &str,
    ip: &str,
    node: &str,
) -> String {
    format!(
        "- uid: Kubernetes//Pod/{namespace}/{name}\n  name: {name}\n  namespace: {namespace}\n  \
         serviceAccount: {service_account}\n  trustDomain: {TRUST_DOMAIN}\n  \
         workloadIps: [{ip}]\n  protocol: HBONE\n  node: {node}\n  network: \"\"\n  \
         services: {{}}\n"
    )
}

/// Starts Istio's ztunnel through `command` (which enters a pod's or a node's
/// network namespace) with its local config (`workloads`, `policies`: YAML list
/// items, or empty) and `env`. It logs to `dir/istio.log`.
pub fn start(
    mut command: std::process::Command,
    dir: &Path,
    workloads: &str,
    policies: &str,
    env: &[(String, String)],
) -> Result<Running> {
    let config = dir.join("istio-local.yaml");
    let policies = match policies {
        "" => " []\n".to_owned(),
        items => format!("\n{items}"),
    };
    std::fs::write(
        &config,
        format!("workloads:\n{workloads}policies:{policies}services: []\n"),
    )?;
    command
        .env_clear()
        .env("XDS_ADDRESS", "")
        .env("LOCAL_XDS_PATH", &config)
        .env("ENABLE_ORIG_SRC", "false")
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::fs::File::create(dir.join("istio.log"))?)
        .stderr(Stdio::null());
    Ok(Running(
        command.spawn().context("starting Istio's ztunnel")?,
    ))
}

/// GET `path` from 127.0.0.1:`port` inside `netns` (Istio's ztunnel's admin and
/// readiness ports): the status line and the body.
pub fn http_get(netns: &Path, port: u16, path: &str) -> Option<(String, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let body = ztunnel::netns::run_in(netns, move || {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.write_all(request.as_bytes())?;
        let mut response = Vec::new();
        tcp.read_to_end(&mut response)?;
        Ok::<_, std::io::Error>(response)
    })
    .ok()?;
    let text = String::from_utf8_lossy(&body);
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_owned(), body.to_owned()))
}

/// Waits until one line of `log()` contains every one of `parts`; returns it.
pub async fn wait_for_line(
    what: &str,
    log: impl Fn() -> String,
    parts: &[&str],
    within: Duration,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let text = log();
        if let Some(line) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{what} has no line with all of {parts:?} within {within:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One Istio ztunnel process in dedicated mode in a pod (killed on drop).
pub struct IstioProxy {
    process: Running,
    pub pod: Pod,
    dir: TempDir,
}

impl IstioProxy {
    /// Istio's ztunnel (`binary`) in dedicated mode in `pod`, serving `workload`
    /// (`namespace/name/service-account`), with `workloads` and `policies` (YAML
    /// list items) as its local config and certificates from `mesh`'s CA, once it
    /// is ready. The pod's connections to `ports` (but not to itself) are
    /// redirected into it, as istio-cni would. It runs as many tokio workers as
    /// the mesh's tunnels (`ZTB_WORKERS`, 2 by default).
    pub async fn start_dedicated(
        mesh: &Mesh,
        binary: &Path,
        pod: &str,
        workload: &str,
        workloads: &str,
        policies: &str,
        ports: &[u16],
    ) -> Result<Self> {
        let pod = mesh.cluster.pod(pod).clone();
        let dir = TempDir::new("istio-dedicated")?;
        let mut env = ca_env(
            mesh.ca.addr,
            &mesh.root_file(),
            &mesh.ca.token_file(&pod.node),
        );
        env.extend(
            [
                ("PROXY_MODE", "dedicated".to_owned()),
                ("PROXY_WORKLOAD_INFO", workload.to_owned()),
                ("NODE_NAME", pod.node.clone()),
                ("ZTUNNEL_WORKER_THREADS", crate::mesh::worker_threads()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        );
        redirect_outbound(&pod, dir.path(), ports)?;
        let process = start(pod.command(binary)?, dir.path(), workloads, policies, &env)?;
        let proxy = Self { process, pod, dir };
        proxy.wait_ready().await;
        Ok(proxy)
    }

    pub fn pid(&self) -> u32 {
        self.process.0.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("istio.log")).unwrap_or_default()
    }

    async fn wait_ready(&self) {
        let netns = self.pod.netns_path();
        eventually(
            Duration::from_secs(20),
            "Istio's ztunnel answers 200 on /healthz/ready",
            || {
                let netns = netns.clone();
                async move {
                    tokio::task::spawn_blocking(move || http_get(&netns, 15021, "/healthz/ready"))
                        .await
                        .unwrap()
                        .is_some_and(|(status, _)| status.contains(" 200"))
                }
            },
        )
        .await;
    }

    /// Waits for Istio's access line ("connection complete") with every one of `parts`.
    pub async fn access_line(&self, parts: &[&str]) -> String {
        let mut all = vec!["connection complete"];
        all.extend_from_slice(parts);
        wait_for_line(
            "Istio's ztunnel's log",
            || self.log(),
            &all,
            Duration::from_secs(20),
        )
        .await
    }
}

impl Drop for IstioProxy {
    fn drop(&mut self) {
        // As the mesh's tunnels' logs: kept where ZTB_KEEP_LOGS says.
        if let Ok(dir) = std::env::var("ZTB_KEEP_LOGS") {
            let _ = std::fs::copy(
                self.dir.path().join("istio.log"),
                Path::new(&dir).join(format!("istio-{}.log", self.pod.name)),
            );
        }
    }
}

/// What istio-cni does for a pod in dedicated mode: its connections to `ports`,
/// but not to itself, redirected to Istio's outbound listener (15001) with nftables.
fn redirect_outbound(pod: &Pod, dir: &Path, ports: &[u16]) -> Result<()> {
    let rules = dir.join("redirect.nft");
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    // Declared then deleted first: applying it again replaces the table.
    std::fs::write(
        &rules,
        format!(
            "table ip interop\ndelete table ip interop\ntable ip interop {{\n  \
             chain out {{\n    type nat hook output priority -100; policy accept;\n    \
             ip daddr != {{ 127.0.0.0/8, {ip} }} tcp dport {{ {ports} }} \
             redirect to :15001\n  }}\n}}\n",
            ip = pod.ip
        ),
    )?;
    let out = pod.command("nft")?.arg("-f").arg(&rules).output().context(
        "nft (Debian package nftables) is needed to redirect an Istio pod's traffic; \
             `cargo xtask bootstrap` installs it",
    )?;
    anyhow::ensure!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
