//! DNS for the tests: a small upstream server (UDP and TCP, hickory-proto's wire
//! format) with a fixed zone, queries for probes, and running a program in a pod
//! with a resolv.conf of its own (as a Kubernetes pod has one).
//!
//! The upstream's zone, under `test.`:
//! - `whoami.test.` A: the address that asked (tells who forwarded a query);
//! - `big.test.` TXT: about 1,100 bytes, so over UDP (it ignores EDNS, as a small
//!   server may) it answers truncated and the asker must come back over TCP;
//! - `<anything>.silent.test.`: never answered;
//! - `<anything>.slow.test.`: A 192.0.2.10, answered over UDP after [`SLOW`];
//! - any other name in `test.`: A 192.0.2.10, TTL 60;
//! - names outside `test.`: NXDOMAIN with an SOA (negative TTL 5 s).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::Output,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use anyhow::{Context, Result};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        rdata::{A, SOA, TXT},
        Name, RData, Record, RecordType,
    },
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the upstream takes to answer a `.slow.test.` name over UDP: within the
/// forwarder's timeout (2 s), long enough to send the tunnel SIGTERM meanwhile.
pub const SLOW: std::time::Duration = std::time::Duration::from_millis(1500);

/// The address the upstream answers for every other name in `test.`.
pub const TEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// What the upstream saw.
#[derive(Default)]
pub struct Seen {
    pub udp: AtomicUsize,
    pub tcp: AtomicUsize,
    /// Names asked, in order (lowercase, with the final dot).
    pub names: Mutex<Vec<String>>,
}

impl Seen {
    pub fn count(&self, name: &str) -> usize {
        let names = self.names.lock().unwrap();
        names.iter().filter(|n| *n == name).count()
    }
}

/// Starts the upstream in `pod` (one outside the mesh), on a thread of its own:
/// UDP and TCP on port 53 of the pod's address.
pub fn start_upstream(pod: &crate::Pod) -> Result<Arc<Seen>> {
    let ip = pod.ip;
    serve_upstream(pod.in_netns(move || bind_upstream((ip, 53).into()))??)
}

/// UDP and TCP sockets on the same port of `addr` (port 0: any free one).
pub fn bind_upstream(addr: SocketAddr) -> Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let udp = std::net::UdpSocket::bind(addr)?;
    let tcp = std::net::TcpListener::bind(udp.local_addr()?)?;
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    Ok((udp, tcp))
}

/// Serves the zone on the sockets, on a thread of its own.
pub fn serve_upstream(
    (udp, tcp): (std::net::UdpSocket, std::net::TcpListener),
) -> Result<Arc<Seen>> {
    let seen = Arc::new(Seen::default());
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(serve(udp, tcp, seen2));
    });
    Ok(seen)
}

async fn serve(udp: std::net::UdpSocket, tcp: std::net::TcpListener, seen: Arc<Seen>) {
    let udp = Arc::new(tokio::net::UdpSocket::from_std(udp).unwrap());
    let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, peer)) = tcp.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                loop {
                    let Ok(len) = stream.read_u16().await else {
                        return;
                    };
                    let mut buf = vec![0u8; len.into()];
                    if stream.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    seen.tcp.fetch_add(1, Ordering::SeqCst);
                    let Some(answer) = answer(&buf, peer.ip(), None, &seen) else {
                        continue;
                    };
                    let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&answer);
                    if stream.write_all(&framed).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut buf = vec![0u8; 4096];
    while let Ok((n, from)) = udp.recv_from(&mut buf).await {
        seen.udp.fetch_add(1, Ordering::SeqCst);
        if let Some(answer) = answer(&buf[..n], from.ip(), Some(512), &seen) {
            let slow = Message::from_vec(&buf[..n]).is_ok_and(|m| {
                m.queries
                    .first()
                    .is_some_and(|q| q.name().to_lowercase().to_ascii().ends_with(".slow.test."))
            });
            if slow {
                let udp = udp.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(SLOW).await;
                    let _ = udp.send_to(&answer, from).await;
                });
            } else {
                let _ = udp.send_to(&answer, from).await;
            }
        }
    }
}

/// The zone's answer to one query; over UDP, `limit` bytes at most (else
/// truncated).
fn answer(query: &[u8], asker: IpAddr, limit: Option<usize>, seen: &Seen) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let question = request.queries.first()?.clone();
    let name = question.name().to_lowercase().to_ascii();
    seen.names.lock().unwrap().push(name.clone());
    if name.ends_with(".silent.test.") {
        return None;
    }
    let mut response = Message::response(request.metadata.id, OpCode::Query);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_query(question.clone());
    let owner = question.name().clone();
    let qtype = question.query_type();
    if !name.ends_with(".test.") {
        response.metadata.response_code = ResponseCode::NXDomain;
        response.add_authority(Record::from_rdata(
            Name::from_ascii("test.").unwrap(),
            5,
            RData::SOA(SOA::new(
                Name::from_ascii("ns.test.").unwrap(),
                Name::from_ascii("admin.test.").unwrap(),
                1,
                60,
                60,
                60,
                5,
            )),
        ));
    } else if name == "big.test." && qtype == RecordType::TXT {
        for i in 0..15 {
            response.add_answer(Record::from_rdata(
                owner.clone(),
                60,
                RData::TXT(TXT::new(vec![format!("{i:02}-{}", "x".repeat(56))])),
            ));
        }
    } else if qtype == RecordType::A {
        let ip = match (name.as_str(), asker) {
            ("whoami.test.", IpAddr::V4(ip)) => ip,
            _ => TEST_ADDRESS,
        };
        response.add_answer(Record::from_rdata(owner, 60, RData::A(A(ip))));
    }
    let bytes = response.to_vec().ok()?;
    match limit {
        Some(limit) if bytes.len() > limit => response.truncate().to_vec().ok(),
        _ => Some(bytes),
    }
}

/// A query for `name` (`A`, `TXT`, ...) with ID `id`, recursion desired.
pub fn query(name: &str, qtype: &str, id: u16) -> Result<Vec<u8>> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(
        Name::from_ascii(name)?,
        qtype.parse::<RecordType>()?,
    ));
    Ok(message.to_vec()?)
}

/// The ID, response code and A addresses of an answer.
pub fn parse_answer(bytes: &[u8]) -> Result<(u16, ResponseCode, Vec<Ipv4Addr>)> {
    let message = Message::from_vec(bytes)?;
    let ips = message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    Ok((message.metadata.id, message.metadata.response_code, ips))
}

/// A pod's resolv.conf as Kubernetes writes it (`ClusterFirst`): the cluster DNS
/// server, the search list of the pod's namespace, ndots 5.
pub fn pod_resolv_conf(namespace: &str, server: Ipv4Addr) -> String {
    format!(
        "nameserver {server}\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
    )
}

/// Runs `program` in `pod` with `resolv_conf` bind-mounted on /etc/resolv.conf, in
/// a mount namespace of its own (the test's and the host's are untouched).
pub fn run_with_resolv_conf(
    pod: &crate::Pod,
    resolv_conf: &Path,
    program: &str,
    args: &[&str],
) -> Result<Output> {
    let mut full = vec![
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"",
    ];
    let conf = resolv_conf.to_str().context("resolv.conf path")?;
    full.push(conf);
    full.push(program);
    full.extend_from_slice(args);
    pod.run("unshare", full)
}

/// Where a pod's queries go in the tests: any address works (the capture steers
/// UDP and TCP port 53), this is the usual kube-dns one.
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// `ip:53`.
pub fn port53(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::new(ip.into(), 53)
}
