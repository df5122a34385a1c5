//! `cargo xtask attack`: runs every attack of the `attack` crate against real nodes, keyless
//! and keyed, and reports what each achieved: a table and `target/attack/summary.json`.

use anyhow::{Context as _, bail};
use attack::{Attack, Binaries, Row};

use crate::sh;

/// Runs the attacks; `--only NAME[,NAME]` picks some (names as in the table, `-` for spaces),
/// `--keyless` or `--keyed` one key setting, `--node PATH` attacks another `node` binary (an
/// older build, say) instead of building this one, `--spoof` also sends forged datagrams under
/// the claimed sender's source address (an attacker on the same link).
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut only: Option<Vec<String>> = None;
    let mut node: Option<std::path::PathBuf> = None;
    let mut spoof = false;
    let mut settings = vec![false, true];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--only" => {
                let v = it.next().context("--only needs attack names")?;
                only = Some(v.split(',').map(|s| s.replace('-', " ")).collect());
            }
            "--node" => node = Some(it.next().context("--node needs a path")?.into()),
            "--spoof" => spoof = true,
            "--keyless" => settings = vec![false],
            "--keyed" => settings = vec![true],
            other => bail!(
                "unknown attack option `{other}`; use --only NAMES, --keyless, --keyed, --node PATH, --spoof"
            ),
        }
    }
    let attacks: Vec<Attack> = Attack::ALL
        .into_iter()
        .filter(|a| {
            only.as_ref()
                .is_none_or(|o| o.iter().any(|n| *n == a.name().replace('-', " ")))
        })
        .collect();
    if attacks.is_empty() {
        let names: Vec<&str> = Attack::ALL.iter().map(|a| a.name()).collect();
        bail!(
            "no attack matches --only; the attacks are: {}",
            names.join(", ")
        );
    }
    testbed::check_prerequisites().map_err(|e| anyhow::anyhow!("{e}"))?;
    // The same command as the attack test's, so both find the same binaries.
    let mut build = sh::cargo();
    build.args([
        "build",
        "--quiet",
        "--package",
        "node",
        "--package",
        "attack",
        "--bins",
    ]);
    sh::run(build)?;
    let bin_dir = sh::root().join("target/debug");
    let bins = Binaries {
        node: node.unwrap_or_else(|| bin_dir.join("node")),
        sink: bin_dir.join("attack-sink"),
    };
    // Both key settings run at once, each on its own test bed.
    let results: Vec<anyhow::Result<Vec<Row>>> = std::thread::scope(|s| {
        let handles: Vec<_> = settings
            .iter()
            .map(|&key| {
                let (bins, attacks) = (&bins, &attacks);
                s.spawn(move || {
                    attack::run_suite_with(bins, key, spoof, attacks)
                        .map_err(|e| anyhow::anyhow!("{e}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("an attack suite panicked")))
            })
            .collect()
    });
    let mut rows = Vec::new();
    for r in results {
        rows.extend(r?);
    }
    let out = sh::root().join("target/attack");
    std::fs::create_dir_all(&out).context("cannot create target/attack")?;
    std::fs::write(out.join("summary.json"), attack::summary_json(&rows))?;
    let table = attack::table(&rows);
    std::fs::write(out.join("table.txt"), &table)?;
    println!("\n{table}");
    let effective = rows.iter().filter(|r| !r.failures().is_empty()).count();
    println!(
        "{effective} of {} rows show an effect\nsummary: {}",
        rows.len(),
        out.join("summary.json").display()
    );
    Ok(())
}
