//! A real waypoint on the testbed: L7 AuthorizationPolicy on HTTP requests.

use std::time::Duration;

use testbed::{
    app::HttpServer,
    ext_authz::ExtAuthzServer,
    l7::L7Server,
    mesh::{eventually, metric, Mesh, WorkloadSpec},
    Cluster, ClusterSpec,
};

const PROBE: &str = env!("CARGO_BIN_EXE_tb-probe");
const VIP: &str = "10.96.0.80:80";

/// Service demo/server (10.96.0.80:80 → 8080) uses waypoint demo/waypoint.
const CONFIG: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.80
  selector: {app: server}
  # Declared HTTP/1.1: the waypoint speaks HTTP/1.1 to it whatever the client speaks.
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: public-gets, namespace: demo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
    to: [{operation: {methods: [GET], paths: ["/public/*", /health]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-blocked, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: server}]
  action: DENY
  rules:
  - when: [{key: "request.headers[x-block]", values: ["yes"]}]
"#;

fn workloads() -> Vec<WorkloadSpec> {
    vec![
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("server", "demo", "server"),
        WorkloadSpec::new("waypoint", "demo", "waypoint")
            .label("gateway.networking.k8s.io/gateway-name", "waypoint"),
    ]
}

async fn mesh() -> Mesh {
    mesh_from(workloads(), CONFIG).await
}

/// The client on node-a, every other pod on node-b; `config` written, and the
/// waypoint (the pod named "waypoint", of Gateway `<its namespace>/waypoint`) started.
async fn mesh_from(workloads: Vec<WorkloadSpec>, config: &str) -> Mesh {
    mesh_from_args(workloads, config, &[]).await
}

/// Like `mesh_from`, with more arguments to the waypoint.
async fn mesh_from_args(workloads: Vec<WorkloadSpec>, config: &str, args: &[&str]) -> Mesh {
    mesh_with(workloads, config, args, &[]).await
}

/// Like `mesh_from`, with more environment for the waypoint.
async fn mesh_with_env(workloads: Vec<WorkloadSpec>, config: &str, env: &[(&str, &str)]) -> Mesh {
    mesh_with(workloads, config, &[], env).await
}

async fn mesh_with(
    workloads: Vec<WorkloadSpec>,
    config: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Mesh {
    let others: Vec<&str> = workloads
        .iter()
        .map(|w| w.pod.as_str())
        .filter(|p| *p != "client")
        .collect();
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client"])
            .node("node-b", others),
    )
    .unwrap();
    let mut mesh = Mesh::start(cluster, &workloads, &["demo"]).await.unwrap();
    mesh.write_config("waypoint.yaml", config).unwrap();
    eventually(Duration::from_secs(15), "the config loaded", || async {
        mesh.config_dump("node-a").await["services"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    })
    .await;
    let namespace = workloads
        .iter()
        .find(|w| w.pod == "waypoint")
        .map(|w| w.namespace.clone())
        .unwrap();
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    mesh.waypoint_env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    mesh.start_waypoint_args("waypoint", &namespace, "waypoint", &args)
        .await
        .unwrap();
    mesh
}

fn http(mesh: &Mesh, target: &str, method: &str, path: &str, headers: &[&str]) -> (String, String) {
    let mut args = vec!["http", target, method, path];
    args.extend(headers);
    let out = mesh.cluster.pod("client").run(PROBE, &args).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .to_owned()
    };
    (
        field("status"),
        if field("error").is_empty() {
            field("body")
        } else {
            field("error")
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_waypoint_allows_get_and_denies_post_by_a_methods_rule() {
    let mesh = mesh().await;
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    assert_eq!(
        http(&mesh, VIP, "GET", "/public/a", &[]),
        ("200".into(), "server GET /public/a".into())
    );
    assert_eq!(
        http(&mesh, VIP, "POST", "/public/a", &[]),
        ("403".into(), "RBAC: access denied".into())
    );
    eventually(
        Duration::from_secs(15),
        "istio_requests_total at the waypoint",
        || async {
            let page = mesh.waypoint_metrics("waypoint").await;
            page.lines().any(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("response_code=\"403\"")
                    && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"")
            }) && page.lines().any(|l| {
                l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\"")
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn path_prefix_and_header_conditions_decide_at_the_waypoint() {
    let mesh = mesh().await;
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    assert_eq!(http(&mesh, VIP, "GET", "/health", &[]).0, "200");
    assert_eq!(
        http(&mesh, VIP, "GET", "/private", &[]).0,
        "403",
        "no ALLOW rule matches /private"
    );
    assert_eq!(
        http(&mesh, VIP, "GET", "/public/b", &["x-block: yes"]).0,
        "403",
        "DENY on a header"
    );
    assert_eq!(
        http(&mesh, VIP, "GET", "/public/b", &["x-block: no"]).0,
        "200"
    );
    assert!(
        mesh.log("waypoint-waypoint").contains("request denied"),
        "{}",
        mesh.log("waypoint-waypoint")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_addressed_traffic_skips_a_service_waypoint() {
    // waypoint-for defaults to service: the pod's own address goes straight through
    // the tunnels, with L4 policy only.
    let mesh = mesh().await;
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let pod = format!("{}:8080", mesh.cluster.pod("server").ip);
    assert_eq!(http(&mesh, &pod, "POST", "/anything", &[]).0, "200");
}

fn claims(exp_in: i64) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    serde_json::json!({"iss": "https://issuer.test", "sub": "alice", "aud": "shop", "exp": now + exp_in})
}

/// The attack: a RequestAuthentication whose keys were broken by an edit (or whose
/// spec has a typo) must not let a forged token reach an application that trusts
/// the header the mesh passes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_authentication_that_cannot_compile_lets_no_unverified_token_through() {
    let mesh = mesh().await;
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let ra = |rules: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: demo}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n{rules}")
    };
    mesh.write_config(
        "authn.yaml",
        &ra("  jwtRules: [{issuer: https://issuer.test, jwks: 'not a jwks', fromHeaders: [{name: x-token}], forwardOriginalToken: true}]\n"),
    )
    .unwrap();
    eventually(
        Duration::from_secs(15),
        "the refused RequestAuthentication in force",
        || async { http(&mesh, VIP, "GET", "/public/x", &["x-token: forged"]).0 == "401" },
    )
    .await;
    let (status, body) = http(&mesh, VIP, "GET", "/public/x", &[]);
    assert_eq!(
        status, "200",
        "a request without a token passes, as before: {body}"
    );
    assert!(!body.contains("x-token"), "{body}");
    let log = mesh.log("waypoint-waypoint");
    assert!(
        log.contains("RequestAuthentication demo/jwt is refused (spec.jwtRules[0].jwks"),
        "{log}"
    );

    // A typo in the spec: where tokens are looked for is unknown, so every request is refused.
    mesh.write_config(
        "authn.yaml",
        &ra("  jwtRule: [{issuer: https://issuer.test, fromHeaders: [{name: x-token}]}]\n"),
    )
    .unwrap();
    eventually(
        Duration::from_secs(15),
        "every request refused while the spec cannot be read",
        || async { http(&mesh, VIP, "GET", "/public/x", &[]).0 == "401" },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_authentication_validates_jwts_at_the_waypoint() {
    let mesh = mesh().await;
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let issuer = ztunnel::jwt::testing::Es256Issuer::default();
    let (token, expired, jwks) = (
        issuer.token(&claims(3600)),
        issuer.token(&claims(-10)),
        issuer.jwks(),
    );
    let authn = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: demo}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  jwtRules:\n  - issuer: https://issuer.test\n    audiences: [shop]\n    jwks: '{jwks}'\n    outputClaimToHeaders: [{{header: x-echo-sub, claim: sub}}]\n    outputPayloadToHeader: x-echo-payload\n"
    );
    mesh.write_config("authn.yaml", &authn).unwrap();
    let bearer = format!("authorization: Bearer {token}");
    eventually(
        Duration::from_secs(15),
        "the RequestAuthentication loaded",
        || async {
            http(
                &mesh,
                VIP,
                "GET",
                "/public/x",
                &["authorization: Bearer garbage"],
            )
            .0 == "401"
        },
    )
    .await;
    let (status, body) = http(&mesh, VIP, "GET", "/public/x", &[&bearer]);
    assert_eq!(status, "200", "a valid token");
    // The claim and the payload travel upstream; the token itself does not
    // (forwardOriginalToken is false by default).
    assert!(body.contains(" x-echo-sub=alice"), "{body}");
    assert!(
        body.contains(&format!(
            " x-echo-payload={}",
            token.split('.').nth(1).unwrap()
        )),
        "{body}"
    );
    assert!(!body.contains("authorization="), "{body}");
    assert_eq!(
        http(
            &mesh,
            VIP,
            "GET",
            "/public/x",
            &[&format!("authorization: Bearer {expired}")]
        ),
        ("401".into(), "Jwt verification fails".into())
    );
    assert_eq!(
        http(&mesh, VIP, "GET", "/public/x", &[]).0,
        "200",
        "no token passes RequestAuthentication alone"
    );
    assert!(
        mesh.log("waypoint-waypoint")
            .contains("JWT: the token expired"),
        "{}",
        mesh.log("waypoint-waypoint")
    );

    // Now require a token, and allow alice to /admin.
    mesh.write_config(
        "require-jwt.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: require-jwt, namespace: demo}\nspec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  action: DENY\n  rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: alice-admin, namespace: demo}\nspec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  rules: [{from: [{source: {requestPrincipals: [https://issuer.test/alice]}}], to: [{operation: {paths: [/admin]}}], when: [{key: request.auth.audiences, values: [shop]}]}]\n",
    )
    .unwrap();
    eventually(
        Duration::from_secs(15),
        "no token is now denied",
        || async { http(&mesh, VIP, "GET", "/public/x", &[]).0 == "403" },
    )
    .await;
    assert_eq!(http(&mesh, VIP, "GET", "/public/x", &[&bearer]).0, "200");
    let (status, body) = http(&mesh, VIP, "GET", "/admin", &[&bearer]);
    assert_eq!(status, "200");
    assert!(body.starts_with("server GET /admin "), "{body}");
}

/// An ext-authz HTTP service (Envoy's HTTP check protocol) in the waypoint's pod on
/// 127.0.0.1:9191: paths with "deny" are refused with 403, "slow" never answers in
/// time, anything else is allowed.
fn start_ext_authz(mesh: &Mesh) -> std::thread::JoinHandle<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = mesh
        .cluster
        .pod("waypoint")
        .spawn_task(move || async move {
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:9191").await.unwrap();
            ready_tx.send(()).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let mut stream = tokio::io::BufReader::new(stream);
                    let mut line = String::new();
                    stream.read_line(&mut line).await.unwrap();
                    loop {
                        let mut header = String::new();
                        if stream.read_line(&mut header).await.unwrap_or(0) == 0 || header == "\r\n" {
                            break;
                        }
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                    // One request per connection, said so: the waypoint's client
                    // pools connections and must not reuse this one.
                    let response = if path.contains("huge") {
                        // Past the waypoint's cap on a provider's answer.
                        let body = "x".repeat(ztunnel::extauthz::MAX_RESPONSE_BYTES + 1);
                        format!("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}", body.len())
                    } else if path.contains("slow") {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n".to_owned()
                    } else if path.contains("deny") {
                        "HTTP/1.1 403 Forbidden\r\nconnection: close\r\nx-reason: denied-by-test\r\ncontent-length: 4\r\n\r\nnope".to_owned()
                    } else {
                        "HTTP/1.1 200 OK\r\nconnection: close\r\nx-auth-user: alice\r\ncontent-length: 0\r\n\r\n".to_owned()
                    };
                    let _ = stream.get_mut().write_all(response.as_bytes()).await;
                });
            }
        })
        .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    handle
}

const EXT_AUTHZ_POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-closed, namespace: demo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: CUSTOM
  provider: {name: closed}
  rules: [{to: [{operation: {paths: ["/public/ext/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-grpc, namespace: demo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: CUSTOM
  provider: {name: grpc}
  rules: [{to: [{operation: {paths: ["/public/grpc/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-open, namespace: demo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: CUSTOM
  provider: {name: open}
  rules: [{to: [{operation: {paths: ["/public/open/*"]}}]}]
"#;

/// A mesh whose waypoint has the CUSTOM policies of EXT_AUTHZ_POLICIES, the HTTP
/// providers `closed` and `open` (failOpen) on 127.0.0.1:9191 and the gRPC
/// provider `grpc` on 127.0.0.1:9292 (timeout 1s), all running; and a server.
struct ExtAuthzMesh {
    mesh: Mesh,
    grpc: ExtAuthzServer,
    _http: std::thread::JoinHandle<()>,
    _server: HttpServer,
    _mesh_config: testbed::mesh::TempDir,
}

async fn ext_authz_mesh() -> ExtAuthzMesh {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client"])
            .node("node-b", ["server", "waypoint"]),
    )
    .unwrap();
    let workloads = [
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("server", "demo", "server"),
        WorkloadSpec::new("waypoint", "demo", "waypoint")
            .label("gateway.networking.k8s.io/gateway-name", "waypoint"),
    ];
    let mut mesh = Mesh::start(cluster, &workloads, &["demo"]).await.unwrap();
    mesh.write_config("waypoint.yaml", CONFIG).unwrap();
    mesh.write_config("ext.yaml", EXT_AUTHZ_POLICIES).unwrap();
    let providers = |name: &str, fail_open: bool| {
        format!("- name: {name}\n  envoyExtAuthzHttp:\n    service: 127.0.0.1\n    port: 9191\n    timeout: 300ms\n    failOpen: {fail_open}\n    headersToDownstreamOnDeny: [x-reason]\n    headersToUpstreamOnAllow: [x-auth-user]\n")
    };
    let mesh_config = testbed::mesh::TempDir::new("meshconfig").unwrap();
    let path = mesh_config.path().join("mesh.yaml");
    std::fs::write(
        &path,
        format!(
            "extensionProviders:\n{}{}- name: grpc\n  envoyExtAuthzGrpc: {{service: 127.0.0.1, port: 9292, timeout: 1s}}\n",
            providers("closed", false),
            providers("open", true)
        ),
    )
    .unwrap();
    eventually(Duration::from_secs(15), "the config loaded", || async {
        mesh.config_dump("node-a").await["services"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    })
    .await;
    let http = start_ext_authz(&mesh);
    let grpc = ExtAuthzServer::start(mesh.cluster.pod("waypoint"), 9292).unwrap();
    mesh.start_waypoint_with("waypoint", "demo", "waypoint", Some(&path))
        .await
        .unwrap();
    let server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    ExtAuthzMesh {
        mesh,
        grpc,
        _http: http,
        _server: server,
        _mesh_config: mesh_config,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_external_authorization_allows_denies_and_honours_fail_open() {
    let ExtAuthzMesh { mesh, .. } = &ext_authz_mesh().await;

    assert_eq!(
        http(mesh, VIP, "GET", "/public/ext/ok", &[]),
        ("200".into(), "server GET /public/ext/ok".into())
    );
    assert_eq!(
        http(mesh, VIP, "GET", "/public/ext/deny", &[]),
        ("403".into(), "nope".into()),
        "the provider's answer reaches the client"
    );
    assert_eq!(
        http(mesh, VIP, "GET", "/public/ext/slow", &[]).0,
        "403",
        "timeout, failOpen false"
    );
    assert_eq!(
        http(mesh, VIP, "GET", "/public/open/slow", &[]).0,
        "200",
        "timeout, failOpen true"
    );
    assert_eq!(
        http(mesh, VIP, "GET", "/public/plain", &[]).0,
        "200",
        "CUSTOM applies only to its rules"
    );
    assert_eq!(
        http(mesh, VIP, "GET", "/public/ext/huge", &[]).0,
        "403",
        "an oversized answer is a failed check, failOpen false"
    );
    assert!(
        mesh.log("waypoint-waypoint").contains(&format!(
            "at most {} bytes",
            ztunnel::extauthz::MAX_RESPONSE_BYTES
        )),
        "{}",
        mesh.log("waypoint-waypoint")
    );
    // CUSTOM comes before ALLOW: an allowed provider does not bypass ALLOW rules.
    assert_eq!(http(mesh, VIP, "POST", "/public/ext/ok", &[]).0, "403");
    // As Envoy flags them: the provider's denials UAEX, the RBAC denial none.
    eventually(
        Duration::from_secs(15),
        "the denials counted with their flags",
        || async {
            let metrics = mesh.waypoint_metrics("waypoint").await;
            let denied = |flags: &str| {
                metrics.lines().any(|l| {
                    l.starts_with("istio_requests_total{")
                        && l.contains("response_code=\"403\"")
                        && l.contains(&format!("response_flags=\"{flags}\""))
                })
            };
            denied("UAEX") && denied("-")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_provider_allows_denies_and_its_failures_deny() {
    let ExtAuthzMesh { mesh, grpc, .. } = &ext_authz_mesh().await;
    assert_eq!(
        http(mesh, VIP, "GET", "/public/grpc/ok", &[]),
        ("200".into(), "server GET /public/grpc/ok".into())
    );
    assert_eq!(
        http(mesh, VIP, "GET", "/public/grpc/deny", &[]),
        ("403".into(), "grpc says no".into()),
        "the provider's status and body reach the client"
    );
    assert_eq!(
        http(mesh, VIP, "GET", "/public/grpc/teapot", &[]).0,
        "418",
        "the provider's own status"
    );
    // No decision: fail closed (the provider is not failOpen).
    assert_eq!(
        http(mesh, VIP, "GET", "/public/grpc/unavailable", &[]).0,
        "403",
        "a gRPC error status"
    );
    assert_eq!(
        http(mesh, VIP, "GET", "/public/grpc/slow", &[]).0,
        "403",
        "no answer within the timeout"
    );
    let log = mesh.log("waypoint-waypoint");
    assert!(log.contains("gRPC status Unavailable"), "{log}");
    assert!(log.contains("did not answer within 1s"), "{log}");
    // Each request was checked once: five requests, five checks.
    assert_eq!(grpc.checks().len(), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_check_request_carries_the_request_and_both_principals() {
    use testbed::ext_authz::proto::envoy::{
        config::core::v3::{address, socket_address},
        service::auth::v3::attribute_context::Peer,
    };
    let ExtAuthzMesh { mesh, grpc, .. } = &ext_authz_mesh().await;
    let (status, _) = http(
        mesh,
        VIP,
        "GET",
        "/public/grpc/ok?q=1",
        &["x-test: one", "x-test: two"],
    );
    assert_eq!(status, "200");
    let checks = grpc.checks();
    assert_eq!(checks.len(), 1, "{checks:?}");
    let attributes = checks[0].attributes.clone().unwrap();
    let request = attributes.request.unwrap().http.unwrap();
    assert_eq!(request.method, "GET");
    assert_eq!(
        request.path, "/public/grpc/ok?q=1",
        "the path with the query"
    );
    assert_eq!(request.host, VIP);
    assert_eq!(request.protocol, "HTTP/1.1");
    assert_eq!(request.headers["host"], VIP);
    assert_eq!(
        request.headers["x-test"], "one,two",
        "repeated headers joined"
    );
    let address = |peer: &Peer| match peer.address.clone().unwrap().address.unwrap() {
        address::Address::SocketAddress(socket) => {
            let Some(socket_address::PortSpecifier::PortValue(port)) = socket.port_specifier else {
                panic!("no port: {socket:?}")
            };
            (socket.address, port)
        }
    };
    let source = attributes.source.unwrap();
    assert_eq!(source.principal, "spiffe://cluster.local/ns/demo/sa/client");
    assert_eq!(
        address(&source).0,
        mesh.cluster.pod("client").ip.to_string()
    );
    let destination = attributes.destination.unwrap();
    assert_eq!(
        destination.principal, "spiffe://cluster.local/ns/demo/sa/waypoint",
        "the waypoint's own identity"
    );
    assert_eq!(address(&destination), ("10.96.0.80".to_string(), 80));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_destination_tunnel_enforces_its_l4_policy_on_the_waypoint() {
    let mesh = mesh().await;
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    // The server accepts only its waypoint: through the service (the waypoint) it
    // works, straight to the pod it does not.
    mesh.write_config(
        "l4.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-waypoint, namespace: demo}\nspec:\n  selector: {matchLabels: {app: server}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/waypoint]}}]}]\n",
    )
    .unwrap();
    let pod = format!("{}:8080", mesh.cluster.pod("server").ip);
    eventually(
        Duration::from_secs(15),
        "direct traffic refused",
        || async { http(&mesh, &pod, "GET", "/public/a", &[]).0 != "200" },
    )
    .await;
    assert_eq!(http(&mesh, VIP, "GET", "/public/a", &[]).0, "200");
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_with_prior_knowledge_is_served_too() {
    let mesh = mesh().await;
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let out = mesh
        .cluster
        .pod("client")
        .run(PROBE, ["h2", VIP, "GET", "/public/h2"])
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("status=200") && out.contains("body=server GET /public/h2"),
        "{out}"
    );
    let out = mesh
        .cluster
        .pod("client")
        .run(PROBE, ["h2", VIP, "POST", "/public/h2"])
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("status=403"));
}

/// Serves `jwks` at http://127.0.0.1:9393/jwks in the waypoint's pod, and attaches
/// to the waypoint a RequestAuthentication that fetches its keys from there.
fn serve_jwks_uri(mesh: &Mesh, jwks: String) -> std::thread::JoinHandle<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let keys = mesh
        .cluster
        .pod("waypoint")
        .spawn_task(move || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:9393")
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    jwks.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(jwks.as_bytes()).await;
            }
        })
        .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    mesh.write_config(
        "authn.yaml",
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: demo}\nspec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  jwtRules: [{issuer: https://issuer.test, jwksUri: 'http://127.0.0.1:9393/jwks'}]\n",
    )
    .unwrap();
    keys
}

#[tokio::test(flavor = "multi_thread")]
async fn jwks_are_fetched_from_jwks_uri() {
    let mesh = mesh().await;
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let issuer = ztunnel::jwt::testing::Es256Issuer::default();
    let jwks = issuer.jwks();
    let _keys = serve_jwks_uri(&mesh, jwks);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let token = issuer
        .token(&serde_json::json!({"iss": "https://issuer.test", "sub": "bob", "exp": now + 600}));
    let other = ztunnel::jwt::testing::Es256Issuer::default()
        .token(&serde_json::json!({"iss": "https://issuer.test", "sub": "eve", "exp": now + 600}));
    eventually(
        Duration::from_secs(15),
        "a token from another key refused",
        || async {
            http(
                &mesh,
                VIP,
                "GET",
                "/public/x",
                &[&format!("authorization: Bearer {other}")],
            )
            .0 == "401"
        },
    )
    .await;
    assert_eq!(
        http(
            &mesh,
            VIP,
            "GET",
            "/public/x",
            &[&format!("authorization: Bearer {token}")]
        )
        .0,
        "200"
    );
}

/// A test CA: (its root PEM, a server chain PEM and key PEM for 127.0.0.1).
fn tls_for_localhost() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::default();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root_pem = root.self_signed(&root_key).unwrap().pem();
    let issuer = Issuer::new(root, root_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
    let chain = leaf.signed_by(&key, &issuer).unwrap().pem();
    (root_pem, chain, key.serialize_pem())
}

/// Serves `jwks` at https://127.0.0.1:`port`/jwks in the waypoint's pod with the
/// certificate `chain`.
fn serve_jwks_https(
    mesh: &Mesh,
    port: u16,
    jwks: String,
    (chain, key): (String, String),
) -> std::thread::JoinHandle<()> {
    let config = rustls::ServerConfig::builder_with_provider(ztunnel::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            ztunnel::tls::parse_certs(&chain).unwrap(),
            ztunnel::tls::parse_key(&key).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let keys = mesh
        .cluster
        .pod("waypoint")
        .spawn_task(move || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                // A client that refuses our certificate ends the handshake.
                let Ok(mut stream) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    jwks.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(jwks.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        })
        .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    keys
}

#[tokio::test(flavor = "multi_thread")]
async fn jwks_are_fetched_over_https_from_trusted_servers_only() {
    let (root, chain, key) = tls_for_localhost();
    // The waypoint trusts the system's roots: here, SSL_CERT_FILE.
    let roots = testbed::mesh::TempDir::new("roots").unwrap();
    let roots_file = roots.path().join("roots.pem");
    std::fs::write(&roots_file, root).unwrap();
    let mesh = mesh_with_env(
        workloads(),
        CONFIG,
        &[("SSL_CERT_FILE", roots_file.to_str().unwrap())],
    )
    .await;
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let (trusted, untrusted) = (
        ztunnel::jwt::testing::Es256Issuer::default(),
        ztunnel::jwt::testing::Es256Issuer::default(),
    );
    let _trusted = serve_jwks_https(&mesh, 9394, trusted.jwks(), (chain, key));
    // The attack: a key server whose certificate no trusted root signed.
    let (_, chain, key) = tls_for_localhost();
    let _untrusted = serve_jwks_https(&mesh, 9395, untrusted.jwks(), (chain, key));
    mesh.write_config(
        "authn.yaml",
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: demo}\nspec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  jwtRules:\n  - {issuer: https://issuer.test, jwksUri: 'https://127.0.0.1:9394/jwks'}\n  - {issuer: https://untrusted.test, jwksUri: 'https://127.0.0.1:9395/jwks'}\n",
    )
    .unwrap();
    let token = |issuer: &ztunnel::jwt::testing::Es256Issuer, iss: &str| {
        let mut claims = claims(600);
        claims["iss"] = iss.into();
        format!("authorization: Bearer {}", issuer.token(&claims))
    };
    // Once the rules are in force, a token signed by another key is refused.
    let forged = token(&untrusted, "https://issuer.test");
    eventually(
        Duration::from_secs(15),
        "a forged token refused",
        || async { http(&mesh, VIP, "GET", "/public/x", &[&forged]).0 == "401" },
    )
    .await;
    let good = token(&trusted, "https://issuer.test");
    assert_eq!(http(&mesh, VIP, "GET", "/public/x", &[&good]).0, "200");
    let bad = token(&untrusted, "https://untrusted.test");
    assert_eq!(http(&mesh, VIP, "GET", "/public/x", &[&bad]).0, "401");
    let log = mesh.log("waypoint-waypoint");
    assert!(
        log.contains("fetching the JWKS failed") && log.contains("https://127.0.0.1:9395/jwks"),
        "{log}"
    );
}

/// Requests a waypoint pod answered 200, as its metrics count them.
async fn answered_ok(mesh: &Mesh, pod: &str) -> u64 {
    mesh.waypoint_metrics(pod)
        .await
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_to_a_waypoint_take_its_pods_in_turn() {
    let mut workloads = workloads();
    workloads.push(
        WorkloadSpec::new("waypoint-2", "demo", "waypoint")
            .label("gateway.networking.k8s.io/gateway-name", "waypoint"),
    );
    let mut mesh = mesh_from(workloads, CONFIG).await;
    mesh.start_waypoint("waypoint-2", "demo", "waypoint")
        .await
        .unwrap();
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let pods = ["waypoint", "waypoint-2"];
    let mut before = Vec::new();
    for pod in pods {
        before.push(answered_ok(&mesh, pod).await);
    }
    // One connection each: the client's tunnel takes the waypoint's pods in turn.
    for i in 0..10 {
        let path = format!("/public/{i}");
        assert_eq!(http(&mesh, VIP, "GET", &path, &[]).0, "200", "{path}");
    }
    let answered = || async {
        let mut since = Vec::new();
        for (pod, before) in pods.iter().zip(&before) {
            since.push(answered_ok(&mesh, pod).await.saturating_sub(*before));
        }
        since
    };
    eventually(Duration::from_secs(15), "10 requests counted", || async {
        answered().await.iter().sum::<u64>() == 10
    })
    .await;
    let counted = answered().await;
    assert_eq!(counted, [5, 5], "round robin over the two waypoint pods");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waypoint_whose_pod_is_not_in_the_config_yet_waits_for_it() {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client"])
            .node("node-b", ["server", "late"]),
    )
    .unwrap();
    let workloads = [
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("server", "demo", "server"),
    ];
    let mut mesh = Mesh::start(cluster, &workloads, &["demo"]).await.unwrap();
    mesh.write_config("waypoint.yaml", CONFIG).unwrap();
    // The waypoint's pod reaches the config only once the waypoint says it waits.
    let late = WorkloadSpec::new("late", "demo", "waypoint")
        .label("gateway.networking.k8s.io/gateway-name", "waypoint");
    let pod_yaml = mesh.workload_yaml(&late).unwrap();
    let write = mesh.config_writer();
    let log = mesh.log_file("waypoint-late");
    let writer = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("waiting for this pod")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the waypoint never said it waits"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        write("late.yaml", &pod_yaml).unwrap();
    });
    mesh.start_waypoint("late", "demo", "waypoint")
        .await
        .unwrap();
    writer.join().unwrap();

    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    assert_eq!(
        http(&mesh, VIP, "POST", "/public/a", &[]),
        ("403".into(), "RBAC: access denied".into()),
        "the waypoint serves, with its policy"
    );
}

/// Service demo/web (10.96.0.81:80 → the server's 8080) bound to the waypoint, and
/// demo/direct (10.96.0.82:80), the same pods without a waypoint.
const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.81
  selector: {app: server}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: direct, namespace: demo}
spec:
  clusterIP: 10.96.0.82
  selector: {app: server}
  ports: [{port: 80, targetPort: 8080}]
"#;
const WEB_VIP: &str = "10.96.0.81:80";

/// The server's L4 policy: only its waypoint may connect.
const ONLY_WAYPOINT: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-waypoint, namespace: demo}\nspec:\n  selector: {matchLabels: {app: server}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/waypoint]}}]}]\n";

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
}

/// What a workload of the mesh gets by speaking HBONE to the waypoint itself, from
/// the client pod's address, with a certificate for `spiffe://cluster.local/ns/demo/sa/<sa>`
/// (any pod can get one for its own service account): CONNECT to `authority`
/// (with `forwarded`, if given), then `request`. Ok: the raw HTTP response; Err:
/// the CONNECT was refused.
fn hbone_to_waypoint(
    mesh: &Mesh,
    sa: &str,
    authority: &str,
    forwarded: Option<&str>,
    request: &str,
) -> Result<String, String> {
    let waypoint = "spiffe://cluster.local/ns/demo/sa/waypoint";
    hbone_to(mesh, waypoint, sa, authority, forwarded, request)
}

/// [`hbone_to_waypoint`], to a waypoint with this identity.
fn hbone_to(
    mesh: &Mesh,
    waypoint_identity: &str,
    sa: &str,
    authority: &str,
    forwarded: Option<&str>,
    request: &str,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let id: ztunnel::identity::Identity = waypoint_identity.parse().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let waypoint_pod = mesh.cluster.pod("waypoint");
    let cert = std::sync::Arc::new(
        mesh.ca
            .forge(
                &format!("spiffe://cluster.local/ns/demo/sa/{sa}"),
                now - time::Duration::minutes(1),
                now + time::Duration::hours(1),
            )
            .unwrap(),
    );
    let waypoint = std::net::SocketAddr::new(waypoint_pod.ip.into(), 15008);
    let authority: std::net::SocketAddr = authority.parse().unwrap();
    let (forwarded, request) = (forwarded.map(str::to_owned), request.to_owned());
    mesh.cluster
        .pod("client")
        .spawn_task(move || async move {
            let pool = ztunnel::proxy::pool::Pool::new(Default::default());
            let mut headers = http::HeaderMap::new();
            if let Some(f) = forwarded {
                headers.insert("forwarded", f.parse().unwrap());
            }
            let (mut io, _guard) = pool
                .connect(&cert, &id, waypoint, authority, headers)
                .await
                .map_err(|e| format!("{e:#}"))?;
            io.write_all(request.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut response = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut response))
                .await
                .map_err(|_| "no response".to_owned())?
                .map_err(|e| e.to_string())?;
            Ok(String::from_utf8_lossy(&response).into_owned())
        })
        .unwrap()
        .join()
        .unwrap()
}

/// `ztunnel policy check` on the mesh's own config directory, from demo/client.
fn policy_check(mesh: &Mesh, to: &str, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(testbed::mesh::ztunnel_binary())
        .args(["policy", "check", "--config"])
        .arg(mesh.config.path())
        .args(["--from", "demo/client", "--to", to])
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

fn status_of(response: &str) -> &str {
    response.split_whitespace().nth(1).unwrap_or("none")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_address_sent_to_the_waypoint_is_refused() {
    // The attack: any pod holds a mesh certificate for its own service account. It
    // asks the waypoint for the backend pod (or a Service not bound to this
    // waypoint) instead of the Service, hoping to skip the Service's L7 policy
    // (here the only one: GET /public/* and /health) and reach the pod as the
    // waypoint, which the pod's L4 policy trusts.
    let config = CONFIG.replace(
        "metadata: {name: public-gets, namespace: demo}\nspec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]",
        "metadata: {name: public-gets, namespace: demo}\nspec:\n  targetRefs: [{kind: Service, group: \"\", name: server}]",
    );
    assert_ne!(config, CONFIG);
    let mesh = mesh_from(workloads(), &config).await;
    let server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    mesh.write_config("web.yaml", WEB).unwrap();
    mesh.write_config("l4.yaml", ONLY_WAYPOINT).unwrap();
    eventually(
        Duration::from_secs(15),
        "the server served through the waypoint, web.yaml loaded",
        || async {
            [VIP, WEB_VIP].iter().all(|vip| {
                hbone_to_waypoint(&mesh, "client", vip, None, &get("/public/a"))
                    .is_ok_and(|r| status_of(&r) == "200")
            })
        },
    )
    .await;
    let pod = format!("{}:8080", mesh.cluster.pod("server").ip);
    for target in [pod.as_str(), "10.96.0.82:80"] {
        let refused = hbone_to_waypoint(&mesh, "client", target, None, &get("/admin"));
        assert!(
            refused.as_ref().is_err_and(|e| e.contains("403")),
            "{target}: {refused:?}"
        );
    }
    // Through the bound Service the Service's policy decides.
    let response = hbone_to_waypoint(&mesh, "client", VIP, None, &get("/admin")).unwrap();
    assert_eq!(status_of(&response), "403", "{response}");
    assert!(
        !server.requests().iter().any(|r| r.contains("/admin")),
        "{:?}",
        server.requests()
    );
    let metrics = mesh.waypoint_metrics("waypoint").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "ztunnel_waypoint_connects_refused_total{reason=\"not_bound\"} 2"),
        "{metrics}"
    );
    let log = mesh.log("waypoint-waypoint");
    assert!(
        log.contains("workload demo/server is not bound to this waypoint")
            && log.contains("service demo/direct is not bound to this waypoint"),
        "{log}"
    );
    // policy check agrees: the pod's own address is the tunnel's to judge, and it
    // admits only the waypoint.
    let (code, out) = policy_check(&mesh, "demo/server:8080", &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("layer: ztunnel, policy: -"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_bound_to_the_waypoint_gets_its_services_policies_too() {
    // waypoint-for: all, and the server pod itself bound: its pod-addressed traffic
    // goes through the waypoint, where the Service's DENY (x-block) still applies.
    let mut workloads = workloads();
    workloads[1] = workloads[1]
        .clone()
        .label("istio.io/use-waypoint", "waypoint");
    let config = CONFIG.replace(
        "metadata: {name: waypoint, namespace: demo}",
        "metadata: {name: waypoint, namespace: demo, labels: {istio.io/waypoint-for: all}}",
    );
    let mesh = mesh_from(workloads, &config).await;
    let server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let pod = format!("{}:8080", mesh.cluster.pod("server").ip);
    assert_eq!(http(&mesh, &pod, "GET", "/public/a", &[]).0, "200");
    assert_eq!(
        http(&mesh, &pod, "GET", "/public/b", &["x-block: yes"]).0,
        "403",
        "the Service's DENY applies to its pod's address"
    );
    assert!(
        !server.requests().iter().any(|r| r.contains("/public/b")),
        "{:?}",
        server.requests()
    );
    let (code, out) = policy_check(
        &mesh,
        "demo/server:8080",
        &[
            "--method",
            "GET",
            "--path",
            "/public/b",
            "--header",
            "x-block=yes",
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("DENY (layer: waypoint, policy: demo/no-blocked)"),
        "{out}"
    );
    let (code, out) = policy_check(
        &mesh,
        "demo/server:8080",
        &["--method", "GET", "--path", "/public/a"],
    );
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_ip_is_the_clients_address_and_cannot_be_forged() {
    let mesh = mesh().await;
    let server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let (client_ip, server_ip) = (mesh.cluster.pod("client").ip, mesh.cluster.pod("server").ip);
    let policy = |name: &str, path: &str, when: &str| {
        format!("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  rules: [{{to: [{{operation: {{paths: ['{path}']}}}}], when: [{when}]}}]\n")
    };
    mesh.write_config("web.yaml", WEB).unwrap();
    mesh.write_config(
        "remote-ip.yaml",
        &[
            policy(
                "server-ip",
                "/ip/*",
                &format!("{{key: remote.ip, values: ['{server_ip}/32']}}"),
            ),
            policy(
                "nobody",
                "/nobody/*",
                "{key: remote.ip, notValues: [0.0.0.0/0]}",
            ),
            policy(
                "client-ip",
                "/mine/*",
                &format!("{{key: remote.ip, values: ['{client_ip}']}}"),
            ),
        ]
        .concat(),
    )
    .unwrap();
    eventually(
        Duration::from_secs(15),
        "the client's own address allowed",
        || async { http(&mesh, VIP, "GET", "/mine/a", &[]).0 == "200" },
    )
    .await;
    assert_eq!(http(&mesh, VIP, "GET", "/ip/a", &[]).0, "403");
    assert_eq!(
        http(
            &mesh,
            VIP,
            "GET",
            "/ip/a",
            &[&format!("x-forwarded-for: {server_ip}")]
        )
        .0,
        "403",
        "X-Forwarded-For is not believed without numTrustedProxies"
    );
    assert_eq!(http(&mesh, VIP, "GET", "/nobody/a", &[]).0, "403");
    // A forwarded header naming the server's address, from a peer whose identity
    // is not the server's: not believed either.
    let response = hbone_to_waypoint(
        &mesh,
        "client",
        VIP,
        Some(&format!("for=\"{server_ip}:4000\"")),
        &get("/ip/a"),
    )
    .unwrap();
    assert_eq!(status_of(&response), "403", "{response}");
    assert!(
        server
            .requests()
            .iter()
            .all(|r| !r.contains("/ip/") && !r.contains("/nobody/")),
        "{:?}",
        server.requests()
    );
    for (path, code, extra) in [
        ("/mine/a", 0, None),
        ("/ip/a", 1, None),
        ("/ip/a", 1, Some(format!("x-forwarded-for={server_ip}"))),
        ("/nobody/a", 1, None),
    ] {
        let mut args = vec!["--method", "GET", "--path", path];
        if let Some(h) = &extra {
            args.extend(["--header", h.as_str()]);
        }
        let (got, out) = policy_check(&mesh, "demo/web:80", &args);
        assert_eq!(got, code, "{path} {extra:?}: {out}");
        assert!(out.contains("layer: waypoint"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn encoded_and_dotted_paths_cannot_bypass_a_deny() {
    let mesh = mesh().await;
    let server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    mesh.write_config("web.yaml", WEB).unwrap();
    mesh.write_config(
        "no-admin.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: demo}\nspec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  action: DENY\n  rules: [{to: [{operation: {paths: ['/public/admin*']}}]}]\n",
    )
    .unwrap();
    eventually(Duration::from_secs(15), "the DENY loaded", || async {
        http(&mesh, VIP, "GET", "/public/admin", &[]).0 == "403"
    })
    .await;
    // (Before the DENY loaded, /public/admin was allowed.)
    let before = server.requests().len();
    for path in [
        "/public/./admin",
        "/public//admin",
        "//public/admin",
        "/public/%61dmin",
        "/public/x/../admin",
        "/public/%2e%2e/public/admin",
        "/public/x/%2E%2E/admin/users",
    ] {
        assert_eq!(
            http(&mesh, VIP, "GET", path, &[]),
            ("403".into(), "RBAC: access denied".into()),
            "{path}"
        );
    }
    for path in [
        "/public%2Fadmin",
        "/public/%2fadmin",
        "/public/a%5Cadmin",
        "/public/%00",
    ] {
        assert_eq!(http(&mesh, VIP, "GET", path, &[]).0, "400", "{path}");
    }
    // What is allowed reaches the application normalized: it sees what policy saw.
    assert_eq!(
        http(&mesh, VIP, "GET", "/public/./ok//x/../y?q=%2F", &[]),
        ("200".into(), "server GET /public/ok/y?q=%2F".into())
    );
    let seen = server.requests().split_off(before);
    assert!(!seen.iter().any(|r| r.contains("admin")), "{seen:?}");
    for (path, code, decision) in [
        ("/public/./admin", 1, "DENY"),
        ("/public/%61dmin", 1, "DENY"),
        ("/public%2Fadmin", 1, "400"),
        ("/public/./ok", 0, "ALLOW"),
    ] {
        let (got, out) = policy_check(&mesh, "demo/web:80", &["--method", "GET", "--path", path]);
        assert_eq!(got, code, "{path}: {out}");
        assert!(out.starts_with(decision), "{path}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_waypoint_forwards_the_clients_address_in_forwarded() {
    // demo/fake is a workload no tunnel serves (declared on another node): this test
    // answers its HBONE port with a certificate of its identity and echoes the
    // `forwarded` header the waypoint sends.
    let mut workloads = workloads();
    workloads.push(WorkloadSpec::new("fake", "demo", "fake").declared_on("node-z"));
    let config = format!(
        "{CONFIG}---\napiVersion: v1\nkind: Service\nmetadata: {{name: fake, namespace: demo, labels: {{istio.io/use-waypoint: waypoint}}}}\nspec:\n  clusterIP: 10.96.0.83\n  selector: {{app: fake}}\n  ports: [{{port: 80, targetPort: 8080}}]\n"
    );
    let mesh = mesh_from(workloads, &config).await;
    let now = time::OffsetDateTime::now_utc();
    let cert = mesh
        .ca
        .forge(
            "spiffe://cluster.local/ns/demo/sa/fake",
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
        .unwrap();
    let tls = cert.server_config().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let _fake = mesh
        .cluster
        .pod("fake")
        .spawn_task(move || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("0.0.0.0:15008")
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(stream) = acceptor.accept(tcp).await else {
                    continue;
                };
                let service = hyper::service::service_fn(
                    |mut req: http::Request<hyper::body::Incoming>| async move {
                        let forwarded = req
                            .headers()
                            .get("forwarded")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("none")
                            .to_owned();
                        let upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let mut io = hyper_util::rt::TokioIo::new(upgrade.await.unwrap());
                            let mut buf = [0u8; 4096];
                            let _ = io.read(&mut buf).await;
                            let response = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{forwarded}",
                                forwarded.len()
                            );
                            let _ = io.write_all(response.as_bytes()).await;
                        });
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Empty::<bytes::Bytes>::new(),
                        ))
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        })
        .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let (status, body) = http(&mesh, "10.96.0.83:80", "GET", "/public/fwd", &[]);
    assert_eq!(status, "200", "{body}");
    let client_ip = mesh.cluster.pod("client").ip.to_string();
    let (ip, port) = ztunnel::forwarded::parse_for(&body)
        .map(|(ip, port)| (ip.to_string(), port))
        .unwrap_or_default();
    assert!(
        body.starts_with(&format!("for=\"{client_ip}:")) && ip == client_ip && port.is_some(),
        "the client's address, quoted with its port: {body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cross_namespace_waypoint_binding_needs_the_gateways_consent() {
    // The waypoint is infra's; demo binds its Service to it. Until the Gateway's
    // HBONE listener admits demo, the binding is refused: reported, and the
    // waypoint does not serve demo's Service.
    let workloads = vec![
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("server", "demo", "server"),
        WorkloadSpec::new("waypoint", "infra", "waypoint")
            .label("gateway.networking.k8s.io/gateway-name", "waypoint"),
    ];
    let gateway = |allowed: &str| {
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: infra}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE{allowed}}}]\n")
    };
    let config = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo, labels: {{istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: infra}}}}\nspec:\n  clusterIP: 10.96.0.80\n  selector: {{app: server}}\n  ports: [{{port: 80, targetPort: 8080}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: no-blocked, namespace: infra}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  action: DENY\n  rules: [{{to: [{{operation: {{paths: [/blocked]}}}}]}}]\n",
        gateway("")
    );
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client"])
            .node("node-b", ["server", "waypoint"]),
    )
    .unwrap();
    let mut mesh = Mesh::start(cluster, &workloads, &["demo"]).await.unwrap();
    mesh.write_config("waypoint.yaml", &config).unwrap();
    eventually(Duration::from_secs(15), "the refusal counted", || async {
        mesh.metrics("node-a")
            .await
            .lines()
            .any(|l| l == "ztunnel_waypoint_bindings_refused 1")
    })
    .await;
    mesh.start_waypoint("waypoint", "infra", "waypoint")
        .await
        .unwrap();
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    assert!(
        mesh.log("node-a")
            .contains("waypoint infra/waypoint does not admit namespace demo"),
        "{}",
        mesh.log("node-a")
    );
    let refused = hbone_to(
        &mesh,
        "spiffe://cluster.local/ns/infra/sa/waypoint",
        "client",
        VIP,
        None,
        &get("/x"),
    );
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("403")),
        "{refused:?}"
    );
    // Not bound: its traffic does not go through that waypoint.
    assert_eq!(http(&mesh, VIP, "GET", "/blocked", &[]).0, "200");
    let (code, out) = policy_check(&mesh, "demo/web:80", &["--path", "/blocked"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "note: Service demo/web: waypoint infra/waypoint does not admit namespace demo"
        ),
        "{out}"
    );

    // The Gateway admits namespaces labelled team=demo, and demo is.
    mesh.write_config(
        "ns-demo.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels: {istio.io/dataplane-mode: ambient, team: demo}\n",
    )
    .unwrap();
    mesh.write_config(
        "waypoint.yaml",
        &config.replace(
            &gateway(""),
            &gateway(", allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {team: demo}}}}"),
        ),
    )
    .unwrap();
    eventually(Duration::from_secs(15), "the waypoint enforces", || async {
        http(&mesh, VIP, "GET", "/blocked", &[]).0 == "403"
    })
    .await;
    assert!(mesh
        .metrics("node-a")
        .await
        .lines()
        .any(|l| l == "ztunnel_waypoint_bindings_refused 0"));
    let (code, out) = policy_check(&mesh, "demo/web:80", &["--path", "/blocked"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("DENY (layer: waypoint, policy: infra/no-blocked)"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_jwks_is_refused_not_read_whole() {
    let mesh = mesh().await;
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let issuer = ztunnel::jwt::testing::Es256Issuer::default();
    // Valid keys, padded past 1 MiB with whitespace.
    let jwks = format!(
        "{}{}",
        issuer.jwks(),
        " ".repeat(ztunnel::jwt::MAX_JWKS_BYTES)
    );
    let _keys = serve_jwks_uri(&mesh, jwks);
    let token = issuer.token(&claims(600));
    eventually(Duration::from_secs(15), "the token refused", || async {
        http(
            &mesh,
            VIP,
            "GET",
            "/public/x",
            &[&format!("authorization: Bearer {token}")],
        )
        .0 == "401"
    })
    .await;
    let log = mesh.log("waypoint-waypoint");
    assert!(log.contains("at most 1048576 bytes"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mesh_config_chooses_path_normalization_and_trusted_proxies() {
    let cluster = Cluster::new(
        &ClusterSpec::new()
            .node("node-a", ["client"])
            .node("node-b", ["server", "waypoint"]),
    )
    .unwrap();
    let mut mesh = Mesh::start(cluster, &workloads(), &["demo"]).await.unwrap();
    let server_ip = mesh.cluster.pod("server").ip;
    let policies = format!(
        "{CONFIG}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: no-admin, namespace: demo}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  action: DENY\n  rules: [{{to: [{{operation: {{paths: ['/public/admin*']}}}}]}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: server-ip, namespace: demo}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  rules: [{{to: [{{operation: {{paths: ['/ip/*']}}}}], when: [{{key: remote.ip, values: ['{server_ip}']}}]}}]\n"
    );
    mesh.write_config("waypoint.yaml", &policies).unwrap();
    let dir = testbed::mesh::TempDir::new("meshconfig").unwrap();
    let mesh_yaml = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh_yaml,
        "pathNormalization: {normalization: DECODE_AND_MERGE_SLASHES}\ndefaultConfig: {gatewayTopology: {numTrustedProxies: 1}}\n",
    )
    .unwrap();
    eventually(Duration::from_secs(15), "the config loaded", || async {
        mesh.config_dump("node-a").await["services"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    })
    .await;
    mesh.start_waypoint_with("waypoint", "demo", "waypoint", Some(&mesh_yaml))
        .await
        .unwrap();
    let server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    // An encoded slash is decoded (not refused), then judged: still denied.
    assert_eq!(http(&mesh, VIP, "GET", "/public%2Fadmin", &[]).0, "403");
    assert_eq!(
        http(&mesh, VIP, "GET", "/public%2Fok", &[]),
        ("200".into(), "server GET /public/ok".into())
    );
    // One trusted proxy: the last X-Forwarded-For hop is the client's address.
    let xff = format!("x-forwarded-for: 6.6.6.6, {server_ip}");
    assert_eq!(http(&mesh, VIP, "GET", "/ip/a", &[&xff]).0, "200");
    assert_eq!(
        http(
            &mesh,
            VIP,
            "GET",
            "/ip/a",
            &[&format!("x-forwarded-for: {server_ip}, 6.6.6.6")]
        )
        .0,
        "403",
        "what the client put further left is not believed"
    );
    assert!(!server.requests().iter().any(|r| r.contains("admin")));
    // policy check, given the same MeshConfig, agrees (demo/web: the same pods
    // through the same waypoint).
    mesh.write_config("web.yaml", WEB).unwrap();
    let forwarded_for = |hops: &str| format!("x-forwarded-for={hops}");
    for (path, header, code) in [
        ("/public%2Fadmin", None, 1),
        ("/public%2Fok", None, 0),
        (
            "/ip/a",
            Some(forwarded_for(&format!("6.6.6.6, {server_ip}"))),
            0,
        ),
        (
            "/ip/a",
            Some(forwarded_for(&format!("{server_ip}, 6.6.6.6"))),
            1,
        ),
    ] {
        let mut args = vec!["--mesh-config", mesh_yaml.to_str().unwrap(), "--path", path];
        if let Some(h) = &header {
            args.extend(["--header", h.as_str()]);
        }
        let (got, out) = policy_check(&mesh, "demo/web:80", &args);
        assert_eq!(got, code, "{path} {header:?}: {out}");
        assert!(out.contains("layer: waypoint"), "{out}");
    }
}

/// Two endpoints (echo-1, echo-2) of three Services bound to the waypoint, no
/// ALLOW policy: `grpc` (port named grpc), `grpc-locked` (the same pods, its Unary
/// method denied), `web` (port 80 unnamed, 81 named http, 82 named http2-web),
/// and `idle` (echo-2 only). DENY rules: Unary on `grpc-locked`, `/secret*` on `web`.
const L7_CONFIG: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.81
  selector: {app: echo}
  ports: [{name: grpc, port: 9000, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc-locked, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.84
  selector: {app: echo}
  ports: [{port: 9000, targetPort: 9000, appProtocol: grpc}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.82
  selector: {app: echo}
  ports:
  - {port: 80, targetPort: 9000}
  - {name: http, port: 81, targetPort: 9000}
  - {name: http2-web, port: 82, targetPort: 9000}
  - {name: tcp-web, port: 83, targetPort: 9000}
---
apiVersion: v1
kind: Service
metadata: {name: idle, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.85
  selector: {role: idle}
  ports: [{port: 80, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: raw, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.86
  selector: {app: echo}
  ports:
  - {name: tcp-web, port: 80, targetPort: 9000}
  - {port: 3306, targetPort: 9100, appProtocol: mysql}
  - {name: greeter, port: 3307, targetPort: 9100}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-unary, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: grpc-locked}]
  action: DENY
  rules: [{to: [{operation: {paths: [/testbed.echo.Echo/Unary]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-secret, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/secret*"]}}]}]
"#;

async fn l7_mesh() -> Mesh {
    l7_mesh_args(&[]).await
}

async fn l7_mesh_args(args: &[&str]) -> Mesh {
    let workloads = vec![
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("echo-1", "demo", "echo").label("app", "echo"),
        WorkloadSpec::new("echo-2", "demo", "echo")
            .label("app", "echo")
            .label("role", "idle"),
        WorkloadSpec::new("waypoint", "demo", "waypoint")
            .label("gateway.networking.k8s.io/gateway-name", "waypoint"),
    ];
    mesh_from_args(workloads, L7_CONFIG, args).await
}

fn probe(mesh: &Mesh, args: &[&str]) -> String {
    let out = mesh.cluster.pod("client").run(PROBE, args).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|l| l.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {out}"))
}

fn grpc(mesh: &Mesh, target: &str, call: &str, count: u32, code: i32) -> String {
    probe(
        mesh,
        &[
            "grpc",
            target,
            call,
            "hello",
            &count.to_string(),
            &code.to_string(),
        ],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_calls_pass_the_waypoint_with_their_status_in_trailers() {
    let mesh = l7_mesh().await;
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    let _echo2 = L7Server::start(mesh.cluster.pod("echo-2"), 9000).unwrap();
    const GRPC: &str = "10.96.0.81:9000";

    let out = grpc(&mesh, GRPC, "unary", 0, 0);
    assert_eq!(field(&out, "status"), "0", "{out}");
    assert!(field(&out, "reply").ends_with(":hello:0"), "{out}");
    // A status the server chose (trailers-only) reaches the client.
    let out = grpc(&mesh, GRPC, "unary", 0, 5);
    assert_eq!(field(&out, "status"), "5", "NOT_FOUND: {out}");
    assert_eq!(field(&out, "message"), "the client asked for 5", "{out}");
    // Server streaming: every message, then the status in the trailers.
    let out = grpc(&mesh, GRPC, "stream", 3, 0);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("reply=")).count(),
        3,
        "{out}"
    );
    assert_eq!(field(&out, "status"), "0", "{out}");
    let out = grpc(&mesh, GRPC, "stream", 3, 10);
    let replies: Vec<&str> = out.lines().filter(|l| l.starts_with("reply=")).collect();
    assert_eq!(replies.len(), 3, "{out}");
    assert!(replies[2].ends_with(":hello:2"), "{out}");
    assert_eq!(
        field(&out, "status"),
        "10",
        "ABORTED after the messages: {out}"
    );
    assert_eq!(field(&out, "message"), "the client asked for 10", "{out}");

    // A DENY on a method's path: the gRPC client gets PERMISSION_DENIED (HTTP 200,
    // grpc-status 7, as Istio's waypoint answers), the other method passes.
    let out = grpc(&mesh, "10.96.0.84:9000", "unary", 0, 0);
    assert_eq!(field(&out, "status"), "7", "{out}");
    assert_eq!(field(&out, "message"), "RBAC: access denied", "{out}");
    let out = grpc(&mesh, "10.96.0.84:9000", "stream", 2, 0);
    assert_eq!(field(&out, "status"), "0", "{out}");
    assert!(
        mesh.log("waypoint-waypoint").contains("demo/no-unary"),
        "{}",
        mesh.log("waypoint-waypoint")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_protocol_follows_the_service_port_else_the_request() {
    let mesh = l7_mesh().await;
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    let _echo2 = L7Server::start(mesh.cluster.pod("echo-2"), 9000).unwrap();
    let version = |kind: &str, port: u16| {
        let out = probe(&mesh, &[kind, &format!("10.96.0.82:{port}"), "GET", "/v"]);
        assert_eq!(field(&out, "status"), "200", "{kind} to port {port}: {out}");
        field(&out, "body")
            .split(' ')
            .nth(1)
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(
        version("http", 80),
        "HTTP/1.1",
        "undeclared: the client's protocol"
    );
    assert_eq!(
        version("h2", 80),
        "HTTP/2.0",
        "undeclared: the client's protocol"
    );
    assert_eq!(version("h2", 81), "HTTP/1.1", "a port named http");
    assert_eq!(version("http", 82), "HTTP/2.0", "a port named http2-*");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_http2_streams_on_one_connection_are_served_concurrently_and_balanced() {
    // The L7 mesh with a third endpoint of the Services selecting app=echo.
    let workloads = vec![
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("echo-1", "demo", "echo").label("app", "echo"),
        WorkloadSpec::new("echo-2", "demo", "echo").label("app", "echo"),
        WorkloadSpec::new("echo-3", "demo", "echo").label("app", "echo"),
        WorkloadSpec::new("waypoint", "demo", "waypoint")
            .label("gateway.networking.k8s.io/gateway-name", "waypoint"),
    ];
    let mesh = mesh_from(workloads, L7_CONFIG).await;
    let _servers: Vec<L7Server> = ["echo-1", "echo-2", "echo-3"]
        .iter()
        .map(|pod| L7Server::start(mesh.cluster.pod(pod), 9000).unwrap())
        .collect();
    // Each answer takes 300 ms at the server: one after another, 100 would take
    // 30 s; together about one request's time.
    let out = probe(
        &mesh,
        &["h2many", "10.96.0.82:80", "100", "/slow?delay=300"],
    );
    assert_eq!(field(&out, "ok"), "101", "{out}");
    let single: u64 = field(&out, "single_ms").parse().unwrap();
    let total: u64 = field(&out, "total_ms").parse().unwrap();
    assert!(single >= 300, "{out}");
    assert!(
        total < 10 * single,
        "100 streams took {total} ms, one took {single} ms: not concurrent\n{out}"
    );
    // Balanced per request, not per downstream connection: every endpoint served
    // requests of this one connection.
    for pod in ["echo-1", "echo-2", "echo-3"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("body={pod} HTTP/2.0 GET /slow count="))),
            "{pod} served none: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_endpoint_is_retried_on_another_and_none_reachable_is_503_uf() {
    let mesh = l7_mesh().await;
    // echo-2 runs no server: its tunnel refuses the connection.
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    let out = probe(&mesh, &["h2many", "10.96.0.82:80", "20", "/retry"]);
    assert_eq!(
        field(&out, "ok"),
        "21",
        "every request reached echo-1: {out}"
    );
    assert_eq!(
        field(&out, "body"),
        "echo-1 HTTP/2.0 GET /retry count=21",
        "{out}"
    );
    let out = grpc(&mesh, "10.96.0.81:9000", "unary", 0, 0);
    assert_eq!(field(&out, "status"), "0", "{out}");
    assert!(
        mesh.log("waypoint-waypoint").contains("endpoint=echo-2"),
        "the failure is logged: {}",
        mesh.log("waypoint-waypoint")
    );
    // No endpoint reachable: 503, flagged UF (connect failure).
    let (status, body) = http(&mesh, "10.96.0.85:80", "GET", "/none", &[]);
    assert_eq!(status, "503", "{body}");
    assert!(
        body.contains("reset reason: connection failure (UF)"),
        "{body}"
    );
    let out = grpc(&mesh, "10.96.0.85:80", "unary", 0, 0);
    assert_eq!(field(&out, "status"), "14", "UNAVAILABLE: {out}");
    eventually(
        Duration::from_secs(15),
        "the 503 counted with its flag",
        || async {
            mesh.waypoint_metrics("waypoint").await.lines().any(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("response_code=\"503\"")
                    && l.contains("response_flags=\"UF\"")
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_http1_connection_is_reused_once_its_response_is_read_and_closed_if_left_unread(
) {
    let mesh = l7_mesh().await;
    // `idle` has one endpoint, echo-2: every request goes to it, from the same
    // client, so on the waypoint's pooled connections of one key.
    let echo2 = L7Server::start(mesh.cluster.pod("echo-2"), 9000).unwrap();
    // The endpoint's view of the connection a request came on (each upstream
    // connection of the waypoint is a connection of its own there).
    let conn = |method: &str| {
        let (status, body) = http(&mesh, "10.96.0.85:80", method, "/conn", &[]);
        assert_eq!(status, "200", "{body}");
        body.split_once("conn=").map(|(_, c)| c.to_owned())
    };
    // Each request on a downstream connection of its own: the pool is shared.
    let first = conn("GET").expect("the endpoint says its connection");
    // A response without a body (to HEAD) ends as soon as it is read: its
    // connection goes back to the pool too.
    assert_eq!(conn("HEAD"), None, "no body to HEAD");
    assert_eq!(
        conn("GET").as_deref(),
        Some(first.as_str()),
        "a response read to the end (and one without a body) leaves its connection for the next request"
    );
    assert_eq!(echo2.closed(), 0);
    // A response the client leaves unread: its connection cannot carry another
    // request, so it is closed, not pooled.
    let out = probe(&mesh, &["httpstop", "10.96.0.85:80", "/big?bytes=67108864"]);
    assert_eq!(field(&out, "status"), "200", "{out}");
    eventually(
        Duration::from_secs(15),
        "the connection of the unread response closed",
        || async { echo2.closed() == 1 },
    )
    .await;
    let next = conn("GET").expect("the endpoint says its connection");
    assert_ne!(next, first, "a new connection for the next request");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_upgrade_passes_the_waypoint_after_policy() {
    let mesh = l7_mesh().await;
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    let _echo2 = L7Server::start(mesh.cluster.pod("echo-2"), 9000).unwrap();
    for port in [80, 81] {
        let out = probe(
            &mesh,
            &["upgrade", &format!("10.96.0.82:{port}"), "/ws", "hello"],
        );
        assert_eq!(field(&out, "status"), "101", "port {port}: {out}");
        let reply = field(&out, "reply");
        assert!(
            reply == "echo-1:hello" || reply == "echo-2:hello",
            "the endpoint echoes over the upgraded connection: {out}"
        );
    }
    let out = probe(&mesh, &["upgrade", "10.96.0.82:80", "/secret/ws", "hello"]);
    assert_eq!(field(&out, "status"), "403", "policy first: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_the_waypoint_and_requests_in_flight_finish() {
    let mut mesh = l7_mesh().await;
    let echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    let echo2 = L7Server::start(mesh.cluster.pod("echo-2"), 9000).unwrap();
    let client = mesh.cluster.pod("client").clone();
    let slow = std::thread::spawn(move || {
        client.run(PROBE, ["h2", "10.96.0.82:80", "GET", "/slow?delay=1500"])
    });
    eventually(
        Duration::from_secs(15),
        "the slow request at its endpoint",
        || async { echo1.started() + echo2.started() > 0 },
    )
    .await;
    let pid = mesh.tunnel_pid("waypoint-waypoint").unwrap();
    let started = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = String::from_utf8_lossy(&slow.join().unwrap().unwrap().stdout).into_owned();
    assert_eq!(
        field(&out, "status"),
        "200",
        "finished while draining: {out}"
    );
    assert!(field(&out, "body").ends_with("GET /slow"), "{out}");
    eventually(Duration::from_secs(15), "the waypoint stopped", || async {
        mesh.log("waypoint-waypoint").contains("waypoint stopped")
    })
    .await;
    let log = mesh.log("waypoint-waypoint");
    assert!(log.contains("waypoint draining"), "{log}");
    assert!(
        !log.contains("still open at the end of the grace period"),
        "nothing was cut: {log}"
    );
    // Exited 0, within the grace period (5 s).
    let status = mesh.stop_tunnel("waypoint-waypoint").await.unwrap();
    assert!(status.success(), "exit status {status}: {log}");
    assert!(
        started.elapsed() < Duration::from_secs(5 + 2),
        "exited {:?} after SIGTERM",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_endpoint_gets_a_request_id_and_forwarded_proto_and_oversized_headers_get_431() {
    let mesh = l7_mesh().await;
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    let _echo2 = L7Server::start(mesh.cluster.pod("echo-2"), 9000).unwrap();
    const WEB: &str = "10.96.0.82:80";
    let (status, body) = http(&mesh, WEB, "GET", "/headers", &[]);
    assert_eq!(status, "200", "{body}");
    let id = body
        .split(' ')
        .find_map(|f| f.strip_prefix("x-request-id="))
        .unwrap();
    assert_eq!(id.len(), 36, "a generated UUID: {body}");
    assert!(body.ends_with(" x-forwarded-proto=http"), "{body}");
    let (_, body) = http(
        &mesh,
        WEB,
        "GET",
        "/headers",
        &["x-request-id: from-client"],
    );
    assert!(body.contains(" x-request-id=from-client "), "kept: {body}");

    // At most 100 headers (the probe sends 3 of its own: host, content-length,
    // connection), at most 60 KiB of them.
    let many = |n: usize| (0..n).map(|i| format!("x-h{i}: v")).collect::<Vec<_>>();
    let headers = many(97);
    let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    assert_eq!(
        http(&mesh, WEB, "GET", "/few", &refs).0,
        "200",
        "100 headers"
    );
    let headers = many(98);
    let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let reached = _echo1.started() + _echo2.started();
    assert_eq!(
        http(&mesh, WEB, "GET", "/many", &refs).0,
        "431",
        "101 headers"
    );
    assert_eq!(
        _echo1.started() + _echo2.started(),
        reached,
        "refused at the waypoint"
    );
    let headers = many(110);
    let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    assert_eq!(http(&mesh, WEB, "GET", "/many", &refs).0, "431");
    let big = format!("x-big: {}", "a".repeat(70 * 1024));
    assert_eq!(http(&mesh, WEB, "GET", "/big", &[&big]).0, "431");
    let out = probe(&mesh, &["h2", WEB, "GET", "/after"]);
    assert_eq!(
        field(&out, "status"),
        "200",
        "the waypoint keeps serving: {out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_request_is_measured_and_logged_with_istio_labels() {
    let mesh = l7_mesh_args(&["--access-log"]).await;
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    let _echo2 = L7Server::start(mesh.cluster.pod("echo-2"), 9000).unwrap();
    let out = grpc(&mesh, "10.96.0.81:9000", "stream", 3, 10);
    assert_eq!(field(&out, "status"), "10", "{out}");
    let (status, _) = http(&mesh, "10.96.0.82:80", "GET", "/measured", &[]);
    assert_eq!(status, "200");
    eventually(
        Duration::from_secs(15),
        "request metrics at the waypoint",
        || async {
            let page = mesh.waypoint_metrics("waypoint").await;
            let grpc = |l: &&str| {
                l.contains("request_protocol=\"grpc\"")
                    && l.contains("grpc_response_status=\"10\"")
                    && l.contains("destination_service=\"grpc.demo.svc\"")
                    && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"")
                    && l.contains("source_workload_namespace=\"demo\"")
                    && l.contains("destination_workload_namespace=\"demo\"")
            };
            page.lines()
                .filter(grpc)
                .any(|l| l.starts_with("istio_requests_total{"))
                && page
                    .lines()
                    .filter(grpc)
                    .any(|l| l.starts_with("istio_response_bytes_sum{") && !l.ends_with(" 0.0"))
                && page.lines().any(|l| {
                    l.starts_with("istio_request_duration_milliseconds_count{")
                        && l.contains("request_protocol=\"http\"")
                        && l.contains("response_code=\"200\"")
                })
        },
    )
    .await;
    let log = mesh.log("waypoint-waypoint");
    assert!(
        log.lines().any(|l| l.contains("access")
            && l.contains("path=/testbed.echo.Echo/Stream")
            && l.contains("grpc_status=10")),
        "an access line per request: {log}"
    );
    assert!(
        log.lines().any(|l| l.contains("access")
            && l.contains("path=/measured")
            && l.contains("status=200")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_stalling_in_its_headers_is_closed_and_a_stalled_upload_or_silent_upstream_gets_408(
) {
    let workloads = vec![
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("echo-1", "demo", "echo").label("app", "echo"),
        WorkloadSpec::new("waypoint", "demo", "waypoint")
            .label("gateway.networking.k8s.io/gateway-name", "waypoint"),
    ];
    let mesh = mesh_from_args(
        workloads,
        L7_CONFIG,
        &[
            "--request-headers-timeout",
            "1s",
            "--stream-idle-timeout",
            "2s",
        ],
    )
    .await;
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    const WEB: &str = "10.96.0.82:80";
    // Part of a request's headers, then nothing: closed after about a second
    // (the probe gives up at 30 s), and the request never reached the endpoint.
    let out = probe(
        &mesh,
        &[
            "stall",
            WEB,
            "GET /stalled HTTP/1.1\\r\\nhost: web\\r\\nx-half",
        ],
    );
    let closed: u64 = field(&out, "closed_ms").parse().unwrap();
    assert!((900..15_000).contains(&closed), "{out}");
    assert_eq!(_echo1.started(), 0, "{out}");
    // An upload that stalls halfway (the endpoint waits for the rest): 408 from
    // the stream idle timeout, not a 503 for the aborted upstream request.
    let out = probe(
        &mesh,
        &[
            "stall",
            WEB,
            "POST /upload HTTP/1.1\\r\\nhost: web\\r\\ncontent-length: 100\\r\\n\\r\\nhalf",
        ],
    );
    assert!(
        field(&out, "reply").starts_with("HTTP/1.1 408"),
        "a stalled upload: {out}"
    );
    assert!(field(&out, "reply").contains("stream timeout"), "{out}");
    // A request whose answer takes longer than the stream idle timeout: 408.
    let (status, body) = http(&mesh, WEB, "GET", "/slow?delay=6000", &[]);
    assert_eq!(status, "408", "{body}");
    assert!(body.contains("stream timeout"), "{body}");
    // Within it, answered.
    let (status, body) = http(&mesh, WEB, "GET", "/quick?delay=100", &[]);
    assert_eq!(status, "200", "{body}");
    eventually(Duration::from_secs(15), "the 408 counted as SI", || async {
        mesh.waypoint_metrics("waypoint").await.lines().any(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("response_code=\"408\"")
                && l.contains("response_flags=\"SI\"")
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_endpoint_gets_the_original_client_in_forwarded() {
    let mesh = l7_mesh().await;
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    let _echo2 = L7Server::start(mesh.cluster.pod("echo-2"), 9000).unwrap();
    let client = mesh.cluster.pod("client").ip.to_string();
    let (status, body) = http(&mesh, "10.96.0.82:80", "GET", "/headers", &[]);
    assert_eq!(status, "200", "{body}");
    assert!(
        body.contains(&format!(" forwarded=for=\"{client}:")),
        "the client's address, quoted with its port: {body}"
    );
    // What the client says of itself stays first; the waypoint's word is last.
    let (_, body) = http(
        &mesh,
        "10.96.0.82:80",
        "GET",
        "/headers",
        &["forwarded: for=6.6.6.6"],
    );
    assert!(
        body.contains(&format!(" forwarded=for=6.6.6.6, for=\"{client}:")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_silent_past_the_protocol_sniff_is_still_served_as_http() {
    let mesh = l7_mesh().await;
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    let _echo2 = L7Server::start(mesh.cluster.pod("echo-2"), 9000).unwrap();
    // Opened, then 1.5 s of silence (the sniff gives up after 500 ms), then a
    // request: on a port declared HTTP, and on an undeclared one whose policy
    // needs L7 (a plain TCP relay would skip the path DENY).
    for (target, path, status) in [
        ("10.96.0.82:81", "/late", "200"),
        ("10.96.0.82:80", "/late", "200"),
        ("10.96.0.82:80", "/secret", "403"),
    ] {
        let request =
            format!("GET {path} HTTP/1.1\\r\\nhost: web\\r\\nconnection: close\\r\\n\\r\\n");
        let out = probe(&mesh, &["late", target, "1500", &request]);
        assert!(
            field(&out, "reply").starts_with(&format!("HTTP/1.1 {status}")),
            "{target}{path}: {out}"
        );
    }
}

/// A server-first protocol on port 9100 of `pod`: each connection gets a
/// greeting, then is closed. Returns once it listens.
fn greet_on_connect(mesh: &Mesh, pod: &str) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let greeting = format!("220 {pod} ready\r\n");
    mesh.cluster
        .pod(pod)
        .spawn_task(move || async move {
            use tokio::io::AsyncWriteExt;
            let listener = tokio::net::TcpListener::bind("0.0.0.0:9100").await.unwrap();
            ready_tx.send(()).unwrap();
            while let Ok((mut tcp, _)) = listener.accept().await {
                let _ = tcp.write_all(greeting.as_bytes()).await;
            }
        })
        .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_declared_tcp_is_relayed_unread_and_its_server_may_speak_first() {
    // A detection timeout far longer than the probes wait: a port that declares
    // nothing holds a server's greeting back until the client speaks.
    let dir = testbed::mesh::TempDir::new("detection").unwrap();
    let mesh_yaml = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_yaml, "protocolDetectionTimeout: 60s\n").unwrap();
    let mesh = l7_mesh_args(&["--mesh-config", mesh_yaml.to_str().unwrap()]).await;
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    let _echo2 = L7Server::start(mesh.cluster.pod("echo-2"), 9000).unwrap();
    // Nothing listens on the greeting port yet: both endpoints refuse, and the
    // relay that could not be opened is counted with Envoy's flags.
    let out = probe(&mesh, &["greeting", "10.96.0.86:3306", "30000"]);
    assert_eq!(field(&out, "reply"), "", "{out}");
    let failed = [
        "destination_service=\"raw.demo.svc\"",
        "response_flags=\"UF,URX\"",
    ];
    eventually(
        Duration::from_secs(15),
        "the failed relay counted",
        || async {
            let page = mesh.waypoint_metrics("waypoint").await;
            metric(&page, "istio_tcp_connections_closed_total", &failed) >= 1.0
        },
    )
    .await;
    greet_on_connect(&mesh, "echo-1");
    greet_on_connect(&mesh, "echo-2");

    // HTTP on a port named tcp-*: relayed as bytes, so the endpoint gets the
    // request as the client sent it (no request id, no forwarded proto added).
    let (status, body) = http(&mesh, "10.96.0.86:80", "GET", "/headers", &[]);
    assert_eq!(status, "200", "{body}");
    assert!(
        body.ends_with(" x-request-id=none forwarded=none x-forwarded-proto=none"),
        "not read as HTTP: {body}"
    );
    // Counted as a TCP connection (bytes both ways), never as a request.
    let raw = [
        "reporter=\"waypoint\"",
        "destination_service=\"raw.demo.svc\"",
        "request_protocol=\"tcp\"",
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
        "destination_workload_namespace=\"demo\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    eventually(
        Duration::from_secs(15),
        "the relayed connection closed",
        || async {
            let page = mesh.waypoint_metrics("waypoint").await;
            metric(&page, "istio_tcp_connections_closed_total", &raw) >= 1.0
        },
    )
    .await;
    let page = mesh.waypoint_metrics("waypoint").await;
    assert!(
        metric(&page, "istio_tcp_connections_opened_total", &raw) >= 1.0,
        "{page}"
    );
    assert!(
        metric(&page, "istio_tcp_received_bytes_total", &raw) > 0.0,
        "{page}"
    );
    assert!(
        metric(&page, "istio_tcp_sent_bytes_total", &raw) > 0.0,
        "{page}"
    );
    assert_eq!(
        metric(
            &page,
            "istio_requests_total",
            &["destination_service=\"raw.demo.svc\""]
        ),
        0.0,
        "{page}"
    );
    // A DENY whose rule reads the path still holds on a port declared tcp: with
    // no path to read, the rule matches every connection (Istio: HTTP-only fields
    // are ignored in a DENY), so declaring a port opaque never opens a way around it.
    let (status, body) = http(&mesh, "10.96.0.82:83", "GET", "/public", &[]);
    assert_eq!(
        status, "none",
        "no answer: web's DENY /secret* refuses its tcp port whole: {body}"
    );
    assert!(
        mesh.log("waypoint-waypoint")
            .contains("waypoint: connection denied"),
        "{}",
        mesh.log("waypoint-waypoint")
    );
    // appProtocol mysql: the server's greeting comes with nothing sent.
    let out = probe(&mesh, &["greeting", "10.96.0.86:3306", "30000"]);
    assert!(
        field(&out, "reply").starts_with("220 echo-"),
        "the greeting on a declared port: {out}"
    );
    // The same server on an undeclared port: the waypoint still waits for the
    // client's first bytes (60 s), so nothing comes within 3 s.
    let out = probe(&mesh, &["greeting", "10.96.0.86:3307", "3000"]);
    assert_eq!(
        field(&out, "reply"),
        "",
        "held back on an undeclared port: {out}"
    );
    drop(dir);
}

/// An HTTP/2 server on port 9000 of `pod` that refuses every stream (RST_STREAM
/// REFUSED_STREAM) once its request's headers are in; counts them. Returns once
/// it listens.
fn refuse_every_stream(mesh: &Mesh, pod: &str) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = refused.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    mesh.cluster
        .pod(pod)
        .spawn_task(move || async move {
            let listener = tokio::net::TcpListener::bind("0.0.0.0:9000").await.unwrap();
            ready_tx.send(()).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let count = count.clone();
                tokio::spawn(async move {
                    let Ok(mut connection) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    while let Some(Ok((_, mut respond))) = connection.accept().await {
                        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    }
                });
            }
        })
        .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    refused
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_the_endpoint_refuses_is_retried_on_another() {
    let mesh = l7_mesh().await;
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    // echo-2 speaks HTTP/2 and refuses every stream (RST_STREAM REFUSED_STREAM)
    // after reading its request.
    let refused = refuse_every_stream(&mesh, "echo-2");
    // web:82 is declared HTTP/2; requests alternate between the endpoints, and
    // each refused one is answered by echo-1.
    for i in 0..6 {
        let (status, body) = http(&mesh, "10.96.0.82:82", "GET", &format!("/r{i}"), &[]);
        assert_eq!(status, "200", "request {i}: {body}");
        assert!(body.starts_with("echo-1 HTTP/2.0 GET"), "{body}");
    }
    assert!(
        refused.load(std::sync::atomic::Ordering::Acquire) > 0,
        "echo-2 was tried and refused"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_clients_that_send_no_request_stall_or_go_idle_are_cut_off_and_others_served() {
    let workloads = vec![
        WorkloadSpec::new("client", "demo", "client"),
        WorkloadSpec::new("echo-1", "demo", "echo").label("app", "echo"),
        WorkloadSpec::new("waypoint", "demo", "waypoint")
            .label("gateway.networking.k8s.io/gateway-name", "waypoint"),
    ];
    let mesh = mesh_from_args(
        workloads,
        L7_CONFIG,
        &[
            "--request-headers-timeout",
            "1s",
            "--stream-idle-timeout",
            "2s",
            "--idle-timeout",
            "3s",
        ],
    )
    .await;
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    const WEB: &str = "10.96.0.82:80";
    // The attackers, at once: the preface and no request; a header block never
    // finished; an upload that stalls after 4 of its 100 bytes.
    let attack = |args: &'static [&'static str]| {
        let client = mesh.cluster.pod("client").clone();
        std::thread::spawn(move || {
            let out = client.run(PROBE, args).unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let preface = attack(&["h2raw", WEB, "preface"]);
    let headers = attack(&["h2raw", WEB, "headers"]);
    let upload = attack(&["h2upload", WEB, "/upload"]);
    // Meanwhile others are served.
    let out = probe(&mesh, &["h2", WEB, "GET", "/meanwhile"]);
    assert_eq!(field(&out, "status"), "200", "{out}");
    for (what, out) in [
        ("the preface alone", preface.join().unwrap()),
        ("an unfinished header block", headers.join().unwrap()),
    ] {
        assert_eq!(
            field(&out, "goaway"),
            "0",
            "{what}: GOAWAY(NO_ERROR): {out}"
        );
        let goaway: u64 = field(&out, "goaway_ms").parse().unwrap();
        assert!(
            (900..15_000).contains(&goaway),
            "{what}: after the request headers timeout (1 s): {out}"
        );
        assert!(!field(&out, "frames").contains(":1"), "{what}: {out}");
    }
    let out = upload.join().unwrap();
    assert_eq!(field(&out, "status"), "408", "a stalled upload: {out}");
    let took: u64 = field(&out, "ms").parse().unwrap();
    assert!(
        (1_900..15_000).contains(&took),
        "stream idle timeout (2 s): {out}"
    );
    // One whole request, then silence: the response (HEADERS on stream 1), then
    // GOAWAY after the idle timeout.
    let out = probe(&mesh, &["h2raw", WEB, "request"]);
    assert!(field(&out, "frames").contains("1:1"), "answered: {out}");
    assert_eq!(field(&out, "goaway"), "0", "{out}");
    let goaway: u64 = field(&out, "goaway_ms").parse().unwrap();
    assert!(
        (2_900..20_000).contains(&goaway),
        "idle timeout (3 s): {out}"
    );

    // The same one layer down: a mesh workload's TLS connection to the waypoint
    // itself, with the HTTP/2 preface and no CONNECT.
    let seen = mesh
        .hbone_peer(
            "client",
            "spiffe://cluster.local/ns/demo/sa/client",
            "waypoint",
            "spiffe://cluster.local/ns/demo/sa/waypoint",
            |mut tls| async move {
                use tokio::io::AsyncWriteExt;
                tls.write_all(&testbed::l7::raw_h2::start()).await.unwrap();
                testbed::l7::raw_h2::read_until_closed(&mut tls, Duration::from_secs(30), true)
                    .await
            },
        )
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(seen.goaway, Some(0), "HBONE: {seen:?}");
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(15)).contains(&seen.goaway_after.unwrap()),
        "HBONE: {seen:?}"
    );
    assert!(seen.closed_after.is_some(), "HBONE: {seen:?}");

    // Each counted; the tunnel's own idle pooled connection went the same way,
    // and the tunnel opens another for the next request.
    eventually(
        Duration::from_secs(15),
        "the closed connections counted",
        || async {
            let page = mesh.waypoint_metrics("waypoint").await;
            let counted = |layer: &str, timeout: &str| {
                page.lines().any(|l| {
                    l.starts_with("ztunnel_waypoint_connections_timed_out_total{")
                        && l.contains(&format!("layer=\"{layer}\""))
                        && l.contains(&format!("timeout=\"{timeout}\""))
                        && !l.ends_with(" 0")
                })
            };
            counted("http", "request_headers")
                && counted("http", "idle")
                && counted("hbone", "request_headers")
                && counted("hbone", "idle")
        },
    )
    .await;
    let out = probe(&mesh, &["h2", WEB, "GET", "/after"]);
    assert_eq!(field(&out, "status"), "200", "{out}");
}

/// HTTP/2 floods on the waypoint's only worker: rapid reset (CVE-2023-44487),
/// the same paced to slip past the HTTP/2 library's own count, and a header
/// block continued forever (CVE-2024-27316). Each flooding connection is closed
/// long before it is done (the first two with GOAWAY(ENHANCE_YOUR_CALM)),
/// logged and counted, and a client sharing that worker is served meanwhile and
/// after.
#[tokio::test(flavor = "multi_thread")]
async fn http2_floods_are_cut_off_and_their_worker_keeps_serving_others() {
    let mesh = l7_mesh_args(&["--worker-threads", "1"]).await;
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    const WEB: &str = "10.96.0.82:80";
    let flood = |mode: &'static str| {
        let client = mesh.cluster.pod("client").clone();
        std::thread::spawn(move || {
            let out = client.run(PROBE, ["h2raw", WEB, mode]).unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let mut counted = std::collections::HashMap::new();
    for (mode, goaway, reason) in [
        ("rapidreset", Some("11"), "ENHANCE_YOUR_CALM"),
        ("continuation", Some("11"), "ENHANCE_YOUR_CALM"),
        // Dropped at once: its requests are the flood's.
        ("slowreset", None, "PREMATURE_RESETS"),
    ] {
        let flooding = flood(mode);
        let out = probe(&mesh, &["h2", WEB, "GET", "/meanwhile"]);
        assert_eq!(field(&out, "status"), "200", "{mode}: {out}");
        let out = flooding.join().unwrap();
        // Closed, not left to run out: a 30 s limit.
        field(&out, "closed_ms");
        // The GOAWAY, when it reaches the client: the flood's bytes the waypoint
        // left unread may reset the connection first (as TCP's would). The
        // count below is the waypoint's own word for its code.
        if let Some(code) = goaway {
            assert!(
                ["none", code].contains(&field(&out, "goaway")),
                "{mode}: {out}"
            );
        }
        if mode == "slowreset" {
            // Cut off long before its 2000 requests (after 250 cancelled).
            assert!(out.contains("write_error="), "{mode}: it sent all: {out}");
        }
        *counted.entry(reason).or_insert(0) += 1;
        let line = format!(
            "ztunnel_waypoint_protocol_errors_total{{layer=\"http\",reason=\"{reason}\"}} {}",
            counted[reason]
        );
        eventually(Duration::from_secs(15), &line, || async {
            mesh.waypoint_metrics("waypoint").await.contains(&line)
        })
        .await;
    }
    let log = mesh.log("waypoint-waypoint");
    for warning in [
        "closed a downstream connection that broke HTTP/2 (ENHANCE_YOUR_CALM)",
        "closed a downstream connection whose client cancelled",
    ] {
        assert!(log.contains(warning), "{warning}: {log}");
    }
    let out = probe(&mesh, &["h2", WEB, "GET", "/after"]);
    assert_eq!(field(&out, "status"), "200", "{out}");
}

/// A client loading the waypoint's only worker as hard as it can (64 streams
/// at once, each sending its next request the moment it has an answer) does not
/// starve another client on that worker: its request is answered while the load
/// still runs (the worker's tasks take turns).
#[tokio::test(flavor = "multi_thread")]
async fn a_client_loading_the_only_worker_flat_out_leaves_room_for_another() {
    let mesh = l7_mesh_args(&["--worker-threads", "1"]).await;
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    const WEB: &str = "10.96.0.82:80";
    let mut load = mesh
        .cluster
        .pod("client")
        .command(PROBE)
        .unwrap()
        .args(["httpbench", WEB, "h2", "64", "60000ms"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let answered = || async {
        metric(
            &mesh.waypoint_metrics("waypoint").await,
            "istio_requests_total",
            &[],
        )
    };
    eventually(Duration::from_secs(15), "the load under way", || async {
        answered().await >= 1000.0
    })
    .await;
    let out = probe(&mesh, &["h2", WEB, "GET", "/meanwhile"]);
    let still_loading = load.try_wait().unwrap().is_none();
    let _ = load.kill();
    let _ = load.wait();
    assert_eq!(field(&out, "status"), "200", "{out}");
    assert!(still_loading, "answered only once the load had ended");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_expecting_100_continue_is_invited_only_once_policy_allows_it() {
    let mesh = l7_mesh().await;
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    const WEB: &str = "10.96.0.82:80";
    // Allowed: the client is told to go on, and its body reaches the endpoint
    // whole (within the retry buffer, and streamed beyond it).
    for bytes in [20_000usize, 200_000] {
        let out = probe(&mesh, &["expect100", WEB, "/upload", &bytes.to_string()]);
        assert_eq!(field(&out, "interim"), "HTTP/1.1 100 Continue", "{out}");
        let reply = field(&out, "reply");
        let digest = testbed::l7::digest(&testbed::l7::pattern(bytes));
        assert!(
            reply.starts_with("HTTP/1.1 200")
                && reply.contains(&format!("/upload bytes={bytes} digest={digest:016x}")),
            "{bytes} bytes: {out}"
        );
    }
    // Denied (`/secret*`): the final 403 comes instead of the 100, so the client
    // never sends what it meant to upload.
    let out = probe(&mesh, &["expect100", WEB, "/secret/upload", "20000"]);
    assert!(
        field(&out, "interim").starts_with("HTTP/1.1 403"),
        "a denied upload: {out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_post_is_retried_whole_on_another_endpoint_and_a_large_one_only_unread() {
    let mesh = l7_mesh().await;
    let _echo1 = L7Server::start(mesh.cluster.pod("echo-1"), 9000).unwrap();
    let post = |version: &str, port: u16, bytes: usize| {
        let target = format!("10.96.0.82:{port}");
        let out = probe(
            &mesh,
            &["post", &target, version, "/upload", &bytes.to_string()],
        );
        (field(&out, "status").to_owned(), out)
    };
    let whole = |bytes: usize| {
        let digest = testbed::l7::digest(&testbed::l7::pattern(bytes));
        format!(" bytes={bytes} digest={digest:016x}")
    };
    // echo-2 refuses connections (no server): every POST, small or large, over
    // either protocol, reaches echo-1 whole (its body was not read yet).
    for (version, port) in [("h1", 80), ("h2", 80), ("h2", 82)] {
        for bytes in [20_000, 200_000, 20_000] {
            let (status, out) = post(version, port, bytes);
            assert_eq!(status, "200", "{version} to {port}, {bytes} bytes: {out}");
            let body = field(&out, "body");
            assert!(
                body.starts_with("echo-1 ") && body.ends_with(&whole(bytes)),
                "{version} to {port}: {out}"
            );
        }
    }
    // echo-2 now refuses each stream after its request was sent (port 82 is
    // declared HTTP/2): a body within the retry buffer (64 KiB) is sent again,
    // whole, to echo-1.
    let refused = refuse_every_stream(&mesh, "echo-2");
    for _ in 0..4 {
        let (status, out) = post("h2", 82, 20_000);
        assert_eq!(status, "200", "{out}");
        assert!(field(&out, "body").ends_with(&whole(20_000)), "{out}");
    }
    let tried = refused.load(std::sync::atomic::Ordering::Acquire);
    assert!(tried >= 2, "echo-2 was tried and refused ({tried} times)");
    // A larger one is not kept: of two in turn, the one sent to echo-2 first is
    // answered 503 (UC), the other passes.
    let mut statuses: Vec<String> = (0..2).map(|_| post("h2", 82, 100_000).0).collect();
    statuses.sort();
    assert_eq!(statuses, ["200", "503"]);
}
