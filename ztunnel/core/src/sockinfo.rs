//! What the kernel knows about a TCP socket that the standard library does not
//! expose: its cookie and its byte counters (for connections whose bytes the
//! tunnel does not see, e.g. spliced in the kernel).

use std::{io, os::fd::AsRawFd};

/// `SO_COOKIE`: the socket's unique, never-reused id (what BPF programs see).
const SO_COOKIE: libc::c_int = 57;

/// The socket's cookie.
pub fn cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    socket_option_u64(socket, SO_COOKIE)
}

/// A `SOL_SOCKET` option whose value is a u64 (a cookie).
#[allow(unsafe_code)] // one libc call, see SAFETY
pub(crate) fn socket_option_u64(socket: &impl AsRawFd, option: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: value/len describe a valid u64 buffer for the kernel to fill.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Sets `SO_RCVLOWAT`. For TCP this also makes the kernel signal "data ready" at
/// once if data is queued, which runs a sockmap program on what arrived before the
/// socket was put in the map.
#[allow(unsafe_code)] // one libc call, see SAFETY
pub fn set_rcvlowat(socket: &impl AsRawFd, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid c_int option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A TCP socket's byte counters, raw as the kernel keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// `tcpi_state`: `TCP_ESTABLISHED` is 1.
    pub state: u8,
    /// `tcpi_bytes_received`: sequence space received, a FIN included.
    pub bytes_received: u64,
    /// `tcpi_bytes_acked`: sequence space acknowledged by the peer, an active
    /// open's SYN and a FIN included.
    pub bytes_acked: u64,
    /// `SIOCOUTQ`: sequence space queued and not yet acknowledged (a FIN included).
    pub outq: u64,
}

/// Reads `TCP_INFO` and `SIOCOUTQ`.
#[allow(unsafe_code)] // two libc calls, see SAFETY
pub fn tcp_counters(socket: &impl AsRawFd) -> io::Result<TcpCounters> {
    let fd = socket.as_raw_fd();
    // SAFETY: tcp_info is plain data (all integers), valid zeroed.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: info/len describe a valid tcp_info buffer for the kernel to fill.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut outq: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one c_int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpCounters {
        state: info.tcpi_state,
        bytes_received: info.tcpi_bytes_received,
        bytes_acked: info.tcpi_bytes_acked,
        outq: outq.max(0) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn counters_count_payload_plus_syn_and_fin() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(&[1; 1000]).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 1000);
        let s = tcp_counters(&server).unwrap();
        assert_eq!(s.bytes_received, 1001, "payload and FIN");
        let c = tcp_counters(&client).unwrap();
        // SYN, payload and FIN, acknowledged or still queued.
        assert_eq!(c.bytes_acked + c.outq, 1002);
        assert_ne!(cookie(&client).unwrap(), cookie(&server).unwrap());
        set_rcvlowat(&server, 1).unwrap();
    }
}
