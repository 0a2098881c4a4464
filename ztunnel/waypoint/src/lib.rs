//! ztunnel-waypoint: the waypoint, L7 policy for the destinations that use it (see
//! [`waypoint`]; the binary is `waypoint`).
pub mod http_client;
pub mod waypoint;

pub use waypoint::{run, RequestLimits, WaypointOptions};

use ztunnel_core::telemetry::error_chain;

// Core's modules and the configuration sources under the names they had in one
// crate.
use ztunnel_config as config;
use ztunnel_core::{
    accept, certs, extauthz, forwarded, http_server, identity, jwt, metrics, path_normalization,
    policy, state, tls,
};
