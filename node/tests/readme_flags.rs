//! A tidy check: the README's flag tables and the CLI name the same flags, with the same
//! variables and defaults, so the tables cannot rot as flags are added.

use clap::CommandFactory;
use node::cli::Cli;

/// The rows of the README's tables whose first cell is a flag: (flag, variable, default).
fn readme_rows() -> Vec<(String, Option<String>, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let mut rows = Vec::new();
    for line in readme.lines().filter(|l| l.starts_with("| `--")) {
        let cells: Vec<&str> = line
            .split(" | ")
            .map(|c| c.trim_matches('|').trim())
            .collect();
        let Some(flag) = cells.first().and_then(|c| c.strip_prefix("`--")) else {
            continue;
        };
        let flag = flag.split(['`', ' ']).next().unwrap_or("").to_string();
        // Tables with a variable column have four cells: flag, variable, default, meaning.
        let (var, default) = match cells.len() {
            4.. if cells[1].starts_with("`NODE_") => (
                Some(cells[1].trim_matches('`').to_string()),
                cells[2].to_string(),
            ),
            _ => (None, cells.get(1).copied().unwrap_or("").to_string()),
        };
        rows.push((flag, var, default));
    }
    rows
}

#[test]
fn every_flag_is_in_the_readme_and_every_readme_flag_exists() {
    let cmd = Cli::command();
    let args: Vec<&clap::Arg> = cmd.get_arguments().filter(|a| !a.is_hide_set()).collect();
    let rows = readme_rows();
    assert!(rows.len() > 25, "the table parser found only {rows:?}");
    let flags: Vec<String> = args
        .iter()
        .filter_map(|a| a.get_long().map(str::to_string))
        .filter(|l| l != "help" && l != "version")
        .collect();
    let missing: Vec<&String> = flags
        .iter()
        .filter(|f| !rows.iter().any(|(r, _, _)| r == *f))
        .collect();
    assert!(
        missing.is_empty(),
        "flags missing from the README tables: {missing:?}"
    );
    let unknown: Vec<&String> = rows
        .iter()
        .map(|(r, _, _)| r)
        .filter(|r| !flags.contains(r))
        .collect();
    assert!(
        unknown.is_empty(),
        "README rows for flags the CLI lacks: {unknown:?}"
    );
    // Where a row names a variable and a literal default, both match the CLI.
    for (flag, var, default) in &rows {
        let Some(arg) = args.iter().find(|a| a.get_long() == Some(flag.as_str())) else {
            continue;
        };
        if let Some(var) = var {
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert_eq!(env.as_deref(), Some(var.as_str()), "--{flag}'s variable");
        }
        let cli_default: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        if let (Some(d), Some(lit)) = (
            cli_default.first(),
            default.strip_prefix('`').and_then(|d| d.strip_suffix('`')),
        ) {
            assert_eq!(lit, d, "--{flag}'s default in the README");
        }
    }
}
