//! The local source: a directory of Kubernetes YAML files, watched for changes.
//!
//! A bad object is refused with an error naming the file, the object and the field,
//! and its last good version (if any) stays in force; a file that cannot be read or
//! parsed at all keeps all of its last good objects. Everything else updates.
//! Security policies are the exception: a refused one is reported the same way but
//! stays in force in its newest version, fail closed (see [`refused_policy`]).

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tokio::sync::watch;

use super::{
    AllowedNamespaces, ConfigError, ConfigMetrics, EndpointSlice, Gateway, LabelExpression,
    LabelSelector, Namespace, Pod, Policy, Service, ServiceAccount, ServicePort, Snapshot,
    CGROUP_ANNOTATION, NETNS_ANNOTATION, SERVICE_NAME_LABEL,
};

/// What the directory looked like: files with their size and modification time.
/// Equal fingerprints mean nothing to re-read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<SystemTime>)>);

pub fn fingerprint(dir: &Path) -> Result<Fingerprint> {
    let mut files = Vec::new();
    for path in yaml_files(dir)? {
        // A file removed between listing and stat is simply gone.
        if let Ok(meta) = fs::metadata(&path) {
            files.push((path, meta.len(), meta.modified().ok()));
        }
    }
    Ok(Fingerprint(files))
}

/// The `.yaml`/`.yml` files of the directory, sorted.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// (kind, namespace, name)
pub(super) type Key = (String, String, String);

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    Pod(Pod),
    Service(Service),
    Policy(Policy),
    Gateway(Gateway),
    EndpointSlice(EndpointSlice),
}

/// The Istio kinds we keep for policy.
const POLICY_KINDS: [&str; 3] = [
    "AuthorizationPolicy",
    "PeerAuthentication",
    "RequestAuthentication",
];

/// Loads a directory, remembering the last good version of every object.
#[derive(Default)]
pub struct LocalSource {
    dir: PathBuf,
    last_good: HashMap<Key, (PathBuf, Object)>,
}

impl LocalSource {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            last_good: HashMap::new(),
        }
    }

    /// Reads the directory: the resulting snapshot, and every error found.
    pub fn load(&mut self) -> Result<(Snapshot, Vec<ConfigError>)> {
        let mut objects: HashMap<Key, (PathBuf, Object)> = HashMap::new();
        let mut errors = Vec::new();
        for path in yaml_files(&self.dir)? {
            let text = match fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    errors.push(error(&path, None, format!("cannot read: {e}")));
                    self.keep_file(&path, &mut objects);
                    continue;
                }
            };
            let mut documents = Vec::new();
            for document in serde_yaml::Deserializer::from_str(&text) {
                match serde_yaml::Value::deserialize(document) {
                    Ok(value) => documents.push(value),
                    Err(e) => {
                        errors.push(error(&path, None, format!("not valid YAML: {e}")));
                        documents.clear();
                        self.keep_file(&path, &mut objects);
                        break;
                    }
                }
            }
            for value in documents {
                if value.is_null() {
                    continue;
                }
                let key = match identify(&value) {
                    Ok(Some(key)) => key,
                    Ok(None) => continue, // a kind the mesh does not use
                    Err(e) => {
                        errors.push(error(&path, None, e));
                        continue;
                    }
                };
                let label = format!("{} {}/{}", key.0, key.1, key.2);
                if let Some((other, _)) = objects.get(&key) {
                    errors.push(error(
                        &path,
                        Some(label),
                        format!("also defined in {}", other.display()),
                    ));
                    continue;
                }
                match parse(&key, value) {
                    Ok(object) => {
                        if let Some(problem) = refused_policy(&object) {
                            errors.push(error(&path, Some(label), problem));
                        }
                        objects.insert(key, (path.clone(), object));
                    }
                    Err(e) => {
                        errors.push(error(&path, Some(label), format!("{e:#}")));
                        if let Some(previous) = self.last_good.get(&key) {
                            objects.insert(key, previous.clone());
                        }
                    }
                }
            }
        }
        self.last_good = objects;
        Ok((self.snapshot(), errors))
    }

    /// Keeps every last-good object of a file that could not be read.
    fn keep_file(&self, path: &Path, objects: &mut HashMap<Key, (PathBuf, Object)>) {
        for (key, entry) in &self.last_good {
            if entry.0 == path {
                objects.insert(key.clone(), entry.clone());
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        build_snapshot(
            self.last_good
                .iter()
                .map(|(key, (_, object))| (key, object)),
        )
    }
}

/// The snapshot holding these objects.
pub(super) fn build_snapshot<'a>(objects: impl Iterator<Item = (&'a Key, &'a Object)>) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for ((kind, ns, name), object) in objects {
        match object.clone() {
            Object::Namespace(n) => {
                snapshot.namespaces.insert(name.clone(), n);
            }
            Object::ServiceAccount(sa) => {
                snapshot
                    .service_accounts
                    .insert((ns.clone(), name.clone()), sa);
            }
            Object::Pod(p) => {
                snapshot.pods.insert((ns.clone(), name.clone()), p);
            }
            Object::Service(s) => {
                snapshot.services.insert((ns.clone(), name.clone()), s);
            }
            Object::Gateway(g) => {
                snapshot.gateways.insert((ns.clone(), name.clone()), g);
            }
            Object::EndpointSlice(e) => {
                snapshot
                    .endpoint_slices
                    .insert((ns.clone(), name.clone()), e);
            }
            Object::Policy(p) => {
                snapshot
                    .policies
                    .insert((kind.clone(), ns.clone(), name.clone()), p);
            }
        }
    }
    snapshot
}

/// Watches the directory, publishing a new snapshot whenever a file changes.
/// Errors are logged with their file, object and field.
pub fn watch(
    dir: &Path,
    every: Duration,
    metrics: ConfigMetrics,
) -> Result<watch::Receiver<Arc<Snapshot>>> {
    let mut source = LocalSource::new(dir);
    let mut seen = fingerprint(dir)?;
    let (snapshot, errors) = source.load()?;
    report(&errors);
    metrics.built(errors.len());
    metrics.updates.inc();
    let (tx, rx) = watch::channel(Arc::new(snapshot));
    let dir = dir.to_owned();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let now = match fingerprint(&dir) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!("config: {e:#}; keeping the last good state");
                    metrics.source_errors.inc();
                    continue;
                }
            };
            if now == seen {
                continue;
            }
            seen = now;
            match source.load() {
                Ok((snapshot, errors)) => {
                    report(&errors);
                    metrics.built(errors.len());
                    if tx.send_if_modified(|current| {
                        let changed = **current != snapshot;
                        if changed {
                            *current = Arc::new(snapshot);
                        }
                        changed
                    }) {
                        metrics.updates.inc();
                    }
                    if tx.is_closed() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("config: {e:#}; keeping the last good state");
                    metrics.source_errors.inc();
                }
            }
        }
    });
    Ok(rx)
}

fn report(errors: &[ConfigError]) {
    for e in errors {
        tracing::warn!(file = %e.file.display(), object = e.object.as_deref().unwrap_or(""), "config refused: {}", e.message);
    }
}

fn error(path: &Path, object: Option<String>, message: String) -> ConfigError {
    ConfigError {
        file: path.to_owned(),
        object,
        message,
    }
}

/// The object's key, or None for kinds the mesh ignores.
pub(super) fn identify(value: &serde_yaml::Value) -> Result<Option<Key>, String> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or("a document without `kind`")?;
    let api = value
        .get("apiVersion")
        .and_then(|a| a.as_str())
        .unwrap_or("");
    let known = match kind {
        "Namespace" | "ServiceAccount" | "Pod" | "Service" => api == "v1",
        "EndpointSlice" => api == "discovery.k8s.io/v1",
        "Gateway" => matches!(
            api,
            "gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1"
        ),
        k if POLICY_KINDS.contains(&k) => {
            matches!(api, "security.istio.io/v1" | "security.istio.io/v1beta1")
        }
        _ => false,
    };
    if !known {
        return Ok(None);
    }
    let meta = value
        .get("metadata")
        .ok_or(format!("{kind} without metadata"))?;
    let name = meta
        .get("name")
        .and_then(|n| n.as_str())
        .ok_or(format!("{kind}: metadata.name is missing"))?;
    let namespace = match kind {
        "Namespace" => "",
        _ => meta
            .get("namespace")
            .and_then(|n| n.as_str())
            .unwrap_or("default"),
    };
    Ok(Some((
        kind.to_owned(),
        namespace.to_owned(),
        name.to_owned(),
    )))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Resource<Spec, Status = serde_yaml::Value> {
    metadata: Meta,
    #[serde(default = "Option::default")]
    spec: Option<Spec>,
    #[serde(default = "Option::default")]
    status: Option<Status>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    service_account_name: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    host_network: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default)]
    phase: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortSpec {
    #[serde(default)]
    name: Option<String>,
    port: u16,
    #[serde(default)]
    target_port: Option<serde_yaml::Value>,
    #[serde(default)]
    app_protocol: Option<String>,
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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointSliceSpec {
    metadata: Meta,
    address_type: String,
    #[serde(default)]
    endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    ports: Vec<EndpointPortSpec>,
}

#[derive(Deserialize)]
struct EndpointSpec {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: EndpointConditions,
}

#[derive(Deserialize, Default)]
struct EndpointConditions {
    #[serde(default)]
    ready: Option<bool>,
}

#[derive(Deserialize)]
struct EndpointPortSpec {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    port: Option<u16>,
}

#[derive(Deserialize, Default)]
struct GatewaySpec {
    #[serde(default)]
    listeners: Vec<ListenerSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListenerSpec {
    #[serde(default)]
    protocol: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    allowed_routes: Option<AllowedRoutesSpec>,
}

#[derive(Deserialize)]
struct AllowedRoutesSpec {
    #[serde(default)]
    namespaces: Option<RouteNamespacesSpec>,
}

#[derive(Deserialize)]
struct RouteNamespacesSpec {
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    selector: Option<SelectorSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SelectorSpec {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<ExpressionSpec>,
}

#[derive(Deserialize)]
struct ExpressionSpec {
    key: String,
    operator: String,
    #[serde(default)]
    values: Vec<String>,
}

/// Who may bind to a waypoint: its HBONE listener's (port 15008)
/// `allowedRoutes.namespaces`, as Istio reads it; none says Same.
fn allowed_namespaces(listeners: &[ListenerSpec]) -> Result<AllowedNamespaces> {
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
                .with_context(|| format!("{field}.selector: required with from: Selector"))?;
            let mut expressions = Vec::new();
            for (j, e) in selector.match_expressions.iter().enumerate() {
                let (key, values) = (e.key.clone(), e.values.clone());
                expressions.push(match e.operator.as_str() {
                    "In" => LabelExpression::In(key, values),
                    "NotIn" => LabelExpression::NotIn(key, values),
                    "Exists" => LabelExpression::Exists(key),
                    "DoesNotExist" => LabelExpression::DoesNotExist(key),
                    other => bail!(
                        "{field}.selector.matchExpressions[{j}].operator: {other:?} is not In, NotIn, Exists or DoesNotExist"
                    ),
                });
            }
            AllowedNamespaces::Selector(LabelSelector {
                match_labels: selector.match_labels.clone(),
                match_expressions: expressions,
            })
        }
        other => bail!("{field}.from: {other:?} is not Same, All or Selector"),
    })
}

pub(super) fn parse(key: &Key, value: serde_yaml::Value) -> Result<Object> {
    let (kind, namespace, name) = key.clone();
    Ok(match kind.as_str() {
        "Namespace" => {
            let r: Resource<serde_yaml::Value> = serde_yaml::from_value(value)?;
            Object::Namespace(Namespace {
                name,
                labels: r.metadata.labels,
                annotations: r.metadata.annotations,
            })
        }
        "ServiceAccount" => Object::ServiceAccount(ServiceAccount { name, namespace }),
        "EndpointSlice" => {
            let slice: EndpointSliceSpec = serde_yaml::from_value(value)?;
            let mut addresses = Vec::new();
            // Only IPv4 slices: the mesh is IPv4 (IPv6 is refused at capture).
            if slice.address_type == "IPv4" {
                for (i, endpoint) in slice.endpoints.iter().enumerate() {
                    if endpoint.conditions.ready == Some(false) {
                        continue;
                    }
                    for address in &endpoint.addresses {
                        addresses.push(address.parse::<Ipv4Addr>().map_err(|_| {
                            anyhow::anyhow!(
                                "endpoints[{i}].addresses: {address:?} is not an IPv4 address"
                            )
                        })?);
                    }
                }
            }
            // A port without a number says "all ports": nothing to resolve a name to.
            // The API writes "" for a port without a name; a Service port without
            // one comes without the field.
            let ports = slice
                .ports
                .into_iter()
                .filter_map(|p| {
                    Some((p.name.filter(|n| !n.is_empty()), p.port.filter(|n| *n > 0)?))
                })
                .collect();
            Object::EndpointSlice(EndpointSlice {
                name,
                namespace,
                service: slice.metadata.labels.get(SERVICE_NAME_LABEL).cloned(),
                addresses,
                ports,
            })
        }
        "Pod" => {
            let r: Resource<PodSpec, PodStatus> = serde_yaml::from_value(value)?;
            let spec = r.spec.unwrap_or_default();
            let status = r.status.unwrap_or_default();
            // A pod on the host's network has the node's address, not its own; a
            // terminated pod's address is free for another pod.
            let own_address = !spec.host_network
                && !matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
            let ip =
                match status.pod_ip.filter(|_| own_address) {
                    Some(ip) => Some(ip.parse::<Ipv4Addr>().map_err(|_| {
                        anyhow::anyhow!("status.podIP: {ip:?} is not an IPv4 address")
                    })?),
                    None => None,
                };
            Object::Pod(Pod {
                uid: r.metadata.uid,
                name,
                namespace,
                labels: r.metadata.labels,
                service_account: spec
                    .service_account_name
                    .unwrap_or_else(|| "default".into()),
                node_name: spec.node_name.unwrap_or_default(),
                ip,
                netns: r
                    .metadata
                    .annotations
                    .get(NETNS_ANNOTATION)
                    .map(PathBuf::from),
                cgroup: r
                    .metadata
                    .annotations
                    .get(CGROUP_ANNOTATION)
                    .map(PathBuf::from),
                annotations: r.metadata.annotations,
            })
        }
        "Service" => {
            let r: Resource<ServiceSpec> = serde_yaml::from_value(value)?;
            let spec = r.spec.unwrap_or_default();
            let cluster_ip = match spec.cluster_ip.as_deref() {
                None | Some("None") | Some("") => None,
                Some(ip) => Some(ip.parse::<Ipv4Addr>().map_err(|_| {
                    anyhow::anyhow!("spec.clusterIP: {ip:?} is not an IPv4 address")
                })?),
            };
            let mut ports = Vec::new();
            for (i, p) in spec.ports.into_iter().enumerate() {
                if p.port == 0 {
                    bail!("spec.ports[{i}].port: 0 is not a port");
                }
                let (target_port, target_port_name) = match p.target_port {
                    None => (p.port, None),
                    Some(serde_yaml::Value::Number(n)) => (
                        n.as_u64()
                            .and_then(|n| u16::try_from(n).ok())
                            .filter(|n| *n > 0)
                            .ok_or_else(|| {
                                anyhow::anyhow!("spec.ports[{i}].targetPort: {n} is not a port")
                            })?,
                        None,
                    ),
                    // A number written as a string is still a number.
                    Some(serde_yaml::Value::String(s)) => match s.parse::<u16>() {
                        Ok(n) if n > 0 => (n, None),
                        Ok(_) => bail!("spec.ports[{i}].targetPort: 0 is not a port"),
                        Err(_) if is_port_name(&s) => (0, Some(s)),
                        Err(_) => bail!(
                            "spec.ports[{i}].targetPort: {s:?} is neither a port nor a port name"
                        ),
                    },
                    Some(other) => bail!("spec.ports[{i}].targetPort: {other:?} is not a port"),
                };
                ports.push(ServicePort {
                    name: p.name.filter(|n| !n.is_empty()),
                    port: p.port,
                    target_port,
                    target_port_name,
                    app_protocol: p.app_protocol.filter(|p| !p.is_empty()),
                });
            }
            Object::Service(Service {
                name,
                namespace,
                labels: r.metadata.labels,
                cluster_ip,
                ports,
                selector: spec.selector,
            })
        }
        "Gateway" => {
            let class = value
                .get("spec")
                .and_then(|s| s.get("gatewayClassName"))
                .and_then(|c| c.as_str())
                .ok_or_else(|| anyhow::anyhow!("spec.gatewayClassName is required"))?
                .to_owned();
            let r: Resource<GatewaySpec> = serde_yaml::from_value(value)?;
            let allowed_namespaces = allowed_namespaces(&r.spec.unwrap_or_default().listeners)?;
            Object::Gateway(Gateway {
                name,
                namespace,
                class,
                labels: r.metadata.labels,
                allowed_namespaces,
            })
        }
        _ => {
            let api_version = value
                .get("apiVersion")
                .and_then(|a| a.as_str())
                .unwrap_or_default()
                .to_owned();
            let spec = value
                .get("spec")
                .cloned()
                .unwrap_or(serde_yaml::Value::Null);
            let meta: Resource<serde_yaml::Value> = serde_yaml::from_value(value)?;
            // Compiled here, once: the snapshot carries it to the state.
            let policy = Policy::new(
                &kind,
                &api_version,
                &namespace,
                &name,
                meta.metadata.annotations,
                spec,
            );
            Object::Policy(policy)
        }
    })
}

/// Why a policy is refused, if it is. A refused policy is still in force, in
/// its newest version, compiled fail closed (see `ztunnel_core::policy::Policy::refusal`):
/// keeping an older version would drop what the new one denies, dropping it
/// would open what it protects.
pub(super) fn refused_policy(object: &Object) -> Option<String> {
    match object {
        Object::Policy(policy) => policy.refusal().map(|e| e.to_string()),
        _ => None,
    }
}

/// Every valid Pod in the directory (for the CA's node checks).
/// The pods of a directory (for the CA's node checks), read again when it changes.
/// Like the tunnel's watch, it keeps its last good state: a file that cannot be
/// read keeps the pods it held, a directory that cannot be read keeps them all.
pub struct Pods {
    dir: PathBuf,
    source: LocalSource,
    seen: Option<Fingerprint>,
    pods: Vec<Pod>,
}

impl Pods {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            source: LocalSource::new(&dir),
            dir,
            seen: None,
            pods: Vec::new(),
        }
    }

    /// The pods now, or as last read when the directory cannot be read (logged).
    pub fn current(&mut self) -> &[Pod] {
        let reloaded = fingerprint(&self.dir).and_then(|now| {
            if self.seen.as_ref() != Some(&now) {
                let (snapshot, errors) = self.source.load()?;
                report(&errors);
                self.pods = snapshot.pods.into_values().collect();
                self.seen = Some(now);
            }
            Ok(())
        });
        if let Err(e) = reloaded {
            tracing::warn!("config: {e:#}; keeping the pods last read");
        }
        &self.pods
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ztunnel-config-test-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: sleep\n  namespace: demo\n  labels: {app: sleep}\nspec:\n  serviceAccountName: sleep\n  nodeName: node-a\nstatus:\n  podIP: 10.244.0.2\n";

    #[test]
    fn parses_the_kinds_the_mesh_uses() {
        let dir = dir_with(&[
            ("ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels: {istio.io/dataplane-mode: ambient}\n"),
            ("pod.yaml", POD),
            ("svc.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports:\n  - {port: 80, targetPort: 8080}\n"),
            ("ap.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: demo}\nspec: {action: DENY}\n"),
            ("other.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n"),
        ]);
        let (snapshot, errors) = LocalSource::new(&dir).load().unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            snapshot.namespaces["demo"].labels["istio.io/dataplane-mode"],
            "ambient"
        );
        let pod = &snapshot.pods[&("demo".into(), "sleep".into())];
        assert_eq!(pod.ip, Some(Ipv4Addr::new(10, 244, 0, 2)));
        assert_eq!(pod.service_account, "sleep");
        let svc = &snapshot.services[&("demo".into(), "web".into())];
        assert_eq!(svc.ports[0].target_port, 8080);
        assert_eq!(snapshot.policies.len(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn port_level_mtls_keys_load_as_integers_and_strings() {
        let pa = |name: &str, port: &str| {
            format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  selector: {{matchLabels: {{app: {name}}}}}\n  mtls: {{mode: STRICT}}\n  portLevelMtls:\n    {port}:\n      mode: DISABLE\n")
        };
        let dir = dir_with(&[
            ("int.yaml", &pa("a", "8080")),
            ("text.yaml", &pa("b", "'8080'")),
        ]);
        let (snapshot, errors) = LocalSource::new(&dir).load().unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(snapshot.policies.len(), 2);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_gateways_hbone_listener_says_which_namespaces_may_bind() {
        let gateway = |listeners: &str| {
            format!("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: wp, namespace: infra}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: {listeners}\n")
        };
        let parse = |listeners: &str| {
            let dir = dir_with(&[("gw.yaml", &gateway(listeners))]);
            let loaded = LocalSource::new(&dir).load().unwrap();
            fs::remove_dir_all(dir).unwrap();
            match loaded {
                (snapshot, errors) if errors.is_empty() => Ok(snapshot.gateways
                    [&("infra".into(), "wp".into())]
                    .allowed_namespaces
                    .clone()),
                (_, errors) => Err(errors[0].to_string()),
            }
        };
        assert_eq!(parse("[]"), Ok(AllowedNamespaces::Same));
        assert_eq!(
            parse("[{name: m, port: 15008, protocol: HBONE}]"),
            Ok(AllowedNamespaces::Same)
        );
        assert_eq!(
            parse("[{name: m, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: All}}}]"),
            Ok(AllowedNamespaces::All)
        );
        assert_eq!(
            parse(
                "[{name: h, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}]"
            ),
            Ok(AllowedNamespaces::Same),
            "only the HBONE listener counts"
        );
        assert_eq!(
            parse("[{name: m, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {team: a}, matchExpressions: [{key: env, operator: Exists}]}}}}]"),
            Ok(AllowedNamespaces::Selector(LabelSelector {
                match_labels: [("team".to_string(), "a".to_string())].into(),
                match_expressions: vec![LabelExpression::Exists("env".into())],
            }))
        );
        let refused = parse("[{name: m, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: Anyone}}}]");
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("spec.listeners[0].allowedRoutes.namespaces.from")),
            "{refused:?}"
        );
        let refused = parse("[{name: m, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: Selector}}}]");
        assert!(refused.is_err(), "a Selector without a selector");
    }

    #[test]
    fn a_bad_object_is_refused_with_its_file_object_and_field_and_its_last_good_version_stays() {
        let dir = dir_with(&[("pod.yaml", POD)]);
        let mut source = LocalSource::new(&dir);
        let (first, _) = source.load().unwrap();
        fs::write(dir.join("pod.yaml"), POD.replace("10.244.0.2", "not-an-ip")).unwrap();
        fs::write(dir.join("broken.yaml"), "kind: [unclosed\n").unwrap();
        let (second, errors) = source.load().unwrap();
        assert_eq!(second.pods, first.pods, "the last good pod stays");
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert!(
            text.iter()
                .any(|e| e.contains("pod.yaml: Pod demo/sleep: status.podIP")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|e| e.contains("broken.yaml: not valid YAML")),
            "{text:?}"
        );

        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec:\n  ports:\n  - {port: 80, targetPort: Not_A_Name}\n";
        fs::write(dir.join("svc.yaml"), svc).unwrap();
        let (_, errors) = source.load().unwrap();
        assert!(
            errors.iter().any(|e| e
                .to_string()
                .contains("Service demo/web: spec.ports[0].targetPort")),
            "{errors:?}"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_cas_pods_survive_a_corrupt_file_and_a_directory_replaced_by_a_file() {
        let dir = dir_with(&[("pod.yaml", POD)]);
        let mut pods = Pods::new(dir.clone());
        assert_eq!(pods.current().len(), 1);
        fs::write(dir.join("pod.yaml"), "\u{1}: [not yaml").unwrap();
        assert_eq!(pods.current().len(), 1, "a corrupt file keeps its pods");
        let aside = dir.with_extension("aside");
        fs::rename(&dir, &aside).unwrap();
        fs::write(&dir, "not a directory").unwrap();
        assert_eq!(
            pods.current().len(),
            1,
            "an unreadable directory keeps them all"
        );
        fs::remove_file(&dir).unwrap();
        fs::rename(&aside, &dir).unwrap();
        fs::write(dir.join("pod.yaml"), POD.replace("sleep", "other")).unwrap();
        let names: Vec<_> = pods.current().iter().map(|p| p.name.clone()).collect();
        assert_eq!(names, ["other"], "fixed: read again");
        fs::remove_dir_all(dir).unwrap();
    }
}
