//! Inbound connections in flight, kept so that a policy change can close the ones
//! it now denies (as Istio's ztunnel does).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use tokio_util::sync::CancellationToken;

use crate::{
    policy::Connection,
    state::{State, Workload},
};

struct Entry {
    conn: Connection,
    destination: Arc<Workload>,
    plaintext: bool,
    cancel: CancellationToken,
}

#[derive(Default)]
pub struct Active {
    next: AtomicU64,
    entries: Mutex<HashMap<u64, Entry>>,
}

/// Unregisters its connection when dropped.
pub struct Registration {
    active: Arc<Active>,
    id: u64,
    pub cancelled: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.active
            .entries
            .lock()
            .expect("not poisoned")
            .remove(&self.id);
    }
}

impl Active {
    pub fn register(
        self: &Arc<Self>,
        conn: Connection,
        destination: Arc<Workload>,
        plaintext: bool,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        self.entries.lock().expect("not poisoned").insert(
            id,
            Entry {
                conn,
                destination,
                plaintext,
                cancel: cancel.clone(),
            },
        );
        Registration {
            active: self.clone(),
            id,
            cancelled: cancel,
        }
    }

    /// Re-decides every connection under `state`'s policies; closes the denied ones.
    /// Returns how many were closed.
    pub fn reevaluate(&self, state: &State) -> usize {
        let entries = self.entries.lock().expect("not poisoned");
        let mut closed = 0;
        for entry in entries.values() {
            let destination = state
                .workload_by_name(&entry.destination.namespace, &entry.destination.name)
                .cloned()
                .unwrap_or_else(|| entry.destination.clone());
            let mut why = None;
            if entry.plaintext {
                let (mode, policy) = state
                    .policies
                    .peer_authentication(&destination, entry.conn.destination_port);
                if mode == crate::policy::Mode::Strict {
                    why = Some(format!(
                        "PeerAuthentication {} is STRICT",
                        policy.unwrap_or_default()
                    ));
                }
            }
            if why.is_none() {
                let decision = state.policies.authorize(&destination, &entry.conn);
                if !decision.allow {
                    why = Some(decision.reason);
                }
            }
            if let Some(why) = why {
                tracing::info!(
                    src = %crate::policy::authz::describe_source(&entry.conn),
                    dst = %format!("{}/{}", destination.namespace, destination.name),
                    port = entry.conn.destination_port,
                    "closing a connection the new policy denies: {why}"
                );
                entry.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }
}
