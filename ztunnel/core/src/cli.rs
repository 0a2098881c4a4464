//! What the binaries' command lines share.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// Like [`parse_duration`], also accepting milliseconds (`250ms`).
pub fn parse_duration_ms(text: &str) -> Result<Duration, String> {
    match text.strip_suffix("ms") {
        Some(ms) => ms
            .parse()
            .map(Duration::from_millis)
            .map_err(|_| format!("{text:?}: expected a number of milliseconds")),
        None => parse_duration(text),
    }
}

/// `90s`, `30m`, `24h`, `90d`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with s, m, h or d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (s, m, h, d)")),
    };
    Ok(Duration::from_secs(secs))
}

/// The flags every binary shares, spelled once: what mesh it is in, where its
/// configuration comes from, where it serves metrics and how long it drains.
/// Flattened into each binary's arguments (`#[command(flatten)]`).
#[derive(clap::Args, Clone, Debug)]
pub struct CommonArgs {
    /// The mesh's trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Directory of Kubernetes YAML, watched for changes.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Watch the cluster's API server instead (the default when running in a pod).
    #[arg(long)]
    pub kube: bool,
    /// How often the --config directory is checked for changes.
    #[arg(long, default_value = "1s", value_parser = parse_duration_ms)]
    pub config_poll: Duration,
    /// Older spelling of --config-poll, in milliseconds.
    #[arg(long, hide = true, conflicts_with = "config_poll")]
    pub config_poll_ms: Option<u64>,
    /// Where to serve Prometheus metrics (the CA's default: 127.0.0.1:15014).
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// On SIGTERM: servers stop accepting, and open connections get this long
    /// to finish.
    #[arg(
        long,
        alias = "drain-timeout",
        alias = "drain-grace-seconds",
        default_value = "5s",
        value_parser = parse_duration_ms
    )]
    pub drain_grace: Duration,
    /// How log lines are written: `text`, or `json` (one object per line).
    #[arg(long, value_enum, default_value_t)]
    pub log_format: crate::telemetry::LogFormat,
}

impl CommonArgs {
    /// The poll interval, from either spelling.
    pub fn config_poll(&self) -> Duration {
        self.config_poll_ms
            .map(Duration::from_millis)
            .unwrap_or(self.config_poll)
    }
}

/// The flags of a binary that serves workloads with the mesh's identities and
/// policy (the tunnel and the waypoint): the trust domain's aliases, the root
/// namespace, and the CA it gets certificates from.
#[derive(clap::Args, Clone, Debug)]
pub struct MeshArgs {
    /// Other trust domains accepted as this one (Istio's trustDomainAliases).
    #[arg(long = "trust-domain-alias")]
    pub trust_domain_aliases: Vec<String>,
    /// Policies in this namespace apply to the whole mesh.
    #[arg(long, default_value = crate::policy::ROOT_NAMESPACE)]
    pub root_namespace: String,
    /// The CA (`ztunnel-ca`, or istiod), host:port.
    #[arg(long)]
    pub ca_address: String,
    /// The name on the CA's TLS certificate.
    #[arg(long, default_value = "ztunnel-ca.istio-system.svc")]
    pub ca_server_name: String,
    /// PEM roots that signed the CA's TLS certificate.
    #[arg(long)]
    pub ca_root: PathBuf,
    /// The credential for the CA.
    #[arg(long)]
    pub ca_token: PathBuf,
    /// Lifetime asked for workload certificates (`--cert-ttl-seconds N`: the
    /// older spelling).
    #[arg(long, alias = "cert-ttl-seconds", default_value = "24h", value_parser = parse_duration)]
    pub cert_ttl: Duration,
}

impl MeshArgs {
    /// The options the tunnel and the waypoint are run with, from their flags.
    pub fn options(self, common: &CommonArgs) -> MeshOptions {
        MeshOptions {
            trust_domain: common.trust_domain.clone(),
            trust_domain_aliases: self.trust_domain_aliases,
            root_namespace: self.root_namespace,
            ca_address: self.ca_address,
            ca_server_name: self.ca_server_name,
            ca_root: self.ca_root,
            ca_token: self.ca_token,
            cert_ttl: self.cert_ttl,
        }
    }
}

/// A proxy's place in the mesh (the tunnel's and the waypoint's): whose
/// identities it trusts, where policies apply mesh-wide, and the CA its
/// certificates come from.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    pub trust_domain: String,
    pub trust_domain_aliases: Vec<String>,
    pub root_namespace: String,
    pub ca_address: String,
    pub ca_server_name: String,
    pub ca_root: PathBuf,
    pub ca_token: PathBuf,
    pub cert_ttl: Duration,
}

impl MeshOptions {
    /// The state's settings, for a proxy on `node` (empty: not a node's).
    pub fn settings(&self, node: &str) -> crate::state::MeshSettings {
        crate::state::MeshSettings {
            node: node.to_owned(),
            trust_domain: self.trust_domain.clone(),
            trust_domain_aliases: self.trust_domain_aliases.clone(),
            root_namespace: self.root_namespace.clone(),
        }
    }

    /// The certificate manager, with a client of the CA (its metrics registered).
    pub fn cert_manager(
        &self,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<std::sync::Arc<crate::certs::CertManager>, crate::ca::client::CaConfigError> {
        use crate::ca::client::{CaClient, CaClientConfig};
        let ca = CaClient::new(CaClientConfig::from_files(
            &self.ca_address,
            &self.ca_server_name,
            &self.ca_root,
            &self.ca_token,
        )?)?;
        let mut config = crate::certs::CertManagerConfig::new(&self.trust_domain);
        config.trust_domain_aliases = self.trust_domain_aliases.clone();
        config.ttl = self.cert_ttl;
        Ok(crate::certs::CertManager::new(
            std::sync::Arc::new(ca),
            config,
            registry,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        mesh: MeshArgs,
    }

    const REQUIRED: [&str; 7] = [
        "x",
        "--ca-address",
        "ca:15012",
        "--ca-root",
        "root.pem",
        "--ca-token",
        "token",
    ];

    #[test]
    fn durations_are_human_and_old_spellings_still_work() {
        let cli = Cli::parse_from(REQUIRED.iter().chain(&[
            "--config-poll",
            "250ms",
            "--cert-ttl",
            "12h",
            "--drain-grace",
            "20s",
        ]));
        assert_eq!(cli.common.config_poll(), Duration::from_millis(250));
        assert_eq!(cli.mesh.cert_ttl, Duration::from_secs(12 * 3600));
        assert_eq!(cli.common.drain_grace, Duration::from_secs(20));

        let old = Cli::parse_from(REQUIRED.iter().chain(&[
            "--config-poll-ms",
            "100",
            "--cert-ttl-seconds",
            "86400",
            "--drain-grace-seconds",
            "7",
        ]));
        assert_eq!(old.common.config_poll(), Duration::from_millis(100));
        assert_eq!(old.mesh.cert_ttl, Duration::from_secs(86400));
        assert_eq!(old.common.drain_grace, Duration::from_secs(7));
        let old = Cli::parse_from(REQUIRED.iter().chain(&["--drain-timeout=20s"]));
        assert_eq!(old.common.drain_grace, Duration::from_secs(20));
    }

    #[test]
    fn a_duration_without_a_known_unit_is_refused() {
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration_ms("ms").is_err());
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
    }
}
