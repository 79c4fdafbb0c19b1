//! Logging set-up: tracing on stderr, as text (colours only at a terminal) or JSON, filtered by
//! `RUST_LOG` read as `target=level` directives (`info,meshcert_agent=debug`): plain targets
//! rather than `EnvFilter`, so no regular-expression engine is linked in.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The log format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. `program` names the program in the warning printed when
/// `RUST_LOG` cannot be parsed (logging then runs at `default`).
pub fn init(program: &str, format: LogFormat, default: LevelFilter) {
    // The builder's own level (INFO unless told) would drop what `RUST_LOG` asks for below it:
    // the `Targets` filter alone decides.
    let builder = tracing_subscriber::fmt()
        .with_max_level(LevelFilter::TRACE)
        .with_writer(std::io::stderr);
    let filter = filter(program, std::env::var("RUST_LOG").ok().as_deref(), default);
    match format {
        // Colours only for a person at a terminal, never into a file or the journal.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .finish()
            .with(filter)
            .init(),
        LogFormat::Json => builder.with_ansi(false).json().finish().with(filter).init(),
    }
}

/// `rust_log` as target directives, or `default` when it is unset, empty or invalid.
fn filter(program: &str, rust_log: Option<&str>, default: LevelFilter) -> Targets {
    let fallback = || Targets::new().with_default(default);
    match rust_log {
        Some(text) if !text.trim().is_empty() => text.parse().unwrap_or_else(|e| {
            eprintln!("{program}: RUST_LOG ignored ({e}); logging at {default}");
            fallback()
        }),
        _ => fallback(),
    }
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::*;

    #[test]
    fn rust_log_directives_override_the_default() {
        let f = filter("test", Some("warn,meshcert_agent=debug"), LevelFilter::INFO);
        assert!(f.would_enable("meshcert_agent::rotator", &Level::DEBUG));
        assert!(!f.would_enable("hyper", &Level::INFO));
    }

    #[test]
    fn unset_empty_or_invalid_rust_log_falls_back_to_the_default() {
        for value in [None, Some(""), Some("  "), Some("not a level=!!")] {
            let f = filter("test", value, LevelFilter::WARN);
            assert!(f.would_enable("anything", &Level::WARN), "{value:?}");
            assert!(!f.would_enable("anything", &Level::INFO), "{value:?}");
        }
    }
}
