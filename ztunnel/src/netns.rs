//! Network namespace helpers: run code inside a pod's namespace, identify one.

use std::{fs::File, io, os::fd::AsRawFd, path::Path, thread};

use nix::sched::{setns, CloneFlags};

/// `SO_NETNS_COOKIE` (Linux 5.14+): a socket's network namespace cookie, the same
/// value `bpf_get_netns_cookie()` returns to the programs.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Runs `f` on a short-lived thread that has entered the network namespace at
/// `netns`. Sockets `f` creates belong to that namespace for their whole life; the
/// calling thread never changes namespace.
pub fn run_in<T, F>(netns: &Path, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let ns = File::open(netns)?;
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
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: value/len describe a valid u64 buffer for the kernel to fill.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// A non-blocking TCP socket created inside the network namespace at `netns` and
/// marked as the tunnel's own, so the redirection programs never capture it. Connect
/// it from any thread (e.g. with `tokio::net::TcpSocket::from_std_stream`).
pub fn tcp_socket_in(netns: &Path) -> io::Result<socket2::Socket> {
    run_in(netns, marked_tcp_socket)
}

type SocketReply = tokio::sync::oneshot::Sender<io::Result<socket2::Socket>>;

/// Makes the tunnel's (marked) sockets inside one pod: a thread that stays in the
/// pod's network namespace, so a connection to the application costs a message,
/// not a thread. The thread ends when the last clone is dropped.
#[derive(Clone)]
pub struct SocketFactory {
    requests: std::sync::mpsc::Sender<SocketReply>,
}

impl SocketFactory {
    pub fn new(netns: &Path) -> io::Result<Self> {
        let ns = File::open(netns)?;
        let (requests, incoming) = std::sync::mpsc::channel::<SocketReply>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        thread::Builder::new()
            .name("netns-sockets".into())
            .spawn(move || {
                if let Err(e) = setns(&ns, CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(io::Error::from(e)));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                while let Ok(reply) = incoming.recv() {
                    let _ = reply.send(marked_tcp_socket());
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("the socket thread did not start"))??;
        Ok(Self { requests })
    }

    /// A non-blocking, marked TCP socket in the pod's namespace.
    pub async fn tcp_socket(&self) -> io::Result<socket2::Socket> {
        let (reply, socket) = tokio::sync::oneshot::channel();
        self.requests
            .send(reply)
            .map_err(|_| io::Error::other("the socket thread is gone"))?;
        socket
            .await
            .map_err(|_| io::Error::other("the socket thread is gone"))?
    }
}

fn marked_tcp_socket() -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM.nonblocking().cloexec(),
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_mark(ztunnel_ebpf_common::TUNNEL_MARK)?;
    Ok(socket)
}
