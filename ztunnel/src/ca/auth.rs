//! Who is asking the CA, and which workloads they may ask for.

use std::{collections::BTreeMap, fs, path::PathBuf, sync::Mutex};

use anyhow::{Context, Result};

use crate::{
    config::{self, Pod},
    identity::Identity,
};

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A node's tunnel: it may ask for the workloads running on its node.
    Node(String),
    /// A workload (a waypoint): it may ask for its own identity only.
    Workload {
        namespace: String,
        service_account: String,
    },
}

/// What authenticating returns.
pub type AuthFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Caller, String>> + Send + 'a>>;

/// Authenticates bearer tokens.
pub trait Authenticator: Send + Sync {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a>;
}

/// Local mode: each node has a secret token, listed in a YAML file `node: token`.
pub struct NodeTokens {
    tokens: Vec<(String, Vec<u8>)>,
}

impl NodeTokens {
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let map: BTreeMap<String, String> = serde_yaml::from_str(&text)
            .with_context(|| format!("{}: expected `node: token` lines", path.display()))?;
        for (node, token) in &map {
            anyhow::ensure!(
                token.len() >= 16,
                "{}: the token of node {node} is shorter than 16 characters",
                path.display()
            );
        }
        Ok(Self {
            tokens: map.into_iter().map(|(n, t)| (n, t.into_bytes())).collect(),
        })
    }
}

impl Authenticator for NodeTokens {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(std::future::ready(self.check(token)))
    }
}

impl NodeTokens {
    fn check(&self, token: &str) -> Result<Caller, String> {
        // Compare against every token in constant time, so timing says nothing.
        let mut found = None;
        for (node, expected) in &self.tokens {
            if constant_time_eq(expected, token.as_bytes()) {
                found = Some(node);
            }
        }
        found
            .map(|node| Caller::Node(node.clone()))
            .ok_or_else(|| "unknown token".to_owned())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a workload runs on a node.
pub trait NodeAuthorizer: Send + Sync {
    fn runs_on(&self, identity: &Identity, node: &str) -> Result<bool, String>;
}

/// Local mode: the pods of the config directory, re-read when it changes.
pub struct LocalPods {
    dir: PathBuf,
    cache: Mutex<(config::local::Fingerprint, Vec<Pod>)>,
}

impl LocalPods {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            cache: Mutex::new((config::local::Fingerprint::default(), Vec::new())),
        }
    }
}

impl NodeAuthorizer for LocalPods {
    fn runs_on(&self, identity: &Identity, node: &str) -> Result<bool, String> {
        let mut cache = self.cache.lock().expect("not poisoned");
        let fingerprint = config::local::fingerprint(&self.dir).map_err(|e| format!("{e:#}"))?;
        if fingerprint != cache.0 {
            let pods = config::local::load_pods(&self.dir).map_err(|e| format!("{e:#}"))?;
            *cache = (fingerprint, pods);
        }
        Ok(cache.1.iter().any(|pod| {
            pod.node_name == node
                && pod.namespace == identity.namespace()
                && pod.service_account == identity.service_account()
        }))
    }
}
