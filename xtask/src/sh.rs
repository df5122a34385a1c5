//! Small helpers to run commands and find the workspace.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

/// The workspace root.
pub fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// The cargo that runs us, in the workspace root, without the variables `cargo run` set.
pub fn cargo() -> Command {
    let mut c = testbed::cargo::command();
    c.current_dir(root());
    c
}

/// Runs a command, echoing it, and fails when it fails.
pub fn run(mut cmd: Command) -> anyhow::Result<()> {
    // Only the program and its arguments: the variables removed by `clean` would bury them.
    let shown: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    eprintln!("$ {}", shown.join(" "));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("`{}` failed with {status}", shown.join(" "));
    }
    Ok(())
}

/// Whether a program is on the PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs Debian packages whose marker program is missing. Runs `apt-get update` once.
pub fn ensure_debian_packages(pkgs: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .filter(|(program, _)| !have(program))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        bail!("missing programs from {missing:?} and no apt-get to install them");
    }
    let mut update = Command::new("apt-get");
    update.args(["update", "-qq"]);
    run(update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(install)
}

#[cfg(test)]
mod tests {
    use testbed::cargo::{clean, set_by_cargo_run};

    /// `cargo test` sets the same package variables as `cargo run`; a nested cargo must see
    /// none of them, or the rebuild loop of issue 12 comes back.
    #[test]
    fn nested_cargo_inherits_no_variable_cargo_run_set() {
        assert!(
            std::env::var_os("CARGO_MANIFEST_DIR").is_some(),
            "this test must run under cargo"
        );
        let out = clean("env").output().expect("run env");
        let seen = String::from_utf8_lossy(&out.stdout);
        let leaked: Vec<&str> = seen
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .filter(|k| set_by_cargo_run(k))
            .collect();
        assert!(leaked.is_empty(), "leaked into a nested cargo: {leaked:?}");
        // Settings a user exports still pass through.
        assert!(seen.lines().any(|l| l.starts_with("PATH=")));
    }

    #[test]
    fn user_settings_are_not_taken_for_cargo_run_variables() {
        for user in [
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_TERM_COLOR",
            "CARGO_BUILD_JOBS",
        ] {
            assert!(!set_by_cargo_run(user), "{user}");
        }
        for run in [
            "CARGO",
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_CRATE_NAME",
        ] {
            assert!(set_by_cargo_run(run), "{run}");
        }
    }
}
