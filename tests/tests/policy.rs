//! `ztunnel policy check` on YAML directories: the decision, the layer, the deciding
//! policy, the exit status.

use std::process::Command;

use testbed::mesh::{ztunnel_binary, TempDir};

const CONFIG: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node-a}
status: {podIP: 10.244.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {serviceAccountName: web, nodeName: node-b}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy}
spec: {nodeName: node-b}
status: {podIP: 10.244.1.3}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-client, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]
    to: [{operation: {ports: ["8080"]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
"#;

fn check(dir: &TempDir, args: &[&str]) -> (i32, String) {
    let out = Command::new(ztunnel_binary())
        .args(["policy", "check", "--config"])
        .arg(dir.path())
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn config(extra: &str) -> TempDir {
    let dir = TempDir::new("policy-check").unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), format!("{CONFIG}{extra}")).unwrap();
    dir
}

#[test]
fn an_allowed_connection_names_the_policy_and_exits_0() {
    let dir = config("");
    let (code, out) = check(&dir, &["--from", "shop/client", "--to", "shop/web:8080"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("ALLOW (layer: ztunnel, policy: shop/web-from-client)"),
        "{out}"
    );
}

#[test]
fn a_denied_connection_says_why_and_exits_1() {
    let dir = config("");
    let (code, out) = check(&dir, &["--from", "shop/client", "--to", "shop/web:9090"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("DENY (layer: ztunnel, policy: -)"), "{out}");
    assert!(out.contains("reason: no ALLOW policy matched"), "{out}");
}

#[test]
fn strict_refuses_plaintext_and_clients_outside_the_mesh() {
    let dir = config("");
    let (code, out) = check(
        &dir,
        &[
            "--from",
            "shop/client",
            "--to",
            "shop/web:8080",
            "--plaintext",
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("policy: shop/strict") && out.contains("STRICT"),
        "{out}"
    );
    let (code, out) = check(&dir, &["--from", "legacy/old", "--to", "shop/web:8080"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("not in the mesh: its traffic arrives in plaintext"),
        "{out}"
    );
}

#[test]
fn json_output_carries_every_field() {
    let dir = config("");
    let (code, out) = check(
        &dir,
        &[
            "--from",
            "shop/client",
            "--to",
            "shop/web:8080",
            "-o",
            "json",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["decision"], "ALLOW");
    assert_eq!(json["layer"], "ztunnel");
    assert_eq!(json["policy"], "shop/web-from-client");
}

#[test]
fn a_destination_outside_the_mesh_has_no_enforcing_layer() {
    let dir = config("");
    let (code, out) = check(&dir, &["--from", "shop/client", "--to", "legacy/old:80"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("layer: none"), "{out}");
}

#[test]
fn deny_policies_win_and_l7_rules_are_reported() {
    let dir = config(
        r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [shop]}}]
    to: [{operation: {paths: [/admin]}}]
"#,
    );
    let (code, out) = check(
        &dir,
        &[
            "--from",
            "shop/client",
            "--to",
            "shop/web:8080",
            "--method",
            "GET",
            "--path",
            "/",
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("policy: shop/no-admin"), "{out}");
    assert!(
        out.contains("note: shop/no-admin: uses L7 attributes"),
        "{out}"
    );
    assert!(
        out.contains("note: HTTP attributes are decided by a waypoint"),
        "{out}"
    );
}

#[test]
fn bad_input_is_an_error_not_a_decision() {
    let dir = config("");
    let (code, out) = check(&dir, &["--from", "shop/nobody", "--to", "shop/web:8080"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no pod shop/nobody"), "{out}");
    // A policy whose action cannot be read: refused, said so, and in force as a
    // DENY of everything it applies to (here: its whole namespace).
    let dir = config("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: broken, namespace: shop}\nspec: {action: MAYBE}\n");
    let (code, out) = check(&dir, &["--from", "shop/client", "--to", "shop/web:8080"]);
    assert_eq!(code, 1, "the broken policy fails closed: {out}");
    assert!(
        out.contains("AuthorizationPolicy shop/broken: spec.action"),
        "{out}"
    );
    assert!(
        out.contains("DENY (layer: ztunnel, policy: shop/broken)"),
        "{out}"
    );
}

#[test]
fn an_allow_policy_with_an_invalid_rule_keeps_the_workload_closed() {
    let dir = config(&format!(
        "{API_POD}{API_PERMISSIVE}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: api-allow, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: api}}}}\n  rules:\n  - from: [{{source: {{ipBlocks: [10.244.0.0/33]}}}}]\n  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/client]}}}}]\n"
    ));
    let (code, out) = check(&dir, &["--from", "legacy/old", "--to", "shop/api:8080"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("reason: no ALLOW policy matched"), "{out}");
    assert!(
        out.contains("note: shop/api-allow was refused (spec.rules[0].from[0].source.ipBlocks"),
        "{out}"
    );
    assert!(out.contains("config refused"), "{out}");
    let (code, out) = check(&dir, &["--from", "shop/client", "--to", "shop/api:8080"]);
    assert_eq!(code, 0, "the valid rule still allows: {out}");
}

#[test]
fn a_deny_policy_that_cannot_compile_denies_everything() {
    let dir = config(&format!(
        "{API_POD}{API_PERMISSIVE}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: api-deny, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: api}}}}\n  action: DENY\n  rules:\n  - from: [{{source: {{ipBlocks: [10.99.0.0/99]}}}}]\n"
    ));
    for from in ["shop/client", "legacy/old"] {
        let (code, out) = check(&dir, &["--from", from, "--to", "shop/api:8080"]);
        assert_eq!(code, 1, "{from}: {out}");
        assert!(
            out.starts_with("DENY (layer: ztunnel, policy: shop/api-deny)")
                && out.contains("refused as invalid"),
            "{out}"
        );
    }
    // Its selector still scopes it.
    let (code, out) = check(&dir, &["--from", "shop/client", "--to", "shop/web:8080"]);
    assert_eq!(code, 0, "{out}");
}

const WAYPOINT: &str = r#"
---
apiVersion: v1
kind: Pod
metadata: {name: wp, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {serviceAccountName: wp, nodeName: node-b}
status: {podIP: 10.244.1.9}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: v1
kind: Service
metadata: {name: websvc, namespace: shop, labels: {istio.io/use-waypoint: wp}}
spec:
  clusterIP: 10.96.0.9
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gets, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-waypoint, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/wp]}}]}]
"#;

#[test]
fn a_destination_behind_a_waypoint_reports_the_waypoint_decision() {
    let dir = config(WAYPOINT);
    let (code, out) = check(
        &dir,
        &[
            "--from",
            "shop/client",
            "--to",
            "shop/websvc:80",
            "--method",
            "GET",
            "--path",
            "/x",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("ALLOW (layer: waypoint, policy: shop/gets)"),
        "{out}"
    );
    let (code, out) = check(
        &dir,
        &[
            "--from",
            "shop/client",
            "--to",
            "shop/websvc:80",
            "--method",
            "POST",
            "--path",
            "/x",
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("DENY (layer: waypoint, policy: -)"),
        "{out}"
    );
    assert!(out.contains("note: through waypoint shop/wp"), "{out}");
    // The pod itself, addressed directly, is the tunnel's business (waypoint-for: service).
    let (code, out) = check(
        &dir,
        &[
            "--from",
            "shop/client",
            "--to",
            "shop/web:8080",
            "--method",
            "POST",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("ALLOW (layer: ztunnel, policy: shop/web-from-client)"),
        "{out}"
    );
}

#[test]
fn policy_check_validates_a_jwt_like_the_waypoint() {
    let issuer = ztunnel::jwt::testing::Es256Issuer::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims =
        |exp: i64| serde_json::json!({"iss": "https://issuer.test", "sub": "alice", "exp": exp});
    let (valid, expired) = (
        issuer.token(&claims(now + 3600)),
        issuer.token(&claims(now - 10)),
    );
    let extra = format!(
        "{WAYPOINT}---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}]\n  jwtRules: [{{issuer: https://issuer.test, jwks: '{}'}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: require-jwt, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}]\n  action: DENY\n  rules: [{{from: [{{source: {{notRequestPrincipals: ['*']}}}}]}}]\n",
        issuer.jwks()
    );
    let dir = config(&extra);
    let base = [
        "--from",
        "shop/client",
        "--to",
        "shop/websvc:80",
        "--method",
        "GET",
    ];
    let (code, out) = check(&dir, &[&base[..], &["--jwt", &valid]].concat());
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ALLOW (layer: waypoint"), "{out}");
    let (code, out) = check(&dir, &[&base[..], &["--jwt", &expired]].concat());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("401 (layer: waypoint, policy: shop/jwt)")
            && out.contains("the token expired"),
        "{out}"
    );
    let (code, out) = check(&dir, &base);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("DENY (layer: waypoint, policy: shop/require-jwt)"),
        "{out}"
    );
}

#[test]
fn a_request_authentication_that_cannot_compile_refuses_tokens_it_cannot_verify() {
    let issuer = ztunnel::jwt::testing::Es256Issuer::default();
    let token = issuer.token(&serde_json::json!({"iss": "https://issuer.test", "sub": "alice"}));
    // The keys were replaced by something that is not a JWKS: no token can be verified.
    let extra = format!(
        "{WAYPOINT}---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}]\n  jwtRules: [{{issuer: https://issuer.test, jwks: 'not a jwks'}}]\n"
    );
    let dir = config(&extra);
    let base = [
        "--from",
        "shop/client",
        "--to",
        "shop/websvc:80",
        "--method",
        "GET",
        "--path",
        "/x",
    ];
    let (code, out) = check(&dir, &[&base[..], &["--jwt", &token]].concat());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("401 (layer: waypoint, policy: shop/jwt)")
            && out.contains("jwtRules[0].jwks")
            && out.contains("fail closed"),
        "{out}"
    );
    // A token in the default query parameter is found too.
    let (code, out) = check(
        &dir,
        &[
            "--from",
            "shop/client",
            "--to",
            "shop/websvc:80",
            "--method",
            "GET",
            "--path",
            &format!("/x?access_token={token}"),
        ],
    );
    assert_eq!(code, 1, "{out}");
    // Without a token, nothing was verified before either: the request passes on.
    let (code, out) = check(&dir, &base);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ALLOW (layer: waypoint"), "{out}");
}

const API_POD: &str = r#"
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {serviceAccountName: api, nodeName: node-b}
status: {podIP: 10.244.1.4}
"#;

/// `api` in shop accepts plaintext (its own PeerAuthentication) so that
/// AuthorizationPolicy, not STRICT, decides for plaintext peers.
const API_PERMISSIVE: &str = r#"
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: api, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  mtls: {mode: PERMISSIVE}
"#;

#[test]
fn a_plaintext_peer_matches_not_principals_in_a_deny() {
    let dir = config(&format!(
        "{API_POD}{API_PERMISSIVE}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: require-mtls, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: api}}}}\n  action: DENY\n  rules: [{{from: [{{source: {{notPrincipals: ['*']}}}}]}}]\n"
    ));
    let (code, out) = check(&dir, &["--from", "legacy/old", "--to", "shop/api:8080"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("DENY (layer: ztunnel, policy: shop/require-mtls)"),
        "{out}"
    );
    let (code, out) = check(&dir, &["--from", "shop/client", "--to", "shop/api:8080"]);
    assert_eq!(code, 0, "mTLS passes: {out}");
}

#[test]
fn integer_port_level_mtls_keys_keep_a_port_strict() {
    // The key unquoted, as in Istio's examples.
    let dir = config(&format!(
        "{API_POD}{API_PERMISSIVE}  portLevelMtls:\n    8443: {{mode: STRICT}}\n"
    ));
    let (code, out) = check(&dir, &["--from", "legacy/old", "--to", "shop/api:8443"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("policy: shop/api") && out.contains("STRICT"),
        "{out}"
    );
    assert!(!out.contains("config refused"), "{out}");
    let (code, out) = check(&dir, &["--from", "legacy/old", "--to", "shop/api:8080"]);
    assert_eq!(code, 0, "the other ports stay PERMISSIVE: {out}");
}

#[test]
fn policy_check_matches_hosts_on_the_host_header_as_the_waypoint_does() {
    let dir = config(&format!(
        "{WAYPOINT}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only-web-host, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}]\n  action: DENY\n  rules: [{{to: [{{operation: {{notHosts: [web.shop.example]}}}}]}}]\n"
    ));
    let base = [
        "--from",
        "shop/client",
        "--to",
        "shop/websvc:80",
        "--method",
        "GET",
    ];
    for header in ["Host=web.shop.example", ":authority=web.shop.example:80"] {
        let (code, out) = check(&dir, &[&base[..], &["--header", header]].concat());
        assert_eq!(code, 0, "{header}: {out}");
    }
    let (code, out) = check(
        &dir,
        &[&base[..], &["--header", "Host=admin.shop.example"]].concat(),
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("policy: shop/only-web-host"), "{out}");
    // Without a Host the request names the destination by address.
    let (code, out) = check(&dir, &base);
    assert_eq!(code, 1, "{out}");
}
