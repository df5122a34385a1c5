//! `cargo xtask test`: everything CI checks, in the order a developer wants to see failures.

use std::path::PathBuf;

use crate::{dist, localstack, sh};

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
        // The booted-image tests: a Debian root built once, booted with systemd-nspawn.
        ("mmdebstrap", "mmdebstrap"),
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
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
    let (deb, upgrade) = image_packages()?;
    // The AWS backend's tests run against LocalStack; the guard stops it even when they fail.
    let localstack = localstack::start(localstack::DEFAULT_LISTEN.parse()?)?;
    let mut test = sh::cargo();
    test.args(["test", "--workspace"])
        .env("NODE_IMAGE_DEB", deb)
        .env("NODE_IMAGE_DEB_UPGRADE", upgrade)
        .env(localstack::ENDPOINT_ENV, &localstack.endpoint)
        .envs(localstack::TEST_ENV.iter().copied());
    let result = sh::run(test);
    drop(localstack);
    result
}

/// The packages the booted-image tests install: the debug node (a release build would add
/// minutes) packaged as `dist` does, and the same binary at a higher version for the upgrade.
fn image_packages() -> anyhow::Result<(PathBuf, PathBuf)> {
    let mut build = sh::cargo();
    build.args(["build", "-p", "node"]);
    sh::run(build)?;
    let target = localstack::target_dir();
    let binary = target.join("debug").join("node");
    let out = target.join("image-debs");
    let deploy = sh::root().join("deploy");
    let deb = dist::build_deb(&binary, &deploy, &out, None, true)?;
    // A Debian version with `+1` sorts after the plain one.
    let higher = format!("{}+1", dist::crate_version()?);
    let upgrade = dist::build_deb(&binary, &deploy, &out, Some(&higher), true)?;
    Ok((deb, upgrade))
}
