//! A real waypoint on the testbed: L7 AuthorizationPolicy on HTTP requests.

use std::time::Duration;

use testbed::{
    app::HttpServer,
    mesh::{eventually, Mesh, WorkloadSpec},
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
  ports: [{port: 80, targetPort: 8080}]
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

async fn mesh() -> Mesh {
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
    eventually(Duration::from_secs(15), "the config loaded", || async {
        mesh.config_dump("node-a").await["services"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    })
    .await;
    mesh.start_waypoint("waypoint", "demo", "waypoint")
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
                    let response = if path.contains("slow") {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_owned()
                    } else if path.contains("deny") {
                        "HTTP/1.1 403 Forbidden\r\nx-reason: denied-by-test\r\ncontent-length: 4\r\n\r\nnope".to_owned()
                    } else {
                        "HTTP/1.1 200 OK\r\nx-auth-user: alice\r\ncontent-length: 0\r\n\r\n".to_owned()
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

#[tokio::test(flavor = "multi_thread")]
async fn custom_external_authorization_allows_denies_and_honours_fail_open() {
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
    let _authz = start_ext_authz(&mesh);
    let _grpc = start_grpc_ext_authz(&mesh);
    mesh.start_waypoint_with("waypoint", "demo", "waypoint", Some(&path))
        .await
        .unwrap();
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();

    assert_eq!(
        http(&mesh, VIP, "GET", "/public/ext/ok", &[]),
        ("200".into(), "server GET /public/ext/ok".into())
    );
    assert_eq!(
        http(&mesh, VIP, "GET", "/public/ext/deny", &[]),
        ("403".into(), "nope".into()),
        "the provider's answer reaches the client"
    );
    assert_eq!(
        http(&mesh, VIP, "GET", "/public/ext/slow", &[]).0,
        "403",
        "timeout, failOpen false"
    );
    assert_eq!(
        http(&mesh, VIP, "GET", "/public/open/slow", &[]).0,
        "200",
        "timeout, failOpen true"
    );
    assert_eq!(
        http(&mesh, VIP, "GET", "/public/plain", &[]).0,
        "200",
        "CUSTOM applies only to its rules"
    );
    // The gRPC protocol (Envoy's Authorization/Check).
    assert_eq!(http(&mesh, VIP, "GET", "/public/grpc/ok", &[]).0, "200");
    assert_eq!(
        http(&mesh, VIP, "GET", "/public/grpc/deny", &[]),
        ("403".into(), "grpc says no".into())
    );
    // CUSTOM comes before ALLOW: an allowed provider does not bypass ALLOW rules.
    assert_eq!(http(&mesh, VIP, "POST", "/public/ext/ok", &[]).0, "403");
}

/// An Envoy-protocol gRPC ext-authz server (h2c) in the waypoint's pod on
/// 127.0.0.1:9292: paths with "deny" are refused, others allowed.
fn start_grpc_ext_authz(mesh: &Mesh) -> std::thread::JoinHandle<()> {
    use http_body_util::BodyExt;
    use ztunnel::{ca::grpc, extauthz::proto};
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = mesh
        .cluster
        .pod("waypoint")
        .spawn_task(move || async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:9292")
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |req: http::Request<hyper::body::Incoming>| async move {
                            assert_eq!(req.uri().path(), proto::CHECK_PATH);
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let check: proto::CheckRequest = grpc::unframe(body).unwrap();
                            let http = check.attributes.unwrap().request.unwrap().http.unwrap();
                            let response = if http.path.contains("deny") {
                                proto::CheckResponse {
                                    status: Some(proto::RpcStatus {
                                        code: 7,
                                        message: "no".into(),
                                    }),
                                    denied_response: Some(proto::DeniedHttpResponse {
                                        status: Some(proto::HttpStatus { code: 403 }),
                                        headers: vec![],
                                        body: "grpc says no".into(),
                                    }),
                                    ok_response: None,
                                }
                            } else {
                                proto::CheckResponse {
                                    status: Some(proto::RpcStatus::default()),
                                    denied_response: None,
                                    ok_response: Some(proto::OkHttpResponse::default()),
                                }
                            };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .body(grpc::UnaryBody::new(
                                        Some(grpc::frame(&response)),
                                        grpc::status_trailers(grpc::Code::Ok, ""),
                                    ))
                                    .unwrap(),
                            )
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
                });
            }
        })
        .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    handle
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

#[tokio::test(flavor = "multi_thread")]
async fn jwks_are_fetched_from_jwks_uri() {
    let mesh = mesh().await;
    let _server = HttpServer::start(mesh.cluster.pod("server"), 8080).unwrap();
    let issuer = ztunnel::jwt::testing::Es256Issuer::default();
    let jwks = issuer.jwks();
    // The keys, served where the waypoint can fetch them (its own pod).
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let _keys = mesh
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
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{jwks}",
                    jwks.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            }
        })
        .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    mesh.write_config(
        "authn.yaml",
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: demo}\nspec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  jwtRules: [{issuer: https://issuer.test, jwksUri: 'http://127.0.0.1:9393/jwks'}]\n",
    )
    .unwrap();
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
