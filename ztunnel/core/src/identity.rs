//! Workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::{fmt, str::FromStr, sync::Arc};

/// A workload's SPIFFE identity, parsed strictly: lowercase scheme, a valid trust
/// domain, and exactly the path `/ns/<namespace>/sa/<service-account>`. Clones
/// share one copy (the workloads of a service account hold one identity).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(Arc<Parts>);

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("trust_domain", &self.0.trust_domain)
            .field("namespace", &self.0.namespace)
            .field("service_account", &self.0.service_account)
            .finish()
    }
}

/// Why a string is not an identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityError(String);

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IdentityError {}

const SCHEME: &str = "spiffe://";

impl Identity {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        check_trust_domain(trust_domain)?;
        check_name("namespace", namespace)?;
        check_name("service account", service_account)?;
        Ok(Self(Arc::new(Parts {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })))
    }

    /// Parses Istio's principal form, `<trust-domain>/ns/<ns>/sa/<sa>`, as used by
    /// AuthorizationPolicy.
    pub fn from_principal(principal: &str) -> Result<Self, IdentityError> {
        if principal.contains("://") {
            return Err(IdentityError(format!(
                "{principal:?}: a principal has no scheme (<trust-domain>/ns/<ns>/sa/<sa>)"
            )));
        }
        parse_path(principal)
    }

    pub fn trust_domain(&self) -> &str {
        &self.0.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }

    /// `<trust-domain>/ns/<ns>/sa/<sa>`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.0.trust_domain, self.0.namespace, self.0.service_account
        )
    }

    /// The same workload in another trust domain (for trust-domain aliases).
    pub fn with_trust_domain(&self, trust_domain: &str) -> Result<Self, IdentityError> {
        Self::new(trust_domain, self.namespace(), self.service_account())
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}", self.principal())
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError(format!("{uri:?}: a SPIFFE ID starts with {SCHEME:?}")))?;
        if rest.contains(['?', '#', '%']) {
            return Err(IdentityError(format!(
                "{uri:?}: query, fragment and percent-encoding are not allowed"
            )));
        }
        parse_path(rest).map_err(|e| IdentityError(format!("{uri:?}: {e}")))
    }
}

fn parse_path(text: &str) -> Result<Identity, IdentityError> {
    let parts: Vec<&str> = text.split('/').collect();
    match parts.as_slice() {
        [td, "ns", ns, "sa", sa] => Identity::new(td, ns, sa),
        _ => Err(IdentityError(format!(
            "{text:?}: expected <trust-domain>/ns/<namespace>/sa/<service-account>"
        ))),
    }
}

fn check_trust_domain(td: &str) -> Result<(), IdentityError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(IdentityError(format!(
            "trust domain {td:?}: 1-255 characters of a-z, 0-9, '.', '-', '_'"
        )))
    }
}

/// Kubernetes namespace and service-account names: DNS subdomain characters.
fn check_name(what: &str, name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError(format!(
            "{what} {name:?}: 1-253 characters of a-z, 0-9, '.', '-'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_a_spiffe_id() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
        assert_eq!(Identity::from_principal(&id.principal()).unwrap(), id);
    }

    #[test]
    fn refuses_anything_else_with_a_reason() {
        for (bad, reason) in [
            ("SPIFFE://cluster.local/ns/a/sa/b", "starts with"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "expected"),
            ("spiffe://cluster.local/ns/a/sa/", "service account"),
            ("spiffe://cluster.local/sa/b/ns/a", "expected"),
            ("spiffe://Cluster.local/ns/a/sa/b", "trust domain"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
            ("spiffe://cluster.local/ns/a%2Fb/sa/c", "percent"),
            ("spiffe:///ns/a/sa/b", "trust domain"),
            ("spiffe://td/ns/A/sa/b", "namespace"),
        ] {
            let err = bad.parse::<Identity>().unwrap_err().to_string();
            assert!(err.contains(reason), "{bad}: {err}");
        }
        assert!(Identity::from_principal("spiffe://td/ns/a/sa/b").is_err());
    }
}
