//! ztunnel-core: what the node tunnel, the waypoint and the CA share.
//!
//! Data flows one way: a configuration source (crate `ztunnel-config`) produces a
//! [`config::Snapshot`], [`state::State`] is built from it (with the compiled
//! [`policy`], compiled once where the source read each resource), and the
//! proxies read the state; [`check`] (`ztunnel policy check`) builds a state to
//! ask it. Modules depend one way: `identity`, `jwt` → `policy` → `config` (the
//! snapshot carries compiled policies) → `state` → `check`. Around it: [`identity`], [`tls`]
//! (mTLS with SPIFFE identities), [`certs`] (workload certificates from the CA,
//! through [`ca::client`]), [`jwt`], [`extauthz`], [`metrics`] and the servers'
//! accept loop ([`accept`], [`http_server`]); [`balance`] chooses endpoints for the
//! tunnel and the waypoint; [`netns`] and [`discovery`] find and
//! enter pods' network namespaces.
#![deny(unsafe_code)]
pub mod accept;
pub mod balance;
pub mod ca;
pub mod certs;
pub mod check;
pub mod cli;
pub mod config;
pub mod cow_map;
pub mod discovery;
pub mod drain;
pub mod extauthz;
pub mod forwarded;
pub mod http_server;
pub mod identity;
pub mod intern;
pub mod jwt;
pub mod memory;
pub mod metrics;
pub mod netns;
pub mod path_normalization;
pub mod policy;
pub mod response_flags;
pub mod sockinfo;
pub mod state;
pub mod telemetry;
pub mod tls;

/// SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
