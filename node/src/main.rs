//! The `node` binary: parses flags, sets up logging and signals, then hands over to the library.

use anyhow::Context as _;
use clap::Parser;
use node::cli::{Cli, Command};

/// Watches SIGTERM and SIGINT; the future completes at the first of them. Registered before
/// the node starts, so a failure to watch them fails start-up instead of going unnoticed.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

fn print_report(report: &discovery::Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    // Names, labels and reasons come from the platform's API or the network: escaped, so none
    // can forge a line or send a terminal escape sequence.
    use discovery::escape_untrusted as esc;
    println!("candidates ({}):", report.candidates.len());
    for c in &report.candidates {
        let id = esc(c.id.as_deref().unwrap_or("-"));
        let role = c.role.map(|r| r.to_string()).unwrap_or_default();
        let zone = esc(c.zone.as_deref().unwrap_or_default());
        let addr = std::net::SocketAddr::new(c.ip, c.port).to_string();
        let line = format!("  {addr:<40} {id} {role} {zone}");
        println!("{}", line.trim_end());
    }
    println!("excluded ({}):", report.excluded.len());
    for x in &report.excluded {
        println!("  {:<40} {}", esc(&x.id), esc(&x.reason));
    }
    if report.candidates.is_empty() {
        eprintln!(
            "hint: no candidates. Check the backend's filter flags (tags, labels, selectors or --static_members) and --private_ip_selector; every excluded entry above says why it was skipped."
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain, without a backtrace: the message names the problem and the fix.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The operator commands print their answer on stdout; only warnings go to the log.
    let level = match cli.command {
        Some(Command::Members { .. }) => "warn",
        _ => "info",
    };
    let sink = node::logging::init(&cli.flags.log, level)?;
    // One thread: the node's work is short steps on a few sockets, and two workers per
    // process cost wake-ups and cross-thread hand-offs for no gain (measured at N = 200).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(async move {
        match cli.command {
            Some(Command::Keygen) => {
                println!("{}", keyring::generate());
                Ok(())
            }
            Some(Command::Discover { json }) => {
                let report = node::discover(&cli.flags).await?;
                print_report(&report, json)
            }
            Some(Command::Members { json, cluster }) => {
                let m = node::members(&cli.flags, cluster).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&m)?);
                } else {
                    print!("{}", node::members::render(&m));
                }
                Ok(())
            }
            Some(Command::Run) | None => {
                node::backends::check_built(cli.flags.discovery).map_err(node::NodeError::from)?;
                let shutdown = shutdown_signal()?;
                // Bind everything first, so a taken port fails start-up with a clear message.
                let bound = node::Bound::bind(&cli.flags).await?;
                node::run(bound, cli.flags, shutdown).await?;
                Ok(())
            }
        }
    });
    if let Err(e) = &result
        && sink == node::logging::Sink::Stderr(node::cli::LogFormat::Json)
    {
        // Log shippers read only JSON; `main` still prints the plain line for people.
        tracing::error!("{e:#}");
    }
    result
}
