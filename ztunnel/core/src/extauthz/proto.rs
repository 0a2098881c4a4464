//! Envoy's gRPC authorization API (`envoy.service.auth.v3.Authorization/Check`),
//! generated at build time from `proto/envoy/` and `proto/google/` by tonic: the
//! messages and the client. The modules follow the packages, as the generated code
//! refers to other packages by relative path.

#![allow(clippy::all)]

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

pub use envoy::{
    config::core::v3::{
        address, socket_address, Address, HeaderValue, HeaderValueOption, SocketAddress,
    },
    r#type::v3::HttpStatus,
    service::auth::v3::{
        attribute_context, authorization_client::AuthorizationClient, check_response,
        AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
    },
};
pub use google::rpc::Status as RpcStatus;
