//! `cargo xtask test`: everything CI checks, in the order a developer wants to see failures.

use crate::{localstack, sh};

/// Runs fmt, clippy and every test.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    if let Some(a) = args.first() {
        anyhow::bail!("`cargo xtask test` takes no arguments, got `{a}`");
    }
    // The multi-host tests run nodes in network namespaces; the test bed adds loss with
    // nftables and its smoke test pings across the bridge.
    sh::ensure_debian_packages(&[
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("ping", "iputils-ping"),
        // The ops tests: journald and systemd-analyze for the units, dpkg-deb for the package.
        ("systemd-analyze", "systemd"),
        ("dpkg-deb", "dpkg"),
    ])?;

    // Installing LocalStack takes minutes the first time; it overlaps with fmt and clippy.
    let install = std::thread::spawn(|| {
        localstack::ensure_installed(&localstack::target_dir().join("localstack"))
    });

    let mut fmt = sh::cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    sh::run(fmt)?;

    let mut clippy = sh::cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    sh::run(clippy)?;

    install
        .join()
        .map_err(|_| anyhow::anyhow!("the LocalStack installer thread panicked"))??;
    // The AWS backend's tests run against LocalStack; the guard stops it even when they fail.
    let localstack = localstack::start(localstack::DEFAULT_LISTEN.parse()?)?;
    let mut test = sh::cargo();
    test.args(["test", "--workspace"])
        .env(localstack::ENDPOINT_ENV, &localstack.endpoint)
        .envs(localstack::TEST_ENV.iter().copied());
    let result = sh::run(test);
    drop(localstack);
    result
}
