//! Structured logs: JSON lines by default (for log pipelines), plain text on request.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Json,
    Plain,
}

/// Install the global subscriber. `RUST_LOG` overrides the default `info` filter.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_current_span(true))
            .init(),
        LogFormat::Plain => registry
            .with(fmt::layer().with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .init(),
    }
}
