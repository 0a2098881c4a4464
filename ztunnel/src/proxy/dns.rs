//! DNS from enrolled pods (captured UDP/53): forwarded to the node's resolver, the
//! answer relayed back (the redirection makes it seem to come from the server the
//! pod asked).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::UdpSocket;

use crate::state::Workload;

const TIMEOUT: Duration = Duration::from_secs(5);

/// The first nameserver of the node's resolv.conf.
fn upstream() -> Option<SocketAddr> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
}

pub async fn serve(pod: Arc<Workload>, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) => {
                tracing::debug!(pod = %pod.name, "DNS receive failed: {e}");
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let socket = socket.clone();
        tokio::spawn(async move {
            let Some(server) = upstream() else {
                return tracing::debug!("DNS: the node has no nameserver");
            };
            let result = async {
                let out = UdpSocket::bind(if server.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                })
                .await?;
                out.send_to(&query, server).await?;
                let mut answer = vec![0u8; 4096];
                let n = tokio::time::timeout(TIMEOUT, out.recv(&mut answer)).await??;
                socket.send_to(&answer[..n], client).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            }
            .await;
            if let Err(e) = result {
                tracing::debug!(%server, "DNS forward failed: {e}");
            }
        });
    }
}
