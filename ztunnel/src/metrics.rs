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
