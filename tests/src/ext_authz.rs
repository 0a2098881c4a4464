//! A gRPC ext_authz provider (Envoy's `Authorization/Check`) for the waypoint's
//! tests: tonic's server generated here from the same `.proto` files as the
//! waypoint's client (`ztunnel/core/proto/envoy`), served h2c on hyper in a pod. It
//! keeps every CheckRequest it decodes, and answers by the request's path:
//! - `deny`: denied, 403, `x-reason: denied-by-grpc`, body "grpc says no";
//! - `teapot`: denied with the provider's own status, 418;
//! - `unavailable`: the call fails (gRPC UNAVAILABLE), no decision;
//! - `slow`: answers after 5 s;
//! - anything else: allowed, `x-auth-user: alice` added upstream.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::{Request, Response, Status};

use crate::{app::EchoServer, Pod};

/// The generated code; the modules follow the packages.
#[allow(clippy::all)]
pub mod proto {
    pub mod envoy {
        pub mod service {
            pub mod auth {
                pub mod v3 {
                    tonic::include_proto!("envoy.service.auth.v3");
                }
            }
        }
        pub mod config {
            pub mod core {
                pub mod v3 {
                    tonic::include_proto!("envoy.config.core.v3");
                }
            }
        }
        pub mod r#type {
            pub mod v3 {
                tonic::include_proto!("envoy.r#type.v3");
            }
        }
    }
    pub mod google {
        pub mod rpc {
            tonic::include_proto!("google.rpc");
        }
    }
}

use proto::{
    envoy::{
        config::core::v3::{HeaderValue, HeaderValueOption},
        r#type::v3::HttpStatus,
        service::auth::v3::{
            authorization_server::{Authorization, AuthorizationServer},
            check_response::HttpResponse,
            CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
        },
    },
    google::rpc,
};

/// The provider; stops when dropped.
pub struct ExtAuthzServer {
    _inner: EchoServer,
    checks: Arc<Mutex<Vec<CheckRequest>>>,
}

impl ExtAuthzServer {
    /// Listens on 0.0.0.0:`port` in `pod`; returns once it listens.
    pub fn start(pod: &Pod, port: u16) -> Result<Self> {
        let checks = Arc::new(Mutex::new(Vec::new()));
        let api = AuthorizationServer::new(Provider {
            checks: checks.clone(),
        });
        let inner = EchoServer::serve(pod, port, move |stream, _| {
            let api = api.clone();
            async move {
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    use tonic::codegen::Service;
                    api.clone().call(req)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        })?;
        Ok(Self {
            _inner: inner,
            checks,
        })
    }

    /// Every CheckRequest received so far, in order.
    pub fn checks(&self) -> Vec<CheckRequest> {
        self.checks.lock().unwrap().clone()
    }
}

struct Provider {
    checks: Arc<Mutex<Vec<CheckRequest>>>,
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            value: value.into(),
        }),
    }
}

fn denied(code: i32, body: &str) -> CheckResponse {
    CheckResponse {
        // PERMISSION_DENIED
        status: Some(rpc::Status {
            code: 7,
            message: "denied by the test provider".into(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code }),
            headers: vec![header("x-reason", "denied-by-grpc")],
            body: body.into(),
        })),
    }
}

#[tonic::async_trait]
impl Authorization for Provider {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let check = request.into_inner();
        self.checks.lock().unwrap().push(check.clone());
        let path = check
            .attributes
            .and_then(|a| a.request)
            .and_then(|r| r.http)
            .map(|h| h.path)
            .unwrap_or_default();
        let response = if path.contains("unavailable") {
            return Err(Status::unavailable("the test provider is unavailable"));
        } else if path.contains("slow") {
            tokio::time::sleep(Duration::from_secs(5)).await;
            CheckResponse::default()
        } else if path.contains("teapot") {
            denied(418, "")
        } else if path.contains("deny") {
            denied(403, "grpc says no")
        } else {
            CheckResponse {
                status: Some(rpc::Status::default()),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers: vec![header("x-auth-user", "alice")],
                })),
            }
        };
        Ok(Response::new(response))
    }
}
