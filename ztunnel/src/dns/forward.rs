//! Forwarding: the names the mesh does not answer go to the upstream servers
//! through hickory-resolver (UDP, TCP when an answer comes back truncated, EDNS).
//! In front of it, one map is both the in-flight de-duplication (identical
//! queries share one upstream request) and the cache (answers kept for their TTL),
//! so every answer says whether it came from upstream or from the cache.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use hickory_resolver::{
    config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts},
    net::{
        runtime::{DnsUdpSocket, RuntimeProvider, TokioHandle, TokioRuntimeProvider, TokioTime},
        DnsError, NetError,
    },
    proto::{
        op::ResponseCode,
        rr::{Name, Record, RecordType},
    },
    Resolver,
};
use prometheus_client::metrics::counter::Counter;

/// How long one upstream attempt may take, and how many are made.
const TIMEOUT: Duration = Duration::from_secs(2);
const ATTEMPTS: usize = 2;
/// Answers kept at most (each for its TTL).
const CACHE_ENTRIES: usize = 4096;

/// What the upstream said, ready to become a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub code: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    /// When it stops being valid (none: not cached).
    pub valid_until: Option<Instant>,
}

impl Upstream {
    fn failure(code: ResponseCode) -> Self {
        Self {
            code,
            answers: Vec::new(),
            authorities: Vec::new(),
            valid_until: None,
        }
    }

    /// The records with their TTLs counted down to what is left at `now`.
    pub fn aged(&self, now: Instant) -> (Vec<Record>, Vec<Record>) {
        let left = self
            .valid_until
            .map(|t| t.saturating_duration_since(now).as_secs() as u32);
        let age = |records: &[Record]| {
            records
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    if let Some(left) = left {
                        r.ttl = r.ttl.min(left);
                    }
                    r
                })
                .collect()
        };
        (age(&self.answers), age(&self.authorities))
    }
}

/// Where an answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// This query asked the upstream (or shared a request in flight).
    Upstream,
    Cache,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Upstream => "upstream",
            Source::Cache => "cache",
        }
    }
}

type Key = (Name, RecordType);

#[derive(Default)]
struct Slots {
    map: HashMap<Key, Slot>,
    /// When a full map may next be swept of expired answers (a sweep walks it all:
    /// not on every insert).
    next_sweep: Option<Instant>,
}
type Pending = Shared<BoxFuture<'static, Arc<Upstream>>>;

enum Slot {
    InFlight(Pending),
    Cached(Arc<Upstream>),
}

/// The node's forwarder: one resolver and one cache for every pod.
pub struct Forwarder {
    resolver: Resolver<ConnectedUdp>,
    sockets: Arc<SocketCounts>,
    slots: Mutex<Slots>,
    pub upstreams: Vec<SocketAddr>,
}

/// What one lookup did: the answer, where from, and whether it asked upstream
/// itself (then `elapsed` is the upstream's time).
pub struct Lookup {
    pub answer: Arc<Upstream>,
    pub source: Source,
    pub asked_upstream: bool,
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>) -> Self {
        Self::with_resend_cap(upstreams, RETRANSMIT_SOCKETS)
    }

    fn with_resend_cap(upstreams: Vec<SocketAddr>, resend_cap: usize) -> Self {
        let servers = upstreams
            .iter()
            .map(|upstream| {
                let mut server = NameServerConfig::udp_and_tcp(upstream.ip());
                for connection in &mut server.connections {
                    connection.port = upstream.port();
                }
                server
            })
            .collect();
        let config = ResolverConfig::from_name_servers(servers);
        let mut options = ResolverOpts::default();
        options.timeout = TIMEOUT;
        options.attempts = ATTEMPTS;
        options.edns0 = true;
        // The answer as the upstream gave it: CNAMEs included.
        options.preserve_intermediates = true;
        // The node's /etc/hosts is not the pods'.
        options.use_hosts_file = ResolveHosts::Never;
        // Our map in front caches; hickory's would hide whether upstream was asked.
        options.cache_size = 0;
        let provider = ConnectedUdp::new(resend_cap);
        let sockets = provider.sockets.clone();
        let resolver = Resolver::builder_with_config(config, provider)
            .with_options(options)
            .build()
            .expect("a resolver without TLS or DNSSEC always builds");
        Self {
            resolver,
            sockets,
            slots: Mutex::default(),
            upstreams,
        }
    }

    /// Resends hickory would have made but the socket budget withheld.
    pub fn resends_withheld(&self) -> Counter {
        self.sockets.withheld.clone()
    }

    /// The answer for (`name`, `qtype`): cached, shared with an identical query
    /// in flight, or asked upstream.
    pub async fn lookup(self: &Arc<Self>, name: &Name, qtype: RecordType) -> Lookup {
        let key = (name.to_lowercase(), qtype);
        let (pending, asked_upstream) = {
            let mut slots = self.slots.lock().expect("not poisoned");
            match slots.map.get(&key) {
                Some(Slot::Cached(answer))
                    if answer.valid_until.is_some_and(|t| t > Instant::now()) =>
                {
                    return Lookup {
                        answer: answer.clone(),
                        source: Source::Cache,
                        asked_upstream: false,
                    };
                }
                Some(Slot::InFlight(pending)) => (pending.clone(), false),
                _ => {
                    let pending = self.ask(key.clone());
                    slots.map.insert(key, Slot::InFlight(pending.clone()));
                    (pending, true)
                }
            }
        };
        Lookup {
            answer: pending.await,
            source: Source::Upstream,
            asked_upstream,
        }
    }

    /// Starts the upstream request on a task of its own (it completes, and frees
    /// its slot, even if every asker is gone).
    fn ask(self: &Arc<Self>, key: Key) -> Pending {
        let this = self.clone();
        let task = tokio::spawn(REQUEST_SOCKETS.scope(Arc::default(), async move {
            let answer = Arc::new(this.resolve(&key).await);
            this.settle(key, &answer);
            answer
        }));
        async move {
            task.await
                .unwrap_or_else(|_| Arc::new(Upstream::failure(ResponseCode::ServFail)))
        }
        .boxed()
        .shared()
    }

    /// The request's slot becomes the cached answer, or is freed. A full cache
    /// drops its expired answers (at most once a second), else any one answer.
    fn settle(&self, key: Key, answer: &Arc<Upstream>) {
        let mut slots = self.slots.lock().expect("not poisoned");
        let now = Instant::now();
        if answer.valid_until.is_none_or(|t| t <= now) {
            slots.map.remove(&key);
            return;
        }
        if slots.map.len() >= CACHE_ENTRIES && slots.next_sweep.is_none_or(|t| t <= now) {
            slots.map.retain(|_, slot| match slot {
                Slot::InFlight(_) => true,
                Slot::Cached(a) => a.valid_until.is_some_and(|t| t > now),
            });
            slots.next_sweep = Some(now + Duration::from_secs(1));
        }
        if slots.map.len() >= CACHE_ENTRIES {
            let evicted = slots
                .map
                .iter()
                .find(|(k, slot)| **k != key && matches!(slot, Slot::Cached(_)))
                .map(|(k, _)| k.clone());
            if let Some(evicted) = evicted {
                slots.map.remove(&evicted);
            }
        }
        slots.map.insert(key, Slot::Cached(answer.clone()));
    }

    async fn resolve(&self, (name, qtype): &Key) -> Upstream {
        match self.resolver.lookup(name.clone(), *qtype).await {
            Ok(lookup) => {
                let message = lookup.message();
                Upstream {
                    code: ResponseCode::NoError,
                    answers: message.answers.clone(),
                    authorities: message.authorities.clone(),
                    valid_until: Some(lookup.valid_until()),
                }
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(none))) => {
                // A negative answer is cached for its SOA's negative TTL (RFC 2308);
                // without an SOA it is not cached.
                let valid_until = none
                    .negative_ttl
                    .map(|ttl| Instant::now() + Duration::from_secs(ttl.into()));
                Upstream {
                    code: none.response_code,
                    answers: Vec::new(),
                    authorities: none
                        .soa
                        .map(|soa| vec![soa.into_record_of_rdata()])
                        .unwrap_or_default(),
                    valid_until,
                }
            }
            Err(NetError::Dns(DnsError::ResponseCode(code))) => Upstream::failure(code),
            Err(e) => {
                tracing::debug!(%name, %qtype, "DNS upstream failed: {e}");
                Upstream::failure(ResponseCode::ServFail)
            }
        }
    }
}

/// Upstream UDP sockets beyond each request's first, node-wide: hickory resends an
/// unanswered UDP query on a new socket (after at least 333 ms, at most twice), so
/// without a cap a query would hold up to three sockets and the in-flight caps
/// would not bound the descriptors. Over it, a resend is withheld: the query
/// still waits for its first socket's answer, then hickory's next attempt.
const RETRANSMIT_SOCKETS: usize = 64;

tokio::task_local! {
    /// How many sockets the upstream request on this task holds.
    static REQUEST_SOCKETS: Arc<AtomicUsize>;
}

/// Tokio's runtime for hickory, but each UDP socket is connected to the server it
/// asks (the kernel drops datagrams from anyone else; hickory checks the source
/// too: this makes it so before a byte is read), and a request's resends share a
/// node-wide budget of sockets.
#[derive(Clone)]
pub struct ConnectedUdp {
    tokio: TokioRuntimeProvider,
    sockets: Arc<SocketCounts>,
}

/// The upstream sockets open, of them the resends, and the resends withheld.
struct SocketCounts {
    open: AtomicUsize,
    resends: AtomicUsize,
    resend_cap: usize,
    withheld: Counter,
    #[cfg(test)]
    peak: AtomicUsize,
}

impl ConnectedUdp {
    fn new(resend_cap: usize) -> Self {
        Self {
            tokio: TokioRuntimeProvider::default(),
            sockets: Arc::new(SocketCounts {
                open: AtomicUsize::new(0),
                resends: AtomicUsize::new(0),
                resend_cap,
                withheld: Counter::default(),
                #[cfg(test)]
                peak: AtomicUsize::new(0),
            }),
        }
    }

    /// A place for another socket of the request on this task: its first always
    /// (the in-flight caps bound those), a resend while the budget lasts.
    fn admit(&self) -> Option<SocketSlot> {
        let request = REQUEST_SOCKETS.try_with(Arc::clone).ok();
        let first = request
            .as_ref()
            .is_none_or(|held| held.load(Ordering::Acquire) == 0);
        let resend = !first;
        if resend {
            let counts = &self.sockets;
            let taken = counts
                .resends
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < counts.resend_cap).then_some(n + 1)
                });
            if taken.is_err() {
                counts.withheld.inc();
                return None;
            }
        }
        if let Some(held) = &request {
            held.fetch_add(1, Ordering::AcqRel);
        }
        let _open = self.sockets.open.fetch_add(1, Ordering::AcqRel) + 1;
        #[cfg(test)]
        self.sockets.peak.fetch_max(_open, Ordering::AcqRel);
        Some(SocketSlot {
            counts: self.sockets.clone(),
            request,
            resend,
        })
    }
}

/// One upstream socket's place in the counts, given back on drop.
struct SocketSlot {
    counts: Arc<SocketCounts>,
    request: Option<Arc<AtomicUsize>>,
    resend: bool,
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.counts.open.fetch_sub(1, Ordering::AcqRel);
        if self.resend {
            self.counts.resends.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(held) = &self.request {
            held.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// An upstream UDP socket with its place in the counts.
pub struct UpstreamUdp {
    socket: tokio::net::UdpSocket,
    _slot: SocketSlot,
}

impl DnsUdpSocket for UpstreamUdp {
    type Time = TokioTime;

    fn poll_recv_from(
        &self,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<io::Result<(usize, SocketAddr)>> {
        DnsUdpSocket::poll_recv_from(&self.socket, cx, buf)
    }

    fn poll_send_to(
        &self,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
        target: SocketAddr,
    ) -> std::task::Poll<io::Result<usize>> {
        DnsUdpSocket::poll_send_to(&self.socket, cx, buf, target)
    }
}

impl RuntimeProvider for ConnectedUdp {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = UpstreamUdp;
    type Tcp = <TokioRuntimeProvider as RuntimeProvider>::Tcp;

    fn create_handle(&self) -> Self::Handle {
        self.tokio.create_handle()
    }

    fn connect_tcp(
        &self,
        server_addr: SocketAddr,
        bind_addr: Option<SocketAddr>,
        timeout: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Tcp>>>> {
        self.tokio.connect_tcp(server_addr, bind_addr, timeout)
    }

    fn bind_udp(
        &self,
        local_addr: SocketAddr,
        server_addr: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Udp>>>> {
        let slot = self.admit();
        Box::pin(async move {
            // A withheld resend never starts (an error would end the whole
            // request, answer or not): the request's other sockets go on.
            let Some(slot) = slot else {
                return std::future::pending().await;
            };
            let socket = tokio::net::UdpSocket::bind(local_addr).await?;
            socket.connect(server_addr).await?;
            Ok(UpstreamUdp {
                socket,
                _slot: slot,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::{
        op::{Message, MessageType, OpCode},
        rr::{rdata::A, RData},
    };
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A UDP upstream answering A queries with 192.0.2.1 (TTL 60), after `delay`.
    async fn upstream(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
        let socket = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = socket.local_addr().unwrap();
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                counter.fetch_add(1, Ordering::SeqCst);
                let query = Message::from_vec(&buf[..n]).unwrap();
                let socket = socket.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let mut answer = Message::response(query.metadata.id, OpCode::Query);
                    answer.metadata.message_type = MessageType::Response;
                    answer.metadata.recursion_available = true;
                    let q = query.queries[0].clone();
                    answer.add_answer(Record::from_rdata(
                        q.name().clone(),
                        60,
                        RData::A(A("192.0.2.1".parse().unwrap())),
                    ));
                    answer.add_query(q);
                    let _ = socket.send_to(&answer.to_vec().unwrap(), from).await;
                });
            }
        });
        (addr, asked)
    }

    #[tokio::test]
    async fn identical_queries_in_flight_share_one_upstream_request_then_the_cache() {
        let (addr, asked) = upstream(Duration::from_millis(200)).await;
        let forwarder = Arc::new(Forwarder::new(vec![addr]));
        let name = Name::from_ascii("shared.example.").unwrap();
        let lookups = (0..20).map(|_| {
            let forwarder = forwarder.clone();
            let name = name.clone();
            tokio::spawn(async move { forwarder.lookup(&name, RecordType::A).await })
        });
        let results = futures_util::future::join_all(lookups).await;
        let askers = results
            .iter()
            .filter(|r| r.as_ref().unwrap().asked_upstream)
            .count();
        assert_eq!(askers, 1);
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        for r in results {
            let r = r.unwrap();
            assert_eq!(r.answer.code, ResponseCode::NoError);
            assert_eq!(r.answer.answers.len(), 1);
        }
        let cached = forwarder.lookup(&name, RecordType::A).await;
        assert_eq!(cached.source, Source::Cache);
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        // Another type of the same name is another question.
        let other = forwarder.lookup(&name, RecordType::AAAA).await;
        assert_eq!(other.source, Source::Upstream);
    }

    #[tokio::test]
    async fn the_cache_stays_bounded_and_keeps_the_newest_answer() {
        let forwarder = Forwarder::new(Vec::new());
        let answer = Arc::new(Upstream {
            valid_until: Some(Instant::now() + Duration::from_secs(60)),
            ..Upstream::failure(ResponseCode::NoError)
        });
        let key = |i: usize| {
            (
                Name::from_ascii(format!("n{i}.example.")).unwrap(),
                RecordType::A,
            )
        };
        for i in 0..CACHE_ENTRIES + 100 {
            forwarder.settle(key(i), &answer);
        }
        let slots = forwarder.slots.lock().unwrap();
        assert_eq!(slots.map.len(), CACHE_ENTRIES);
        assert!(slots.map.contains_key(&key(CACHE_ENTRIES + 99)));
    }

    #[tokio::test]
    async fn a_silent_upstream_is_a_servfail_within_the_timeouts() {
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let forwarder = Arc::new(Forwarder::new(vec![addr]));
        let started = Instant::now();
        let r = forwarder
            .lookup(&Name::from_ascii("silent.example.").unwrap(), RecordType::A)
            .await;
        assert_eq!(r.answer.code, ResponseCode::ServFail);
        assert!(started.elapsed() < TIMEOUT * (ATTEMPTS as u32 + 2));
        drop(silent);
    }

    #[tokio::test]
    async fn resends_to_a_silent_upstream_stay_within_the_socket_budget() {
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let forwarder = Arc::new(Forwarder::with_resend_cap(
            vec![silent.local_addr().unwrap()],
            2,
        ));
        // Eight requests in flight; each would resend twice on a socket of its own.
        let lookups = (0..8).map(|i| {
            let forwarder = forwarder.clone();
            let name = Name::from_ascii(format!("q{i}.silent.example.")).unwrap();
            tokio::spawn(async move { forwarder.lookup(&name, RecordType::A).await })
        });
        for r in futures_util::future::join_all(lookups).await {
            assert_eq!(r.unwrap().answer.code, ResponseCode::ServFail);
        }
        let sockets = &forwarder.sockets;
        assert_eq!(
            sockets.peak.load(Ordering::Acquire),
            8 + 2,
            "each request's first socket, and the 2 resends the budget allows"
        );
        assert!(
            sockets.withheld.get() > 0,
            "the other resends were withheld"
        );
        assert_eq!(sockets.open.load(Ordering::Acquire), 0, "all given back");
        assert_eq!(sockets.resends.load(Ordering::Acquire), 0);
        drop(silent);
    }

    #[tokio::test]
    async fn only_the_server_asked_can_answer() {
        // A spoofer answers first, to every port the query could come from.
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let spoofer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let (n, asker) = server.recv_from(&mut buf).await.unwrap();
            let query = Message::from_vec(&buf[..n]).unwrap();
            let answer = |ip: &str| {
                let mut m = Message::response(query.metadata.id, OpCode::Query);
                let q = query.queries[0].clone();
                m.add_answer(Record::from_rdata(
                    q.name().clone(),
                    60,
                    RData::A(A(ip.parse().unwrap())),
                ));
                m.add_query(q);
                m.to_vec().unwrap()
            };
            spoofer
                .send_to(&answer("203.0.113.66"), asker)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            server.send_to(&answer("192.0.2.7"), asker).await.unwrap();
        });
        let forwarder = Arc::new(Forwarder::new(vec![server_addr]));
        let r = forwarder
            .lookup(&Name::from_ascii("spoof.example.").unwrap(), RecordType::A)
            .await;
        let ips: Vec<String> = r
            .answer
            .answers
            .iter()
            .map(|r| r.data.to_string())
            .collect();
        assert_eq!(ips, ["192.0.2.7"]);
    }
}
