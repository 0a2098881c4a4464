//! The CA in a cluster: who is asking (TokenReview of the caller's projected
//! ServiceAccount token), which node runs which workload (a reflector of the pods),
//! and the root kept in a Secret and published in a ConfigMap for the tunnels and
//! the waypoints.
//! Every call goes through an entry of [`k8s::CA`], which `deploy/`'s RBAC grants.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        authentication::v1::{TokenReview as Review, TokenReviewSpec},
        core::v1::{ConfigMap, Namespace, Pod, Secret},
    },
    ByteString,
};
use kube::{
    api::{Api, ObjectMeta, PostParams},
    runtime::reflector::Store,
};

use super::{
    auth::{AuthFuture, Authenticator, Caller, FailureBudget, NodeAuthorizer},
    AuthorityError, Refusal,
};
use crate::{identity::Identity, k8s};

/// Authenticates callers by their projected ServiceAccount token. A tunnel's
/// service account speaks for the node its token is bound to; any other service
/// account only for itself (a waypoint asking for its own identity).
pub struct TokenReview {
    client: kube::Client,
    /// `namespace/name` of the tunnels' service accounts.
    tunnels: Vec<String>,
    /// Audiences the token must be for (Istio's CA: `istio-ca`).
    audiences: Vec<String>,
    /// Callers recently authenticated, by the SHA-256 of their token: a tunnel
    /// asking for a node's worth of certificates costs one review, not one each.
    recent: std::sync::Mutex<HashMap<Vec<u8>, (Caller, Instant)>>,
    /// Reviews that may fail, per caller address: a client with bad tokens
    /// cannot turn its requests into as many calls to the API server.
    failures: FailureBudget,
}

/// Failed reviews a source may cause at once, then one per [`FAILURE_REFILL`].
pub const FAILURE_BURST: u32 = 5;
pub const FAILURE_REFILL: Duration = Duration::from_secs(2);

/// How long an authentication is reused. Short: a deleted pod's token stops
/// working soon after (and which pods a node runs is checked on every request).
const REVIEW_REUSE: Duration = Duration::from_secs(60);
/// At most this many callers are remembered.
const REVIEW_CACHE_SIZE: usize = 10_000;

impl TokenReview {
    pub fn new(client: kube::Client, tunnels: Vec<String>, audiences: Vec<String>) -> Self {
        Self {
            client,
            tunnels,
            audiences,
            recent: Default::default(),
            failures: FailureBudget::new(FAILURE_BURST, FAILURE_REFILL),
        }
    }

    fn remembered(&self, key: &[u8]) -> Option<Caller> {
        let recent = self.recent.lock().unwrap();
        let (caller, at) = recent.get(key)?;
        (at.elapsed() < REVIEW_REUSE).then(|| caller.clone())
    }

    fn remember(&self, key: Vec<u8>, caller: &Caller) {
        let mut recent = self.recent.lock().unwrap();
        if recent.len() >= REVIEW_CACHE_SIZE {
            recent.retain(|_, (_, at)| at.elapsed() < REVIEW_REUSE);
        }
        if recent.len() < REVIEW_CACHE_SIZE {
            recent.insert(key, (caller.clone(), Instant::now()));
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, String> {
        let review = Review {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: Api<Review> = Api::all(self.client.clone());
        debug_assert!(k8s::granted(k8s::CA, k8s::TOKEN_REVIEWS, "create", None));
        let reviewed = tokio::time::timeout(
            Duration::from_secs(10),
            api.create(&PostParams::default(), &review),
        )
        .await
        .map_err(|_| "TokenReview timed out".to_owned())?
        .map_err(|e| format!("TokenReview failed: {e}"))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let error = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(format!("TokenReview: {error}"));
        }
        // An authenticator that ignores audiences answers without any: a token
        // for another service would pass. Only a confirmed audience counts.
        let confirmed = status.audiences.unwrap_or_default();
        if !confirmed.iter().any(|a| self.audiences.contains(a)) {
            return Err(format!(
                "TokenReview: the token is not confirmed for the audience {:?}",
                self.audiences
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (namespace, name) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|a| a.split_once(':'))
            .ok_or_else(|| format!("{username:?} is not a service account"))?;
        if !self.tunnels.contains(&format!("{namespace}/{name}")) {
            return Ok(Caller::Workload {
                namespace: namespace.to_owned(),
                service_account: name.to_owned(),
            });
        }
        let node = user
            .extra
            .as_ref()
            .and_then(|extra| extra.get(NODE_NAME_EXTRA))
            .and_then(|nodes| nodes.first())
            .ok_or_else(|| {
                format!("the token of {namespace}/{name} is not bound to a pod on a node")
            })?;
        Ok(Caller::Node(node.clone()))
    }
}

/// The node a pod-bound projected token carries (Kubernetes 1.30+).
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

impl Authenticator for TokenReview {
    fn authenticate<'a>(&'a self, token: &'a str, source: IpAddr) -> AuthFuture<'a> {
        Box::pin(async move {
            let key = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
                .as_ref()
                .to_vec();
            if let Some(caller) = self.remembered(&key) {
                return Ok(caller);
            }
            // Refusals are not remembered (a caller whose token was just minted
            // may be retried at once), but they are budgeted per source.
            if let Err(wait) = self.failures.take(source, Instant::now()) {
                return Err(Refusal::RateLimited(format!(
                    "too many failed authentications from {source}, retry in {}s",
                    wait.as_secs().max(1)
                )));
            }
            let caller = self.review(token).await.map_err(Refusal::Unauthenticated)?;
            self.failures.give_back(source);
            self.remember(key, &caller);
            Ok(caller)
        })
    }
}

/// Which node runs which workload: the cluster's pods, watched.
pub struct KubePods {
    store: Store<k8s::Checked<Pod>>,
}

impl KubePods {
    /// Starts the watch; answers are refusals until the first list is in.
    pub fn start(client: kube::Client) -> Self {
        debug_assert!(k8s::granted(k8s::CA, k8s::PODS, "watch", None));
        let store = k8s::reflect::<Pod>(client, k8s::PODS, |_| {}, || {});
        Self { store }
    }

    /// The pods known, once listed (for a test or a readiness check).
    pub async fn synced(&self) -> Result<(), kube::runtime::reflector::store::WriterDropped> {
        self.store.wait_until_ready().await
    }
}

impl NodeAuthorizer for KubePods {
    fn runs_on(&self, identity: &Identity, node: &str) -> Result<bool, String> {
        if self.store.wait_until_ready().now_or_never().is_none() {
            return Err("the pod list is not synced yet".into());
        }
        Ok(self.store.state().iter().any(|pod| {
            // A pod the API server sent malformed runs nothing here (fail closed).
            let k8s::Checked::Valid(pod) = &**pod else {
                return false;
            };
            let spec = pod.spec.as_ref();
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            pod.metadata.namespace.as_deref() == Some(identity.namespace())
                && spec.and_then(|s| s.node_name.as_deref()) == Some(node)
                && spec
                    .and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default")
                    == identity.service_account()
                && !matches!(phase, Some("Succeeded" | "Failed"))
        }))
    }
}

trait NowOrNever: std::future::Future + Sized {
    /// The output if the future is ready at once.
    fn now_or_never(self) -> Option<Self::Output> {
        let mut future = std::pin::pin!(self);
        let waker = std::task::Waker::noop();
        match future
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker))
        {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        }
    }
}

impl<F: std::future::Future> NowOrNever for F {}

/// Why the root could not be kept in its Secret or published in a ConfigMap.
#[derive(Debug, thiserror::Error)]
pub enum RootStoreError {
    /// `what`: the call, e.g. "reading the root Secret".
    #[error("{what}: {error}")]
    Api {
        what: &'static str,
        error: kube::Error,
    },
    #[error("the root Secret has no data")]
    NoData,
    #[error("the root Secret lacks {} or {}", super::CA_CERT, super::CA_KEY)]
    Incomplete,
    #[error("the root Secret holds an unexpected key {0:?}")]
    UnexpectedKey(String),
    #[error(transparent)]
    Files(#[from] AuthorityError),
}

impl RootStoreError {
    fn api(what: &'static str) -> impl FnOnce(kube::Error) -> Self {
        move |error| Self::Api { what, error }
    }
}

/// Makes the Secret `name` and the directory `dir` hold the same root: the
/// Secret's files are written to the directory; when there is no Secret, the
/// directory's root (generated if none) is stored in a new one. Two CAs starting
/// at once agree: the second's create fails and it takes the first one's root.
pub async fn sync_root_secret(
    client: kube::Client,
    namespace: &str,
    name: &str,
    dir: &Path,
    create_root: impl FnOnce(&Path) -> Result<(), AuthorityError>,
) -> Result<(), RootStoreError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let read = RootStoreError::api("reading the root Secret");
    if let Some(secret) = api.get_opt(name).await.map_err(read)? {
        return write_secret_files(&secret, dir);
    }
    create_root(dir)?;
    let mut data = BTreeMap::new();
    for file in [
        super::CA_CERT,
        super::CA_KEY,
        super::ROOT_CERT,
        super::CERT_CHAIN,
    ] {
        if let Ok(bytes) = fs::read(dir.join(file)) {
            data.insert(file.to_owned(), ByteString(bytes));
        }
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), "stored the new root");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = api
                .get(name)
                .await
                .map_err(RootStoreError::api("reading the root Secret"))?;
            tracing::info!("another CA stored a root first: using it");
            write_secret_files(&secret, dir)
        }
        Err(e) => Err(RootStoreError::api("storing the root Secret")(e)),
    }
}

fn write_secret_files(secret: &Secret, dir: &Path) -> Result<(), RootStoreError> {
    const FILES: [&str; 4] = [
        super::CA_CERT,
        super::CA_KEY,
        super::ROOT_CERT,
        super::CERT_CHAIN,
    ];
    let data = secret.data.as_ref().ok_or(RootStoreError::NoData)?;
    if !(data.contains_key(super::CA_CERT) && data.contains_key(super::CA_KEY)) {
        return Err(RootStoreError::Incomplete);
    }
    if let Some(file) = data.keys().find(|file| !FILES.contains(&file.as_str())) {
        return Err(RootStoreError::UnexpectedKey(file.clone()));
    }
    fs::create_dir_all(dir).map_err(|error| AuthorityError::CreateDir {
        path: dir.to_owned(),
        error,
    })?;
    // The key file first, ca-cert.pem last: its presence means complete.
    let mut files: Vec<_> = data.iter().collect();
    files.sort_by_key(|(name, _)| name.as_str() == super::CA_CERT);
    for (file, bytes) in files {
        // Over what a previous run (or a CA that lost the race) left there.
        super::write_atomically(&dir.join(file), &bytes.0, super::PRIVATE)?;
    }
    Ok(())
}

/// Publishes the root for the tunnels (which mount this ConfigMap) in the key
/// `root-cert.pem`.
pub async fn publish_root(
    client: kube::Client,
    namespace: &str,
    name: &str,
    root_pem: &str,
) -> Result<(), RootStoreError> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            super::ROOT_CERT.to_owned(),
            root_pem.to_owned(),
        )])),
        ..Default::default()
    };
    match api
        .get_opt(name)
        .await
        .map_err(RootStoreError::api("reading the root ConfigMap"))?
    {
        None => {
            api.create(&PostParams::default(), &config_map)
                .await
                .map_err(RootStoreError::api("creating the root ConfigMap"))?;
        }
        Some(existing) if existing.data == config_map.data => {}
        Some(existing) => {
            let mut updated = config_map;
            updated.metadata.resource_version = existing.metadata.resource_version;
            api.replace(name, &PostParams::default(), &updated)
                .await
                .map_err(RootStoreError::api("updating the root ConfigMap"))?;
        }
    }
    Ok(())
}

/// How often every namespace's root ConfigMap is checked again (one deleted by
/// hand comes back), and how soon a failed publication is retried.
const REPUBLISH: Duration = Duration::from_secs(300);
const RETRY: Duration = Duration::from_secs(10);

/// Keeps the root published, as `publish_root` does, in every namespace labelled
/// ambient: the waypoints there mount it to trust the mesh (Istio publishes its
/// `istio-ca-root-cert` the same way). Runs until the process ends.
pub async fn publish_root_in_ambient_namespaces(
    client: kube::Client,
    name: String,
    root_pem: String,
) {
    debug_assert!(k8s::granted(k8s::CA, k8s::NAMESPACES, "watch", None));
    let changed = std::sync::Arc::new(tokio::sync::Notify::new());
    let notify = changed.clone();
    let store = k8s::reflect::<Namespace>(
        client.clone(),
        k8s::NAMESPACES,
        move |_| notify.notify_one(),
        || {},
    );
    if let Err(e) = store.wait_until_ready().await {
        tracing::warn!("namespaces never listed ({e}): the root is not published in them");
        return;
    }
    let mut published = std::collections::HashSet::new();
    let mut republish = tokio::time::interval(REPUBLISH);
    republish.tick().await;
    loop {
        let ambient: Vec<String> = store
            .state()
            .iter()
            .filter(|ns| {
                kube::Resource::meta(&***ns)
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(crate::config::DATAPLANE_MODE))
                    .is_some_and(|mode| mode == crate::config::AMBIENT)
            })
            .filter_map(|ns| kube::Resource::meta(&**ns).name.clone())
            .collect();
        // A namespace deleted (or no longer ambient) is forgotten: re-created, it
        // gets the root again at once.
        published.retain(|ns| ambient.contains(ns));
        let mut failed = false;
        for namespace in ambient {
            if published.contains(&namespace) {
                continue;
            }
            match publish_root(client.clone(), &namespace, &name, &root_pem).await {
                Ok(()) => {
                    published.insert(namespace);
                }
                Err(e) => {
                    tracing::warn!(namespace = %namespace, "publishing the root: {e:#}");
                    failed = true;
                }
            }
        }
        tokio::select! {
            _ = changed.notified() => {}
            _ = republish.tick() => published.clear(),
            _ = tokio::time::sleep(RETRY), if failed => {}
        }
    }
}
