//! JWT validation for RequestAuthentication (at the waypoint): RS256, ES256 and
//! EdDSA signatures against a JWKS, expiry and not-before, issuer and audiences.
//! Verification uses ring (already the TLS provider); no algorithm is taken from
//! the token alone: the key's type decides, and `none` never verifies.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use ring::signature::{self, UnparsedPublicKey};
use serde::Deserialize;

/// A validated token: who it names, for whom, and its claims (what policy's
/// `request.auth.*` attributes read).
#[derive(Clone, Debug, Default)]
pub struct RequestAuth {
    /// `<iss>/<sub>`.
    pub principal: String,
    pub audiences: Vec<String>,
    pub presenter: Option<String>,
    pub claims: serde_json::Value,
}

/// Why a token is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("not a JWT")]
    NotAJwt,
    #[error("not a JWT (three parts)")]
    NotThreeParts,
    #[error("not base64url")]
    NotBase64,
    #[error("malformed header")]
    MalformedHeader,
    #[error("malformed payload")]
    MalformedPayload,
    #[error("no iss claim")]
    NoIssuer,
    #[error("JWK without {0}")]
    IncompleteKey(&'static str),
    #[error("no key {0:?} in the JWKS")]
    NoKey(String),
    /// With the token's `alg`.
    #[error("signature ({0}) does not verify")]
    BadSignature(String),
    #[error("issuer mismatch")]
    IssuerMismatch,
    /// The claim (`exp`, `nbf`).
    #[error("{0} is not a number")]
    NotANumber(&'static str),
    #[error("the token expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("audience not allowed")]
    AudienceNotAllowed,
}

/// Why a JWKS (inline in a policy, or fetched from its `jwksUri`) is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("the JWKS is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("not a JWKS: {0}")]
    NotJson(String),
    #[error("the JWKS has no keys")]
    NoKeys,
}

/// Why a request's token is refused (the request is answered 401).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Jwt(#[from] JwtError),
    #[error("issuer {0:?} is not accepted")]
    IssuerNotAccepted(String),
    /// No keys to check it with (the issuer's `jwksUri` could not be fetched, or
    /// is not fetched at all by `policy check`).
    #[error("{0}")]
    NoKeys(String),
    /// A RequestAuthentication that could not be compiled refuses every request
    /// it applies to (fail closed).
    #[error("{0}")]
    RefusedByPolicy(String),
}

/// A JSON Web Key Set.
#[derive(Clone, Debug, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub alg: Option<String>,
    #[serde(default)]
    pub n: Option<String>,
    #[serde(default)]
    pub e: Option<String>,
    #[serde(default)]
    pub crv: Option<String>,
    #[serde(default)]
    pub x: Option<String>,
    #[serde(default)]
    pub y: Option<String>,
}

/// The largest JWKS accepted (fetched from a jwksUri or inline): a larger body
/// is refused, never read whole.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

impl Jwks {
    pub fn parse(text: &str) -> Result<Self, JwksError> {
        if text.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge);
        }
        let jwks: Jwks =
            serde_json::from_str(text).map_err(|e| JwksError::NotJson(e.to_string()))?;
        if jwks.keys.is_empty() {
            return Err(JwksError::NoKeys);
        }
        Ok(jwks)
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

fn b64(part: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| JwtError::NotBase64)
}

/// The issuer a token claims, read without verifying (to pick the rule).
pub fn issuer(token: &str) -> Result<String, JwtError> {
    let payload = token.split('.').nth(1).ok_or(JwtError::NotAJwt)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&b64(payload)?).map_err(|_| JwtError::MalformedPayload)?;
    claims["iss"]
        .as_str()
        .map(str::to_owned)
        .ok_or(JwtError::NoIssuer)
}

/// Verifies `token` against `jwks`, its expiry, and `audiences` (when not empty).
pub fn verify(
    token: &str,
    jwks: &Jwks,
    issuer: &str,
    audiences: &[String],
) -> Result<RequestAuth, JwtError> {
    let parts: Vec<&str> = token.split('.').collect();
    let [header_b64, payload_b64, signature_b64] = parts.as_slice() else {
        return Err(JwtError::NotThreeParts);
    };
    let header: Header =
        serde_json::from_slice(&b64(header_b64)?).map_err(|_| JwtError::MalformedHeader)?;
    let signature = b64(signature_b64)?;
    let signed = format!("{header_b64}.{payload_b64}");
    let candidates: Vec<&Jwk> = jwks
        .keys
        .iter()
        .filter(|k| header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
        .collect();
    if candidates.is_empty() {
        return Err(JwtError::NoKey(header.kid.unwrap_or_default()));
    }
    let verified = candidates
        .iter()
        .any(|key| verify_with(key, &header.alg, signed.as_bytes(), &signature).unwrap_or(false));
    if !verified {
        return Err(JwtError::BadSignature(header.alg));
    }
    let claims: serde_json::Value =
        serde_json::from_slice(&b64(payload_b64)?).map_err(|_| JwtError::MalformedPayload)?;
    if claims["iss"].as_str() != Some(issuer) {
        return Err(JwtError::IssuerMismatch);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if let Some(exp) = claims.get("exp") {
        let exp = exp.as_i64().ok_or(JwtError::NotANumber("exp"))?;
        if now >= exp {
            return Err(JwtError::Expired);
        }
    }
    if let Some(nbf) = claims.get("nbf") {
        if now < nbf.as_i64().ok_or(JwtError::NotANumber("nbf"))? {
            return Err(JwtError::NotYetValid);
        }
    }
    let token_audiences: Vec<String> = match &claims["aud"] {
        serde_json::Value::String(a) => vec![a.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    if !audiences.is_empty() && !token_audiences.iter().any(|a| audiences.contains(a)) {
        return Err(JwtError::AudienceNotAllowed);
    }
    let subject = claims["sub"].as_str().unwrap_or_default();
    Ok(RequestAuth {
        principal: format!("{issuer}/{subject}"),
        audiences: token_audiences,
        presenter: claims["azp"].as_str().map(str::to_owned),
        claims,
    })
}

fn verify_with(key: &Jwk, alg: &str, message: &[u8], signature: &[u8]) -> Result<bool, JwtError> {
    if key.alg.as_deref().is_some_and(|a| a != alg) {
        return Ok(false);
    }
    let field = |v: &Option<String>, name: &'static str| -> Result<Vec<u8>, JwtError> {
        b64(v.as_deref().ok_or(JwtError::IncompleteKey(name))?)
    };
    Ok(match (key.kty.as_str(), alg) {
        ("RSA", "RS256") => {
            let components = signature::RsaPublicKeyComponents {
                n: field(&key.n, "n")?,
                e: field(&key.e, "e")?,
            };
            components
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, signature)
                .is_ok()
        }
        ("EC", "ES256") if key.crv.as_deref() == Some("P-256") => {
            let mut point = vec![4u8];
            point.extend(field(&key.x, "x")?);
            point.extend(field(&key.y, "y")?);
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(message, signature)
                .is_ok()
        }
        ("OKP", "EdDSA") if key.crv.as_deref() == Some("Ed25519") => {
            UnparsedPublicKey::new(&signature::ED25519, field(&key.x, "x")?)
                .verify(message, signature)
                .is_ok()
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7515, appendix A.2: an RS256 JWS and its key. Its exp (2011) has passed,
    // so a verified signature shows as "expired".
    const RFC_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw";
    const RFC_KEY: &str = r#"{"keys":[{"kty":"RSA","n":"ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ","e":"AQAB"}]}"#;

    #[test]
    fn rs256_verifies_and_expiry_is_enforced() {
        let jwks = Jwks::parse(RFC_KEY).unwrap();
        assert_eq!(issuer(RFC_TOKEN).unwrap(), "joe");
        assert_eq!(
            verify(RFC_TOKEN, &jwks, "joe", &[]).unwrap_err(),
            JwtError::Expired
        );
        // One flipped bit in the signature: it no longer verifies.
        let mut tampered = RFC_TOKEN.to_owned();
        tampered.replace_range(tampered.len() - 3..tampered.len() - 2, "A");
        assert_eq!(
            verify(&tampered, &jwks, "joe", &[]).unwrap_err(),
            JwtError::BadSignature("RS256".into())
        );
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let jwks = Jwks::parse(RFC_KEY).unwrap();
        assert!(verify("abc", &jwks, "joe", &[]).is_err());
        assert!(verify("a.b.c", &jwks, "joe", &[]).is_err());
        // alg none never verifies.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"iss":"joe"}"#)
        );
        assert_eq!(
            verify(&none, &jwks, "joe", &[]).unwrap_err(),
            JwtError::BadSignature("none".into())
        );
        assert!(matches!(Jwks::parse("{}"), Err(JwksError::NotJson(_))));
    }

    #[test]
    fn a_jwks_is_refused_with_a_typed_reason() {
        assert_eq!(
            Jwks::parse(r#"{"keys":[]}"#).unwrap_err(),
            JwksError::NoKeys
        );
        assert_eq!(
            Jwks::parse(&" ".repeat(MAX_JWKS_BYTES + 1)).unwrap_err(),
            JwksError::TooLarge
        );
        let not_json = Jwks::parse("keys").unwrap_err();
        assert!(matches!(not_json, JwksError::NotJson(_)), "{not_json}");
        assert!(
            not_json.to_string().starts_with("not a JWKS: "),
            "{not_json}"
        );
    }
}

/// Minting tokens with fresh keys, for tests (the `testing` feature): never in
/// the product's binaries.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    use ring::{
        rand::SystemRandom,
        signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
    };

    /// An ES256 issuer: one key, many tokens.
    pub struct Es256Issuer {
        key: EcdsaKeyPair,
        rng: SystemRandom,
    }

    impl Default for Es256Issuer {
        fn default() -> Self {
            let rng = SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .expect("key generation");
            let key =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                    .expect("a fresh key");
            Self { key, rng }
        }
    }

    impl Es256Issuer {
        pub fn jwks(&self) -> String {
            let point = self.key.public_key().as_ref();
            serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])}]})
            .to_string()
        }

        pub fn token(&self, claims: &serde_json::Value) -> String {
            let signed = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"k1"}"#),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let signature = self
                .key
                .sign(&self.rng, signed.as_bytes())
                .expect("signing");
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
        }
    }

    pub fn es256(claims: &serde_json::Value) -> (String, String) {
        let issuer = Es256Issuer::default();
        (issuer.token(claims), issuer.jwks())
    }

    pub fn eddsa(claims: &serde_json::Value) -> (String, String) {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key generation");
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("a fresh key");
        let jwks = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(key.public_key().as_ref())}]});
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = key.sign(signed.as_bytes());
        (
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref())),
            jwks.to_string(),
        )
    }
}

#[cfg(test)]
mod minted {
    use super::*;

    fn claims(exp_in: i64, aud: &str) -> serde_json::Value {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        serde_json::json!({"iss": "https://issuer.test", "sub": "alice", "aud": aud, "azp": "web", "exp": now + exp_in, "role": {"name": "admin"}})
    }

    #[test]
    fn es256_and_eddsa_tokens_verify_with_their_claims() {
        for (token, jwks) in [
            testing::es256(&claims(3600, "shop")),
            testing::eddsa(&claims(3600, "shop")),
        ] {
            let jwks = Jwks::parse(&jwks).unwrap();
            let auth = verify(&token, &jwks, "https://issuer.test", &["shop".into()]).unwrap();
            assert_eq!(auth.principal, "https://issuer.test/alice");
            assert_eq!(auth.presenter.as_deref(), Some("web"));
            assert_eq!(auth.claims["role"]["name"], "admin");
            assert_eq!(
                verify(&token, &jwks, "https://issuer.test", &["other".into()]).unwrap_err(),
                JwtError::AudienceNotAllowed
            );
            assert_eq!(
                verify(&token, &jwks, "https://other.test", &[]).unwrap_err(),
                JwtError::IssuerMismatch
            );
        }
        let (expired, jwks) = testing::es256(&claims(-10, "shop"));
        assert_eq!(
            verify(
                &expired,
                &Jwks::parse(&jwks).unwrap(),
                "https://issuer.test",
                &[]
            )
            .unwrap_err(),
            JwtError::Expired
        );
        // A token signed by another key.
        let (token, _) = testing::es256(&claims(3600, "shop"));
        let (_, other) = testing::es256(&claims(3600, "shop"));
        assert!(verify(
            &token,
            &Jwks::parse(&other).unwrap(),
            "https://issuer.test",
            &[]
        )
        .is_err());
    }
}
