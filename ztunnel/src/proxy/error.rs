//! Why the node tunnel refused or ended a connection, each with the response flag
//! Istio's ztunnel reports for it (see [`crate::response_flags`]).

use std::net::SocketAddr;

use crate::{certs::CertError, response_flags::ResponseFlag};

use super::pool;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Refused by AuthorizationPolicy or PeerAuthentication (the reason names the
    /// policy).
    #[error("{0}")]
    Denied(String),
    /// An open connection a policy change now denies.
    #[error("closed: a policy change denies it")]
    DeniedByPolicyChange,
    #[error("non-IPv4 source")]
    NotIpv4,
    #[error("spoofed source address")]
    SpoofedSource,
    #[error("the source pod is no longer in the mesh state")]
    SourceGone,
    /// A connection to the tunnel itself (it would loop), or that reached the pod's
    /// listener in a way only the pod itself can.
    #[error("{0}")]
    SelfCall(String),
    #[error("HBONE: {0} is not CONNECT")]
    NotConnect(http::Method),
    #[error("HBONE: :authority is not ip:port")]
    BadAuthority,
    #[error("HBONE: {0} is not this pod")]
    NotThisPod(SocketAddr),
    #[error("no original destination for the connection")]
    NoOriginalDestination,
    /// Nowhere to send a captured connection (a service port or endpoint missing,
    /// a waypoint without pods).
    #[error("{0}")]
    NoRoute(String),
    #[error("application unreachable: connecting to {target}: {error}")]
    ApplicationUnreachable {
        target: SocketAddr,
        error: std::io::Error,
    },
    #[error("connecting to {address} from the pod: {error}")]
    Passthrough {
        address: SocketAddr,
        error: std::io::Error,
    },
    #[error(transparent)]
    Certificate(#[from] CertError),
    #[error(transparent)]
    Hbone(#[from] pool::Error),
    #[error("HBONE stream: {0}")]
    Upgrade(h2::Error),
    /// The relay failed after the connection was open.
    #[error(transparent)]
    Relay(#[from] std::io::Error),
}

impl Error {
    /// The flag Istio's ztunnel reports for it: `DENY` for a refusal, `CONNECT`
    /// for an upstream that failed, its TLS and HTTP/2 flags; Envoy's `NR` and
    /// `DPE` where Istio's ztunnel counts nothing.
    pub fn flag(&self) -> ResponseFlag {
        match self {
            Self::Denied(_)
            | Self::DeniedByPolicyChange
            | Self::NotIpv4
            | Self::SpoofedSource
            | Self::SourceGone
            | Self::SelfCall(_)
            | Self::NotThisPod(_) => ResponseFlag::Deny,
            Self::NotConnect(_) | Self::BadAuthority => ResponseFlag::DownstreamProtocolError,
            Self::NoOriginalDestination | Self::NoRoute(_) => ResponseFlag::NoRoute,
            Self::Certificate(_) => ResponseFlag::IdentityError,
            Self::Hbone(e) => e.flag(),
            Self::ApplicationUnreachable { .. }
            | Self::Passthrough { .. }
            | Self::Upgrade(_)
            | Self::Relay(_) => ResponseFlag::Connect,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response_flags::ResponseFlags;

    fn refused() -> std::io::Error {
        std::io::ErrorKind::ConnectionRefused.into()
    }

    #[test]
    fn each_refusal_and_failure_carries_istios_ztunnel_flag() {
        let address: SocketAddr = "10.0.0.2:15008".parse().unwrap();
        let cases = [
            (Error::Denied("no ALLOW policy matched".into()), "DENY"),
            (Error::DeniedByPolicyChange, "DENY"),
            (Error::SpoofedSource, "DENY"),
            (Error::NotThisPod(address), "DENY"),
            (Error::SelfCall("the tunnel itself".into()), "DENY"),
            (Error::NotConnect(http::Method::GET), "DPE"),
            (Error::BadAuthority, "DPE"),
            (Error::NoOriginalDestination, "NR"),
            (Error::NoRoute("service s has no endpoints".into()), "NR"),
            (
                Error::ApplicationUnreachable {
                    target: address,
                    error: refused(),
                },
                "CONNECT",
            ),
            (Error::Certificate(CertError::Stopped), "IDENTITY_ERROR"),
            (
                Error::Hbone(pool::Error::Connect {
                    address,
                    error: refused(),
                }),
                "CONNECT",
            ),
            (
                Error::Hbone(pool::Error::Status {
                    authority: address,
                    address,
                    status: http::StatusCode::SERVICE_UNAVAILABLE,
                }),
                "CONNECT",
            ),
            (
                Error::Hbone(pool::Error::Tls {
                    address,
                    destination: "spiffe://cluster.local/ns/a/sa/b".parse().unwrap(),
                    error: std::io::Error::other("peer is x, expected y"),
                }),
                "TLS_FAILURE",
            ),
            (
                // A dial another connection made, and shared.
                Error::Hbone(pool::Error::Dial(std::sync::Arc::new(pool::Error::Tls {
                    address,
                    destination: "spiffe://cluster.local/ns/a/sa/b".parse().unwrap(),
                    error: std::io::Error::other("certificate expired"),
                }))),
                "TLS_FAILURE",
            ),
            (
                Error::Relay(std::io::ErrorKind::ConnectionReset.into()),
                "CONNECT",
            ),
        ];
        for (error, flag) in cases {
            assert_eq!(
                ResponseFlags::from(error.flag()).to_string(),
                flag,
                "{error}"
            );
        }
    }
}
