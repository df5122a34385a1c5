//! The systemd units in `deploy/systemd`: `systemd-analyze verify` accepts them without a
//! warning, and their hardening keeps systemd's exposure score low. Runs when systemd-analyze
//! is installed (Debian's `systemd` package; `cargo xtask test` installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::BIN;

fn have_systemd_analyze() -> bool {
    Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn units() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    ["scheduler.service", "worker.service"]
        .iter()
        .map(|u| dir.join(u))
        .collect()
}

/// A copy of `unit` whose ExecStart runs the binary under test (verify checks that it exists).
fn with_test_binary(unit: &Path, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(unit).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/cluster-node "), "{text}");
    let out = dir.join(unit.file_name().unwrap());
    std::fs::write(&out, text.replace("/usr/bin/cluster-node", BIN)).unwrap();
    out
}

#[test]
fn units_carry_the_settings_operators_rely_on() {
    for u in units() {
        let text = std::fs::read_to_string(&u).unwrap();
        for line in [
            "Type=notify",
            "EnvironmentFile=/etc/default/cluster-node",
            "Restart=on-failure",
            "KillSignal=SIGTERM",
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            // Room for the HTTP listeners' connection caps (128 each) and the gossip streams.
            "LimitNOFILE=65536",
            // The key as a credential the DynamicUser can read, keyless without the file.
            "LoadCredential=cluster-key:/etc/cluster-node/key",
            "SetCredential=cluster-key:# no /etc/cluster-node/key: no cluster key",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{} lacks {line}",
                u.display()
            );
        }
        let role = u.file_stem().unwrap().to_str().unwrap();
        assert!(text.contains(&format!("--role {role} --syslog_identifier {role}")));
    }
}

#[test]
fn systemd_analyze_verifies_both_units_without_warnings() {
    if !have_systemd_analyze() {
        eprintln!("systemd-analyze is not installed (Debian package `systemd`); not verified");
        return;
    }
    let dir = std::env::temp_dir().join(format!("node-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for u in units() {
        let copy = with_test_binary(&u, &dir);
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.trim().is_empty(),
            "{}: {err}",
            u.display()
        );
        // The hardening, as systemd scores it: 10 is fully exposed, "OK" is below 5.
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&copy)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|r| r.split(": ").nth(1))
            .and_then(|r| r.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
        assert!(score <= 4.0, "{}: exposure {score}\n{text}", u.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
