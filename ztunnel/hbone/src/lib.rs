//! ztunnel-hbone: the HBONE pieces the node tunnel and the waypoint share.
//!
//! - [`batched`]: an HBONE connection's writes, one per scheduler turn.
//! - [`pool`]: pooled mTLS HTTP/2 client connections carrying CONNECT streams.
//! - [`relay`]: copying a connection's bytes both ways.
//! - [`stream`]: an HBONE stream as a byte stream, on `h2` directly.
pub mod batched;
pub mod pool;
mod relay;
pub mod stream;

pub use relay::relay;

// Core's modules under the names the pool used in one crate.
use ztunnel_core::{certs, identity, netns, response_flags, tls};
