//! `waypoint`: L7 policy for the destinations that use it (see ztunnel_waypoint).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Waypoint: L7 AuthorizationPolicy for ambient mesh destinations"
)]
struct Args {
    /// Directory of Kubernetes YAML (the same as `ztunnel run --config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Read the configuration from the cluster's API server (the default in a pod).
    #[arg(long)]
    kube: bool,
    /// The waypoint Gateway's name (gatewayClassName: istio-waypoint).
    #[arg(long)]
    name: String,
    /// The waypoint's namespace (from the downward API in a pod).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// This waypoint pod's name (its identity comes from its service account).
    #[arg(long, env = "POD_NAME")]
    pod: String,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long = "trust-domain-alias")]
    trust_domain_aliases: Vec<String>,
    #[arg(long, default_value = ztunnel_core::policy::ROOT_NAMESPACE)]
    root_namespace: String,
    /// The CA, host:port.
    #[arg(long)]
    ca_address: String,
    #[arg(long, default_value = "ztunnel-ca.istio-system.svc")]
    ca_server_name: String,
    /// PEM roots that signed the CA's TLS certificate.
    #[arg(long)]
    ca_root: PathBuf,
    /// The credential for the CA.
    #[arg(long)]
    ca_token: PathBuf,
    #[arg(long, default_value = "86400")]
    cert_ttl_seconds: u64,
    #[arg(long, default_value = "0.0.0.0:15008")]
    listen: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Istio MeshConfig YAML with `extensionProviders` (for CUSTOM policies).
    #[arg(long)]
    mesh_config: Option<PathBuf>,
    /// Requests with more headers are answered 431.
    #[arg(long, default_value = "100")]
    max_request_headers: usize,
    /// Requests whose headers take more (KiB) are answered 431.
    #[arg(long, default_value = "60")]
    max_request_headers_kb: usize,
    /// HTTP/1.1: seconds a request's headers may take, counted from the previous
    /// request's end (an idle keep-alive connection closes after it too).
    #[arg(long, default_value = "300", value_parser = clap::value_parser!(u64).range(1..))]
    request_headers_timeout_seconds: u64,
    /// Seconds a request may see nothing either way: 408 before its response
    /// headers, a reset after them.
    #[arg(long, default_value = "300", value_parser = clap::value_parser!(u64).range(1..))]
    stream_idle_timeout_seconds: u64,
    /// Log one `access` line per request (off by default, as Istio's
    /// `meshConfig.accessLogFile` is).
    #[arg(long)]
    access_log: bool,
    /// On SIGTERM, how long requests in flight get to finish (seconds).
    #[arg(long, default_value = "5")]
    drain_grace_seconds: u64,
    /// How often the config directory is checked, in milliseconds.
    #[arg(long, default_value = "1000")]
    config_poll_ms: u64,
}

fn main() {
    let args = Args::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !args.access_log {
        filter = filter.add_directive("access=off".parse().expect("a valid directive"));
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let source = match ztunnel_config::Source::choose(
        args.config.clone(),
        args.kube,
        Duration::from_millis(args.config_poll_ms),
        ztunnel_config::kube::KubeOptions {
            node: String::new(),
            pod_cgroup_root: None,
            resync: Duration::from_secs(60),
        },
    ) {
        Ok(source) => source,
        Err(e) => {
            eprintln!("waypoint: {e:#}");
            std::process::exit(2);
        }
    };
    let options = ztunnel_waypoint::WaypointOptions {
        source,
        name: args.name,
        namespace: args.namespace,
        pod: args.pod,
        trust_domain: args.trust_domain,
        trust_domain_aliases: args.trust_domain_aliases,
        root_namespace: args.root_namespace,
        ca_address: args.ca_address,
        ca_server_name: args.ca_server_name,
        ca_root: args.ca_root,
        ca_token: args.ca_token,
        cert_ttl: Duration::from_secs(args.cert_ttl_seconds),
        listen: args.listen,
        metrics_addr: args.metrics_addr,
        mesh_config: args.mesh_config,
        drain_grace: Duration::from_secs(args.drain_grace_seconds),
        limits: ztunnel_waypoint::RequestLimits {
            max_headers: args.max_request_headers,
            max_header_bytes: args.max_request_headers_kb * 1024,
            request_headers_timeout: Duration::from_secs(args.request_headers_timeout_seconds),
            stream_idle_timeout: Duration::from_secs(args.stream_idle_timeout_seconds),
        },
    };
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    if let Err(e) = runtime.block_on(ztunnel_waypoint::run(options)) {
        eprintln!("waypoint: error: {e:#}");
        std::process::exit(1);
    }
}
