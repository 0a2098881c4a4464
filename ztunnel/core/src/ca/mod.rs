//! The client side of Istio's CA API (the server is crate `ztunnel-ca`).
//!
//! - [`api`]: the messages, client and server stubs generated from the `.proto`.
//! - [`client`]: the tunnel's and the waypoint's client (also talks to istiod).

pub mod api;
pub mod client;
