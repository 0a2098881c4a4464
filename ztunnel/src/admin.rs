//! The admin endpoint (localhost only): `/certs` lists the certificates the tunnel
//! holds — identity, serial, validity — never keys.

use std::sync::Arc;

use http::StatusCode;

use crate::{
    certs::CertManager,
    http_server::{self, Handler},
};

pub fn handler(certs: Arc<CertManager>) -> Handler {
    Arc::new(move |req| match req.uri().path() {
        "/certs" => match serde_json::to_string_pretty(&certs.certificates()) {
            Ok(json) => http_server::text(StatusCode::OK, "application/json", json),
            Err(e) => http_server::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                e.to_string(),
            ),
        },
        _ => http_server::not_found(),
    })
}
