//! Traffic redirection for enrolled pods. See README.md in this directory for which
//! program does what and why.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_sock_addr, sk_action::SK_DROP, sk_action::SK_PASS},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use ztunnel_ebpf_common::{
    ConnKey, ListenerKey, OrigDst, PodConfig, DNS_PORT, HBONE_PORT, LISTENER_HBONE,
    LISTENER_PLAINTEXT, LOCALHOST, OUTBOUND_PORT, TUNNEL_MARK,
};

const AF_INET: u32 = 2;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const DNS_SERVER_PORT: u16 = 53;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;

/// Return codes of cgroup sock_addr programs: 1 lets the call proceed.
const PROCEED: i32 = 1;

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

fn addr(ctx: &SockAddrContext) -> &bpf_sock_addr {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    unsafe { &*ctx.sock_addr }
}

/// True when this socket belongs to an enrolled pod and is not the tunnel's own.
fn captured(ctx: &SockAddrContext) -> bool {
    let a = addr(ctx);
    if a.user_family != AF_INET {
        return false;
    }
    // SAFETY: helper valid for every sock_addr program.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { ENROLLED.get(&netns) }.is_none() {
        return false;
    }
    // SAFETY: `sk` is always set for sock_addr programs.
    let mark = unsafe { (*a.__bindgen_anon_1.sk).mark };
    mark != TUNNEL_MARK
}

fn is_loopback(ip: u32) -> bool {
    // The first octet sits in the lowest-addressed byte whatever the host order.
    ip.to_ne_bytes()[0] == 127
}

/// Rewrites the destination to 127.0.0.1:`port`, remembering the original by cookie.
fn steer(ctx: &SockAddrContext, port: u16, by_cookie: &LruHashMap<u64, OrigDst>) {
    let a = ctx.sock_addr;
    // SAFETY: valid context; fields read as the kernel stores them.
    let (ip, user_port) = unsafe { ((*a).user_ip4, (*a).user_port) };
    let orig = OrigDst {
        ip,
        port: u16::from_be(user_port as u16),
        _pad: 0,
    };
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = by_cookie.insert(&cookie, &orig, 0);
    // Volatile stores: LLVM may otherwise merge the two 32-bit context stores into
    // one 64-bit store, which the verifier refuses.
    // SAFETY: writable context fields of connect4/sendmsg4.
    unsafe {
        core::ptr::write_volatile(&mut (*a).user_ip4, LOCALHOST);
        core::ptr::write_volatile(&mut (*a).user_port, u32::from(port.to_be()));
    }
}

/// connect() from a pod: TCP to the outbound listener, UDP/53 to the DNS listener.
#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    if !captured(&ctx) {
        return PROCEED;
    }
    let a = addr(&ctx);
    if is_loopback(a.user_ip4) {
        return PROCEED;
    }
    let port = u16::from_be(a.user_port as u16);
    match a.type_ {
        SOCK_STREAM => steer(&ctx, OUTBOUND_PORT, &ORIG_DST_BY_COOKIE),
        SOCK_DGRAM if port == DNS_SERVER_PORT => steer(&ctx, DNS_PORT, &DNS_ORIG),
        _ => {}
    }
    PROCEED
}

/// sendto()/sendmsg() of an unconnected UDP socket: DNS to the DNS listener.
#[cgroup_sock_addr(sendmsg4)]
pub fn redirect_sendmsg4(ctx: SockAddrContext) -> i32 {
    if !captured(&ctx) {
        return PROCEED;
    }
    let a = addr(&ctx);
    if a.type_ == SOCK_DGRAM
        && !is_loopback(a.user_ip4)
        && u16::from_be(a.user_port as u16) == DNS_SERVER_PORT
    {
        steer(&ctx, DNS_PORT, &DNS_ORIG);
    }
    PROCEED
}

/// Rewrites `ctx`'s address to the DNS server this socket asked, if the reply came
/// from the tunnel's DNS listener.
fn restore_dns_source(ctx: &SockAddrContext) {
    let a = ctx.sock_addr;
    // SAFETY: valid context.
    let (ip, port) = unsafe { ((*a).user_ip4, u16::from_be((*a).user_port as u16)) };
    if ip != LOCALHOST || port != DNS_PORT {
        return;
    }
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value, copied out at once.
    if let Some(orig) = unsafe { DNS_ORIG.get(&cookie) } {
        let (ip, port) = (orig.ip, orig.port);
        // SAFETY: writable context fields of recvmsg4/getpeername4.
        unsafe {
            core::ptr::write_volatile(&mut (*a).user_ip4, ip);
            core::ptr::write_volatile(&mut (*a).user_port, u32::from(port.to_be()));
        }
    }
}

/// recvfrom()/recvmsg() on a pod's UDP socket: DNS replies seem to come from the
/// server the pod asked, not from the tunnel.
#[cgroup_sock_addr(recvmsg4)]
pub fn redirect_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_dns_source(&ctx);
    PROCEED
}

/// getpeername() on a pod's socket: the application sees the peer it asked for.
#[cgroup_sock_addr(getpeername4)]
pub fn redirect_getpeername4(ctx: SockAddrContext) -> i32 {
    let a = ctx.sock_addr;
    // SAFETY: valid context.
    let (ip, port, kind) = unsafe {
        (
            (*a).user_ip4,
            u16::from_be((*a).user_port as u16),
            (*a).type_,
        )
    };
    if ip != LOCALHOST {
        return PROCEED;
    }
    if kind == SOCK_DGRAM {
        restore_dns_source(&ctx);
        return PROCEED;
    }
    if port != OUTBOUND_PORT {
        return PROCEED;
    }
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value, copied out at once.
    if let Some(orig) = unsafe { ORIG_DST_BY_COOKIE.get(&cookie) } {
        let (ip, port) = (orig.ip, orig.port);
        // SAFETY: writable context fields of getpeername4.
        unsafe {
            core::ptr::write_volatile(&mut (*a).user_ip4, ip);
            core::ptr::write_volatile(&mut (*a).user_port, u32::from(port.to_be()));
        }
    }
    PROCEED
}

/// Once a captured connection is established its source port is known: file the
/// original destination under (netns, source ip, source port), which is what the
/// tunnel sees as the peer of the connection it accepts.
#[sock_ops]
pub fn redirect_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || ctx.family() != AF_INET {
        return 1;
    }
    // SAFETY: helpers valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value, copied out at once.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(&cookie) }).copied() else {
        return 1;
    };
    let key = ConnKey {
        // SAFETY: as above.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        ip: ctx.local_ip4(),
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
    // SAFETY: the kernel hands every sk_lookup program a valid context.
    let l = unsafe { &*ctx.lookup };
    if l.family != AF_INET || l.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    // The pod talking to itself (and the tunnel delivering to the application from
    // the pod's own address) is loopback traffic: untouched.
    if l.remote_ip4 == l.local_ip4 || is_loopback(l.local_ip4) {
        return SK_PASS;
    }
    let kind = if l.local_port == u32::from(HBONE_PORT) {
        LISTENER_HBONE
    } else {
        LISTENER_PLAINTEXT
    };
    let key = ListenerKey {
        pod_ip: l.local_ip4,
        kind,
    };
    match LISTENERS.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => SK_PASS,
        Err(_) => SK_DROP,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
