//! Same-node splice: a connection from one enrolled pod to another pod this tunnel
//! serves skips HBONE. Once identity and policy are decided (the source is the pod
//! the connection was captured from, so its identity is known as surely as an
//! mTLS peer's), the tunnel delivers to the application as the inbound side would
//! and joins its two plain sockets — the client's captured connection and the
//! delivery — in the kernel: the `splice_verdict` sk_skb program, attached to the
//! `ZT_SPLICE_SOCKETS` sockhash, sends what arrives on one out on the other, so no
//! byte passes through user space.
//!
//! The tunnel keeps both sockets: it watches them for the ends of the two
//! directions (a FIN is passed on once the bytes before it have been), closes
//! them when a policy change denies the connection, and takes the byte counts
//! for Istio's metrics and the access log from the sockets' own counters
//! (`TCP_INFO`, `SIOCOUTQ`). If the kernel cannot join them (program not loaded,
//! map full, a refusal), the tunnel relays the two sockets in user space.
//!
//! Off by default (`--same-node-splice`): without it same-node traffic takes HBONE
//! as any other.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData, SockHash},
    programs::{sk_skb::SkSkbLinkId, SkSkb},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use ztunnel_ebpf_common::maps;

use crate::{
    accept::Conn,
    orig_src::Delivery,
    policy::Connection,
    proxy::{relay, Context, Record},
    redirect::Redirector,
    sockinfo,
    state::{State, Workload},
};

/// What the tunnel does with a connection between two pods it serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// HBONE, as to any other pod.
    #[default]
    Off,
    /// Joined in the kernel (sockmap); relayed in user space if that fails.
    Kernel,
    /// Relayed in user space without HBONE (for kernels without sockmap, and to
    /// compare).
    User,
}

const PROGRAM: &str = "splice_verdict";
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection was not joined in the kernel.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("splicing in the kernel is off (--same-node-splice=user)")]
    Disabled,
    #[error("the splice program is not loaded: {0}")]
    NotLoaded(Arc<str>),
    #[error("a socket is no longer established (a peer already sent FIN)")]
    NotEstablished,
    #[error("reading a socket cookie: {0}")]
    Cookie(io::Error),
    #[error("the kernel refused the splice: {}", detail(.0))]
    Map(#[from] aya::maps::MapError),
}

/// The OS error behind a map error (aya's own message leaves it out).
fn detail(e: &aya::maps::MapError) -> String {
    match e {
        aya::maps::MapError::SyscallError(e) => format!("{}: {}", e.call, e.io_error),
        other => other.to_string(),
    }
}

impl SpliceError {
    fn label(&self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::NotLoaded(_) => "not_loaded",
            Self::Cookie(_) => "cookie",
            Self::NotEstablished => "not_established",
            // Only established sockets go into a sockhash: one whose peer
            // already sent FIN (a short exchange) cannot be spliced.
            Self::Map(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                "not_established"
            }
            Self::Map(_) => "map",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    /// `spliced`, or why the connection was relayed in user space instead.
    result: String,
}

/// The loaded program's maps.
struct Kernel {
    sockets: SockHash<MapData, u64>,
    peers: BpfHashMap<MapData, u64, u64>,
    _link: SkSkbLinkId,
}

/// A pod this tunnel serves, as a same-node destination.
#[derive(Clone)]
struct LocalPod {
    workload: Arc<Workload>,
    delivery: Delivery,
    generation: u64,
}

/// The node's same-node splicing: the pods served here and the kernel maps.
pub struct Splicer {
    mode: Mode,
    kernel: Result<Mutex<Kernel>, Arc<str>>,
    local: Mutex<HashMap<Ipv4Addr, LocalPod>>,
    generation: AtomicU64,
    connections: Family<ResultLabels, Counter>,
    /// Bytes of spliced connections the tunnel carried itself (left by the
    /// program on a socket whose peer was not in the map yet, or gone).
    carried: Counter,
}

impl Splicer {
    /// Loads and attaches the splice program when `mode` is [`Mode::Kernel`]; a
    /// failure is logged and leaves the user-space relay.
    pub fn new(mode: Mode, redirector: &mut Redirector, registry: &mut Registry) -> Self {
        let connections = Family::default();
        registry.register(
            "ztunnel_same_node_connections",
            "Connections between two pods of this node that skipped HBONE: joined in the kernel (result=spliced) or relayed in user space (result: why not spliced)",
            connections.clone(),
        );
        let carried = Counter::default();
        registry.register(
            "ztunnel_same_node_carried_bytes",
            "Bytes of spliced connections that the tunnel carried in user space (the kernel joined the sockets after they arrived)",
            carried.clone(),
        );
        let kernel = match mode {
            Mode::Kernel => load(redirector).map(Mutex::new).map_err(|e| {
                tracing::warn!(
                    "same-node splice: loading the program failed, relaying in user space: {e}"
                );
                Arc::from(e.to_string())
            }),
            Mode::Off | Mode::User => Err(Arc::from("not requested")),
        };
        Self {
            mode,
            kernel,
            local: Mutex::default(),
            generation: AtomicU64::new(0),
            connections,
            carried,
        }
    }

    /// Makes `workload` a same-node destination (at once) until the returned
    /// future, which never ends, is dropped with the pod's other tasks.
    pub fn serve_local(
        self: &Arc<Self>,
        workload: Arc<Workload>,
        delivery: Delivery,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        // Removed when dropped, unless a newer enrollment of the same address
        // replaced it.
        struct Unregister(Arc<Splicer>, Ipv4Addr, u64);
        impl Drop for Unregister {
            fn drop(&mut self) {
                let mut local = self.0.local.lock().expect("not poisoned");
                if local.get(&self.1).is_some_and(|p| p.generation == self.2) {
                    local.remove(&self.1);
                }
            }
        }
        let registered = (self.mode != Mode::Off).then(|| {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            let ip = workload.ip;
            self.local.lock().expect("not poisoned").insert(
                ip,
                LocalPod {
                    workload,
                    delivery,
                    generation,
                },
            );
            Unregister(self.clone(), ip, generation)
        });
        async move {
            let _registered = registered;
            std::future::pending::<()>().await
        }
    }

    fn local_pod(&self, workload: &Workload) -> Option<LocalPod> {
        if self.mode == Mode::Off {
            return None;
        }
        let local = self.local.lock().expect("not poisoned");
        local
            .get(&workload.ip)
            .filter(|p| p.workload.identity == workload.identity)
            .cloned()
    }

    fn count(&self, result: &str) {
        self.connections
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    /// Joins two sockets in the kernel.
    fn join(&self, a: &TcpStream, b: &TcpStream) -> Result<Joined<'_>, SpliceError> {
        if self.mode != Mode::Kernel {
            return Err(SpliceError::Disabled);
        }
        let kernel = self
            .kernel
            .as_ref()
            .map_err(|e| SpliceError::NotLoaded(e.clone()))?;
        // Only established sockets go into a sockhash: a client that sent all
        // and half-closed before the decision is relayed (checked first, so
        // that no socket goes in and out of the map).
        const TCP_ESTABLISHED: u8 = 1;
        for s in [a, b] {
            if sockinfo::tcp_counters(s).map_or(true, |c| c.state != TCP_ESTABLISHED) {
                return Err(SpliceError::NotEstablished);
            }
        }
        let (ca, cb) = (
            sockinfo::cookie(a).map_err(SpliceError::Cookie)?,
            sockinfo::cookie(b).map_err(SpliceError::Cookie)?,
        );
        let joined = Joined {
            kernel,
            cookies: [ca, cb],
        };
        let mut k = kernel.lock().expect("not poisoned");
        k.peers.insert(ca, cb, 0)?;
        k.peers.insert(cb, ca, 0)?;
        // The delivery first: until the client's socket is in, bytes from the
        // application stay on its socket and the watcher carries them (see
        // `watch`), and the rest of that direction too, in order (the program
        // then drops the socket's peer entry); the client usually speaks first,
        // and its bytes already queued are taken by the program once its
        // socket is in.
        k.sockets.insert(cb, b.as_fd().as_raw_fd(), 0)?;
        k.sockets.insert(ca, a.as_fd().as_raw_fd(), 0)?;
        drop(k);
        // Bytes that arrived before the sockets were in the map wait in their
        // receive queues; the program runs when the kernel signals data ready,
        // which setting SO_RCVLOWAT does at once.
        for s in [a, b] {
            let _ = sockinfo::set_rcvlowat(s, 1);
        }
        Ok(joined)
    }
}

/// Why the splice program could not be loaded (the tunnel then relays in user
/// space).
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("the {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("the {what}: {}", ztunnel_core::telemetry::error_chain(.error))]
    Map {
        what: &'static str,
        error: aya::maps::MapError,
    },
    #[error("{what}: {}", ztunnel_core::telemetry::error_chain(.error))]
    Program {
        what: &'static str,
        error: aya::programs::ProgramError,
    },
}

fn load(redirector: &mut Redirector) -> Result<Kernel, LoadError> {
    let map = |what| move |error| LoadError::Map { what, error };
    let program = |what| move |error| LoadError::Program { what, error };
    let ebpf = redirector.ebpf();
    let sockets: SockHash<MapData, u64> = SockHash::try_from(
        ebpf.take_map(maps::SPLICE_SOCKETS)
            .ok_or(LoadError::Missing("splice sockhash"))?,
    )
    .map_err(map("splice sockhash"))?;
    let peers = BpfHashMap::try_from(
        ebpf.take_map(maps::SPLICE_PEERS)
            .ok_or(LoadError::Missing("splice peers map"))?,
    )
    .map_err(map("splice peers map"))?;
    let verdict: &mut SkSkb = ebpf
        .program_mut(PROGRAM)
        .ok_or(LoadError::Missing("splice program"))?
        .try_into()
        .map_err(program("the splice program"))?;
    verdict
        .load()
        .map_err(program("loading the splice program"))?;
    let link = verdict
        .attach(sockets.fd())
        .map_err(program("attaching the splice program to its sockhash"))?;
    Ok(Kernel {
        sockets,
        peers,
        _link: link,
    })
}

/// A spliced pair; taken out of the maps when dropped.
struct Joined<'a> {
    kernel: &'a Mutex<Kernel>,
    cookies: [u64; 2],
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        let mut k = self.kernel.lock().expect("not poisoned");
        for c in self.cookies {
            let _ = k.peers.remove(&c);
            let _ = k.sockets.remove(&c);
        }
    }
}

/// One spliced socket's payload counts, from the kernel's counters, which also
/// count the SYN of an active open and FINs (see [`sockinfo::TcpCounters`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    /// Payload bytes received.
    received: u64,
    /// Payload bytes put into the socket to send (acknowledged or still queued).
    queued: u64,
}

/// One side of a spliced pair, as the watcher follows it.
struct Side<'a> {
    socket: &'a TcpStream,
    /// The tunnel opened it (the delivery): its SYN is in its counters.
    active_open: bool,
    /// Its peer ended its direction (this side read the FIN).
    eof: bool,
    /// This side sent FIN (the other direction ended).
    shut: bool,
}

impl<'a> Side<'a> {
    fn new(socket: &'a TcpStream, active_open: bool) -> Self {
        Self {
            socket,
            active_open,
            eof: false,
            shut: false,
        }
    }

    fn counts(&self) -> Counts {
        let Ok(c) = sockinfo::tcp_counters(self.socket) else {
            return Counts::default();
        };
        Counts {
            received: c.bytes_received.saturating_sub(u64::from(self.eof)),
            queued: (c.bytes_acked + c.outq)
                .saturating_sub(u64::from(self.active_open) + u64::from(self.shut)),
        }
    }

    /// FIN to this side's peer once every byte `from` received is in this socket.
    fn pass_fin(&mut self, from: &Side) -> io::Result<()> {
        if !from.eof || self.shut || self.counts().queued < from.counts().received {
            return Ok(());
        }
        nix::sys::socket::shutdown(self.socket.as_raw_fd(), nix::sys::socket::Shutdown::Write)
            .map_err(io::Error::from)?;
        self.shut = true;
        Ok(())
    }
}

/// Why a spliced connection ended other than by both sides closing.
#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("closed: a policy change denies it")]
    Denied,
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl WatchError {
    /// The proxy's error for it (one per report: the source's and the destination's).
    fn to_proxy(&self) -> crate::proxy::Error {
        match self {
            Self::Denied => crate::proxy::Error::DeniedByPolicyChange,
            Self::Io(e) => crate::proxy::Error::Relay(io::Error::new(e.kind(), e.to_string())),
        }
    }
}

/// Follows a spliced pair until both directions ended: passes each FIN on once the
/// bytes before it have gone into the other socket, carries any bytes the
/// program left on a socket, and ends at once when `cancel` fires.
async fn watch(
    a: &mut Side<'_>,
    b: &mut Side<'_>,
    cancel: &CancellationToken,
    carried: &Counter,
) -> Result<(), WatchError> {
    let mut backoff = Duration::from_micros(50);
    loop {
        // A FIN waits for the bytes before it: checked again after a short while.
        let waiting = (a.eof && !b.shut) || (b.eof && !a.shut);
        tokio::select! {
            _ = cancel.cancelled() => return Err(WatchError::Denied),
            r = a.socket.readable(), if !a.eof => { r?; a.eof = carry(a.socket, b.socket, carried).await?; }
            r = b.socket.readable(), if !b.eof => { r?; b.eof = carry(b.socket, a.socket, carried).await?; }
            _ = tokio::time::sleep(backoff), if waiting => {
                backoff = (backoff * 2).min(Duration::from_millis(20));
            }
        }
        b.pass_fin(a)?;
        a.pass_fin(b)?;
        if a.shut && b.shut {
            return Ok(());
        }
    }
}

/// Reads what is readable on `from`: bytes the program left there go to `to` in
/// user space. Returns whether `from`'s peer ended its direction.
async fn carry(from: &TcpStream, to: &TcpStream, carried: &Counter) -> io::Result<bool> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.try_read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => {
                carried.inc_by(n as u64);
                write_all(to, &buf[..n]).await?
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Carries a connection from `source` to `destination`:`port` if the destination
/// is a pod this tunnel serves and policy allows it; returns false (nothing done,
/// `record` untouched) otherwise, for the HBONE path to carry it, deny it and log
/// it as for any other destination.
#[allow(clippy::too_many_arguments)]
pub async fn same_node(
    ctx: &Context,
    state: &State,
    source: &Arc<Workload>,
    destination: &Arc<Workload>,
    port: u16,
    service: &Option<String>,
    record: &mut Record,
    stream: &mut Conn,
) -> bool {
    let Some(local) = ctx.splice.local_pod(destination) else {
        return false;
    };
    if crate::redirect::is_tunnel_port(port) {
        return false;
    }
    let target = SocketAddr::new(IpAddr::V4(destination.ip), port);
    let conn = Connection {
        source_identity: Some(source.identity.clone()),
        source_ip: IpAddr::V4(source.ip),
        destination_ip: target.ip(),
        destination_port: port,
    };
    // A denial is the HBONE path's to log and count, exactly as for a remote client.
    if !state.policies.authorize(destination, &conn).allow
        || ctx.authorize(state, destination, &conn, false).is_err()
    {
        return false;
    }
    let app = match local
        .delivery
        .connect(Some(IpAddr::V4(source.ip)), target, APP_CONNECT_TIMEOUT)
        .await
    {
        Ok(app) => app,
        Err(e) => {
            tracing::debug!(%target, "same-node delivery failed, trying HBONE: {e:#}");
            return false;
        }
    };
    // The two reports HBONE would have made: the source's and the destination's.
    record.destination = Some(destination.clone());
    record.destination_service = service.clone();
    record.mtls = true;
    record.opened(&ctx.metrics);
    let inbound = Record {
        started: Instant::now(),
        reporter: "destination",
        source_addr: SocketAddr::new(IpAddr::V4(source.ip), 0),
        destination_addr: target,
        source: Some(source.clone()),
        destination: Some(destination.clone()),
        source_principal: Some(source.identity.to_string()),
        destination_service: None,
        mtls: true,
    };
    inbound.opened(&ctx.metrics);
    let registration = ctx.active.register(conn, destination.clone(), false);
    let mut app = app;
    let outcome = match ctx.splice.join(stream, &app) {
        Ok(joined) => {
            ctx.splice.count("spliced");
            tracing::debug!(src = %source.name, %target, "same-node connection spliced in the kernel");
            let (mut client, mut server) = (Side::new(stream, false), Side::new(&app, true));
            let result = watch(
                &mut client,
                &mut server,
                &registration.cancelled,
                &ctx.splice.carried,
            )
            .await;
            let (client, server) = (client.counts(), server.counts());
            drop(joined);
            // The relay's counts: (client → server, server → client).
            let counts = (
                client.received,
                client.queued,
                server.queued,
                server.received,
            );
            result.map(|()| counts).map_err(|e| (counts, e))
        }
        Err(e) => {
            ctx.splice.count(e.label());
            tracing::debug!(src = %source.name, %target, "same-node connection relayed in user space: {e}");
            tokio::select! {
                r = relay(stream, &mut app) => r.map(|(up, down)| (up, down, up, down)).map_err(|e| ((0, 0, 0, 0), WatchError::Io(e))),
                _ = registration.cancelled.cancelled() => Err(((0, 0, 0, 0), WatchError::Denied)),
            }
        }
    };
    match outcome {
        Ok((received, sent, app_received, app_sent)) => {
            record.ended(&ctx.metrics, received, sent, None);
            inbound.ended(&ctx.metrics, app_received, app_sent, None);
        }
        Err(((received, sent, app_received, app_sent), e)) => {
            record.ended(&ctx.metrics, received, sent, Some(e.to_proxy()));
            inbound.ended(&ctx.metrics, app_received, app_sent, Some(e.to_proxy()));
        }
    }
    drop(registration);
    true
}
