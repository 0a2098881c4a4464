//! Original source: the tunnel connects to the application from the client's
//! address, so the application sees its real peer (as with Istio's ztunnel), with
//! no iptables.
//!
//! Inside the pod's network namespace the delivery socket is `IP_TRANSPARENT`,
//! bound to the client's IP (port 0: the kernel picks a free one, so a port the
//! client happens to use elsewhere never makes the bind fail) and marked
//! [`ORIG_SRC_MARK`]. The application's replies are addressed to the client, whose
//! route leaves through the pod's eth0; to bring them back to the tunnel's socket
//! the tunnel sets, once per pod namespace:
//!
//! - `net.ipv4.tcp_fwmark_accept=1`: the application's accepted socket takes the
//!   mark of the SYN, i.e. of the delivery socket;
//! - `net.ipv4.fwmark_reflect=1`: so do the kernel's own answers (the RST of a
//!   port nothing listens on, ICMP errors), which no socket marks; without it the
//!   refusal leaves through eth0 and the delivery waits for its connect timeout;
//! - `ip rule fwmark ORIG_SRC_MARK lookup ROUTE_TABLE` and
//!   `ip route add local 0.0.0.0/0 dev lo table ROUTE_TABLE`: whatever carries the
//!   mark is local, so the replies loop back to the delivery socket.
//!
//! The redirection's `sk_lookup` would otherwise hand the delivery's SYN (from a
//! foreign address to the pod) to the tunnel's own listener: each delivery is filed
//! in the `ZT_DELIVERIES` map while it connects, and `sk_lookup` lets it through.
//!
//! Whenever any of this is not possible (the routing could not be set up, the
//! client's address is unknown or IPv6, the bind fails) the tunnel delivers from
//! the pod's own address as before: logged once per pod and reason, counted in
//! `ztunnel_original_source_fallbacks_total{reason}`; traffic is never dropped
//! for it.

use std::{
    collections::HashSet,
    fs, io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::net::TcpStream;
use ztunnel_ebpf_common::DeliveryKey;
pub use ztunnel_ebpf_common::ORIG_SRC_MARK;

use crate::netns::{self, Netns, SocketFactory};

/// The routing table the marked replies are looked up in (the mark's value).
pub const ROUTE_TABLE: u32 = ORIG_SRC_MARK;
/// The rule's priority: after `local` (0), before `main` (32766).
pub const RULE_PRIORITY: u32 = ORIG_SRC_MARK;

const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
const FWMARK_REFLECT: &str = "/proc/sys/net/ipv4/fwmark_reflect";

/// Why a connection was delivered from the pod's own address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fallback {
    /// The pod's routing for it could not be set up at enrollment.
    Routing,
    /// The tunnel does not know the client's (IPv4) address.
    SourceUnknown,
    /// The transparent socket could not be made or bound.
    Bind,
    /// The delivery could not be filed for `sk_lookup`.
    Map,
    /// A delivery came back to the tunnel's own listener: the `sk_lookup`
    /// program attached to the pod does not know deliveries (one pinned by an
    /// older tunnel).
    Looped,
}

impl Fallback {
    fn label(self) -> &'static str {
        match self {
            Self::Routing => "routing",
            Self::SourceUnknown => "source_unknown",
            Self::Bind => "bind",
            Self::Map => "bpf_map",
            Self::Looped => "looped",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    reason: String,
}

/// What every pod's deliveries share: the map `sk_lookup` reads and the metric.
pub struct OrigSrc {
    deliveries: Mutex<Deliveries>,
    fallbacks: Family<FallbackLabels, Counter>,
}

/// The deliveries in flight: in the map for `sk_lookup`, and here to recognise one
/// that reached the tunnel's own listener anyway.
struct Deliveries {
    map: BpfHashMap<MapData, DeliveryKey, u8>,
    in_flight: HashSet<DeliveryKey>,
}

impl OrigSrc {
    /// Takes the pinned `ZT_DELIVERIES` map and empties it: whatever a previous
    /// run filed is not in flight any more, and a stale entry would let a later
    /// connection with the same addresses past the tunnel.
    pub fn new(mut map: BpfHashMap<MapData, DeliveryKey, u8>, registry: &mut Registry) -> Self {
        let stale: Vec<DeliveryKey> = map.keys().filter_map(Result::ok).collect();
        for key in stale {
            let _ = map.remove(&key);
        }
        let fallbacks = Family::default();
        registry.register(
            "ztunnel_original_source_fallbacks",
            "Inbound connections delivered to the application from the pod's own address instead of the client's, by reason",
            fallbacks.clone(),
        );
        Self {
            deliveries: Mutex::new(Deliveries {
                map,
                in_flight: HashSet::new(),
            }),
            fallbacks,
        }
    }

    fn file(self: &Arc<Self>, key: DeliveryKey) -> Result<Filed, aya::maps::MapError> {
        let mut deliveries = self.deliveries.lock().expect("not poisoned");
        deliveries.map.insert(key, 0, 0)?;
        deliveries.in_flight.insert(key);
        Ok(Filed {
            orig_src: self.clone(),
            key,
        })
    }
}

/// A delivery filed for `sk_lookup`; unfiled when dropped, so that no later
/// connection with the same addresses is let past the tunnel.
struct Filed {
    orig_src: Arc<OrigSrc>,
    key: DeliveryKey,
}

impl Drop for Filed {
    fn drop(&mut self) {
        let mut deliveries = self.orig_src.deliveries.lock().expect("not poisoned");
        let _ = deliveries.map.remove(&self.key);
        deliveries.in_flight.remove(&self.key);
    }
}

/// Delivers inbound connections to one pod's application.
#[derive(Clone)]
pub struct Delivery {
    shared: Arc<OrigSrc>,
    sockets: SocketFactory,
    pod_ip: Ipv4Addr,
    /// Why the pod's routing is not set up, if it is not.
    routing: Option<Arc<str>>,
    /// Reasons already logged for this pod.
    logged: Arc<Mutex<HashSet<Fallback>>>,
    /// Set when a delivery looped back to the tunnel (see [`Fallback::Looped`]).
    looped: Arc<std::sync::atomic::AtomicBool>,
    /// Plaintext connections the tunnel holds in the pod: (client, application
    /// port). A delivery bound to one of those client ports would share that
    /// connection's addresses, mirrored, and never connect.
    held: Arc<Mutex<HashSet<(SocketAddrV4, u16)>>>,
}

/// A plaintext connection registered in [`Delivery::held`] while it lives.
pub struct Held {
    held: Arc<Mutex<HashSet<(SocketAddrV4, u16)>>>,
    key: Option<(SocketAddrV4, u16)>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.held.lock().expect("not poisoned").remove(&key);
        }
    }
}

/// How many ports to try before giving up on the client's address.
const BIND_ATTEMPTS: usize = 4;

impl Delivery {
    /// Sets up the pod's routing (see the module docs) and returns its delivery.
    /// A pod whose routing cannot be set up is still served, from its own address.
    pub fn new(
        shared: Arc<OrigSrc>,
        sockets: SocketFactory,
        netns: &Netns,
        pod_ip: Ipv4Addr,
    ) -> Self {
        let routing = match netns::run_in_ns(netns, install) {
            Ok(()) => None,
            Err(e) => {
                tracing::warn!(pod.ip = %pod_ip, "original source: the pod's routing cannot be set up, the application will see the pod's own address as its peer: {e}");
                Some(Arc::from(e.to_string()))
            }
        };
        Self {
            shared,
            sockets,
            pod_ip,
            routing,
            logged: Arc::default(),
            looped: Arc::default(),
            held: Arc::default(),
        }
    }

    /// Whether a connection the tunnel's plaintext listener accepted (from
    /// `peer`, to `local`) is one of the tunnel's own deliveries: `sk_lookup`
    /// did not let it through to the application. It must be refused (delivering
    /// it would loop), and later deliveries to this pod come from its own address.
    pub fn is_own_delivery(&self, peer: SocketAddr, local: SocketAddr) -> bool {
        let (SocketAddr::V4(peer), SocketAddr::V4(local)) = (peer, local) else {
            return false;
        };
        let key = DeliveryKey {
            remote_ip: u32::from_ne_bytes(peer.ip().octets()),
            local_ip: u32::from_ne_bytes(local.ip().octets()),
            remote_port: peer.port(),
            local_port: local.port(),
        };
        let own = self
            .shared
            .deliveries
            .lock()
            .expect("not poisoned")
            .in_flight
            .contains(&key);
        if own {
            self.looped
                .store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(pod.ip = %self.pod_ip, "original source: a delivery from {peer} came back to the tunnel instead of the application (the pod's sk_lookup program predates it; `ztunnel uninstall` and a restart replace it): refused, this pod's deliveries now come from its own address");
        }
        own
    }

    /// Registers a plaintext connection from `client` to the application's `port`
    /// while the returned guard lives.
    pub fn hold(&self, client: SocketAddr, port: u16) -> Held {
        let key = match client {
            SocketAddr::V4(v4) => Some((v4, port)),
            SocketAddr::V6(_) => None,
        };
        if let Some(key) = key {
            self.held.lock().expect("not poisoned").insert(key);
        }
        Held {
            held: self.held.clone(),
            key,
        }
    }

    /// Connects to the application at `target` from `client`'s address when it is
    /// known, otherwise (or when that cannot be done) from the pod's own.
    pub async fn connect(
        &self,
        client: Option<IpAddr>,
        target: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        let client = match client {
            Some(IpAddr::V4(ip)) if ip != self.pod_ip => ip,
            // The pod calling itself: its own address is the original source.
            Some(IpAddr::V4(_)) => return self.sockets.connect(target, timeout).await,
            _ => {
                return self
                    .fallback(Fallback::SourceUnknown, None, target, timeout)
                    .await
            }
        };
        if self.looped.load(std::sync::atomic::Ordering::Relaxed) {
            return self.fallback(Fallback::Looped, None, target, timeout).await;
        }
        if let Some(why) = &self.routing {
            let why = why.clone();
            return self
                .fallback(Fallback::Routing, Some(&why), target, timeout)
                .await;
        }
        let SocketAddr::V4(target_v4) = target else {
            return self
                .fallback(Fallback::SourceUnknown, None, target, timeout)
                .await;
        };
        let (socket, local) = match self.bind_transparent(client, target_v4.port()).await {
            Ok(bound) => bound,
            Err(e) => {
                return self
                    .fallback(Fallback::Bind, Some(&e.to_string()), target, timeout)
                    .await
            }
        };
        let key = DeliveryKey {
            remote_ip: u32::from_ne_bytes(client.octets()),
            local_ip: u32::from_ne_bytes(target_v4.ip().octets()),
            remote_port: local.port(),
            local_port: target_v4.port(),
        };
        let filed = match self.shared.file(key) {
            Ok(filed) => filed,
            Err(e) => {
                return self
                    .fallback(Fallback::Map, Some(&e.to_string()), target, timeout)
                    .await
            }
        };
        let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
        let connected = tokio::time::timeout(timeout, socket.connect(target))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?;
        // Established (or failed): sk_lookup is done with it.
        drop(filed);
        let stream = connected?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// A socket in the pod bound to `client`:<a free port> that shares no
    /// addresses with a plaintext connection the tunnel holds to `app_port`.
    async fn bind_transparent(
        &self,
        client: Ipv4Addr,
        app_port: u16,
    ) -> io::Result<(socket2::Socket, SocketAddrV4)> {
        // Colliding sockets stay open until the end, so the kernel hands out
        // another port each time.
        let mut colliding = Vec::new();
        for _ in 0..BIND_ATTEMPTS {
            let socket = self.sockets.tcp_socket_marked(ORIG_SRC_MARK)?;
            socket.set_ip_transparent_v4(true)?;
            socket.bind(&SocketAddrV4::new(client, 0).into())?;
            let local = socket
                .local_addr()?
                .as_socket_ipv4()
                .ok_or_else(|| io::Error::other("bound to a non-IPv4 address"))?;
            if !self
                .held
                .lock()
                .expect("not poisoned")
                .contains(&(local, app_port))
            {
                return Ok((socket, local));
            }
            colliding.push(socket);
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "every port tried is a client port of a connection the tunnel holds",
        ))
    }

    async fn fallback(
        &self,
        reason: Fallback,
        detail: Option<&str>,
        target: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        self.shared
            .fallbacks
            .get_or_create(&FallbackLabels {
                reason: reason.label().into(),
            })
            .inc();
        if self.logged.lock().expect("not poisoned").insert(reason) {
            tracing::warn!(
                pod.ip = %self.pod_ip,
                reason = reason.label(),
                "original source: delivering from the pod's own address (logged once per pod and reason){}",
                detail.map(|d| format!(": {d}")).unwrap_or_default()
            );
        }
        self.sockets.connect(target, timeout).await
    }
}

/// Sets up original-source routing in the calling thread's network namespace (a
/// pod's). Idempotent: a restarted tunnel finds it in place and adds nothing.
pub fn install() -> io::Result<()> {
    for sysctl in [FWMARK_ACCEPT, FWMARK_REFLECT] {
        fs::write(sysctl, "1").map_err(|e| context(e, sysctl))?;
    }
    let nl = netlink::Socket::open()?;
    nl.request(&netlink::route(true))
        .map_err(|e| context(e, "adding the local route"))?;
    match nl.request(&netlink::rule(true)) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other.map_err(|e| context(e, "adding the rule")),
    }
}

/// Removes the routing [`install`] set up, in the calling thread's namespace.
/// Returns whether there was a rule. (`tcp_fwmark_accept` and `fwmark_reflect`
/// stay: without the rule the marks they copy route nothing.)
pub fn remove() -> io::Result<bool> {
    let nl = netlink::Socket::open()?;
    let mut had_rule = false;
    // Removing one rule at a time: there is exactly one unless someone copied it.
    loop {
        match nl.request(&netlink::rule(false)) {
            Ok(()) => had_rule = true,
            Err(e) if is_absent(&e) => break,
            Err(e) => return Err(context(e, "removing the rule")),
        }
    }
    match nl.request(&netlink::route(false)) {
        Err(e) if !is_absent(&e) => return Err(context(e, "removing the local route")),
        _ => {}
    }
    Ok(had_rule)
}

/// Removes the routing from a pod's namespace held open (un-enrollment).
pub fn remove_in(netns: &Netns) -> io::Result<bool> {
    netns::run_in_ns(netns, remove)
}

/// `ztunnel uninstall`: removes the routing from the network namespaces of the
/// pods the tunnel pinned as enrolled under `pin_dir` (`pods/<netns cookie>`),
/// found among `/run/netns` and every process's namespace. Call it before the pins
/// go. Returns how many namespaces had it, and those it could not clean.
pub fn uninstall(pin_dir: &Path) -> (usize, Vec<String>) {
    let cookies: HashSet<u64> = fs::read_dir(pin_dir.join("pods"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    remove_by_cookie(&cookies)
}

/// Removes the routing from the network namespaces with these cookies (pods the
/// tunnel released without holding their namespace), found among `/run/netns`
/// and every process's namespace. Returns how many had it, and those it could
/// not clean.
pub fn remove_by_cookie(cookies: &HashSet<u64>) -> (usize, Vec<String>) {
    let mut seen = HashSet::new();
    let mut cleaned = 0;
    let mut failed = Vec::new();
    if cookies.is_empty() {
        return (cleaned, failed);
    }
    for path in namespace_paths() {
        let Ok(ns) = Netns::open(&path) else { continue };
        if !seen.insert(ns.inode) {
            continue;
        }
        let cookies = cookies.clone();
        let result = netns::run_in_ns(&ns, move || {
            let cookie = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
                .and_then(|probe| netns::cookie(&probe));
            match cookie {
                Ok(cookie) if cookies.contains(&cookie) => remove().map(Some),
                // Not one of them (or a namespace going away as we look).
                _ => Ok(None),
            }
        });
        match result {
            Ok(Some(true)) => cleaned += 1,
            Ok(_) => {}
            Err(e) => failed.push(format!("{}: {e}", path.display())),
        }
    }
    (cleaned, failed)
}

/// Every network namespace path worth looking at (one per namespace is enough;
/// duplicates are skipped by inode).
fn namespace_paths() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = fs::read_dir(dir) {
            paths.extend(entries.flatten().map(|e| e.path()));
        }
    }
    if let Ok(entries) = fs::read_dir("/proc") {
        paths.extend(
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                })
                .map(|e| e.path().join("ns/net")),
        );
    }
    paths
}

fn is_absent(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH))
}

fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Just enough rtnetlink for one rule and one route.
mod netlink {
    use super::*;

    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_ACK: u16 = 0x4;
    const NLM_F_REPLACE: u16 = 0x100;
    const NLM_F_EXCL: u16 = 0x200;
    const NLM_F_CREATE: u16 = 0x400;
    const RTM_NEWROUTE: u16 = 24;
    const RTM_DELROUTE: u16 = 25;
    const RTM_NEWRULE: u16 = 32;
    const RTM_DELRULE: u16 = 33;
    /// fib_rule_hdr.action: look up a table.
    const FR_ACT_TO_TBL: u8 = 1;
    const FRA_PRIORITY: u16 = 6;
    const FRA_FWMARK: u16 = 10;
    const FRA_TABLE: u16 = 15;
    const FRA_FWMASK: u16 = 16;
    const RTA_OIF: u16 = 4;
    const RTA_TABLE: u16 = 15;
    const RTPROT_STATIC: u8 = 4;
    const RT_SCOPE_HOST: u8 = 254;
    const RTN_LOCAL: u8 = 2;
    /// The loopback device is interface 1 in every network namespace.
    const LOOPBACK_IFINDEX: u32 = 1;

    /// An rtnetlink message: header, 12-byte family header, u32 attributes.
    pub struct Message(pub(super) Vec<u8>);

    fn message(kind: u16, flags: u16, family_header: [u8; 12], attrs: &[(u16, u32)]) -> Message {
        let len = 16 + 12 + attrs.len() * 8;
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(&(len as u32).to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        buf.extend_from_slice(&family_header);
        for (kind, value) in attrs {
            buf.extend_from_slice(&8u16.to_ne_bytes());
            buf.extend_from_slice(&kind.to_ne_bytes());
            buf.extend_from_slice(&value.to_ne_bytes());
        }
        Message(buf)
    }

    /// `ip rule {add|del} fwmark ORIG_SRC_MARK/0xffffffff lookup ROUTE_TABLE pref RULE_PRIORITY`.
    pub fn rule(add: bool) -> Message {
        // fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags.
        let header = [
            libc::AF_INET as u8,
            0,
            0,
            0,
            0,
            0,
            0,
            FR_ACT_TO_TBL,
            0,
            0,
            0,
            0,
        ];
        let attrs = [
            (FRA_PRIORITY, RULE_PRIORITY),
            (FRA_FWMARK, ORIG_SRC_MARK),
            (FRA_FWMASK, u32::MAX),
            (FRA_TABLE, ROUTE_TABLE),
        ];
        match add {
            true => message(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, header, &attrs),
            false => message(RTM_DELRULE, 0, header, &attrs),
        }
    }

    /// `ip route {replace|del} local 0.0.0.0/0 dev lo table ROUTE_TABLE`.
    pub fn route(add: bool) -> Message {
        // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        let header = [
            libc::AF_INET as u8,
            0,
            0,
            0,
            0,
            RTPROT_STATIC,
            RT_SCOPE_HOST,
            RTN_LOCAL,
            0,
            0,
            0,
            0,
        ];
        let attrs = [(RTA_TABLE, ROUTE_TABLE), (RTA_OIF, LOOPBACK_IFINDEX)];
        match add {
            true => message(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, header, &attrs),
            false => message(RTM_DELROUTE, 0, header, &attrs),
        }
    }

    /// A NETLINK_ROUTE socket in the calling thread's network namespace.
    pub struct Socket(socket2::Socket);

    impl Socket {
        pub fn open() -> io::Result<Self> {
            let socket = socket2::Socket::new(
                socket2::Domain::from(libc::AF_NETLINK),
                socket2::Type::RAW.cloexec(),
                Some(socket2::Protocol::from(libc::NETLINK_ROUTE)),
            )?;
            socket.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok(Self(socket))
        }

        /// Sends one request and waits for its acknowledgement: Ok, or the
        /// kernel's error as an errno.
        pub fn request(&self, message: &Message) -> io::Result<()> {
            use std::io::Read;
            self.0.send(&message.0)?;
            let mut buf = [0u8; 4096];
            loop {
                let n = (&self.0).read(&mut buf)?;
                if let Some(result) = ack(&buf[..n]) {
                    return result;
                }
            }
        }
    }

    /// The acknowledgement in a reply, if there is one: `NLMSG_ERROR` with 0 for
    /// success or a negative errno.
    pub(super) fn ack(mut reply: &[u8]) -> Option<io::Result<()>> {
        while reply.len() >= 20 {
            let len = u32::from_ne_bytes(reply[0..4].try_into().ok()?) as usize;
            let kind = u16::from_ne_bytes(reply[4..6].try_into().ok()?);
            if kind == NLMSG_ERROR {
                let errno = i32::from_ne_bytes(reply[16..20].try_into().ok()?);
                return Some(match errno {
                    0 => Ok(()),
                    e => Err(io::Error::from_raw_os_error(-e)),
                });
            }
            let next = (len + 3) & !3;
            if len < 16 || next > reply.len() {
                return None;
            }
            reply = &reply[next..];
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_message_names_the_mark_the_table_and_the_priority() {
        let msg = netlink::rule(true).0;
        assert_eq!(
            u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize,
            msg.len()
        );
        assert_eq!(msg.len(), 16 + 12 + 4 * 8);
        let attrs: Vec<(u16, u32)> = msg[28..]
            .chunks(8)
            .map(|a| {
                (
                    u16::from_ne_bytes(a[2..4].try_into().unwrap()),
                    u32::from_ne_bytes(a[4..8].try_into().unwrap()),
                )
            })
            .collect();
        assert!(attrs.contains(&(10, ORIG_SRC_MARK)));
        assert!(attrs.contains(&(15, ROUTE_TABLE)));
        assert!(attrs.contains(&(6, RULE_PRIORITY)));
    }

    #[test]
    fn acks_carry_the_kernels_errno() {
        let ack = |errno: i32| {
            let mut m = vec![0u8; 36];
            m[0..4].copy_from_slice(&36u32.to_ne_bytes());
            m[4..6].copy_from_slice(&2u16.to_ne_bytes());
            m[16..20].copy_from_slice(&errno.to_ne_bytes());
            m
        };
        assert!(netlink::ack(&ack(0)).unwrap().is_ok());
        let err = netlink::ack(&ack(-libc::EEXIST)).unwrap().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        assert!(netlink::ack(&[0u8; 8]).is_none());
    }

    #[test]
    fn the_delivery_mark_is_not_the_one_the_capture_skips() {
        // Every other tunnel socket in the pod carries TUNNEL_MARK and must route
        // normally; only deliveries are looked up in the loopback table.
        assert_ne!(ORIG_SRC_MARK, ztunnel_ebpf_common::TUNNEL_MARK);
    }
}
