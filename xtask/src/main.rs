//! `cargo xtask`: the project's scripts, in Rust. The only place that starts test infrastructure.
//!
//! - `cargo xtask demo`: a 5-node cluster on loopback (2 schedulers, 3 workers).
//! - `cargo xtask test`: installs what the tests need, then fmt, clippy and every test.
//! - `cargo xtask bench`: node against serf in network namespaces, and the simulator.

use std::process::ExitCode;

mod bench;
mod demo;
mod localstack;
mod sh;
mod test;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  demo    start 2 schedulers and 3 workers on 127.0.0.11-15, show the cluster forming,
          kill one worker with SIGKILL, show its removal, then stop (Ctrl-C stops early)
  test    install what the tests need, then run cargo fmt --check, clippy -D warnings
          and every test (LocalStack runs for the AWS backend's tests)
  bench [--quick] [--dry-run]
          node against serf in network namespaces, plus the simulator at N=100..1000;
          writes target/bench/summary.json, table.txt and bench.png (needs root)
  localstack [ADDR]
          run LocalStack (EC2) on ADDR (default 127.0.0.1:4566) until Ctrl-C, for
          `LOCALSTACK_ENDPOINT=http://ADDR cargo test -p discovery-aws`";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("test") => test::run(&args[1..]),
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
