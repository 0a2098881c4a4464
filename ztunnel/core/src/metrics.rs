//! Prometheus metrics, served as text on `/metrics`.

use std::sync::{Arc, Mutex};

use http::StatusCode;
use prometheus_client::{encoding::text::encode, registry::Registry};

use crate::http_server::{self, Handler};

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The handler for a metrics listener.
pub fn handler(registry: Arc<Mutex<Registry>>) -> Handler {
    Arc::new(move |req| {
        if req.uri().path() != "/metrics" && req.uri().path() != "/stats/prometheus" {
            return http_server::not_found();
        }
        let mut text = String::new();
        let registry = registry.lock().expect("not poisoned");
        match encode(&mut text, &registry) {
            Ok(()) => http_server::text(StatusCode::OK, CONTENT_TYPE, text),
            Err(e) => http_server::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                e.to_string(),
            ),
        }
    })
}

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

/// Labels of Istio's TCP metrics, with Istio's values ("unknown" when not known).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// "source" (the client's tunnel) or "destination" (the server's).
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub request_protocol: String,
    /// As Istio's ztunnel: "-" for none, "DENY" for a refusal, "CONNECT" for an
    /// unreachable upstream, ... (see [`crate::response_flags`]).
    pub response_flags: crate::response_flags::ResponseFlags,
    /// "mutual_tls" over HBONE, "unknown" for plaintext.
    pub connection_security_policy: String,
}

pub const UNKNOWN: &str = "unknown";

/// Istio's TCP metrics.
#[derive(Clone, Default)]
pub struct TcpMetrics {
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub sent: Family<TcpLabels, Counter>,
    pub received: Family<TcpLabels, Counter>,
}

impl TcpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client (response direction)",
            m.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (request direction)",
            m.received.clone(),
        );
        m
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabels {
    /// The deciding policy (`ns/name`), or "none" when no ALLOW policy matched.
    pub policy: String,
    /// "authorization" or "peer_authentication".
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    pub policy: String,
    /// What the policy would have decided: "allow" or "deny"; "audit" for AUDIT.
    pub decision: String,
}

/// Policy outcomes, by the policy that decided.
#[derive(Clone, Default)]
pub struct PolicyMetrics {
    pub denied: Family<DeniedLabels, Counter>,
    pub shadow: Family<ShadowLabels, Counter>,
}

impl PolicyMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        registry.register(
            "ztunnel_connections_denied",
            "Connections refused by policy, by the deciding policy",
            m.denied.clone(),
        );
        registry.register(
            "ztunnel_policy_shadow_decisions",
            "Dry-run and AUDIT policies that matched, with what they would have decided",
            m.shadow.clone(),
        );
        m
    }
}
