//! `cargo xtask fuzz [--seconds N]`: runs every cargo-fuzz target for N seconds each and sums
//! the executions. Installs cargo-fuzz when missing; uses the stable toolchain with
//! `RUSTC_BOOTSTRAP=1` and no sanitizer, since no nightly toolchain is available.

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;

use anyhow::{Context as _, bail};

use crate::sh;

/// The targets in `fuzz/fuzz_targets`.
const TARGETS: &[&str] = &[
    "membership_packet",
    "sync_frame",
    "sealed_message",
    "key_file",
    "multicast_announcement",
];

/// Runs every target and prints a table of executions.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut seconds: u64 = 60;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let v = it
                    .next()
                    .context("--seconds needs a number, e.g. --seconds 30")?;
                seconds = v
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .with_context(|| format!("--seconds takes a positive number, got `{v}`"))?;
            }
            other => bail!("unknown argument `{other}`; usage: cargo xtask fuzz [--seconds N]"),
        }
    }
    let mut probe = sh::cargo();
    probe
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if !probe.status().is_ok_and(|s| s.success()) {
        let mut install = sh::cargo();
        install.args(["install", "cargo-fuzz", "--locked"]);
        sh::run(install)?;
    }
    let mut rows = Vec::new();
    for t in TARGETS {
        let mut cmd = sh::cargo();
        cmd.args(["fuzz", "run", "--sanitizer", "none", t, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .args([
                "-rss_limit_mb=2048",
                "-max_len=65536",
                "-print_final_stats=1",
            ])
            .env("RUSTC_BOOTSTRAP", "1")
            .stderr(Stdio::piped());
        eprintln!("$ {cmd:?}");
        let mut child = cmd.spawn().context("cannot start cargo fuzz")?;
        let mut runs = 0u64;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        for line in BufReader::new(stderr).lines() {
            let line = line.context("cannot read cargo fuzz output")?;
            eprintln!("{line}");
            // libFuzzer ends with "Done 123456 runs in 60 second(s)".
            if let Some(rest) = line.strip_prefix("Done ")
                && let Some(n) = rest.split_whitespace().next()
            {
                runs = n.parse().unwrap_or(runs);
            }
        }
        let status = child.wait().context("cargo fuzz did not finish")?;
        if !status.success() {
            bail!(
                "fuzz target {t} failed ({status}); the crashing input is in fuzz/artifacts/{t}/, \
                 replay it with `RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none {t} <file>`"
            );
        }
        rows.push((*t, runs));
    }
    println!("{:<20} {:>14}", "target", "executions");
    for (t, n) in &rows {
        println!("{t:<20} {n:>14}");
    }
    let total: u64 = rows.iter().map(|(_, n)| n).sum();
    println!(
        "{:<20} {total:>14}  ({seconds} s per target, no crash)",
        "total"
    );
    Ok(())
}
