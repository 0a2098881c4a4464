//! The testbed: a Kubernetes-like cluster made of real kernel networking on one
//! machine, for end-to-end tests of the tunnel and for `cargo xtask demo`.
//!
//! ```no_run
//! use testbed::{Cluster, ClusterSpec};
//! let spec = ClusterSpec::new().node("node-a", ["client"]).node("node-b", ["server"]);
//! let cluster = Cluster::new(&spec)?;
//! let out = cluster.pod("client").run("ip", ["-brief", "addr"])?;
//! # anyhow::Ok(())
//! ```
//!
//! Needs root, iproute2 and cgroup v2; see [`host`].

pub mod app;
pub mod capture;
pub mod cluster;
#[cfg(feature = "mesh")]
pub mod dns;
#[cfg(feature = "mesh")]
pub mod ext_authz;
#[cfg(feature = "mesh")]
pub mod faults;
pub mod host;
#[cfg(feature = "mesh")]
pub mod istio;
#[cfg(feature = "mesh")]
pub mod kube_api;
#[cfg(feature = "mesh")]
pub mod l7;
#[cfg(feature = "mesh")]
pub mod mesh;

pub use cluster::{Cluster, ClusterSpec, Node, NodeSpec, Pod};
