//! A packet capture (AF_PACKET) inside a network namespace, for checking what
//! crosses the wire.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use anyhow::{Context, Result};

/// One captured frame (Ethernet).
#[derive(Clone, Debug)]
pub struct Packet {
    pub data: Vec<u8>,
}

impl Packet {
    /// (source port, destination port) of an IPv4 TCP frame.
    pub fn tcp_ports(&self) -> Option<(u16, u16)> {
        let d = &self.data;
        if d.len() < 34 || d[12..14] != [0x08, 0x00] || d[23] != 6 {
            return None;
        }
        let tcp = 14 + usize::from(d[14] & 0x0f) * 4;
        let ports = d.get(tcp..tcp + 4)?;
        Some((
            u16::from_be_bytes([ports[0], ports[1]]),
            u16::from_be_bytes([ports[2], ports[3]]),
        ))
    }

    /// (source, destination) of an IPv4 TCP frame: addresses and ports.
    pub fn tcp_endpoints(&self) -> Option<(SocketAddrV4, SocketAddrV4)> {
        let (sport, dport) = self.tcp_ports()?;
        let ip = |at: usize| {
            let octets: [u8; 4] = self.data.get(at..at + 4)?.try_into().ok()?;
            Some(Ipv4Addr::from(octets))
        };
        Some((
            SocketAddrV4::new(ip(26)?, sport),
            SocketAddrV4::new(ip(30)?, dport),
        ))
    }
}

/// HBONE's port: the only one pod traffic may use between nodes.
pub const HBONE_PORT: u16 = 15008;

/// What crossed between nodes that should not have: TCP on a port not in `allowed`
/// (HBONE and the control plane), or `marker` in the clear. None when nothing did.
pub fn plaintext_crossed(packets: &[Packet], allowed: &[u16], marker: &[u8]) -> Option<String> {
    if let Some((s, d)) = packets
        .iter()
        .filter_map(Packet::tcp_ports)
        .find(|(s, d)| !allowed.contains(s) && !allowed.contains(d))
    {
        return Some(format!("TCP from port {s} to port {d} crossed the fabric"));
    }
    packets
        .iter()
        .any(|p| p.data.windows(marker.len()).any(|w| w == marker))
        .then(|| "the payload crossed the fabric in the clear".to_owned())
}

/// Captures every frame on every interface of a namespace until stopped.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Packet>>,
}

impl Capture {
    pub fn start(netns: &Path) -> Result<Self> {
        let ns =
            std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let socket = (|| -> std::io::Result<OwnedFd> {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
                // SAFETY: plain socket(2); the descriptor is owned from here on.
                let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: fd is a fresh descriptor nobody else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                let timeout = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 50_000,
                };
                // SAFETY: a valid socket and a correctly sized option.
                unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        (&timeout as *const libc::timeval).cast(),
                        std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                    );
                }
                Ok(fd)
            })();
            let socket = match socket {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Vec::new();
                }
            };
            let mut packets = Vec::new();
            let mut buf = vec![0u8; 65_536];
            while !stopping.load(Ordering::Acquire) {
                // SAFETY: buf is valid for its length.
                let n = unsafe {
                    libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n > 0 {
                    packets.push(Packet {
                        data: buf[..n as usize].to_vec(),
                    });
                }
            }
            packets
        });
        ready_rx
            .recv()
            .context("capture thread")?
            .context("opening the capture socket")?;
        Ok(Self { stop, thread })
    }

    /// Stops and returns everything captured.
    pub fn stop(self) -> Vec<Packet> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or_default()
    }
}
