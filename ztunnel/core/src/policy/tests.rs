//! The engine's semantics, rule by rule (Istio's AuthorizationPolicy and
//! PeerAuthentication reference, and the ambient L4 policy page).

use super::*;
use crate::identity::Identity;

/// A destination workload, as the state would fill in [`Target`].
struct Workload {
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
}

impl<'a> From<&'a Workload> for Target<'a> {
    fn from(w: &'a Workload) -> Self {
        Target {
            namespace: &w.namespace,
            name: &w.name,
            labels: &w.labels,
        }
    }
}

fn workload(ns: &str, name: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        name: name.into(),
        namespace: ns.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// The config source's check: the refusal the policy carries.
fn validate(policy: &Policy) -> Result<(), String> {
    policy.refusal().map_or(Ok(()), |r| Err(r.to_string()))
}

fn policy(kind: &str, ns: &str, name: &str, spec: &str) -> Policy {
    policy_with(kind, ns, name, spec, &[])
}

fn policy_with(
    kind: &str,
    ns: &str,
    name: &str,
    spec: &str,
    annotations: &[(&str, &str)],
) -> Policy {
    Policy::new(
        kind,
        "security.istio.io/v1",
        ns,
        name,
        annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        serde_yaml::from_str(spec).unwrap(),
    )
}

fn ap(ns: &str, name: &str, spec: &str) -> Policy {
    policy("AuthorizationPolicy", ns, name, spec)
}

fn index(policies: &[Policy]) -> Index {
    for p in policies {
        validate(p).unwrap_or_else(|e| panic!("{}: {e}", p.name));
    }
    Index::build(
        policies,
        ROOT_NAMESPACE,
        vec!["cluster.local".into(), "old.local".into()],
    )
}

fn mtls(from_ns: &str, from_sa: &str, port: u16) -> Connection {
    Connection {
        source_identity: Some(Identity::new("cluster.local", from_ns, from_sa).unwrap()),
        source_ip: "10.244.1.7".parse().unwrap(),
        destination_ip: "10.244.0.9".parse().unwrap(),
        destination_port: port,
    }
}

fn plaintext(port: u16) -> Connection {
    Connection {
        source_identity: None,
        ..mtls("x", "y", port)
    }
}

fn web() -> Workload {
    workload("shop", "web", &[("app", "web")])
}

fn allows(index: &Index, conn: &Connection) -> bool {
    index.authorize(&web(), conn).allow
}

/// A refusal is data: each problem with its field's path from the resource's top.
#[test]
fn a_refusal_names_each_problem_by_its_field_path() {
    let refused = ap(
        "shop",
        "bad",
        "action: MAYBE\nrules:\n- from: [{source: {namespaces: [a]}}, {source: {ipBlocks: [10.0.0.0/99]}}]",
    )
    .refusal()
    .expect("refused");
    let paths: Vec<&str> = refused.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["spec.action", "spec.rules[0].from[1].source.ipBlocks"]
    );
    assert!(refused.in_force.contains("denies all traffic"), "{refused}");
    assert!(ap("shop", "good", "rules: [{}]").refusal().is_none());
    let pa = pa("shop", "bad", "mtls: {mode: STRICTER}")
        .refusal()
        .expect("refused");
    assert_eq!(pa.problems[0].path, "spec.mtls.mode");
}

#[test]
fn no_policy_allows() {
    let d = index(&[]).authorize(&web(), &mtls("a", "b", 80));
    assert!(d.allow);
    assert_eq!(d.policy, None);
}

#[test]
fn an_allow_policy_that_matches_nothing_denies() {
    let i = index(&[ap(
        "shop",
        "only-db",
        "rules: [{from: [{source: {principals: [cluster.local/ns/db/sa/db]}}]}]",
    )]);
    let d = i.authorize(&web(), &mtls("shop", "other", 80));
    assert!(!d.allow);
    assert_eq!(d.reason, "no ALLOW policy matched");
    let d = i.authorize(&web(), &mtls("db", "db", 80));
    assert!(d.allow);
    assert_eq!(d.policy.as_deref(), Some("shop/only-db"));
}

#[test]
fn an_empty_spec_denies_all_and_an_empty_rule_allows_all() {
    assert!(!allows(
        &index(&[ap("shop", "deny-all", "{}")]),
        &mtls("a", "b", 80)
    ));
    assert!(allows(
        &index(&[ap("shop", "allow-all", "rules: [{}]")]),
        &mtls("a", "b", 80)
    ));
    // DENY with no rules denies nothing.
    assert!(allows(
        &index(&[ap("shop", "noop", "action: DENY")]),
        &mtls("a", "b", 80)
    ));
}

#[test]
fn custom_then_deny_then_allow() {
    let allow_all = ap("shop", "allow-all", "rules: [{}]");
    let deny_b = ap(
        "shop",
        "deny-b",
        "action: DENY\nrules: [{from: [{source: {namespaces: [b]}}]}]",
    );
    let custom = ap(
        "shop",
        "ext",
        "action: CUSTOM\nprovider: {name: opa}\nrules: [{to: [{operation: {ports: ['9000']}}]}]",
    );
    let i = index(&[allow_all, deny_b, custom]);
    let d = i.authorize(&web(), &mtls("b", "x", 80));
    assert_eq!((d.allow, d.policy.as_deref()), (false, Some("shop/deny-b")));
    let d = i.authorize(&web(), &mtls("b", "x", 9000));
    assert_eq!(
        (d.allow, d.policy.as_deref()),
        (false, Some("shop/ext")),
        "CUSTOM is first"
    );
    assert!(d.reason.contains("fail closed"), "{}", d.reason);
    assert!(allows(&i, &mtls("a", "x", 80)));
}

#[test]
fn audit_never_changes_the_decision() {
    let i = index(&[ap("shop", "watch", "action: AUDIT\nrules: [{}]")]);
    let d = i.authorize(&web(), &mtls("a", "b", 80));
    assert!(d.allow);
    assert_eq!(d.audit, vec!["shop/watch".to_string()]);
}

#[test]
fn targeting_root_namespace_namespace_selector_and_target_refs() {
    let root = ap(
        ROOT_NAMESPACE,
        "mesh-deny",
        "action: DENY\nrules: [{from: [{source: {namespaces: [evil]}}]}]",
    );
    let other_ns = ap("elsewhere", "deny-all", "{}");
    let selected = ap(
        "shop",
        "db-only",
        "selector: {matchLabels: {app: db}}\nrules: []",
    );
    let waypoint = ap(
        "shop",
        "l7",
        "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]",
    );
    let i = index(&[root, other_ns, selected, waypoint]);
    assert!(
        !allows(&i, &mtls("evil", "x", 80)),
        "root namespace policies apply everywhere"
    );
    assert!(
        allows(&i, &mtls("good", "x", 80)),
        "other namespaces', other workloads' and targetRef policies do not"
    );
    let db = workload("shop", "db", &[("app", "db")]);
    assert!(
        !i.authorize(&db, &mtls("good", "x", 80)).allow,
        "the selector picks db"
    );
}

#[test]
fn principals_with_exact_prefix_suffix_and_presence() {
    for (pattern, ns, sa, expected) in [
        ("cluster.local/ns/a/sa/b", "a", "b", true),
        ("cluster.local/ns/a/sa/b", "a", "c", false),
        ("cluster.local/ns/a/*", "a", "zzz", true),
        ("*/sa/b", "q", "b", true),
        ("*/sa/b", "q", "c", false),
        ("*", "q", "c", true),
    ] {
        let i = index(&[ap(
            "shop",
            "p",
            &format!("rules: [{{from: [{{source: {{principals: ['{pattern}']}}}}]}}]"),
        )]);
        assert_eq!(
            allows(&i, &mtls(ns, sa, 80)),
            expected,
            "{pattern} vs {ns}/{sa}"
        );
    }
}

/// Istio's semantics (ISTIO-SECURITY-2021-004): a peer without mTLS has an empty
/// principal, namespace and service account. Positive fields never match it, not
/// even `*`; negated ones do.
#[test]
fn a_plaintext_peer_has_an_empty_identity_that_only_negated_fields_match() {
    let rule_matches = |rule: &str| {
        let i = index(&[ap("shop", "p", &format!("rules: [{rule}]"))]);
        allows(&i, &plaintext(80))
    };
    for source in [
        "principals: ['*']",
        "principals: ['*/sa/b']",
        "namespaces: ['*']",
        "serviceAccounts: [a/b]",
    ] {
        assert!(
            !rule_matches(&format!("{{from: [{{source: {{{source}}}}}]}}")),
            "{source} matched a plaintext peer"
        );
    }
    for source in [
        "notPrincipals: ['*']",
        "notPrincipals: [cluster.local/ns/a/sa/b]",
        "notNamespaces: ['*']",
        "notNamespaces: [a]",
        "notServiceAccounts: [a/b]",
    ] {
        assert!(
            rule_matches(&format!("{{from: [{{source: {{{source}}}}}]}}")),
            "{source} did not match a plaintext peer"
        );
    }
    for (when, expected) in [
        ("{key: source.principal, values: ['*']}", false),
        ("{key: source.namespace, values: ['*']}", false),
        ("{key: source.principal, notValues: ['*']}", true),
        ("{key: source.namespace, notValues: [a]}", true),
        ("{key: source.namespace, notValues: ['*']}", true),
    ] {
        assert_eq!(
            rule_matches(&format!("{{when: [{when}]}}")),
            expected,
            "{when} for a plaintext peer"
        );
    }
}

/// Istio's documented "require mutual TLS" policy refuses plaintext and lets
/// mesh traffic through.
#[test]
fn a_deny_on_not_principals_star_refuses_plaintext() {
    let i = index(&[ap(
        "shop",
        "require-mtls",
        "action: DENY\nrules: [{from: [{source: {notPrincipals: ['*']}}]}]",
    )]);
    let d = i.authorize(&web(), &plaintext(80));
    assert!(!d.allow);
    assert_eq!(d.policy.as_deref(), Some("shop/require-mtls"));
    assert!(allows(&i, &mtls("a", "b", 80)));
    // ... and an ALLOW with notNamespaces admits plaintext, as Istio does.
    let i = index(&[ap(
        "shop",
        "not-bad",
        "rules: [{from: [{source: {notNamespaces: [bad]}}]}]",
    )]);
    assert!(allows(&i, &plaintext(80)));
    assert!(!allows(&i, &mtls("bad", "b", 80)));
}

#[test]
fn not_fields_exclude() {
    let i = index(&[ap(
        "shop",
        "p",
        "rules: [{from: [{source: {notNamespaces: [bad], notPrincipals: ['*/sa/evil']}}]}]",
    )]);
    assert!(allows(&i, &mtls("good", "x", 80)));
    assert!(!allows(&i, &mtls("bad", "x", 80)));
    assert!(!allows(&i, &mtls("good", "evil", 80)));
}

#[test]
fn ip_blocks_and_ports() {
    let i = index(&[ap(
        "shop",
        "p",
        "rules: [{from: [{source: {ipBlocks: [10.244.1.0/24], notIpBlocks: [10.244.1.7]}}]}]",
    )]);
    assert!(!allows(&i, &mtls("a", "b", 80)), "10.244.1.7 is excluded");
    let mut c = mtls("a", "b", 80);
    c.source_ip = "10.244.1.8".parse().unwrap();
    assert!(allows(&i, &c));
    c.source_ip = "10.9.9.9".parse().unwrap();
    assert!(!allows(&i, &c));
    let i = index(&[ap(
        "shop",
        "p",
        "rules: [{to: [{operation: {ports: ['80', '8080'], notPorts: ['8080']}}]}]",
    )]);
    assert!(allows(&i, &mtls("a", "b", 80)));
    assert!(!allows(&i, &mtls("a", "b", 8080)));
    assert!(!allows(&i, &mtls("a", "b", 9090)));
    // IP blocks do not need an identity.
    let i = index(&[ap(
        "shop",
        "p",
        "rules: [{from: [{source: {ipBlocks: [10.244.0.0/16]}}]}]",
    )]);
    assert!(allows(&i, &plaintext(80)));
}

#[test]
fn service_accounts() {
    let i = index(&[ap(
        "shop",
        "p",
        "rules: [{from: [{source: {serviceAccounts: [shop/client]}}]}]",
    )]);
    assert!(allows(&i, &mtls("shop", "client", 80)));
    assert!(!allows(&i, &mtls("shop", "other", 80)));
    assert!(!allows(&i, &mtls("other", "client", 80)));
}

#[test]
fn when_conditions() {
    let spec = "rules: [{when: [{key: source.ip, values: [10.244.1.0/24]}, {key: destination.port, notValues: ['22']}, {key: source.namespace, values: ['fr*']}, {key: destination.ip, values: [10.244.0.9]}]}]";
    let i = index(&[ap("shop", "p", spec)]);
    assert!(allows(&i, &mtls("front", "x", 80)));
    assert!(!allows(&i, &mtls("front", "x", 22)), "notValues");
    assert!(!allows(&i, &mtls("back", "x", 80)), "namespace prefix");
    let i = index(&[ap(
        "shop",
        "p",
        "rules: [{when: [{key: source.principal, values: [cluster.local/ns/a/sa/b]}]}]",
    )]);
    assert!(allows(&i, &mtls("a", "b", 80)));
    assert!(!allows(&i, &mtls("a", "c", 80)));
}

#[test]
fn trust_domain_aliases_apply_to_principals() {
    let i = index(&[ap(
        "shop",
        "p",
        "rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/b]}}]}]",
    )]);
    let mut c = mtls("a", "b", 80);
    c.source_identity = Some(Identity::new("old.local", "a", "b").unwrap());
    assert!(allows(&i, &c), "old.local is an alias of cluster.local");
    c.source_identity = Some(Identity::new("other.local", "a", "b").unwrap());
    assert!(!allows(&i, &c));
    let i = index(&[ap(
        "shop",
        "p",
        "rules: [{from: [{source: {principals: [old.local/ns/a/sa/b]}}]}]",
    )]);
    assert!(allows(&i, &mtls("a", "b", 80)), "and the other way round");
}

#[test]
fn l7_attributes_fail_closed_for_allow_and_deny_more_for_deny() {
    // ALLOW that needs a method: never matches in the tunnel.
    let i = index(&[ap(
        "shop",
        "get-only",
        "rules: [{to: [{operation: {methods: [GET]}}]}]",
    )]);
    let d = i.authorize(&web(), &mtls("a", "b", 80));
    assert!(!d.allow);
    assert!(
        d.notes
            .iter()
            .any(|n| n.contains("shop/get-only") && n.contains("waypoint")),
        "{:?}",
        d.notes
    );
    // ... while its L4-only rules still work.
    let i = index(&[ap(
        "shop",
        "mixed",
        "rules: [{to: [{operation: {methods: [GET]}}]}, {from: [{source: {namespaces: [a]}}]}]",
    )]);
    assert!(allows(&i, &mtls("a", "b", 80)));
    // DENY on a path from namespace b: enforced on "from namespace b" alone.
    let i = index(&[ap("shop", "no-admin", "action: DENY\nrules: [{from: [{source: {namespaces: [b]}}], to: [{operation: {paths: [/admin]}}]}]")]);
    assert!(!allows(&i, &mtls("b", "x", 80)), "denies more");
    assert!(
        allows(&i, &mtls("c", "x", 80)),
        "but only its L4 part's sources"
    );
    let i = index(&[ap(
        "shop",
        "hdr",
        "action: DENY\nrules: [{when: [{key: 'request.headers[x-evil]', values: ['1']}]}]",
    )]);
    assert!(
        !allows(&i, &mtls("c", "x", 80)),
        "a DENY whose only condition is L7 denies all"
    );
}

#[test]
fn dry_run_is_evaluated_not_enforced() {
    let p = policy_with(
        "AuthorizationPolicy",
        "shop",
        "try-deny",
        "action: DENY\nrules: [{}]",
        &[("istio.io/dry-run", "true")],
    );
    let d = index(&[p]).authorize(&web(), &mtls("a", "b", 80));
    assert!(d.allow);
    assert_eq!(
        d.dry_run,
        vec![DryRun {
            policy: "shop/try-deny".into(),
            would_allow: false,
            reason: Some("denied by DENY policy shop/try-deny".into()),
        }]
    );
    assert_eq!(
        d.dry_run[0].to_string(),
        "shop/try-deny: would deny (denied by DENY policy shop/try-deny)"
    );
}

#[test]
fn invalid_policies_are_refused_with_the_field() {
    for (spec, error) in [
        ("action: MAYBE", "action"),
        ("action: CUSTOM", "provider"),
        ("provider: {name: x}", "provider"),
        (
            "rules: [{to: [{operation: {ports: ['http']}}]}]",
            "rules[0].to[0].operation.ports",
        ),
        (
            "rules: [{from: [{source: {ipBlocks: [10.0.0.0/99]}}]}]",
            "rules[0].from[0].source.ipBlocks",
        ),
        (
            "rules: [{when: [{key: source.ipp, values: [x]}]}]",
            "unknown key",
        ),
        ("rules: [{from: [{source: {}}]}]", "at least one field"),
        ("rules: [{when: [{key: source.ip}]}]", "values or notValues"),
        ("rulez: []", "unknown field"),
        (
            "rules: [{from: [{source: {serviceAccounts: [nons]}}]}]",
            "serviceAccounts",
        ),
        // A field of the wrong type: refused with its own path.
        (
            "rules: [{from: [{source: {principals: 42}}]}]",
            "spec.rules[0].from[0].source.principals: invalid type: integer `42`",
        ),
        (
            "selector: {matchLabels: [web]}",
            "spec.selector.matchLabels: invalid type: sequence",
        ),
    ] {
        let err = validate(&ap("shop", "bad", spec)).unwrap_err();
        assert!(err.contains(error), "{spec}: {err}");
    }
    let err = validate(&pa("shop", "bad", "mtls: {mode: [STRICT]}")).unwrap_err();
    assert!(
        err.contains("spec.mtls.mode: invalid type: sequence"),
        "{err}"
    );
    let err = validate(&policy_with(
        "AuthorizationPolicy",
        "shop",
        "bad",
        "{}",
        &[("istio.io/dry-run", "yes")],
    ))
    .unwrap_err();
    assert!(err.contains("dry-run"), "{err}");
}

fn pa(ns: &str, name: &str, spec: &str) -> Policy {
    policy("PeerAuthentication", ns, name, spec)
}

#[test]
fn peer_authentication_narrowest_wins() {
    let w = web();
    assert_eq!(
        index(&[]).peer_authentication(&w, 80),
        (Mode::Permissive, None),
        "mesh default"
    );
    let mesh_strict = pa(ROOT_NAMESPACE, "default", "mtls: {mode: STRICT}");
    assert_eq!(
        index(std::slice::from_ref(&mesh_strict))
            .peer_authentication(&w, 80)
            .0,
        Mode::Strict
    );
    let ns_permissive = pa("shop", "default", "mtls: {mode: PERMISSIVE}");
    let i = index(&[mesh_strict.clone(), ns_permissive.clone()]);
    assert_eq!(
        i.peer_authentication(&w, 80),
        (Mode::Permissive, Some("shop/default".into()))
    );
    let ns_unset = pa("shop", "default", "mtls: {mode: UNSET}");
    assert_eq!(
        index(&[mesh_strict.clone(), ns_unset])
            .peer_authentication(&w, 80)
            .0,
        Mode::Strict,
        "UNSET inherits"
    );
    let wl = pa("shop", "web", "selector: {matchLabels: {app: web}}\nmtls: {mode: STRICT}\nportLevelMtls: {'8080': {mode: DISABLE}, '9090': {mode: UNSET}}");
    let i = index(&[ns_permissive, wl]);
    assert_eq!(
        i.peer_authentication(&w, 80),
        (Mode::Strict, Some("shop/web".into()))
    );
    assert_eq!(
        i.peer_authentication(&w, 8080).0,
        Mode::Disable,
        "port level"
    );
    assert_eq!(
        i.peer_authentication(&w, 9090).0,
        Mode::Strict,
        "UNSET port inherits the workload's"
    );
    let other = workload("shop", "db", &[("app", "db")]);
    assert_eq!(
        i.peer_authentication(&other, 80).0,
        Mode::Permissive,
        "the selector picks web only"
    );
    let err = validate(&pa("shop", "bad", "portLevelMtls: {'80': {mode: STRICT}}")).unwrap_err();
    assert!(err.contains("selector"), "{err}");
    assert!(validate(&pa("shop", "bad", "mtls: {mode: STRICTER}")).is_err());
}

/// Istio's own examples write `portLevelMtls` keys as YAML integers.
#[test]
fn port_level_mtls_keys_may_be_integers_or_strings() {
    let w = web();
    for ports in [
        "{8080: {mode: DISABLE}, 9090: {mode: STRICT}}",
        "{'8080': {mode: DISABLE}, '9090': {mode: STRICT}}",
    ] {
        let i = index(&[pa(
            "shop",
            "web",
            &format!(
                "selector: {{matchLabels: {{app: web}}}}\nmtls: {{mode: PERMISSIVE}}\nportLevelMtls: {ports}"
            ),
        )]);
        assert_eq!(i.peer_authentication(&w, 8080).0, Mode::Disable, "{ports}");
        assert_eq!(i.peer_authentication(&w, 9090).0, Mode::Strict, "{ports}");
        assert_eq!(i.peer_authentication(&w, 80).0, Mode::Permissive, "{ports}");
    }
    for bad in [
        "{0: {mode: STRICT}}",
        "{70000: {mode: STRICT}}",
        "{-1: {mode: STRICT}}",
        "{http: {mode: STRICT}}",
    ] {
        let spec = format!("selector: {{matchLabels: {{app: web}}}}\nportLevelMtls: {bad}");
        let err = validate(&pa("shop", "bad", &spec)).unwrap_err();
        assert!(err.contains("is not a port"), "{bad}: {err}");
    }
}

#[test]
fn evaluation_only_sees_the_policies_that_target_the_destination() {
    // 10,000 policies elsewhere; the destination's namespace has one.
    let mut policies: Vec<Policy> = (0..10_000)
        .map(|n| ap(&format!("ns{n}"), "deny-all", "{}"))
        .collect();
    policies.push(ap("shop", "allow-all", "rules: [{}]"));
    let i = index(&policies);
    let d = i.authorize(&web(), &mtls("a", "b", 80));
    assert_eq!(d.policy.as_deref(), Some("shop/allow-all"));
    let applicable = i.applicable((&web()).into());
    assert_eq!(applicable.allow.len() + applicable.deny.len(), 1);
}

fn request(method: &str, path: &str, host: &str, headers: &[(&str, &str)]) -> Request {
    Request {
        method: method.into(),
        path: path.into(),
        host: host.into(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        remote_ip: None,
        auth: None,
    }
}

fn attached(spec: &str) -> Index {
    let header = "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]\n";
    index(&[ap("shop", "p", &format!("{header}{spec}"))])
}

fn waypoint_allows(i: &Index, req: &Request) -> bool {
    i.authorize_request(("shop", "wp"), &[], &mtls("a", "b", 80), Some(req), false)
        .allow
}

#[test]
fn at_the_waypoint_l7_fields_match_requests() {
    let i = attached("rules: [{to: [{operation: {hosts: ['*.shop.svc', 'web:80'], methods: [GET], notPaths: ['/admin*']}}]}]");
    assert!(waypoint_allows(
        &i,
        &request("GET", "/x", "web.shop.svc", &[])
    ));
    assert!(
        waypoint_allows(&i, &request("GET", "/x", "WEB.shop.svc:8080", &[])),
        "case-insensitive, port ignored"
    );
    assert!(waypoint_allows(&i, &request("GET", "/x", "web:80", &[])));
    assert!(!waypoint_allows(&i, &request("GET", "/x", "db.other", &[])));
    assert!(!waypoint_allows(
        &i,
        &request("POST", "/x", "web.shop.svc", &[])
    ));
    assert!(!waypoint_allows(
        &i,
        &request("GET", "/admin/users", "web.shop.svc", &[])
    ));
}

#[test]
fn at_the_waypoint_jwt_claims_and_headers_match() {
    let i = attached("rules: [{when: [{key: 'request.auth.claims[role][name]', values: [admin]}, {key: 'request.headers[x-tenant]', values: ['t-*']}, {key: request.auth.presenter, values: [web]}]}]");
    let mut req = request("GET", "/", "h", &[("x-tenant", "t-1")]);
    assert!(!waypoint_allows(&i, &req), "no token: no claims");
    req.auth = Some(RequestAuth {
        principal: "iss/alice".into(),
        audiences: vec!["shop".into()],
        presenter: Some("web".into()),
        claims: serde_json::json!({"role": {"name": "admin"}}),
    });
    assert!(waypoint_allows(&i, &req));
    req.headers = vec![("x-tenant".into(), "other".into())];
    assert!(!waypoint_allows(&i, &req), "header prefix");
    let i = attached("rules: [{from: [{source: {remoteIpBlocks: [10.244.0.0/16]}}]}]");
    let mut req = request("GET", "/", "h", &[]);
    req.remote_ip = Some("10.244.3.3".parse().unwrap());
    assert!(waypoint_allows(&i, &req));
    req.remote_ip = Some("192.168.1.1".parse().unwrap());
    assert!(!waypoint_allows(&i, &req));
}

#[test]
fn at_the_waypoint_non_http_traffic_gets_l4_policy_only() {
    // An ALLOW that needs a method cannot match a TCP stream: denied (fail closed).
    let i = attached("rules: [{to: [{operation: {methods: [GET]}}]}]");
    assert!(
        !i.authorize_request(("shop", "wp"), &[], &mtls("a", "b", 80), None, false)
            .allow
    );
    let i = attached("rules: [{from: [{source: {namespaces: [a]}}]}]");
    assert!(
        i.authorize_request(("shop", "wp"), &[], &mtls("a", "b", 80), None, false)
            .allow
    );
}

/// An empty targetRefs list is no targetRefs: the tunnel enforces the policy.
#[test]
fn an_empty_target_refs_list_leaves_the_policy_to_the_tunnel() {
    let i = index(&[ap(
        "shop",
        "deny-all",
        "action: DENY\ntargetRefs: []\nrules: [{}]",
    )]);
    assert!(!allows(&i, &mtls("a", "b", 80)));
}

/// The waypoint shares the engine: a plaintext peer's empty identity matches the
/// negated fields there too.
#[test]
fn at_the_waypoint_a_plaintext_peer_matches_not_principals() {
    let i = attached("action: DENY\nrules: [{from: [{source: {notPrincipals: ['*']}}]}]");
    let req = request("GET", "/", "web", &[]);
    let decide = |conn: &Connection| {
        i.authorize_request(("shop", "wp"), &[], conn, Some(&req), false)
            .allow
    };
    assert!(!decide(&plaintext(80)));
    assert!(decide(&mtls("a", "b", 80)));
    let i = attached("rules: [{from: [{source: {principals: ['*']}}]}]");
    assert!(
        !i.authorize_request(("shop", "wp"), &[], &plaintext(80), Some(&req), false)
            .allow
    );
}

/// The index the data path builds: refused policies included, fail closed.
fn index_unchecked(policies: &[Policy]) -> Index {
    Index::build(policies, ROOT_NAMESPACE, vec!["cluster.local".into()])
}

#[test]
fn an_allow_policy_with_an_invalid_rule_keeps_the_workload_closed() {
    let spec = "selector: {matchLabels: {app: web}}\nrules:\n- from: [{source: {ipBlocks: [10.244.0.0/33]}}]\n- from: [{source: {namespaces: [front]}}]";
    let err = validate(&ap("shop", "half-bad", spec)).unwrap_err();
    assert!(
        err.contains("rules[0].from[0].source.ipBlocks") && err.contains("fail closed"),
        "{err}"
    );
    let i = index_unchecked(&[ap("shop", "half-bad", spec)]);
    let d = i.authorize(&web(), &mtls("other", "x", 80));
    assert!(!d.allow, "the bad rule opened the workload: {d:?}");
    assert!(
        d.notes
            .iter()
            .any(|n| n.contains("shop/half-bad was refused")),
        "{d:?}"
    );
    assert!(
        allows(&i, &mtls("front", "x", 80)),
        "the valid rule applies"
    );
    assert!(!allows(&i, &plaintext(80)));
}

#[test]
fn a_deny_policy_that_cannot_compile_denies_everything() {
    for spec in [
        "action: DENY\nselector: {matchLabels: {app: web}}\nrules: [{from: [{source: {ipBlocks: [10.0.0.0/99]}}]}]",
        "action: DENY\nselector: {matchLabels: {app: web}}\nrules: [{from: [{source: {principals: [x]}}]}, {to: [{operation: {ports: [http]}}]}]",
        "action: DENY\nselector: {matchLabels: {app: web}}\nrulez: []",
        "action: DENY\nselector: {matchLabels: {app: web}}\nrules: nope",
        "action: DENY\nselector: {matchLabels: {app: web}}\nprovider: {name: x}",
        "action: CUSTOM\nselector: {matchLabels: {app: web}}\nrules: [{from: [{source: {principals: [x]}}]}]",
    ] {
        let i = index_unchecked(&[ap("shop", "broken", spec)]);
        for conn in [mtls("a", "b", 80), plaintext(8080)] {
            let d = i.authorize(&web(), &conn);
            assert!(!d.allow, "{spec}: {d:?}");
            assert_eq!(d.policy.as_deref(), Some("shop/broken"), "{spec}");
            assert!(d.reason.contains("refused as invalid"), "{}", d.reason);
        }
        // Only its selected workloads.
        let db = workload("shop", "db", &[("app", "db")]);
        assert!(i.authorize(&db, &mtls("a", "b", 80)).allow, "{spec}");
    }
}

/// When the policy's scope or action cannot be read, it could have meant any
/// workload of its namespace: a DENY (or an unknown action) denies them all, an
/// ALLOW allows nothing there; other namespaces are untouched.
#[test]
fn a_policy_whose_scope_or_action_cannot_be_read_fails_closed_for_its_namespace() {
    let db = workload("shop", "db", &[("app", "db")]);
    let elsewhere = workload("other", "web", &[("app", "web")]);
    for spec in [
        "action: DENY\nselector: {matchLabels: [app, web]}\nrules: [{from: [{source: {principals: [x]}}]}]",
        "action: MAYBE\nselector: {matchLabels: {app: web}}",
        "[not, an, object]",
        "action: DENY\ntargetRefs: [{kind: Pod, name: web}]\nrules: [{}]",
    ] {
        assert!(validate(&ap("shop", "unreadable", spec)).is_err(), "{spec}");
        let i = index_unchecked(&[ap("shop", "unreadable", spec)]);
        if !spec.contains("targetRefs") {
            assert!(!i.authorize(&web(), &mtls("a", "b", 80)).allow, "{spec}");
            // An unknown action with a readable selector: only what it selects.
            let whole_namespace = !spec.contains("MAYBE");
            assert_eq!(
                !i.authorize(&db, &mtls("a", "b", 80)).allow,
                whole_namespace,
                "{spec}"
            );
        }
        assert!(i.authorize(&elsewhere, &mtls("a", "b", 80)).allow, "{spec}");
        if !spec.contains("selector") {
            // Targets unknown: every waypoint target of the namespace.
            let req = request("GET", "/", "web", &[]);
            let shop_web = [("shop".to_string(), "web".to_string())];
            for (waypoint, services) in [(("shop", "wp"), &[][..]), (("mesh", "wp"), &shop_web[..])] {
                let d = i.authorize_request(waypoint, services, &mtls("a", "b", 80), Some(&req), false);
                assert!(!d.allow, "{spec}: {d:?}");
            }
            let d = i.authorize_request(("mesh", "wp"), &[("other".to_string(), "web".to_string())], &mtls("a", "b", 80), Some(&req), false);
            assert!(d.allow, "{spec}: {d:?}");
        }
    }
    let i = index_unchecked(&[ap(
        "shop",
        "allow-unreadable",
        "selector: {matchLabels: 7}\nrules: [{}]",
    )]);
    assert!(
        !i.authorize(&db, &mtls("a", "b", 80)).allow,
        "an ALLOW allows nothing"
    );
}

#[test]
fn an_invalid_peer_authentication_is_strict() {
    let w = web();
    for (spec, applies_to_db) in [
        (
            "selector: {matchLabels: {app: web}}\nmtls: {mode: STRICTEST}",
            false,
        ),
        (
            "selector: {matchLabels: {app: web}}\nportLevelMtls: {http: {mode: DISABLE}}",
            false,
        ),
        ("selector: {matchLabels: 5}\nmtls: {mode: PERMISSIVE}", true),
        (
            "mtls: {mode: PERMISSIVE}\nportLevelMtls: {8080: {mode: DISABLE}}",
            true,
        ),
    ] {
        let i = index_unchecked(&[
            pa("shop", "default", "mtls: {mode: PERMISSIVE}"),
            pa("shop", "bad", spec),
        ]);
        assert_eq!(
            i.peer_authentication(&w, 8080),
            (Mode::Strict, Some("shop/bad".into())),
            "{spec}"
        );
        let db = workload("shop", "db", &[("app", "db")]);
        assert_eq!(
            i.peer_authentication(&db, 8080).0 == Mode::Strict,
            applies_to_db,
            "{spec}"
        );
    }
}

#[test]
fn at_the_waypoint_an_absent_attribute_never_matches_a_positive_list() {
    // remote.ip is the client's address (the connection's when none is carried):
    // never "matched" for want of a value.
    let req = request("GET", "/", "h", &[]);
    let i = attached("rules: [{when: [{key: remote.ip, values: [192.168.0.0/16]}]}]");
    assert!(
        !waypoint_allows(&i, &req),
        "10.244.1.7 is not in 192.168/16"
    );
    let mut from_there = req.clone();
    from_there.remote_ip = Some("192.168.1.1".parse().unwrap());
    assert!(waypoint_allows(&i, &from_there));
    let i = attached("rules: [{when: [{key: remote.ip, notValues: [0.0.0.0/0]}]}]");
    assert!(!waypoint_allows(&i, &req), "notValues covering everyone");
    let i = attached("rules: [{when: [{key: remote.ip, values: [10.244.1.7]}]}]");
    assert!(waypoint_allows(&i, &req));

    // An absent header: a positive list never matches, notValues never excludes.
    let i = attached("rules: [{when: [{key: 'request.headers[x-user]', values: ['*']}]}]");
    assert!(!waypoint_allows(&i, &req));
    let i = attached("rules: [{when: [{key: 'request.headers[x-user]', notValues: [admin]}]}]");
    assert!(waypoint_allows(&i, &req));
    // No token: no principal, audiences or claims.
    for key in [
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "request.auth.claims[sub]",
    ] {
        let i = attached(&format!(
            "rules: [{{when: [{{key: '{key}', values: ['*']}}]}}]"
        ));
        assert!(!waypoint_allows(&i, &req), "{key}");
    }
    // The tunnel's inner HTTP has no TLS: connection.sni is absent.
    let i = attached("rules: [{when: [{key: connection.sni, values: ['*']}]}]");
    assert!(!waypoint_allows(&i, &req));
}

#[test]
fn at_the_waypoint_keys_not_evaluated_fail_closed() {
    let key = "'experimental.envoy.filters.network.mysql_proxy[db.table]'";
    let req = request("GET", "/", "h", &[]);
    let i = attached(&format!("rules: [{{when: [{{key: {key}, values: [x]}}]}}]"));
    assert!(!waypoint_allows(&i, &req), "an ALLOW never matches on them");
    let i = attached(&format!(
        "action: DENY\nrules: [{{when: [{{key: {key}, values: [x]}}]}}]"
    ));
    assert!(!waypoint_allows(&i, &req), "a DENY always does");
}

fn request_authn(spec: &str) -> authn::RequestAuthentication {
    authn::RequestAuthentication::compile_fail_closed(
        "demo",
        "jwt",
        &serde_yaml::from_str(spec).unwrap(),
    )
}

fn refused_by(
    a: &authn::RequestAuthentication,
    headers: &[(&str, &str)],
    query: Option<&str>,
) -> Option<String> {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    authn::refused_by(&[Arc::new(a.clone())], &headers, query).map(|(_, why)| why)
}

#[test]
fn a_request_authentication_rule_that_cannot_compile_refuses_tokens_where_it_looks() {
    // A key rotation gone wrong: the second rule's JWKS is not JSON.
    let jwks = crate::jwt::testing::Es256Issuer::default().jwks();
    let a = request_authn(&format!(
        "targetRefs: [{{kind: Gateway, name: wp}}]\njwtRules:\n- {{issuer: https://good.test, jwks: '{jwks}'}}\n- {{issuer: https://rotated.test, jwks: 'not json', fromHeaders: [{{name: X-Token}}], fromParams: [tok]}}\n",
    ));
    assert_eq!(a.rules.len(), 1, "the good rule stays");
    assert_eq!(a.targets, vec![("Gateway".to_owned(), "wp".to_owned())]);
    assert!(!a.any_target);
    let why = refused_by(&a, &[("x-token", "forged")], None).expect("refused");
    assert!(
        why.contains("demo/jwt") && why.contains("jwtRules[1].jwks"),
        "{why}"
    );
    assert!(refused_by(&a, &[], Some("a=1&tok=forged")).is_some());
    // No token where the refused rule looks: as before, authentication decides.
    assert_eq!(refused_by(&a, &[("authorization", "Bearer x")], None), None);
    assert_eq!(refused_by(&a, &[], Some("a=1")), None);
    assert!(authn::RequestAuthentication::compile(
        "demo",
        "jwt",
        &serde_yaml::from_str("jwtRules: [{issuer: ''}]").unwrap()
    )
    .unwrap_err()
    .to_string()
    .contains("in force, fail closed"),);
}

#[test]
fn a_request_authentication_that_cannot_be_read_refuses_every_request_of_its_namespace() {
    for spec in [
        // A typo for jwtRules: which tokens it meant to check is unknown.
        "targetRefs: [{kind: Gateway, name: wp}]\njwtRule: [{issuer: https://a.test, jwks: '{}'}]\n",
        // A rule whose token locations cannot be read.
        "targetRefs: [{kind: Gateway, name: wp}]\njwtRules: [{issuer: https://a.test, fromHeaders: x-token}]\n",
        "jwtRules: not-a-list\ntargetRefs: [{kind: Gateway, name: wp}]\n",
        "[not, an, object]",
    ] {
        let a = request_authn(spec);
        assert!(
            refused_by(&a, &[], None).is_some(),
            "every request refused for {spec:?}"
        );
        assert!(a.fail_closed_effect().starts_with("every request"), "{spec:?}");
    }
    // Unreadable targets: every waypoint target of the namespace.
    let a = request_authn("targetRefs: [{kind: Pod, name: x}]\njwtRules: [{issuer: https://a.test, jwksUri: 'http://keys/jwks'}]\n");
    assert!(a.any_target);
    let index = Index::build(
        &[policy(
            "RequestAuthentication",
            "demo",
            "jwt",
            "jwtRule: [{issuer: https://a.test}]",
        )],
        "istio-system",
        vec!["cluster.local".into()],
    );
    let applying = index.request_authentications(("demo", "wp"), &[("demo".into(), "svc".into())]);
    assert_eq!(
        applying.len(),
        1,
        "applies to every waypoint target of demo"
    );
    assert!(index
        .request_authentications(("other", "wp"), &[("other".into(), "svc".into())])
        .is_empty());
}

/// What a waypoint applies is kept per destination: destinations asked in turn,
/// over and over and past the cache's size, never get each other's policies (a
/// DENY attached to one Service stays on that Service alone).
#[test]
fn a_waypoints_policies_are_kept_per_destination_and_never_mixed() {
    let i = index(&[ap(
        "shop",
        "no-admin",
        "targetRefs: [{kind: Service, group: \"\", name: admin}]\naction: DENY\nrules: [{}]",
    )]);
    let req = request("GET", "/", "web", &[]);
    let service = |name: &str| vec![("shop".to_string(), name.to_string())];
    let allows = |services: &[(String, String)]| {
        i.authorize_request(
            ("shop", "wp"),
            services,
            &mtls("a", "b", 80),
            Some(&req),
            false,
        )
        .allow
    };
    for n in 0..(AT_WAYPOINTS_KEPT + 10) {
        assert!(!allows(&service("admin")), "round {n}: admin");
        assert!(allows(&service(&format!("web-{n}"))), "round {n}: web-{n}");
        // The denied Service among others is denied too, in any order.
        let both = [service("admin"), service("web")].concat();
        assert!(!allows(&both), "round {n}: admin and web");
        assert!(allows(&service("web")), "round {n}: web");
    }
}
