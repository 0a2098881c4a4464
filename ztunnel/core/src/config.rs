//! The configuration snapshot: the Kubernetes resources the mesh reads, parsed into
//! typed objects (a [`Snapshot`]) by a source (crate `ztunnel-config`); the rest of
//! the mesh never sees where they came from.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::PathBuf, sync::Arc};

pub use crate::cow_map::CowMap;

/// The namespace label that puts a namespace's pods in the mesh, and the value.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const AMBIENT: &str = "ambient";
/// On a pod, opts it out of an ambient namespace.
pub const OPT_OUT: &str = "none";

/// Local mode only: where the node finds a pod's network namespace and cgroup (in a
/// cluster the container runtime tells).
pub const NETNS_ANNOTATION: &str = "ztunnel.local/netns";
pub const CGROUP_ANNOTATION: &str = "ztunnel.local/cgroup";

/// On a Namespace, `"true"` lets its enrolled pods send UDP other than DNS in
/// plaintext, outside the mesh; without it that UDP is refused (fail closed).
pub const ALLOW_PLAINTEXT_UDP_ANNOTATION: &str = "ztunnel.io/allow-plaintext-udp";

/// On a Namespace or a Pod, `"false"` turns DNS capture off for its pods (Istio's
/// annotation): their DNS goes straight to the server they ask.
pub const DNS_CAPTURE_ANNOTATION: &str = "ambient.istio.io/dns-capture";

/// A pod's labels. Pods with the same labels (the replicas of a Deployment)
/// share one copy: the sources intern them (`intern::Interner`), and the state's
/// workloads take the pod's.
pub type Labels = Arc<BTreeMap<String, String>>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub name: String,
    pub namespace: String,
}

/// A pod, as far as the mesh cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// `metadata.uid`: names the pod's cgroup on its node.
    pub uid: Option<String>,
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    pub annotations: BTreeMap<String, String>,
    /// `spec.serviceAccountName`, "default" when unset.
    pub service_account: String,
    /// `spec.nodeName`.
    pub node_name: String,
    /// `status.podIP`, once assigned; None for a pod on the host's network or one
    /// that has terminated (its address may already be another pod's).
    pub ip: Option<Ipv4Addr>,
    /// Where its node finds its network namespace and cgroup: the source fills
    /// these in for the pods of its node (local mode: from annotations).
    pub netns: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    /// A number, or 0 when the target port is named (see `target_port_name`).
    pub target_port: u16,
    /// A named target port (a container port's name): its number comes from the
    /// service's EndpointSlices.
    pub target_port_name: Option<String>,
    /// `appProtocol` (e.g. `http2`, `grpc`): how the waypoint speaks to it.
    pub app_protocol: Option<String>,
}

/// A `discovery.k8s.io` EndpointSlice: where a service's endpoints are, and the
/// numbers its (possibly named) target ports resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    pub name: String,
    pub namespace: String,
    /// The `kubernetes.io/service-name` label.
    pub service: Option<String>,
    /// Addresses of the endpoints not marked unready (IPv4 slices only).
    pub addresses: Vec<Ipv4Addr>,
    /// (service port name, target port number).
    pub ports: Vec<(Option<String>, u16)>,
}

/// The label naming an EndpointSlice's service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
}

/// A `gateway.networking.k8s.io` Gateway; class `istio-waypoint` declares a waypoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gateway {
    pub name: String,
    pub namespace: String,
    pub class: String,
    pub labels: BTreeMap<String, String>,
    /// Which namespaces may bind to it (its HBONE listener's
    /// `allowedRoutes.namespaces`; a waypoint's only listener that matters).
    pub allowed_namespaces: AllowedNamespaces,
}

/// `allowedRoutes.namespaces.from` of a Gateway listener, as Istio reads it for
/// `istio.io/use-waypoint-namespace`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AllowedNamespaces {
    /// Only the Gateway's own namespace (the default).
    #[default]
    Same,
    All,
    /// Namespaces whose labels the selector matches.
    Selector(LabelSelector),
}

impl AllowedNamespaces {
    pub fn admits(
        &self,
        gateway_namespace: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        match self {
            Self::Same => gateway_namespace == namespace,
            Self::All => true,
            Self::Selector(selector) => selector.matches(labels),
        }
    }
}

/// A Kubernetes label selector: every `matchLabels` pair and every expression.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<LabelExpression>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelExpression {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| match e {
                LabelExpression::In(k, values) => labels.get(k).is_some_and(|v| values.contains(v)),
                LabelExpression::NotIn(k, values) => {
                    labels.get(k).is_none_or(|v| !values.contains(v))
                }
                LabelExpression::Exists(k) => labels.contains_key(k),
                LabelExpression::DoesNotExist(k) => !labels.contains_key(k),
            })
    }
}

/// The class of waypoint Gateways.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// On a Namespace, Service or Pod: the waypoint its traffic goes through.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// ... and the waypoint's namespace when it is another.
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// On a waypoint Gateway: which traffic it handles (service, workload, all, none).
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// On a waypoint's pods: the Gateway they serve.
pub const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";

/// A `security.istio.io` resource, compiled where the source reads it.
pub use crate::policy::Policy;

/// Everything a source knows at one moment. Its maps share their contents with
/// the snapshot before (see [`CowMap`]): a source that changes one object makes
/// the next snapshot in time that does not grow with the cluster, and the state
/// finds what changed between two in time that grows with what changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub namespaces: CowMap<String, Namespace>,
    pub service_accounts: CowMap<(String, String), ServiceAccount>,
    pub pods: CowMap<(String, String), Pod>,
    pub services: CowMap<(String, String), Service>,
    pub policies: CowMap<(String, String, String), Policy>,
    pub gateways: CowMap<(String, String), Gateway>,
    pub endpoint_slices: CowMap<(String, String), EndpointSlice>,
}

impl Snapshot {
    /// Whether the namespace lets its enrolled pods send UDP other than DNS.
    pub fn allows_plaintext_udp(&self, namespace: &str) -> bool {
        self.namespaces
            .get(namespace)
            .and_then(|n| n.annotations.get(ALLOW_PLAINTEXT_UDP_ANNOTATION))
            .is_some_and(|v| v == "true")
    }
}

/// A refused object or file: where, which object, what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// `Kind namespace/name` when known.
    pub object: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        write!(f, ": {}", self.message)
    }
}
