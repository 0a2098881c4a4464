//! What each part of the mesh asks the Kubernetes API server for.
//!
//! One list per part. The code makes its calls through these entries, and the RBAC
//! in `deploy/` is checked against them by a test, so the two cannot drift: a call
//! the list does not name is a call RBAC does not grant, and a grant the list does
//! not name is privilege nobody uses.

pub use crate::objects::Checked;
use crate::objects::{Kind, Prune};
use futures_util::StreamExt;
use kube::{
    api::Api,
    core::{ApiResource, GroupVersionKind},
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt,
    },
};

/// A kind of API object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource {
    /// `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// The URL path segment, and what RBAC rules name.
    pub plural: &'static str,
}

impl Resource {
    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        match self.group {
            "" => self.version.to_owned(),
            group => format!("{group}/{}", self.version),
        }
    }

    pub fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }
}

const fn resource(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
) -> Resource {
    Resource {
        group,
        version,
        kind,
        plural,
    }
}

pub const NAMESPACES: Resource = resource("", "v1", "Namespace", "namespaces");
pub const PODS: Resource = resource("", "v1", "Pod", "pods");
pub const SERVICES: Resource = resource("", "v1", "Service", "services");
pub const ENDPOINT_SLICES: Resource =
    resource("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices");
pub const SERVICE_ACCOUNTS: Resource = resource("", "v1", "ServiceAccount", "serviceaccounts");
pub const SECRETS: Resource = resource("", "v1", "Secret", "secrets");
pub const CONFIG_MAPS: Resource = resource("", "v1", "ConfigMap", "configmaps");
pub const TOKEN_REVIEWS: Resource =
    resource("authentication.k8s.io", "v1", "TokenReview", "tokenreviews");
pub const AUTHORIZATION_POLICIES: Resource = resource(
    "security.istio.io",
    "v1",
    "AuthorizationPolicy",
    "authorizationpolicies",
);
pub const PEER_AUTHENTICATIONS: Resource = resource(
    "security.istio.io",
    "v1",
    "PeerAuthentication",
    "peerauthentications",
);
pub const REQUEST_AUTHENTICATIONS: Resource = resource(
    "security.istio.io",
    "v1",
    "RequestAuthentication",
    "requestauthentications",
);
pub const GATEWAYS: Resource = resource("gateway.networking.k8s.io", "v1", "Gateway", "gateways");

/// Where a grant applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (a ClusterRole).
    Cluster,
    /// The part's own namespace only (a Role).
    OwnNamespace,
}

/// One permission a part needs, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub resource: Resource,
    pub verbs: &'static [&'static str],
    pub scope: Scope,
    /// The objects the grant is limited to (RBAC `resourceNames`); empty for any.
    /// RBAC cannot limit `create` (or list/watch) by name.
    pub names: &'static [&'static str],
}

/// What a watch (a reflector: list, then watch) needs.
pub const WATCH: &[&str] = &["list", "watch"];

const fn watched(resource: Resource) -> Access {
    Access {
        resource,
        verbs: WATCH,
        scope: Scope::Cluster,
        names: &[],
    }
}

/// The mesh configuration the tunnel and the waypoint watch: every kind the
/// Kubernetes source translates into a snapshot.
pub const CONFIG: &[Access] = &[
    watched(NAMESPACES),
    watched(PODS),
    watched(SERVICES),
    watched(ENDPOINT_SLICES),
    watched(SERVICE_ACCOUNTS),
    watched(AUTHORIZATION_POLICIES),
    watched(PEER_AUTHENTICATIONS),
    watched(REQUEST_AUTHENTICATIONS),
    watched(GATEWAYS),
];

/// The CA: pods (which node runs which workload), TokenReview (who is asking), the
/// root's Secret in its own namespace, and the ConfigMap publishing the root there
/// and in every ambient namespace (namespaces watched to know which).
pub const CA: &[Access] = &[
    watched(PODS),
    watched(NAMESPACES),
    CA_TOKEN_REVIEWS,
    CA_ROOT_SECRET_READ,
    CA_ROOT_SECRET_CREATE,
    CA_ROOT_CONFIG_MAP_WRITE,
    CA_ROOT_CONFIG_MAP_CREATE,
];

/// The Secret holding the CA's root in `deploy/` (`ztunnel-ca --root-secret`): the
/// only Secret the CA may read.
pub const ROOT_SECRET: &str = "ztunnel-ca";
/// The ConfigMap publishing the root in `deploy/` (`--root-config-map`).
pub const ROOT_CONFIG_MAP: &str = "ztunnel-ca-root";

pub const CA_TOKEN_REVIEWS: Access = Access {
    resource: TOKEN_REVIEWS,
    verbs: &["create"],
    scope: Scope::Cluster,
    names: &[],
};
pub const CA_ROOT_SECRET_READ: Access = Access {
    resource: SECRETS,
    verbs: &["get"],
    scope: Scope::OwnNamespace,
    names: &[ROOT_SECRET],
};
pub const CA_ROOT_SECRET_CREATE: Access = Access {
    resource: SECRETS,
    verbs: &["create"],
    scope: Scope::OwnNamespace,
    names: &[],
};
pub const CA_ROOT_CONFIG_MAP_WRITE: Access = Access {
    resource: CONFIG_MAPS,
    verbs: &["get", "update"],
    scope: Scope::Cluster,
    names: &[ROOT_CONFIG_MAP],
};
pub const CA_ROOT_CONFIG_MAP_CREATE: Access = Access {
    resource: CONFIG_MAPS,
    verbs: &["create"],
    scope: Scope::Cluster,
    names: &[],
};

impl Access {
    /// Whether this grant covers a call: the verb, and the object's name when the
    /// grant is limited to names (`None`: a call on no single object).
    pub fn allows(&self, verb: &str, name: Option<&str>) -> bool {
        self.verbs.contains(&verb)
            && (self.names.is_empty() || name.is_some_and(|n| self.names.contains(&n)))
    }
}

/// Whether some grant of the list covers `verb` on `resource` named `name`.
pub fn granted(list: &[Access], resource: Resource, verb: &str, name: Option<&str>) -> bool {
    list.iter()
        .any(|a| a.resource == resource && a.allows(verb, name))
}

/// Each part's service account in `deploy/` and the list it is granted.
pub const PARTS: &[(&str, &[Access])] = &[
    ("ztunnel", CONFIG),
    ("ztunnel-ca", CA),
    ("waypoint", CONFIG),
];

/// A change to a store, as [`reflect`] reports it once the store has taken it.
#[derive(Debug)]
pub enum Change<K> {
    /// An object created or updated, as stored (pruned).
    Applied(K),
    /// An object deleted: its last version.
    Deleted(K),
    /// A list is in: the first, or a relist after the watch lost its place (the
    /// API server's history compacted, say). The store now holds exactly the API
    /// server's objects: those deleted meanwhile went without a `Deleted`.
    Listed,
}

impl<K> Change<K> {
    pub fn map<T>(self, f: impl FnOnce(K) -> T) -> Change<T> {
        match self {
            Change::Applied(k) => Change::Applied(f(k)),
            Change::Deleted(k) => Change::Deleted(f(k)),
            Change::Listed => Change::Listed,
        }
    }
}

/// A store of every `resource` object of the cluster, read as `K` (a malformed
/// one kept as such, see [`Checked`]), kept by a reflector (list, then watch,
/// listing again with backoff after errors), each object pruned of what the mesh
/// never reads. `on_change` runs after each change to the store with that change,
/// and once each list is in (not for each object of a relist); `on_error` after
/// each error, which is logged: the store keeps its last state meanwhile.
pub fn reflect<K: Kind>(
    client: kube::Client,
    resource: Resource,
    on_change: impl Fn(Change<Checked<K>>) + Send + 'static,
    on_error: impl Fn() + Send + 'static,
) -> Store<Checked<K>> {
    let dynamic_type = K::dynamic_type(resource);
    assert_eq!(
        K::kind(&dynamic_type),
        resource.kind,
        "a kind read as another's type"
    );
    let api = Api::<Checked<K>>::all_with(client, &dynamic_type);
    let writer = reflector::store::Writer::new(dynamic_type);
    let store = writer.as_reader();
    tokio::spawn(async move {
        let events = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(Prune::prune)
            .reflect(writer);
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(object)) => on_change(Change::Applied(object)),
                Ok(watcher::Event::Delete(object)) => on_change(Change::Deleted(object)),
                Ok(watcher::Event::InitDone) => on_change(Change::Listed),
                // A relist's objects: the store takes them all at its end (Listed).
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Err(e) => {
                    tracing::warn!(
                        kind = resource.kind,
                        "watching the API server: {e}; retrying, the last state stays"
                    );
                    on_error();
                }
            }
        }
    });
    store
}

/// A client for the cluster the process runs in (or the kubeconfig's, outside one).
pub async fn client() -> Result<kube::Client, crate::SourceError> {
    let mut config = kube::Config::infer()
        .await
        .map_err(crate::SourceError::KubeConfig)?;
    // Failures surface at once: the watchers back off and say so themselves, the
    // CA refuses (and the tunnel retries) rather than hold a request for minutes.
    config.default_retry = false;
    kube::Client::try_from(config).map_err(crate::SourceError::KubeClient)
}
