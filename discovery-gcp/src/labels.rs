//! `--gcp_labels` parsing and the server-side `filter` expressions built from it.
//!
//! The Compute API filters instances on the server: `labels.KEY = "VALUE"` for a value,
//! `labels.KEY:*` for "the label exists", `status = RUNNING`, each term in parentheses and
//! joined by `AND`. Label keys and values are validated against GCE's label rules first, so
//! the filter never needs escaping and a typo fails at start-up instead of matching nothing.

use std::fmt;

use crate::GcpError;

/// One `--gcp_labels` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelMatch {
    /// `key=value`: the label has this value.
    Equals(String, String),
    /// A bare `key`: the label exists, with any value.
    Exists(String),
}

impl LabelMatch {
    /// The label key.
    pub fn key(&self) -> &str {
        match self {
            LabelMatch::Equals(k, _) | LabelMatch::Exists(k) => k,
        }
    }

    /// The filter term for this entry.
    fn term(&self) -> String {
        match self {
            LabelMatch::Equals(k, v) => format!("(labels.{k} = \"{v}\")"),
            LabelMatch::Exists(k) => format!("(labels.{k}:*)"),
        }
    }
}

impl fmt::Display for LabelMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabelMatch::Equals(k, v) => write!(f, "{k}={v}"),
            LabelMatch::Exists(k) => f.write_str(k),
        }
    }
}

/// GCE label rules: at most 63 characters of lowercase letters, digits, `_` and `-`; keys
/// start with a lowercase letter, values may be empty.
fn valid_label_part(s: &str, key: bool) -> bool {
    let ok_char = |c: char| c.is_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
    s.chars().count() <= 63
        && s.chars().all(ok_char)
        && (!key || s.chars().next().is_some_and(|c| c.is_lowercase()))
}

/// Parses `k=v[,k=v]` (a bare `k` means the label exists). Empty input means no label filter.
pub fn parse_labels(raw: &str) -> Result<Vec<LabelMatch>, GcpError> {
    let mut out: Vec<LabelMatch> = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let m = match entry.split_once('=') {
            Some((k, v)) => LabelMatch::Equals(k.trim().to_owned(), v.trim().to_owned()),
            None => LabelMatch::Exists(entry.to_owned()),
        };
        if !valid_label_part(m.key(), true) {
            return Err(GcpError::BadLabel {
                entry: entry.into(),
                reason: "a label key is 1-63 lowercase letters, digits, `_` or `-`, starting with a letter".into(),
            });
        }
        if let LabelMatch::Equals(_, v) = &m
            && !valid_label_part(v, false)
        {
            return Err(GcpError::BadLabel {
                entry: entry.into(),
                reason: "a label value is 0-63 lowercase letters, digits, `_` or `-`".into(),
            });
        }
        if let Some(prev) = out.iter().find(|p| p.key() == m.key()) {
            if *prev == m {
                continue;
            }
            return Err(GcpError::BadLabel {
                entry: entry.into(),
                reason: format!(
                    "it conflicts with `{prev}`: all labels must match, so no instance could"
                ),
            });
        }
        out.push(m);
    }
    Ok(out)
}

/// The filter for the production listing: every label and `status = RUNNING`.
pub fn running_filter(labels: &[LabelMatch]) -> String {
    labels
        .iter()
        .map(LabelMatch::term)
        .chain(std::iter::once("(status = RUNNING)".to_owned()))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The filter on the labels only (any status), for explaining exclusions; empty when no labels
/// were given.
pub fn labels_filter(labels: &[LabelMatch]) -> String {
    labels
        .iter()
        .map(LabelMatch::term)
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Whether labels satisfy every entry. Discovery never filters with this (the server does);
/// it only keeps an explanation from calling a matching instance a mismatch.
pub fn satisfies(labels: &[LabelMatch], have: &std::collections::HashMap<String, String>) -> bool {
    labels.iter().all(|m| match m {
        LabelMatch::Equals(k, v) => have.get(k) == Some(v),
        LabelMatch::Exists(k) => have.contains_key(k),
    })
}

/// Words why an instance's labels fail the entries; used only to explain an exclusion that the
/// server already decided.
pub fn describe_mismatch(
    labels: &[LabelMatch],
    have: &std::collections::HashMap<String, String>,
) -> String {
    let missing: Vec<String> = labels
        .iter()
        .filter(|m| match m {
            LabelMatch::Equals(k, v) => have.get(k) != Some(v),
            LabelMatch::Exists(k) => !have.contains_key(k),
        })
        .map(|m| match m {
            LabelMatch::Equals(k, v) => match have.get(k) {
                Some(actual) => format!("{k}={actual} (want {v})"),
                None => format!("{k} missing (want {v})"),
            },
            LabelMatch::Exists(k) => format!("{k} missing"),
        })
        .collect();
    if missing.is_empty() {
        "labels do not match --gcp_labels".into()
    } else {
        format!("labels do not match --gcp_labels: {}", missing.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_and_bare_keys_parse_in_order() {
        let got = parse_labels("cluster=prod, role ,tier=").unwrap();
        assert_eq!(
            got,
            vec![
                LabelMatch::Equals("cluster".into(), "prod".into()),
                LabelMatch::Exists("role".into()),
                LabelMatch::Equals("tier".into(), String::new()),
            ]
        );
        assert!(parse_labels("").unwrap().is_empty());
    }

    #[test]
    fn the_running_filter_parenthesises_every_term_and_joins_them_with_and() {
        let l = parse_labels("cluster=prod,role").unwrap();
        assert_eq!(
            running_filter(&l),
            r#"(labels.cluster = "prod") AND (labels.role:*) AND (status = RUNNING)"#
        );
        assert_eq!(running_filter(&[]), "(status = RUNNING)");
        assert_eq!(
            labels_filter(&l),
            r#"(labels.cluster = "prod") AND (labels.role:*)"#
        );
        assert_eq!(labels_filter(&[]), "");
    }

    #[test]
    fn invalid_labels_are_refused_with_the_rule() {
        for bad in [
            "Cluster=prod",
            "cluster=Prod",
            "1abc=x",
            "a b=c",
            "k=\"v\"",
            "=v",
        ] {
            let e = parse_labels(bad).unwrap_err().to_string();
            assert!(e.contains("--gcp_labels"), "{bad}: {e}");
        }
        let long = "a".repeat(64);
        assert!(parse_labels(&long).is_err());
    }

    #[test]
    fn conflicting_values_for_one_key_are_refused_and_duplicates_collapse() {
        assert!(parse_labels("a=1,a=2").is_err());
        assert!(parse_labels("a=1,a").is_err());
        assert_eq!(parse_labels("a=1,a=1").unwrap().len(), 1);
    }

    #[test]
    fn a_mismatch_names_each_label_that_differs() {
        let l = parse_labels("cluster=prod,role").unwrap();
        let have = [("cluster".to_string(), "dev".to_string())].into();
        assert_eq!(
            describe_mismatch(&l, &have),
            "labels do not match --gcp_labels: cluster=dev (want prod), role missing"
        );
    }
}
