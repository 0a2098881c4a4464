//! What Istio's default retry (connect failures and refused streams, on another
//! endpoint) needs of a request: a copy to send again. A connect failure gives the
//! request back unread; an HTTP/2 stream the endpoint refused has had its body
//! read, so a body is kept when it is small: announced (content-length, or the
//! end of the stream with the headers) at most [`RETRY_BUFFER`] bytes, it is read
//! whole before the first attempt. Larger bodies, and bodies of unknown length
//! (streaming gRPC among them), are sent as they come and not retried after a
//! refused stream. A request without a body (most GETs) is sent as it came; the
//! copy is of its head only.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Full, StreamBody};

use super::upstream::{Body, BoxError};

/// The largest request body kept for a retry (Envoy's per-request retry buffer
/// is of this order; larger bodies are not retried after a refused stream).
pub const RETRY_BUFFER: u64 = 64 * 1024;

/// A request read whole, to be sent as often as needed.
pub struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Replay {
    /// A copy of the request.
    pub fn request(&self) -> Request<Body> {
        let body = match &self.trailers {
            None => Full::new(self.body.clone())
                .map_err(|never| match never {})
                .boxed(),
            Some(trailers) => {
                let frames = [
                    http_body::Frame::data(self.body.clone()),
                    http_body::Frame::trailers(trailers.clone()),
                ];
                StreamBody::new(futures_util::stream::iter(frames.map(Ok))).boxed()
            }
        };
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// The request to send first, and a copy for a retry when its body is small
/// enough to keep (read whole here; an error is the body's: the client's reset
/// or the stream idle timeout).
pub async fn keep(req: Request<Body>) -> Result<(Request<Body>, Option<Replay>), BoxError> {
    if req.body().is_end_stream() {
        let replay = Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            body: Bytes::new(),
            trailers: None,
        };
        return Ok((req, Some(replay)));
    }
    if req
        .body()
        .size_hint()
        .upper()
        .is_none_or(|upper| upper > RETRY_BUFFER)
    {
        return Ok((req, None));
    }
    let (parts, body) = req.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    let replay = Replay {
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    };
    Ok((replay.request(), Some(replay)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Body) -> Request<Body> {
        Request::post("http://web/upload")
            .header("x-kept", "yes")
            .body(body)
            .unwrap()
    }

    #[tokio::test]
    async fn a_small_body_is_kept_whole_and_every_copy_carries_it() {
        let body = Full::new(Bytes::from(vec![7u8; 1000]))
            .map_err(|never| match never {})
            .boxed();
        let (first, replay) = keep(request(body)).await.unwrap();
        let replay = replay.expect("kept");
        for req in [first, replay.request(), replay.request()] {
            assert_eq!(req.headers()["x-kept"], "yes");
            assert_eq!(req.method(), Method::POST);
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(bytes, vec![7u8; 1000]);
        }
    }

    #[tokio::test]
    async fn a_request_without_a_body_is_sent_as_it_came_and_its_copy_has_none() {
        let empty = http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed();
        let (first, replay) = keep(request(empty)).await.unwrap();
        assert!(first.body().is_end_stream());
        let again = replay.expect("kept").request();
        assert_eq!(again.headers()["x-kept"], "yes");
        assert_eq!(again.uri(), "http://web/upload");
        assert!(again
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty());
    }

    #[tokio::test]
    async fn a_large_body_or_one_of_unknown_length_is_not_kept() {
        let big = Full::new(Bytes::from(vec![0u8; RETRY_BUFFER as usize + 1]))
            .map_err(|never| match never {})
            .boxed();
        let (req, replay) = keep(request(big)).await.unwrap();
        assert!(replay.is_none());
        assert!(!req.body().is_end_stream(), "passed on unread");
        let frames = futures_util::stream::iter([Ok::<_, BoxError>(http_body::Frame::data(
            Bytes::from_static(b"x"),
        ))]);
        let (_, replay) = keep(request(StreamBody::new(frames).boxed()))
            .await
            .unwrap();
        assert!(replay.is_none(), "no length announced");
    }
}
