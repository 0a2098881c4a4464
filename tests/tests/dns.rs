//! The DNS proxy, asked by resolvers no one here wrote: glibc (`getent hosts`) and
//! `dig` (Debian's dnsutils), run in enrolled pods with a Kubernetes-style
//! resolv.conf. The upstream is testbed::dns's small server in a pod outside the
//! mesh.

use std::{sync::atomic::Ordering, time::Duration};

use testbed::{
    dns::{pod_resolv_conf, run_with_resolv_conf, start_upstream, CLUSTER_DNS},
    mesh::{eventually, metric, Mesh, TempDir, WorkloadSpec},
    Cluster, ClusterSpec,
};

const SERVICES: &str = "apiVersion: v1
kind: Service
metadata: {name: server, namespace: demo}
spec:
  clusterIP: 10.96.0.50
  selector: {app: server}
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec:
  clusterIP: None
  selector: {app: db}
  ports:
  - {port: 5432}
";

/// In the mesh, with Istio's annotation turning its DNS capture off.
const QUIET_NAMESPACE: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: quiet
  labels: {istio.io/dataplane-mode: ambient}
  annotations: {ambient.istio.io/dns-capture: \"false\"}
";

/// node-a: client (demo), quiet (namespace `quiet`, DNS capture off), upstream
/// (outside the mesh: the DNS server the tunnel forwards to); node-b: server,
/// db-0, db-1 (endpoints of the headless Service `db`).
struct Bed {
    mesh: Mesh,
    seen: std::sync::Arc<testbed::dns::Seen>,
    conf: TempDir,
}

impl Bed {
    async fn start() -> Bed {
        let cluster = Cluster::new(
            &ClusterSpec::new()
                .node("node-a", ["client", "quiet", "upstream"])
                .node("node-b", ["server", "db-0", "db-1"]),
        )
        .unwrap();
        let workloads = [
            WorkloadSpec::new("client", "demo", "client"),
            WorkloadSpec::new("quiet", "quiet", "quiet"),
            WorkloadSpec::new("server", "demo", "server"),
            WorkloadSpec::new("db-0", "demo", "db").label("app", "db"),
            WorkloadSpec::new("db-1", "demo", "db").label("app", "db"),
        ];
        let mut mesh = Mesh::start(cluster, &workloads, &["demo", "quiet"])
            .await
            .unwrap();
        mesh.write_config("dns.yaml", SERVICES).unwrap();
        mesh.write_config("ns-quiet.yaml", QUIET_NAMESPACE).unwrap();
        let seen = start_upstream(mesh.cluster.pod("upstream")).unwrap();
        let upstream = format!("{}:53", mesh.cluster.pod("upstream").ip);
        mesh.kill_tunnel("node-a");
        mesh.tunnel_args
            .insert("node-a".into(), vec!["--dns-upstream".into(), upstream]);
        mesh.start_tunnel("node-a").await.unwrap();
        let conf = TempDir::new("dns-conf").unwrap();
        for ns in ["demo", "quiet"] {
            std::fs::write(conf.path().join(ns), pod_resolv_conf(ns, CLUSTER_DNS)).unwrap();
        }
        let bed = Bed { mesh, seen, conf };
        // The headless Service is in the state once its name answers.
        eventually(
            Duration::from_secs(15),
            "the Services in the state",
            || async {
                bed.dig("client", &["+short", "db.demo.svc.cluster.local"])
                    .lines()
                    .count()
                    == 2
            },
        )
        .await;
        bed
    }

    /// Runs `program` in `pod` with its namespace's resolv.conf; stdout and stderr.
    fn run(&self, pod: &str, program: &str, args: &[&str]) -> String {
        let ns = if pod == "quiet" { "quiet" } else { "demo" };
        let out = run_with_resolv_conf(
            self.mesh.cluster.pod(pod),
            &self.conf.path().join(ns),
            program,
            args,
        )
        .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn dig(&self, pod: &str, args: &[&str]) -> String {
        let mut all = vec!["+time=2", "+tries=1"];
        all.extend_from_slice(args);
        self.run(pod, "dig", &all)
    }

    fn getent(&self, pod: &str, name: &str) -> String {
        self.run(pod, "getent", &["hosts", name])
    }
}

/// The resource records of dig's answer sections, split at whitespace.
fn records(dig: &str) -> Vec<Vec<String>> {
    dig.lines()
        .filter(|l| !l.starts_with(';'))
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .filter(|r| r.len() >= 5)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_resolves_by_short_namespace_relative_and_full_name_with_glibc_and_dig() {
    let bed = Bed::start().await;
    for name in [
        "server",
        "server.demo",
        "server.demo.svc",
        "server.demo.svc.cluster.local",
    ] {
        let out = bed.getent("client", name);
        assert!(out.starts_with("10.96.0.50 "), "getent hosts {name}: {out}");
        let out = bed.dig("client", &["+search", "+short", name]);
        assert_eq!(out.trim(), "10.96.0.50", "dig +search {name}: {out}");
    }
    // The full answer: authoritative, TTL 30, from the mesh (the upstream never
    // heard of it).
    let out = bed.dig("client", &["server.demo.svc.cluster.local"]);
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains(" aa "), "not authoritative: {out}");
    assert_eq!(
        records(&out),
        [[
            "server.demo.svc.cluster.local.",
            "30",
            "IN",
            "A",
            "10.96.0.50"
        ]],
        "{out}"
    );
    // The same over TCP (captured TCP/53).
    let out = bed.dig(
        "client",
        &["+tcp", "+short", "server.demo.svc.cluster.local"],
    );
    assert_eq!(out.trim(), "10.96.0.50", "{out}");
    // A name of the cluster domain that does not exist: NXDOMAIN, authoritative.
    let out = bed.dig("client", &["missing.demo.svc.cluster.local"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(out.contains(" aa "), "{out}");
    // The mesh is IPv4-only: AAAA exists with no data.
    let out = bed.dig("client", &["AAAA", "server.demo.svc.cluster.local"]);
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0"),
        "{out}"
    );
    assert!(
        !bed.seen
            .names
            .lock()
            .unwrap()
            .iter()
            .any(|n| n.contains("cluster.local")),
        "a mesh name went upstream"
    );
    let page = bed.mesh.metrics("node-a").await;
    assert!(
        metric(
            &page,
            "istio_dns_requests_total",
            &["request_protocol=\"tcp\"", "request_query_type=\"a\""]
        ) >= 1.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_headless_service_resolves_to_its_pods() {
    let bed = Bed::start().await;
    let mut want: Vec<String> = ["db-0", "db-1"]
        .iter()
        .map(|p| bed.mesh.cluster.pod(p).ip.to_string())
        .collect();
    want.sort();
    let out = bed.dig("client", &["+search", "+short", "db"]);
    let mut got: Vec<String> = out.lines().map(str::to_owned).collect();
    got.sort();
    assert_eq!(got, want, "{out}");
    let out = bed.getent("client", "db.demo");
    assert!(want.iter().any(|ip| out.starts_with(ip.as_str())), "{out}");
    // Each pod by name, and by its dashed address in the pod zone.
    let db0 = bed.mesh.cluster.pod("db-0").ip.to_string();
    let out = bed.dig("client", &["+short", "db-0.db.demo.svc.cluster.local"]);
    assert_eq!(out.trim(), db0, "{out}");
    let dashed = format!("{}.demo.pod.cluster.local", db0.replace('.', "-"));
    let out = bed.dig("client", &["+short", &dashed]);
    assert_eq!(out.trim(), db0, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_external_name_is_forwarded_to_the_upstream_and_then_cached() {
    let bed = Bed::start().await;
    let out = bed.getent("client", "www.test");
    assert!(out.starts_with("192.0.2.10 "), "{out}");
    let out = bed.dig("client", &["+short", "api.test"]);
    assert_eq!(out.trim(), "192.0.2.10", "{out}");
    // Forwarded by the tunnel, from the node: not from the pod.
    let out = bed.dig("client", &["+short", "whoami.test"]);
    let client = bed.mesh.cluster.pod("client").ip.to_string();
    assert!(!out.trim().is_empty() && out.trim() != client, "{out}");
    // Asked again: answered from the cache, the upstream asked once.
    let out = bed.dig("client", &["api.test"]);
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(
        !out.contains(" aa "),
        "a forwarded answer is not ours: {out}"
    );
    assert_eq!(bed.seen.count("api.test."), 1);
    // Outside the cluster domain, the upstream's NXDOMAIN is passed on.
    let out = bed.dig("client", &["nowhere.example"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    let page = bed.mesh.metrics("node-a").await;
    assert!(
        metric(&page, "istio_dns_upstream_requests_total", &[]) >= 3.0,
        "{page}"
    );
    assert!(
        metric(
            &page,
            "istio_dns_upstream_request_duration_seconds_count",
            &[]
        ) >= 3.0,
        "{page}"
    );
    // An upstream that does not answer: SERVFAIL, counted.
    let out = bed.run(
        "client",
        "dig",
        &["+time=10", "+tries=1", "never.silent.test"],
    );
    assert!(out.contains("status: SERVFAIL"), "{out}");
    let page = bed.mesh.metrics("node-a").await;
    assert!(
        metric(&page, "istio_dns_upstream_failures_total", &[]) >= 1.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_over_512_bytes_comes_over_tcp_after_truncation() {
    let bed = Bed::start().await;
    // No EDNS: the client takes 512 bytes over UDP; the proxy answers truncated
    // and dig asks again over TCP. The upstream truncates too: the proxy asked it
    // again over TCP.
    let out = bed.dig("client", &["+noedns", "TXT", "big.test"]);
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert!(out.contains("status: NOERROR"), "{out}");
    assert_eq!(out.matches("\"14-xxxx").count(), 1, "{out}");
    let txt = records(&out);
    assert_eq!(txt.len(), 15, "{out}");
    assert!(
        txt.iter().all(|r| r[0] == "big.test." && r[3] == "TXT"),
        "{out}"
    );
    assert!(bed.seen.tcp.load(Ordering::SeqCst) >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_annotated_dns_capture_false_asks_its_server_directly() {
    let bed = Bed::start().await;
    let upstream = bed.mesh.cluster.pod("upstream").ip.to_string();
    let at = format!("@{upstream}");
    let quiet = bed.mesh.cluster.pod("quiet").ip.to_string();
    let client = bed.mesh.cluster.pod("client").ip.to_string();
    // Not captured: the upstream sees the pod itself.
    let out = bed.dig("quiet", &[&at, "+short", "whoami.test"]);
    assert_eq!(out.trim(), quiet, "{out}");
    // And mesh names are not answered for it (the upstream does not know them).
    let out = bed.dig("quiet", &[&at, "server.demo.svc.cluster.local"]);
    assert!(
        out.contains("status: NXDOMAIN") && !out.contains(" aa "),
        "{out}"
    );
    // A captured pod asking the same server: the tunnel asks for it.
    let out = bed.dig("client", &[&at, "+short", "whoami.test"]);
    assert!(out.trim() != client && !out.trim().is_empty(), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dns_capture_false_leaves_every_pods_dns_alone() {
    let mut bed = Bed::start().await;
    let upstream = bed.mesh.cluster.pod("upstream").ip.to_string();
    bed.mesh.kill_tunnel("node-a");
    bed.mesh.tunnel_args.insert(
        "node-a".into(),
        vec![
            "--dns-upstream".into(),
            format!("{upstream}:53"),
            "--dns-capture=false".into(),
        ],
    );
    bed.mesh.start_tunnel("node-a").await.unwrap();
    bed.mesh
        .wait_enrolled("node-a", "client", true)
        .await
        .unwrap();
    let client = bed.mesh.cluster.pod("client").ip.to_string();
    let out = bed.dig(
        "client",
        &[&format!("@{upstream}"), "+short", "whoami.test"],
    );
    assert_eq!(out.trim(), client, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_datagram_that_is_not_dns_is_dropped_and_counted() {
    let bed = Bed::start().await;
    let out = bed.mesh.output(
        "client",
        env!("CARGO_BIN_EXE_tb-probe"),
        &["dns", "10.96.0.10:53", "not a dns query"],
    );
    assert!(!out.contains("reply="), "{out}");
    let page = bed.mesh.metrics("node-a").await;
    assert!(
        metric(
            &page,
            "ztunnel_dns_queries_dropped_total",
            &["reason=\"malformed\""]
        ) >= 1.0,
        "{page}"
    );
    // The pod is still served.
    let out = bed.dig("client", &["+short", "server.demo.svc.cluster.local"]);
    assert_eq!(out.trim(), "10.96.0.50", "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_query_is_logged_at_debug_with_pod_name_type_and_source() {
    let bed = Bed::start().await;
    let (code, body) = bed
        .mesh
        .http_request("node-a", 15000, "POST", "/logging?level=info,dns=debug")
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    bed.dig("client", &["+short", "server.demo.svc.cluster.local"]);
    bed.dig("client", &["+short", "logged.test"]);
    bed.dig("client", &["+short", "logged.test"]);
    let lines = |source: &str| {
        bed.mesh
            .log("node-a")
            .lines()
            .filter(|l| {
                l.contains("dns query")
                    && l.contains("pod=demo/client")
                    && l.contains("type=A")
                    && l.contains(&format!("source=\"{source}\""))
                    && l.contains("latency_us=")
            })
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(5), "the three lines", || async {
        lines("mesh")
            .iter()
            .any(|l| l.contains("name=server.demo.svc.cluster.local."))
            && lines("upstream")
                .iter()
                .any(|l| l.contains("name=logged.test."))
            && lines("cache")
                .iter()
                .any(|l| l.contains("name=logged.test."))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forwarded_query_in_flight_when_the_tunnel_drains_is_still_answered() {
    let mut bed = Bed::start().await;
    // dig asks a name the upstream answers slowly, on a thread of its own.
    let conf = bed.conf.path().join("demo");
    let client = bed.mesh.cluster.pod("client").clone();
    let asking = std::thread::spawn(move || {
        let out = run_with_resolv_conf(
            &client,
            &conf,
            "dig",
            &["+time=8", "+tries=1", "drain.slow.test"],
        )
        .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    // The query is in flight: the tunnel forwarded it, the upstream holds it.
    eventually(
        Duration::from_secs(15),
        "the query forwarded to the upstream",
        || async { bed.seen.count("drain.slow.test.") == 1 },
    )
    .await;
    let status = bed.mesh.stop_tunnel("node-a").await.unwrap();
    assert!(status.success(), "{status}");
    let out = asking.join().unwrap();
    assert!(out.contains("status: NOERROR"), "{out}");
    assert_eq!(
        records(&out).last().map(|r| r[4].as_str()),
        Some("192.0.2.10"),
        "{out}"
    );
}
