//! The certificate manager: a certificate per local workload, its key generated on
//! the node and never sent anywhere, fetched on first use (concurrent first uses
//! share one request), renewed at about half its lifetime, and kept serving while
//! the CA is unreachable for as long as it is valid.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    ca::client::{CaApi, CaError},
    identity::Identity,
    tls::{self, PeerError, TlsError, TrustBundle},
};

#[derive(Clone, Debug)]
pub struct CertManagerConfig {
    pub trust_domain: String,
    pub trust_domain_aliases: Vec<String>,
    /// Lifetime to ask for (Istio: 24 h).
    pub ttl: Duration,
    /// Retry delays while the CA is unreachable: doubling from `backoff_initial`,
    /// capped at `backoff_max`, with jitter.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl CertManagerConfig {
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            trust_domain_aliases: Vec::new(),
            ttl: Duration::from_secs(24 * 3600),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// A workload's certificate, ready for TLS.
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<rustls::sign::CertifiedKey>,
    /// The roots the CA handed out with it, and the trust domains accepted.
    pub bundle: TrustBundle,
    pub info: CertInfo,
}

/// What `/certs` shows: never the key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: String,
    pub serial: String,
    pub not_before: u64,
    pub not_after: u64,
}

impl WorkloadCert {
    pub fn valid_at(&self, now: SystemTime) -> bool {
        let secs = unix(now);
        self.info.not_before <= secs && secs < self.info.not_after
    }

    /// mTLS server side, presenting this certificate.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        tls::server_config(self.key.clone(), self.bundle.clone())
    }

    /// mTLS client side, presenting this certificate and requiring `peer`.
    pub fn client_config(&self, peer: Identity) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        tls::client_config(self.key.clone(), self.bundle.clone(), peer)
    }
}

/// Why the manager has no certificate to give.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("the certificate of {0} expired and could not be renewed")]
    Expired(Identity),
    /// The first request failed (the manager keeps asking, backing off).
    #[error("no certificate for {identity}: {reason}")]
    Unavailable { identity: Identity, reason: String },
    #[error("the certificate manager stopped")]
    Stopped,
}

/// Why one certificate request failed (the manager logs it and asks again).
#[derive(Debug, thiserror::Error)]
enum IssueError {
    #[error("generating a key: {0}")]
    Key(rcgen::Error),
    #[error("building the CSR: {0}")]
    Csr(rcgen::Error),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("empty response")]
    EmptyResponse,
    #[error("the CA's root: {0}")]
    Root(TlsError),
    #[error("the CA's chain: {0}")]
    Chain(TlsError),
    #[error("the CA sent no certificate")]
    NoCertificate,
    #[error("the CA issued a certificate for {got}, not {asked}")]
    WrongIdentity { got: Identity, asked: Identity },
    #[error("the issued certificate does not verify: {0}")]
    DoesNotVerify(PeerError),
}

#[derive(Clone)]
enum State {
    Pending,
    Ready(Arc<WorkloadCert>),
    Failed(String),
}

struct Entry {
    state: watch::Receiver<State>,
    refresher: JoinHandle<()>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

pub struct CertManager {
    ca: Arc<dyn CaApi>,
    config: CertManagerConfig,
    entries: Mutex<HashMap<Identity, Entry>>,
    expiry: Family<IdentityLabels, Gauge>,
    root_expiry: Gauge,
    failures: prometheus_client::metrics::counter::Counter,
}

impl CertManager {
    pub fn new(
        ca: Arc<dyn CaApi>,
        config: CertManagerConfig,
        registry: &mut Registry,
    ) -> Arc<Self> {
        let expiry = Family::<IdentityLabels, Gauge>::default();
        let root_expiry = Gauge::default();
        registry.register(
            "ztunnel_workload_cert_expiry_timestamp",
            "Unix time each workload certificate expires",
            expiry.clone(),
        );
        registry.register(
            "ztunnel_root_cert_expiry_timestamp",
            "Unix time the earliest trusted root expires",
            root_expiry.clone(),
        );
        let failures = prometheus_client::metrics::counter::Counter::default();
        registry.register(
            "ztunnel_workload_cert_request_failures",
            "Certificate requests that failed (CA unreachable or refusing)",
            failures.clone(),
        );
        Arc::new(Self {
            ca,
            config,
            entries: Mutex::new(HashMap::new()),
            expiry,
            root_expiry,
            failures,
        })
    }

    /// The workload's current certificate, requesting it first if need be.
    pub async fn fetch(
        self: &Arc<Self>,
        identity: &Identity,
    ) -> Result<Arc<WorkloadCert>, CertError> {
        let mut state = {
            let mut entries = self.entries.lock().expect("not poisoned");
            let entry = entries.entry(identity.clone()).or_insert_with(|| {
                let (tx, rx) = watch::channel(State::Pending);
                let refresher = tokio::spawn(refresh(Arc::downgrade(self), identity.clone(), tx));
                Entry {
                    state: rx,
                    refresher,
                }
            });
            entry.state.clone()
        };
        loop {
            let current = state.borrow_and_update().clone();
            match current {
                State::Ready(cert) if cert.valid_at(SystemTime::now()) => return Ok(cert),
                State::Ready(_) => return Err(CertError::Expired(identity.clone())),
                State::Failed(reason) => {
                    return Err(CertError::Unavailable {
                        identity: identity.clone(),
                        reason,
                    })
                }
                State::Pending => {}
            }
            state.changed().await.map_err(|_| CertError::Stopped)?;
        }
    }

    /// How many certificate requests have failed so far.
    pub fn request_failures(&self) -> u64 {
        self.failures.get()
    }

    /// Drops the certificates of workloads that left the node.
    pub fn retain(&self, keep: impl Fn(&Identity) -> bool) {
        let mut entries = self.entries.lock().expect("not poisoned");
        entries.retain(|identity, entry| {
            let kept = keep(identity);
            if !kept {
                entry.refresher.abort();
                self.expiry.remove(&IdentityLabels {
                    identity: identity.to_string(),
                });
            }
            kept
        });
    }

    /// The certificates held now, sorted by identity.
    pub fn certificates(&self) -> Vec<CertInfo> {
        let entries = self.entries.lock().expect("not poisoned");
        let mut infos: Vec<CertInfo> = entries
            .values()
            .filter_map(|e| match &*e.state.borrow() {
                State::Ready(cert) => Some(cert.info.clone()),
                _ => None,
            })
            .collect();
        infos.sort_by(|a, b| a.identity.cmp(&b.identity));
        infos
    }

    async fn request(&self, identity: &Identity) -> Result<WorkloadCert, IssueError> {
        let key = rcgen::KeyPair::generate().map_err(IssueError::Key)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let uri = identity.to_string().try_into().map_err(IssueError::Csr)?;
        params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
        let csr = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(IssueError::Csr)?;
        let response = self
            .ca
            .create_certificate(&csr, identity, self.config.ttl)
            .await?;
        self.accept(identity, &key, &response)
    }

    /// Checks what the CA sent and makes it usable.
    fn accept(
        &self,
        identity: &Identity,
        key: &rcgen::KeyPair,
        response: &[String],
    ) -> Result<WorkloadCert, IssueError> {
        let (roots_pem, chain_pems) = response.split_last().ok_or(IssueError::EmptyResponse)?;
        let roots = tls::parse_certs(roots_pem).map_err(IssueError::Root)?;
        let mut chain = Vec::new();
        for pem in chain_pems {
            chain.extend(tls::parse_certs(pem).map_err(IssueError::Chain)?);
        }
        let leaf = chain.first().ok_or(IssueError::NoCertificate)?.clone();
        let got = tls::identity_of(&leaf).map_err(IssueError::Chain)?;
        if got != *identity {
            return Err(IssueError::WrongIdentity {
                got,
                asked: identity.clone(),
            });
        }
        let bundle = TrustBundle::new(
            roots,
            &self.config.trust_domain,
            &self.config.trust_domain_aliases,
        )
        .map_err(IssueError::Root)?;
        // Our own certificate must verify like a peer's would.
        bundle
            .verify(
                &leaf,
                &chain[1..],
                rustls::pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            )
            .map_err(IssueError::DoesNotVerify)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let info = cert_info(&leaf).map_err(IssueError::Chain)?;
        Ok(WorkloadCert {
            identity: identity.clone(),
            key: tls::certified_key(chain.clone(), &key_der).map_err(IssueError::Chain)?,
            chain,
            bundle,
            info,
        })
    }

    fn publish_metrics(&self, cert: &WorkloadCert) {
        self.expiry
            .get_or_create(&IdentityLabels {
                identity: cert.identity.to_string(),
            })
            .set(cert.info.not_after as i64);
        let root_expiry = cert
            .bundle
            .roots()
            .iter()
            .filter_map(|r| cert_info(r).ok())
            .map(|i| i.not_after)
            .min()
            .unwrap_or(0);
        self.root_expiry.set(root_expiry as i64);
    }
}

/// The per-workload task: get a certificate, publish it, sleep until it is due for
/// renewal, repeat; back off while the CA cannot be reached.
async fn refresh(
    manager: std::sync::Weak<CertManager>,
    identity: Identity,
    state: watch::Sender<State>,
) {
    let mut backoff = None::<Duration>;
    loop {
        let Some(this) = manager.upgrade() else {
            return;
        };
        let wait = this.renew(&identity, &state, &mut backoff).await;
        drop(this);
        tokio::time::sleep(wait).await;
    }
}

impl CertManager {
    /// One round of [`refresh`]: asks the CA and publishes what it gives. On a
    /// failure a certificate still valid keeps serving, and the next try backs off.
    /// Returns how long to wait before the next round.
    async fn renew(
        &self,
        identity: &Identity,
        state: &watch::Sender<State>,
        backoff: &mut Option<Duration>,
    ) -> Duration {
        match self.request(identity).await {
            Ok(cert) => {
                self.publish_metrics(&cert);
                let cert = Arc::new(cert);
                let due = renewal_due(&cert.info);
                tracing::info!(%identity, serial = %cert.info.serial, "workload certificate ready");
                state.send_replace(State::Ready(cert));
                *backoff = None;
                due
            }
            Err(e) => {
                self.failures.inc();
                let still_valid =
                    matches!(&*state.borrow(), State::Ready(c) if c.valid_at(SystemTime::now()));
                tracing::warn!(%identity, still_valid, "fetching the workload certificate failed: {e}");
                if !still_valid {
                    state.send_replace(State::Failed(e.to_string()));
                }
                let next = match *backoff {
                    None => self.config.backoff_initial,
                    Some(b) => (b * 2).min(self.config.backoff_max),
                };
                *backoff = Some(next);
                jitter(next, 0.2)
            }
        }
    }
}

/// Half of the remaining lifetime, give or take 5% of it. Measured from now, not
/// from `not_before`: CAs backdate certificates against clock skew.
fn renewal_due(info: &CertInfo) -> Duration {
    let now = SystemTime::now();
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(info.not_after);
    let remaining = expiry.duration_since(now).unwrap_or_default();
    remaining.mul_f64(0.5 + (fastrand::f64() - 0.5) * 0.1)
}

fn jitter(d: Duration, fraction: f64) -> Duration {
    d.mul_f64(1.0 + (fastrand::f64() - 0.5) * 2.0 * fraction)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn cert_info(der: &CertificateDer<'_>) -> Result<CertInfo, TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::Parse(e.to_string()))?;
    let identity = tls::identity_of(der)
        .map(|i| i.to_string())
        .unwrap_or_default();
    Ok(CertInfo {
        identity,
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_before: cert.validity().not_before.timestamp().max(0) as u64,
        not_after: cert.validity().not_after.timestamp().max(0) as u64,
    })
}

impl Drop for CertManager {
    fn drop(&mut self) {
        for entry in self.entries.get_mut().expect("not poisoned").values() {
            entry.refresher.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use rcgen::{
        BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };

    use super::*;
    use crate::ca::client::CertificateFuture;

    /// A CA in memory: signs what it is asked for with its own root, or fails
    /// while `down`. Counts the calls.
    struct FakeCa {
        issuer: Issuer<'static, KeyPair>,
        root_pem: String,
        down: AtomicBool,
        calls: AtomicUsize,
        /// Signs for this identity whatever is asked (a misbehaving CA).
        substitute: Option<Identity>,
    }

    impl FakeCa {
        fn new() -> Arc<Self> {
            Self::signing_for(None)
        }

        fn signing_for(substitute: Option<Identity>) -> Arc<Self> {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let root_pem = params.self_signed(&key).unwrap().pem();
            Arc::new(Self {
                issuer: Issuer::new(params, key),
                root_pem,
                down: AtomicBool::new(false),
                calls: AtomicUsize::new(0),
                substitute,
            })
        }

        fn sign(&self, csr_pem: &str, ttl: Duration) -> Result<Vec<String>, CaError> {
            let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
                CaError::Refused {
                    code: 3,
                    message: e.to_string(),
                }
            })?;
            let now = time::OffsetDateTime::now_utc();
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.not_before = now - Duration::from_secs(60);
            params.not_after = now + ttl;
            params.subject_alt_names = match &self.substitute {
                Some(other) => vec![rcgen::SanType::URI(other.to_string().try_into().unwrap())],
                None => csr.params.subject_alt_names.clone(),
            };
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.use_authority_key_identifier_extension = true;
            let leaf = params.signed_by(&csr.public_key, &self.issuer).unwrap();
            Ok(vec![leaf.pem(), self.root_pem.clone()])
        }
    }

    impl CaApi for FakeCa {
        fn create_certificate<'a>(
            &'a self,
            csr_pem: &'a str,
            _identity: &'a Identity,
            ttl: Duration,
        ) -> CertificateFuture<'a> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let answer = match self.down.load(Ordering::SeqCst) {
                true => Err(CaError::Unreachable("connection refused".into())),
                false => self.sign(csr_pem, ttl),
            };
            Box::pin(std::future::ready(answer))
        }
    }

    fn manager(ca: &Arc<FakeCa>) -> Arc<CertManager> {
        let mut config = CertManagerConfig::new("cluster.local");
        config.backoff_initial = Duration::from_millis(100);
        config.backoff_max = Duration::from_millis(700);
        CertManager::new(ca.clone(), config, &mut Registry::default())
    }

    fn id(name: &str) -> Identity {
        Identity::new("cluster.local", "shop", name).unwrap()
    }

    fn serial(state: &watch::Sender<State>) -> Option<String> {
        match &*state.borrow() {
            State::Ready(cert) => Some(cert.info.serial.clone()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn concurrent_first_uses_share_one_request() {
        let ca = FakeCa::new();
        let certs = manager(&ca);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let certs = certs.clone();
                tokio::spawn(
                    async move { certs.fetch(&id("web")).await.unwrap().info.serial.clone() },
                )
            })
            .collect();
        let mut serials = Vec::new();
        for task in tasks {
            serials.push(task.await.unwrap());
        }
        serials.dedup();
        assert_eq!(serials.len(), 1, "one certificate for all");
        assert_eq!(ca.calls.load(Ordering::SeqCst), 1, "one CA request");
        assert_eq!(certs.certificates()[0].identity, id("web").to_string());
    }

    #[tokio::test]
    async fn renewal_rotates_the_certificate_and_schedules_the_next_at_half_its_life() {
        let ca = FakeCa::new();
        let certs = manager(&ca);
        let (state, _rx) = watch::channel(State::Pending);
        let mut backoff = None;
        let due = certs.renew(&id("web"), &state, &mut backoff).await;
        let first = serial(&state).expect("a certificate");
        // 24 h asked for: renewal after half of it, give or take 5% of it.
        let life = Duration::from_secs(24 * 3600);
        assert!(
            due >= life.mul_f64(0.449) && due <= life.mul_f64(0.551),
            "{due:?}"
        );
        certs.renew(&id("web"), &state, &mut backoff).await;
        let second = serial(&state).expect("a certificate");
        assert_ne!(first, second, "renewal brings a new certificate");
        assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_renewal_keeps_the_valid_certificate_and_backs_off() {
        let ca = FakeCa::new();
        let certs = manager(&ca);
        let (state, _rx) = watch::channel(State::Pending);
        let mut backoff = None;
        certs.renew(&id("web"), &state, &mut backoff).await;
        let held = serial(&state).expect("a certificate");
        ca.down.store(true, Ordering::SeqCst);
        // Doubling from 100 ms, capped at 700 ms, each within its 20% jitter.
        for expected in [100, 200, 400, 700, 700] {
            let wait = certs.renew(&id("web"), &state, &mut backoff).await;
            let expected = Duration::from_millis(expected);
            assert!(
                wait >= expected.mul_f64(0.79) && wait <= expected.mul_f64(1.21),
                "{wait:?} for {expected:?}"
            );
            assert_eq!(
                serial(&state).as_deref(),
                Some(held.as_str()),
                "still serving"
            );
        }
        assert_eq!(certs.request_failures(), 5);
        // Back: a new certificate, and the backoff starts over.
        ca.down.store(false, Ordering::SeqCst);
        certs.renew(&id("web"), &state, &mut backoff).await;
        assert_ne!(serial(&state).unwrap(), held);
        assert_eq!(backoff, None);
    }

    #[tokio::test]
    async fn without_a_certificate_a_failure_is_reported_with_its_reason() {
        let ca = FakeCa::new();
        ca.down.store(true, Ordering::SeqCst);
        let certs = manager(&ca);
        let err = certs.fetch(&id("web")).await.err().expect("no certificate");
        assert!(
            matches!(&err, CertError::Unavailable { identity, reason }
                if *identity == id("web") && reason.contains("connection refused")),
            "{err}"
        );
        assert!(certs.certificates().is_empty());
    }

    #[tokio::test]
    async fn a_certificate_for_another_identity_is_refused() {
        let ca = FakeCa::signing_for(Some(id("admin")));
        let certs = manager(&ca);
        let err = certs.fetch(&id("web")).await.err().expect("refused");
        assert!(
            err.to_string()
                .contains("not spiffe://cluster.local/ns/shop/sa/web"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn workloads_that_leave_lose_their_certificates() {
        let ca = FakeCa::new();
        let certs = manager(&ca);
        certs.fetch(&id("web")).await.unwrap();
        certs.fetch(&id("db")).await.unwrap();
        certs.retain(|i| *i == id("db"));
        let held: Vec<String> = certs
            .certificates()
            .into_iter()
            .map(|c| c.identity)
            .collect();
        assert_eq!(held, vec![id("db").to_string()]);
    }
}
