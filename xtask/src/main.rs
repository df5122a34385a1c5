//! `cargo xtask`: the project's scripts, in Rust. The only place that starts test infrastructure.
//!
//! - `cargo xtask demo`: a 5-node cluster on loopback (2 schedulers, 3 workers).
//! - `cargo xtask dist`: a release binary and a Debian package.
//! - `cargo xtask test`: installs what the tests need, then fmt, clippy and every test.
//! - `cargo xtask bench`: node against serf in network namespaces, and the simulator.
//! - `cargo xtask attack`: every attack of the `attack` crate, keyless and keyed.
//! - `cargo xtask fuzz`: runs every cargo-fuzz target for a while.

use std::process::ExitCode;

mod attack;
mod bench;
mod demo;
mod dist;
mod fuzz;
mod localstack;
mod sh;
mod test;
#[cfg(test)]
mod tidy;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  demo    start 2 schedulers and 3 workers on 127.0.0.11-15, show the cluster forming,
          kill one worker with SIGKILL, show its removal, then stop (Ctrl-C stops early)
  dist    build a release binary and a .deb (cluster-node: binary, systemd units,
          /etc/default/cluster-node) in <target dir>/dist; --binary PATH packages a built
          binary instead, --out DIR puts the .deb elsewhere, --version V overrides the
          version (e.g. to test an upgrade), --fast compresses with gzip -1 instead of xz
  test    install what the tests need, then run cargo fmt --check, clippy -D warnings
          and every test (LocalStack runs for the AWS backend's tests)
  bench [--quick] [--dry-run] [--sizes N,N...] [--node-bin PATH]
          node against serf in network namespaces at N=3..200, plus the simulator at
          N=100..1000; writes target/bench/summary.json, table.txt and bench.png (needs
          root); --quick runs N=3,10,30 with short windows, --sizes runs only those sizes
          (no simulator, no loss test), --node-bin (or BENCH_NODE_BIN) runs a built binary
          instead of building `--release -p node`
  attack [--only NAME[,NAME]] [--keyless|--keyed] [--node PATH] [--spoof]
          run every attack (hostile peer, floods, holds, forgeries, replays, a wrong-key
          member) against real nodes in network namespaces, keyless and keyed; prints the
          table and writes target/attack/summary.json (needs root); --node attacks another
          node binary, e.g. an older build; --spoof also forges datagrams' source addresses
  fuzz    [--seconds N] run every cargo-fuzz target N seconds (default 60) and print
          the executions; installs cargo-fuzz when missing (stable Rust, RUSTC_BOOTSTRAP=1)
  localstack [ADDR]
          run LocalStack (EC2) on ADDR (default 127.0.0.1:4566) until Ctrl-C, for
          `LOCALSTACK_ENDPOINT=http://ADDR cargo test -p discovery-aws`";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo::run(&args[1..]),
        Some("attack") => attack::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("test") => test::run(&args[1..]),
        Some("dist") => dist::run(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("localstack") => localstack::run(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(anyhow::anyhow!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
