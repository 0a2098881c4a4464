//! The fault matrix's shared parts: load through the mesh while a fault is on, and
//! the check that nothing crossed between the nodes in plaintext meanwhile.

use std::process::{Child, Stdio};

use crate::{capture::Packet, mesh::Mesh};

/// `tb-probe load` in a pod: exchanges carrying a marker with an echo server, one
/// after another for a while, going on through failures.
pub struct Load(Child);

impl Load {
    /// From `pod` to `target` (ip:port) for `millis`; `probe` is the tb-probe binary.
    pub fn start(
        mesh: &Mesh,
        probe: &str,
        pod: &str,
        target: &str,
        millis: u64,
        marker: &str,
    ) -> Self {
        let child = mesh
            .cluster
            .pod(pod)
            .command(probe)
            .unwrap()
            .args(["load", target, &millis.to_string(), marker])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        Self(child)
    }

    /// Waits for the end: (exchanges served, exchanges failed).
    pub fn finish(self) -> (u64, u64) {
        let out = self.0.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let count = |key: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {text:?}"))
        };
        (count("ok="), count("failed="))
    }
}

/// Fails unless the capture saw traffic and none of it was plaintext: TCP only on
/// HBONE and the mesh's control plane (the CA, the API server), `marker` never in
/// the clear.
pub fn assert_nothing_plaintext(mesh: &Mesh, packets: &[Packet], marker: &str) {
    assert!(!packets.is_empty(), "the capture saw nothing");
    let mut allowed = vec![crate::capture::HBONE_PORT, mesh.ca.addr.port()];
    allowed.extend(mesh.api.as_ref().map(|api| api.addr.port()));
    if let Some(violation) = crate::capture::plaintext_crossed(packets, &allowed, marker.as_bytes())
    {
        panic!("{violation} ({} packets)", packets.len());
    }
}

/// Every node's tunnel process now: (node, pid).
pub fn tunnels(mesh: &Mesh) -> Vec<(String, u32)> {
    mesh.cluster
        .nodes()
        .iter()
        .filter_map(|n| Some((n.name.clone(), mesh.tunnel_pid(&n.name)?)))
        .collect()
}

/// Fails unless every tunnel of `before` is still that process, running: none
/// crashed (an exited child stays a zombie until the mesh reaps it).
pub fn assert_no_crash(mesh: &Mesh, before: &[(String, u32)]) {
    for (node, pid) in before {
        assert_eq!(
            mesh.tunnel_pid(node),
            Some(*pid),
            "{node}'s tunnel replaced"
        );
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the command's closing parenthesis.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        assert!(
            matches!(state, Some(s) if s != 'Z' && s != 'X'),
            "{node}'s tunnel exited:\n{}",
            mesh.log(node)
        );
    }
}

/// Whether `pod`'s connection to `target` is refused by `policy` (`ns/name`)
/// itself: no reply, and `node` (the destination's) counts one more denial by that
/// policy, so a connection failing for another reason does not pass for it.
pub async fn refused_by_policy(
    mesh: &Mesh,
    probe: &str,
    pod: &str,
    target: &str,
    node: &str,
    policy: &str,
) -> bool {
    let label = format!("policy=\"{policy}\"");
    let count = || async {
        crate::mesh::metric(
            &mesh.metrics(node).await,
            "ztunnel_connections_denied_total",
            &[&label],
        )
    };
    let before = count().await;
    let out = mesh.output(pod, probe, &["connect", target, "refused"]);
    crate::mesh::refused_after_connect(&out) && count().await > before
}

/// Whether the metric (summed over its labels) satisfies `wanted` on every node's
/// tunnel.
pub async fn on_every_node(mesh: &Mesh, name: &str, wanted: impl Fn(f64) -> bool) -> bool {
    for node in mesh.cluster.nodes() {
        if !wanted(crate::mesh::metric(
            &mesh.metrics(&node.name).await,
            name,
            &[],
        )) {
            return false;
        }
    }
    true
}
