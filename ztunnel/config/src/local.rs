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
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::Deserialize;
use tokio::sync::watch;
use ztunnel_core::intern::Interner;

use super::{
    objects::{self, refused_policy, Key, Object},
    ConfigError, ConfigMetrics, Pod, Snapshot, SourceError,
};
use crate::k8s;

/// What the directory looked like: files with their size and modification time.
/// Equal fingerprints mean nothing to re-read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<SystemTime>)>);

pub fn fingerprint(dir: &Path) -> Result<Fingerprint, SourceError> {
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
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let read = |error| SourceError::Read {
        path: dir.to_owned(),
        error,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
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
    /// One copy of each distinct set of pod labels.
    labels: Interner<BTreeMap<String, String>>,
}

impl LocalSource {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            last_good: HashMap::new(),
            labels: Interner::default(),
        }
    }

    /// Reads the directory: the resulting snapshot, and every error found.
    pub fn load(&mut self) -> Result<(Snapshot, Vec<ConfigError>), SourceError> {
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
                    Ok(mut object) => {
                        object.share_labels(&mut self.labels);
                        if let Some(problem) = refused_policy(&object) {
                            errors.push(error(&path, Some(label), problem));
                        }
                        objects.insert(key, (path.clone(), object));
                    }
                    Err(e) => {
                        errors.push(error(&path, Some(label), e));
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
    for (key, object) in objects {
        insert_object(&mut snapshot, key, object.clone());
    }
    snapshot
}

/// Puts an object in the snapshot, in place of its previous version.
pub(super) fn insert_object(snapshot: &mut Snapshot, (kind, ns, name): &Key, object: Object) {
    let key = || (ns.clone(), name.clone());
    match object {
        Object::Namespace(n) => {
            snapshot.namespaces.insert(name.clone(), n);
        }
        Object::ServiceAccount(sa) => {
            snapshot.service_accounts.insert(key(), sa);
        }
        Object::Pod(p) => {
            snapshot.pods.insert(key(), p);
        }
        Object::Service(s) => {
            snapshot.services.insert(key(), s);
        }
        Object::Gateway(g) => {
            snapshot.gateways.insert(key(), g);
        }
        Object::EndpointSlice(e) => {
            snapshot.endpoint_slices.insert(key(), e);
        }
        Object::Policy(p) => {
            snapshot
                .policies
                .insert((kind.clone(), ns.clone(), name.clone()), p);
        }
    }
}

/// Takes an object (by its key's kind) out of the snapshot.
pub(super) fn remove_object(snapshot: &mut Snapshot, key @ (kind, ns, name): &Key) {
    let named = (ns.clone(), name.clone());
    match kind.as_str() {
        "Namespace" => drop(snapshot.namespaces.remove(name)),
        "ServiceAccount" => drop(snapshot.service_accounts.remove(&named)),
        "Pod" => drop(snapshot.pods.remove(&named)),
        "Service" => drop(snapshot.services.remove(&named)),
        "Gateway" => drop(snapshot.gateways.remove(&named)),
        "EndpointSlice" => drop(snapshot.endpoint_slices.remove(&named)),
        _ => drop(snapshot.policies.remove(key)),
    }
}

/// Watches the directory, publishing a new snapshot whenever a file changes.
/// Errors are logged with their file, object and field.
pub fn watch(
    dir: &Path,
    every: Duration,
    metrics: ConfigMetrics,
) -> Result<watch::Receiver<Arc<Snapshot>>, SourceError> {
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
                    tracing::warn!("config: {e}; keeping the last good state");
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
                    tracing::warn!("config: {e}; keeping the last good state");
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

/// Parses a document of a kind the mesh reads (see [`identify`]) into its typed
/// form and translates it, as the Kubernetes source does an API object.
pub(super) fn parse(key: &Key, value: serde_yaml::Value) -> Result<Object, String> {
    let api_version = value
        .get("apiVersion")
        .and_then(|a| a.as_str())
        .unwrap_or_default()
        .to_owned();
    let typed = k8s::CONFIG
        .iter()
        .find(|a| a.resource.kind == key.0)
        .and_then(|a| objects::typed(a.resource))
        .ok_or_else(|| format!("{}: not a kind the mesh reads", key.0))?;
    typed.parse_yaml(key, &api_version, value)
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
            tracing::warn!("config: {e}; keeping the pods last read");
        }
        &self.pods
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{AllowedNamespaces, LabelExpression, LabelSelector};

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

        // A field of the wrong type is refused naming its path.
        let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow, namespace: demo}\nspec:\n  rules:\n  - from:\n    - source: {principals: 42}\n";
        fs::write(dir.join("ap.yaml"), policy).unwrap();
        fs::write(dir.join("pod.yaml"), POD.replace("10.244.0.2", "[42]")).unwrap();
        let (_, errors) = source.load().unwrap();
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        for expected in [
            "ap.yaml: AuthorizationPolicy demo/allow: spec.rules[0].from[0].source.principals: invalid type: integer `42`",
            "pod.yaml: Pod demo/sleep: status.podIP: invalid type: sequence",
        ] {
            assert!(text.iter().any(|e| e.contains(expected)), "{expected}: {text:?}");
        }
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
