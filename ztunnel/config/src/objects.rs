//! The kinds the mesh reads, typed: Kubernetes' own as `k8s-openapi` types, the
//! custom ones (Istio's policies, the Gateway API's Gateway) as [`Custom`] with a
//! spec of our own. Both sources go through here: the API server's objects are
//! read into these types as they arrive (see [`k8s::reflect`]), the local
//! source's YAML is parsed into the same ones, and each becomes an [`Object`] of
//! the snapshot through [`Translate`], with the same checks.
//!
//! What a store keeps of an object is what [`Prune`] leaves: every tunnel holds
//! every pod of the cluster, and most of a pod is containers, volumes and status
//! the mesh has no use for.

use std::{borrow::Cow, collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use k8s_openapi::{
    api::{
        core::v1::{self as core, PodSpec, PodStatus, ServiceSpec},
        discovery::v1 as discovery,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
    NamespaceResourceScope,
};
use kube::core::ApiResource;
use serde::{de::DeserializeOwned, Deserialize, Deserializer};

use ztunnel_core::intern::Interner;

use super::{
    AllowedNamespaces, EndpointSlice, Gateway, LabelExpression, LabelSelector, Namespace, Pod,
    Policy, Service, ServiceAccount, ServicePort, CGROUP_ANNOTATION, DNS_CAPTURE_ANNOTATION,
    NETNS_ANNOTATION, SERVICE_NAME_LABEL,
};
use crate::k8s;

/// (kind, namespace, name); the namespace is `""` for a Namespace.
pub type Key = (String, String, String);

/// An object of the snapshot.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    Pod(Pod),
    Service(Service),
    Policy(Policy),
    Gateway(Gateway),
    EndpointSlice(EndpointSlice),
}

impl Object {
    /// Makes a pod's labels the one copy `labels` keeps of them, shared with
    /// every pod labelled the same.
    pub fn share_labels(&mut self, labels: &mut Interner<BTreeMap<String, String>>) {
        if let Object::Pod(pod) = self {
            pod.labels = labels.intern(pod.labels.clone());
        }
    }
}

/// What an object becomes in a snapshot; `Err` says why it is refused
/// (`field: problem`).
pub trait Translate {
    fn translate(&self, key: &Key, api_version: &str) -> Result<Object, String>;
}

/// Drops what the mesh never reads, before a store keeps the object.
pub trait Prune {
    fn prune(&mut self);
}

/// An object of a custom kind: its metadata and its spec (absent, or `null`:
/// `None`).
#[derive(Clone, Debug, Deserialize)]
pub struct Custom<Spec> {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default = "Option::default")]
    pub spec: Option<Spec>,
}

/// Custom kinds are named at run time (an [`ApiResource`] from [`k8s::Resource`]),
/// as kube's own dynamic objects are.
impl<Spec> kube::Resource for Custom<Spec> {
    type DynamicType = ApiResource;
    type Scope = NamespaceResourceScope;

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        Cow::Borrowed(&dt.kind)
    }
    fn group(dt: &ApiResource) -> Cow<'_, str> {
        Cow::Borrowed(&dt.group)
    }
    fn version(dt: &ApiResource) -> Cow<'_, str> {
        Cow::Borrowed(&dt.version)
    }
    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        Cow::Borrowed(&dt.api_version)
    }
    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        Cow::Borrowed(&dt.plural)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl<Spec> Prune for Custom<Spec> {
    fn prune(&mut self) {
        prune_meta(&mut self.metadata);
    }
}

/// An Istio security policy's spec, as the policy compiler reads it: field by
/// field, so that what it cannot read fails closed (`ztunnel_core::policy`).
#[derive(Clone, Debug, Deserialize)]
#[serde(transparent)]
pub struct PolicySpec(pub serde_yaml::Value);

impl Translate for Custom<PolicySpec> {
    fn translate(
        &self,
        (kind, namespace, name): &Key,
        api_version: &str,
    ) -> Result<Object, String> {
        // Compiled here, once: the snapshot carries it to the state.
        Ok(Object::Policy(Policy::new(
            kind,
            api_version,
            namespace,
            name,
            self.metadata.annotations.clone().unwrap_or_default(),
            self.spec
                .as_ref()
                .map_or(serde_yaml::Value::Null, |s| s.0.clone()),
        )))
    }
}

/// Why a policy is refused, if it is. A refused policy is still in force, in
/// its newest version, compiled fail closed (see `ztunnel_core::policy::Policy::refusal`):
/// keeping an older version would drop what the new one denies, dropping it
/// would open what it protects.
pub fn refused_policy(object: &Object) -> Option<String> {
    match object {
        Object::Policy(policy) => policy.refusal().map(|e| e.to_string()),
        _ => None,
    }
}

/// A Gateway's spec, as far as the mesh reads it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    gateway_class_name: Option<String>,
    #[serde(default)]
    listeners: Vec<ListenerSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListenerSpec {
    #[serde(default)]
    protocol: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    allowed_routes: Option<AllowedRoutesSpec>,
}

#[derive(Clone, Debug, Deserialize)]
struct AllowedRoutesSpec {
    #[serde(default)]
    namespaces: Option<RouteNamespacesSpec>,
}

#[derive(Clone, Debug, Deserialize)]
struct RouteNamespacesSpec {
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    selector: Option<SelectorSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SelectorSpec {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<ExpressionSpec>,
}

#[derive(Clone, Debug, Deserialize)]
struct ExpressionSpec {
    key: String,
    operator: String,
    #[serde(default)]
    values: Vec<String>,
}

impl Translate for Custom<GatewaySpec> {
    fn translate(&self, (_, namespace, name): &Key, _: &str) -> Result<Object, String> {
        let spec = self.spec.as_ref();
        let class = spec
            .and_then(|s| s.gateway_class_name.clone())
            .ok_or("spec.gatewayClassName is required")?;
        let listeners = spec.map_or(&[][..], |s| &s.listeners);
        Ok(Object::Gateway(Gateway {
            name: name.clone(),
            namespace: namespace.clone(),
            class,
            labels: labels(&self.metadata),
            allowed_namespaces: allowed_namespaces(listeners)?,
        }))
    }
}

/// Who may bind to a waypoint: its HBONE listener's (port 15008)
/// `allowedRoutes.namespaces`, as Istio reads it; none says Same.
fn allowed_namespaces(listeners: &[ListenerSpec]) -> Result<AllowedNamespaces, String> {
    let Some((i, listener)) = listeners
        .iter()
        .enumerate()
        .find(|(_, l)| l.protocol == "HBONE" && l.port == ztunnel_ebpf_common::HBONE_PORT)
    else {
        return Ok(AllowedNamespaces::Same);
    };
    let field = format!("spec.listeners[{i}].allowedRoutes.namespaces");
    let Some(namespaces) = listener
        .allowed_routes
        .as_ref()
        .and_then(|r| r.namespaces.as_ref())
    else {
        return Ok(AllowedNamespaces::Same);
    };
    Ok(match namespaces.from.as_deref().unwrap_or("Same") {
        "Same" => AllowedNamespaces::Same,
        "All" => AllowedNamespaces::All,
        "Selector" => {
            let selector = namespaces
                .selector
                .as_ref()
                .ok_or_else(|| format!("{field}.selector: required with from: Selector"))?;
            let mut expressions = Vec::new();
            for (j, e) in selector.match_expressions.iter().enumerate() {
                let (key, values) = (e.key.clone(), e.values.clone());
                expressions.push(match e.operator.as_str() {
                    "In" => LabelExpression::In(key, values),
                    "NotIn" => LabelExpression::NotIn(key, values),
                    "Exists" => LabelExpression::Exists(key),
                    "DoesNotExist" => LabelExpression::DoesNotExist(key),
                    other => return Err(format!(
                        "{field}.selector.matchExpressions[{j}].operator: {other:?} is not In, NotIn, Exists or DoesNotExist"
                    )),
                });
            }
            AllowedNamespaces::Selector(LabelSelector {
                match_labels: selector.match_labels.clone(),
                match_expressions: expressions,
            })
        }
        other => {
            return Err(format!(
                "{field}.from: {other:?} is not Same, All or Selector"
            ))
        }
    })
}

fn labels(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

fn annotations(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.annotations.clone().unwrap_or_default()
}

fn ipv4(field: &str, text: &str) -> Result<Ipv4Addr, String> {
    text.parse()
        .map_err(|_| format!("{field}: {text:?} is not an IPv4 address"))
}

/// A port number: 1 to 65535.
fn port(field: &str, n: i32) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{field}: {n} is not a port"))
}

impl Translate for core::Namespace {
    fn translate(&self, (_, _, name): &Key, _: &str) -> Result<Object, String> {
        Ok(Object::Namespace(Namespace {
            name: name.clone(),
            labels: labels(&self.metadata),
            annotations: annotations(&self.metadata),
        }))
    }
}

impl Translate for core::ServiceAccount {
    fn translate(&self, (_, namespace, name): &Key, _: &str) -> Result<Object, String> {
        Ok(Object::ServiceAccount(ServiceAccount {
            name: name.clone(),
            namespace: namespace.clone(),
        }))
    }
}

impl Translate for core::Pod {
    fn translate(&self, (_, namespace, name): &Key, _: &str) -> Result<Object, String> {
        let spec = self.spec.as_ref();
        let status = self.status.as_ref();
        // A pod on the host's network has the node's address, not its own; a
        // terminated pod's address is free for another pod.
        let own_address = !spec.and_then(|s| s.host_network).unwrap_or(false)
            && !matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
        let ip = match status.and_then(|s| s.pod_ip.as_deref()) {
            Some(ip) if own_address => Some(ipv4("status.podIP", ip)?),
            _ => None,
        };
        let annotations = annotations(&self.metadata);
        Ok(Object::Pod(Pod {
            uid: self.metadata.uid.clone(),
            name: name.clone(),
            namespace: namespace.clone(),
            labels: labels(&self.metadata).into(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            node_name: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            ip,
            netns: annotations.get(NETNS_ANNOTATION).map(PathBuf::from),
            cgroup: annotations.get(CGROUP_ANNOTATION).map(PathBuf::from),
            annotations,
        }))
    }
}

/// A container port name (IANA_SVC_NAME): lower-case letters, digits and
/// hyphens, at most 15, with a letter.
fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl Translate for core::Service {
    fn translate(&self, (_, namespace, name): &Key, _: &str) -> Result<Object, String> {
        let spec = self.spec.as_ref();
        let cluster_ip = match spec.and_then(|s| s.cluster_ip.as_deref()) {
            None | Some("None") | Some("") => None,
            Some(ip) => Some(ipv4("spec.clusterIP", ip)?),
        };
        let mut ports = Vec::new();
        for (i, p) in spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
        {
            let number = port(&format!("spec.ports[{i}].port"), p.port)?;
            let field = format!("spec.ports[{i}].targetPort");
            let (target_port, target_port_name) = match &p.target_port {
                None => (number, None),
                Some(IntOrString::Int(n)) => (port(&field, *n)?, None),
                // A number written as a string is still a number.
                Some(IntOrString::String(s)) => match s.parse::<i32>() {
                    Ok(n) => (port(&field, n)?, None),
                    Err(_) if is_port_name(s) => (0, Some(s.clone())),
                    Err(_) => {
                        return Err(format!("{field}: {s:?} is neither a port nor a port name"))
                    }
                },
            };
            ports.push(ServicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: number,
                target_port,
                target_port_name,
                app_protocol: p.app_protocol.clone().filter(|p| !p.is_empty()),
            });
        }
        Ok(Object::Service(Service {
            name: name.clone(),
            namespace: namespace.clone(),
            labels: labels(&self.metadata),
            cluster_ip,
            ports,
            selector: spec.and_then(|s| s.selector.clone()).unwrap_or_default(),
        }))
    }
}

impl Translate for discovery::EndpointSlice {
    fn translate(&self, (_, namespace, name): &Key, _: &str) -> Result<Object, String> {
        let mut addresses = Vec::new();
        // Only IPv4 slices: the mesh is IPv4 (IPv6 is refused at capture).
        if self.address_type == "IPv4" {
            for (i, endpoint) in self.endpoints.iter().enumerate() {
                if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                for address in &endpoint.addresses {
                    addresses.push(ipv4(&format!("endpoints[{i}].addresses"), address)?);
                }
            }
        }
        // A port without a number says "all ports": nothing to resolve a name to.
        // The API writes "" for a port without a name; a Service port without
        // one comes without the field.
        let ports = self
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let number = u16::try_from(p.port?).ok().filter(|n| *n > 0)?;
                Some((p.name.clone().filter(|n| !n.is_empty()), number))
            })
            .collect();
        Ok(Object::EndpointSlice(EndpointSlice {
            name: name.clone(),
            namespace: namespace.clone(),
            service: self
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL).cloned()),
            addresses,
            ports,
        }))
    }
}

/// The kubectl annotation holding a whole copy of the object as last applied.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// What no kind needs of its metadata.
fn prune_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    meta.creation_timestamp = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

impl Prune for core::Namespace {
    fn prune(&mut self) {
        prune_meta(&mut self.metadata);
        self.spec = None;
        self.status = None;
    }
}

impl Prune for core::ServiceAccount {
    fn prune(&mut self) {
        prune_meta(&mut self.metadata);
        self.metadata.labels = None;
        self.metadata.annotations = None;
        self.secrets = None;
        self.image_pull_secrets = None;
    }
}

impl Prune for core::Pod {
    fn prune(&mut self) {
        prune_meta(&mut self.metadata);
        // Of a pod's annotations a tunnel reads only Istio's DNS capture switch
        // (the local source's ztunnel.local/* ones are ignored in a cluster).
        let annotations = self.metadata.annotations.take().unwrap_or_default();
        self.metadata.annotations = annotations
            .get_key_value(DNS_CAPTURE_ANNOTATION)
            .map(|(k, v)| [(k.clone(), v.clone())].into());
        self.spec = self.spec.take().map(|s| PodSpec {
            service_account_name: s.service_account_name,
            node_name: s.node_name,
            host_network: s.host_network,
            ..Default::default()
        });
        self.status = self.status.take().map(|s| PodStatus {
            pod_ip: s.pod_ip,
            phase: s.phase,
            ..Default::default()
        });
    }
}

impl Prune for core::Service {
    fn prune(&mut self) {
        prune_meta(&mut self.metadata);
        self.spec = self.spec.take().map(|s| ServiceSpec {
            cluster_ip: s.cluster_ip,
            ports: s.ports,
            selector: s.selector,
            ..Default::default()
        });
        self.status = None;
    }
}

impl Prune for discovery::EndpointSlice {
    fn prune(&mut self) {
        prune_meta(&mut self.metadata);
        self.metadata.annotations = None;
        for endpoint in &mut self.endpoints {
            let ready = endpoint.conditions.take().and_then(|c| c.ready);
            *endpoint = discovery::Endpoint {
                addresses: std::mem::take(&mut endpoint.addresses),
                conditions: ready.map(|ready| discovery::EndpointConditions {
                    ready: Some(ready),
                    ..Default::default()
                }),
                ..Default::default()
            };
        }
    }
}

/// An object as a store keeps it: of its kind, or not readable as one (a field
/// of the wrong type, say), with its metadata as far as it could be read and
/// why. One malformed object is one refusal; it must not fail the list that
/// brought it, which would leave every other object of its kind unknown.
#[derive(Clone, Debug)]
pub enum Checked<K> {
    Valid(K),
    Malformed {
        metadata: ObjectMeta,
        reason: String,
    },
}

impl<K: kube::Resource> kube::Resource for Checked<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }
    fn api_version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::api_version(dt)
    }
    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        match self {
            Checked::Valid(k) => k.meta(),
            Checked::Malformed { metadata, .. } => metadata,
        }
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Checked::Valid(k) => k.meta_mut(),
            Checked::Malformed { metadata, .. } => metadata,
        }
    }
}

/// Read through a JSON value: what does not fit `K` is still an object, whose
/// identity comes from the value.
impl<'de, K: DeserializeOwned> Deserialize<'de> for Checked<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        // The error names the field's path (`status.podIP: invalid type ...`).
        Ok(match serde_path_to_error::deserialize::<_, K>(&value) {
            Ok(k) => Checked::Valid(k),
            Err(e) => {
                let text = |field: &str| value["metadata"][field].as_str().map(str::to_owned);
                Checked::Malformed {
                    metadata: ObjectMeta {
                        name: text("name"),
                        namespace: text("namespace"),
                        uid: text("uid"),
                        resource_version: text("resourceVersion"),
                        ..Default::default()
                    },
                    reason: format!("not a valid object of its kind: {e}"),
                }
            }
        })
    }
}

impl<K: Prune> Prune for Checked<K> {
    fn prune(&mut self) {
        if let Checked::Valid(k) = self {
            k.prune();
        }
    }
}

impl<K: Translate> Checked<K> {
    fn translate(&self, key: &Key, api_version: &str) -> Result<Object, String> {
        match self {
            Checked::Valid(k) => k.translate(key, api_version),
            Checked::Malformed { reason, .. } => Err(reason.clone()),
        }
    }
}

/// An object of a store, whatever its kind, as the Kubernetes source's translator
/// reads it.
pub trait Stored: Send + Sync {
    fn meta(&self) -> &ObjectMeta;
    fn translate(&self, key: &Key, api_version: &str) -> Result<Object, String>;
}

impl<K: Translate + kube::Resource + Send + Sync> Stored for Checked<K> {
    fn meta(&self) -> &ObjectMeta {
        kube::Resource::meta(self)
    }
    fn translate(&self, key: &Key, api_version: &str) -> Result<Object, String> {
        Checked::translate(self, key, api_version)
    }
}

/// A kind the mesh reads: its type, and how its dynamic type (its name at run
/// time, for custom kinds) comes from the access list's entry.
pub trait Kind:
    kube::Resource<DynamicType: Clone + Eq + std::hash::Hash>
    + Translate
    + Prune
    + DeserializeOwned
    + Clone
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    fn dynamic_type(resource: k8s::Resource) -> Self::DynamicType;
}

macro_rules! builtin {
    ($($kind:ty),*) => {$(
        impl Kind for $kind {
            fn dynamic_type(_: k8s::Resource) {}
        }
    )*};
}
builtin!(
    core::Namespace,
    core::ServiceAccount,
    core::Pod,
    core::Service,
    discovery::EndpointSlice
);

impl Kind for Custom<PolicySpec> {
    fn dynamic_type(resource: k8s::Resource) -> ApiResource {
        resource.api_resource()
    }
}

impl Kind for Custom<GatewaySpec> {
    fn dynamic_type(resource: k8s::Resource) -> ApiResource {
        resource.api_resource()
    }
}

/// The type each entry of [`k8s::CONFIG`] is read as, for what is done with a
/// kind without naming its type.
pub trait Typed: Send + Sync {
    /// Parses a local source's document of this kind.
    fn parse_yaml(
        &self,
        key: &Key,
        api_version: &str,
        value: serde_yaml::Value,
    ) -> Result<Object, String>;
    /// An object as the API server sends it, as the reflector stores it (pruned).
    fn decode(&self, value: serde_json::Value) -> Result<std::sync::Arc<dyn Stored>, String>;
}

struct TypeOf<K>(std::marker::PhantomData<fn() -> K>);

impl<K: Kind> Typed for TypeOf<K> {
    fn parse_yaml(
        &self,
        key: &Key,
        api_version: &str,
        value: serde_yaml::Value,
    ) -> Result<Object, String> {
        let object: K = serde_path_to_error::deserialize(value).map_err(|e| e.to_string())?;
        object.translate(key, api_version)
    }

    fn decode(&self, value: serde_json::Value) -> Result<std::sync::Arc<dyn Stored>, String> {
        let mut object: Checked<K> = serde_json::from_value(value).map_err(|e| e.to_string())?;
        object.prune();
        Ok(std::sync::Arc::new(object))
    }
}

/// Calls `f` with the type `resource` is read as; None for a resource the
/// configuration does not read.
pub fn with_type<R>(resource: k8s::Resource, f: impl KindFn<R>) -> Option<R> {
    Some(match resource {
        k8s::NAMESPACES => f.call::<core::Namespace>(),
        k8s::SERVICE_ACCOUNTS => f.call::<core::ServiceAccount>(),
        k8s::PODS => f.call::<core::Pod>(),
        k8s::SERVICES => f.call::<core::Service>(),
        k8s::ENDPOINT_SLICES => f.call::<discovery::EndpointSlice>(),
        k8s::GATEWAYS => f.call::<Custom<GatewaySpec>>(),
        k8s::AUTHORIZATION_POLICIES | k8s::PEER_AUTHENTICATIONS | k8s::REQUEST_AUTHENTICATIONS => {
            f.call::<Custom<PolicySpec>>()
        }
        _ => return None,
    })
}

/// Something done with a kind's type (see [`with_type`]).
pub trait KindFn<R> {
    fn call<K: Kind>(self) -> R;
}

struct Erase;

impl KindFn<&'static dyn Typed> for Erase {
    fn call<K: Kind>(self) -> &'static dyn Typed {
        &TypeOf::<K>(std::marker::PhantomData)
    }
}

/// The type `resource` is read as, behind a trait object.
pub fn typed(resource: k8s::Resource) -> Option<&'static dyn Typed> {
    with_type(resource, Erase)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod as KubePod;
    use kube::core::ObjectList;
    use serde_json::json;

    use super::*;

    #[test]
    fn one_malformed_object_in_a_list_is_kept_as_such_and_the_others_are_read() {
        let pod = |name: &str, ip: serde_json::Value| {
            json!({"metadata": {"name": name, "namespace": "shop", "uid": format!("u-{name}"),
                                "resourceVersion": "7"},
                   "spec": {"nodeName": "node-a"}, "status": {"phase": "Running", "podIP": ip}})
        };
        let list = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "9"},
            "items": [pod("good", "10.0.0.1".into()), pod("bad", 42.into()), pod("also-good", "10.0.0.2".into())]});
        let list: ObjectList<Checked<KubePod>> = serde_json::from_value(list).unwrap();
        let names: Vec<(&str, bool)> = list
            .items
            .iter()
            .map(|p| {
                let valid = matches!(p, Checked::Valid(_));
                (kube::Resource::meta(p).name.as_deref().unwrap(), valid)
            })
            .collect();
        assert_eq!(names, [("good", true), ("bad", false), ("also-good", true)]);
        let bad = &list.items[1];
        let key = ("Pod".into(), "shop".into(), "bad".into());
        let refused = Stored::translate(bad, &key, "v1").unwrap_err();
        assert!(
            refused.contains("status.podIP: invalid type: integer `42`"),
            "{refused}"
        );
        // Its identity survives, so that its refusal names it and a later good
        // version replaces it.
        let meta = Stored::meta(bad);
        assert_eq!(
            (meta.uid.as_deref(), meta.resource_version.as_deref()),
            (Some("u-bad"), Some("7"))
        );
    }

    #[test]
    fn a_pod_address_that_is_not_ipv4_is_refused_naming_the_field() {
        let pod: KubePod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "shop"},
            "status": {"phase": "Running", "podIP": "fd00::1"}}))
        .unwrap();
        let key = ("Pod".into(), "shop".into(), "p".into());
        assert_eq!(
            pod.translate(&key, "v1").unwrap_err(),
            "status.podIP: \"fd00::1\" is not an IPv4 address"
        );
    }
}
