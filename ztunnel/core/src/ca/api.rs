//! Istio's CA API (`istio.v1.auth.IstioCertificateService`), generated at build time
//! from `proto/istio-ca.proto` by tonic: the messages, the client and the server.

#![allow(clippy::all)]

tonic::include_proto!("istio.v1.auth");

/// Metadata key a node proxy uses to ask for a workload's certificate.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Requests are a CSR and a little metadata, responses a short chain: anything
/// larger is refused unread.
pub const MAX_MESSAGE: usize = 64 * 1024;
