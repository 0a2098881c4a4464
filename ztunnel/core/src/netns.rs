//! Network namespace helpers: hold a pod's namespace open, run code inside it, make
//! the tunnel's sockets there.
//!
//! A pod's namespace is identified by the namespace itself (an open nsfs file and
//! its inode), never by a path: `/proc/<pid>/ns/net` names whatever process has
//! that PID now, and a reused PID can point it at another namespace (the host's).

use std::{
    fmt,
    fs::File,
    io,
    net::SocketAddr,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::Duration,
};

use nix::sched::{setns, CloneFlags};

/// `SO_NETNS_COOKIE` (Linux 5.14+): a socket's network namespace cookie, the same
/// value `bpf_get_netns_cookie()` returns to the programs.
const SO_NETNS_COOKIE: libc::c_int = 71;
/// `statfs` f_type of nsfs: what every namespace file lives on.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    /// The namespace's inode on nsfs: the same for every path naming it.
    pub inode: u64,
}

/// Why a path does not give the pod's network namespace.
#[derive(Debug)]
pub enum NetnsError {
    /// The path cannot be opened (the pod or its process is gone).
    Open(PathBuf, io::Error),
    /// The path is not a namespace file.
    NotANamespace(PathBuf),
    /// `/proc/<pid>/ns/net` of a process that is not (or no longer) in the pod's
    /// cgroup: the PID was reused, the namespace is someone else's.
    NotThePods {
        path: PathBuf,
        pid: u32,
        cgroup: PathBuf,
    },
}

impl fmt::Display for NetnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open(path, e) => write!(f, "opening {}: {e}", path.display()),
            Self::NotANamespace(path) => {
                write!(f, "{} is not a network namespace", path.display())
            }
            Self::NotThePods { path, pid, cgroup } => write!(
                f,
                "{} names the namespace of process {pid}, which is not in the pod's cgroup {} (a reused PID?): refused",
                path.display(),
                cgroup.display()
            ),
        }
    }
}

impl std::error::Error for NetnsError {}

impl std::os::fd::AsFd for Netns {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Netns {
    /// Opens the namespace at `path`.
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|e| NetnsError::Open(path.to_owned(), e))?;
        let fs = nix::sys::statfs::fstatfs(&file)
            .map_err(|e| NetnsError::Open(path.to_owned(), e.into()))?;
        if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
            return Err(NetnsError::NotANamespace(path.to_owned()));
        }
        let inode = file
            .metadata()
            .map_err(|e| NetnsError::Open(path.to_owned(), e))?
            .ino();
        Ok(Self { file, inode })
    }

    /// Opens a pod's namespace. A `/proc/<pid>/ns/net` path is accepted only if,
    /// once the namespace is open (so the PID can no longer change what we hold),
    /// the process is still in the pod's cgroup.
    pub fn open_for_pod(path: &Path, cgroup: &Path) -> Result<Self, NetnsError> {
        let ns = Self::open(path)?;
        if let Some(pid) = proc_pid(path) {
            if !crate::discovery::cgroup_holds(cgroup, pid) {
                return Err(NetnsError::NotThePods {
                    path: path.to_owned(),
                    pid,
                    cgroup: cgroup.to_owned(),
                });
            }
        }
        Ok(ns)
    }

    /// Whether `path` still names this namespace.
    pub fn is_at(&self, path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| m.ino() == self.inode)
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            inode: self.inode,
        })
    }
}

/// The PID of a `/proc/<pid>/ns/net` path.
pub(crate) fn proc_pid(path: &Path) -> Option<u32> {
    let rest = path.strip_prefix("/proc").ok()?;
    let mut parts = rest.components();
    let pid = parts.next()?.as_os_str().to_str()?.parse().ok()?;
    (parts.as_path() == Path::new("ns/net")).then_some(pid)
}

/// Runs `f` on a short-lived thread that has entered the network namespace at
/// `netns`. Sockets `f` creates belong to that namespace for their whole life; the
/// calling thread never changes namespace.
pub fn run_in<T, F>(netns: &Path, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let ns = Netns::open(netns).map_err(io::Error::other)?;
    run_in_ns(&ns, f)
}

/// Like [`run_in`], for a namespace held open.
pub fn run_in_ns<T, F>(netns: &Netns, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let ns = netns.file.try_clone()?;
    thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("thread inside the network namespace panicked"))?
}

/// The network namespace cookie of the namespace `socket` lives in.
pub fn cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    crate::sockinfo::socket_option_u64(socket, SO_NETNS_COOKIE)
}

/// A non-blocking TCP socket created inside the network namespace at `netns` and
/// marked as the tunnel's own, so the redirection programs never capture it. Connect
/// it from any thread (e.g. with `tokio::net::TcpSocket::from_std_stream`).
pub fn tcp_socket_in(netns: &Path) -> io::Result<socket2::Socket> {
    run_in(netns, marked_tcp_socket)
}

/// Makes the tunnel's (marked) sockets inside one pod. Every connection the
/// tunnel makes on a pod's behalf (delivery to the application, traffic leaving
/// the mesh, HBONE from the pod's address) is dialed with its sockets, so it
/// leaves from the pod's own address, never the node's.
///
/// A socket belongs to the namespace it was created in for its whole life, so the
/// calling thread enters the pod's namespace for the one `socket(2)` call and
/// returns to its own at once: two `setns(2)` calls, where a thread kept in the
/// pod cost a message, two wake-ups and a thread per enrolled pod. A thread that
/// could not return would make later sockets in the wrong namespace: the process
/// aborts instead (the pods fail closed while the tunnel is away).
#[derive(Clone)]
pub struct SocketFactory {
    netns: Arc<File>,
}

thread_local! {
    /// The calling thread's own namespace, to return to (opened on first use).
    static HOME: std::cell::OnceCell<File> = const { std::cell::OnceCell::new() };
}

impl SocketFactory {
    /// Fails if the namespace cannot be entered (or left).
    pub fn new(netns: &Netns) -> io::Result<Self> {
        let factory = Self {
            netns: Arc::new(netns.file.try_clone()?),
        };
        factory.tcp_socket_marked(ztunnel_ebpf_common::TUNNEL_MARK)?;
        Ok(factory)
    }

    /// A non-blocking, marked TCP socket in the pod's namespace.
    pub async fn tcp_socket(&self) -> io::Result<socket2::Socket> {
        self.tcp_socket_marked(ztunnel_ebpf_common::TUNNEL_MARK)
    }

    /// A non-blocking TCP socket in the pod's namespace with `mark` (one the
    /// redirection programs leave alone).
    pub fn tcp_socket_marked(&self, mark: u32) -> io::Result<socket2::Socket> {
        HOME.with(|home| {
            let home = match home.get() {
                Some(home) => home,
                None => {
                    let own = File::open("/proc/thread-self/ns/net")?;
                    home.get_or_init(|| own)
                }
            };
            setns(&*self.netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            let socket = ipv4_socket(socket2::Type::STREAM, socket2::Protocol::TCP);
            if let Err(e) = setns(home, CloneFlags::CLONE_NEWNET) {
                tracing::error!("cannot return to the tunnel's network namespace after making a pod's socket: {e}; aborting (pods fail closed)");
                std::process::abort();
            }
            let socket = socket?;
            socket.set_mark(mark)?;
            Ok(socket)
        })
    }

    /// A TCP connection to `target` made from inside the pod, as the tunnel.
    pub async fn connect(
        &self,
        target: SocketAddr,
        timeout: Duration,
    ) -> io::Result<tokio::net::TcpStream> {
        let socket = self.tcp_socket().await?;
        let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
        let stream = tokio::time::timeout(timeout, socket.connect(target))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

fn marked_tcp_socket() -> io::Result<socket2::Socket> {
    marked_socket(socket2::Type::STREAM, socket2::Protocol::TCP)
}

/// A non-blocking, close-on-exec IPv4 socket in the calling thread's namespace.
fn ipv4_socket(kind: socket2::Type, protocol: socket2::Protocol) -> io::Result<socket2::Socket> {
    socket2::Socket::new(
        socket2::Domain::IPV4,
        kind.nonblocking().cloexec(),
        Some(protocol),
    )
}

/// A non-blocking IPv4 socket in the calling thread's namespace, marked as the
/// tunnel's own: the redirection programs never capture or judge it.
pub fn marked_socket(
    kind: socket2::Type,
    protocol: socket2::Protocol,
) -> io::Result<socket2::Socket> {
    let socket = ipv4_socket(kind, protocol)?;
    socket.set_mark(ztunnel_ebpf_common::TUNNEL_MARK)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_proc_pid_ns_net_paths_carry_a_pid() {
        assert_eq!(proc_pid(Path::new("/proc/42/ns/net")), Some(42));
        assert_eq!(proc_pid(Path::new("/proc/self/ns/net")), None);
        assert_eq!(proc_pid(Path::new("/proc/42/ns/mnt")), None);
        assert_eq!(proc_pid(Path::new("/run/netns/42")), None);
    }
}
