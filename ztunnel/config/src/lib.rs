//! Configuration sources. Each parses Kubernetes resources into the same typed
//! objects (a [`Snapshot`], from `ztunnel-core`); the rest of the mesh never sees
//! where they came from.
//!
//! - [`local`]: a directory of YAML, polled.
//! - [`kube`]: the API server, watched through [`k8s`] (the Kubernetes client and
//!   the access list the RBAC in deploy/ grants).
//!
//! Both read the same types ([`objects`]: `k8s-openapi`'s for Kubernetes' own
//! kinds, small serde types for the custom ones) and translate them the same way.

pub mod k8s;
pub mod kube;
pub mod local;
pub mod objects;

use std::{fmt, path::PathBuf, sync::Arc, time::Duration};

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::watch;

// The snapshot types are core's; the sources re-export them so that a source's
// module sees them as its parent's, as before the split.
pub use ztunnel_core::config::*;
// What the sources use of core, under the names they had in one crate.
use ztunnel_core::discovery;
#[cfg(test)]
use ztunnel_core::{config, state};

/// Where the configuration comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A directory of YAML, checked for changes this often.
    Local { dir: PathBuf, poll: Duration },
    /// The API server of the cluster the process runs in.
    Kube(kube::KubeOptions),
}

impl Source {
    /// What the command line asks for: `--config DIR` is the local source;
    /// otherwise the Kubernetes one, when asked for (`--kube`) or running in a pod.
    pub fn choose(
        config: Option<PathBuf>,
        kube: bool,
        poll: Duration,
        kube_options: kube::KubeOptions,
    ) -> Result<Self, SourceError> {
        let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        match config {
            Some(dir) if !kube => Ok(Source::Local { dir, poll }),
            Some(_) => Err(SourceError::TwoSources),
            None if kube || in_pod => Ok(Source::Kube(kube_options)),
            None => Err(SourceError::NoSource),
        }
    }

    /// Starts watching; returns with the first snapshot.
    pub async fn watch(
        &self,
        metrics: ConfigMetrics,
    ) -> Result<watch::Receiver<Arc<Snapshot>>, SourceError> {
        match self {
            Source::Local { dir, poll } => local::watch(dir, *poll, metrics),
            Source::Kube(options) => {
                kube::watch(k8s::client().await?, options.clone(), metrics).await
            }
        }
    }
}

/// Why a source cannot start, or cannot be read (a running source keeps its last
/// state then).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("--config and --kube are two sources: choose one")]
    TwoSources,
    #[error(
        "no configuration source: --config DIR (local YAML) or --kube (the cluster's API server)"
    )]
    NoSource,
    #[error("reading {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("finding the Kubernetes API server (in-cluster config or kubeconfig): {0}")]
    KubeConfig(::kube::config::InferConfigError),
    #[error("a client for the Kubernetes API server: {0}")]
    KubeClient(::kube::Error),
    #[error("the watch of {0} ended before its first list")]
    NotListed(&'static str),
}

/// How the configuration is doing: what an operator alerts on when a policy was
/// refused or the API server is unreachable.
#[derive(Clone, Default)]
pub struct ConfigMetrics {
    /// Objects refused in the configuration now in force (a malformed policy, say).
    pub refused: Gauge,
    /// Failures to read the source: an unreadable directory, an API-server error.
    pub source_errors: Counter,
    /// Configurations applied, the first one included.
    pub updates: Counter,
    /// Pods of this node not found on it yet (Kubernetes source): outside the mesh
    /// until they are.
    pub pods_unlocated: Gauge,
    /// `istio.io/use-waypoint` bindings refused by the waypoint's Gateway (set by
    /// whoever builds the state from the configuration).
    pub bindings_refused: Gauge,
}

impl ConfigMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "ztunnel_config_refused_objects",
            "Objects refused in the configuration now in force",
            m.refused.clone(),
        );
        registry.register(
            "ztunnel_config_source_errors",
            "Failures to read the configuration source; the last state stays",
            m.source_errors.clone(),
        );
        registry.register(
            "ztunnel_config_updates",
            "Configurations applied",
            m.updates.clone(),
        );
        registry.register(
            "ztunnel_pods_unlocated",
            "Pods of this node whose cgroup and network namespace are not found yet",
            m.pods_unlocated.clone(),
        );
        registry.register(
            "ztunnel_waypoint_bindings_refused",
            "Waypoint bindings (istio.io/use-waypoint) refused: the waypoint's Gateway does not admit the namespace",
            m.bindings_refused.clone(),
        );
        m
    }

    /// Records a configuration built with these refusals.
    fn built(&self, refused: usize) {
        self.refused.set(refused as i64);
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Local { dir, .. } => write!(f, "{}", dir.display()),
            Source::Kube(_) => write!(f, "kubernetes"),
        }
    }
}
