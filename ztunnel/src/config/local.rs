//! The local source: a directory of Kubernetes YAML files.

use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context, Result};
use serde::Deserialize;

use super::Pod;

/// What the directory looked like: files with their size and modification time.
/// Equal fingerprints mean nothing to re-read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<SystemTime>)>);

pub fn fingerprint(dir: &Path) -> Result<Fingerprint> {
    let mut files = Vec::new();
    for path in yaml_files(dir)? {
        let meta = fs::metadata(&path)?;
        files.push((path, meta.len(), meta.modified().ok()));
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

#[derive(Deserialize)]
struct Meta {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    service_account_name: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    pod_ip: Option<String>,
}

#[derive(Deserialize)]
struct PodObject {
    metadata: Meta,
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

/// Every Pod in the directory's files. A document that does not parse is reported
/// and skipped; the others still count.
pub fn load_pods(dir: &Path) -> Result<Vec<Pod>> {
    let mut pods = Vec::new();
    for path in yaml_files(dir)? {
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = match serde_yaml::Value::deserialize(document) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(file = %path.display(), "skipping a YAML document: {e}");
                    continue;
                }
            };
            if value.get("kind").and_then(|k| k.as_str()) != Some("Pod") {
                continue;
            }
            match pod_from(value) {
                Ok(pod) => pods.push(pod),
                Err(e) => tracing::warn!(file = %path.display(), "skipping a Pod: {e:#}"),
            }
        }
    }
    Ok(pods)
}

fn pod_from(value: serde_yaml::Value) -> Result<Pod> {
    let object: PodObject = serde_yaml::from_value(value)?;
    let ip = match object.status.pod_ip {
        Some(ip) => Some(ip.parse().with_context(|| format!("status.podIP {ip:?}"))?),
        None => None,
    };
    Ok(Pod {
        name: object.metadata.name,
        namespace: object.metadata.namespace,
        labels: object.metadata.labels,
        service_account: object
            .spec
            .service_account_name
            .unwrap_or_else(|| "default".into()),
        node_name: object.spec.node_name.unwrap_or_default(),
        ip,
    })
}
