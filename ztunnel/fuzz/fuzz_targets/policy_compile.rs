//! Security policy YAML → compiled policy. Properties: no panic; the strict compile
//! succeeds exactly when the fail-closed one found nothing to refuse; a refused
//! DENY or CUSTOM policy matches every connection and request (it denies all it
//! applies to), and evaluating any compiled policy never panics.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use ztunnel_core::{
    identity::Identity,
    policy::{
        authn::RequestAuthentication, Action, Compiled, Connection, PeerAuthentication, Request,
    },
};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let Ok(spec) = serde_yaml::from_str::<serde_yaml::Value>(text) else {
        return;
    };
    match selector % 4 {
        0 | 1 => authorization_policy(&spec, selector % 4 == 1),
        2 => {
            let strict = PeerAuthentication::compile("ns", "p", &spec);
            let closed = PeerAuthentication::compile_fail_closed("ns", "p", &spec);
            assert_eq!(strict.is_ok(), closed.refused.is_none());
            if closed.refused.is_some() {
                assert_eq!(closed.mode, ztunnel_core::policy::Mode::Strict);
            }
        }
        _ => {
            let _ = RequestAuthentication::compile("ns", "p", &spec);
        }
    }
});

fn authorization_policy(spec: &serde_yaml::Value, dry_run: bool) {
    let mut annotations = BTreeMap::new();
    if dry_run {
        annotations.insert("istio.io/dry-run".to_owned(), "true".to_owned());
    }
    let strict = Compiled::compile("ns", "p", &annotations, spec);
    let closed = Compiled::compile_fail_closed("ns", "p", &annotations, spec);
    assert_eq!(
        strict.is_ok(),
        closed.refused.is_empty(),
        "{:?}",
        closed.refused
    );
    let tds = ["cluster.local".to_owned()];
    let mtls = Connection {
        source_identity: Identity::new("cluster.local", "a", "b").ok(),
        source_ip: "10.244.1.7".parse().unwrap(),
        destination_ip: "10.244.0.9".parse().unwrap(),
        destination_port: 8080,
    };
    let plaintext = Connection {
        source_identity: None,
        ..mtls.clone()
    };
    let request = Request {
        method: "GET".into(),
        path: "/admin".into(),
        host: "web.ns.svc.cluster.local".into(),
        headers: vec![("x-user".into(), "alice".into())],
        remote_ip: Some("192.0.2.1".parse().unwrap()),
        auth: None,
    };
    for conn in [&mtls, &plaintext] {
        let at_tunnel = closed.matches(conn, &tds);
        let at_waypoint = closed.matches_request(conn, &request, &tds);
        let _ = closed.fail_closed_effect();
        if !closed.refused.is_empty() && matches!(closed.action, Action::Deny | Action::Custom) {
            assert!(
                at_tunnel && at_waypoint,
                "a refused {:?} policy let a connection pass: {:?}",
                closed.action,
                closed.refused
            );
        }
    }
}
