//! A small network client for tests to run inside pods (as a process, so that it is
//! in the pod's cgroup). Prints what it saw as `key=value` lines.
//!
//!   tb-probe connect <ip:port> <message>   send, read the reply to EOF
//!   tb-probe dns <ip:port> <query>         one datagram with sendto, print the reply
//!   tb-probe hold-cluster <spec.yaml>      build a cluster, print its prefix, wait
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["connect", addr, message] => connect(addr, message),
        ["dns", addr, query] => dns(addr, query),
        ["hold-cluster", spec] => hold_cluster(spec),
        _ => Err(anyhow::anyhow!(
            "usage: tb-probe connect <ip:port> <message> | dns <ip:port> <query> | hold-cluster <spec.yaml>"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("error={e:#}");
            ExitCode::FAILURE
        }
    }
}

fn connect(addr: &str, message: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    // Short: tests also check that a dropped SYN never connects.
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    println!("peer={}", stream.peer_addr()?);
    println!("local={}", stream.local_addr()?);
    stream.write_all(message.as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    println!("reply={reply}");
    Ok(())
}

fn dns(addr: &str, query: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let socket = match addr {
        SocketAddr::V4(_) => UdpSocket::bind("0.0.0.0:0")?,
        SocketAddr::V6(_) => UdpSocket::bind("[::]:0")?,
    };
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.send_to(query.as_bytes(), addr)?;
    let mut buf = [0u8; 1500];
    let (n, from) = socket.recv_from(&mut buf)?;
    println!("from={from}");
    println!("reply={}", String::from_utf8_lossy(&buf[..n]));
    Ok(())
}

fn hold_cluster(spec: &str) -> anyhow::Result<()> {
    let spec = testbed::ClusterSpec::from_file(spec.as_ref())?;
    let cluster = testbed::Cluster::new(&spec)?;
    println!("prefix={}", cluster.prefix());
    loop {
        std::thread::park();
    }
}
