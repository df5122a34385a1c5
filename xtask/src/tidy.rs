//! Tidy checks that keep the docs and the tree from drifting apart; they run as tests.
//!
//! - Every path named in a code map of ARCHITECTURE.md exists.
//! - Every code fence in README.md and ARCHITECTURE.md is closed.
//! - Every Rust file in the workspace starts with a `//!` line saying why it exists.
//!
//! The README's flag tables are checked against the CLI by `node`'s own tests, which can see
//! `Cli::command()`; xtask must not depend on `node` (that would build every SDK first).

use std::path::{Path, PathBuf};

/// Paths named in the code maps (fenced blocks) of an architecture document: a top-level
/// entry (`crate/`, `crate/src/x.rs`) starts a line; an indented `src/..` or `tests/..` entry
/// is relative to the last top-level crate named above it.
pub fn code_map_paths(doc: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut in_fence = false;
    let mut base = String::new();
    for line in doc.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if !in_fence || line.trim().is_empty() {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if !first.contains('/') || first.contains("://") || first.starts_with('-') {
            continue;
        }
        // Brace lists such as `deploy/{kubernetes,aws,gcp}/` expand to each member.
        let expanded = expand_braces(first);
        if line.starts_with(' ') {
            for p in expanded {
                paths.push(format!("{base}{p}"));
            }
        } else {
            if let Some(top) = first.split('/').next() {
                base = format!("{top}/");
            }
            paths.extend(expanded);
        }
    }
    paths
}

fn expand_braces(p: &str) -> Vec<String> {
    match (p.find('{'), p.find('}')) {
        (Some(a), Some(b)) if a < b => p[a + 1..b]
            .split(',')
            .map(|m| format!("{}{}{}", &p[..a], m, &p[b + 1..]))
            .collect(),
        _ => vec![p.to_string()],
    }
}

/// The line numbers of fences left open at the end of a Markdown document (empty when
/// balanced).
pub fn unclosed_fences(doc: &str) -> Vec<usize> {
    let mut open: Option<usize> = None;
    for (i, line) in doc.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            open = match open {
                Some(_) => None,
                None => Some(i + 1),
            };
        }
    }
    open.into_iter().collect()
}

/// Rust files under `dir` (skipping `target` and hidden directories).
pub fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sh;

    fn read(name: &str) -> String {
        std::fs::read_to_string(sh::root().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn every_path_in_the_architecture_code_maps_exists() {
        let doc = read("ARCHITECTURE.md");
        let paths = code_map_paths(&doc);
        assert!(
            paths.len() > 20,
            "the parser found too few paths: {paths:?}"
        );
        let missing: Vec<&String> = paths
            .iter()
            .filter(|p| !sh::root().join(p.trim_end_matches('/')).exists())
            .collect();
        assert!(
            missing.is_empty(),
            "ARCHITECTURE.md names missing paths: {missing:?}"
        );
    }

    #[test]
    fn the_docs_close_every_code_fence() {
        for doc in ["README.md", "ARCHITECTURE.md"] {
            let open = unclosed_fences(&read(doc));
            assert!(
                open.is_empty(),
                "{doc}: the fence opened on line {open:?} never closes"
            );
        }
    }

    #[test]
    fn every_rust_file_says_why_it_exists() {
        let mut files = Vec::new();
        rust_files(&sh::root(), &mut files);
        assert!(files.len() > 50, "found only {} files", files.len());
        let bare: Vec<String> = files
            .iter()
            .filter(|f| {
                !std::fs::read_to_string(f).is_ok_and(|s| s.trim_start().starts_with("//!"))
            })
            .map(|f| f.display().to_string())
            .collect();
        assert!(bare.is_empty(), "files without a `//!` header: {bare:?}");
    }

    #[test]
    fn the_checks_catch_what_they_look_for() {
        assert_eq!(unclosed_fences("a\n```sh\nx\n```\n```\n"), vec![5]);
        assert!(unclosed_fences("```\n```\n").is_empty());
        let map = "```\nnode/   the binary\n  src/cli.rs   flags\ndeploy/{a,b}/  kits\n```\n";
        assert_eq!(
            code_map_paths(map),
            vec!["node/", "node/src/cli.rs", "deploy/a/", "deploy/b/"]
        );
    }
}
