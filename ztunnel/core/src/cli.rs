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
