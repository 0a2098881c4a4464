//! `ztunnel run`: wires config → state → proxy for one node, enrolls the node's
//! ambient pods, serves metrics, readiness and admin, and drains on SIGTERM.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use http::{Method, StatusCode};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use serde_json::json;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    accept::{AcceptMetrics, Acceptor, Limiter, Limits},
    config,
    drain::Drain,
    http_server::{self, Handler},
    metrics::{self, PolicyMetrics, TcpMetrics},
    netns::Netns,
    orig_src::{self, OrigSrc},
    proxy::{self, pool::Pool, Context},
    redirect::{PodNetwork, RedirectConfig, RedirectError, Redirector},
    state::{State, Workload},
};

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub source: config::Source,
    pub node: String,
    /// Trust, the root namespace and the CA.
    pub mesh: ztunnel_core::cli::MeshOptions,
    pub pin_dir: PathBuf,
    pub pod_cgroup_root: PathBuf,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub drain_timeout: Duration,
    /// Caps and timeouts of the proxy's listeners.
    pub limits: Limits,
    /// The DNS proxy: upstreams, cluster domain, caps, capture on or off.
    pub dns: crate::dns::Settings,
    /// Connections between two pods of this node: HBONE, or spliced.
    pub same_node_splice: crate::splice::Mode,
}

/// Why the tunnel could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Source(#[from] config::SourceError),
    #[error(transparent)]
    Ca(#[from] ztunnel_core::ca::client::CaConfigError),
    #[error("the redirection: {0}")]
    Redirect(#[from] RedirectError),
    #[error("binding {address}: {error}")]
    Bind {
        address: SocketAddr,
        error: std::io::Error,
    },
}

/// Why a pod could not be enrolled (it is retried; a pod the previous run
/// captured stays captured meanwhile).
#[derive(Debug, thiserror::Error)]
enum EnrollError {
    #[error("its network namespace and cgroup are unknown")]
    Unlocated,
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error("the enrollment task: {0}")]
    Task(tokio::task::JoinError),
    #[error("serving the pod: {0}")]
    Serve(std::io::Error),
}

/// Changes the log filter at run time (`/logging?level=`).
pub use ztunnel_core::telemetry::SetLogLevel;

/// An enrolled pod: the workload it was enrolled as, and its listeners' tasks.
struct Enrolled {
    workload: Arc<Workload>,
    netns_cookie: u64,
    /// The namespace it was enrolled in, held open: compared with what its path
    /// names now.
    netns: Netns,
    allow_plaintext_udp: bool,
    dns_capture: bool,
    tasks: JoinSet<()>,
    /// Cancelled when the pod leaves (or is enrolled again): closes the HBONE
    /// connections dialed from it.
    gone: CancellationToken,
}

type EnrolledPods = Mutex<HashMap<(String, String), Enrolled>>;

/// A pod of this node in the mesh that is not enrolled (yet): retried with backoff.
/// Meanwhile whatever a previous run pinned for it stays: it fails closed.
struct Pending {
    attempts: u32,
    next: Instant,
}

/// Backoff between enrollment attempts of one pod: 250 ms doubling to 30 s.
fn retry_after(attempts: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << attempts.min(7))).min(Duration::from_secs(30))
}

/// How enrollment fares, on `/metrics`.
#[derive(Clone, Default)]
struct EnrollMetrics {
    failures: Counter,
    pending: Gauge,
    netns_changed: Counter,
}

impl EnrollMetrics {
    fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "ztunnel_enrollment_failures",
            "Failed attempts to enroll a pod of this node (retried; a pod the previous run captured stays captured meanwhile)",
            metrics.failures.clone(),
        );
        registry.register(
            "ztunnel_pods_enrollment_pending",
            "Pods of this node in the mesh that are not enrolled yet",
            metrics.pending.clone(),
        );
        registry.register(
            "ztunnel_pod_netns_changed",
            "Enrolled pods whose network namespace path came to name another namespace (a reused PID, a recreated sandbox)",
            metrics.netns_changed.clone(),
        );
        metrics
    }
}

pub async fn run(options: RunOptions, set_log_level: SetLogLevel) -> Result<(), StartError> {
    let mut registry = prometheus_client::registry::Registry::default();
    let tcp_metrics = TcpMetrics::register(&mut registry);

    let config_metrics = config::ConfigMetrics::register(&mut registry);
    let snapshots = options.source.watch(config_metrics.clone()).await?;
    let settings = options.mesh.settings(&options.node);
    let states = crate::state::spawn_updates(snapshots, settings, config_metrics.bindings_refused);
    let certs = options.mesh.cert_manager(&mut registry)?;

    let mut redirector = Redirector::start(RedirectConfig {
        pin_dir: options.pin_dir.clone(),
        pod_cgroup_root: options.pod_cgroup_root.clone(),
    })?;
    let orig_src = Arc::new(OrigSrc::new(redirector.take_deliveries()?, &mut registry));
    let orig_dst = redirector.take_orig_dst()?;
    let splice = Arc::new(crate::splice::Splicer::new(
        options.same_node_splice,
        &mut redirector,
        &mut registry,
    ));
    let settings = proxy::pool::PoolSettings::default();
    let accept_metrics = AcceptMetrics::register(&mut registry);
    // One drain for every server and connection of the process.
    let drain = Drain::new();
    tracing::info!(limits = ?options.limits, "connection limits");
    let hbone_protocol_errors = Default::default();
    registry.register(
        "ztunnel_hbone_protocol_errors",
        "Inbound HBONE connections closed with a GOAWAY error because the peer broke HTTP/2 or flooded it, by error code (ENHANCE_YOUR_CALM for floods such as rapid reset)",
        Clone::clone(&hbone_protocol_errors),
    );
    let ctx = Arc::new(Context {
        state: states.clone(),
        certs: certs.clone(),
        pool: Pool::new(settings.clone()),
        metrics: tcp_metrics,
        redirect: Arc::new(Mutex::new(redirector)),
        orig_dst,
        drain: drain.clone(),
        hbone: settings,
        policy_metrics: PolicyMetrics::register(&mut registry),
        hbone_protocol_errors,
        active: Arc::default(),
        limiter: Limiter::new(options.limits.clone(), accept_metrics.clone()),
        dns: crate::dns::Dns::new(
            options.dns.clone(),
            states.clone(),
            &mut registry,
            drain.clone(),
        ),
        orig_src,
        balancer: Default::default(),
        splice,
    });
    let enroll_metrics = EnrollMetrics::register(&mut registry);

    let ready = Arc::new(AtomicBool::new(false));
    let enrolled: Arc<EnrolledPods> = Arc::default();
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
        serve_http(name, addr, handler, &accept_metrics, &drain).await?;
    }

    let reconciler = tokio::spawn(reconcile_loop(
        ctx.clone(),
        states,
        enrolled.clone(),
        ready,
        enroll_metrics,
    ));
    tracing::info!(node = %options.node, config = %options.source, "ztunnel running");

    shutdown_signal().await;
    tracing::info!(
        "draining: no new connections, waiting up to {:?} for open ones",
        options.drain_timeout
    );
    reconciler.abort();
    let _ = reconciler.await;
    // Closing the pods' listeners (and their DNS): new connections are refused
    // (the pods fail closed).
    let pods: Vec<Enrolled> = enrolled
        .lock()
        .expect("not poisoned")
        .drain()
        .map(|(_, e)| e)
        .collect();
    for mut pod in pods {
        pod.tasks.shutdown().await;
    }
    // Then the admin, metrics and readiness listeners, and the wait for open
    // connections.
    let cut = drain.drain(options.drain_timeout).await;
    if cut > 0 {
        tracing::warn!("{cut} connections still open at the drain deadline: closing them");
    }
    tracing::info!("drained");
    Ok(())
}

/// Serves an HTTP endpoint with its own caps (one endpoint's clients cannot take
/// another's slots).
async fn serve_http(
    name: &'static str,
    addr: SocketAddr,
    handler: Handler,
    metrics: &AcceptMetrics,
    drain: &Drain,
) -> Result<(), StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|error| StartError::Bind {
            address: addr,
            error,
        })?;
    let limiter = Limiter::new(Limits::http_endpoint(), metrics.clone());
    tokio::spawn(http_server::serve_draining(
        Acceptor::new(listener, limiter, name),
        handler,
        drain.clone(),
    ));
    Ok(())
}

pub use ztunnel_core::shutdown_signal;

/// Keeps enrollment, certificates and pooled connections in line with the state;
/// retries the pods whose enrollment failed.
async fn reconcile_loop(
    ctx: Arc<Context>,
    mut states: watch::Receiver<Arc<State>>,
    enrolled: Arc<EnrolledPods>,
    ready: Arc<AtomicBool>,
    metrics: EnrollMetrics,
) {
    let mut previous: Option<Arc<State>> = None;
    let mut pending: HashMap<(String, String), Pending> = HashMap::new();
    loop {
        let state = states.borrow_and_update().clone();
        reconcile(
            &ctx,
            &state,
            previous.as_deref(),
            &enrolled,
            &mut pending,
            &metrics,
        )
        .await;
        {
            let (ctx, state, enrolled) = (ctx.clone(), state.clone(), enrolled.clone());
            // BPF syscalls and pinned-link removal: off the async runtime.
            let _ = tokio::task::spawn_blocking(move || release_leftovers(&ctx, &state, &enrolled))
                .await;
        }
        if !ready.swap(true, Ordering::AcqRel) {
            // Start-up is done: what it freed goes back to the kernel.
            ztunnel_core::memory::release_free_heap();
        }
        previous = Some(state);
        let retry = pending.values().map(|p| p.next).min();
        loop {
            tokio::select! {
                changed = states.changed() => if changed.is_err() { return } else { break },
                _ = sleep_until(retry) => break,
                // A path can come to name another namespace with no change in the
                // state (a reused PID): looked at now and then.
                _ = tokio::time::sleep(NETNS_CHECK) => if netns_moved(&enrolled) { break },
            }
        }
    }
}

/// How often enrolled pods' namespace paths are compared with what is held.
const NETNS_CHECK: Duration = Duration::from_secs(2);

fn netns_moved(enrolled: &EnrolledPods) -> bool {
    enrolled.lock().expect("not poisoned").values().any(|e| {
        e.workload
            .netns
            .as_deref()
            .is_some_and(|path| !e.netns.is_at(path))
    })
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Pods pinned as enrolled (by a previous run, or superseded by a re-enrollment)
/// that this run does not serve. Released only when no pod of the mesh on this node
/// has that address: they left the mesh while the tunnel was away, so their traffic
/// must be neither captured into nothing nor dropped. A pod still in the mesh whose
/// enrollment has not succeeded keeps its pins: it stays captured (fails closed).
fn release_leftovers(ctx: &Context, state: &State, enrolled: &EnrolledPods) {
    let (ours, served): (Vec<u64>, Vec<Ipv4Addr>) = enrolled
        .lock()
        .expect("not poisoned")
        .values()
        .map(|e| (e.netns_cookie, e.workload.ip))
        .unzip();
    let waiting: Vec<Ipv4Addr> = state
        .local_workloads()
        .map(|w| w.ip)
        .filter(|ip| !served.contains(ip))
        .collect();
    let mut redirect = ctx.redirect.lock().expect("not poisoned");
    let pinned = match redirect.enrolled_pods() {
        Ok(pinned) => pinned,
        Err(e) => return tracing::warn!("listing enrolled pods: {e}"),
    };
    let mut released = std::collections::HashSet::new();
    for (cookie, ip) in pinned {
        if ours.contains(&cookie) || waiting.contains(&ip) {
            continue;
        }
        let result = redirect
            .release_netns(cookie)
            .and_then(|()| match served.contains(&ip) {
                true => Ok(()),
                false => redirect.remove_listeners(ip),
            });
        if result.is_ok() {
            released.insert(cookie);
        }
        match result {
            Ok(()) if served.contains(&ip) => {
                tracing::info!(%ip, "released a superseded enrollment of a pod enrolled again")
            }
            Ok(()) => {
                tracing::info!(%ip, "released a pod a previous run enrolled: it is no longer in the mesh")
            }
            Err(e) => tracing::warn!(%ip, "releasing a leftover pod: {e}"),
        }
    }
    drop(redirect);
    if released.is_empty() {
        return;
    }
    // Their namespaces are known only by cookie: found by looking at every one.
    let (_, failed) = orig_src::remove_by_cookie(&released);
    for failure in failed {
        tracing::warn!("original-source routing left in a released pod: {failure}");
    }
}

async fn reconcile(
    ctx: &Arc<Context>,
    state: &State,
    previous: Option<&State>,
    enrolled: &EnrolledPods,
    pending: &mut HashMap<(String, String), Pending>,
    metrics: &EnrollMetrics,
) {
    let desired: HashMap<(String, String), Arc<Workload>> = state
        .local_workloads()
        .map(|w| ((w.namespace.clone(), w.name.clone()), w.clone()))
        .collect();
    pending.retain(|key, _| desired.contains_key(key));
    // Gone or out of the mesh: released. Changed in what enrollment depends on
    // (including a namespace path that now names another namespace): enrolled
    // again, its old pins kept until then so that it fails closed meanwhile.
    let (gone, changed): (Vec<Enrolled>, Vec<Enrolled>) = {
        let mut enrolled = enrolled.lock().expect("not poisoned");
        let mut gone = Vec::new();
        let mut changed = Vec::new();
        let keys: Vec<_> = enrolled.keys().cloned().collect();
        for key in keys {
            let e = &enrolled[&key];
            match desired.get(&key) {
                None => gone.extend(enrolled.remove(&key)),
                Some(w) => {
                    let moved = w.netns.as_deref().is_some_and(|path| !e.netns.is_at(path));
                    if moved && w.netns == e.workload.netns {
                        metrics.netns_changed.inc();
                        tracing::warn!(pod = %w.name, namespace = %w.namespace, path = ?w.netns, "the pod's network namespace path now names another namespace: enrolling it again, verified");
                    }
                    if moved
                        || w.ip != e.workload.ip
                        || w.identity != e.workload.identity
                        || w.netns != e.workload.netns
                        || w.cgroup != e.workload.cgroup
                    {
                        changed.extend(enrolled.remove(&key));
                    }
                }
            }
        }
        (gone, changed)
    };
    for mut pod in changed {
        pod.tasks.shutdown().await;
        pod.gone.cancel();
    }
    for mut pod in gone {
        pod.tasks.shutdown().await;
        pod.gone.cancel();
        let still_served = enrolled
            .lock()
            .expect("not poisoned")
            .values()
            .any(|e| e.workload.ip == pod.workload.ip);
        // setns threads and BPF syscalls: off the async runtime.
        let ctx2 = ctx.clone();
        let (pod, result) = tokio::task::spawn_blocking(move || {
            if let Err(e) = orig_src::remove_in(&pod.netns) {
                tracing::warn!(pod = %pod.workload.name, "removing the original-source routing: {e}");
            }
            let mut redirect = ctx2.redirect.lock().expect("not poisoned");
            let result = redirect
                .release_netns(pod.netns_cookie)
                .and_then(|()| match still_served {
                    true => Ok(()),
                    false => redirect.remove_listeners(pod.workload.ip),
                });
            (pod, result)
        })
        .await
        .expect("the unenrollment task does not panic");
        match result {
            Ok(()) => {
                tracing::info!(pod = %pod.workload.name, namespace = %pod.workload.namespace, "unenrolled")
            }
            Err(e) => tracing::warn!(pod = %pod.workload.name, "unenrolling failed: {e}"),
        }
    }
    // What a namespace lets its pods send outside the mesh, and whether their DNS
    // is captured: a map update.
    for (key, e) in enrolled.lock().expect("not poisoned").iter_mut() {
        let allow = state.snapshot.allows_plaintext_udp(&key.0);
        let dns_capture = ctx.dns.captures(&e.workload, state);
        if allow != e.allow_plaintext_udp || dns_capture != e.dns_capture {
            let result = ctx.redirect.lock().expect("not poisoned").set_pod_flags(
                e.netns_cookie,
                e.workload.ip,
                allow,
                dns_capture,
            );
            match result {
                Ok(()) => (e.allow_plaintext_udp, e.dns_capture) = (allow, dns_capture),
                Err(e) => tracing::warn!(pod = %key.1, "updating the pod's UDP setting: {e}"),
            }
        }
    }
    // Join, or retry those that failed when due.
    let now = Instant::now();
    for (key, workload) in desired {
        if enrolled.lock().expect("not poisoned").contains_key(&key)
            || pending.get(&key).is_some_and(|p| p.next > now)
        {
            continue;
        }
        match enroll(ctx, state, &workload).await {
            Ok(pod) => {
                tracing::info!(pod = %workload.name, namespace = %workload.namespace, ip = %workload.ip, identity = %workload.identity, "enrolled");
                pending.remove(&key);
                enrolled.lock().expect("not poisoned").insert(key, pod);
            }
            Err(e) => {
                let attempts = pending.get(&key).map_or(0, |p| p.attempts) + 1;
                let delay = retry_after(attempts);
                metrics.failures.inc();
                tracing::warn!(pod = %workload.name, namespace = %workload.namespace, ip = %workload.ip, attempts, "enrolling failed (kept captured if it was; retried in {delay:?}): {e}");
                pending.insert(
                    key,
                    Pending {
                        attempts,
                        next: now + delay,
                    },
                );
            }
        }
    }
    metrics.pending.set(pending.len() as i64);
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
    // Only the addresses whose workload changed are looked at.
    if let Some(previous) = previous {
        for (ip, old, new) in state.workload_changes(previous) {
            if old.is_some_and(|old| new.is_none_or(|w| w.identity != old.identity)) {
                ctx.pool.evict_address(ip);
            }
        }
    }
}

/// Captures one pod and serves its listeners.
async fn enroll(
    ctx: &Arc<Context>,
    state: &State,
    workload: &Arc<Workload>,
) -> Result<Enrolled, EnrollError> {
    let (Some(netns), Some(cgroup)) = (&workload.netns, &workload.cgroup) else {
        return Err(EnrollError::Unlocated);
    };
    let allow_plaintext_udp = state.snapshot.allows_plaintext_udp(&workload.namespace);
    let dns_capture = ctx.dns.captures(workload, state);
    let network = PodNetwork {
        netns: netns.clone(),
        cgroup: cgroup.clone(),
        ip: workload.ip,
        allow_plaintext_udp,
        dns_capture,
    };
    // setns threads and BPF syscalls: off the async runtime, so that connections
    // are served while a pod is enrolled.
    let redirect = ctx.redirect.clone();
    let listeners = tokio::task::spawn_blocking(move || {
        redirect.lock().expect("not poisoned").enroll(&network)
    })
    .await
    .map_err(EnrollError::Task)??;
    let netns = listeners.netns.try_clone().map_err(EnrollError::Serve)?;
    let netns_cookie = listeners.netns_cookie;
    let gone = CancellationToken::new();
    let tasks = proxy::serve_pod(ctx.clone(), workload.clone(), listeners, gone.clone())
        .map_err(EnrollError::Serve)?;
    Ok(Enrolled {
        workload: workload.clone(),
        netns_cookie,
        netns,
        allow_plaintext_udp,
        dns_capture,
        tasks,
        gone,
    })
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
                        "node": w.node_name, "identity": w.identity.to_string(), "captured": w.captured,
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
        // State-changing: POST only, so that nothing reaching it by a plain GET
        // (a link, a redirect, a proxy that only forwards GETs) changes it.
        "/logging" if req.method() != Method::POST => {
            let mut response = http_server::text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "POST /logging?level=<filter>\n",
            );
            response
                .headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            response
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrollment_retries_back_off_to_thirty_seconds() {
        assert_eq!(retry_after(1), Duration::from_millis(500));
        assert_eq!(retry_after(2), Duration::from_secs(1));
        assert!(retry_after(5) < retry_after(6));
        assert_eq!(retry_after(8), Duration::from_secs(30));
        assert_eq!(retry_after(u32::MAX), Duration::from_secs(30));
    }
}
