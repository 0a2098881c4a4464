//! The one definition of everything the eBPF programs and the daemon exchange:
//! well-known ports, map key and value layouts, and map names.
//!
//! Addresses are stored exactly as the kernel hands them to the programs: an IPv4
//! address is the four octets in network order read as a native `u32`
//! (`u32::from_ne_bytes(ip.octets())`), so neither side ever swaps bytes.
#![no_std]

/// Where enrolled pods' outbound TCP is steered, inside the pod's network namespace.
pub const OUTBOUND_PORT: u16 = 15001;
/// Where plaintext connections to an enrolled pod are steered.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// HBONE (HTTP/2 CONNECT over mTLS) to an enrolled pod.
pub const HBONE_PORT: u16 = 15008;
/// Where enrolled pods' DNS queries (UDP/53) are steered.
pub const DNS_PORT: u16 = 15053;
/// `SO_MARK` the tunnel puts on sockets it opens inside a pod; the programs never
/// capture a socket carrying it. Same value as Istio's ztunnel.
pub const TUNNEL_MARK: u32 = 0x539;
/// `SO_MARK` of the tunnel's delivery sockets that carry the client's address into
/// a pod (see `ztunnel/src/orig_src.rs`): the pod's policy routing sends what is
/// marked with it back to the tunnel over loopback. Deliberately not
/// [`TUNNEL_MARK`]: the tunnel's other sockets in the pod must route normally. The
/// programs need not skip it: a delivery connects to the pod's own address, which
/// is never captured.
pub const ORIG_SRC_MARK: u32 = 0x53a;

/// 127.0.0.1 as the programs see it.
pub const LOCALHOST: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Map names, pinned under the tunnel's bpffs directory.
pub mod maps {
    /// netns cookie → [`crate::PodConfig`]: the enrolled pods.
    pub const ENROLLED: &str = "ZT_ENROLLED";
    /// socket cookie → [`crate::OrigDst`]: destination of a captured connect().
    pub const ORIG_DST_BY_COOKIE: &str = "ZT_ORIG_DST_COOKIE";
    /// [`crate::ConnKey`] of the client end → [`crate::OrigDst`]: what the tunnel reads.
    pub const ORIG_DST: &str = "ZT_ORIG_DST";
    /// socket cookie → [`crate::OrigDst`]: the DNS server a pod's UDP socket last asked.
    pub const DNS_ORIG: &str = "ZT_DNS_ORIG";
    /// [`crate::ListenerKey`] → the tunnel's listening socket for that pod.
    pub const LISTENERS: &str = "ZT_LISTENERS";
    /// [`crate::DeliveryKey`] → 0: connections the tunnel is opening to an
    /// application from the client's address, which `sk_lookup` lets through.
    pub const DELIVERIES: &str = "ZT_DELIVERIES";
    /// socket cookie → a spliced socket of the tunnel (not pinned).
    pub const SPLICE_SOCKETS: &str = "ZT_SPLICE_SOCKETS";
    /// socket cookie → the cookie of the socket its bytes go out on (not pinned).
    pub const SPLICE_PEERS: &str = "ZT_SPLICE_PEERS";
}

/// How many sockets can be spliced at once (two per connection).
pub const SPLICE_MAX_SOCKETS: u32 = 65_536;

/// An enrolled pod, keyed by its network namespace cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodConfig {
    /// The pod's IP (network order, see the crate docs).
    pub pod_ip: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
}

/// [`PodConfig::flags`]: the pod may send UDP other than DNS in plaintext (its
/// namespace opted out). Without it such UDP is refused: it would bypass the mesh.
pub const FLAG_ALLOW_PLAINTEXT_UDP: u32 = 1;
/// [`PodConfig::flags`]: the pod's DNS is not captured (`--dns-capture=false`, or
/// Istio's `ambient.istio.io/dns-capture: "false"`): UDP/53 goes straight to the
/// server asked. TCP/53 stays captured as any TCP (the mesh carries it).
pub const FLAG_NO_DNS_CAPTURE: u32 = 2;

/// An original destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Network order, see the crate docs.
    pub ip: u32,
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// The client end of a captured connection as the tunnel's listener sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnKey {
    pub netns_cookie: u64,
    /// Network order.
    pub ip: u32,
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// Which of a pod's inbound listeners.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerKey {
    /// The pod IP the listener serves (network order).
    pub pod_ip: u32,
    /// [`LISTENER_PLAINTEXT`] or [`LISTENER_HBONE`].
    pub kind: u32,
}

/// A connection the tunnel makes inside a pod from a client's address to the
/// application: it must reach the application, not the tunnel's own listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    /// The client's address the tunnel bound to (network order).
    pub remote_ip: u32,
    /// The application's address: the pod's IP (network order).
    pub local_ip: u32,
    /// Host order.
    pub remote_port: u16,
    /// Host order.
    pub local_port: u16,
}

pub const LISTENER_PLAINTEXT: u32 = 0;
pub const LISTENER_HBONE: u32 = 1;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all five are repr(C), Copy, and padding-free with explicit pad fields.
    unsafe impl aya::Pod for super::PodConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::DeliveryKey {}
}
