//! `ztunnel run`: wires config → state → proxy for one node, enrolls the node's
//! ambient pods, serves metrics, readiness and admin, and drains on SIGTERM.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use http::StatusCode;
use serde_json::json;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_util::task::TaskTracker;

use crate::{
    accept::{AcceptMetrics, Acceptor, Limiter, Limits},
    ca::client::{CaClient, CaClientConfig},
    certs::{CertManager, CertManagerConfig},
    config,
    http_server::{self, Handler},
    metrics::{self, PolicyMetrics, TcpMetrics},
    proxy::{self, pool::Pool, Context},
    redirect::{PodNetwork, RedirectConfig, Redirector},
    state::{MeshSettings, State, Workload},
};

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub source: config::Source,
    pub node: String,
    pub trust_domain: String,
    pub trust_domain_aliases: Vec<String>,
    pub root_namespace: String,
    pub ca_address: String,
    pub ca_server_name: String,
    pub ca_root: PathBuf,
    pub ca_token: PathBuf,
    pub cert_ttl: Duration,
    pub pin_dir: PathBuf,
    pub pod_cgroup_root: PathBuf,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub drain_timeout: Duration,
    /// Caps and timeouts of the proxy's listeners.
    pub limits: Limits,
    /// Where pods' DNS queries go (default: the node's resolv.conf).
    pub dns_upstream: Option<SocketAddr>,
}

/// Changes the log filter at run time (`/logging?level=`).
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// An enrolled pod: the workload it was enrolled as, and its listeners' tasks.
struct Enrolled {
    workload: Arc<Workload>,
    netns_cookie: u64,
    tasks: JoinSet<()>,
}

pub async fn run(options: RunOptions, set_log_level: SetLogLevel) -> Result<()> {
    let mut registry = prometheus_client::registry::Registry::default();
    let tcp_metrics = TcpMetrics::register(&mut registry);

    let config_metrics = config::ConfigMetrics::register(&mut registry);
    let snapshots = options.source.watch(config_metrics.clone()).await?;
    let settings = MeshSettings {
        node: options.node.clone(),
        trust_domain: options.trust_domain.clone(),
        trust_domain_aliases: options.trust_domain_aliases.clone(),
        root_namespace: options.root_namespace.clone(),
    };
    let states = crate::state::spawn_updates(snapshots, settings, config_metrics.bindings_refused);

    let ca = CaClient::new(CaClientConfig::from_files(
        &options.ca_address,
        &options.ca_server_name,
        &options.ca_root,
        &options.ca_token,
    )?)?;
    let mut cert_config = CertManagerConfig::new(&options.trust_domain);
    cert_config.trust_domain_aliases = options.trust_domain_aliases.clone();
    cert_config.ttl = options.cert_ttl;
    let certs = CertManager::new(Arc::new(ca), cert_config, &mut registry);

    let redirector = Redirector::start(RedirectConfig {
        pin_dir: options.pin_dir.clone(),
        pod_cgroup_root: options.pod_cgroup_root.clone(),
    })?;
    let settings = proxy::pool::PoolSettings::default();
    let accept_metrics = AcceptMetrics::register(&mut registry);
    tracing::info!(limits = ?options.limits, "connection limits");
    let ctx = Arc::new(Context {
        state: states.clone(),
        certs: certs.clone(),
        pool: Pool::new(settings.clone()),
        metrics: tcp_metrics,
        redirect: Arc::new(Mutex::new(redirector)),
        connections: TaskTracker::new(),
        hbone: settings,
        policy_metrics: PolicyMetrics::register(&mut registry),
        active: Arc::default(),
        limiter: Limiter::new(options.limits.clone(), accept_metrics.clone()),
        dns: Arc::new(proxy::dns::Forwarder::new(
            options.dns_upstream,
            Default::default(),
            &mut registry,
        )),
        sockets: Default::default(),
    });

    let ready = Arc::new(AtomicBool::new(false));
    let enrolled: Arc<Mutex<HashMap<(String, String), Enrolled>>> = Arc::default();
    let registry = Arc::new(Mutex::new(registry));
    let admin = admin_handler(ctx.clone(), enrolled.clone(), set_log_level);
    let endpoints = [
        ("metrics", options.metrics_addr, metrics::handler(registry)),
        (
            "readiness",
            options.readiness_addr,
            readiness_handler(ready.clone()),
        ),
        ("admin", options.admin_addr, admin),
    ];
    for (name, addr, handler) in endpoints {
        serve_http(name, addr, handler, &accept_metrics).await?;
    }

    let reconciler = tokio::spawn(reconcile_loop(ctx.clone(), states, enrolled.clone(), ready));
    tracing::info!(node = %options.node, config = %options.source, "ztunnel running");

    shutdown_signal().await;
    tracing::info!(
        "draining: no new connections, waiting up to {:?} for open ones",
        options.drain_timeout
    );
    reconciler.abort();
    let _ = reconciler.await;
    // Closing the listeners: new connections are refused (the pods fail closed).
    let pods: Vec<Enrolled> = enrolled
        .lock()
        .expect("not poisoned")
        .drain()
        .map(|(_, e)| e)
        .collect();
    for mut pod in pods {
        pod.tasks.shutdown().await;
    }
    ctx.connections.close();
    if tokio::time::timeout(options.drain_timeout, ctx.connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "{} connections still open at the drain deadline: closing them",
            ctx.connections.len()
        );
    }
    Ok(())
}

/// Serves an HTTP endpoint with its own caps (one endpoint's clients cannot take
/// another's slots).
async fn serve_http(
    name: &'static str,
    addr: SocketAddr,
    handler: Handler,
    metrics: &AcceptMetrics,
) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let limiter = Limiter::new(Limits::http_endpoint(), metrics.clone());
    tokio::spawn(http_server::serve_with(
        Acceptor::new(listener, limiter, name),
        handler,
    ));
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Keeps enrollment, certificates and pooled connections in line with the state.
async fn reconcile_loop(
    ctx: Arc<Context>,
    mut states: watch::Receiver<Arc<State>>,
    enrolled: Arc<Mutex<HashMap<(String, String), Enrolled>>>,
    ready: Arc<AtomicBool>,
) {
    let mut previous: Option<Arc<State>> = None;
    loop {
        let state = states.borrow_and_update().clone();
        reconcile(&ctx, &state, previous.as_deref(), &enrolled).await;
        if previous.is_none() {
            release_leftovers(&ctx, &enrolled);
        }
        ready.store(true, Ordering::Release);
        previous = Some(state);
        if states.changed().await.is_err() {
            return;
        }
    }
}

/// Pods a previous run enrolled (their pins survived it) that this run does not
/// serve: they left the mesh while the tunnel was away. Release them, so their
/// traffic is neither captured into nothing nor dropped.
fn release_leftovers(ctx: &Context, enrolled: &Mutex<HashMap<(String, String), Enrolled>>) {
    let ours: Vec<u64> = enrolled
        .lock()
        .expect("not poisoned")
        .values()
        .map(|e| e.netns_cookie)
        .collect();
    let mut redirect = ctx.redirect.lock().expect("not poisoned");
    let pinned = match redirect.enrolled_pods() {
        Ok(pinned) => pinned,
        Err(e) => return tracing::warn!("listing enrolled pods: {e:#}"),
    };
    for (cookie, ip) in pinned
        .into_iter()
        .filter(|(cookie, _)| !ours.contains(cookie))
    {
        match redirect.unenroll(cookie, ip) {
            Ok(()) => {
                tracing::info!(%ip, "released a pod a previous run enrolled: it is no longer in the mesh")
            }
            Err(e) => tracing::warn!(%ip, "releasing a leftover pod: {e:#}"),
        }
    }
}

async fn reconcile(
    ctx: &Arc<Context>,
    state: &State,
    previous: Option<&State>,
    enrolled: &Mutex<HashMap<(String, String), Enrolled>>,
) {
    let desired: HashMap<(String, String), Arc<Workload>> = state
        .local_workloads()
        .map(|w| ((w.namespace.clone(), w.name.clone()), w.clone()))
        .collect();
    // Leave: pods gone, out of the mesh, or changed in what enrollment depends on.
    let leaving: Vec<Enrolled> = {
        let mut enrolled = enrolled.lock().expect("not poisoned");
        let keys: Vec<_> = enrolled
            .iter()
            .filter(|(key, e)| match desired.get(*key) {
                None => true,
                Some(w) => {
                    w.ip != e.workload.ip
                        || w.identity != e.workload.identity
                        || w.netns != e.workload.netns
                }
            })
            .map(|(key, _)| key.clone())
            .collect();
        keys.iter().filter_map(|k| enrolled.remove(k)).collect()
    };
    for mut pod in leaving {
        pod.tasks.shutdown().await;
        if let Some(netns) = &pod.workload.netns {
            ctx.sockets.lock().expect("not poisoned").remove(netns);
        }
        let result = ctx
            .redirect
            .lock()
            .expect("not poisoned")
            .unenroll(pod.netns_cookie, pod.workload.ip);
        match result {
            Ok(()) => {
                tracing::info!(pod = %pod.workload.name, namespace = %pod.workload.namespace, "unenrolled")
            }
            Err(e) => tracing::warn!(pod = %pod.workload.name, "unenrolling failed: {e:#}"),
        }
    }
    // Join.
    for (key, workload) in desired {
        if enrolled.lock().expect("not poisoned").contains_key(&key) {
            continue;
        }
        let (Some(netns), Some(cgroup)) = (&workload.netns, &workload.cgroup) else {
            tracing::warn!(pod = %workload.name, namespace = %workload.namespace, "cannot enroll: its network namespace and cgroup are unknown");
            continue;
        };
        let network = PodNetwork {
            netns: netns.clone(),
            cgroup: cgroup.clone(),
            ip: workload.ip,
        };
        let listeners = ctx.redirect.lock().expect("not poisoned").enroll(&network);
        let listeners = match listeners {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(pod = %workload.name, namespace = %workload.namespace, "enrolling failed: {e:#}");
                continue;
            }
        };
        let netns_cookie = listeners.netns_cookie;
        match proxy::serve_pod(ctx.clone(), workload.clone(), listeners) {
            Ok(tasks) => {
                tracing::info!(pod = %workload.name, namespace = %workload.namespace, ip = %workload.ip, identity = %workload.identity, "enrolled");
                enrolled.lock().expect("not poisoned").insert(
                    key,
                    Enrolled {
                        workload,
                        netns_cookie,
                        tasks,
                    },
                );
            }
            Err(e) => tracing::warn!(pod = %workload.name, "serving the pod failed: {e}"),
        }
    }
    // Policy applies to new connections at once, and to the open ones here.
    let closed = ctx.active.reevaluate(state);
    if closed > 0 {
        tracing::info!(
            closed,
            "policy change: closed the connections it now denies"
        );
    }
    // Certificates only for the workloads still here.
    let local: Vec<_> = state
        .local_workloads()
        .map(|w| w.identity.clone())
        .collect();
    ctx.certs.retain(|identity| local.contains(identity));
    // Pooled connections to an address whose workload left or changed are closed.
    if let Some(previous) = previous {
        for old in previous.workloads() {
            if state
                .workload_by_ip(old.ip)
                .map(|w| w.identity != old.identity)
                .unwrap_or(true)
            {
                ctx.pool.evict_address(old.ip);
            }
        }
    }
}

fn readiness_handler(ready: Arc<AtomicBool>) -> Handler {
    Arc::new(move |req| match req.uri().path() {
        "/healthz/ready" if ready.load(Ordering::Acquire) => {
            http_server::text(StatusCode::OK, "text/plain", "ready\n")
        }
        "/healthz/ready" => {
            http_server::text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
        }
        _ => http_server::not_found(),
    })
}

fn admin_handler(
    ctx: Arc<Context>,
    enrolled: Arc<Mutex<HashMap<(String, String), Enrolled>>>,
    set_log_level: SetLogLevel,
) -> Handler {
    let certs = crate::admin::handler(ctx.certs.clone());
    Arc::new(move |req| match req.uri().path() {
        "/config_dump" => {
            let state = ctx.snapshot();
            let mut workloads: Vec<_> = state
                .workloads()
                .map(|w| {
                    json!({
                        "name": w.name, "namespace": w.namespace, "ip": w.ip.to_string(),
                        "node": w.node, "identity": w.identity.to_string(), "captured": w.captured,
                    })
                })
                .collect();
            workloads.sort_by_key(|w| w["ip"].as_str().unwrap_or_default().to_owned());
            let services: Vec<_> = state
                .services()
                .map(|s| {
                    json!({
                        "name": s.name, "namespace": s.namespace, "vip": s.vip.to_string(),
                        "ports": s.ports.iter().map(|p| json!({"port": p.port, "targetPort": p.target_port})).collect::<Vec<_>>(),
                        "endpoints": s.endpoints.iter().map(|w| w.ip.to_string()).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let policies: Vec<_> = state
                .snapshot
                .policies
                .values()
                .map(|p| json!({"kind": p.kind, "namespace": p.namespace, "name": p.name}))
                .collect();
            let enrolled: Vec<_> = enrolled
                .lock()
                .expect("not poisoned")
                .values()
                .map(|e| format!("{}/{}", e.workload.namespace, e.workload.name))
                .collect();
            let dump = json!({
                "node": state.node,
                "workloads": workloads,
                "services": services,
                "policies": policies,
                "enrolled": enrolled,
                "certificates": ctx.certs.certificates(),
                "pooled_connections": ctx.pool.connection_count(),
            });
            http_server::text(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&dump).unwrap_or_default(),
            )
        }
        "/logging" => {
            let level = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")));
            match level {
                Some(level) => match set_log_level(level) {
                    Ok(()) => http_server::text(
                        StatusCode::OK,
                        "text/plain",
                        format!("log level: {level}\n"),
                    ),
                    Err(e) => {
                        http_server::text(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n"))
                    }
                },
                None => http_server::text(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "usage: /logging?level=<filter>\n",
                ),
            }
        }
        _ => certs(req),
    })
}
