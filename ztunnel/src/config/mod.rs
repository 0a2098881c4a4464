//! Configuration sources. Each parses Kubernetes resources into the same typed
//! objects; the rest of the tunnel never sees where they came from.

pub mod local;

use std::{collections::BTreeMap, net::Ipv4Addr};

/// A pod, as far as the mesh cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName`, "default" when unset.
    pub service_account: String,
    /// `spec.nodeName`.
    pub node_name: String,
    /// `status.podIP`, once assigned.
    pub ip: Option<Ipv4Addr>,
}
