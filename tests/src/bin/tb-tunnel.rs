//! A stand-in node tunnel for the redirection tests: it enrolls pods with ztunnel's
//! `redirect` module and answers on the captured sockets, saying what it saw, so a
//! test can check from a client's reply where a connection went.
//!
//!   tb-tunnel --pin-dir DIR --pod-cgroup-root DIR [--pod NETNS,CGROUP,IP[,udp]]...
//!
//! (`udp`: the pod may send UDP other than DNS in plaintext.)
//!
//! - outbound (15001): replies `outbound orig=<original destination>\n`, then relays
//!   to that destination from the node, as the tunnel's own (uncaptured) connection;
//! - inbound plaintext (15006): replies `inbound dst=<ip:port> peer=<ip:port>\n`, then
//!   relays to the application from inside the pod;
//! - HBONE (15008): replies `hbone dst=<ip:port> peer=<ip:port>\n`;
//! - DNS (15053): answers each datagram with `dns pod=<pod ip> query=<payload>`.
//!
//! Prints `ready` once every pod is enrolled. Reads commands on stdin:
//! `enroll NETNS,CGROUP,IP` and `unenroll IP`, answering `ok` or `error=...`.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpSocket, TcpStream, UdpSocket},
    sync::Mutex,
    task::JoinSet,
};
use ztunnel::{
    netns,
    redirect::{OrigDstMap, PodListeners, PodNetwork, RedirectConfig, Redirector},
};

struct Tunnel {
    redirector: Redirector,
    orig_dst: Arc<OrigDstMap>,
    /// Per enrolled pod: its netns cookie and the tasks serving its listeners.
    pods: HashMap<Ipv4Addr, (u64, JoinSet<()>)>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut pin_dir, mut root, mut pods) = (None, None, Vec::new());
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--pin-dir" => pin_dir = Some(PathBuf::from(value()?)),
            "--pod-cgroup-root" => root = Some(PathBuf::from(value()?)),
            "--pod" => pods.push(parse_pod(&value()?)?),
            other => bail!("unknown argument {other}"),
        }
    }
    let mut redirector = Redirector::start(RedirectConfig {
        pin_dir: pin_dir.context("--pin-dir is required")?,
        pod_cgroup_root: root.context("--pod-cgroup-root is required")?,
    })?;
    let orig_dst = Arc::new(redirector.take_orig_dst()?);
    let tunnel = Arc::new(Mutex::new(Tunnel {
        redirector,
        orig_dst,
        pods: HashMap::new(),
    }));
    for pod in &pods {
        enroll(&tunnel, pod).await?;
    }
    println!("ready");

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = stdin.next_line().await? {
        let result = match line.split_once(' ') {
            Some(("enroll", pod)) => match parse_pod(pod) {
                Ok(pod) => enroll(&tunnel, &pod).await,
                Err(e) => Err(e),
            },
            Some(("unenroll", ip)) => unenroll(&tunnel, ip).await,
            _ => Err(anyhow!("unknown command {line:?}")),
        };
        match result {
            Ok(()) => println!("ok"),
            Err(e) => println!("error={e:#}"),
        }
    }
    Ok(())
}

fn parse_pod(text: &str) -> Result<PodNetwork> {
    let mut parts = text.split(',');
    let (Some(netns), Some(cgroup), Some(ip), udp, None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        bail!("a pod is NETNS,CGROUP,IP[,udp]; got {text:?}");
    };
    Ok(PodNetwork {
        netns: netns.into(),
        cgroup: cgroup.into(),
        ip: ip.parse().context("pod IP")?,
        allow_plaintext_udp: match udp {
            None => false,
            Some("udp") => true,
            Some(other) => bail!("unknown pod option {other:?}"),
        },
        dns_capture: true,
    })
}

async fn enroll(tunnel: &Arc<Mutex<Tunnel>>, pod: &PodNetwork) -> Result<()> {
    let mut guard = tunnel.lock().await;
    let listeners = guard.redirector.enroll(pod)?;
    let cookie = listeners.netns_cookie;
    let tasks = serve(tunnel.clone(), pod.clone(), listeners)?;
    guard.pods.insert(pod.ip, (cookie, tasks));
    Ok(())
}

async fn unenroll(tunnel: &Arc<Mutex<Tunnel>>, ip: &str) -> Result<()> {
    let ip: Ipv4Addr = ip.parse()?;
    let mut guard = tunnel.lock().await;
    let (cookie, tasks) = guard.pods.remove(&ip).context("pod not enrolled")?;
    drop(tasks); // aborts the tasks, closing the listeners
    Ok(guard.redirector.unenroll(cookie, ip)?)
}

fn serve(tunnel: Arc<Mutex<Tunnel>>, pod: PodNetwork, l: PodListeners) -> Result<JoinSet<()>> {
    let mut tasks = JoinSet::new();
    let cookie = l.netns_cookie;
    let outbound = TcpListener::from_std(l.outbound)?;
    tasks.spawn(accept_loop(outbound, move |stream, peer| {
        let tunnel = tunnel.clone();
        async move {
            let SocketAddr::V4(peer) = peer else {
                return Ok(());
            };
            let orig_dst = tunnel.lock().await.orig_dst.clone();
            let orig = orig_dst.take(cookie, peer);
            let header = match orig {
                Some(orig) => format!("outbound orig={orig}\n"),
                None => "outbound orig=unknown\n".to_owned(),
            };
            let Some(orig) = orig else {
                return reply_only(stream, &header).await;
            };
            // The tunnel's own connection, from the node: never captured.
            match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(orig)).await {
                Ok(Ok(upstream)) => relay(stream, &header, upstream).await,
                _ => reply_only(stream, &header).await,
            }
        }
    }));

    let inbound = TcpListener::from_std(l.inbound_plaintext)?;
    let netns_path = pod.netns.clone();
    tasks.spawn(accept_loop(inbound, move |stream, peer| {
        let netns_path = netns_path.clone();
        async move {
            let dst = stream.local_addr()?;
            let header = format!("inbound dst={dst} peer={peer}\n");
            // Deliver from inside the pod, with the tunnel's mark.
            let socket = netns::tcp_socket_in(&netns_path)?;
            let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
            match socket.connect(dst).await {
                Ok(upstream) => relay(stream, &header, upstream).await,
                Err(_) => reply_only(stream, &header).await,
            }
        }
    }));

    let hbone = TcpListener::from_std(l.hbone)?;
    tasks.spawn(accept_loop(hbone, |stream, peer| async move {
        let dst = stream.local_addr()?;
        reply_only(stream, &format!("hbone dst={dst} peer={peer}\n")).await
    }));

    let dns = UdpSocket::from_std(l.dns)?;
    let pod_ip = pod.ip;
    tasks.spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = dns.recv_from(&mut buf).await {
            let query = String::from_utf8_lossy(&buf[..n]);
            let answer = format!("dns pod={pod_ip} query={query}");
            let _ = dns.send_to(answer.as_bytes(), from).await;
        }
    });
    Ok(tasks)
}

async fn accept_loop<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    while let Ok((stream, peer)) = listener.accept().await {
        let connection = handle(stream, peer);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("tb-tunnel: connection from {peer}: {e:#}");
            }
        });
    }
}

async fn reply_only(mut stream: TcpStream, header: &str) -> Result<()> {
    // Read what the client sent first: closing with unread data would reset the
    // connection under the client's feet.
    tokio::io::copy(&mut stream, &mut tokio::io::sink()).await?;
    stream.write_all(header.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

async fn relay(mut downstream: TcpStream, header: &str, mut upstream: TcpStream) -> Result<()> {
    downstream.write_all(header.as_bytes()).await?;
    tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await?;
    Ok(())
}
