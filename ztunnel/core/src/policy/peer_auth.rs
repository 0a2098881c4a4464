//! PeerAuthentication: which plaintext a workload accepts.
//!
//! Scopes, narrowest first: the workload's (a selector in its namespace, with
//! `portLevelMtls` overrides), its namespace's (no selector), the mesh's (root
//! namespace, no selector). UNSET inherits from the next scope; with nothing set the
//! mesh default is PERMISSIVE. Between tunnels HBONE is always mTLS: the mode only
//! governs plaintext arriving at a pod, and DISABLE never downgrades mesh traffic.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Deserialize;

use super::{FieldError, Target};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Mode {
    Unset,
    Strict,
    Permissive,
    Disable,
}

impl Mode {
    fn parse(text: Option<&str>, field: &str) -> Result<Self, FieldError> {
        Ok(match text.unwrap_or("UNSET") {
            "UNSET" => Mode::Unset,
            "STRICT" => Mode::Strict,
            "PERMISSIVE" => Mode::Permissive,
            "DISABLE" => Mode::Disable,
            other => {
                return Err(FieldError::spec(
                    field,
                    format!("{other:?} is not UNSET, STRICT, PERMISSIVE or DISABLE"),
                ))
            }
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    selector: Option<super::authz::Selector>,
    #[serde(default)]
    mtls: Option<MtlsSpec>,
    /// Keys are port numbers: YAML integers in Istio's own examples, strings
    /// in JSON from the API server.
    #[serde(default)]
    port_level_mtls: BTreeMap<PortKey, MtlsSpec>,
}

/// A `portLevelMtls` key as written: an integer or a string.
#[derive(Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(untagged)]
enum PortKey {
    Number(i64),
    Text(String),
}

impl PortKey {
    fn port(&self) -> Option<u16> {
        match self {
            PortKey::Number(n) => u16::try_from(*n).ok(),
            PortKey::Text(t) => t.parse().ok(),
        }
        .filter(|p| *p > 0)
    }
}

impl std::fmt::Display for PortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortKey::Number(n) => write!(f, "{n}"),
            PortKey::Text(t) => write!(f, "{t:?}"),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MtlsSpec {
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Clone, Debug)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: Mode,
    pub ports: BTreeMap<u16, Mode>,
    /// Why the config source refused it; None for a valid policy.
    pub refused: Option<FieldError>,
}

impl PeerAuthentication {
    pub fn compile(
        namespace: &str,
        name: &str,
        spec: &serde_yaml::Value,
    ) -> Result<Self, FieldError> {
        let spec: Spec = if spec.is_null() {
            Spec::default()
        } else {
            super::read(spec).map_err(|(below, problem)| FieldError {
                path: format!("spec{below}"),
                problem,
            })?
        };
        let mode = Mode::parse(
            spec.mtls.as_ref().and_then(|m| m.mode.as_deref()),
            "mtls.mode",
        )?;
        let mut ports = BTreeMap::new();
        for (port, mtls) in &spec.port_level_mtls {
            let number = port.port().ok_or_else(|| {
                FieldError::spec("portLevelMtls", format!("{port} is not a port"))
            })?;
            ports.insert(
                number,
                Mode::parse(
                    mtls.mode.as_deref(),
                    &format!("portLevelMtls[{number}].mode"),
                )?,
            );
        }
        let selector = spec
            .selector
            .map(|s| s.match_labels)
            .filter(|l| !l.is_empty());
        if !ports.is_empty() && selector.is_none() {
            return Err(FieldError::spec(
                "portLevelMtls",
                "only a policy with a workload selector may set it",
            ));
        }
        Ok(Self {
            name: format!("{namespace}/{name}"),
            namespace: namespace.to_owned(),
            selector,
            mode,
            ports,
            refused: None,
        })
    }

    /// Compiles a policy even when it is invalid, so that a refused policy never
    /// opens a workload to plaintext: an invalid one is STRICT on every port of
    /// the workloads it selects (of its whole namespace when its selector cannot
    /// be read, taking precedence as a workload policy).
    pub fn compile_fail_closed(namespace: &str, name: &str, spec: &serde_yaml::Value) -> Self {
        Self::compile(namespace, name, spec).unwrap_or_else(|refused| {
            let selector = match spec.get("selector").filter(|s| !s.is_null()) {
                None if spec.is_mapping() || spec.is_null() => None,
                None => Some(BTreeMap::new()),
                Some(s) => serde_yaml::from_value::<super::authz::Selector>(s.clone())
                    .map_or(Some(BTreeMap::new()), |s| {
                        Some(s.match_labels).filter(|l| !l.is_empty())
                    }),
            };
            Self {
                name: format!("{namespace}/{name}"),
                namespace: namespace.to_owned(),
                selector,
                mode: Mode::Strict,
                ports: BTreeMap::new(),
                refused: Some(refused),
            }
        })
    }
}

pub(super) fn effective(
    policies: &HashMap<String, Vec<Arc<PeerAuthentication>>>,
    root: &str,
    workload: Target,
    port: u16,
) -> (Mode, Option<String>) {
    let own = policies
        .get(workload.namespace)
        .map(Vec::as_slice)
        .unwrap_or_default();
    // Workload scope: the first (by name) policy selecting the workload.
    let workload_policy = own.iter().find(|p| {
        p.selector.as_ref().is_some_and(|labels| {
            labels
                .iter()
                .all(|(k, v)| workload.labels.get(k) == Some(v))
        })
    });
    if let Some(p) = workload_policy {
        if let Some(mode) = p.ports.get(&port).filter(|m| **m != Mode::Unset) {
            return (*mode, Some(p.name.clone()));
        }
        if p.mode != Mode::Unset {
            return (p.mode, Some(p.name.clone()));
        }
    }
    let namespace_policy = own.iter().find(|p| p.selector.is_none());
    if let Some(p) = namespace_policy.filter(|p| p.mode != Mode::Unset) {
        return (p.mode, Some(p.name.clone()));
    }
    let mesh_policy = policies
        .get(root)
        .into_iter()
        .flatten()
        .find(|p| p.selector.is_none());
    if let Some(p) = mesh_policy.filter(|p| p.mode != Mode::Unset) {
        return (p.mode, Some(p.name.clone()));
    }
    (Mode::Permissive, None)
}
