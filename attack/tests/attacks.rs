//! Every attack against real nodes, keyless and keyed, must achieve nothing: no member list
//! changes, no byte reaches the third address, no node grows by 10 MB, and lists still update
//! after a kill. Needs root (network namespaces), as CI has.

use std::path::{Path, PathBuf};

use attack::{Attack, Binaries, Row};

/// Builds `node` (this package's tests only get this package's binaries) and returns both
/// programs, from the same target directory.
fn binaries() -> Binaries {
    let sink = PathBuf::from(env!("CARGO_BIN_EXE_attack-sink"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf();
    // Without the variables `cargo test` set for us, as xtask's nested cargo (`sh::cargo`).
    let status = testbed::cargo::command()
        .args([
            "build",
            "--quiet",
            "--package",
            "node",
            "--package",
            "attack",
            "--bins",
        ])
        .current_dir(&root)
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build -p node failed");
    Binaries {
        node: sink.with_file_name("node"),
        sink,
    }
}

fn suite(key: bool) -> Vec<Row> {
    if let Err(e) = testbed::check_prerequisites() {
        panic!("the attack test cannot run here: {e}");
    }
    attack::run_suite(&binaries(), key, &Attack::ALL).unwrap_or_else(|e| panic!("{e}"))
}

fn assert_clean(rows: &[Row]) {
    assert_eq!(rows.len(), Attack::ALL.len());
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.failures().is_empty())
        .map(|r| format!("{} (key: {}): {}", r.attack, r.key, r.failures().join("; ")))
        .collect();
    assert!(
        failed.is_empty(),
        "attacks that had an effect:\n{}\n\n{}",
        failed.join("\n"),
        attack::table(rows)
    );
}

#[test]
fn no_attack_has_any_effect_on_a_keyless_cluster() {
    assert_clean(&suite(false));
}

#[test]
fn no_attack_has_any_effect_on_a_keyed_cluster() {
    assert_clean(&suite(true));
}
