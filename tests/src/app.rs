//! Stand-in applications for pods.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{mpsc, Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::oneshot,
};

use crate::Pod;

/// A TCP server in a pod that answers each connection with `<pod>:<what it read>`
/// once the client has shut down its sending side, and remembers who connected.
pub struct EchoServer {
    stop: Option<oneshot::Sender<()>>,
    task: Option<std::thread::JoinHandle<Vec<SocketAddr>>>,
}

impl EchoServer {
    /// Starts listening on 0.0.0.0:`port` in `pod`; returns once it listens.
    pub fn start(pod: &Pod, port: u16) -> Result<Self> {
        Self::serve(pod, port, echo)
    }

    /// Serves each accepted connection with `handle(stream, pod name)`.
    pub(crate) fn serve<F, Fut>(pod: &Pod, port: u16, handle: F) -> Result<Self>
    where
        F: Fn(tokio::net::TcpStream, String) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let name = pod.name.clone();
        let task = pod.spawn_task(move || async move {
            let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Vec::new();
                }
            };
            let _ = ready_tx.send(Ok(()));
            let mut peers = Vec::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => return peers,
                    accepted = listener.accept() => {
                        let Ok((stream, peer)) = accepted else { continue };
                        peers.push(peer);
                        tokio::spawn(handle(stream, name.clone()));
                    }
                }
            }
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("server did not start")?
            .with_context(|| format!("binding port {port} in pod {}", pod.name))?;
        Ok(Self {
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Stops the server and returns the peer address of every connection it took.
    pub fn stop(mut self) -> Result<Vec<SocketAddr>> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<Vec<SocketAddr>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.join().map_err(|_| anyhow!("echo server panicked")),
            None => Ok(Vec::new()),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// A UDP server in a pod that answers each datagram with `<pod>:<payload>` and
/// remembers who sent it.
pub struct UdpEcho {
    socket: std::net::UdpSocket,
    task: Option<JoinHandle<Vec<SocketAddr>>>,
}

impl UdpEcho {
    /// Serves 0.0.0.0:`port` in `pod`.
    pub fn start(pod: &Pod, port: u16) -> Result<Self> {
        let socket =
            pod.in_netns(move || std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))??;
        let serving = socket.try_clone()?;
        let name = pod.name.clone();
        let task = std::thread::spawn(move || {
            let mut peers = Vec::new();
            let mut buf = [0u8; 1500];
            // Ends when stop() shuts the socket down (an empty datagram to itself).
            while let Ok((n, from)) = serving.recv_from(&mut buf) {
                if n == 0 {
                    break;
                }
                peers.push(from);
                let reply = format!("{name}:{}", String::from_utf8_lossy(&buf[..n]));
                let _ = serving.send_to(reply.as_bytes(), from);
            }
            peers
        });
        Ok(Self {
            socket,
            task: Some(task),
        })
    }

    /// Stops the server and returns the source of every datagram it got.
    pub fn stop(mut self) -> Result<Vec<SocketAddr>> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<Vec<SocketAddr>> {
        let Some(task) = self.task.take() else {
            return Ok(Vec::new());
        };
        // An empty datagram from the socket to itself (on the pod's loopback).
        let own = self.socket.local_addr()?;
        self.socket
            .send_to(&[], (Ipv4Addr::LOCALHOST, own.port()))?;
        task.join().map_err(|_| anyhow!("UDP echo panicked"))
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// Connects from the current network namespace, sends `message`, returns the reply.
pub async fn exchange(addr: SocketAddr, message: &str) -> Result<String> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr} timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
    stream.write_all(message.as_bytes()).await?;
    stream.shutdown().await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut reply))
        .await
        .context("reading the reply timed out")??;
    Ok(reply)
}

/// Pins the calling thread to one CPU (for latency measurements that must control
/// placement).
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Pins every thread of a process to one CPU.
pub fn pin_process(pid: u32, cpu: usize) -> std::io::Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: i32 = task?.file_name().to_string_lossy().parse().unwrap_or(0);
        // SAFETY: as above, for another thread id.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// A server for measurements, in a pod: `sink` mode reads to EOF and answers with
/// the byte count; `echo` mode writes back every byte as it arrives.
pub struct BenchServer {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Vec<SocketAddr>>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BenchMode {
    Sink,
    Echo,
}

impl BenchServer {
    pub fn start(pod: &Pod, port: u16, mode: BenchMode, cpu: Option<usize>) -> Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = pod.spawn_task(move || async move {
            if let Some(cpu) = cpu {
                let _ = pin_current_thread(cpu);
            }
            let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Vec::new();
                }
            };
            let _ = ready_tx.send(Ok(()));
            loop {
                tokio::select! {
                    _ = &mut stopped => return Vec::new(),
                    accepted = listener.accept() => {
                        let Ok((mut stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 256 * 1024];
                            let mut total = 0u64;
                            loop {
                                let n = match stream.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => n,
                                };
                                total += n as u64;
                                if mode == BenchMode::Echo && stream.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                            if mode == BenchMode::Sink {
                                let _ = stream.write_all(total.to_string().as_bytes()).await;
                            }
                        });
                    }
                }
            }
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("bench server did not start")?
            .with_context(|| format!("binding port {port} in pod {}", pod.name))?;
        Ok(Self {
            stop: Some(stop),
            task: Some(task),
        })
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.join();
        }
    }
}

/// A minimal HTTP/1.1 server in a pod: answers every request with 200 and the body
/// `<pod> <METHOD> <path>`, keeping connections alive; remembers every request line.
pub struct HttpServer {
    _inner: EchoServer,
    seen: Arc<Mutex<Vec<String>>>,
}

impl HttpServer {
    pub fn start(pod: &Pod, port: u16) -> Result<Self> {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let record = seen.clone();
        Ok(Self {
            _inner: EchoServer::serve(pod, port, move |stream, name| {
                serve_http(stream, name, record.clone())
            })?,
            seen,
        })
    }

    /// `<METHOD> <path>` of every request the application received, in order.
    pub fn requests(&self) -> Vec<String> {
        self.seen.lock().expect("not poisoned").clone()
    }

    /// Stops the server and returns the peer address of every connection it took.
    pub fn stop(self) -> Result<Vec<SocketAddr>> {
        self._inner.stop()
    }
}

/// Answers with `<pod>:<what it read>` once the client has shut down its side.
async fn echo(mut stream: tokio::net::TcpStream, name: String) {
    let mut message = Vec::new();
    if stream.read_to_end(&mut message).await.is_ok() {
        let mut reply = format!("{name}:").into_bytes();
        reply.extend_from_slice(&message);
        let _ = stream.write_all(&reply).await;
    }
}

async fn serve_http(stream: tokio::net::TcpStream, name: String, seen: Arc<Mutex<Vec<String>>>) {
    use tokio::io::AsyncBufReadExt;
    let mut stream = tokio::io::BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if stream.read_line(&mut request_line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        let mut close = false;
        // Headers the tests look for, echoed in the body.
        let mut echoed = Vec::new();
        loop {
            let mut header = String::new();
            if stream.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
            if let Some((k, v)) = header.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close") {
                    close = true;
                }
                let name = k.trim().to_ascii_lowercase();
                if name.starts_with("x-echo") || name == "authorization" {
                    echoed.push(format!(" {name}={}", v.trim()));
                }
            }
        }
        let mut body = vec![0u8; length];
        if stream.read_exact(&mut body).await.is_err() {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        seen.lock()
            .expect("not poisoned")
            .push(format!("{method} {path}"));
        let reply = format!("{name} {method} {path}{}", echoed.join(""));
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{reply}",
            reply.len()
        );
        if stream
            .get_mut()
            .write_all(response.as_bytes())
            .await
            .is_err()
            || close
        {
            return;
        }
    }
}
