//! `cargo xtask bench policy`: decisions per second and p99 decision time, with 10
//! and with 10,000 AuthorizationPolicies in the mesh. The destination's namespace
//! holds the same few policies in both cases: cost follows the policies that target
//! the destination, not the total.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ztunnel::{
    config::{Pod, Policy},
    identity::Identity,
    policy::{Connection, Index, ROOT_NAMESPACE},
    state::Workload,
};

const DECISIONS: usize = 200_000;

fn policy(ns: &str, name: &str, spec: &str) -> Policy {
    Policy::new(
        "AuthorizationPolicy",
        "security.istio.io/v1",
        ns,
        name,
        Default::default(),
        serde_yaml::from_str(spec).unwrap(),
    )
}

/// The destination's namespace: a DENY, three ALLOWs with principals, ports and
/// CIDRs — the shapes real policies have.
fn shop_policies() -> Vec<Policy> {
    vec![
        policy("shop", "deny-legacy", "action: DENY\nrules: [{from: [{source: {namespaces: [legacy]}}]}]"),
        policy("shop", "web-from-front", "selector: {matchLabels: {app: web}}\nrules: [{from: [{source: {principals: ['cluster.local/ns/front/sa/*']}}], to: [{operation: {ports: ['8080']}}]}]"),
        policy("shop", "web-from-ops", "selector: {matchLabels: {app: web}}\nrules: [{from: [{source: {namespaces: [ops], ipBlocks: [10.244.0.0/16]}}]}]"),
        policy("shop", "db-only", "selector: {matchLabels: {app: db}}\nrules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]"),
    ]
}

fn run(total: usize) {
    let mut policies = shop_policies();
    let mut n = 0;
    while policies.len() < total {
        let ns = format!("team-{}", n / 10);
        policies.push(policy(&ns, &format!("p{n}"), "rules: [{from: [{source: {principals: ['cluster.local/ns/x/sa/y']}}], to: [{operation: {ports: ['80']}}]}]"));
        n += 1;
    }
    policies.push(policy(
        ROOT_NAMESPACE,
        "mesh-deny-evil",
        "action: DENY\nrules: [{from: [{source: {namespaces: [evil]}}]}]",
    ));
    let started = Instant::now();
    let index = Arc::new(Index::build(
        &policies,
        ROOT_NAMESPACE,
        vec!["cluster.local".into()],
    ));
    let compile = started.elapsed();

    let ip = "10.244.1.2".parse().unwrap();
    let web = Workload {
        pod: Arc::new(Pod {
            uid: None,
            name: "web".into(),
            namespace: "shop".into(),
            labels: Arc::new([("app".to_string(), "web".to_string())].into()),
            annotations: Default::default(),
            service_account: "web".into(),
            node_name: "n".into(),
            ip: Some(ip),
            netns: None,
            cgroup: None,
        }),
        ip,
        identity: Identity::new("cluster.local", "shop", "web").unwrap(),
        captured: true,
        waypoint: None,
    };
    let sources: Vec<Connection> = ["front", "ops", "legacy", "evil", "other"]
        .iter()
        .map(|ns| Connection {
            source_identity: Some(Identity::new("cluster.local", ns, "app").unwrap()),
            source_ip: "10.244.0.7".parse().unwrap(),
            destination_ip: "10.244.1.2".parse().unwrap(),
            destination_port: 8080,
        })
        .collect();
    let mut times = Vec::with_capacity(DECISIONS);
    let mut allowed = 0usize;
    let started = Instant::now();
    for i in 0..DECISIONS {
        let t = Instant::now();
        let decision = index.authorize(&web, &sources[i % sources.len()]);
        times.push(t.elapsed());
        allowed += usize::from(decision.allow);
    }
    let elapsed = started.elapsed();
    times.sort_unstable();
    let p99: Duration = times[times.len() * 99 / 100];
    println!(
        "policy/{total:<6} policies: {:>9.0} decisions per second, p50 {:?}, p99 {:?} (compiled in {compile:.1?}; {allowed} of {DECISIONS} allowed)",
        DECISIONS as f64 / elapsed.as_secs_f64(),
        times[times.len() / 2],
        p99,
    );
}

fn main() {
    run(10);
    run(10_000);
}
