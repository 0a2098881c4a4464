//! Just enough gRPC for Istio's CA API: unary calls over HTTP/2, the protobuf
//! messages of `istio.v1.auth.IstioCertificateService`, length-prefixed framing,
//! and status in trailers.

use std::{
    pin::Pin,
    task::{Context as TaskContext, Poll},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame};

/// The one method we serve and call.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// Metadata key Istio's ztunnel uses to ask for a workload's certificate.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
pub const CONTENT_TYPE: &str = "application/grpc";
/// Requests are a CSR and a little metadata: anything larger is refused unread.
pub const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime in seconds; 0 means the CA's default.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM: the leaf first, the root(s) last.
    #[prost(string, repeated, tag = "200")]
    pub cert_chain: Vec<String>,
}

/// gRPC status codes we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Ok = 0,
    InvalidArgument = 3,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Internal = 13,
    Unavailable = 14,
    Unimplemented = 12,
    Unauthenticated = 16,
}

/// A message in gRPC's length-prefixed framing (uncompressed).
pub fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    message.encode(&mut buf).expect("the buffer has room");
    buf.freeze()
}

/// The single message in a unary call's body.
pub fn unframe<M: prost::Message + Default>(mut body: Bytes) -> Result<M, String> {
    if body.len() < 5 {
        return Err("the body holds no gRPC message".into());
    }
    let compressed = body.get_u8();
    let len = body.get_u32() as usize;
    if compressed != 0 {
        return Err("compressed messages are not supported".into());
    }
    if len > MAX_MESSAGE || len != body.len() {
        return Err(format!(
            "message length {len} does not match the body ({} bytes)",
            body.len()
        ));
    }
    M::decode(body).map_err(|e| format!("malformed message: {e}"))
}

/// Trailers carrying a status.
pub fn status_trailers(code: Code, message: &str) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(code as u16));
    if !message.is_empty() {
        // Percent-encode as the gRPC spec asks; keeps the header valid for any text.
        let encoded: String = message
            .bytes()
            .map(|b| match b {
                b' '..=b'~' if b != b'%' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        if let Ok(value) = HeaderValue::from_str(&encoded) {
            trailers.insert("grpc-message", value);
        }
    }
    trailers
}

/// Decodes `grpc-message`.
pub fn decode_message(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&value[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A unary response body: at most one data frame, then trailers.
pub struct UnaryBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl UnaryBody {
    pub fn new(data: Option<Bytes>, trailers: HeaderMap) -> Self {
        Self {
            data,
            trailers: Some(trailers),
        }
    }

    pub fn empty() -> Self {
        Self {
            data: None,
            trailers: None,
        }
    }
}

impl Body for UnaryBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_framing() {
        let request = IstioCertificateRequest {
            csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
            validity_duration: 3600,
            metadata: None,
        };
        let decoded: IstioCertificateRequest = unframe(frame(&request)).unwrap();
        assert_eq!(decoded, request);
    }

    #[test]
    fn bad_frames_are_refused_with_a_reason() {
        assert!(unframe::<IstioCertificateRequest>(Bytes::from_static(b"\0\0")).is_err());
        let err =
            unframe::<IstioCertificateRequest>(Bytes::from_static(b"\x01\0\0\0\0")).unwrap_err();
        assert!(err.contains("compressed"));
        let err =
            unframe::<IstioCertificateRequest>(Bytes::from_static(b"\0\0\0\0\x09abc")).unwrap_err();
        assert!(err.contains("length"));
    }

    #[test]
    fn status_messages_survive_encoding() {
        let trailers = status_trailers(Code::PermissionDenied, "pod 100% not on node\nx");
        let raw = trailers["grpc-message"].to_str().unwrap();
        assert_eq!(decode_message(raw), "pod 100% not on node\nx");
    }
}
