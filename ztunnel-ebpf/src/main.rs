//! Traffic redirection for enrolled pods. See README.md in this directory for which
//! program does what and why.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{bpf_sock_addr, sk_action::SK_DROP, sk_action::SK_PASS},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops, stream_verdict},
    maps::{HashMap, LruHashMap, SockHash},
    programs::{SkBuffContext, SkLookupContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use ztunnel_ebpf_common::{
    ConnKey, DeliveryKey, ListenerKey, OrigDst, PodConfig, DNS_PORT, FLAG_ALLOW_PLAINTEXT_UDP,
    FLAG_NO_DNS_CAPTURE, HBONE_PORT, LISTENER_HBONE, LISTENER_PLAINTEXT, LOCALHOST, OUTBOUND_PORT,
    SPLICE_MAX_SOCKETS, TUNNEL_MARK,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const DNS_SERVER_PORT: u16 = 53;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;

/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
/// The last word of `::1`.
const IPV6_LOOPBACK_TAIL: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

/// Return codes of cgroup sock_addr programs: proceed, or fail the call with EPERM.
const PROCEED: i32 = 1;
const REFUSE: i32 = 0;

#[map(name = "ZT_ENROLLED")]
static ENROLLED: HashMap<u64, PodConfig> = HashMap::pinned(16_384, 0);

#[map(name = "ZT_ORIG_DST_COOKIE")]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65_536, 0);

#[map(name = "ZT_ORIG_DST")]
static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(65_536, 0);

#[map(name = "ZT_DNS_ORIG")]
static DNS_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(16_384, 0);

#[map(name = "ZT_LISTENERS")]
static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(32_768, 0);

#[map(name = "ZT_DELIVERIES")]
static DELIVERIES: LruHashMap<DeliveryKey, u8> = LruHashMap::pinned(65_536, 0);

// The splice maps are the process's own (not pinned): a spliced connection is held
// by the running tunnel, and the maps, with the program attached to them, go away
// with it.
#[map(name = "ZT_SPLICE_SOCKETS")]
static SPLICE_SOCKETS: SockHash<u64> = SockHash::with_max_entries(SPLICE_MAX_SOCKETS, 0);

#[map(name = "ZT_SPLICE_PEERS")]
static SPLICE_PEERS: HashMap<u64, u64> = HashMap::with_max_entries(SPLICE_MAX_SOCKETS, 0);

/// What a sock_addr call is about, read once from the context.
struct Call {
    ctx: *mut bpf_sock_addr,
    kind: u32,
    /// The IPv4 address (of an IPv4 call, or the v4 part of a mapped IPv6 one).
    ip: u32,
    /// Host order.
    port: u16,
}

/// The family of a program is fixed at compile time (`V6`: the connect6, sendmsg6...
/// variant, whose IPv4 traffic uses mapped addresses `::ffff:a.b.c.d`): LLVM would
/// otherwise pick the context field by pointer arithmetic, which the verifier refuses.
enum Address {
    Ip(Call),
    /// IPv6 loopback or unspecified: local to the pod.
    V6Local,
    /// A real IPv6 destination: the mesh does not carry IPv6 (yet).
    V6,
}

fn read_call<const V6: bool>(ctx: &SockAddrContext) -> Address {
    let a = ctx.sock_addr;
    // SAFETY: the kernel hands every sock_addr program a valid context; each field
    // is read with its own 4-byte load, as the verifier requires.
    unsafe {
        let kind = read_volatile(&(*a).type_);
        let port = u16::from_be(read_volatile(&(*a).user_port) as u16);
        if !V6 {
            let ip = read_volatile(&(*a).user_ip4);
            return Address::Ip(Call {
                ctx: a,
                kind,
                ip,
                port,
            });
        }
        let w0 = read_volatile(&(*a).user_ip6[0]);
        let w1 = read_volatile(&(*a).user_ip6[1]);
        let w2 = read_volatile(&(*a).user_ip6[2]);
        let w3 = read_volatile(&(*a).user_ip6[3]);
        if w0 == 0 && w1 == 0 && w2 == MAPPED_PREFIX {
            return Address::Ip(Call {
                ctx: a,
                kind,
                ip: w3,
                port,
            });
        }
        if w0 == 0 && w1 == 0 && w2 == 0 && (w3 == 0 || w3 == IPV6_LOOPBACK_TAIL) {
            return Address::V6Local;
        }
        Address::V6
    }
}

fn write_address<const V6: bool>(call: &Call, ip: u32, port: u16) {
    // Volatile stores: LLVM may otherwise merge adjacent 32-bit context stores into
    // one 64-bit store, which the verifier refuses.
    // SAFETY: user_ip4/user_ip6/user_port are writable in the hooks that call this.
    unsafe {
        if V6 {
            // A mapped address: only the IPv4 part changes.
            write_volatile(&mut (*call.ctx).user_ip6[3], ip);
        } else {
            write_volatile(&mut (*call.ctx).user_ip4, ip);
        }
        write_volatile(&mut (*call.ctx).user_port, u32::from(port.to_be()));
    }
}

/// The pod this socket belongs to, unless it is not enrolled or is the tunnel's own.
fn enrolled_pod(ctx: &SockAddrContext) -> Option<PodConfig> {
    // SAFETY: helper valid for every sock_addr program.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value, copied out at once.
    let pod = unsafe { ENROLLED.get(&netns) }.copied()?;
    // SAFETY: `sk` is always set for sock_addr programs.
    let mark = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).mark };
    (mark != TUNNEL_MARK).then_some(pod)
}

fn is_loopback(ip: u32) -> bool {
    // The first octet sits in the lowest-addressed byte whatever the host order.
    ip.to_ne_bytes()[0] == 127
}

/// Destinations that never leave the pod: 127.0.0.0/8, and 0.0.0.0/8 (connecting to
/// 0.0.0.0 means this host, which inside the pod is the pod itself). Never captured:
/// captured, they would be dialed by the tunnel, i.e. reach the node.
fn is_local(ip: u32) -> bool {
    let first = ip.to_ne_bytes()[0];
    first == 127 || first == 0
}

/// UDP other than DNS from an enrolled pod: it would leave uncaptured, in
/// plaintext, past every policy, so it is refused unless the pod's namespace opted
/// out.
fn udp_verdict(pod: &PodConfig) -> i32 {
    if pod.flags & FLAG_ALLOW_PLAINTEXT_UDP != 0 {
        PROCEED
    } else {
        REFUSE
    }
}

/// Sends the call to 127.0.0.1:`port` in the pod, remembering the original
/// destination under the socket's cookie.
fn steer<const V6: bool>(
    ctx: &SockAddrContext,
    call: &Call,
    port: u16,
    by_cookie: &LruHashMap<u64, OrigDst>,
) {
    let orig = OrigDst {
        ip: call.ip,
        port: call.port,
        _pad: 0,
    };
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = by_cookie.insert(&cookie, &orig, 0);
    write_address::<V6>(call, LOCALHOST, port);
}

/// connect() from a pod: TCP to the outbound listener, UDP/53 to the DNS listener,
/// other UDP refused (unless opted out). The pod's own address, loopback and
/// 0.0.0.0/8 are left alone.
fn connect<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let Some(pod) = enrolled_pod(ctx) else {
        return PROCEED;
    };
    match read_call::<V6>(ctx) {
        Address::V6Local => PROCEED,
        Address::V6 => REFUSE,
        Address::Ip(call) => {
            if is_local(call.ip) || call.ip == pod.pod_ip {
                return PROCEED;
            }
            match call.kind {
                SOCK_STREAM => steer::<V6>(ctx, &call, OUTBOUND_PORT, &ORIG_DST_BY_COOKIE),
                SOCK_DGRAM if call.port == DNS_SERVER_PORT => {
                    if pod.flags & FLAG_NO_DNS_CAPTURE == 0 {
                        steer::<V6>(ctx, &call, DNS_PORT, &DNS_ORIG)
                    }
                }
                SOCK_DGRAM => return udp_verdict(&pod),
                _ => {}
            }
            PROCEED
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    connect::<false>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    connect::<true>(&ctx)
}

/// sendto()/sendmsg() on an unconnected UDP socket: DNS to the DNS listener, other
/// UDP leaving the pod refused (unless opted out).
fn sendmsg<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let Some(pod) = enrolled_pod(ctx) else {
        return PROCEED;
    };
    match read_call::<V6>(ctx) {
        Address::Ip(call) => {
            if call.kind != SOCK_DGRAM || is_local(call.ip) || call.ip == pod.pod_ip {
                return PROCEED;
            }
            if call.port == DNS_SERVER_PORT {
                if pod.flags & FLAG_NO_DNS_CAPTURE == 0 {
                    steer::<V6>(ctx, &call, DNS_PORT, &DNS_ORIG);
                }
                return PROCEED;
            }
            udp_verdict(&pod)
        }
        // Real IPv6 is not carried by the mesh (as connect6 refuses it).
        Address::V6 => REFUSE,
        Address::V6Local => PROCEED,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn redirect_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg::<false>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn redirect_sendmsg6(ctx: SockAddrContext) -> i32 {
    sendmsg::<true>(&ctx)
}

/// If `call` names one of the tunnel's listeners in the pod, rewrites it to the
/// original destination filed for this socket: the application sees the peer it
/// asked for.
fn restore_peer<const V6: bool>(ctx: &SockAddrContext) {
    let Address::Ip(call) = read_call::<V6>(ctx) else {
        return;
    };
    if call.ip != LOCALHOST {
        return;
    }
    let by_cookie = match (call.kind, call.port) {
        (SOCK_DGRAM, DNS_PORT) => &DNS_ORIG,
        (SOCK_STREAM, OUTBOUND_PORT) => &ORIG_DST_BY_COOKIE,
        _ => return,
    };
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value, copied out at once.
    if let Some(orig) = unsafe { by_cookie.get(&cookie) }.copied() {
        write_address::<V6>(&call, orig.ip, orig.port);
    }
}

/// recvfrom()/recvmsg() on a pod's UDP socket: DNS replies seem to come from the
/// server the pod asked, not from the tunnel.
#[cgroup_sock_addr(recvmsg4)]
pub fn redirect_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_peer::<false>(&ctx);
    PROCEED
}

#[cgroup_sock_addr(recvmsg6)]
pub fn redirect_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_peer::<true>(&ctx);
    PROCEED
}

/// getpeername() on a pod's socket.
#[cgroup_sock_addr(getpeername4)]
pub fn redirect_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer::<false>(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn redirect_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer::<true>(&ctx);
    PROCEED
}

/// Once a captured connection is established its source port is known: file the
/// original destination under (netns, source ip, source port), which is what the
/// tunnel sees as the peer of the connection it accepts.
#[sock_ops]
pub fn redirect_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    let ops = ctx.ops;
    // Both loads happen whatever the family (volatile): LLVM would otherwise choose
    // the field by pointer arithmetic, which the verifier refuses.
    // SAFETY: valid context; 4-byte loads of readable fields.
    let (family, ip4, ip6_tail) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            read_volatile(&(*ops).local_ip6[3]),
        )
    };
    let local_ip = match family {
        AF_INET => ip4,
        // An IPv6 socket talking IPv4 (the only IPv6 kind the capture lets out).
        AF_INET6 => ip6_tail,
        _ => return 1,
    };
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value, copied out at once.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(&cookie) }).copied() else {
        return 1;
    };
    let key = ConnKey {
        // SAFETY: as above.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        ip: local_ip,
        port: ctx.local_port() as u16,
        _pad: 0,
    };
    let _ = ORIG_DST.insert(&key, &orig, 0);
    1
}

/// Inbound: TCP to an enrolled pod's IP goes to the tunnel's listener in that pod
/// (15008 for HBONE, 15006 for everything else). With no listener — the tunnel is
/// down — the connection is dropped rather than handed to the application.
#[sk_lookup]
pub fn redirect_inbound(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: the kernel hands every sk_lookup program a valid context. Every field
    // is read by its own volatile 4-byte load: LLVM would otherwise share computed
    // context pointers between branches, which the verifier refuses.
    let (family, protocol) =
        unsafe { (read_volatile(&(*l).family), read_volatile(&(*l).protocol)) };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    if family == AF_INET6 {
        return inbound_v6(&ctx);
    }
    if family != AF_INET {
        return SK_PASS;
    }
    // SAFETY: as above.
    let (local, remote, local_port, remote_port) = unsafe {
        (
            read_volatile(&(*l).local_ip4),
            read_volatile(&(*l).remote_ip4),
            read_volatile(&(*l).local_port),
            u16::from_be(read_volatile(&(*l).remote_port)),
        )
    };
    // The pod talking to itself (and the tunnel delivering to the application from
    // the pod's own address) is loopback traffic: untouched.
    if remote == local || is_loopback(local) {
        return SK_PASS;
    }
    // The tunnel delivering to the application from the client's address: the
    // daemon filed this exact connection just before connecting.
    let delivery = DeliveryKey {
        remote_ip: remote,
        local_ip: local,
        remote_port,
        local_port: local_port as u16,
    };
    // SAFETY: read-only lookup; only presence matters.
    if unsafe { DELIVERIES.get(&delivery) }.is_some() {
        return SK_PASS;
    }
    let kind = if local_port == u32::from(HBONE_PORT) {
        LISTENER_HBONE
    } else {
        LISTENER_PLAINTEXT
    };
    let key = ListenerKey {
        pod_ip: local,
        kind,
    };
    match LISTENERS.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => SK_PASS,
        Err(_) => SK_DROP,
    }
}

/// IPv6 is not carried by the mesh: only the pod's own loopback and the pod talking
/// to itself pass; anything else would bypass the tunnel, so it is dropped.
#[inline(never)]
fn inbound_v6(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: valid context; one volatile 4-byte load per word.
    let (local, remote) = unsafe {
        (
            [
                read_volatile(&(*l).local_ip6[0]),
                read_volatile(&(*l).local_ip6[1]),
                read_volatile(&(*l).local_ip6[2]),
                read_volatile(&(*l).local_ip6[3]),
            ],
            [
                read_volatile(&(*l).remote_ip6[0]),
                read_volatile(&(*l).remote_ip6[1]),
                read_volatile(&(*l).remote_ip6[2]),
                read_volatile(&(*l).remote_ip6[3]),
            ],
        )
    };
    let loopback =
        local[0] == 0 && local[1] == 0 && local[2] == 0 && local[3] == IPV6_LOOPBACK_TAIL;
    if loopback || local == remote {
        SK_PASS
    } else {
        SK_DROP
    }
}

/// Same-node splice: bytes arriving on one of a spliced pair of the tunnel's
/// sockets are sent out on the other, in the kernel. Without a peer, or if the
/// peer is gone, the bytes stay on this socket for the tunnel to read (it then
/// carries them, or ends the connection): never dropped here.
#[stream_verdict]
pub fn splice_verdict(ctx: SkBuffContext) -> u32 {
    // A FIN that arrives without payload comes here as an empty skb. Redirected,
    // the kernel's send of its zero bytes counts as a failure: EPIPE on the peer
    // socket and no more redirects into it. The FIN is already in this socket's
    // state, which the tunnel watches and passes on in order; the skb holds no byte.
    if ctx.len() == 0 {
        return SK_DROP;
    }
    // SAFETY: helper valid for sk_skb programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value, copied out at once.
    if let Some(mut peer) = unsafe { SPLICE_PEERS.get(&cookie) }.copied() {
        // On success this marks the skb for the peer's egress.
        if SPLICE_SOCKETS.redirect_skb(&ctx, &mut peer, 0) == i64::from(SK_PASS) {
            return SK_PASS;
        }
        // The peer is not in the map (yet, or any more): these bytes stay here for
        // the tunnel, and so does everything after them on this socket, so that
        // the kernel never sends later bytes ahead of ones the tunnel carries.
        let _ = SPLICE_PEERS.remove(&cookie);
    }
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
