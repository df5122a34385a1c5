//! The `node` binary: parses flags, sets up logging and signals, then hands over to the library.

use anyhow::Context as _;
use clap::Parser;
use node::cli::{Cli, Command};
use tokio::sync::watch;

async fn shutdown_signal(tx: watch::Sender<bool>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    tx.send_replace(true);
    Ok(())
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
        println!("  {:<40} {id} {role}", format!("{}:{}", c.ip, c.port));
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
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
                let (tx, rx) = watch::channel(false);
                tokio::spawn(async move {
                    if let Err(e) = shutdown_signal(tx).await {
                        tracing::error!("{e:#}");
                    }
                });
                node::run(cli.flags, rx).await?;
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
