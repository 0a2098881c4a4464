//! JWT parsing and verification. Properties: no panic on any token or JWKS; against
//! a fixed key (RFC 7515 A.2's RS256 key) only the exact bytes that key signed pass
//! the signature check: garbage, and any change to a signed token, never verify.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel_core::jwt::{issuer, verify, Jwks, JwtError};

const RFC_SIGNED: &str = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ";
const RFC_SIGNATURE: &str = "cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw";
const RFC_KEY: &str = r#"{"keys":[{"kty":"RSA","n":"ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ","e":"AQAB"}]}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // "<token>\n<jwks>": a JWKS of the fuzzer's own is parsed and used too.
    let (token, jwks_text) = text.split_once('\n').unwrap_or((text, ""));
    let _ = issuer(token);
    if let Ok(own) = Jwks::parse(jwks_text) {
        let _ = verify(token, &own, "joe", &[]);
    }
    let key = Jwks::parse(RFC_KEY).expect("the RFC key parses");
    match verify(token, &key, "joe", &["aud".to_owned()]) {
        // Past the signature: it must be the very bytes the key signed.
        Ok(_) => panic!("verified: {token:?}"),
        Err(
            JwtError::BadSignature(_)
            | JwtError::NotAJwt
            | JwtError::NotThreeParts
            | JwtError::MalformedHeader
            | JwtError::MalformedPayload
            | JwtError::NotBase64
            | JwtError::NoKey(_),
        ) => {}
        Err(_) => {
            let (signed, signature) = token.rsplit_once('.').expect("three parts");
            assert_eq!(
                signed, RFC_SIGNED,
                "a changed token passed the signature check"
            );
            assert_eq!(signature.trim_end_matches('='), RFC_SIGNATURE);
        }
    }
});
