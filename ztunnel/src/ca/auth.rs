//! Who is asking the CA, and which workloads they may ask for.

use std::{collections::BTreeMap, fs, path::PathBuf, sync::Mutex};

use anyhow::{Context, Result};

use crate::{
    config::{self, Pod},
    identity::Identity,
};

/// An authenticated caller: a node's tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub node: String,
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
            .map(|node| Caller { node: node.clone() })
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

/// In a cluster: the tunnel's projected ServiceAccount token, checked with the API
/// server's TokenReview. The caller must be one of the tunnel's service accounts,
/// and its token bound to a pod, whose node it then speaks for.
pub struct TokenReview {
    /// `https://kubernetes.default.svc` (or `http://` for a local test server).
    pub api_server: String,
    /// PEM roots of the API server's certificate (for https).
    pub api_roots_pem: Option<String>,
    /// The CA's own ServiceAccount token, re-read for every review.
    pub own_token: PathBuf,
    /// `namespace/name` of the service accounts allowed to ask (the tunnel's).
    pub allowed: Vec<String>,
    /// Audiences the token must be for (empty: the API server's default).
    pub audiences: Vec<String>,
}

/// The node a pod-bound projected token carries (Kubernetes 1.30+).
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

impl Authenticator for TokenReview {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            let review = serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token, "audiences": self.audiences},
            });
            let status =
                tokio::time::timeout(std::time::Duration::from_secs(10), self.review(review))
                    .await
                    .map_err(|_| "TokenReview timed out".to_owned())?
                    .map_err(|e| format!("TokenReview failed: {e:#}"))?;
            let status = &status["status"];
            if status["authenticated"] != true {
                let error = status["error"].as_str().unwrap_or("not authenticated");
                return Err(format!("TokenReview: {error}"));
            }
            let username = status["user"]["username"].as_str().unwrap_or_default();
            let account = username
                .strip_prefix("system:serviceaccount:")
                .map(|a| a.replacen(':', "/", 1))
                .ok_or_else(|| format!("{username:?} is not a service account"))?;
            if !self.allowed.contains(&account) {
                return Err(format!(
                    "service account {account} may not request certificates"
                ));
            }
            let node = status["user"]["extra"][NODE_NAME_EXTRA][0]
                .as_str()
                .ok_or_else(|| format!("the token of {account} is not bound to a pod on a node"))?;
            Ok(Caller {
                node: node.to_owned(),
            })
        })
    }
}

impl TokenReview {
    async fn review(&self, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        use http_body_util::{BodyExt, Full};
        let uri: http::Uri = format!(
            "{}/apis/authentication.k8s.io/v1/tokenreviews",
            self.api_server.trim_end_matches('/')
        )
        .parse()?;
        let host = uri.host().context("API server host")?.to_owned();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let own = fs::read_to_string(&self.own_token)
            .with_context(|| format!("reading {}", self.own_token.display()))?;
        let request = http::Request::post(uri.path())
            .header(http::header::HOST, host.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", own.trim()),
            )
            .body(Full::new(bytes::Bytes::from(body.to_string())))?;
        let response = if https {
            let mut roots = rustls::RootCertStore::empty();
            for root in crate::tls::parse_certs(
                self.api_roots_pem
                    .as_deref()
                    .context("https needs the API server's roots")?,
            )? {
                roots.add(root)?;
            }
            let config = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from(host.clone())?;
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(name, tcp)
                .await?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
            tokio::spawn(connection);
            sender.send_request(request).await?
        } else {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
            tokio::spawn(connection);
            sender.send_request(request).await?
        };
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::ensure!(
            status.is_success(),
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        );
        Ok(serde_json::from_slice(&body)?)
    }
}
