//! The one tracing set-up of the binaries: a log filter from `RUST_LOG` (default
//! `info`), changeable at run time, written to stderr as text or as JSON lines.

use std::sync::Arc;

use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

/// Changes the log filter at run time (`/logging?level=` of the tunnel's admin port).
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// An error and its causes, `: `-separated, for a log line (Display alone often
/// says only the outermost, e.g. hyper's "client error (Connect)").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How log lines are written (`--log-format`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// For people: one line per event, coloured on a terminal.
    #[default]
    Text,
    /// For log collectors: one JSON object per line, with `timestamp`, `level`,
    /// `target`, `message` and the event's fields as keys.
    Json,
}

/// Installs the subscriber. `directives` are added to the filter (e.g.
/// `access=off`), and again whenever the filter is changed.
pub fn init_tracing(directives: &[&str], format: LogFormat) -> SetLogLevel {
    let directives: Vec<String> = directives.iter().map(|d| d.to_string()).collect();
    let with_directives = move |mut filter: EnvFilter| {
        for directive in &directives {
            filter = filter.add_directive(directive.parse().expect("a valid directive"));
        }
        filter
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, reload) = tracing_subscriber::reload::Layer::new(with_directives(filter));
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();
    Arc::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| format!("bad level {level:?}: {e}"))?;
        reload
            .reload(with_directives(filter))
            .map_err(|e| e.to_string())
    })
}
