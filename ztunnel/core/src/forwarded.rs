//! The `forwarded` header (RFC 7239) on HBONE CONNECTs: who the sender acts for.
//! Istio puts the original client's address in `for=`, quoted with its port
//! (`for="10.0.0.1:40000"`, IPv6 in brackets). A receiver trusts it only when the
//! sender's proven identity matches the workload at that address.

use std::net::{IpAddr, SocketAddr};

/// The `for=` value naming `client`: `for="ip:port"` (`for="[v6]:port"`).
pub fn for_client(client: SocketAddr) -> String {
    // SocketAddr's Display brackets IPv6 addresses, as RFC 7239 wants.
    format!("for=\"{client}\"")
}

/// The address in the first `for=` of a `forwarded` value, with its port when
/// given. Quoted and unquoted forms, IPv4 and bracketed IPv6; obfuscated or
/// `unknown` nodes give None.
pub fn parse_for(value: &str) -> Option<(IpAddr, Option<u16>)> {
    let node = value.split([',', ';']).find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then_some(value.trim())
    })?;
    let node = node
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(node);
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some((addr.ip(), Some(addr.port())));
    }
    let bare = node
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(node);
    bare.parse::<IpAddr>().ok().map(|ip| (ip, None))
}

/// The client address `remote.ip` and `remoteIpBlocks` judge (Istio's
/// `numTrustedProxies`, Envoy's `xff_num_trusted_hops`): with N trusted proxies in
/// front, the Nth address from the right of X-Forwarded-For (the one the
/// outermost trusted proxy saw). With none, too few addresses, or one that does
/// not parse: `peer`, so a client cannot name its own address.
pub fn remote_ip(x_forwarded_for: &[&str], trusted_proxies: usize, peer: IpAddr) -> IpAddr {
    if trusted_proxies == 0 {
        return peer;
    }
    let hops: Vec<&str> = x_forwarded_for
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let Some(index) = hops.len().checked_sub(trusted_proxies) else {
        return peer;
    };
    let hop = hops[index];
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_and_unquoted_forms_parse() {
        let v4: IpAddr = "10.244.0.2".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(parse_for("for=10.244.0.2"), Some((v4, None)));
        assert_eq!(parse_for("for=\"10.244.0.2\""), Some((v4, None)));
        assert_eq!(parse_for("for=\"10.244.0.2:4711\""), Some((v4, Some(4711))));
        assert_eq!(
            parse_for("For=\"[2001:db8::1]:4711\""),
            Some((v6, Some(4711)))
        );
        assert_eq!(parse_for("for=\"[2001:db8::1]\""), Some((v6, None)));
        assert_eq!(
            parse_for("proto=http;for=\"10.244.0.2:1\", for=10.0.0.9"),
            Some((v4, Some(1))),
            "the first element is the original client"
        );
        assert_eq!(parse_for("for=unknown"), None);
        assert_eq!(parse_for("for=\"_hidden\""), None);
        assert_eq!(parse_for("by=10.244.0.2"), None);
    }

    /// What a sender could write to confuse the receiver: nothing here names a
    /// client (the receiver then falls back to the connection's own address).
    #[test]
    fn malformed_for_values_name_no_client() {
        for value in [
            "",
            "for=",
            "for=\"\"",
            "for=\"10.244.0.2:99999\"",
            "for=\"10.244.0.2\"x",
            "for=10.244.0.2.7",
            "for=\"[10.244.0.2]:80",
            "for=2001:db8::1:80:80:80:80:80:80",
            "forwarded=10.244.0.2",
            "xfor=10.244.0.2",
        ] {
            assert_eq!(parse_for(value), None, "{value:?}");
        }
        // Whitespace and case around a valid pair are tolerated.
        assert_eq!(
            parse_for("  FOR = \"10.244.0.2:80\" "),
            Some(("10.244.0.2".parse().unwrap(), Some(80)))
        );
    }

    #[test]
    fn x_forwarded_for_with_empty_or_bogus_hops_falls_back_to_the_peer() {
        let peer: IpAddr = "10.244.0.2".parse().unwrap();
        assert_eq!(remote_ip(&["1.2.3.4,"], 1, peer), peer, "an empty last hop");
        assert_eq!(remote_ip(&["1.2.3.4, unknown"], 1, peer), peer);
        assert_eq!(remote_ip(&[""], 1, peer), peer);
        assert_eq!(remote_ip(&["1.2.3.4"], usize::MAX, peer), peer);
    }

    #[test]
    fn what_is_sent_parses_back() {
        for addr in ["10.244.0.2:4711", "[2001:db8::1]:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let sent = for_client(addr);
            assert!(sent.starts_with("for=\"") && sent.ends_with('"'), "{sent}");
            assert_eq!(parse_for(&sent), Some((addr.ip(), Some(addr.port()))));
        }
        assert_eq!(
            for_client("[2001:db8::1]:80".parse().unwrap()),
            "for=\"[2001:db8::1]:80\""
        );
    }

    #[test]
    fn x_forwarded_for_counts_only_as_far_as_proxies_are_trusted() {
        let peer: IpAddr = "10.244.0.2".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(remote_ip(&["1.2.3.4"], 0, peer), peer, "no trusted proxy");
        assert_eq!(remote_ip(&[], 1, peer), peer);
        assert_eq!(remote_ip(&["1.2.3.4"], 1, peer), ip("1.2.3.4"));
        assert_eq!(
            remote_ip(&["6.6.6.6, 1.2.3.4"], 1, peer),
            ip("1.2.3.4"),
            "what the client wrote on the left is not believed"
        );
        assert_eq!(
            remote_ip(&["6.6.6.6", "1.2.3.4, 5.6.7.8"], 2, peer),
            ip("1.2.3.4")
        );
        assert_eq!(remote_ip(&["1.2.3.4"], 2, peer), peer, "too few hops");
        assert_eq!(remote_ip(&["garbage"], 1, peer), peer);
        assert_eq!(remote_ip(&["[2001:db8::1]:80"], 1, peer), ip("2001:db8::1"));
    }
}
