//! Loads the redirection programs (ztunnel-ebpf) and enrolls pods into them.
//!
//! The cgroup programs are attached once, at the cgroup that holds every pod of the
//! node, and act only on sockets whose network namespace is in the `ENROLLED` map;
//! enrolling a pod is a map update plus one `sk_lookup` attach to its network
//! namespace. Maps and links are pinned under a bpffs directory, so a restarted
//! tunnel finds them in place: the pods stay captured (and fail closed) while it is
//! away, and on return it only has to open its listeners again.
//!
//! Pin layout under the directory:
//!
//! ```text
//! maps/ZT_*                    the maps (see ztunnel_ebpf_common::maps)
//! links/<program>              the cgroup links on the pod cgroup root
//! pods/<netns cookie>/inbound  each enrolled pod's sk_lookup link
//! ```

use std::{
    cell::RefCell,
    fs::{self, File},
    io,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use aya::{
    maps::{HashMap, MapData, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps,
    },
    Ebpf, EbpfLoader,
};
use ztunnel_ebpf_common::{
    maps, ConnKey, DeliveryKey, ListenerKey, OrigDst, PodConfig, FLAG_ALLOW_PLAINTEXT_UDP,
    FLAG_NO_DNS_CAPTURE, LISTENER_HBONE, LISTENER_PLAINTEXT,
};
pub use ztunnel_ebpf_common::{DNS_PORT, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use crate::netns::{self, Netns, NetnsError};
use ztunnel_core::telemetry::error_chain;

/// Why the redirection could not be installed, or a pod captured or released.
/// `what` says which step (with the path or the program's name).
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("{what}: {error}")]
    Io { what: String, error: io::Error },
    #[error("{what}: {error}")]
    Sys { what: String, error: nix::Error },
    #[error(
        "{} is not on a bpffs mount: mount one (mount -t bpf bpf /sys/fs/bpf, or `ztunnel \
         mount-bpffs /sys/fs/bpf`)",
        .0.display()
    )]
    NotBpffs(PathBuf),
    #[error(
        "pod cgroup {} is not under the pod cgroup root {}: its traffic would not be captured",
        .cgroup.display(),
        .root.display()
    )]
    CgroupOutsideRoot { cgroup: PathBuf, root: PathBuf },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("loading the redirection programs: {}", error_chain(.0))]
    Load(aya::EbpfError),
    #[error("{0} missing from the eBPF object")]
    Missing(String),
    #[error("{what}: {}", error_chain(.error))]
    Program {
        what: String,
        error: aya::programs::ProgramError,
    },
    #[error("{what}: {}", error_chain(.error))]
    Link {
        what: String,
        error: aya::programs::links::LinkError,
    },
    #[error("pinning {}: {}", .path.display(), error_chain(.error))]
    Pin {
        path: PathBuf,
        error: aya::pin::PinError,
    },
    #[error("{what}: {}", error_chain(.error))]
    Map {
        what: String,
        error: aya::maps::MapError,
    },
}

type Result<T, E = RedirectError> = std::result::Result<T, E>;

/// Error constructors for `map_err`, naming the step.
fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> RedirectError {
    let what = what.into();
    move |error| RedirectError::Io { what, error }
}

fn program_error(
    what: impl Into<String>,
) -> impl FnOnce(aya::programs::ProgramError) -> RedirectError {
    let what = what.into();
    move |error| RedirectError::Program { what, error }
}

fn link_error(
    what: impl Into<String>,
) -> impl FnOnce(aya::programs::links::LinkError) -> RedirectError {
    let what = what.into();
    move |error| RedirectError::Link { what, error }
}

fn map_error(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> RedirectError {
    let what = what.into();
    move |error| RedirectError::Map { what, error }
}

fn pin_error(path: &Path) -> impl FnOnce(aya::pin::PinError) -> RedirectError {
    let path = path.to_owned();
    move |error| RedirectError::Pin { path, error }
}

/// The compiled redirection programs, embedded at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztunnel-redirect"));

/// The cgroup programs: (program name in the object, pin name).
const CGROUP_PROGRAMS: [(&str, &str); 8] = [
    ("redirect_connect4", "connect4"),
    ("redirect_connect6", "connect6"),
    ("redirect_sendmsg4", "sendmsg4"),
    ("redirect_sendmsg6", "sendmsg6"),
    ("redirect_recvmsg4", "recvmsg4"),
    ("redirect_recvmsg6", "recvmsg6"),
    ("redirect_getpeername4", "getpeername4"),
    ("redirect_getpeername6", "getpeername6"),
];
const SOCKOPS_PROGRAM: (&str, &str) = ("redirect_sockops", "sockops");
const INBOUND_PROGRAM: &str = "redirect_inbound";
/// cgroup BPF links always coexist with other programs on the same cgroup (another
/// tunnel, another product); the kernel refuses multi-attach flags on links, so the
/// "single" mode here means "no flags", not "exclusive".
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// Where the redirection lives on this node.
#[derive(Clone, Debug)]
pub struct RedirectConfig {
    /// A directory on a bpffs mount for this tunnel's pins (created if missing).
    pub pin_dir: PathBuf,
    /// The cgroup v2 directory under which every pod of the node has its cgroup.
    pub pod_cgroup_root: PathBuf,
}

/// A pod as the redirection sees it.
#[derive(Clone, Debug)]
pub struct PodNetwork {
    /// The pod's network namespace, e.g. `/run/netns/<name>` or `/proc/<pid>/ns/net`.
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory; must lie under [`RedirectConfig::pod_cgroup_root`].
    pub cgroup: PathBuf,
    pub ip: Ipv4Addr,
    /// The pod may send UDP other than DNS in plaintext (its namespace opted out
    /// with [`crate::config::ALLOW_PLAINTEXT_UDP_ANNOTATION`]); otherwise that UDP is refused.
    pub allow_plaintext_udp: bool,
    /// The pod's DNS (UDP/53) goes to the tunnel's DNS proxy; false: straight out.
    pub dns_capture: bool,
}

fn pod_config(ip: Ipv4Addr, allow_plaintext_udp: bool, dns_capture: bool) -> PodConfig {
    let mut flags = 0;
    if allow_plaintext_udp {
        flags |= FLAG_ALLOW_PLAINTEXT_UDP;
    }
    if !dns_capture {
        flags |= FLAG_NO_DNS_CAPTURE;
    }
    PodConfig {
        pod_ip: u32::from_ne_bytes(ip.octets()),
        flags,
    }
}

/// The tunnel's sockets inside one enrolled pod. Closing them (or the process
/// exiting) leaves the pod failing closed until the pod is enrolled again.
#[derive(Debug)]
pub struct PodListeners {
    pub netns_cookie: u64,
    /// The pod's namespace, held open: every later socket in the pod is made in
    /// it, whatever its path names by then.
    pub netns: Netns,
    /// Captured outbound TCP, 127.0.0.1:15001.
    pub outbound: TcpListener,
    /// Captured inbound plaintext, assigned by sk_lookup.
    pub inbound_plaintext: TcpListener,
    /// Inbound HBONE, assigned by sk_lookup.
    pub hbone: TcpListener,
    /// Captured DNS, 127.0.0.1:15053.
    pub dns: UdpSocket,
}

/// The loaded programs and the maps the tunnel reads and writes.
pub struct Redirector {
    config: RedirectConfig,
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, PodConfig>,
    listeners: SockHash<MapData, ListenerKey>,
}

impl Redirector {
    /// Loads the programs, reusing pinned maps, and attaches the cgroup programs to
    /// the pod cgroup root unless a previous run left them attached.
    pub fn start(config: RedirectConfig) -> Result<Self> {
        let maps_dir = config.pin_dir.join("maps");
        let links_dir = config.pin_dir.join("links");
        for dir in [&maps_dir, &links_dir, &config.pin_dir.join("pods")] {
            fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
        }
        // Pins elsewhere would die with this process, and with them the capture of
        // every pod while the tunnel is away: refuse rather than fail open.
        if !is_bpffs(&config.pin_dir)? {
            return Err(RedirectError::NotBpffs(config.pin_dir.clone()));
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(OBJECT)
            .map_err(RedirectError::Load)?;
        let root = File::open(&config.pod_cgroup_root).map_err(io_error(format!(
            "opening cgroup {}",
            config.pod_cgroup_root.display()
        )))?;

        // Loads a cgroup program and attaches it to the pod cgroup root, unless a
        // previous run's link is pinned (the cgroup programs have no common trait).
        macro_rules! load_and_attach {
            ($kind:ty, $name:expr, $pin:expr) => {{
                let (name, pin) = ($name, links_dir.join($pin));
                let program: &mut $kind = program_mut(&mut ebpf, name)?;
                program
                    .load()
                    .map_err(program_error(format!("loading {name}")))?;
                if !pin.exists() {
                    let attaching = format!("attaching {name} to the pod cgroup root");
                    let id = program
                        .attach(root.as_fd(), LINK_MODE)
                        .map_err(program_error(&attaching))?;
                    let link: FdLink = program
                        .take_link(id)
                        .map_err(program_error(&attaching))?
                        .try_into()
                        .map_err(link_error(&attaching))?;
                    link.pin(&pin).map_err(pin_error(&pin))?;
                }
            }};
        }
        for (name, pin) in CGROUP_PROGRAMS {
            load_and_attach!(CgroupSockAddr, name, pin);
        }
        let (name, pin) = SOCKOPS_PROGRAM;
        load_and_attach!(SockOps, name, pin);
        let program: &mut SkLookup = program_mut(&mut ebpf, INBOUND_PROGRAM)?;
        program
            .load()
            .map_err(program_error(format!("loading {INBOUND_PROGRAM}")))?;

        let enrolled = HashMap::try_from(take_map(&mut ebpf, maps::ENROLLED)?)
            .map_err(map_error(maps::ENROLLED))?;
        let listeners = SockHash::try_from(take_map(&mut ebpf, maps::LISTENERS)?)
            .map_err(map_error(maps::LISTENERS))?;
        Ok(Self {
            config,
            ebpf,
            enrolled,
            listeners,
        })
    }

    /// Captures a pod's traffic and opens the tunnel's listeners inside it. Enrolling
    /// a pod that is already enrolled (e.g. after a restart) only replaces the
    /// listeners.
    pub fn enroll(&mut self, pod: &PodNetwork) -> Result<PodListeners> {
        if !pod.cgroup.starts_with(&self.config.pod_cgroup_root) {
            return Err(RedirectError::CgroupOutsideRoot {
                cgroup: pod.cgroup.clone(),
                root: self.config.pod_cgroup_root.clone(),
            });
        }
        let ns = Netns::open_for_pod(&pod.netns, &pod.cgroup)?;
        let (netns_cookie, outbound, inbound_plaintext, hbone, dns) =
            netns::run_in_ns(&ns, open_listeners).map_err(io_error(format!(
                "opening listeners in {}",
                pod.netns.display()
            )))?;
        let listeners = PodListeners {
            netns_cookie,
            netns: ns,
            outbound,
            inbound_plaintext,
            hbone,
            dns,
        };
        let cookie = listeners.netns_cookie;
        let config = pod_config(pod.ip, pod.allow_plaintext_udp, pod.dns_capture);
        let pod_ip = config.pod_ip;

        for (kind, socket) in [
            (LISTENER_PLAINTEXT, &listeners.inbound_plaintext),
            (LISTENER_HBONE, &listeners.hbone),
        ] {
            self.listeners
                .insert(ListenerKey { pod_ip, kind }, socket.as_raw_fd(), 0)
                .map_err(map_error("registering an inbound listener"))?;
        }
        let pin = self.pod_pin_dir(cookie).join("inbound");
        if !pin.exists() {
            let dir = self.pod_pin_dir(cookie);
            fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
            let program: &mut SkLookup = program_mut(&mut self.ebpf, INBOUND_PROGRAM)?;
            let attaching = "attaching the inbound sk_lookup program to the pod's netns";
            let id = program
                .attach(listeners.netns.as_fd())
                .map_err(program_error(attaching))?;
            let link: FdLink = program
                .take_link(id)
                .map_err(program_error(attaching))?
                .into();
            link.pin(&pin).map_err(pin_error(&pin))?;
        }
        self.enrolled
            .insert(cookie, config, 0)
            .map_err(map_error("adding the pod to the enrolled map"))?;
        Ok(listeners)
    }

    /// Changes what an enrolled pod may send outside the mesh, and whether its DNS
    /// is captured: one map update.
    pub fn set_pod_flags(
        &mut self,
        netns_cookie: u64,
        ip: Ipv4Addr,
        allow_plaintext_udp: bool,
        dns_capture: bool,
    ) -> Result<()> {
        self.enrolled
            .insert(
                netns_cookie,
                pod_config(ip, allow_plaintext_udp, dns_capture),
                0,
            )
            .map_err(map_error("updating the pod in the enrolled map"))
    }

    /// Stops capturing the pod: its traffic flows directly again.
    pub fn unenroll(&mut self, netns_cookie: u64, ip: Ipv4Addr) -> Result<()> {
        self.release_netns(netns_cookie)?;
        self.remove_listeners(ip)
    }

    /// Stops capturing the namespace (its map entry and its sk_lookup link), but
    /// leaves the listeners registered for its IP (another namespace may serve it).
    pub fn release_netns(&mut self, netns_cookie: u64) -> Result<()> {
        remove_if_present(self.enrolled.remove(&netns_cookie))
            .map_err(map_error("removing the pod from the enrolled map"))?;
        let dir = self.pod_pin_dir(netns_cookie);
        let pin = dir.join("inbound");
        if pin.exists() {
            // Unpinning and dropping the last reference detaches the link.
            let unpinning = format!("unpinning {}", pin.display());
            let link = PinnedLink::from_pin(&pin).map_err(link_error(&unpinning))?;
            drop(link.unpin().map_err(io_error(unpinning))?);
        }
        remove_dir_if_present(&dir).map_err(io_error(format!("removing {}", dir.display())))?;
        Ok(())
    }

    /// Unregisters the inbound listeners for a pod IP.
    pub fn remove_listeners(&mut self, ip: Ipv4Addr) -> Result<()> {
        let pod_ip = u32::from_ne_bytes(ip.octets());
        for kind in [LISTENER_PLAINTEXT, LISTENER_HBONE] {
            remove_if_present(self.listeners.remove(&ListenerKey { pod_ip, kind }))
                .map_err(map_error("unregistering an inbound listener"))?;
        }
        Ok(())
    }

    /// The original destinations of captured connections; there is one, taken once.
    pub fn take_orig_dst(&mut self) -> Result<OrigDstMap> {
        let map = take_map(&mut self.ebpf, maps::ORIG_DST)?;
        // Its kind and sizes checked once here: each thread's handle is made from it.
        HashMap::<_, ConnKey, OrigDst>::try_from(&map).map_err(map_error(maps::ORIG_DST))?;
        let (aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data)) = &map else {
            return Err(RedirectError::Missing(format!(
                "hash map {}",
                maps::ORIG_DST
            )));
        };
        Ok(OrigDstMap {
            fd: data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(io_error(format!("duplicating {}", maps::ORIG_DST)))?,
            id: NEXT_ORIG_DST_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The map of deliveries from a client's address that `sk_lookup` lets
    /// through (see [`crate::orig_src`]); there is one, taken once.
    pub fn take_deliveries(&mut self) -> Result<HashMap<MapData, DeliveryKey, u8>> {
        HashMap::try_from(take_map(&mut self.ebpf, maps::DELIVERIES)?)
            .map_err(map_error(maps::DELIVERIES))
    }

    /// Netns cookies of every pod enrolled, including by a previous run.
    pub fn enrolled_pods(&self) -> Result<Vec<(u64, Ipv4Addr)>> {
        self.enrolled
            .iter()
            .map(|entry| {
                let (cookie, config) = entry.map_err(map_error(maps::ENROLLED))?;
                Ok((cookie, Ipv4Addr::from(config.pod_ip.to_ne_bytes())))
            })
            .collect()
    }

    /// The loaded object: the same-node splice takes its program and maps from it.
    pub(crate) fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    fn pod_pin_dir(&self, netns_cookie: u64) -> PathBuf {
        self.config
            .pin_dir
            .join("pods")
            .join(netns_cookie.to_string())
    }
}

/// The original destinations of captured connections (the `ORIG_DST` map), read
/// on every outbound connection with no lock: each thread takes entries through
/// its own handle on the map (a duplicate of one descriptor), so a lookup waits
/// neither for enrollment (the redirector) nor for other lookups.
pub struct OrigDstMap {
    fd: std::os::fd::OwnedFd,
    /// Tells this map's thread handles from another instance's.
    id: u64,
}

static NEXT_ORIG_DST_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static ORIG_DST_HANDLE: RefCell<Option<(u64, HashMap<MapData, ConnKey, OrigDst>)>> =
        const { RefCell::new(None) };
}

impl OrigDstMap {
    /// The destination a pod asked for, given the peer address of a connection
    /// accepted on that pod's outbound listener. Taken, not read: a later
    /// connection from the same address and port (one made straight to the
    /// listener) must not inherit it.
    pub fn take(&self, netns_cookie: u64, peer: SocketAddrV4) -> Option<SocketAddrV4> {
        let key = ConnKey {
            netns_cookie,
            ip: u32::from_ne_bytes(peer.ip().octets()),
            port: peer.port(),
            _pad: 0,
        };
        ORIG_DST_HANDLE.with_borrow_mut(|handle| {
            if handle.as_ref().is_none_or(|(id, _)| *id != self.id) {
                match self.thread_handle() {
                    Ok(map) => *handle = Some((self.id, map)),
                    Err(e) => {
                        // Fail closed: the connection is refused (NR).
                        tracing::warn!("opening the original-destination map: {e}");
                        return None;
                    }
                }
            }
            let (_, map) = handle.as_mut()?;
            let orig = map.get(&key, 0).ok()?;
            let _ = map.remove(&key);
            Some(SocketAddrV4::new(
                Ipv4Addr::from(orig.ip.to_ne_bytes()),
                orig.port,
            ))
        })
    }

    fn thread_handle(&self) -> Result<HashMap<MapData, ConnKey, OrigDst>> {
        let what = || format!("a handle on {}", maps::ORIG_DST);
        let fd = self.fd.try_clone().map_err(io_error(what()))?;
        let data = MapData::from_fd(fd).map_err(map_error(what()))?;
        HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_error(what()))
    }
}

/// Removes every pin of a tunnel (`ztunnel uninstall`): the links, which detaches
/// the programs from the pod cgroup root and from every pod's namespace, and the
/// maps. The pods' traffic flows directly again. Returns how many pins it removed.
pub fn uninstall(pin_dir: &Path) -> Result<usize> {
    fn count(dir: &Path) -> io::Result<usize> {
        let mut n = 0;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            n += match entry.file_type()?.is_dir() {
                true => count(&entry.path())?,
                false => 1,
            };
        }
        Ok(n)
    }
    let pins = match count(pin_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        other => other.map_err(io_error(format!("reading {}", pin_dir.display())))?,
    };
    fs::remove_dir_all(pin_dir).map_err(io_error(format!("removing {}", pin_dir.display())))?;
    Ok(pins)
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| RedirectError::Missing(format!("program {name}")))?;
    program
        .try_into()
        .map_err(program_error(format!("program {name}")))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| RedirectError::Missing(format!("map {name}")))
}

/// A missing key is fine: sockhash entries vanish by themselves when the socket
/// closes, and a previous attempt may have removed the rest.
fn remove_if_present(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        other => other,
    }
}

fn remove_dir_if_present(dir: &Path) -> io::Result<()> {
    match fs::remove_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

type Listeners = (u64, TcpListener, TcpListener, TcpListener, UdpSocket);

/// Runs inside the pod's network namespace.
fn open_listeners() -> io::Result<Listeners> {
    let localhost = Ipv4Addr::LOCALHOST;
    let tcp = |port| -> io::Result<TcpListener> {
        let listener = TcpListener::bind(SocketAddrV4::new(localhost, port))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    };
    let outbound = tcp(OUTBOUND_PORT)?;
    // Marked like every socket the tunnel makes in a pod: its answers are never
    // judged as the pod's own UDP, even where the tunnel runs under the pod root.
    let dns = netns::marked_socket(socket2::Type::DGRAM, socket2::Protocol::UDP)?;
    dns.bind(&SocketAddrV4::new(localhost, DNS_PORT).into())?;
    let dns = UdpSocket::from(dns);
    Ok((
        netns::cookie(&outbound)?,
        outbound,
        tcp(INBOUND_PLAINTEXT_PORT)?,
        tcp(HBONE_PORT)?,
        dns,
    ))
}

/// The tunnel's own ports (Istio's): captured, inbound, HBONE, DNS, admin, metrics,
/// readiness. A connection to one of them on the node, or delivered to one of them
/// in a pod, would be the tunnel calling itself.
pub const TUNNEL_PORTS: [u16; 7] = [
    15000,
    OUTBOUND_PORT,
    INBOUND_PLAINTEXT_PORT,
    HBONE_PORT,
    15020,
    15021,
    DNS_PORT,
];

pub fn is_tunnel_port(port: u16) -> bool {
    TUNNEL_PORTS.contains(&port)
}

/// The IPv4 addresses of the tunnel's own (the node's) network namespace, read
/// when asked: addresses come and go.
pub fn node_addresses() -> io::Result<Vec<Ipv4Addr>> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .collect())
}

/// `statfs` f_type of a bpffs mount.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Whether the path lies on a bpffs mount.
pub fn is_bpffs(path: &Path) -> Result<bool> {
    let stat = nix::sys::statfs::statfs(path).map_err(|error| RedirectError::Sys {
        what: format!("statfs {}", path.display()),
        error,
    })?;
    Ok(stat.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Mounts bpffs at `path` unless one is there already; returns whether it mounted.
/// (Some nodes, e.g. kind's, come without one; pins must outlive the tunnel.)
pub fn mount_bpffs(path: &Path) -> Result<bool> {
    fs::create_dir_all(path).map_err(io_error(format!("creating {}", path.display())))?;
    if is_bpffs(path)? {
        return Ok(false);
    }
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|error| RedirectError::Sys {
        what: format!("mounting bpffs at {}", path.display()),
        error,
    })?;
    Ok(true)
}
