//! `ztunnel policy check`: what the data path would decide for a connection, from a
//! config directory, with the same engine ([`super::Index`]).

use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::{Connection, Mode};
use crate::{
    config::Snapshot,
    state::{MeshSettings, State},
};

/// A connection to check.
#[derive(Clone, Debug)]
pub struct Query {
    /// `namespace/pod`.
    pub from: String,
    /// `namespace/pod:port`.
    pub to: String,
    pub plaintext: bool,
    /// HTTP details were given (`--method`, `--path`, `--header`, `--jwt`).
    pub http: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// "ALLOW" or "DENY".
    pub decision: String,
    /// "ztunnel", or "none" when no tunnel enforces policy for the destination.
    pub layer: String,
    pub policy: Option<String>,
    pub reason: String,
    pub notes: Vec<String>,
}

impl Outcome {
    pub fn allowed(&self) -> bool {
        self.decision == "ALLOW"
    }
}

fn split_pod(text: &str) -> Result<(&str, &str)> {
    text.split_once('/')
        .filter(|(ns, pod)| !ns.is_empty() && !pod.is_empty())
        .with_context(|| format!("{text:?}: expected <namespace>/<pod>"))
}

pub fn check(snapshot: Snapshot, settings: &MeshSettings, query: &Query) -> Result<Outcome> {
    let state = State::build(Arc::new(snapshot), settings);
    let (from_ns, from_pod) = split_pod(&query.from)?;
    let (to, port) = query
        .to
        .rsplit_once(':')
        .with_context(|| format!("{:?}: expected <namespace>/<pod>:<port>", query.to))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("{port:?} is not a port"))?;
    let (to_ns, to_pod) = split_pod(to)?;
    let Some(source) = state.workload_by_name(from_ns, from_pod) else {
        bail!("no pod {from_ns}/{from_pod} with an IP in the config");
    };
    let Some(destination) = state.workload_by_name(to_ns, to_pod) else {
        bail!("no pod {to_ns}/{to_pod} with an IP in the config");
    };
    let mut notes = Vec::new();
    if query.http {
        notes.push(
            "HTTP attributes are decided by a waypoint; no waypoint serves this destination, so only the tunnel's L4 decision applies".into(),
        );
    }
    if !destination.captured {
        return Ok(Outcome {
            decision: "ALLOW".into(),
            layer: "none".into(),
            policy: None,
            reason: format!(
                "{to_ns}/{to_pod} is not in the mesh: no tunnel enforces policy for it"
            ),
            notes,
        });
    }
    let plaintext = query.plaintext || !source.captured;
    if !source.captured && !query.plaintext {
        notes.push(format!(
            "{from_ns}/{from_pod} is not in the mesh: its traffic arrives in plaintext"
        ));
    }
    let conn = Connection {
        source_identity: (!plaintext).then(|| source.identity.clone()),
        source_ip: source.ip.into(),
        destination_ip: destination.ip.into(),
        destination_port: port,
    };
    if plaintext {
        let (mode, policy) = state.policies.peer_authentication(destination, port);
        if mode == Mode::Strict {
            let name = policy.clone().unwrap_or_default();
            return Ok(Outcome {
                decision: "DENY".into(),
                layer: "ztunnel".into(),
                policy,
                reason: format!("plaintext refused: PeerAuthentication {name} is STRICT"),
                notes,
            });
        }
    }
    let decision = state.policies.authorize(destination, &conn);
    notes.extend(decision.l7_notes.iter().cloned());
    notes.extend(decision.dry_run.iter().map(|d| format!("dry-run {d}")));
    notes.extend(
        decision
            .audit
            .iter()
            .map(|a| format!("AUDIT policy {a} matched")),
    );
    Ok(Outcome {
        decision: if decision.allow { "ALLOW" } else { "DENY" }.into(),
        layer: "ztunnel".into(),
        policy: decision.policy,
        reason: decision.reason,
        notes,
    })
}
