//! The one tracing set-up of the binaries: a log filter from `RUST_LOG` (default
//! `info`), changeable at run time, written to stderr.

use std::sync::Arc;

use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

/// Changes the log filter at run time (`/logging?level=` of the tunnel's admin port).
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Installs the subscriber. `directives` are added to the filter (e.g.
/// `access=off`), and again whenever the filter is changed.
pub fn init_tracing(directives: &[&str]) -> SetLogLevel {
    let directives: Vec<String> = directives.iter().map(|d| d.to_string()).collect();
    let with_directives = move |mut filter: EnvFilter| {
        for directive in &directives {
            filter = filter.add_directive(directive.parse().expect("a valid directive"));
        }
        filter
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, reload) = tracing_subscriber::reload::Layer::new(with_directives(filter));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    Arc::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| format!("bad level {level:?}: {e}"))?;
        reload
            .reload(with_directives(filter))
            .map_err(|e| e.to_string())
    })
}
