//! Logging: `tracing` records go to stderr (text or JSON) or to journald's native protocol.
//!
//! Through journald, every record is one journal entry, so a member list keeps its lines
//! together and `journalctl --unit=worker | grep "^ *Member"` finds exactly its members.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::NodeError;
use crate::cli::{LogFlags, LogFormat, LogTarget};

/// journald's native socket, which `tracing-journald` writes to.
pub const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

/// Where records go, once chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// Standard error, in the format `--log_format` names.
    Stderr(LogFormat),
    /// journald's native protocol.
    Journald,
}

/// Whether stderr is the journal stream systemd set up (`JOURNAL_STREAM` is `device:inode` of
/// it). A child that inherited the variable but has another stderr keeps writing to stderr.
pub fn stderr_is_journal(journal_stream: Option<&str>) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some((dev, ino)) = journal_stream.and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Chooses the sink: `--log_target` when given, journald when systemd connected stderr to the
/// journal, stderr otherwise.
pub fn choose(flags: &LogFlags, journal_stream: Option<&str>) -> Sink {
    match flags.log_target {
        LogTarget::Stderr => Sink::Stderr(flags.log_format),
        LogTarget::Journald => Sink::Journald,
        LogTarget::Auto if stderr_is_journal(journal_stream) => Sink::Journald,
        LogTarget::Auto => Sink::Stderr(flags.log_format),
    }
}

/// Installs the global subscriber. `default_level` applies when `RUST_LOG` is unset.
///
/// An explicit `--log_target journald` that cannot reach journald is an error; a journald
/// chosen automatically falls back to stderr with a warning.
pub fn init(flags: &LogFlags, default_level: &str) -> Result<Sink, NodeError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let journal_stream = std::env::var("JOURNAL_STREAM").ok();
    let mut sink = choose(flags, journal_stream.as_deref());
    let mut fallback = None;
    let journald = if sink == Sink::Journald {
        match tracing_journald::layer() {
            Ok(l) => Some(l.with_syslog_identifier(flags.syslog_identifier.clone())),
            Err(e) if flags.log_target == LogTarget::Journald => {
                return Err(NodeError::Config(format!(
                    "--log_target journald: cannot write to {JOURNALD_SOCKET}: {e}; is systemd-journald running? Use --log_target stderr otherwise"
                )));
            }
            Err(e) => {
                fallback = Some(e);
                sink = Sink::Stderr(flags.log_format);
                None
            }
        }
    } else {
        None
    };
    let ansi = std::io::stderr().is_terminal();
    let text = (sink == Sink::Stderr(LogFormat::Text)).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
    });
    let json = (sink == Sink::Stderr(LogFormat::Json)).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(journald)
        .try_init()
        .map_err(|e| NodeError::Config(format!("cannot install the logger: {e}")))?;
    if let Some(e) = fallback {
        tracing::warn!(
            "JOURNAL_STREAM is set but {JOURNALD_SOCKET} does not answer ({e}); logging to stderr"
        );
    }
    Ok(sink)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(target: LogTarget, format: LogFormat) -> LogFlags {
        LogFlags {
            log_format: format,
            log_target: target,
            syslog_identifier: "node".into(),
        }
    }

    #[test]
    fn an_explicit_target_wins_over_journal_stream() {
        let f = flags(LogTarget::Stderr, LogFormat::Json);
        assert_eq!(choose(&f, Some("1:2")), Sink::Stderr(LogFormat::Json));
        let f = flags(LogTarget::Journald, LogFormat::Text);
        assert_eq!(choose(&f, None), Sink::Journald);
    }

    #[test]
    fn auto_uses_journald_only_when_stderr_is_the_journal_stream() {
        use std::os::unix::fs::MetadataExt as _;
        let f = flags(LogTarget::Auto, LogFormat::Text);
        assert_eq!(choose(&f, None), Sink::Stderr(LogFormat::Text));
        assert_eq!(choose(&f, Some("garbage")), Sink::Stderr(LogFormat::Text));
        assert_eq!(choose(&f, Some("1:1")), Sink::Stderr(LogFormat::Text));
        // The variable naming this process's own stderr selects journald.
        let m = std::fs::metadata("/proc/self/fd/2").unwrap();
        let own = format!("{}:{}", m.dev(), m.ino());
        assert_eq!(choose(&f, Some(&own)), Sink::Journald);
    }
}
