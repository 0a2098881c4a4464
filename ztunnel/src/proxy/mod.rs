//! The proxy: per enrolled pod, the captured outbound connections (15001), inbound
//! HBONE (15008), inbound plaintext (15006) and DNS (15053, served by `crate::dns`).

pub mod active;
mod error;
pub mod inbound;
pub mod outbound;
// The HBONE client pool and the relay are shared with the waypoint.
pub use error::Error;
pub use ztunnel_hbone::{pool, relay, stream};

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::{sync::watch, task::JoinSet};

use crate::{
    accept::{Acceptor, Source},
    certs::CertManager,
    drain::Drain,
    metrics::{DeniedLabels, PolicyMetrics, ShadowLabels, TcpLabels, TcpMetrics, UNKNOWN},
    netns::SocketFactory,
    orig_src::Delivery,
    policy::{authz::describe_source, Connection, Mode},
    redirect::{PodListeners, Redirector},
    response_flags::ResponseFlags,
    state::{State, Workload},
};

/// What every connection handler shares.
pub struct Context {
    pub state: watch::Receiver<Arc<State>>,
    pub certs: Arc<CertManager>,
    pub pool: Arc<pool::Pool>,
    pub metrics: TcpMetrics,
    pub redirect: Arc<Mutex<Redirector>>,
    /// Read on every outbound connection: no lock shared with enrollment.
    pub orig_dst: crate::redirect::OrigDstMap,
    /// The process's drain: every live connection is spawned through it, so
    /// that shutdown waits for them, and HBONE connections watch its signal.
    pub drain: Drain,
    pub hbone: pool::PoolSettings,
    pub policy_metrics: PolicyMetrics,
    /// Inbound HBONE connections closed for breaking HTTP/2 (GOAWAY's code).
    pub hbone_protocol_errors: prometheus_client::metrics::family::Family<
        inbound::ProtocolErrorLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    /// Inbound connections, re-decided when policy changes.
    pub active: Arc<active::Active>,
    /// The DNS proxy, its in-flight caps shared by every pod.
    pub dns: Arc<crate::dns::Dns>,
    /// The connection caps every pod's listeners share (one file-descriptor budget).
    pub limiter: Arc<crate::accept::Limiter>,
    /// Delivery to applications from their clients' addresses.
    pub orig_src: Arc<crate::orig_src::OrigSrc>,
    /// Which endpoint of a Service, or which pod of a waypoint, each connection
    /// goes to (the waypoint's balancer too).
    pub balancer: ztunnel_core::balance::Balancer<ztunnel_core::balance::Turn>,
    /// Same-node connections joined in the kernel (or relayed without HBONE).
    pub splice: Arc<crate::splice::Splicer>,
}

impl Context {
    /// The current state: one consistent snapshot, taken once per connection.
    pub fn snapshot(&self) -> Arc<State> {
        self.state.borrow().clone()
    }

    /// Decides an inbound connection: PeerAuthentication for plaintext, then
    /// AuthorizationPolicy. Logs and counts denials (with the deciding policy),
    /// AUDIT matches and dry-run shadow decisions.
    pub fn authorize(
        &self,
        state: &State,
        destination: &Workload,
        conn: &Connection,
        plaintext: bool,
    ) -> Result<(), Error> {
        if plaintext {
            let (mode, policy) = state
                .policies
                .peer_authentication(destination, conn.destination_port);
            if mode == Mode::Strict {
                let policy = policy.unwrap_or_default();
                self.deny(
                    &policy,
                    "peer_authentication",
                    destination,
                    conn,
                    &format!("plaintext refused: PeerAuthentication {policy} is STRICT"),
                );
                return Err(Error::Denied(format!(
                    "PeerAuthentication {policy} is STRICT"
                )));
            }
        }
        let decision = state.policies.authorize(destination, conn);
        for policy in &decision.audit {
            tracing::info!(target: "audit", %policy, src = %describe_source(conn), dst = %format!("{}/{}", destination.namespace, destination.name), port = conn.destination_port, "AUDIT policy matched");
            self.policy_metrics
                .shadow
                .get_or_create(&ShadowLabels {
                    policy: policy.clone(),
                    decision: "audit".into(),
                })
                .inc();
        }
        for shadow in &decision.dry_run {
            let policy = &shadow.policy;
            let would = if shadow.would_allow { "allow" } else { "deny" };
            tracing::info!(target: "dry_run", %policy, src = %describe_source(conn), dst = %format!("{}/{}", destination.namespace, destination.name), port = conn.destination_port, "dry-run: {shadow}");
            self.policy_metrics
                .shadow
                .get_or_create(&ShadowLabels {
                    policy: policy.clone(),
                    decision: would.into(),
                })
                .inc();
        }
        if decision.allow {
            return Ok(());
        }
        let policy = decision.policy.clone().unwrap_or_else(|| "none".into());
        self.deny(
            &policy,
            "authorization",
            destination,
            conn,
            &decision.reason,
        );
        Err(Error::Denied(decision.reason))
    }

    fn deny(
        &self,
        policy: &str,
        kind: &str,
        destination: &Workload,
        conn: &Connection,
        reason: &str,
    ) {
        tracing::warn!(
            src = %describe_source(conn),
            dst = %format!("{}/{}", destination.namespace, destination.name),
            dst.identity = %destination.identity,
            port = conn.destination_port,
            %policy,
            "connection denied: {reason}"
        );
        self.policy_metrics
            .denied
            .get_or_create(&DeniedLabels {
                policy: policy.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }
}

/// Serves one enrolled pod's listeners until the returned set is dropped. Every
/// connection made on the pod's behalf is dialed from inside its namespace; its
/// pooled HBONE connections are closed when `gone` is cancelled (the pod left the
/// mesh: not when the tunnel drains, which lets open streams finish).
pub fn serve_pod(
    ctx: Arc<Context>,
    workload: Arc<Workload>,
    listeners: PodListeners,
    gone: tokio_util::sync::CancellationToken,
) -> std::io::Result<JoinSet<()>> {
    let mut tasks = JoinSet::new();
    let cookie = listeners.netns_cookie;
    let sockets = SocketFactory::new(&listeners.netns)?;
    // The pod's HBONE connections are dialed from inside it.
    let origin = pool::PodOrigin::new(workload.ip, sockets.clone(), gone);
    let delivery = Delivery::new(
        ctx.orig_src.clone(),
        sockets.clone(),
        &listeners.netns,
        workload.ip,
    );
    let accept = |listener: std::net::TcpListener, name| {
        tokio::net::TcpListener::from_std(listener)
            .map(|l| Acceptor::new(l, ctx.limiter.clone(), name))
    };
    // A pod's outbound connections are one source, from its address or loopback.
    let outbound = accept(listeners.outbound, "outbound")?
        .source(Source::Listener(std::net::IpAddr::V4(workload.ip)));
    let hbone = accept(listeners.hbone, "hbone")?;
    let plaintext = accept(listeners.inbound_plaintext, "plaintext")?;
    let dns = tokio::net::UdpSocket::from_std(listeners.dns)?;
    tasks.spawn(outbound::serve(
        ctx.clone(),
        workload.clone(),
        cookie,
        outbound,
        origin,
    ));
    tasks.spawn(inbound::serve_hbone(
        ctx.clone(),
        workload.clone(),
        hbone,
        delivery.clone(),
    ));
    tasks.spawn(inbound::serve_plaintext(
        ctx.clone(),
        workload.clone(),
        plaintext,
        delivery.clone(),
    ));
    tasks.spawn(ctx.splice.serve_local(workload.clone(), delivery.clone()));
    tasks.spawn(crate::dns::serve_udp(ctx.dns.clone(), workload, dns));
    Ok(tasks)
}

/// One connection's facts, for the access log and Istio's metrics.
pub struct Record {
    pub started: Instant,
    pub reporter: &'static str,
    pub source_addr: SocketAddr,
    pub destination_addr: SocketAddr,
    pub source: Option<Arc<Workload>>,
    pub destination: Option<Arc<Workload>>,
    pub source_principal: Option<String>,
    pub destination_service: Option<String>,
    pub mtls: bool,
}

impl Record {
    fn labels(&self, response_flags: ResponseFlags) -> TcpLabels {
        let name = |w: &Option<Arc<Workload>>| {
            w.as_ref()
                .map_or(UNKNOWN.into(), |w| w.workload_name().to_owned())
        };
        let ns =
            |w: &Option<Arc<Workload>>| w.as_ref().map_or(UNKNOWN.into(), |w| w.namespace.clone());
        let principal = |w: &Option<Arc<Workload>>| {
            w.as_ref()
                .map_or(UNKNOWN.into(), |w| w.identity.to_string())
        };
        TcpLabels {
            reporter: self.reporter.into(),
            source_workload: name(&self.source),
            source_workload_namespace: ns(&self.source),
            source_principal: self.proven_source().unwrap_or_else(|| UNKNOWN.into()),
            destination_workload: name(&self.destination),
            destination_workload_namespace: ns(&self.destination),
            destination_principal: if self.mtls {
                principal(&self.destination)
            } else {
                UNKNOWN.into()
            },
            destination_service: self
                .destination_service
                .clone()
                .unwrap_or_else(|| UNKNOWN.into()),
            request_protocol: "tcp".into(),
            response_flags,
            connection_security_policy: if self.mtls {
                "mutual_tls".into()
            } else {
                UNKNOWN.into()
            },
        }
    }

    /// The source's identity, when something proves it: its certificate (inbound
    /// HBONE), or being the local pod the connection was captured from (outbound).
    /// A plaintext peer has none, whatever its address says.
    fn proven_source(&self) -> Option<String> {
        match (&self.source_principal, self.reporter) {
            (Some(p), _) => Some(p.clone()),
            (None, "source") => self.source.as_ref().map(|w| w.identity.to_string()),
            (None, _) => None,
        }
    }

    /// Counts the connection as opened.
    pub fn opened(&self, metrics: &TcpMetrics) {
        metrics
            .opened
            .get_or_create(&self.labels(ResponseFlags::NONE))
            .inc();
    }

    /// Counts the end of an opened connection, with the flag of how it failed if it
    /// did, and writes its access-log line.
    pub fn closed(&self, metrics: &TcpMetrics, outcome: Result<(u64, u64), Error>) {
        match outcome {
            Ok((received, sent)) => self.ended(metrics, received, sent, None),
            Err(e) => self.ended(metrics, 0, 0, Some(e)),
        }
    }

    /// As [`Record::closed`], for a connection whose bytes are known even when it
    /// failed (a spliced one counts them from its sockets).
    pub fn ended(&self, metrics: &TcpMetrics, received: u64, sent: u64, error: Option<Error>) {
        let flags = ResponseFlags::from(error.as_ref().map(Error::flag));
        let labels = self.labels(flags);
        metrics.closed.get_or_create(&labels).inc();
        metrics.received.get_or_create(&labels).inc_by(received);
        metrics.sent.get_or_create(&labels).inc_by(sent);
        self.log(received, sent, flags, error.as_ref());
    }

    /// A connection refused before it was opened: counted with the error's flag
    /// and logged with why.
    pub fn refused(&self, metrics: &TcpMetrics, error: &Error) {
        let flags = ResponseFlags::from(error.flag());
        let labels = self.labels(flags);
        metrics.opened.get_or_create(&labels).inc();
        metrics.closed.get_or_create(&labels).inc();
        self.log(0, 0, flags, Some(error));
    }

    fn log(&self, received: u64, sent: u64, flags: ResponseFlags, error: Option<&Error>) {
        let identity = |w: &Option<Arc<Workload>>| {
            w.as_ref()
                .map(|w| w.identity.to_string())
                .unwrap_or_default()
        };
        let workload = |w: &Option<Arc<Workload>>| {
            w.as_ref()
                .map(|w| format!("{}/{}", w.namespace, w.name))
                .unwrap_or_default()
        };
        tracing::info!(
            target: "access",
            reporter = self.reporter,
            src.addr = %self.source_addr,
            src.workload = %workload(&self.source),
            src.identity = %self.proven_source().unwrap_or_default(),
            dst.addr = %self.destination_addr,
            dst.service = self.destination_service.as_deref().unwrap_or(""),
            dst.workload = %workload(&self.destination),
            dst.identity = %if self.mtls { identity(&self.destination) } else { String::new() },
            mtls = self.mtls,
            bytes_received = received,
            bytes_sent = sent,
            duration_ms = self.started.elapsed().as_millis() as u64,
            response_flags = %flags,
            error = error.map(ToString::to_string).unwrap_or_default().as_str(),
            "connection"
        );
    }
}
