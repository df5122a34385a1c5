//! A nested cargo without the variables the outer `cargo run` or `cargo test` set, shared by
//! xtask and by tests that build binaries of other packages.

use std::process::Command;

/// Variables that `cargo run` (and `cargo test`) set for the program it runs, as opposed to
/// settings a user exports. A nested cargo that inherits them fingerprints build scripts
/// differently (ring's tracked `CARGO_MANIFEST_DIR`), so every nested build would recompile
/// them, and the next plain `cargo build` would recompile them again.
const CARGO_RUN_VARS: &[&str] = &[
    "CARGO",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_RUSTC_CURRENT_DIR",
    "CARGO_TARGET_TMPDIR",
    "CARGO_MAKEFLAGS",
    "OUT_DIR",
];

/// Whether `cargo run` (or `cargo test`) set this variable for the program it started.
pub fn set_by_cargo_run(name: &str) -> bool {
    CARGO_RUN_VARS.contains(&name)
        || name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_EXE_")
}

/// A command without the variables `cargo run` set for this process.
pub fn clean(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_by_cargo_run) {
            c.env_remove(name);
        }
    }
    c
}

/// The cargo that runs this process (or `cargo` on the PATH), cleaned by [`clean`].
pub fn command() -> Command {
    clean(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}
