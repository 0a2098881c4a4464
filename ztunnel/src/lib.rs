//! ztunnel: the per-node tunnel of an eBPF-assisted ambient service mesh.
//!
//! Data flows one way: `config` → state → proxy. Around it: `identity` and `certs`
//! (workload certificates from the `ca`), `tls` (mTLS with SPIFFE identities),
//! `redirect` (the eBPF capture), `orig_src` (delivery from the client's address),
//! `metrics` and `admin`.
pub mod accept;
pub mod admin;
pub mod ca;
pub mod certs;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod extauthz;
pub mod forwarded;
pub mod http_client;
pub mod http_server;
pub mod identity;
pub mod jwt;
pub mod k8s;
pub mod metrics;
pub mod netns;
pub mod orig_src;
pub mod path_normalization;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod state;
pub mod tls;
pub mod waypoint;
