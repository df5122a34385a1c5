//! `cargo xtask dist`: a release binary and a Debian package built with `dpkg-deb`.
//!
//! The package `cluster-node` holds `/usr/bin/cluster-node` (renamed: Debian's Node.js owns
//! `/usr/bin/node`), the two units in `/lib/systemd/system`, and `/etc/default/cluster-node`
//! as a conffile, and the empty directory `/etc/cluster-node` where the units look for the
//! cluster key. It has no maintainer scripts: enabling a unit is the operator's choice, and after
//! an upgrade the operator restarts the unit (`systemctl restart worker`), one host at a time.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::sh;

/// What `dist` builds from.
#[derive(Debug)]
struct Options {
    /// An already-built binary to package instead of a fresh release build.
    binary: Option<PathBuf>,
    /// Where the `.deb` goes.
    out: PathBuf,
    /// The package version, instead of node's crate version (e.g. to test an upgrade).
    version: Option<String>,
    /// gzip -1 instead of xz: seconds instead of a minute or more for a debug binary.
    fast: bool,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        binary: None,
        out: target_dir().join("dist"),
        version: None,
        fast: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--binary" => {
                o.binary = Some(it.next().context("--binary needs a path")?.into());
            }
            "--out" => o.out = it.next().context("--out needs a directory")?.into(),
            "--version" => {
                let v = it.next().context("--version needs a Debian version")?;
                if v.is_empty()
                    || !v.starts_with(|c: char| c.is_ascii_digit())
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".+~-".contains(c))
                {
                    bail!(
                        "--version {v:?} is not a Debian version (digits first, then [A-Za-z0-9.+~-])"
                    );
                }
                o.version = Some(v.clone());
            }
            "--fast" => o.fast = true,
            other => bail!(
                "unknown argument `{other}`; usage: cargo xtask dist [--binary PATH] [--out DIR] [--version VERSION] [--fast]"
            ),
        }
    }
    Ok(o)
}

/// The target directory cargo uses for this workspace.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| sh::root().join("target"), PathBuf::from)
}

/// Runs `cargo xtask dist`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let o = parse(args)?;
    let binary = match o.binary {
        Some(b) => b,
        None => {
            let mut build = sh::cargo();
            build.args(["build", "--release", "--locked", "-p", "node"]);
            sh::run(build)?;
            target_dir().join("release").join("node")
        }
    };
    sh::ensure_debian_packages(&[("dpkg-deb", "dpkg")])?;
    let deb = build_deb(
        &binary,
        &sh::root().join("deploy"),
        &o.out,
        o.version.as_deref(),
        o.fast,
    )?;
    println!("{}", deb.display());
    Ok(())
}

/// The workspace version, from node's manifest.
pub fn crate_version() -> anyhow::Result<String> {
    let manifest = std::fs::read_to_string(sh::root().join("node").join("Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|r| r.strip_suffix('"'))
        .map(str::to_owned)
        .context("no version in node/Cargo.toml")
}

fn architecture() -> anyhow::Result<String> {
    let out = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .context("cannot run dpkg --print-architecture")?;
    if !out.status.success() {
        bail!("dpkg --print-architecture failed");
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(from, to).with_context(|| format!("cannot copy {}", from.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Lays out the package tree from `binary` and `deploy/`, and builds the `.deb` in `out`, with
/// `version` or else node's crate version; `fast` compresses with gzip -1 instead of xz.
pub fn build_deb(
    binary: &Path,
    deploy: &Path,
    out: &Path,
    version: Option<&str>,
    fast: bool,
) -> anyhow::Result<PathBuf> {
    if !binary.is_file() {
        bail!(
            "{} does not exist: build it first, or run `cargo xtask dist` without --binary",
            binary.display()
        );
    }
    let version = match version {
        Some(v) => v.to_owned(),
        None => crate_version()?,
    };
    let arch = architecture()?;
    std::fs::create_dir_all(out)?;
    let tree = out.join(format!("cluster-node_{version}_{arch}"));
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    copy(binary, &tree.join("usr/bin/cluster-node"), 0o755)?;
    for unit in ["scheduler.service", "worker.service"] {
        copy(
            &deploy.join("systemd").join(unit),
            &tree.join("lib/systemd/system").join(unit),
            0o644,
        )?;
    }
    copy(
        &deploy.join("systemd/cluster-node.default"),
        &tree.join("etc/default/cluster-node"),
        0o644,
    )?;
    // The key's documented place; the units load /etc/cluster-node/key when it exists.
    std::fs::create_dir_all(tree.join("etc/cluster-node"))?;
    copy(
        &sh::root().join("README.md"),
        &tree.join("usr/share/doc/cluster-node/README.md"),
        0o644,
    )?;
    let size_kib = dir_size(&tree)? / 1024;
    let control = format!(
        "Package: cluster-node\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: cluster-start developers <cluster-start@localhost>\n\
         Installed-Size: {size_kib}\n\
         Depends: libc6\n\
         Section: net\n\
         Priority: optional\n\
         Description: schedulers and workers that find each other and form clusters\n \
         Finds peers through GCP, EC2, Kubernetes, multicast or a static list, forms a\n \
         scheduler cluster and an all-instances cluster (SWIM), and logs member lists.\n"
    );
    std::fs::create_dir_all(tree.join("DEBIAN"))?;
    std::fs::write(tree.join("DEBIAN/control"), control)?;
    std::fs::write(tree.join("DEBIAN/conffiles"), "/etc/default/cluster-node\n")?;
    let deb = out.join(format!("cluster-node_{version}_{arch}.deb"));
    let mut cmd = Command::new("dpkg-deb");
    if fast {
        cmd.args(["-Zgzip", "-z1"]);
    }
    cmd.args(["--root-owner-group", "--build"])
        .arg(&tree)
        .arg(&deb);
    sh::run(cmd)?;
    std::fs::remove_dir_all(&tree)?;
    Ok(deb)
}

fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() {
            dir_size(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_ok(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Packages a stand-in executable (the layout does not depend on the binary, and a release
    /// build of node would add minutes to CI), then reads the package back with dpkg-deb.
    #[test]
    fn the_deb_holds_the_binary_the_units_and_the_default_file() {
        if !sh::have("dpkg-deb") {
            eprintln!("dpkg-deb is not installed; the package is not checked");
            return;
        }
        let dir = std::env::temp_dir().join(format!("xtask-dist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("node");
        std::fs::write(&bin, "#!/bin/sh\necho cluster-node\n").unwrap();
        let deb = build_deb(
            &bin,
            &sh::root().join("deploy"),
            &dir.join("out"),
            None,
            true,
        )
        .unwrap();

        let list = run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
        for (mode, path) in [
            ("-rwxr-xr-x root/root", "./usr/bin/cluster-node"),
            (
                "-rw-r--r-- root/root",
                "./lib/systemd/system/scheduler.service",
            ),
            (
                "-rw-r--r-- root/root",
                "./lib/systemd/system/worker.service",
            ),
            ("-rw-r--r-- root/root", "./etc/default/cluster-node"),
        ] {
            assert!(
                list.lines()
                    .any(|l| l.starts_with(mode) && l.ends_with(path)),
                "{path} ({mode}) missing:\n{list}"
            );
        }
        let fields = run_ok(Command::new("dpkg-deb").arg("-f").arg(&deb));
        assert!(fields.contains("Package: cluster-node\n"), "{fields}");
        let control = dir.join("control");
        run_ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
        let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
        assert_eq!(conffiles, "/etc/default/cluster-node\n");

        // Unpacked into a throwaway root, the binary runs and the unit points at it.
        let root = dir.join("root");
        run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
        let said = run_ok(&mut Command::new(root.join("usr/bin/cluster-node")));
        assert_eq!(said, "cluster-node\n");
        let unit = std::fs::read_to_string(root.join("lib/systemd/system/worker.service")).unwrap();
        assert!(unit.contains("ExecStart=/usr/bin/cluster-node --role worker"));

        // `dpkg -i` into a throwaway root with its own package database.
        let sys = dir.join("sys");
        for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
            std::fs::create_dir_all(sys.join(d)).unwrap();
        }
        std::fs::write(sys.join("var/lib/dpkg/status"), "").unwrap();
        let root_arg = format!("--root={}", sys.display());
        run_ok(
            Command::new("dpkg")
                .args([
                    &root_arg,
                    "--force-depends",
                    "--force-not-root",
                    "--log=/dev/null",
                    "-i",
                ])
                .arg(&deb),
        );
        let files = run_ok(Command::new("dpkg").args([&root_arg, "-L", "cluster-node"]));
        assert!(
            files.lines().any(|l| l == "/usr/bin/cluster-node"),
            "{files}"
        );
        assert!(sys.join("etc/default/cluster-node").is_file());
        let status = std::fs::read_to_string(sys.join("var/lib/dpkg/status")).unwrap();
        assert!(status.contains("Status: install ok installed"), "{status}");
        assert!(
            status.contains("Conffiles:\n /etc/default/cluster-node "),
            "{status}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_binary_is_named() {
        let e = build_deb(
            Path::new("/nonexistent/node"),
            Path::new("deploy"),
            Path::new("/tmp"),
            None,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/nonexistent/node") && e.contains("--binary"),
            "{e}"
        );
    }

    #[test]
    fn unknown_arguments_are_refused() {
        assert!(parse(&["--bogus".into()]).is_err());
        let o = parse(&["--binary".into(), "/x".into(), "--out".into(), "/y".into()]).unwrap();
        assert_eq!(o.binary.as_deref(), Some(Path::new("/x")));
        assert_eq!(o.out, PathBuf::from("/y"));
        assert_eq!(o.version, None);
        let o = parse(&["--version".into(), "0.1.0+1".into()]).unwrap();
        assert_eq!(o.version.as_deref(), Some("0.1.0+1"));
        for bad in ["", "x1", "1 2", "1/2"] {
            assert!(parse(&["--version".into(), bad.into()]).is_err(), "{bad:?}");
        }
    }
}
