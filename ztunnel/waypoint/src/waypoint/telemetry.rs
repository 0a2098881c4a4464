//! Per-request telemetry at the waypoint: Istio's standard request metrics
//! (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`) and an access-log line, recorded
//! when the response's body ends (a gRPC status may come in its trailers).

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use ztunnel_core::{metrics::UNKNOWN, response_flags::ResponseFlags, state::Workload};

#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    /// `http` or `grpc`.
    pub request_protocol: String,
    pub response_code: String,
    /// The `grpc-status` of a gRPC response (headers or trailers); else empty.
    pub grpc_response_status: String,
    /// Envoy's flags for a response the waypoint made itself
    /// (`ztunnel_core::response_flags::ResponseFlags`, displayed): `UH` no endpoint,
    /// `UF` connect failure, `URX` retries exhausted, `UC` the upstream reset,
    /// `UAEX` denied by an external authorizer.
    pub response_flags: String,
    pub connection_security_policy: String,
}

type Histograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn duration_buckets() -> Histogram {
    // Istio's buckets, in milliseconds.
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

fn size_buckets() -> Histogram {
    Histogram::new((0..8).map(|i| 10f64.powi(i)))
}

#[derive(Clone)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Histograms,
    request_bytes: Histograms,
    response_bytes: Histograms,
}

impl RequestMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_buckets),
            request_bytes: Family::new_with_constructor(size_buckets),
            response_bytes: Family::new_with_constructor(size_buckets),
        };
        registry.register(
            "istio_requests",
            "HTTP requests through the waypoint",
            metrics.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from a request's arrival to the end of its response",
            metrics.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            metrics.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            metrics.response_bytes.clone(),
        );
        metrics
    }
}

/// What varies between the requests of one downstream connection, as labels.
#[derive(Clone)]
pub struct Outcome {
    /// The workload that answered, or the one addressed; None: unknown.
    pub destination: Option<Arc<Workload>>,
    pub grpc: bool,
    pub response_code: StatusCode,
    pub flags: ResponseFlags,
    /// A gRPC response's status (headers or trailers), known when it ends.
    pub grpc_status: Option<String>,
}

impl Outcome {
    /// Whether both give the same labels.
    fn labels_as(&self, other: &Outcome) -> bool {
        let destination = match (&self.destination, &other.destination) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                Arc::ptr_eq(a, b)
                    || (a.workload_name() == b.workload_name() && a.identity == b.identity)
            }
            _ => false,
        };
        destination
            && self.grpc == other.grpc
            && self.response_code == other.response_code
            && self.flags == other.flags
            && self.grpc_status == other.grpc_status
    }
}

/// One label set's metrics: handles into the families, found once.
struct Recorded {
    labels: RequestLabels,
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// How many label sets a connection keeps handles for (its requests mostly
/// share one or two: the same source, service and a few endpoints and codes).
const LABEL_SETS_KEPT: usize = 16;

/// The metrics of one downstream (tunnelled) connection's requests. The labels
/// that are the connection's own (its source, the service addressed) are made
/// once; each label set its requests had keeps its handles into the families, so
/// recording a request neither formats labels nor hashes them (the families'
/// `get_or_create` per request took about a tenth of the waypoint's CPU).
pub struct ConnMetrics {
    metrics: RequestMetrics,
    /// The connection's labels; the per-request ones come from each Outcome.
    base: RequestLabels,
    seen: Mutex<Vec<(Outcome, Arc<Recorded>)>>,
}

impl ConnMetrics {
    /// `base`: the labels every request of the connection has (the per-request
    /// ones are replaced).
    pub fn new(metrics: RequestMetrics, base: RequestLabels) -> Self {
        Self {
            metrics,
            base,
            seen: Mutex::new(Vec::new()),
        }
    }

    fn recorded(&self, outcome: &Outcome) -> Arc<Recorded> {
        let mut seen = self.seen.lock().expect("not poisoned");
        if let Some((_, recorded)) = seen.iter().find(|(o, _)| o.labels_as(outcome)) {
            return recorded.clone();
        }
        let labels = self.labels(outcome);
        let m = &self.metrics;
        let recorded = Arc::new(Recorded {
            requests: m.requests.get_or_create(&labels).clone(),
            duration: m.duration.get_or_create(&labels).clone(),
            request_bytes: m.request_bytes.get_or_create(&labels).clone(),
            response_bytes: m.response_bytes.get_or_create(&labels).clone(),
            labels,
        });
        if seen.len() == LABEL_SETS_KEPT {
            seen.remove(0);
        }
        seen.push((outcome.clone(), recorded.clone()));
        recorded
    }

    /// Istio's labels of a request with this outcome.
    fn labels(&self, outcome: &Outcome) -> RequestLabels {
        let destination = outcome.destination.as_deref();
        RequestLabels {
            destination_workload: destination
                .map_or(UNKNOWN.into(), |w| w.workload_name().to_owned()),
            destination_workload_namespace: destination
                .map_or(UNKNOWN.into(), |w| w.namespace.clone()),
            destination_principal: destination.map_or(UNKNOWN.into(), |w| w.identity.to_string()),
            request_protocol: if outcome.grpc { "grpc" } else { "http" }.into(),
            response_code: outcome.response_code.as_u16().to_string(),
            grpc_response_status: outcome.grpc_status.clone().unwrap_or_default(),
            response_flags: outcome.flags.to_string(),
            ..self.base.clone()
        }
    }
}

/// A request whose response has started: recorded when that response ends.
pub struct Record {
    pub conn: Arc<ConnMetrics>,
    pub outcome: Outcome,
    pub started: Instant,
    /// Request body bytes read so far.
    pub request_bytes: Arc<AtomicU64>,
    /// The access log's own fields; None when it is off.
    pub access: Option<Access>,
}

/// What an access log line says beyond the labels.
pub struct Access {
    pub method: String,
    pub path: String,
    pub destination: SocketAddr,
    /// The endpoint that answered; None: the waypoint did.
    pub endpoint: Option<String>,
}

impl Access {
    /// Whether access lines are logged (`--access-log`): only then is a request's
    /// method and path copied for them.
    pub fn on() -> bool {
        tracing::enabled!(target: "access", tracing::Level::INFO)
    }
}

impl Record {
    fn finish(mut self, response_bytes: u64, grpc_status: Option<String>) {
        if grpc_status.is_some() {
            self.outcome.grpc_status = grpc_status;
        }
        let millis = self.started.elapsed().as_secs_f64() * 1000.0;
        let request_bytes = self.request_bytes.load(Ordering::Acquire);
        let recorded = self.conn.recorded(&self.outcome);
        recorded.requests.inc();
        recorded.duration.observe(millis);
        recorded.request_bytes.observe(request_bytes as f64);
        recorded.response_bytes.observe(response_bytes as f64);
        let Some(access) = self.access else {
            return;
        };
        let l = &recorded.labels;
        tracing::info!(
            target: "access",
            src_workload = %l.source_workload,
            src_identity = %l.source_principal,
            dst = %access.destination,
            dst_service = %l.destination_service,
            dst_workload = %l.destination_workload,
            endpoint = access.endpoint.as_deref().unwrap_or("-"),
            method = %access.method,
            path = %access.path,
            protocol = %l.request_protocol,
            status = %l.response_code,
            grpc_status = %l.grpc_response_status,
            flags = %l.response_flags,
            duration_ms = format_args!("{millis:.1}"),
            bytes_received = request_bytes,
            bytes_sent = response_bytes,
            "request"
        );
    }
}

/// A body that counts its bytes into `seen`, notes a `grpc-status` trailer, and
/// (for a response) finishes its record when it ends or is dropped.
pub struct Metered {
    inner: crate::waypoint::upstream::Body,
    seen: Arc<AtomicU64>,
    grpc_status: Option<String>,
    record: Option<Record>,
}

impl Metered {
    pub fn request(inner: crate::waypoint::upstream::Body, seen: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            seen,
            grpc_status: None,
            record: None,
        }
    }

    /// `grpc_status`: the status in the response's headers (trailers-only), if any.
    pub fn response(
        inner: crate::waypoint::upstream::Body,
        grpc_status: Option<String>,
        record: Record,
    ) -> Self {
        Self {
            inner,
            seen: Arc::default(),
            grpc_status,
            record: Some(record),
        }
    }

    fn finish(&mut self) {
        if let Some(record) = self.record.take() {
            record.finish(self.seen.load(Ordering::Acquire), self.grpc_status.take());
        }
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = crate::waypoint::upstream::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::waypoint::upstream::BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.seen.fetch_add(data.len() as u64, Ordering::AcqRel);
                }
                if let Some(status) = frame
                    .trailers_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                {
                    self.grpc_status = Some(status.to_owned());
                }
            }
            Poll::Ready(None) => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn labels() -> RequestLabels {
        RequestLabels {
            reporter: "waypoint".into(),
            source_workload: "a".into(),
            source_workload_namespace: "n".into(),
            source_principal: "p".into(),
            destination_workload: UNKNOWN.into(),
            destination_workload_namespace: UNKNOWN.into(),
            destination_principal: UNKNOWN.into(),
            destination_service: "s".into(),
            request_protocol: "grpc".into(),
            response_code: "200".into(),
            grpc_response_status: String::new(),
            response_flags: "-".into(),
            connection_security_policy: "mutual_tls".into(),
        }
    }

    #[test]
    fn requests_with_the_same_outcome_share_their_label_set_and_each_is_counted() {
        let mut registry = Registry::default();
        let metrics = RequestMetrics::register(&mut registry);
        let conn = ConnMetrics::new(metrics.clone(), labels());
        let outcome = |code: u16| Outcome {
            destination: None,
            grpc: true,
            response_code: StatusCode::from_u16(code).unwrap(),
            flags: ResponseFlags::NONE,
            grpc_status: None,
        };
        for _ in 0..3 {
            conn.recorded(&outcome(200)).requests.inc();
        }
        conn.recorded(&outcome(403)).requests.inc();
        assert_eq!(metrics.requests.get_or_create(&labels()).get(), 3);
        let denied = RequestLabels {
            response_code: "403".into(),
            ..labels()
        };
        assert_eq!(metrics.requests.get_or_create(&denied).get(), 1);
        // More label sets than a connection keeps: the first is found again.
        for code in 500..500 + LABEL_SETS_KEPT as u16 {
            conn.recorded(&outcome(code)).requests.inc();
        }
        conn.recorded(&outcome(200)).requests.inc();
        assert_eq!(metrics.requests.get_or_create(&labels()).get(), 4);
    }

    #[tokio::test]
    async fn a_response_is_counted_with_its_bytes_and_trailer_status_when_it_ends() {
        let mut registry = Registry::default();
        let metrics = RequestMetrics::register(&mut registry);
        let request_bytes = Arc::new(AtomicU64::new(0));
        let request = Metered::request(
            Full::new(Bytes::from_static(b"hello"))
                .map_err(|never| match never {})
                .boxed(),
            request_bytes.clone(),
        );
        assert_eq!(request.collect().await.unwrap().to_bytes().len(), 5);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "10".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, crate::waypoint::upstream::BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"0123456789"))),
            Ok(Frame::trailers(trailers)),
        ];
        let record = Record {
            conn: Arc::new(ConnMetrics::new(metrics.clone(), labels())),
            outcome: Outcome {
                destination: None,
                grpc: true,
                response_code: StatusCode::OK,
                flags: ResponseFlags::NONE,
                grpc_status: None,
            },
            started: Instant::now(),
            request_bytes,
            access: None,
        };
        let response = Metered::response(
            StreamBody::new(futures_util::stream::iter(frames)).boxed(),
            None,
            record,
        );
        let mut done = labels();
        done.grpc_response_status = "10".into();
        assert_eq!(
            metrics.requests.get_or_create(&done).get(),
            0,
            "not before the end"
        );
        response.collect().await.unwrap();
        assert_eq!(metrics.requests.get_or_create(&done).get(), 1);
        let mut page = String::new();
        prometheus_client::encoding::text::encode(&mut page, &registry).unwrap();
        assert!(
            page.lines()
                .any(|l| l.starts_with("istio_request_bytes_sum{")
                    && l.contains("grpc_response_status=\"10\"")
                    && l.ends_with(" 5.0")),
            "{page}"
        );
        assert!(
            page.lines()
                .any(|l| l.starts_with("istio_response_bytes_sum{") && l.ends_with(" 10.0")),
            "{page}"
        );
    }
}
