//! `ztunnel`: the node tunnel and its tools.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ztunnel::{
    certs::CertInfo,
    cli::{parse_duration, parse_duration_ms, CommonArgs, MeshArgs},
};

#[derive(Parser)]
#[command(version, about = "eBPF-assisted ambient mesh node tunnel")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node tunnel: enroll this node's ambient pods and carry their traffic
    /// over HBONE with their own identities.
    Run(RunArgs),
    /// Print the certificates a running tunnel holds (from its admin port).
    Certs(CertsArgs),
    /// Policy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Mount bpffs at the path unless one is there (a node init step: pins must
    /// live on the host's bpffs to outlive the tunnel).
    MountBpffs { path: PathBuf },
    /// Remove this node's redirection when the mesh is deleted: unpins the links
    /// (detaching the programs from the pod cgroup root and every pod's network
    /// namespace) and the maps, so that pods are no longer captured into a tunnel
    /// that is gone, and removes the original-source routing rule and table from
    /// the pods it enrolled. Run it after the tunnel has stopped
    /// (deploy/uninstall.yaml).
    Uninstall {
        /// The tunnel's --pin-dir.
        #[arg(long, default_value = "/sys/fs/bpf/ztunnel")]
        pin_dir: PathBuf,
        /// Then wait for SIGTERM (as the container of a cleanup DaemonSet).
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// What the mesh decides for a connection: ALLOW or DENY, the layer that
    /// decides and the deciding policy. Exit status 0 for allow, 1 for deny.
    Check(CheckArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// Directory of Kubernetes YAML (the same as `ztunnel run --config`).
    #[arg(long)]
    config: PathBuf,
    /// The client: <namespace>/<pod>.
    #[arg(long)]
    from: String,
    /// The server: <namespace>/<pod>:<port>.
    #[arg(long)]
    to: String,
    /// The client connects without mTLS (as a client outside the mesh does).
    #[arg(long)]
    plaintext: bool,
    /// HTTP method (decided by a waypoint).
    #[arg(long)]
    method: Option<String>,
    /// HTTP path (decided by a waypoint).
    #[arg(long)]
    path: Option<String>,
    /// HTTP header K=V (decided by a waypoint); `Host=` or `:authority=` sets the
    /// host that `hosts` rules match (default: the destination's ip:port).
    #[arg(long)]
    header: Vec<String>,
    /// A JWT (decided by a waypoint).
    #[arg(long)]
    jwt: Option<String>,
    /// The waypoint's MeshConfig (`--mesh-config` of `waypoint`): its path
    /// normalization and numTrustedProxies.
    #[arg(long)]
    mesh_config: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long = "trust-domain-alias")]
    trust_domain_aliases: Vec<String>,
    #[arg(long, default_value = ztunnel::policy::ROOT_NAMESPACE)]
    root_namespace: String,
    /// Output format.
    #[arg(short, long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

#[derive(Args)]
struct RunArgs {
    /// The flags the binaries share (--config: a directory of Kubernetes YAML;
    /// --kube; --trust-domain; --metrics-addr; --drain-grace).
    #[command(flatten)]
    common: CommonArgs,
    /// The mesh and the CA.
    #[command(flatten)]
    mesh: MeshArgs,
    /// Kubernetes source: the longest time between full checks of the snapshot
    /// against the watched objects (changes apply as they come in between).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    resync: Duration,
    /// This node's name (`spec.nodeName` of its pods).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Directory on a bpffs mount for this tunnel's pinned programs and maps.
    #[arg(long, default_value = "/sys/fs/bpf/ztunnel")]
    pin_dir: PathBuf,
    /// The cgroup v2 directory holding every pod of the node (default: the
    /// kubelet's, found below --cgroup-mount).
    #[arg(long)]
    pod_cgroup_root: Option<PathBuf>,
    /// Where the node's cgroup v2 hierarchy is mounted (in a pod: the host's,
    /// mounted in).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_mount: PathBuf,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// Most connections the proxy holds at once, across all pods (default: 65536,
    /// lowered to fit the file-descriptor limit).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most connections from one source: an enrolled pod's outbound, or one client
    /// address inbound (default: a quarter of --max-connections).
    #[arg(long)]
    max_connections_per_source: Option<usize>,
    /// How long an inbound client has to complete the TLS handshake.
    #[arg(long, default_value = "10s", value_parser = parse_duration_ms)]
    handshake_timeout: Duration,
    /// An HBONE connection that moves no byte (not even a keep-alive) for this long
    /// is closed.
    #[arg(long, default_value = "1h", value_parser = parse_duration_ms)]
    idle_timeout: Duration,
    /// Where enrolled pods' DNS queries for names outside the mesh are forwarded;
    /// repeatable (default: the nameservers of /etc/resolv.conf).
    #[arg(long)]
    dns_upstream: Vec<SocketAddr>,
    /// Capture enrolled pods' DNS (UDP and TCP port 53) and answer mesh names;
    /// false leaves it alone (as does the annotation `ambient.istio.io/dns-capture:
    /// "false"` on a Namespace or Pod).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    dns_capture: bool,
    /// The cluster's DNS domain: Services are `<svc>.<ns>.svc.<domain>`.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Connections between two pods of this node: `off` takes HBONE as for any
    /// pod; `kernel` joins the two sockets in the kernel once policy allows the
    /// connection (eBPF sockmap; relayed in user space if that fails); `user`
    /// relays them in user space without HBONE.
    #[arg(long, value_enum, default_value = "off")]
    same_node_splice: ztunnel::splice::Mode,
}

#[derive(Args)]
struct CertsArgs {
    /// The tunnel's admin address.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Output format.
    #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
    output: String,
}

fn main() {
    ztunnel_core::memory::one_malloc_arena();
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Run(args) => args.common.log_format,
        _ => Default::default(),
    };
    let set_log_level = ztunnel::telemetry::init_tracing(&[], log_format);
    // ZTUNNEL_WORKER_THREADS overrides tokio's default (one per CPU).
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("ZTUNNEL_WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        builder.worker_threads(n);
    }
    let runtime = builder.enable_all().build().expect("a tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args, set_log_level).await,
            Command::Certs(args) => certs(args).await,
            Command::MountBpffs { path } => {
                let mounted = ztunnel::redirect::mount_bpffs(&path)?;
                write_stdout(&match mounted {
                    true => format!("mounted bpffs at {}\n", path.display()),
                    false => format!("{} is already a bpffs mount\n", path.display()),
                })
            }
            Command::Uninstall { pin_dir, wait } => {
                // First, while the pins still say which pods were enrolled.
                let (cleaned, failed) = ztunnel::orig_src::uninstall(&pin_dir);
                if cleaned > 0 {
                    println!("removed the original-source routing from {cleaned} pods");
                }
                for failure in &failed {
                    eprintln!("ztunnel: warning: original-source routing left in place: {failure}");
                }
                match ztunnel::redirect::uninstall(&pin_dir) {
                    Ok(0) => println!("nothing pinned at {}: nothing to remove", pin_dir.display()),
                    Ok(n) => println!(
                        "removed {n} pins at {}: pods are no longer captured",
                        pin_dir.display()
                    ),
                    Err(e) => return Err(e.into()),
                }
                if wait {
                    ztunnel::daemon::shutdown_signal().await;
                }
                Ok(())
            }
            Command::Policy(PolicyCommand::Check(args)) => match policy_check(args) {
                Ok(true) => Ok(()),
                Ok(false) => std::process::exit(1),
                Err(e) => {
                    eprintln!("ztunnel: error: {e:#}");
                    std::process::exit(2);
                }
            },
        }
    });
    if let Err(e) = result {
        eprintln!("ztunnel: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: RunArgs, set_log_level: ztunnel::daemon::SetLogLevel) -> Result<()> {
    let pod_cgroup_root = match args.pod_cgroup_root {
        Some(root) => root,
        None => {
            let found = ztunnel::discovery::kubepods_root(&args.cgroup_mount)
                .with_context(|| format!("reading {}", args.cgroup_mount.display()))?
                .with_context(|| {
                    format!(
                        "no kubelet pod cgroup (kubepods) below {}: pass --pod-cgroup-root",
                        args.cgroup_mount.display()
                    )
                })?;
            tracing::info!(root = %found.display(), "the node's pods live below this cgroup");
            found
        }
    };
    let (common, mesh) = (args.common, args.mesh);
    let source = ztunnel::config::Source::choose(
        common.config.clone(),
        common.kube,
        common.config_poll(),
        ztunnel::config::kube::KubeOptions {
            node: args.node.clone(),
            pod_cgroup_root: Some(pod_cgroup_root.clone()),
            resync: args.resync,
        },
    )?;
    ztunnel::daemon::run(
        ztunnel::daemon::RunOptions {
            source,
            node: args.node,
            mesh: mesh.options(&common),
            pin_dir: args.pin_dir,
            pod_cgroup_root,
            admin_addr: args.admin_addr,
            metrics_addr: common.metrics_addr,
            readiness_addr: args.readiness_addr,
            drain_timeout: common.drain_grace,
            limits: {
                let mut limits = ztunnel::accept::Limits::proxy();
                if let Some(max) = args.max_connections {
                    limits.max_connections = max;
                    limits.max_per_source = (max / 4).max(1);
                }
                if let Some(max) = args.max_connections_per_source {
                    limits.max_per_source = max;
                }
                limits.handshake_timeout = args.handshake_timeout;
                limits.idle_timeout = Some(args.idle_timeout);
                limits
            },
            dns: ztunnel::dns::Settings {
                upstreams: args.dns_upstream,
                cluster_domain: args.cluster_domain,
                limits: Default::default(),
                capture: args.dns_capture,
            },
            same_node_splice: args.same_node_splice,
        },
        set_log_level,
    )
    .await?;
    Ok(())
}

/// Prints the decision; Ok(true) for allow.
fn policy_check(args: CheckArgs) -> Result<bool> {
    let (snapshot, errors) = ztunnel::config::local::LocalSource::new(&args.config).load()?;
    for e in &errors {
        eprintln!("ztunnel: config refused: {e}");
    }
    let mut settings = ztunnel::state::MeshSettings::new("", &args.trust_domain);
    settings.trust_domain_aliases = args.trust_domain_aliases;
    settings.root_namespace = args.root_namespace;
    let mesh_config = match &args.mesh_config {
        Some(path) => ztunnel::extauthz::MeshConfig::load(path)?,
        None => Default::default(),
    };
    let path_normalization = mesh_config
        .path_normalization()
        .map_err(|e| anyhow::anyhow!("pathNormalization: {e}"))?;
    let http = (args.method.is_some()
        || args.path.is_some()
        || !args.header.is_empty()
        || args.jwt.is_some())
    .then(|| ztunnel::check::HttpQuery {
        method: args.method.clone().unwrap_or_else(|| "GET".into()),
        path: args.path.clone().unwrap_or_else(|| "/".into()),
        headers: args
            .header
            .iter()
            .map(|h| {
                h.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .unwrap_or((h.clone(), String::new()))
            })
            .collect(),
        jwt: args.jwt.clone(),
        path_normalization,
        trusted_proxies: mesh_config.trusted_proxies(),
    });
    let query = ztunnel::check::Query {
        from: args.from,
        to: args.to,
        plaintext: args.plaintext,
        http,
    };
    let outcome = ztunnel::check::check(snapshot, &settings, &query)?;
    let text = if args.output == "json" {
        format!("{}\n", serde_json::to_string_pretty(&outcome)?)
    } else {
        let mut text = format!(
            "{} (layer: {}, policy: {})\n  reason: {}\n",
            outcome.decision,
            outcome.layer,
            outcome.policy.as_deref().unwrap_or("-"),
            outcome.reason
        );
        for note in &outcome.notes {
            text.push_str(&format!("  note: {note}\n"));
        }
        text
    };
    write_stdout(&text)?;
    Ok(outcome.allowed())
}

async fn certs(args: CertsArgs) -> Result<()> {
    let body = http_get(args.admin, "/certs").await?;
    if args.output == "json" {
        return write_stdout(&format!("{body}\n"));
    }
    let certs: Vec<CertInfo> = serde_json::from_str(&body).context("parsing /certs")?;
    let mut text = format!(
        "{:<60} {:<34} {:<22} {:<22}\n",
        "IDENTITY", "SERIAL", "NOT BEFORE", "NOT AFTER"
    );
    for cert in certs {
        text.push_str(&format!(
            "{:<60} {:<34} {:<22} {:<22}\n",
            cert.identity,
            cert.serial,
            timestamp(cert.not_before),
            timestamp(cert.not_after)
        ));
    }
    write_stdout(&text)
}

/// Writes a command's output. A reader that closed the pipe early (`| head`) has
/// all it wanted: that is not an error (println! would panic on it).
fn write_stdout(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing to standard output")
        }
        _ => Ok(()),
    }
}

fn timestamp(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use http_body_util::{BodyExt, Empty};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the admin port {addr}: is the tunnel running?"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{path}: HTTP {status}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}
