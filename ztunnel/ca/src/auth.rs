//! Who is asking the CA, and which workloads they may ask for.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    net::IpAddr,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::Refusal;
use crate::{config, identity::Identity};

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
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Caller, Refusal>> + Send + 'a>>;

/// Authenticates bearer tokens, presented from `source`.
pub trait Authenticator: Send + Sync {
    fn authenticate<'a>(&'a self, token: &'a str, source: IpAddr) -> AuthFuture<'a>;
}

/// Local mode: each node has a secret token, listed in a YAML file `node: token`.
pub struct NodeTokens {
    tokens: Vec<(String, Vec<u8>)>,
}

/// Why the node tokens file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("reading {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: expected `node: token` lines: {error}", .path.display())]
    Parse {
        path: PathBuf,
        error: serde_yaml::Error,
    },
    #[error("{}: the token of node {node} is shorter than {MIN_TOKEN} characters", .path.display())]
    TooShort { path: PathBuf, node: String },
}

/// A node token is a secret: too short, it could be guessed.
const MIN_TOKEN: usize = 16;

impl NodeTokens {
    pub fn from_file(path: &std::path::Path) -> Result<Self, TokensError> {
        let text = fs::read_to_string(path).map_err(|error| TokensError::Read {
            path: path.to_owned(),
            error,
        })?;
        let map: BTreeMap<String, String> =
            serde_yaml::from_str(&text).map_err(|error| TokensError::Parse {
                path: path.to_owned(),
                error,
            })?;
        if let Some((node, _)) = map.iter().find(|(_, token)| token.len() < MIN_TOKEN) {
            return Err(TokensError::TooShort {
                path: path.to_owned(),
                node: node.clone(),
            });
        }
        Ok(Self {
            tokens: map.into_iter().map(|(n, t)| (n, t.into_bytes())).collect(),
        })
    }
}

impl Authenticator for NodeTokens {
    fn authenticate<'a>(&'a self, token: &'a str, _source: IpAddr) -> AuthFuture<'a> {
        Box::pin(std::future::ready(
            self.check(token).map_err(Refusal::Unauthenticated),
        ))
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
pub struct LocalPods(Mutex<config::local::Pods>);

impl LocalPods {
    pub fn new(dir: PathBuf) -> Self {
        Self(Mutex::new(config::local::Pods::new(dir)))
    }
}

impl NodeAuthorizer for LocalPods {
    fn runs_on(&self, identity: &Identity, node: &str) -> Result<bool, String> {
        let mut pods = self.0.lock().expect("not poisoned");
        Ok(pods.current().iter().any(|pod| {
            pod.node_name == node
                && pod.namespace == identity.namespace()
                && pod.service_account == identity.service_account()
        }))
    }
}

/// Budgets failed authentications per source address (a token bucket each): an
/// unauthenticated caller cannot make the CA ask the API server more than
/// `burst` times at once and once per `refill` after that. A check in progress
/// holds a unit of its source's budget; one that succeeds gives it back.
pub struct FailureBudget {
    burst: u32,
    refill: Duration,
    sources: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    /// Units left, as of `at`.
    left: u32,
    at: Instant,
}

/// Sources remembered at most; past it, only sources with no failure left to
/// forgive are dropped, and a new source waits for room (fail closed).
const BUDGET_SOURCES: usize = 10_000;

impl FailureBudget {
    pub fn new(burst: u32, refill: Duration) -> Self {
        Self {
            burst: burst.max(1),
            refill,
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one unit of `source`'s budget, or says when the next one comes.
    pub fn take(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut sources = self.sources.lock().unwrap();
        if sources.len() >= BUDGET_SOURCES && !sources.contains_key(&source) {
            sources.retain(|_, bucket| self.refilled(*bucket, now).left < self.burst);
            if sources.len() >= BUDGET_SOURCES {
                return Err(self.refill);
            }
        }
        let bucket = sources.entry(source).or_insert(Bucket {
            left: self.burst,
            at: now,
        });
        *bucket = self.refilled(*bucket, now);
        if bucket.left == 0 {
            return Err(self.refill.saturating_sub(now.duration_since(bucket.at)));
        }
        bucket.left -= 1;
        Ok(())
    }

    /// Gives back a unit taken for a check that succeeded.
    pub fn give_back(&self, source: IpAddr) {
        if let Some(bucket) = self.sources.lock().unwrap().get_mut(&source) {
            bucket.left = (bucket.left + 1).min(self.burst);
        }
    }

    /// The bucket with the units earned since it was last looked at; `at`
    /// advances by whole refills only, so partial progress is kept.
    fn refilled(&self, bucket: Bucket, now: Instant) -> Bucket {
        if bucket.left >= self.burst || self.refill.is_zero() {
            return Bucket {
                left: self.burst,
                at: now,
            };
        }
        let earned = (now.duration_since(bucket.at).as_nanos() / self.refill.as_nanos()) as u32;
        let left = bucket.left.saturating_add(earned).min(self.burst);
        Bucket {
            left,
            at: match left >= self.burst {
                true => now,
                false => bucket.at + self.refill * earned,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_budgeted_per_source_and_refill() {
        let budget = FailureBudget::new(3, Duration::from_secs(1));
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        for _ in 0..3 {
            budget.take(a, t0).unwrap();
        }
        let wait = budget.take(a, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        // Another source has its own budget.
        budget.take(b, t0).unwrap();
        // One unit back per refill, never more than the burst.
        let t1 = t0 + Duration::from_millis(1500);
        budget.take(a, t1).unwrap();
        assert_eq!(
            budget.take(a, t1).unwrap_err(),
            Duration::from_millis(500),
            "half a refill already earned"
        );
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            budget.take(a, later).unwrap();
        }
        assert!(budget.take(a, later).is_err());
    }

    #[test]
    fn a_success_gives_its_unit_back() {
        let budget = FailureBudget::new(2, Duration::from_secs(60));
        let a = IpAddr::from([10, 0, 0, 1]);
        let now = Instant::now();
        for _ in 0..10 {
            budget.take(a, now).unwrap();
            budget.give_back(a);
        }
        budget.take(a, now).unwrap();
        budget.take(a, now).unwrap();
        assert!(budget.take(a, now).is_err());
    }
}
