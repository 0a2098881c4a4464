//! Mutual TLS between workloads: the trust bundle, peer verification (chain, expiry,
//! SPIFFE identity, trust-domain aliases) and rustls configurations that always use
//! a workload's current certificate.
//!
//! Only TLS 1.3 is offered. Chains are verified with webpki against every root in the
//! bundle (several during a root rotation); the leaf must carry exactly one URI SAN,
//! a SPIFFE ID of a trusted trust domain.

use std::{fmt, sync::Arc};

use rustls::pki_types::TrustAnchor;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring as provider, CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    sign::CertifiedKey,
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::identity::{Identity, IdentityError};

/// Why certificates, keys or a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("parsing PEM certificates: {0}")]
    Pem(rustls_pki_types::pem::Error),
    #[error("no certificate in the PEM text")]
    NoCertificate,
    #[error("parsing the PEM private key: {0}")]
    Key(rustls_pki_types::pem::Error),
    #[error("unsupported private key: {0}")]
    UnsupportedKey(rustls::Error),
    #[error("trust bundle: {0}")]
    TrustBundle(Box<TlsError>),
    #[error("the trust bundle holds no root certificate")]
    NoRoot,
    #[error("bad root certificate: {0}")]
    BadRoot(webpki::Error),
    #[error("parsing the certificate: {0}")]
    Parse(String),
    #[error("the certificate has no subject alternative name")]
    NoSan,
    #[error("the certificate has no URI SAN")]
    NoUriSan,
    #[error("the certificate has {0} URI SANs; exactly one is allowed")]
    SeveralUriSans(usize),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}

type Result<T, E = TlsError> = std::result::Result<T, E>;

/// ALPN for HBONE and for the CA's gRPC: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(provider::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider::default_provider().signature_verification_algorithms
}

/// The roots a node trusts and the trust domains it accepts (its own plus aliases).
#[derive(Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    trust_domains: Vec<String>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots.len())
            .field("trust_domains", &self.trust_domains)
            .finish()
    }
}

impl TrustBundle {
    /// `roots_pem` may hold several certificates (root rotation).
    pub fn from_pem(roots_pem: &str, trust_domain: &str, aliases: &[String]) -> Result<Self> {
        let roots = parse_certs(roots_pem).map_err(|e| TlsError::TrustBundle(Box::new(e)))?;
        Self::new(roots, trust_domain, aliases)
    }

    pub fn new(
        roots: Vec<CertificateDer<'static>>,
        trust_domain: &str,
        aliases: &[String],
    ) -> Result<Self> {
        if roots.is_empty() {
            return Err(TlsError::NoRoot);
        }
        let anchors = roots
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(TlsError::BadRoot)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut trust_domains = vec![trust_domain.to_owned()];
        trust_domains.extend(aliases.iter().cloned());
        Ok(Self {
            roots,
            anchors,
            trust_domains,
        })
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn trust_domains(&self) -> &[String] {
        &self.trust_domains
    }

    /// Whether two identities name the same workload, counting trust-domain aliases
    /// as one domain.
    pub fn same_workload(&self, a: &Identity, b: &Identity) -> bool {
        a.namespace() == b.namespace()
            && a.service_account() == b.service_account()
            && self.accepts_domain(a.trust_domain())
            && self.accepts_domain(b.trust_domain())
    }

    pub fn accepts_domain(&self, trust_domain: &str) -> bool {
        self.trust_domains.iter().any(|d| d == trust_domain)
    }

    /// Verifies a peer's chain for `usage` at `now` and returns its identity.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<Identity, PeerError> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| PeerError::Chain(e.to_string()))?;
        cert.verify_for_usage(
            algorithms().all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } => PeerError::Expired,
            // A root with the issuer's name but another key is no better.
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                PeerError::UnknownIssuer
            }
            other => PeerError::Chain(other.to_string()),
        })?;
        let identity = identity_of(end_entity).map_err(|e| PeerError::Identity(e.to_string()))?;
        if !self.accepts_domain(identity.trust_domain()) {
            return Err(PeerError::Identity(format!(
                "{identity}: trust domain {:?} is not trusted",
                identity.trust_domain()
            )));
        }
        Ok(identity)
    }
}

/// Why a peer certificate was refused.
#[derive(Clone, PartialEq, Eq)]
pub enum PeerError {
    UnknownIssuer,
    Expired,
    Chain(String),
    Identity(String),
    WrongIdentity { expected: String, got: String },
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownIssuer => f.write_str("certificate not issued by a trusted root"),
            Self::Expired => f.write_str("certificate expired"),
            Self::Chain(e) => write!(f, "certificate chain invalid: {e}"),
            Self::Identity(e) => write!(f, "certificate identity: {e}"),
            Self::WrongIdentity { expected, got } => {
                write!(f, "peer is {got}, expected {expected}")
            }
        }
    }
}

// rustls prints `Debug` in its errors: make that the readable text.
impl fmt::Debug for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for PeerError {}

impl From<PeerError> for rustls::Error {
    fn from(e: PeerError) -> Self {
        use rustls::CertificateError as C;
        let cert = match e {
            PeerError::UnknownIssuer => C::UnknownIssuer,
            PeerError::Expired => C::Expired,
            other => C::Other(rustls::OtherError(Arc::new(other))),
        };
        rustls::Error::InvalidCertificate(cert)
    }
}

/// The identity in a certificate: its one URI SAN, a SPIFFE ID.
pub fn identity_of(der: &CertificateDer<'_>) -> Result<Identity> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::Parse(e.to_string()))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::Parse(format!("the subject alternative names: {e}")))?
        .ok_or(TlsError::NoSan)?;
    let uris: Vec<&str> = sans
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => Ok(uri.parse()?),
        [] => Err(TlsError::NoUriSan),
        _ => Err(TlsError::SeveralUriSans(uris.len())),
    }
}

/// Every certificate in a PEM text, in order.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(TlsError::Pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(TlsError::Key)
}

/// A certificate and key in rustls form.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'_>,
) -> Result<Arc<CertifiedKey>> {
    let signing = provider::sign::any_supported_type(key).map_err(TlsError::UnsupportedKey)?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// Verifies the server side of an outbound connection: chain and, when given, the
/// exact identity the destination must present (secure naming).
#[derive(Debug)]
pub struct ServerVerifier {
    bundle: TrustBundle,
    expected: Option<Identity>,
}

impl ServerVerifier {
    pub fn new(bundle: TrustBundle, expected: Option<Identity>) -> Arc<Self> {
        Arc::new(Self { bundle, expected })
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = self.bundle.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if let Some(expected) = &self.expected {
            if !self.bundle.same_workload(expected, &got) {
                return Err(PeerError::WrongIdentity {
                    expected: expected.to_string(),
                    got: got.to_string(),
                }
                .into());
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

// The signature checks both verifiers share: TLS 1.3 only (the configs allow no
// other version, so a TLS 1.2 check means something is wrong), ring's algorithms.
fn refuse_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls13RequiredForQuic,
    ))
}

fn verify_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
}

/// Verifies the client side of an inbound connection: a valid chain and a SPIFFE
/// identity of a trusted domain. Which identities may do what is policy's business.
#[derive(Debug)]
pub struct ClientVerifier {
    bundle: TrustBundle,
}

impl ClientVerifier {
    pub fn new(bundle: TrustBundle) -> Arc<Self> {
        Arc::new(Self { bundle })
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundle.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// A server config (mTLS, TLS 1.3, h2) presenting `cert`.
pub fn server_config(
    cert: Arc<CertifiedKey>,
    bundle: TrustBundle,
) -> Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(ClientVerifier::new(bundle))
        .with_cert_resolver(Arc::new(FixedServerCert(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A client config (mTLS, TLS 1.3, h2) presenting `cert` and requiring the server to
/// be `expected`.
pub fn client_config(
    cert: Arc<CertifiedKey>,
    bundle: TrustBundle,
    expected: Identity,
) -> Result<Arc<rustls::ClientConfig>> {
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(ServerVerifier::new(bundle, Some(expected)))
        .with_client_cert_resolver(Arc::new(FixedClientCert(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The identity a connection's peer proved in its handshake.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<Identity> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    identity_of(leaf)
}

#[derive(Debug)]
struct FixedServerCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedServerCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
