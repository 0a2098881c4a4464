//! `waypoint`: L7 policy for the destinations that use it (see ztunnel_waypoint).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use ztunnel_core::cli::{parse_duration_ms, CommonArgs, MeshArgs};

#[derive(Parser)]
#[command(
    version,
    about = "Waypoint: L7 AuthorizationPolicy for ambient mesh destinations"
)]
struct Args {
    /// The flags the binaries share (--config, --kube, --trust-domain,
    /// --metrics-addr, --drain-grace: how long requests in flight get on SIGTERM).
    #[command(flatten)]
    common: CommonArgs,
    /// The mesh and the CA.
    #[command(flatten)]
    mesh: MeshArgs,
    /// The waypoint Gateway's name (gatewayClassName: istio-waypoint).
    #[arg(long)]
    name: String,
    /// The waypoint's namespace (from the downward API in a pod).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// This waypoint pod's name (its identity comes from its service account).
    #[arg(long, env = "POD_NAME")]
    pod: String,
    #[arg(long, default_value = "0.0.0.0:15008")]
    listen: SocketAddr,
    /// Istio MeshConfig YAML with `extensionProviders` (for CUSTOM policies).
    #[arg(long)]
    mesh_config: Option<PathBuf>,
    /// Requests with more headers are answered 431.
    #[arg(long, default_value = "100")]
    max_request_headers: usize,
    /// Requests whose headers take more (KiB) are answered 431.
    #[arg(long, default_value = "60")]
    max_request_headers_kb: usize,
    /// How long a request's headers may take: HTTP/1.1 counted from the previous
    /// request's end (an idle keep-alive connection closes after it too); HTTP/2
    /// and HBONE, the first request's, from the connection's start.
    #[arg(long, alias = "request-headers-timeout-seconds", default_value = "300s", value_parser = positive_duration)]
    request_headers_timeout: Duration,
    /// How long a request may see nothing either way: 408 before its response
    /// headers, a reset after them.
    #[arg(long, alias = "stream-idle-timeout-seconds", default_value = "300s", value_parser = positive_duration)]
    stream_idle_timeout: Duration,
    /// How long a downstream connection may have no request open before it is
    /// closed (HTTP/2 with GOAWAY). Before its first request, HTTP/2 and HBONE
    /// connections get the request headers timeout instead.
    #[arg(long, default_value = "1h", value_parser = positive_duration)]
    idle_timeout: Duration,
    /// Log one `access` line per request (off by default, as Istio's
    /// `meshConfig.accessLogFile` is).
    #[arg(long)]
    access_log: bool,
    /// Threads that serve connections, each with its own event loop (default:
    /// one per CPU).
    #[arg(long, env = "WAYPOINT_WORKER_THREADS")]
    worker_threads: Option<usize>,
}

/// Every request allocates its headers, bodies and futures: mimalloc's per-thread
/// free lists cost less than glibc malloc's arenas and consolidation here.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration_ms(text)? {
        Duration::ZERO => Err(format!("{text:?}: must be more than 0")),
        duration => Ok(duration),
    }
}

fn main() {
    let args = Args::parse();
    let directives: &[&str] = match args.access_log {
        true => &[],
        false => &["access=off"],
    };
    ztunnel_core::telemetry::init_tracing(directives, args.common.log_format);
    let (common, mesh) = (args.common, args.mesh);
    let source = match ztunnel_config::Source::choose(
        common.config.clone(),
        common.kube,
        common.config_poll(),
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
        mesh: mesh.options(&common),
        listen: args.listen,
        metrics_addr: common.metrics_addr,
        mesh_config: args.mesh_config,
        drain_grace: common.drain_grace,
        limits: ztunnel_waypoint::RequestLimits {
            max_headers: args.max_request_headers,
            max_header_bytes: args.max_request_headers_kb * 1024,
            request_headers_timeout: args.request_headers_timeout,
            stream_idle_timeout: args.stream_idle_timeout,
            idle_timeout: args.idle_timeout,
        },
        workers: args
            .worker_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    };
    // The control plane (config, certificates, metrics, drain) runs here; the
    // connections on the workers `run` starts.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(e) = runtime.block_on(ztunnel_waypoint::run(options)) {
        eprintln!("waypoint: error: {e:#}");
        std::process::exit(1);
    }
}
