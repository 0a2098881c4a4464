//! `ztunnel-ca`: the certificate authority, serving Istio's CA API to node tunnels
//! and waypoints (see ztunnel_ca).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser};
use ztunnel_ca::{
    auth::{LocalPods, NodeTokens},
    server::{CaMetrics, CaServer},
    Authority, AuthorityOptions,
};
use ztunnel_core::{
    cli::{parse_duration, parse_duration_ms, CommonArgs},
    drain::{self, Drain},
};

/// Run the certificate authority: signs workload certificates for node tunnels,
/// serving Istio's CA API (gRPC over TLS).
#[derive(Parser)]
#[command(version)]
struct CaArgs {
    /// Directory with Istio's `cacerts` files (ca-cert.pem, ca-key.pem,
    /// root-cert.pem, cert-chain.pem); a root is generated there if it is empty.
    #[arg(long)]
    dir: PathBuf,
    /// The flags the binaries share. Local mode: --config is the directory of
    /// Kubernetes YAML whose pods say which node runs which workload.
    #[command(flatten)]
    common: CommonArgs,
    /// Address to serve the CA API on.
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// DNS names for the CA's TLS certificate (what clients verify).
    #[arg(long = "server-name", default_value = "ztunnel-ca.istio-system.svc")]
    server_names: Vec<String>,
    /// Local mode: YAML file `node: token` authenticating each node's tunnel.
    #[arg(long, conflicts_with = "kube", required_unless_present = "kube")]
    node_tokens: Option<PathBuf>,
    /// With --kube: keep the root in this Secret of the CA's namespace (created
    /// with a new root when missing). Without it, --dir is used as it is (e.g. the
    /// `cacerts` Secret mounted there). deploy/'s RBAC lets the CA read only the
    /// Secret `ztunnel-ca`.
    #[arg(long, requires = "kube")]
    root_secret: Option<String>,
    /// With --kube: publish the root in this ConfigMap, key root-cert.pem, in the
    /// CA's namespace for the tunnels and in every ambient namespace for the
    /// waypoints (deploy/'s RBAC: `ztunnel-ca-root`).
    #[arg(long, requires = "kube")]
    root_config_map: Option<String>,
    /// The CA's namespace (from the downward API in a pod).
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    namespace: String,
    /// `namespace/name` of the tunnels' service account.
    #[arg(
        long = "tunnel-service-account",
        default_value = "istio-system/ztunnel"
    )]
    tunnel_service_accounts: Vec<String>,
    /// Audience the tunnels' tokens must be for.
    #[arg(long, default_value = "istio-ca")]
    token_audience: String,
    /// Lifetime of a certificate when the request names none.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    default_ttl: Duration,
    /// Longest lifetime granted; longer requests are refused.
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    max_ttl: Duration,
    /// A client's TLS handshake must finish within this.
    #[arg(long, default_value = "10s", value_parser = parse_duration_ms)]
    handshake_timeout: Duration,
    /// A connection with no call in flight this long is closed.
    #[arg(long, default_value = "5m", value_parser = parse_duration_ms)]
    idle_timeout: Duration,
    /// Connections open at once; more are closed at once.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Connections open at once from one address.
    #[arg(long, default_value_t = 64)]
    max_connections_per_source: usize,
}

fn main() {
    // The shared flags, with the CA's own defaults and rules: metrics on
    // localhost, and in local mode a config directory.
    let matches = CaArgs::command()
        .mut_arg("metrics_addr", |a| a.default_value("127.0.0.1:15014"))
        .mut_arg("config", |a| {
            a.conflicts_with("kube").required_unless_present("kube")
        })
        .get_matches();
    let args = CaArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    ztunnel_core::telemetry::init_tracing(&[], args.common.log_format);
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    if let Err(e) = runtime.block_on(ca(args)) {
        eprintln!("ztunnel-ca: error: {e:#}");
        std::process::exit(1);
    }
}

async fn ca(args: CaArgs) -> Result<()> {
    let options = AuthorityOptions {
        dir: args.dir.clone(),
        trust_domain: args.common.trust_domain.clone(),
        default_ttl: args.default_ttl,
        max_ttl: args.max_ttl,
    };
    let (authenticator, authorizer): (
        Arc<dyn ztunnel_ca::auth::Authenticator>,
        Arc<dyn ztunnel_ca::auth::NodeAuthorizer>,
    ) = match args.common.kube {
        true => {
            use ztunnel_ca::kube;
            let client = ztunnel_config::k8s::client().await?;
            if let Some(secret) = &args.root_secret {
                kube::sync_root_secret(client.clone(), &args.namespace, secret, &args.dir, |_| {
                    Authority::load_or_create(options.clone()).map(drop)
                })
                .await?;
            }
            let pods = kube::KubePods::start(client.clone());
            let review = kube::TokenReview::new(
                client,
                args.tunnel_service_accounts.clone(),
                vec![args.token_audience.clone()],
            );
            (Arc::new(review), Arc::new(pods))
        }
        false => {
            let tokens = args
                .node_tokens
                .as_ref()
                .context("--node-tokens is required")?;
            let config = args.common.config.clone().context("--config is required")?;
            (
                Arc::new(NodeTokens::from_file(tokens)?),
                Arc::new(LocalPods::new(config)),
            )
        }
    };
    let authority = Arc::new(Authority::load_or_create(options)?);
    if let Some(name) = &args.root_config_map {
        let client = ztunnel_config::k8s::client().await?;
        ztunnel_ca::kube::publish_root(client.clone(), &args.namespace, name, authority.root_pem())
            .await?;
        tokio::spawn(ztunnel_ca::kube::publish_root_in_ambient_namespaces(
            client,
            name.clone(),
            authority.root_pem().to_owned(),
        ));
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = CaMetrics::register(&mut registry);
    let limits = ztunnel_ca::server::ServeLimits {
        handshake_timeout: args.handshake_timeout,
        idle_timeout: args.idle_timeout,
        max_connections: args.max_connections,
        max_connections_per_source: args.max_connections_per_source,
    };
    let server = CaServer::with_limits(authority, authenticator, authorizer, metrics, limits);
    let tls = server.tls_config(&args.server_names)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let metrics_addr = args.common.metrics_addr;
    let metrics_listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("binding {metrics_addr}"))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        trust_domain = %args.common.trust_domain,
        dir = %args.dir.display(),
        "CA serving"
    );
    let registry = Arc::new(Mutex::new(registry));
    let drain = Drain::new();
    let limiter = ztunnel_core::accept::Limiter::new(
        ztunnel_core::accept::Limits::http_endpoint(),
        Default::default(),
    );
    tokio::spawn(ztunnel_core::http_server::serve_draining(
        ztunnel_core::accept::Acceptor::new(metrics_listener, limiter, "metrics"),
        ztunnel_core::metrics::handler(registry),
        drain.clone(),
    ));
    let serving = drain.spawn(server.serve_draining(listener, tls, drain.clone()));
    // The server ends by itself only if its task fails; when drained, the drain
    // says so.
    let failed = async {
        match serving.await {
            Ok(()) => std::future::pending().await,
            Err(e) => Err(e).context("the CA server task"),
        }
    };
    tokio::select! {
        result = failed => result,
        () = drain::on_sigterm(&drain, args.common.drain_grace, "CA") => Ok(()),
    }
}
