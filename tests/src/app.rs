//! Stand-in applications for pods.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::mpsc,
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
    task: Option<JoinHandle<Vec<SocketAddr>>>,
}

impl EchoServer {
    /// Starts listening on 0.0.0.0:`port` in `pod`; returns once it listens.
    pub fn start(pod: &Pod, port: u16) -> Result<Self> {
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
                        let Ok((mut stream, peer)) = accepted else { continue };
                        peers.push(peer);
                        let name = name.clone();
                        tokio::spawn(async move {
                            let mut message = Vec::new();
                            if stream.read_to_end(&mut message).await.is_ok() {
                                let mut reply = format!("{name}:").into_bytes();
                                reply.extend_from_slice(&message);
                                let _ = stream.write_all(&reply).await;
                            }
                        });
                    }
                }
            }
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("echo server did not start")?
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
