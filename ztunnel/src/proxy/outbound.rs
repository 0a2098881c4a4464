//! Captured outbound connections: find the destination, then HBONE to its tunnel
//! (in-mesh workloads) or plain TCP (everything else).

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Instant,
};

use http::{HeaderMap, HeaderValue};
use ztunnel_core::balance::{Balancer, Turn};

use super::{
    pool::{self, Origin, PodOrigin},
    relay, Context, Error, Record,
};
use crate::{
    accept::{Acceptor, Conn},
    netns::SocketFactory,
    state::Workload,
};

/// Where a captured connection goes.
enum Route {
    /// An in-mesh workload: HBONE to its node's tunnel.
    Hbone {
        workload: Arc<Workload>,
        port: u16,
        service: Option<String>,
    },
    /// The destination uses a waypoint: HBONE to a waypoint pod, asking for the
    /// original destination (the service VIP or the pod).
    Waypoint {
        waypoint: Arc<Workload>,
        authority: SocketAddrV4,
        destination: Option<Arc<Workload>>,
        service: Option<String>,
    },
    /// Anything else: a direct connection, dialed from inside the pod (from its
    /// own address, never the node's).
    Passthrough {
        address: SocketAddrV4,
        workload: Option<Arc<Workload>>,
        service: Option<String>,
    },
}

pub async fn serve(
    ctx: Arc<Context>,
    source: Arc<Workload>,
    netns_cookie: u64,
    acceptor: Acceptor,
    origin: PodOrigin,
) {
    loop {
        let (stream, peer) = acceptor.accept().await;
        let (ctx2, source, origin) = (ctx.clone(), source.clone(), origin.clone());
        ctx.drain.spawn(async move {
            handle(ctx2, source, netns_cookie, stream, peer, origin).await;
        });
    }
}

async fn handle(
    ctx: Arc<Context>,
    source: Arc<Workload>,
    netns_cookie: u64,
    mut stream: Conn,
    peer: SocketAddr,
    origin: PodOrigin,
) {
    // (No delay is set by the acceptor.)
    let mut record = Record {
        started: Instant::now(),
        reporter: "source",
        source_addr: peer,
        destination_addr: peer,
        source: Some(source.clone()),
        destination: None,
        source_principal: None,
        destination_service: None,
        mtls: false,
    };
    // Only the pod itself can have made this connection: from loopback or from its
    // own address. Any other source address is spoofed.
    let SocketAddr::V4(peer_v4) = peer else {
        return record.refused(&ctx.metrics, &Error::NotIpv4);
    };
    if !peer_v4.ip().is_loopback() && *peer_v4.ip() != source.ip {
        tracing::warn!(pod = %source.name, %peer, "refused: source address is not the pod's");
        return record.refused(&ctx.metrics, &Error::SpoofedSource);
    }
    let original = ctx.orig_dst.take(netns_cookie, peer_v4);
    let Some(original) = original else {
        return record.refused(&ctx.metrics, &Error::NoOriginalDestination);
    };
    record.destination_addr = original.into();
    if let Some(why) = self_call(original) {
        tracing::warn!(pod = %source.name, %original, "refused: {why}");
        return record.refused(&ctx.metrics, &Error::SelfCall(why.into()));
    }
    let state = ctx.snapshot();
    // The source must still be this pod, at this address.
    if state
        .workload_by_ip(source.ip)
        .map(|w| w.identity != source.identity)
        .unwrap_or(true)
    {
        return record.refused(&ctx.metrics, &Error::SourceGone);
    }
    // Captured DNS over TCP is the DNS proxy's. (Boxed, like every path but
    // HBONE's relay: a task is as large as its largest step, and most idle
    // connections are HBONE ones.)
    if original.port() == 53 && ctx.dns.captures(&source, &state) {
        return Box::pin(crate::dns::serve_tcp(ctx.dns.clone(), source, stream)).await;
    }
    let route = match route(&state, original, &ctx.balancer) {
        Ok(route) => route,
        Err(e) => return record.refused(&ctx.metrics, &e),
    };
    let result = match route {
        Route::Hbone {
            workload,
            port,
            service,
        } => {
            // A pod this tunnel serves: no HBONE, if same-node splice is on.
            let splice = Box::pin(crate::splice::same_node(
                &ctx,
                &state,
                &source,
                &workload,
                port,
                &service,
                &mut record,
                &mut stream,
            ));
            if splice.await {
                return;
            }
            record.destination = Some(workload.clone());
            record.destination_service = service;
            record.mtls = true;
            record.opened(&ctx.metrics);
            hbone(&ctx, &origin, &source, &workload, port, &mut stream, peer).await
        }
        Route::Waypoint {
            waypoint,
            authority,
            destination,
            service,
        } => {
            record.destination = destination;
            record.destination_service = service;
            record.mtls = true;
            record.opened(&ctx.metrics);
            hbone_to(
                &ctx,
                &origin,
                &source,
                &waypoint,
                SocketAddr::V4(authority),
                &mut stream,
                peer,
            )
            .await
        }
        Route::Passthrough {
            address,
            workload,
            service,
        } => {
            record.destination = workload;
            record.destination_service = service;
            record.opened(&ctx.metrics);
            Box::pin(passthrough(
                origin.sockets(),
                address,
                ctx.hbone.connect_timeout,
                &mut stream,
            ))
            .await
        }
    };
    record.closed(&ctx.metrics, result);
}

fn route(
    state: &crate::state::State,
    original: SocketAddrV4,
    balancer: &Balancer<Turn>,
) -> Result<Route, Error> {
    let (ip, port) = (*original.ip(), original.port());
    if let Some(service) = state.service_by_vip(ip) {
        let name = format!("{}.{}.svc", service.name, service.namespace);
        let target = service
            .ports
            .iter()
            .find(|p| p.port == port)
            .ok_or_else(|| Error::NoRoute(format!("service {name} has no port {port}")))?
            .target_port;
        if service.endpoints.is_empty() {
            return Err(Error::NoRoute(format!("service {name} has no endpoints")));
        }
        if let Some(key) = &service.waypoint {
            if let Some(waypoint) = waypoint_pod(state, key, true, balancer)? {
                return Ok(Route::Waypoint {
                    waypoint,
                    authority: original,
                    destination: None,
                    service: Some(name),
                });
            }
        }
        // Round robin over its ready endpoints (the waypoint's balancer too).
        let workload = balancer
            .pick(&Turn::Service(ip), &service.endpoints)
            .cloned()
            .expect("endpoints, checked above");
        return Ok(match workload.captured {
            true => Route::Hbone {
                workload,
                port: target,
                service: Some(name),
            },
            false => Route::Passthrough {
                address: SocketAddrV4::new(workload.ip, target),
                workload: Some(workload),
                service: Some(name),
            },
        });
    }
    if let Some(workload) = state.workload_by_ip(ip) {
        if let Some(key) = &workload.waypoint {
            if let Some(waypoint) = waypoint_pod(state, key, false, balancer)? {
                return Ok(Route::Waypoint {
                    waypoint,
                    authority: original,
                    destination: Some(workload.clone()),
                    service: None,
                });
            }
        }
    }
    Ok(match state.workload_by_ip(ip) {
        Some(workload) if workload.captured => Route::Hbone {
            workload: workload.clone(),
            port,
            service: None,
        },
        workload => Route::Passthrough {
            address: original,
            workload: workload.cloned(),
            service: None,
        },
    })
}

/// A waypoint pod for traffic to `key`'s waypoint, if that waypoint handles this
/// kind of traffic: its pods in turn. A waypoint that is declared but has no pods
/// fails closed.
fn waypoint_pod(
    state: &crate::state::State,
    key: &(String, String),
    service: bool,
    balancer: &Balancer<Turn>,
) -> Result<Option<Arc<Workload>>, Error> {
    let Some(waypoint) = state.waypoint(key) else {
        return Err(Error::NoRoute(format!(
            "waypoint {}/{} is not declared (no Gateway of class istio-waypoint)",
            key.0, key.1
        )));
    };
    let serves = if service {
        waypoint.serves_services()
    } else {
        waypoint.serves_workloads()
    };
    if !serves {
        return Ok(None);
    }
    let turn = Turn::Waypoint(key.0.clone(), key.1.clone());
    match balancer.pick(&turn, &waypoint.pods) {
        Some(pod) => Ok(Some(pod.clone())),
        None => Err(Error::NoRoute(format!(
            "waypoint {}/{} has no pods",
            key.0, key.1
        ))),
    }
}

async fn hbone(
    ctx: &Context,
    origin: &PodOrigin,
    source: &Arc<Workload>,
    destination: &Arc<Workload>,
    port: u16,
    stream: &mut Conn,
    peer: SocketAddr,
) -> Result<(u64, u64), Error> {
    let authority = SocketAddr::new(IpAddr::V4(destination.ip), port);
    hbone_to(ctx, origin, source, destination, authority, stream, peer).await
}

/// Where HBONE from `source` to `peer` is dialed: from inside the source pod, so it
/// leaves from the pod's own address (peers, `ipBlocks` and NetworkPolicies see the
/// pod, not the node); but to the pod itself from the node, since inside the pod
/// its own address is local and the inbound capture does not take it there.
fn hbone_origin(origin: &PodOrigin, source: &Workload, peer: &Workload) -> Origin {
    match peer.ip == source.ip {
        true => Origin::Local,
        false => Origin::Pod(origin.clone()),
    }
}

/// HBONE to `peer`'s port 15008 (a workload's tunnel, or a waypoint), for
/// `authority`; `client` is where the captured connection came from.
async fn hbone_to(
    ctx: &Context,
    origin: &PodOrigin,
    source: &Arc<Workload>,
    peer: &Arc<Workload>,
    authority: SocketAddr,
    stream: &mut Conn,
    client: SocketAddr,
) -> Result<(u64, u64), Error> {
    let address = SocketAddr::new(IpAddr::V4(peer.ip), crate::redirect::HBONE_PORT);
    // The client as Istio names it: the pod's address and the client's port.
    let client = SocketAddr::new(IpAddr::V4(source.ip), client.port());
    // Boxed: setting up (certificate, dial, TLS and HTTP/2 handshakes) takes far
    // more state than relaying, and an async fn's task is as large as its largest
    // step. Unboxed, every idle connection's task kept room for a handshake.
    //
    // The CONNECT is not waited for: the client's first bytes follow it at once
    // (often in the same TLS record), and the server holds them unread until it
    // has decided and reached the application. A refusal fails the relay's
    // reads, and is reported as if it had been waited for.
    let (mut tunnel, _guard) = Box::pin(async {
        let cert = ctx.certs.fetch(&source.identity).await?;
        let connected = ctx
            .pool
            .connect_early_from(
                &hbone_origin(origin, source, peer),
                &cert,
                &peer.identity,
                address,
                authority,
                headers(source, client),
            )
            .await?;
        Ok::<_, Error>(connected)
    })
    .await?;
    let relayed = relay(stream, &mut tunnel).await;
    let refusal = relayed.as_ref().err().and_then(|_| tunnel.refusal());
    if refusal.is_some() {
        // A refusal is never an orderly end: reset the client, whether or not
        // its bytes had been taken (read from it, or already written into the
        // tunnel). Closing after reading them would end with a clean EOF.
        let _ = socket2::SockRef::from(&**stream).set_linger(Some(std::time::Duration::ZERO));
    }
    relayed.map_err(|error| match refusal {
        Some(refusal) => Error::Hbone(pool::Error::refused(refusal, authority, address)),
        None => Error::Relay(error),
    })
}

/// A destination outside the mesh, dialed from inside the pod: it sees the pod's
/// address, and the pod reaches nothing it could not reach without the mesh.
async fn passthrough(
    sockets: &SocketFactory,
    address: SocketAddrV4,
    timeout: std::time::Duration,
    stream: &mut Conn,
) -> Result<(u64, u64), Error> {
    let mut upstream = sockets
        .connect(address.into(), timeout)
        .await
        .map_err(|error| Error::Passthrough {
            address: address.into(),
            error,
        })?;
    Ok(relay(stream, &mut upstream).await?)
}

/// Why a captured destination is the tunnel itself (or the node's loopback), if it
/// is: such destinations are never proxied. The eBPF programs already leave
/// loopback and 0.0.0.0/8 inside the pod; this holds even if they did not.
fn self_call(original: SocketAddrV4) -> Option<&'static str> {
    let ip = original.ip();
    if ip.is_loopback() || ip.octets()[0] == 0 {
        return Some("a loopback or 0.0.0.0/8 destination is never proxied");
    }
    // Not knowing the node's addresses, assume the worst.
    if crate::redirect::is_tunnel_port(original.port())
        && crate::redirect::node_addresses().map_or(true, |node| node.contains(ip))
    {
        return Some("the destination is the tunnel itself (a tunnel port on the node)");
    }
    None
}

/// The headers Istio's ztunnel puts on a CONNECT, so the two interoperate.
fn headers(source: &Workload, client: SocketAddr) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let baggage = format!(
        "k8s.cluster.name=Kubernetes,k8s.namespace.name={},k8s.pod.name={},service.name={},service.version={}",
        source.namespace,
        source.name,
        source.workload_name(),
        source.labels.get("app.kubernetes.io/version").or(source.labels.get("version")).map_or("latest", String::as_str),
    );
    if let Ok(v) = HeaderValue::from_str(&baggage) {
        headers.insert("baggage", v);
    }
    if let Ok(v) = HeaderValue::from_str(&crate::forwarded::for_client(client)) {
        headers.insert("forwarded", v);
    }
    let traceparent = format!(
        "00-{:032x}-{:016x}-00",
        fastrand::u128(1..),
        fastrand::u64(1..)
    );
    headers.insert(
        "traceparent",
        HeaderValue::from_str(&traceparent).expect("hex is a valid header"),
    );
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_0_0_0_0_and_the_tunnel_on_the_node_are_self_calls() {
        for refused in [
            "127.0.0.1:80",
            "127.9.9.9:15000",
            "0.0.0.0:15000",
            "0.1.2.3:22",
        ] {
            assert!(self_call(refused.parse().unwrap()).is_some(), "{refused}");
        }
        // Whatever addresses this test's namespace has: its tunnel ports are the
        // tunnel's own; other ports of the node are not.
        for ip in crate::redirect::node_addresses().unwrap() {
            if ip.is_loopback() {
                continue;
            }
            assert!(self_call(SocketAddrV4::new(ip, 15020)).is_some(), "{ip}");
            assert!(self_call(SocketAddrV4::new(ip, 8080)).is_none(), "{ip}");
        }
        assert!(self_call("10.1.2.3:15008".parse().unwrap()).is_none());
    }
}
