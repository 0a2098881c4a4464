//! The certificate authority (`ztunnel-ca`): signs workload CSRs it can vouch for.
//!
//! - [`Authority`]: the signing material (a self-generated root kept in a directory,
//!   or Istio's `cacerts` files) and the rules every certificate follows.
//! - [`server`]: Istio's CA API, gRPC `IstioCertificateService/CreateCertificate`
//!   over TLS, with caller authentication and node authorization.
//! - [`client`]: the same API from the tunnel's side (also talks to istiod).

pub mod auth;
pub mod kube;
pub mod server;

// The API and its client live in core (the tunnel and the waypoint call the CA).
pub use ztunnel_core::ca::{api, client};
// Core's modules and the Kubernetes source under the names they had in one crate.
use ztunnel_config::{self as config, k8s};
use ztunnel_core::{identity, tls};

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::identity::Identity;

/// Istio's `cacerts` file names.
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";

/// Certificates are valid from a little before they are signed: clocks differ.
const BACKDATE: Duration = Duration::from_secs(60);
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Clone, Debug)]
pub struct AuthorityOptions {
    /// Holds the `cacerts` files; a root is generated here when there are none.
    pub dir: PathBuf,
    pub trust_domain: String,
    /// For a CSR that asks for no particular lifetime (Istio: 24 h).
    pub default_ttl: Duration,
    /// Longer requests are refused.
    pub max_ttl: Duration,
}

/// Why a CSR was not signed; `reason()` is the metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("caller not authenticated: {0}")]
    Unauthenticated(String),
    /// Too many failed authentications from one address lately.
    #[error("caller not authenticated, rate limited: {0}")]
    RateLimited(String),
    #[error("not authorized: {0}")]
    NotOnNode(String),
    #[error("not authorized: {0}")]
    NotOwnIdentity(String),
    #[error("invalid CSR: {0}")]
    BadCsr(String),
    #[error("invalid CSR: it must carry exactly one URI SAN, it has {0} SANs")]
    SanCount(usize),
    #[error("invalid CSR: {0} is not in this CA's trust domain")]
    ForeignTrustDomain(String),
    #[error(
        "requested lifetime {}s exceeds the maximum {}s",
        .asked.as_secs(),
        .max.as_secs()
    )]
    TtlTooLong { asked: Duration, max: Duration },
    #[error("internal error: {0}")]
    Internal(String),
}

impl Refusal {
    /// The gRPC status the caller gets: Istio's CA answers the same codes.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Self::RateLimited(_) => tonic::Code::ResourceExhausted,
            Self::NotOnNode(_) | Self::NotOwnIdentity(_) => tonic::Code::PermissionDenied,
            Self::BadCsr(_)
            | Self::SanCount(_)
            | Self::ForeignTrustDomain(_)
            | Self::TtlTooLong { .. } => tonic::Code::InvalidArgument,
            Self::Internal(_) => tonic::Code::Internal,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "unauthenticated",
            Self::RateLimited(_) => "rate_limited",
            Self::NotOnNode(_) => "not_on_caller_node",
            Self::NotOwnIdentity(_) => "not_caller_identity",
            Self::BadCsr(_) => "bad_csr",
            Self::SanCount(_) => "san_count",
            Self::ForeignTrustDomain(_) => "foreign_trust_domain",
            Self::TtlTooLong { .. } => "ttl_too_long",
            Self::Internal(_) => "internal",
        }
    }
}

/// Why the signing material could not be loaded, generated or stored: each
/// names the file.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("reading {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("writing {}: {error}", .path.display())]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("creating {}: {error}", .path.display())]
    CreateDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {reason}", .path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "{} exists without {CA_CERT}: refusing to overwrite a key (remove it to have a new \
         root generated)",
        .0.display()
    )]
    KeyWithoutCertificate(PathBuf),
    #[error("in {}: {CA_KEY} is not the key of {CA_CERT}", .0.display())]
    KeyMismatch(PathBuf),
    #[error("generating a certificate: {0}")]
    Generate(rcgen::Error),
}

impl AuthorityError {
    fn malformed(path: &Path, reason: impl std::fmt::Display) -> Self {
        Self::Malformed {
            path: path.to_owned(),
            reason: reason.to_string(),
        }
    }
}

/// The CA's signing material and policy.
pub struct Authority {
    options: AuthorityOptions,
    issuer: Issuer<'static, KeyPair>,
    /// Between the signing certificate and the root, from `cert-chain.pem`
    /// (Istio: ca-cert, intermediates, root); empty for a self-generated root.
    chain_pem: String,
    /// `root-cert.pem`: the trust bundle handed to every workload.
    root_pem: String,
    root_not_after: SystemTime,
}

impl Authority {
    /// Loads `cacerts` from the directory, generating a self-signed root there first
    /// if it holds none.
    pub fn load_or_create(options: AuthorityOptions) -> Result<Self, AuthorityError> {
        let dir = &options.dir;
        if !dir.join(CA_CERT).exists() {
            generate_root(dir, &options.trust_domain)?;
        }
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path)
                .map(|text| (text, path.clone()))
                .map_err(|error| AuthorityError::Read { path, error })
        };
        let (ca_cert, cert_path) = read(CA_CERT)?;
        let (key, key_path) = read(CA_KEY)?;
        let key = KeyPair::from_pem(&key).map_err(|e| AuthorityError::malformed(&key_path, e))?;
        check_key_matches(&ca_cert, &cert_path, &key)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_cert, key)
            .map_err(|e| AuthorityError::malformed(&cert_path, e))?;
        let (root_pem, root_path) = read(ROOT_CERT)?;
        let chain_pem = match dir.join(CERT_CHAIN).exists() {
            true => read(CERT_CHAIN)?.0,
            false => String::new(),
        };
        let roots = crate::tls::parse_certs(&root_pem)
            .map_err(|e| AuthorityError::malformed(&root_path, e))?;
        let root_not_after = roots
            .iter()
            .map(|r| not_after(r, &root_path))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .min()
            .expect("parse_certs returns at least one");
        Ok(Self {
            options,
            issuer,
            chain_pem,
            root_pem,
            root_not_after,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.options.trust_domain
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn root_not_after(&self) -> SystemTime {
        self.root_not_after
    }

    /// Checks a CSR and returns the identity it asks for, without signing.
    pub fn check_csr(
        &self,
        csr_pem: &str,
    ) -> Result<(Identity, CertificateSigningRequestParams), Refusal> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Refusal::BadCsr(format!("cannot parse or verify it: {e}")))?;
        let sans = &csr.params.subject_alt_names;
        let [SanType::URI(uri)] = sans.as_slice() else {
            return Err(Refusal::SanCount(sans.len()));
        };
        let identity: Identity = uri
            .as_str()
            .parse()
            .map_err(|e| Refusal::BadCsr(format!("{e}")))?;
        if identity.trust_domain() != self.options.trust_domain {
            return Err(Refusal::ForeignTrustDomain(identity.to_string()));
        }
        Ok((identity, csr))
    }

    /// Signs a checked CSR for `ttl` (or the default). Returns Istio's response
    /// chain: the leaf, the chain to the root if any, and the root(s) last.
    pub fn sign(
        &self,
        identity: &Identity,
        csr: &CertificateSigningRequestParams,
        ttl: Option<Duration>,
    ) -> Result<Vec<String>, Refusal> {
        let ttl = ttl.unwrap_or(self.options.default_ttl);
        if ttl > self.options.max_ttl {
            return Err(Refusal::TtlTooLong {
                asked: ttl,
                max: self.options.max_ttl,
            });
        }
        let leaf = self
            .leaf_params(identity, ttl)
            .and_then(|params| params.signed_by(&csr.public_key, &self.issuer))
            .map_err(|e| Refusal::Internal(format!("signing: {e}")))?;
        let mut chain = vec![leaf.pem()];
        if !self.chain_pem.trim().is_empty() {
            chain.push(self.chain_pem.clone());
        }
        chain.push(self.root_pem.clone());
        Ok(chain)
    }

    fn leaf_params(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<CertificateParams, rcgen::Error> {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        // Istio leaves the subject empty; the SAN carries the identity.
        params.distinguished_name = DistinguishedName::new();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    /// A certificate for the CA's own TLS listener, for these DNS names.
    pub fn serving_certificate(
        &self,
        dns_names: &[String],
    ) -> Result<(String, String), rcgen::Error> {
        let key = KeyPair::generate()?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::from_secs(365 * 24 * 3600);
        params.serial_number = Some(random_serial());
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = cert.pem();
        if !self.chain_pem.trim().is_empty() {
            chain.push_str(&self.chain_pem);
        }
        Ok((chain, key.serialize_pem()))
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    fastrand_fill(&mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and never shorter than 16 bytes
    SerialNumber::from_slice(&bytes)
}

/// Serial numbers must be unpredictable: from the system's CSPRNG via ring.
fn fastrand_fill(bytes: &mut [u8]) {
    use rustls::crypto::ring::default_provider;
    default_provider()
        .secure_random
        .fill(bytes)
        .expect("the system random source works");
}

fn not_after(
    der: &rustls::pki_types::CertificateDer<'_>,
    path: &Path,
) -> Result<SystemTime, AuthorityError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| AuthorityError::malformed(path, e))?;
    let secs = cert.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
}

fn generate_root(dir: &Path, trust_domain: &str) -> Result<(), AuthorityError> {
    fs::create_dir_all(dir).map_err(|error| AuthorityError::CreateDir {
        path: dir.to_owned(),
        error,
    })?;
    let key = KeyPair::generate().map_err(AuthorityError::Generate)?;
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params
        .distinguished_name
        .push(DnType::CommonName, "ztunnel root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - BACKDATE;
    params.not_after = now + ROOT_LIFETIME;
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key).map_err(AuthorityError::Generate)?;
    if dir.join(CA_KEY).exists() {
        return Err(AuthorityError::KeyWithoutCertificate(dir.join(CA_KEY)));
    }
    write_atomically(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), PRIVATE)?;
    write_atomically(&dir.join(ROOT_CERT), cert.pem().as_bytes(), PUBLIC)?;
    // ca-cert.pem last: its presence means the directory is complete.
    write_atomically(&dir.join(CA_CERT), cert.pem().as_bytes(), PUBLIC)?;
    Ok(())
}

pub(crate) const PRIVATE: u32 = 0o600;
pub(crate) const PUBLIC: u32 = 0o644;

/// Writes `path` through a temporary file renamed over it, so that a reader or a
/// restarted CA finds the old contents or the new, never a part. A file that
/// already holds exactly `contents` is left as it is (a restart over the same
/// directory adopts it).
pub(crate) fn write_atomically(
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), AuthorityError> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    if fs::read(path).is_ok_and(|existing| existing == contents) {
        return Ok(());
    }
    let Some(name) = path.file_name() else {
        return Err(AuthorityError::malformed(path, "not a file name"));
    };
    let name = name.to_string_lossy();
    let temporary = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temporary, path)
    };
    write().map_err(|error| {
        let _ = fs::remove_file(&temporary);
        AuthorityError::Write {
            path: path.to_owned(),
            error,
        }
    })
}

/// That `key` is the key of the certificate `cert_pem`: a directory whose key
/// and certificate disagree would sign certificates nobody can verify.
fn check_key_matches(cert_pem: &str, path: &Path, key: &KeyPair) -> Result<(), AuthorityError> {
    use rcgen::PublicKeyData;
    let der = crate::tls::parse_certs(cert_pem)
        .map_err(|e| AuthorityError::malformed(path, e))?
        .swap_remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| AuthorityError::malformed(path, e))?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(AuthorityError::KeyMismatch(
            path.parent().unwrap_or(path).to_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path) -> AuthorityOptions {
        AuthorityOptions {
            dir: dir.to_owned(),
            trust_domain: "cluster.local".into(),
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(7200),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ztunnel-ca-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_restart_over_the_same_directory_adopts_its_root() {
        let dir = temp_dir("restart");
        let first = Authority::load_or_create(options(&dir)).unwrap();
        let again = Authority::load_or_create(options(&dir)).unwrap();
        assert_eq!(first.root_pem(), again.root_pem());
        // Writing the same files again (a Secret's copy) is a no-op, not "File exists".
        let key = fs::read(dir.join(CA_KEY)).unwrap();
        write_atomically(&dir.join(CA_KEY), &key, PRIVATE).unwrap();
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.join(CA_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key stays private");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn each_refusal_answers_its_grpc_code_and_names_its_reason() {
        use tonic::Code;
        let s = String::new;
        let ttl = Duration::from_secs(1);
        let cases = [
            (
                Refusal::Unauthenticated(s()),
                Code::Unauthenticated,
                "unauthenticated",
            ),
            (
                Refusal::RateLimited(s()),
                Code::ResourceExhausted,
                "rate_limited",
            ),
            (
                Refusal::NotOnNode(s()),
                Code::PermissionDenied,
                "not_on_caller_node",
            ),
            (
                Refusal::NotOwnIdentity(s()),
                Code::PermissionDenied,
                "not_caller_identity",
            ),
            (Refusal::BadCsr(s()), Code::InvalidArgument, "bad_csr"),
            (Refusal::SanCount(2), Code::InvalidArgument, "san_count"),
            (
                Refusal::ForeignTrustDomain(s()),
                Code::InvalidArgument,
                "foreign_trust_domain",
            ),
            (
                Refusal::TtlTooLong {
                    asked: ttl,
                    max: ttl,
                },
                Code::InvalidArgument,
                "ttl_too_long",
            ),
            (Refusal::Internal(s()), Code::Internal, "internal"),
        ];
        for (refusal, code, reason) in cases {
            assert_eq!(
                (refusal.code(), refusal.reason()),
                (code, reason),
                "{refusal}"
            );
        }
    }

    #[test]
    fn a_key_without_its_certificate_is_never_overwritten() {
        let dir = temp_dir("orphan-key");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(CA_KEY), "the operator's key").unwrap();
        let err = Authority::load_or_create(options(&dir)).err().unwrap();
        assert!(
            matches!(&err, AuthorityError::KeyWithoutCertificate(p) if *p == dir.join(CA_KEY)),
            "{err}"
        );
        assert_eq!(
            fs::read_to_string(dir.join(CA_KEY)).unwrap(),
            "the operator's key"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_malformed_root_file_is_refused_with_its_path() {
        let dir = temp_dir("bad-root");
        Authority::load_or_create(options(&dir)).unwrap();
        fs::write(dir.join(ROOT_CERT), "not PEM").unwrap();
        let err = Authority::load_or_create(options(&dir)).err().unwrap();
        assert!(
            matches!(&err, AuthorityError::Malformed { path, .. } if *path == dir.join(ROOT_CERT)),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with(&dir.join(ROOT_CERT).display().to_string()),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let (a, b) = (temp_dir("key-a"), temp_dir("key-b"));
        Authority::load_or_create(options(&a)).unwrap();
        Authority::load_or_create(options(&b)).unwrap();
        fs::copy(b.join(CA_KEY), a.join(CA_KEY)).unwrap();
        let err = Authority::load_or_create(options(&a)).err().unwrap();
        assert!(matches!(err, AuthorityError::KeyMismatch(_)), "{err}");
        assert!(
            format!("{err:#}").contains("is not the key of ca-cert.pem"),
            "{err:#}"
        );
        fs::remove_dir_all(&a).unwrap();
        fs::remove_dir_all(&b).unwrap();
    }
}
