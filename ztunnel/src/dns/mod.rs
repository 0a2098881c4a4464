//! The DNS proxy for enrolled pods (Istio's ambient DNS proxying): captured UDP/53
//! arrives on 15053 inside the pod, TCP/53 on the outbound listener. Names of the
//! mesh are answered from its state ([`names`]), authoritatively, TTL 30 s; every
//! other name is forwarded ([`forward`]) through hickory-resolver. The wire format
//! is hickory-proto's.
//!
//! Bounded: forwarded queries in flight are capped per node ([`Limits::per_node`])
//! and per pod ([`Limits::per_pod`]); a query over either is dropped and counted
//! (the client retries, as after any lost datagram). Answers from the mesh hold
//! nothing and are never capped.
//!
//! On the node's drain, forwarded queries in flight are still answered (they are
//! tracked work of the process's [`Drain`]); a TCP connection closes after the
//! query it is answering.

pub mod forward;
pub mod names;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{rdata::A, DNSClass, RData, Record, RecordType},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::UdpSocket,
    sync::watch,
};

pub use ztunnel_core::config::DNS_CAPTURE_ANNOTATION;

use crate::{
    accept::RateLimitedLog,
    drain::Drain,
    state::{State, Workload},
};
use forward::Forwarder;
use names::{Answer, MeshNames};

/// The TTL of the mesh's own answers (Istio's).
const MESH_TTL: u32 = 30;
/// The UDP payload we accept and offer with EDNS.
const MAX_UDP_PAYLOAD: u16 = 1232;
/// A TCP client silent this long between queries is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// In-flight caps on forwarded queries: well under the tunnel's file-descriptor
/// limit (each holds an upstream socket; their resends share a node-wide budget
/// of 64 more, see `forward`).
#[derive(Clone, Debug)]
pub struct Limits {
    pub per_node: usize,
    pub per_pod: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_node: 1024,
            // A fair share: four pods flooding at once still leave the others room.
            per_pod: 256,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// Where forwarded queries go (default: the node's resolv.conf nameservers).
    pub upstreams: Vec<SocketAddr>,
    /// The cluster domain (`cluster.local`).
    pub cluster_domain: String,
    pub limits: Limits,
    /// `--dns-capture`: false leaves every pod's DNS alone.
    pub capture: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    request_query_type: String,
    request_protocol: &'static str,
    source_canonical_service: String,
    source_canonical_revision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DroppedLabels {
    /// "node_limit", "pod_limit", "malformed".
    reason: &'static str,
}

type Histograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn duration_buckets() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ])
}

/// Istio's DNS metrics, and what we drop.
struct Metrics {
    requests: Family<RequestLabels, Counter>,
    upstream_requests: Family<RequestLabels, Counter>,
    upstream_failures: Family<RequestLabels, Counter>,
    upstream_duration: Histograms,
    dropped: Family<DroppedLabels, Counter>,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            upstream_duration: Family::new_with_constructor(duration_buckets),
            dropped: Family::default(),
        };
        registry.register(
            "istio_dns_requests",
            "DNS requests from enrolled pods",
            metrics.requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_requests",
            "DNS requests forwarded upstream",
            metrics.upstream_requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_failures",
            "DNS requests forwarded upstream that failed (no answer, or an error code)",
            metrics.upstream_failures.clone(),
        );
        registry.register(
            "istio_dns_upstream_request_duration_seconds",
            "Time an upstream took to answer a forwarded DNS request",
            metrics.upstream_duration.clone(),
        );
        registry.register(
            "ztunnel_dns_queries_dropped",
            "DNS queries dropped: too many in flight (node or pod limit), or not DNS",
            metrics.dropped.clone(),
        );
        metrics
    }
}

/// The node's DNS proxy, shared by every pod.
pub struct Dns {
    settings: Settings,
    names: watch::Receiver<Arc<MeshNames>>,
    forwarder: Arc<Forwarder>,
    in_flight: Arc<AtomicUsize>,
    pods_in_flight: Mutex<HashMap<Ipv4Addr, Arc<AtomicUsize>>>,
    metrics: Metrics,
    log: RateLimitedLog,
    /// The node's drain: forwarded queries are its tracked work.
    drain: Drain,
}

/// Transport a query came by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Udp,
    Tcp,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Udp => "udp",
            Protocol::Tcp => "tcp",
        }
    }
}

/// A query read and checked, for the forwarder.
pub struct Forward {
    request: Message,
    query: Query,
    labels: RequestLabels,
    started: Instant,
    protocol: Protocol,
    _in_flight: InFlight,
}

/// What to do with a datagram or TCP message.
pub enum Prepared {
    /// Answered at once (from the mesh, or an error).
    Reply(Vec<u8>),
    /// Needs the upstream.
    Forward(Box<Forward>),
    /// Nothing is sent back.
    Drop,
}

impl Dns {
    /// The proxy, its names kept in step with the state, its forwarded queries
    /// finished before `drain` completes.
    pub fn new(
        settings: Settings,
        mut states: watch::Receiver<Arc<State>>,
        registry: &mut Registry,
        drain: Drain,
    ) -> Arc<Self> {
        let domain = settings.cluster_domain.clone();
        let mut previous = states.borrow_and_update().clone();
        let first = MeshNames::from_state(&previous, &domain);
        let (tx, names) = watch::channel(Arc::new(first));
        tokio::spawn(async move {
            while states.changed().await.is_ok() {
                let state = states.borrow_and_update().clone();
                // Only the names of what changed are derived again.
                let next = tx.borrow().update(&previous, &state);
                previous = state;
                if tx.send(Arc::new(next)).is_err() {
                    return;
                }
            }
        });
        let upstreams = match settings.upstreams.is_empty() {
            true => resolv_conf_nameservers(),
            false => settings.upstreams.clone(),
        };
        tracing::info!(?upstreams, domain = %settings.cluster_domain, capture = settings.capture, "DNS proxy");
        let forwarder = Arc::new(Forwarder::new(upstreams));
        registry.register(
            "ztunnel_dns_upstream_resends_withheld",
            "Resends of unanswered forwarded DNS queries not made: the node's budget of upstream sockets for resends was taken",
            forwarder.resends_withheld(),
        );
        Arc::new(Self {
            forwarder,
            names,
            in_flight: Arc::default(),
            pods_in_flight: Mutex::default(),
            metrics: Metrics::register(registry),
            log: RateLimitedLog::new(),
            settings,
            drain,
        })
    }

    /// Whether the pod's DNS is captured: `--dns-capture` and Istio's
    /// annotation on its Pod or Namespace.
    pub fn captures(&self, pod: &Workload, state: &State) -> bool {
        let off = |annotations: Option<&std::collections::BTreeMap<String, String>>| {
            annotations
                .and_then(|a| a.get(DNS_CAPTURE_ANNOTATION))
                .is_some_and(|v| v == "false")
        };
        let snapshot = &state.snapshot;
        self.settings.capture
            && !off(snapshot
                .pods
                .get(&(pod.namespace.clone(), pod.name.clone()))
                .map(|p| &p.annotations))
            && !off(snapshot
                .namespaces
                .get(&pod.namespace)
                .map(|n| &n.annotations))
    }

    /// A place for one forwarded query of `pod`, or why there is none.
    fn admit(&self, pod: Ipv4Addr) -> Result<InFlight, &'static str> {
        let pod_count = {
            let mut pods = self.pods_in_flight.lock().expect("not poisoned");
            if pods.len() > 4096 {
                // Pods gone: their counters are idle.
                pods.retain(|_, n| n.load(Ordering::Acquire) > 0);
            }
            pods.entry(pod).or_default().clone()
        };
        let node =
            Taken::take(&self.in_flight, self.settings.limits.per_node).ok_or("node_limit")?;
        let pod = Taken::take(&pod_count, self.settings.limits.per_pod).ok_or("pod_limit")?;
        Ok(InFlight(node, pod))
    }

    fn dropped(&self, pod: &Workload, reason: &'static str) {
        self.metrics
            .dropped
            .get_or_create(&DroppedLabels { reason })
            .inc();
        self.log.warn(|suppressed| {
            tracing::warn!(pod = %pod.name, namespace = %pod.namespace, reason, suppressed, "DNS query dropped")
        });
    }

    /// Reads one query of `pod`: answers it from the mesh, or readies it for the
    /// upstream, or drops it.
    pub fn prepare(&self, pod: &Workload, bytes: &[u8], protocol: Protocol) -> Prepared {
        let started = Instant::now();
        let request = match Message::from_vec(bytes) {
            Ok(m) if m.metadata.message_type == MessageType::Query => m,
            _ => {
                self.dropped(pod, "malformed");
                return Prepared::Drop;
            }
        };
        let (query, labels) = match request.queries.as_slice() {
            [query] if request.metadata.op_code == OpCode::Query => {
                (query.clone(), self.labels(pod, query, protocol))
            }
            // Not one question, or not a query (an update, a notify): refused
            // with the code that says which, and counted.
            _ => {
                self.dropped(pod, "malformed");
                let code = match request.metadata.op_code {
                    OpCode::Query => ResponseCode::FormErr,
                    _ => ResponseCode::NotImp,
                };
                return Prepared::Reply(encode(reply(&request, code), protocol, &request));
            }
        };
        self.metrics.requests.get_or_create(&labels).inc();
        let name = query.name().to_ascii();
        let answer = match query.query_class() {
            DNSClass::IN => self.names.borrow().resolve(&name, &pod.namespace),
            _ => Answer::NotMesh,
        };
        let response = match answer {
            Answer::NotMesh => {
                return match self.admit(pod.ip) {
                    Ok(in_flight) => Prepared::Forward(Box::new(Forward {
                        request,
                        query,
                        labels,
                        started,
                        protocol,
                        _in_flight: in_flight,
                    })),
                    Err(reason) => {
                        self.dropped(pod, reason);
                        Prepared::Drop
                    }
                };
            }
            Answer::NxDomain => authoritative(&request, ResponseCode::NXDomain, Vec::new()),
            Answer::Addresses(ips) => {
                let records = match query.query_type() {
                    RecordType::A | RecordType::ANY => ips
                        .into_iter()
                        .map(|ip| {
                            Record::from_rdata(query.name().clone(), MESH_TTL, RData::A(A(ip)))
                        })
                        .collect(),
                    // The mesh is IPv4-only: AAAA (and any other type) has no data.
                    _ => Vec::new(),
                };
                authoritative(&request, ResponseCode::NoError, records)
            }
        };
        log(
            pod,
            &query,
            "mesh",
            response.metadata.response_code,
            started,
        );
        Prepared::Reply(encode(response, protocol, &request))
    }

    /// Asks the upstream (or the cache) and builds the answer.
    pub async fn forward(&self, pod: &Workload, forward: Box<Forward>) -> Vec<u8> {
        let Forward {
            request,
            query,
            labels,
            started,
            protocol,
            _in_flight,
        } = *forward;
        let lookup = self
            .forwarder
            .lookup(query.name(), query.query_type())
            .await;
        if lookup.asked_upstream {
            self.metrics.upstream_requests.get_or_create(&labels).inc();
            self.metrics
                .upstream_duration
                .get_or_create(&labels)
                .observe(started.elapsed().as_secs_f64());
            if !matches!(
                lookup.answer.code,
                ResponseCode::NoError | ResponseCode::NXDomain
            ) {
                self.metrics.upstream_failures.get_or_create(&labels).inc();
            }
        }
        let (answers, authorities) = lookup.answer.aged(Instant::now());
        let mut response = reply(&request, lookup.answer.code);
        response.metadata.recursion_available = true;
        response.add_answers(answers);
        response.add_authorities(authorities);
        log(
            pod,
            &query,
            lookup.source.as_str(),
            lookup.answer.code,
            started,
        );
        encode(response, protocol, &request)
    }

    fn labels(&self, pod: &Workload, query: &Query, protocol: Protocol) -> RequestLabels {
        RequestLabels {
            // Lower case, as Istio's ztunnel labels it ("a", "aaaa").
            request_query_type: query.query_type().to_string().to_lowercase(),
            request_protocol: protocol.as_str(),
            source_canonical_service: pod.workload_name().to_owned(),
            source_canonical_revision: [
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ]
            .iter()
            .find_map(|l| pod.labels.get(*l))
            .cloned()
            .unwrap_or_else(|| "latest".into()),
        }
    }
}

/// The debug line per query: who asked what, where the answer came from, how fast.
fn log(pod: &Workload, query: &Query, source: &str, code: ResponseCode, started: Instant) {
    tracing::debug!(
        target: "dns",
        pod = %format!("{}/{}", pod.namespace, pod.name),
        name = %query.name(),
        r#type = %query.query_type(),
        source,
        code = %code,
        latency_us = started.elapsed().as_micros() as u64,
        "dns query"
    );
}

/// The response skeleton: the request's ID, opcode, RD bit and question.
fn reply(request: &Message, code: ResponseCode) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.response_code = code;
    response.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD);
        response.set_edns(edns);
    }
    response
}

/// An answer of the mesh's own: authoritative, and recursion available (the
/// proxy forwards everything else).
fn authoritative(request: &Message, code: ResponseCode, answers: Vec<Record>) -> Message {
    let mut response = reply(request, code);
    response.metadata.authoritative = true;
    response.metadata.recursion_available = true;
    response.add_answers(answers);
    response
}

/// The response's bytes; over UDP, truncated (TC, question only) when it exceeds
/// what the client said it takes (512 bytes without EDNS), so it asks over TCP.
fn encode(response: Message, protocol: Protocol, request: &Message) -> Vec<u8> {
    let bytes = match response.to_vec() {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::debug!("DNS answer not encodable: {e}");
            return reply(request, ResponseCode::ServFail)
                .to_vec()
                .unwrap_or_default();
        }
    };
    let limit = match (&protocol, &request.edns) {
        (Protocol::Tcp, _) => usize::from(u16::MAX),
        (Protocol::Udp, Some(edns)) => usize::from(edns.max_payload().clamp(512, MAX_UDP_PAYLOAD)),
        (Protocol::Udp, None) => 512,
    };
    if bytes.len() <= limit {
        return bytes;
    }
    response.truncate().to_vec().unwrap_or_default()
}

/// Serves the pod's captured UDP/53: answers from the mesh at once, forwarded
/// queries on a task each (bounded by the in-flight caps).
pub async fn serve_udp(dns: Arc<Dns>, pod: Arc<Workload>, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) => {
                tracing::debug!(pod = %pod.name, "DNS receive failed: {e}");
                continue;
            }
        };
        match dns.prepare(&pod, &buf[..n], Protocol::Udp) {
            Prepared::Drop => {}
            Prepared::Reply(answer) => {
                let _ = socket.send_to(&answer, client).await;
            }
            Prepared::Forward(forward) => {
                let (dns2, pod, socket) = (dns.clone(), pod.clone(), socket.clone());
                // Tracked: a drain waits for the answer (the socket outlives
                // this loop, which ends when the pod's listeners close).
                dns.drain.spawn(async move {
                    let dns = dns2;
                    let answer = dns.forward(&pod, forward).await;
                    let _ = socket.send_to(&answer, client).await;
                });
            }
        }
    }
}

/// Serves DNS over one captured TCP/53 connection (RFC 1035 4.2.2: each message
/// after its 2-byte length), one query at a time, until the client closes or
/// idles.
pub async fn serve_tcp<S>(dns: Arc<Dns>, pod: Arc<Workload>, mut stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    loop {
        // Draining: the query being answered was the last.
        let len = tokio::select! {
            len = tokio::time::timeout(TCP_IDLE, stream.read_u16()) => match len {
                Ok(Ok(len)) => usize::from(len),
                _ => return,
            },
            () = dns.drain.signaled() => return,
        };
        buf.resize(len, 0);
        if !matches!(
            tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let answer = match dns.prepare(&pod, &buf, Protocol::Tcp) {
            Prepared::Drop => return,
            Prepared::Reply(answer) => answer,
            Prepared::Forward(forward) => dns.forward(&pod, forward).await,
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&answer);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// One unit of a count, given back on drop.
struct Taken(Arc<AtomicUsize>);

impl Taken {
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A forwarded query's place under the node's and its pod's caps.
pub struct InFlight(#[allow(dead_code)] Taken, #[allow(dead_code)] Taken);

/// The nameservers of the node's resolv.conf.
fn resolv_conf_nameservers() -> Vec<SocketAddr> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::{rdata::TXT, Name};

    fn dns(names: MeshNames) -> Dns {
        Dns {
            settings: Settings {
                upstreams: Vec::new(),
                cluster_domain: "cluster.local".into(),
                limits: Limits::default(),
                capture: true,
            },
            names: watch::channel(Arc::new(names)).1,
            forwarder: Arc::new(Forwarder::new(Vec::new())),
            in_flight: Arc::default(),
            pods_in_flight: Mutex::default(),
            metrics: Metrics::register(&mut Registry::default()),
            log: RateLimitedLog::new(),
            drain: Drain::new(),
        }
    }

    fn pod(namespace: &str) -> Workload {
        let identity = crate::identity::Identity::new("cluster.local", namespace, "sa").unwrap();
        let ip = Ipv4Addr::new(10, 0, 0, 9);
        Workload {
            pod: std::sync::Arc::new(crate::config::Pod {
                uid: None,
                name: "client".into(),
                namespace: namespace.into(),
                labels: Default::default(),
                annotations: Default::default(),
                service_account: "sa".into(),
                node_name: "n".into(),
                ip: Some(ip),
                netns: None,
                cgroup: None,
            }),
            ip,
            identity,
            captured: true,
            waypoint: None,
        }
    }

    fn ask(dns: &Dns, pod: &Workload, name: &str, qtype: RecordType, edns: bool) -> Prepared {
        let mut request = Message::new(7, MessageType::Query, OpCode::Query);
        request.metadata.recursion_desired = true;
        request.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if edns {
            request.set_edns(Edns::new());
        }
        dns.prepare(pod, &request.to_vec().unwrap(), Protocol::Udp)
    }

    fn reply_of(prepared: Prepared) -> Message {
        match prepared {
            Prepared::Reply(bytes) => Message::from_vec(&bytes).unwrap(),
            _ => panic!("not answered at once"),
        }
    }

    #[tokio::test]
    async fn a_mesh_name_is_answered_authoritatively_with_ttl_30_and_the_asked_case() {
        let mut names = MeshNames::new("cluster.local");
        names.add_service("demo", "server", vec![Ipv4Addr::new(10, 96, 0, 50)]);
        let dns = dns(names);
        let answer = reply_of(ask(&dns, &pod("demo"), "Server.", RecordType::A, false));
        assert_eq!(answer.metadata.id, 7);
        assert!(answer.metadata.authoritative && answer.metadata.recursion_desired);
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert_eq!(answer.answers.len(), 1);
        assert_eq!(answer.answers[0].ttl, MESH_TTL);
        assert_eq!(answer.answers[0].name.to_ascii(), "Server.");
        let answer = reply_of(ask(
            &dns,
            &pod("demo"),
            "server.demo.svc.cluster.local.",
            RecordType::AAAA,
            true,
        ));
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(answer.answers.is_empty() && answer.edns.is_some());
        let answer = reply_of(ask(
            &dns,
            &pod("demo"),
            "nope.demo.svc.cluster.local.",
            RecordType::A,
            false,
        ));
        assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
        // Outside the mesh: for the forwarder (in flight, under the caps).
        assert!(matches!(
            ask(&dns, &pod("demo"), "example.com.", RecordType::A, false),
            Prepared::Forward(_)
        ));
    }

    #[tokio::test]
    async fn what_is_not_a_dns_query_is_dropped_and_counted() {
        let dns = dns(MeshNames::new("cluster.local"));
        for garbage in [&b"hello"[..], &[0u8; 12][..]] {
            // 12 zero bytes: a header with no question.
            let prepared = dns.prepare(&pod("demo"), garbage, Protocol::Udp);
            assert!(!matches!(prepared, Prepared::Forward(_)));
        }
        let dropped = dns
            .metrics
            .dropped
            .get_or_create(&DroppedLabels {
                reason: "malformed",
            })
            .get();
        assert_eq!(dropped, 2);
    }

    #[test]
    fn an_answer_too_big_for_the_client_is_truncated_over_udp_only() {
        let mut request = Message::new(9, MessageType::Query, OpCode::Query);
        request.add_query(Query::query(
            Name::from_ascii("big.test.").unwrap(),
            RecordType::TXT,
        ));
        let mut response = reply(&request, ResponseCode::NoError);
        for _ in 0..12 {
            response.add_answer(Record::from_rdata(
                Name::from_ascii("big.test.").unwrap(),
                60,
                RData::TXT(TXT::new(vec!["x".repeat(60)])),
            ));
        }
        let udp = Message::from_vec(&encode(response.clone(), Protocol::Udp, &request)).unwrap();
        assert!(udp.metadata.truncation && udp.answers.is_empty());
        assert_eq!((udp.metadata.id, udp.queries.len()), (9, 1));
        let tcp = Message::from_vec(&encode(response.clone(), Protocol::Tcp, &request)).unwrap();
        assert!(!tcp.metadata.truncation && tcp.answers.len() == 12);
        // A client that takes 1232 bytes (EDNS) gets it whole over UDP.
        request.set_edns(Edns::new().set_max_payload(1232).clone());
        let udp = Message::from_vec(&encode(response, Protocol::Udp, &request)).unwrap();
        assert!(!udp.metadata.truncation && udp.answers.len() == 12);
    }
}
