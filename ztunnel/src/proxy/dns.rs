//! DNS from enrolled pods (captured UDP/53): forwarded to the node's resolver, the
//! answer relayed back (the redirection makes it seem to come from the server the
//! pod asked).
//!
//! Bounded: a query in flight holds a socket and a task until answered or timed
//! out, so at most [`Limits::per_node`] are in flight on the node and
//! [`Limits::per_pod`] for one pod; a query over either is dropped and counted (the
//! client retries, as it would after any lost datagram). Each query goes out on
//! its own connected socket: only the server asked can answer it.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::net::UdpSocket;

use crate::{accept::RateLimitedLog, state::Workload};

const TIMEOUT: Duration = Duration::from_secs(5);

/// In-flight caps: well under the tunnel's file-descriptor limit.
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DroppedLabels {
    /// "node_limit", "pod_limit".
    reason: &'static str,
}

/// The node's DNS forwarding: where to, the node-wide count and the metrics.
pub struct Forwarder {
    /// The server asked (default: the first nameserver of the node's resolv.conf).
    upstream: Option<SocketAddr>,
    limits: Limits,
    in_flight: Arc<AtomicUsize>,
    dropped: Family<DroppedLabels, Counter>,
    forwarded: Counter,
    log: RateLimitedLog,
}

impl Forwarder {
    pub fn new(upstream: Option<SocketAddr>, limits: Limits, registry: &mut Registry) -> Self {
        let forwarder = Self {
            upstream,
            limits,
            in_flight: Arc::default(),
            dropped: Family::default(),
            forwarded: Counter::default(),
            log: RateLimitedLog::new(),
        };
        registry.register(
            "ztunnel_dns_queries_dropped",
            "DNS queries dropped because too many were in flight (node or pod limit)",
            forwarder.dropped.clone(),
        );
        registry.register(
            "ztunnel_dns_queries_forwarded",
            "DNS queries forwarded upstream",
            forwarder.forwarded.clone(),
        );
        forwarder
    }

    fn upstream(&self) -> Option<SocketAddr> {
        self.upstream.or_else(resolv_conf_nameserver)
    }

    /// A place for one query of a pod that has `pod_in_flight` queries out, or why
    /// there is none.
    fn admit(&self, pod_in_flight: &Arc<AtomicUsize>) -> Result<InFlight, &'static str> {
        let node = Taken::take(&self.in_flight, self.limits.per_node).ok_or("node_limit")?;
        let pod = Taken::take(pod_in_flight, self.limits.per_pod).ok_or("pod_limit")?;
        Ok(InFlight(node, pod))
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

/// A query's place under the node's and its pod's caps.
struct InFlight(#[allow(dead_code)] Taken, #[allow(dead_code)] Taken);

/// The first nameserver of the node's resolv.conf.
fn resolv_conf_nameserver() -> Option<SocketAddr> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
}

pub async fn serve(forwarder: Arc<Forwarder>, pod: Arc<Workload>, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let pod_in_flight = Arc::new(AtomicUsize::new(0));
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) => {
                tracing::debug!(pod = %pod.name, "DNS receive failed: {e}");
                continue;
            }
        };
        let in_flight = match forwarder.admit(&pod_in_flight) {
            Ok(in_flight) => in_flight,
            Err(reason) => {
                forwarder
                    .dropped
                    .get_or_create(&DroppedLabels { reason })
                    .inc();
                forwarder.log.warn(|suppressed| {
                    tracing::warn!(pod = %pod.name, namespace = %pod.namespace, reason, suppressed, "DNS query dropped: too many in flight")
                });
                continue;
            }
        };
        let Some(server) = forwarder.upstream() else {
            tracing::debug!("DNS: the node has no nameserver");
            continue;
        };
        forwarder.forwarded.inc();
        let query = buf[..n].to_vec();
        let socket = socket.clone();
        tokio::spawn(async move {
            let result = async {
                let answer = forward(&query, server).await?;
                socket.send_to(&answer, client).await?;
                Ok::<_, std::io::Error>(())
            }
            .await;
            if let Err(e) = result {
                tracing::debug!(%server, "DNS forward failed: {e}");
            }
            drop(in_flight);
        });
    }
}

/// Asks `server` on a socket connected to it (the kernel drops datagrams from any
/// other address) and returns the first answer carrying the query's ID.
async fn forward(query: &[u8], server: SocketAddr) -> std::io::Result<Vec<u8>> {
    let out = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .await?;
    out.connect(server).await?;
    out.send(query).await?;
    let mut answer = vec![0u8; 4096];
    tokio::time::timeout(TIMEOUT, async {
        loop {
            let n = out.recv(&mut answer).await?;
            if n >= 2 && query.len() >= 2 && answer[..2] == query[..2] {
                answer.truncate(n);
                return Ok(answer);
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_server_asked_can_answer() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let spoofer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, asker) = server.recv_from(&mut buf).await.unwrap();
            // Someone else answers first, to the port the query came from; then a
            // reply from the server with the wrong ID; then the right one.
            spoofer.send_to(b"\x12\x34forged", asker).await.unwrap();
            server.send_to(b"\x99\x99wrong-id", asker).await.unwrap();
            let mut answer = buf[..2].to_vec();
            answer.extend_from_slice(b"genuine");
            assert_eq!(&buf[..n], b"\x12\x34query");
            server.send_to(&answer, asker).await.unwrap();
        });
        let answer = forward(b"\x12\x34query", server_addr).await.unwrap();
        assert_eq!(answer, b"\x12\x34genuine");
    }

    #[test]
    fn queries_in_flight_are_capped_per_pod_and_per_node() {
        let forwarder = Forwarder::new(
            None,
            Limits {
                per_node: 3,
                per_pod: 2,
            },
            &mut Registry::default(),
        );
        let (pod_a, pod_b) = (Arc::default(), Arc::default());
        let a1 = forwarder.admit(&pod_a).unwrap();
        let _a2 = forwarder.admit(&pod_a).unwrap();
        assert_eq!(forwarder.admit(&pod_a).err(), Some("pod_limit"));
        let _b1 = forwarder.admit(&pod_b).unwrap();
        assert_eq!(forwarder.admit(&pod_b).err(), Some("node_limit"));
        drop(a1);
        let _b2 = forwarder.admit(&pod_b).unwrap();
        assert_eq!(forwarder.in_flight.load(Ordering::Acquire), 3);
    }
}
