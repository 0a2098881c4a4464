//! The manifests in deploy/: every object of a known type with every field known,
//! RBAC equal to the access lists the code calls through, the CRDs the mesh needs.

#[test]
fn every_security_kind_the_mesh_reads_has_a_crd_serving_v1_and_v1beta1() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/istio-crds/crds.yaml"
    ))
    .unwrap();
    let crds: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    for kind in [
        "AuthorizationPolicy",
        "PeerAuthentication",
        "RequestAuthentication",
    ] {
        let crd = crds
            .iter()
            .find(|c| c["spec"]["names"]["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no CRD for {kind}"));
        let plural = crd["spec"]["names"]["plural"].as_str().unwrap();
        assert_eq!(
            crd["metadata"]["name"].as_str(),
            Some(format!("{plural}.security.istio.io").as_str())
        );
        assert_eq!(crd["spec"]["group"].as_str(), Some("security.istio.io"));
        let versions: Vec<&str> = crd["spec"]["versions"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(versions, vec!["v1", "v1beta1"], "{kind}");
        let storage = crd["spec"]["versions"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter(|v| v["storage"] == true)
            .count();
        assert_eq!(storage, 1, "{kind}: exactly one storage version");
    }
}

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use ztunnel::k8s::{self, Scope};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML file under deploy/, with its documents as JSON.
fn manifests() -> Vec<(PathBuf, Vec<Value>)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&deploy_dir(), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let docs = serde_yaml::Deserializer::from_str(&text)
                .map(|d| serde::Deserialize::deserialize(d).unwrap())
                .filter(|v: &serde_yaml::Value| !v.is_null())
                .map(|v| serde_json::to_value(v).unwrap())
                .collect();
            (path, docs)
        })
        .collect()
}

/// Parses into the Kubernetes type and back: a field the type does not know
/// (a typo, a field of another version) would be lost on the way.
fn round_trip<T: DeserializeOwned + serde::Serialize>(doc: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).unwrap();
    match first_difference(doc, &back, String::new()) {
        Some(path) => Err(format!(
            "{path}: not a field of this type (or not as written)"
        )),
        None => Ok(typed),
    }
}

/// Where two JSON values first differ, as a path.
fn first_difference(written: &Value, understood: &Value, path: String) -> Option<String> {
    match (written, understood) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .find_map(|(k, v)| match b.get(k) {
                Some(w) => first_difference(v, w, format!("{path}.{k}")),
                None => Some(format!("{path}.{k}")),
            })
            .or_else(|| (a.len() != b.len()).then(|| path.clone())),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, format!("{path}[{i}]"))),
        (a, b) => (a != b).then_some(path),
    }
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type_with_every_field_known() {
    let mut checked = 0;
    for (path, docs) in manifests() {
        for doc in &docs {
            let kind = doc["kind"].as_str().unwrap_or_default();
            let name = format!("{}: {kind} {}", path.display(), doc["metadata"]["name"]);
            let result = match kind {
                "Namespace" => round_trip::<Namespace>(doc).map(drop),
                "ServiceAccount" => round_trip::<ServiceAccount>(doc).map(drop),
                "ConfigMap" => round_trip::<ConfigMap>(doc).map(drop),
                "Service" => round_trip::<Service>(doc).map(drop),
                "Deployment" => round_trip::<Deployment>(doc).map(drop),
                "DaemonSet" => round_trip::<DaemonSet>(doc).map(drop),
                "ClusterRole" => round_trip::<ClusterRole>(doc).map(drop),
                "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(doc).map(drop),
                "Role" => round_trip::<Role>(doc).map(drop),
                "RoleBinding" => round_trip::<RoleBinding>(doc).map(drop),
                "CustomResourceDefinition" => round_trip::<CustomResourceDefinition>(doc).map(drop),
                // The mesh's own kinds: checked by the mesh's parser below.
                "AuthorizationPolicy"
                | "PeerAuthentication"
                | "RequestAuthentication"
                | "Gateway" => Ok(()),
                "Kustomization" => check_kustomization(&path, doc),
                other => Err(format!("a kind this test does not know: {other}")),
            };
            if let Err(e) = result {
                panic!("{name}: {e}");
            }
            checked += 1;
        }
        // The mesh's kinds, through the same parsing and validation the tunnel uses.
        let dir = path.parent().unwrap();
        let (_, errors) = ztunnel::config::local::LocalSource::new(dir)
            .load()
            .unwrap();
        assert!(errors.is_empty(), "{}: {errors:?}", dir.display());
    }
    assert!(checked >= 30, "only {checked} objects found");
}

/// A kustomization lists exactly the YAML files of its directory.
fn check_kustomization(path: &Path, doc: &Value) -> Result<(), String> {
    let dir = path.parent().unwrap();
    let listed: BTreeSet<String> = doc["resources"]
        .as_array()
        .ok_or("no resources")?
        .iter()
        .map(|r| r.as_str().unwrap_or_default().to_owned())
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    if listed != present {
        return Err(format!("lists {listed:?}, the directory holds {present:?}"));
    }
    Ok(())
}

/// (group, resource, verb, scope, names) for every permission; names sorted,
/// empty for any object.
type Grants = BTreeSet<(String, String, String, String, Vec<String>)>;

fn expand(rules: &[PolicyRule], scope: &str) -> Grants {
    let mut grants = Grants::new();
    for rule in rules {
        assert!(
            rule.non_resource_urls.is_none(),
            "{rule:?}: the list has no such grants"
        );
        let mut names = rule.resource_names.clone().unwrap_or_default();
        names.sort();
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert!(
                        group != "*" && resource != "*" && verb != "*",
                        "a wildcard in {rule:?}"
                    );
                    grants.insert((
                        group.clone(),
                        resource.clone(),
                        verb.clone(),
                        scope.into(),
                        names.clone(),
                    ));
                }
            }
        }
    }
    grants
}

/// The API server refuses a CRD in a Kubernetes group (`*.k8s.io`,
/// `*.kubernetes.io`) without the approval annotation.
#[test]
fn crds_in_kubernetes_groups_carry_the_approval_annotation() {
    let mut protected = 0;
    for (path, docs) in manifests() {
        for crd in docs
            .iter()
            .filter(|d| d["kind"] == "CustomResourceDefinition")
        {
            let group = crd["spec"]["group"].as_str().unwrap_or_default();
            if group.ends_with(".k8s.io") || group.ends_with(".kubernetes.io") {
                protected += 1;
                let approval = &crd["metadata"]["annotations"]["api-approved.kubernetes.io"];
                assert!(
                    approval.as_str().is_some_and(|a| a.starts_with("https://")),
                    "{}: CRD for {group} without api-approved.kubernetes.io",
                    path.display()
                );
            }
        }
    }
    assert_eq!(protected, 1, "the Gateway CRD");
}

#[test]
fn rbac_grants_each_part_exactly_what_its_access_list_names() {
    let docs: Vec<Value> = manifests().into_iter().flat_map(|(_, d)| d).collect();
    let of_kind = |kind: &'static str| docs.iter().filter(move |d| d["kind"] == kind);
    for (account, list) in k8s::PARTS {
        let sa = of_kind("ServiceAccount")
            .find(|d| d["metadata"]["name"] == *account)
            .unwrap_or_else(|| panic!("no ServiceAccount {account} in deploy/"));
        let namespace = sa["metadata"]["namespace"].as_str().unwrap().to_owned();
        let binds_us = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
            subjects.iter().flatten().any(|s| {
                s.kind == "ServiceAccount"
                    && s.name == *account
                    && s.namespace.as_deref() == Some(namespace.as_str())
            })
        };
        let mut granted = Grants::new();
        for binding in of_kind("ClusterRoleBinding") {
            let binding: ClusterRoleBinding = serde_json::from_value(binding.clone()).unwrap();
            if !binds_us(&binding.subjects) {
                continue;
            }
            assert_eq!(binding.role_ref.kind, "ClusterRole");
            let role = of_kind("ClusterRole")
                .find(|r| r["metadata"]["name"] == binding.role_ref.name.as_str())
                .expect("the bound ClusterRole exists");
            let role: ClusterRole = serde_json::from_value(role.clone()).unwrap();
            granted.extend(expand(role.rules.as_deref().unwrap_or_default(), "cluster"));
        }
        for binding in of_kind("RoleBinding") {
            let binding: RoleBinding = serde_json::from_value(binding.clone()).unwrap();
            if !binds_us(&binding.subjects) {
                continue;
            }
            let role_ns = binding.metadata.namespace.clone().unwrap();
            let scope = if role_ns == namespace { "own" } else { "other" };
            let role = of_kind("Role")
                .find(|r| {
                    r["metadata"]["name"] == binding.role_ref.name.as_str()
                        && r["metadata"]["namespace"] == role_ns.as_str()
                })
                .expect("the bound Role exists");
            let role: Role = serde_json::from_value(role.clone()).unwrap();
            granted.extend(expand(role.rules.as_deref().unwrap_or_default(), scope));
        }
        let mut needed = Grants::new();
        for access in *list {
            for verb in access.verbs {
                let scope = match access.scope {
                    Scope::Cluster => "cluster",
                    Scope::OwnNamespace => "own",
                };
                let mut names: Vec<String> = access.names.iter().map(|n| n.to_string()).collect();
                names.sort();
                needed.insert((
                    access.resource.group.into(),
                    access.resource.plural.into(),
                    (*verb).into(),
                    scope.into(),
                    names,
                ));
            }
        }
        assert_eq!(
            granted, needed,
            "{account}: RBAC in deploy/ (left) against the access list in ztunnel::k8s (right)"
        );
    }
}

#[test]
fn the_dashboard_only_charts_metrics_the_code_exports() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy_dir().join("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    // Metric names as the code registers them (counters gain `_total` on export).
    let mut exported = BTreeSet::new();
    // Every crate's sources: the node tunnel's and its nested crates'.
    let ztunnel = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ztunnel");
    let mut dirs: Vec<_> = [
        "src",
        "core/src",
        "config/src",
        "hbone/src",
        "waypoint/src",
        "ca/src",
    ]
    .iter()
    .map(|dir| ztunnel.join(dir))
    .collect();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for literal in text.split('"').skip(1).step_by(2) {
                if ["istio_", "ztunnel_", "citadel_"]
                    .iter()
                    .any(|p| literal.starts_with(p))
                    && literal.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                {
                    exported.insert(literal.to_owned());
                }
            }
        }
    }
    let mut charted = 0;
    let panels = dashboard["panels"].as_array().unwrap();
    for target in panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
    {
        let expr = target["expr"].as_str().unwrap();
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if ["istio_", "ztunnel_", "citadel_"]
                .iter()
                .any(|p| word.starts_with(p))
            {
                let base = word.strip_suffix("_total").unwrap_or(word);
                assert!(
                    exported.contains(base),
                    "{word} in {expr:?} is not exported"
                );
                charted += 1;
            }
        }
    }
    assert!(charted >= 10, "only {charted} metrics charted");
}

/// The subset of OpenAPI v3 the security CRDs use, checked the way the API server
/// does: types, properties, additionalProperties, items, enums, required fields.
fn schema_errors(value: &Value, schema: &Value, at: &str) -> Vec<String> {
    let type_ok = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("boolean") => value.is_boolean(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some(other) => panic!("{at}: a schema type this check does not know: {other}"),
        None => panic!("{at}: not structural: no type"),
    };
    if !type_ok {
        return vec![format!("{at}: not {}", schema["type"])];
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            return vec![format!("{at}: {value} is not one of {allowed:?}")];
        }
    }
    let mut errors = Vec::new();
    if let Some(items) = value.as_array() {
        for (i, item) in items.iter().enumerate() {
            errors.extend(schema_errors(item, &schema["items"], &format!("{at}[{i}]")));
        }
    }
    if let Some(object) = value.as_object() {
        for field in schema["required"].as_array().into_iter().flatten() {
            if !object.contains_key(field.as_str().unwrap()) {
                errors.push(format!("{at}.{field}: required"));
            }
        }
        for (key, field) in object {
            let at = format!("{at}.{key}");
            match (&schema["properties"][key], &schema["additionalProperties"]) {
                (Value::Null, Value::Null) => {}
                (Value::Null, extra) => errors.extend(schema_errors(field, extra, &at)),
                (known, _) => errors.extend(schema_errors(field, known, &at)),
            }
        }
    }
    errors
}

/// The CRDs' schemas refuse malformed policies at `kubectl apply` (as Istio's
/// validation does) and accept every policy deploy/ and the README write.
#[test]
fn the_security_crds_refuse_malformed_policies() {
    let crds: Vec<Value> = manifests()
        .into_iter()
        .flat_map(|(_, docs)| docs)
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .collect();
    let schema = |kind: &str| -> Value {
        let crd = crds
            .iter()
            .find(|c| c["spec"]["names"]["kind"] == kind)
            .unwrap();
        let versions = crd["spec"]["versions"].as_array().unwrap();
        assert!(
            versions
                .iter()
                .all(|v| v["schema"] == versions[0]["schema"]),
            "{kind}: v1 and v1beta1 share one schema"
        );
        versions[0]["schema"]["openAPIV3Schema"].clone()
    };
    let check = |kind: &str, spec: &str| -> Vec<String> {
        let spec: Value = serde_yaml::from_str(spec).unwrap();
        let object = serde_json::json!({"spec": spec});
        schema_errors(&object, &schema(kind), kind)
    };
    for (kind, spec) in [
        ("AuthorizationPolicy", "{}"),
        ("AuthorizationPolicy", "action: DENY\nselector: {matchLabels: {app: web}}\nrules: [{from: [{source: {notPrincipals: ['*'], ipBlocks: [10.0.0.0/8]}}], to: [{operation: {ports: ['8080'], methods: [GET]}}], when: [{key: source.ip, values: [10.0.0.1]}]}]"),
        ("AuthorizationPolicy", "action: CUSTOM\nprovider: {name: ext}\ntargetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]\nrules: [{}]"),
        ("PeerAuthentication", "selector: {matchLabels: {app: web}}\nmtls: {mode: STRICT}\nportLevelMtls: {'8080': {mode: DISABLE}}"),
        ("RequestAuthentication", "targetRef: {kind: Gateway, name: wp}\njwtRules: [{issuer: https://issuer.test, jwksUri: http://keys/jwks, fromHeaders: [{name: x-token, prefix: 'Bearer '}], forwardOriginalToken: true}]"),
    ] {
        let errors = check(kind, spec);
        assert!(errors.is_empty(), "{kind} {spec}: {errors:?}");
    }
    let mut samples = 0;
    for doc in manifests().into_iter().flat_map(|(_, docs)| docs) {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if doc["apiVersion"]
            .as_str()
            .unwrap_or_default()
            .starts_with("security.istio.io/")
        {
            let errors = schema_errors(
                &serde_json::json!({"spec": doc["spec"]}),
                &schema(kind),
                kind,
            );
            assert!(errors.is_empty(), "{doc}: {errors:?}");
            samples += 1;
        }
    }
    assert!(samples > 0, "deploy/ writes no policy to check");
    for (kind, spec, error) in [
        ("AuthorizationPolicy", "action: MAYBE", "spec.action"),
        (
            "AuthorizationPolicy",
            "rules: [{from: [{source: {ipBlocks: 10.0.0.0/8}}]}]",
            "source.ipBlocks: not",
        ),
        (
            "AuthorizationPolicy",
            "rules: [{to: [{operation: {ports: [8080]}}]}]",
            "operation.ports[0]: not",
        ),
        (
            "AuthorizationPolicy",
            "rules: [{when: [{values: [x]}]}]",
            "when[0].\"key\": required",
        ),
        (
            "AuthorizationPolicy",
            "rules: {from: []}",
            "spec.rules: not",
        ),
        (
            "AuthorizationPolicy",
            "selector: {matchLabels: [app, web]}",
            "selector.matchLabels: not",
        ),
        (
            "AuthorizationPolicy",
            "targetRefs: [{kind: Gateway}]",
            "\"name\": required",
        ),
        ("PeerAuthentication", "mtls: {mode: STRICTEST}", "mtls.mode"),
        (
            "PeerAuthentication",
            "portLevelMtls: {'8080': {mode: NOPE}}",
            "portLevelMtls.8080.mode",
        ),
        (
            "RequestAuthentication",
            "jwtRules: [{audiences: [a]}]",
            "\"issuer\": required",
        ),
        (
            "RequestAuthentication",
            "jwtRules: [{issuer: x, forwardOriginalToken: 'yes'}]",
            "forwardOriginalToken: not",
        ),
    ] {
        let errors = check(kind, spec);
        assert!(
            errors.iter().any(|e| e.contains(error)),
            "{kind} {spec}: expected {error:?} in {errors:?}"
        );
    }
}
