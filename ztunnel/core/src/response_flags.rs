//! The `response_flags` our proxies report, in Istio's metrics (`istio_tcp_*`,
//! `istio_requests_total`) and in their access logs.
//!
//! Two vocabularies, each where Istio uses it:
//! - the node tunnel reports what Istio's ztunnel reports for a connection:
//!   `DENY` (a policy refused it), `CONNECT` (the upstream could not be reached),
//!   `TLS_FAILURE`, `H2_HANDSHAKE_FAILURE`, `IDENTITY_ERROR` (no certificate);
//!   plus Envoy's `NR` and `DPE` for what Istio's ztunnel refuses without a flag;
//! - the waypoint reports Envoy's flags for a response it made itself (`UH`, `UF`,
//!   `URX`, `UC`, `SI`, `UAEX`, ...). Envoy sets no flag for an RBAC denial (its
//!   403 names the policy in the response details), and neither does the waypoint.
//!
//! Several flags join with commas in Envoy's order (`UF,URX`); none is `-`.

use std::fmt;

/// One response flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ResponseFlag {
    // Envoy's, in Envoy's order.
    /// `UH`: no healthy upstream to send to (503).
    NoHealthyUpstream,
    /// `UF`: connecting to the upstream failed (503).
    UpstreamConnectionFailure,
    /// `NR`: no route for the request or connection (404 in HTTP).
    NoRoute,
    /// `URX`: the upstream was retried and every attempt failed.
    UpstreamRetryLimitExceeded,
    /// `DC`: the downstream connection ended.
    DownstreamConnectionTermination,
    /// `UT`: the upstream did not answer in time (504).
    UpstreamRequestTimeout,
    /// `UC`: the upstream connection ended before the response (503).
    UpstreamConnectionTermination,
    /// `UAEX`: an external authorizer denied the request.
    UnauthorizedExternalService,
    /// `SI`: the stream was idle for the stream idle timeout (408).
    StreamIdleTimeout,
    /// `DPE`: the downstream's request broke the protocol.
    DownstreamProtocolError,
    /// `UPE`: the upstream's response broke the protocol.
    UpstreamProtocolError,
    // Istio's ztunnel's.
    /// `DENY`: refused by policy (AuthorizationPolicy, PeerAuthentication) or
    /// because the connection is not one the tunnel may carry.
    Deny,
    /// `CONNECT`: the upstream (application, peer tunnel, passthrough
    /// destination) could not be reached, or the connection to it failed.
    Connect,
    /// `TLS_FAILURE`: the mTLS handshake with the peer failed.
    TlsFailure,
    /// `H2_HANDSHAKE_FAILURE`: the HTTP/2 handshake with the peer failed.
    Http2HandshakeFailure,
    /// `IDENTITY_ERROR`: no certificate for the source's identity.
    IdentityError,
}

impl ResponseFlag {
    const ALL: [Self; 16] = [
        Self::NoHealthyUpstream,
        Self::UpstreamConnectionFailure,
        Self::NoRoute,
        Self::UpstreamRetryLimitExceeded,
        Self::DownstreamConnectionTermination,
        Self::UpstreamRequestTimeout,
        Self::UpstreamConnectionTermination,
        Self::UnauthorizedExternalService,
        Self::StreamIdleTimeout,
        Self::DownstreamProtocolError,
        Self::UpstreamProtocolError,
        Self::Deny,
        Self::Connect,
        Self::TlsFailure,
        Self::Http2HandshakeFailure,
        Self::IdentityError,
    ];

    /// The flag as Envoy or Istio's ztunnel spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoHealthyUpstream => "UH",
            Self::UpstreamConnectionFailure => "UF",
            Self::NoRoute => "NR",
            Self::UpstreamRetryLimitExceeded => "URX",
            Self::DownstreamConnectionTermination => "DC",
            Self::UpstreamRequestTimeout => "UT",
            Self::UpstreamConnectionTermination => "UC",
            Self::UnauthorizedExternalService => "UAEX",
            Self::StreamIdleTimeout => "SI",
            Self::DownstreamProtocolError => "DPE",
            Self::UpstreamProtocolError => "UPE",
            Self::Deny => "DENY",
            Self::Connect => "CONNECT",
            Self::TlsFailure => "TLS_FAILURE",
            Self::Http2HandshakeFailure => "H2_HANDSHAKE_FAILURE",
            Self::IdentityError => "IDENTITY_ERROR",
        }
    }

    fn bit(self) -> u32 {
        1 << self as u8
    }
}

impl fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The flags of one connection or request: a set, `-` when empty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u32);

impl ResponseFlags {
    pub const NONE: Self = Self(0);

    /// These flags and `flag`.
    pub fn with(self, flag: ResponseFlag) -> Self {
        Self(self.0 | flag.bit())
    }

    pub fn contains(self, flag: ResponseFlag) -> bool {
        self.0 & flag.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl From<ResponseFlag> for ResponseFlags {
    fn from(flag: ResponseFlag) -> Self {
        Self::NONE.with(flag)
    }
}

impl From<Option<ResponseFlag>> for ResponseFlags {
    fn from(flag: Option<ResponseFlag>) -> Self {
        flag.map_or(Self::NONE, Self::from)
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        let mut first = true;
        for flag in ResponseFlag::ALL.iter().filter(|f| self.contains(**f)) {
            if !first {
                f.write_str(",")?;
            }
            f.write_str(flag.as_str())?;
            first = false;
        }
        Ok(())
    }
}

impl prometheus_client::encoding::EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelValueEncoder) -> fmt::Result {
        use std::fmt::Write;
        write!(encoder, "{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::{ResponseFlag::*, *};

    #[test]
    fn flags_are_spelled_as_envoy_and_istios_ztunnel_spell_them() {
        let spelled = [
            (NoHealthyUpstream, "UH"),
            (UpstreamConnectionFailure, "UF"),
            (NoRoute, "NR"),
            (UpstreamRetryLimitExceeded, "URX"),
            (DownstreamConnectionTermination, "DC"),
            (UpstreamRequestTimeout, "UT"),
            (UpstreamConnectionTermination, "UC"),
            (UnauthorizedExternalService, "UAEX"),
            (StreamIdleTimeout, "SI"),
            (DownstreamProtocolError, "DPE"),
            (UpstreamProtocolError, "UPE"),
            (Deny, "DENY"),
            (Connect, "CONNECT"),
            (TlsFailure, "TLS_FAILURE"),
            (Http2HandshakeFailure, "H2_HANDSHAKE_FAILURE"),
            (IdentityError, "IDENTITY_ERROR"),
        ];
        assert_eq!(spelled.len(), ResponseFlag::ALL.len());
        for (flag, text) in spelled {
            assert_eq!(flag.to_string(), text);
            assert_eq!(ResponseFlags::from(flag).to_string(), text);
        }
    }

    #[test]
    fn no_flag_is_a_dash_and_several_join_in_envoys_order() {
        assert_eq!(ResponseFlags::NONE.to_string(), "-");
        assert_eq!(ResponseFlags::from(None).to_string(), "-");
        let retried =
            ResponseFlags::from(UpstreamRetryLimitExceeded).with(UpstreamConnectionFailure);
        assert_eq!(retried.to_string(), "UF,URX");
        assert!(retried.contains(UpstreamConnectionFailure));
        assert!(!retried.contains(UpstreamConnectionTermination));
        // Each flag has its own bit.
        let all = ResponseFlag::ALL
            .iter()
            .fold(ResponseFlags::NONE, |set, f| set.with(*f));
        assert_eq!(all.0.count_ones() as usize, ResponseFlag::ALL.len());
    }
}
