//! ztunnel: the per-node tunnel of an eBPF-assisted ambient service mesh.
//!
//! Data flows one way: configuration (`ztunnel-config`) → state (`ztunnel-core`) →
//! proxy. This crate is the node's part: `redirect` (the eBPF capture), `orig_src`
//! (delivery from the client's address), `proxy`, `daemon` and `admin`. The CA
//! (`ztunnel-ca`) and the waypoint (`ztunnel-waypoint`) are crates of their own,
//! not linked here.
pub mod admin;
pub mod daemon;
pub mod dns;
pub mod orig_src;
pub mod proxy;
pub mod redirect;
pub mod splice;

// What the node tunnel builds on, under the names it had when this was one crate:
// core's modules, the configuration sources and the HBONE client.
pub use ztunnel_config::{self as config, k8s};
pub use ztunnel_core::{
    accept, ca, certs, check, cli, discovery, drain, extauthz, forwarded, http_server, identity,
    jwt, metrics, netns, path_normalization, policy, response_flags, sockinfo, state, telemetry,
    tls,
};
