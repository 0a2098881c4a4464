//! `cargo xtask run`: the mesh in a kind cluster. Creates (or reuses) the cluster,
//! builds the image from host-built binaries and loads it, applies `deploy/`, a
//! sample namespace in the mesh with a policy, and shows that traffic is mutual
//! TLS and that the policy is enforced. `--down` removes the cluster; `--dry-run`
//! prints every command instead of running it.

use std::{
    fmt,
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub struct Options {
    pub cluster: String,
    pub dry_run: bool,
    pub down: bool,
}

/// Where the image's build context is staged.
const CONTEXT: &str = "target/ztunnel-image";

/// The image every manifest in deploy/ names; kind serves it from the node, loaded
/// under this tag.
pub const IMAGE: &str = "ztunnel:dev";

/// One command of the flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub program: String,
    pub args: Vec<String>,
    pub when: When,
}

/// Commands that run only in some states of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    Always,
    /// `kind get clusters` does not list the cluster.
    NoCluster,
    /// `kind get clusters` lists the cluster (it is reused).
    ClusterExisted,
    /// The cluster has no Gateway API Gateway CRD.
    NoGatewayCrd,
    /// The cluster has no security.istio.io CRDs (no Istio).
    NoIstioCrds,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.program)?;
        for arg in &self.args {
            match arg.contains([' ', '"', '\'', '{', '}', '*', '[']) {
                true => write!(f, " '{}'", arg.replace('\'', "'\\''"))?,
                false => write!(f, " {arg}")?,
            }
        }
        match self.when {
            When::Always => Ok(()),
            When::NoCluster => write!(f, "    # only if the cluster does not exist"),
            When::ClusterExisted => write!(
                f,
                "    # only if the cluster was reused: the new image has the same tag"
            ),
            When::NoGatewayCrd => write!(f, "    # only if the cluster has no Gateway CRD"),
            When::NoIstioCrds => write!(f, "    # only if the cluster has no Istio CRDs"),
        }
    }
}

fn step(program: &str, args: &[&str], when: When) -> Step {
    Step {
        program: program.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        when,
    }
}

impl Options {
    fn context(&self) -> String {
        format!("kind-{}", self.cluster)
    }

    /// `kubectl --context kind-<cluster> ...`: never the user's current context.
    fn kubectl(&self, args: &[&str], when: When) -> Step {
        let context = self.context();
        let mut all = vec!["--context", context.as_str()];
        all.extend_from_slice(args);
        step("kubectl", &all, when)
    }

    /// Everything up to a running mesh with the sample deployed.
    pub fn setup(&self) -> Vec<Step> {
        let cluster = self.cluster.as_str();
        let image = IMAGE;
        vec![
            step(
                "kind",
                &["create", "cluster", "--name", cluster, "--wait", "120s"],
                When::NoCluster,
            ),
            step(
                "cargo",
                &[
                    "build",
                    "--release",
                    "-p",
                    "ztunnel",
                    "-p",
                    "ztunnel-ca",
                    "-p",
                    "ztunnel-waypoint",
                    "--bins",
                ],
                When::Always,
            ),
            step("mkdir", &["-p", CONTEXT], When::Always),
            step(
                "cp",
                &[
                    "target/release/ztunnel",
                    "target/release/ztunnel-ca",
                    "target/release/waypoint",
                    "deploy/Dockerfile",
                    CONTEXT,
                ],
                When::Always,
            ),
            // Symbol tables are a fifth of the binaries; the image has no debugger.
            step(
                "strip",
                &[
                    "target/ztunnel-image/ztunnel",
                    "target/ztunnel-image/ztunnel-ca",
                    "target/ztunnel-image/waypoint",
                ],
                When::Always,
            ),
            step("docker", &["build", "-t", image, CONTEXT], When::Always),
            step(
                "kind",
                &["load", "docker-image", image, "--name", cluster],
                When::Always,
            ),
            self.kubectl(&["apply", "-k", "deploy/gateway-api"], When::NoGatewayCrd),
            self.kubectl(&["apply", "-k", "deploy/istio-crds"], When::NoIstioCrds),
            self.kubectl(&["apply", "-k", "deploy"], When::Always),
            self.kubectl(
                &[
                    "-n",
                    "istio-system",
                    "rollout",
                    "restart",
                    "daemonset/ztunnel",
                    "deployment/ztunnel-ca",
                ],
                When::ClusterExisted,
            ),
            self.kubectl(
                &[
                    "-n",
                    "istio-system",
                    "rollout",
                    "status",
                    "deployment/ztunnel-ca",
                    "--timeout=180s",
                ],
                When::Always,
            ),
            self.kubectl(
                &[
                    "-n",
                    "istio-system",
                    "rollout",
                    "status",
                    "daemonset/ztunnel",
                    "--timeout=180s",
                ],
                When::Always,
            ),
            self.kubectl(&["apply", "-k", "deploy/sample"], When::Always),
            self.kubectl(
                &[
                    "-n",
                    "demo",
                    "wait",
                    "--for=condition=Available",
                    "deployment",
                    "--all",
                    "--timeout=180s",
                ],
                When::Always,
            ),
        ]
    }

    /// The client may call the server; the intruder may not.
    pub fn client_call(&self) -> Step {
        self.kubectl(
            &[
                "-n",
                "demo",
                "exec",
                "deploy/client",
                "--",
                "curl",
                "-sS",
                "-m",
                "5",
                "http://server",
            ],
            When::Always,
        )
    }

    pub fn intruder_call(&self) -> Step {
        self.kubectl(
            &[
                "-n",
                "demo",
                "exec",
                "deploy/intruder",
                "--",
                "curl",
                "-sS",
                "-m",
                "5",
                "http://server",
            ],
            When::Always,
        )
    }

    pub fn tunnel_pods(&self) -> Step {
        self.kubectl(
            &[
                "-n",
                "istio-system",
                "get",
                "pods",
                "-l",
                "app=ztunnel",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ],
            When::Always,
        )
    }

    /// A tunnel's metrics, through the API server's proxy (the image has no shell).
    pub fn tunnel_metrics(&self, pod: &str) -> Step {
        let path = format!("/api/v1/namespaces/istio-system/pods/{pod}:15020/proxy/metrics");
        self.kubectl(&["get", "--raw", &path], When::Always)
    }

    pub fn tunnel_logs(&self) -> Step {
        self.kubectl(
            &[
                "-n",
                "istio-system",
                "logs",
                "-l",
                "app=ztunnel",
                "--tail=-1",
            ],
            When::Always,
        )
    }

    pub fn teardown(&self) -> Vec<Step> {
        vec![step(
            "kind",
            &["delete", "cluster", "--name", &self.cluster],
            When::Always,
        )]
    }
}

pub fn run(options: &Options) -> Result<()> {
    if options.dry_run {
        print_plan(options);
        return Ok(());
    }
    require_tools(options.down)?;
    if options.down {
        for s in options.teardown() {
            execute(&s)?;
        }
        return Ok(());
    }
    let clusters = capture(&step("kind", &["get", "clusters"], When::Always))?;
    let have_cluster = clusters.lines().any(|c| c.trim() == options.cluster);
    let has_crd = |name: &str| {
        let probe = options.kubectl(&["get", "crd", name], When::Always);
        command(&probe).output().is_ok_and(|o| o.status.success())
    };
    for s in options.setup() {
        let skip = match s.when {
            When::Always => false,
            When::NoCluster => have_cluster,
            When::ClusterExisted => !have_cluster,
            When::NoGatewayCrd => has_crd("gateways.gateway.networking.k8s.io"),
            When::NoIstioCrds => has_crd("authorizationpolicies.security.istio.io"),
        };
        if skip {
            println!("xtask: skip  {s}");
            continue;
        }
        execute(&s)?;
    }
    prove(options)
}

fn print_plan(options: &Options) {
    println!(
        "# cargo xtask run{}: the commands it runs",
        if options.down { " --down" } else { "" }
    );
    if options.down {
        for s in options.teardown() {
            println!("{s}");
        }
        return;
    }
    println!("kind get clusters");
    for s in options.setup() {
        println!("{s}");
    }
    println!("# proof (all retried until they hold at once, up to 120 s: pods are enrolled shortly after they start):");
    println!("{}    # must answer", options.client_call());
    println!(
        "{}    # must fail: the policy allows only the client",
        options.intruder_call()
    );
    println!("{}", options.tunnel_pods());
    println!(
        "{}    # for each tunnel pod",
        options.tunnel_metrics("<ztunnel pod>")
    );
    println!("{}", options.tunnel_logs());
    if let Err(e) = require_tools(false) {
        println!("# note: this machine could not run it: {e:#}");
    }
}

/// Shows, from the cluster itself, that the mesh works. The pods are enrolled
/// shortly after they start: every check is retried until all hold at once.
fn prove(options: &Options) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let proof = loop {
        match check(options) {
            Ok(proof) => break proof,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(e) => {
                println!("xtask: not yet: {e:#}");
                std::thread::sleep(Duration::from_secs(3));
            }
        }
    };
    println!(
        "\nPROOF 1: demo/client -> server answered: {}",
        proof.reply.trim()
    );
    println!(
        "PROOF 2: demo/intruder -> server refused ({})",
        proof.refusal.trim()
    );
    println!("PROOF 3: the server's tunnel counted the client's connections as mutual TLS:");
    for line in &proof.mtls {
        println!("  {line}");
    }
    let logs = capture(&options.tunnel_logs())?;
    println!("PROOF 4: the tunnel says why the intruder was refused:");
    for line in logs
        .lines()
        .filter(|l| l.contains("connection denied"))
        .take(3)
    {
        println!("  {line}");
    }
    println!(
        "\nThe mesh runs in kind cluster {:?} (kubectl --context {}). Remove it: cargo xtask run --down",
        options.cluster,
        options.context()
    );
    Ok(())
}

struct Proof {
    reply: String,
    refusal: String,
    mtls: Vec<String>,
}

fn check(options: &Options) -> Result<Proof> {
    let reply = capture(&options.client_call()).context("the client's call")?;
    if !reply.contains("hello from the server") {
        bail!("the client got {reply:?}");
    }
    let intruder = command(&options.intruder_call()).output()?;
    if intruder.status.success() {
        bail!(
            "the intruder reached the server: the policy is not enforced (yet?): {}",
            String::from_utf8_lossy(&intruder.stdout).trim()
        );
    }
    let pods = capture(&options.tunnel_pods())?;
    let mut mtls = Vec::new();
    for pod in pods.split_whitespace() {
        let metrics = capture(&options.tunnel_metrics(pod))?;
        mtls.extend(
            metrics
                .lines()
                .filter(|l| {
                    l.starts_with("istio_tcp_connections_opened_total{")
                        && l.contains("reporter=\"destination\"")
                        && l.contains(
                            "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
                        )
                        && l.contains("connection_security_policy=\"mutual_tls\"")
                })
                .map(str::to_owned),
        );
    }
    if mtls.is_empty() {
        bail!("no mutual-TLS connection from the client in the tunnels' metrics");
    }
    Ok(Proof {
        reply,
        refusal: String::from_utf8_lossy(&intruder.stderr).into_owned(),
        mtls,
    })
}

/// What the flow needs on this machine, and how to get what is missing.
pub fn require_tools(down: bool) -> Result<()> {
    let mut missing: Vec<String> = Vec::new();
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !works("docker", &["info", "--format", "{{.ServerVersion}}"]) {
        missing.push(
            "a running Docker engine (`docker info` fails): install Docker Engine \
             (Debian: `apt install docker.io`, or https://docs.docker.com/engine/install/debian/) \
             and start it (`systemctl start docker`)"
                .into(),
        );
    }
    if !works("kind", &["version"]) {
        missing.push(
            "kind: download https://kind.sigs.k8s.io/dl/v0.33.0/kind-linux-amd64 to /usr/local/bin/kind \
             and make it executable (or `go install sigs.k8s.io/kind@v0.33.0`)"
                .into(),
        );
    }
    if !down && !works("kubectl", &["version", "--client"]) {
        missing.push(
            "kubectl: see https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/".into(),
        );
    }
    if let Some(host) = host_glibc().filter(|v| !down && *v > IMAGE_GLIBC) {
        missing.push(format!(
            "a build host with glibc {}.{} or older: this one has {}.{}, and binaries built \
             here would not start on the image's base (distroless cc-debian12); build on Debian 12",
            IMAGE_GLIBC.0, IMAGE_GLIBC.1, host.0, host.1
        ));
    }
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "running the mesh in kind needs:\n  - {}\nWithout them, `cargo xtask demo` shows the mesh on network namespaces on this machine; \
         `cargo xtask run --dry-run` prints what this would run.",
        missing.join("\n  - ")
    )
}

/// The glibc of the image's base (distroless cc-debian12): binaries linked against
/// a newer one do not start there.
const IMAGE_GLIBC: (u32, u32) = (2, 36);

/// This machine's glibc, from `ldd --version` ("ldd (Debian GLIBC 2.36-9) 2.36").
fn host_glibc() -> Option<(u32, u32)> {
    let out = Command::new("ldd").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.lines().next()?.rsplit(' ').next()?;
    let (major, minor) = version.split_once('.')?;
    Some((major.parse().ok()?, minor.trim().parse().ok()?))
}

fn command(s: &Step) -> Command {
    let mut cmd = Command::new(&s.program);
    cmd.args(&s.args);
    cmd
}

fn execute(s: &Step) -> Result<()> {
    println!("xtask: run   {s}");
    crate::status(&mut command(s))
}

fn capture(s: &Step) -> Result<String> {
    let Output {
        status,
        stdout,
        stderr,
    } = command(s)
        .output()
        .with_context(|| format!("running {s}"))?;
    if !status.success() {
        bail!("{s} failed: {}", String::from_utf8_lossy(&stderr).trim());
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn options(down: bool) -> Options {
        Options {
            cluster: "ztunnel".into(),
            dry_run: true,
            down,
        }
    }

    #[test]
    fn the_plan_builds_loads_applies_and_proves_in_the_kind_context_only() {
        let plan: Vec<String> = options(false)
            .setup()
            .iter()
            .map(|s| s.to_string())
            .collect();
        let expected = [
            "kind create cluster --name ztunnel --wait 120s    # only if the cluster does not exist",
            "cargo build --release -p ztunnel -p ztunnel-ca -p ztunnel-waypoint --bins",
            "strip target/ztunnel-image/ztunnel target/ztunnel-image/ztunnel-ca target/ztunnel-image/waypoint",
            "docker build -t ztunnel:dev target/ztunnel-image",
            "kind load docker-image ztunnel:dev --name ztunnel",
            "kubectl --context kind-ztunnel apply -k deploy/gateway-api    # only if the cluster has no Gateway CRD",
            "kubectl --context kind-ztunnel apply -k deploy/istio-crds    # only if the cluster has no Istio CRDs",
            "kubectl --context kind-ztunnel apply -k deploy",
            "kubectl --context kind-ztunnel -n istio-system rollout restart daemonset/ztunnel deployment/ztunnel-ca    # only if the cluster was reused: the new image has the same tag",
            "kubectl --context kind-ztunnel apply -k deploy/sample",
        ];
        let mut at = 0;
        for line in expected {
            let found = plan[at..]
                .iter()
                .position(|p| p == line)
                .unwrap_or_else(|| panic!("{line:?} missing (or out of order) in {plan:#?}"));
            at += found + 1;
        }
        for s in options(false)
            .setup()
            .iter()
            .filter(|s| s.program == "kubectl")
        {
            assert_eq!(s.args[..2], ["--context", "kind-ztunnel"], "{s}");
        }
        // Everything applied exists.
        for s in options(false)
            .setup()
            .iter()
            .filter(|s| s.args.contains(&"-k".to_owned()))
        {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(s.args.last().unwrap());
            assert!(dir.join("kustomization.yaml").exists(), "{s}");
        }
    }

    /// kind serves the image it loaded under IMAGE: every container of ours names
    /// exactly that.
    #[test]
    fn every_manifest_runs_the_image_the_flow_loads() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let mut files = vec![];
        for dir in [deploy.clone(), deploy.join("waypoint")] {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "yaml") {
                    files.push(path);
                }
            }
        }
        let mut seen = 0;
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            for image in text
                .lines()
                .filter_map(|l| l.trim().strip_prefix("image: "))
            {
                assert_eq!(image, IMAGE, "{}", path.display());
                seen += 1;
            }
        }
        assert_eq!(seen, 4, "the tunnel, its init step, the CA, the waypoint");
    }

    #[test]
    fn the_host_glibc_is_read() {
        let (major, minor) = host_glibc().expect("ldd --version names a version");
        assert!(major == 2 && minor >= 17, "{major}.{minor}");
    }

    #[test]
    fn down_deletes_the_cluster_and_nothing_else() {
        let plan: Vec<String> = options(true)
            .teardown()
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(plan, ["kind delete cluster --name ztunnel"]);
    }

    #[test]
    fn arguments_print_as_a_shell_would_read_them() {
        let s = options(false).tunnel_pods();
        assert!(
            s.to_string()
                .ends_with("-o 'jsonpath={.items[*].metadata.name}'"),
            "{s}"
        );
    }
}
