//! The subset of the Compute API list `filter` syntax that discovery uses, parsed and evaluated
//! as the public reference describes it.
//!
//! Supported: `FIELD = VALUE`, `FIELD != VALUE` and `FIELD:*` (the field exists), on the
//! fields `labels.KEY`, `status` and `name`; values bare or double-quoted; several expressions
//! each in parentheses, joined by whitespace or `AND` (both mean AND). Anything else, `OR`
//! included, is refused with 400 like an invalid expression, so a client that relies on more
//! than this subset fails loudly instead of being silently mis-served.

use std::collections::BTreeMap;

/// One parsed comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Term {
    /// `labels.KEY = "V"` (`negate` for `!=`).
    LabelEq {
        key: String,
        value: String,
        negate: bool,
    },
    /// `labels.KEY:*`.
    LabelExists { key: String },
    /// `status = RUNNING` (`negate` for `!=`).
    Status { value: String, negate: bool },
    /// `name = "x"` (`negate` for `!=`).
    Name { value: String, negate: bool },
}

/// A whole filter: every term must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Filter {
    pub(crate) terms: Vec<Term>,
}

/// What the filter is evaluated against.
pub(crate) struct Subject<'a> {
    pub(crate) name: &'a str,
    pub(crate) status: &'a str,
    pub(crate) labels: &'a BTreeMap<String, String>,
}

impl Filter {
    /// Whether `s` passes every term.
    pub(crate) fn matches(&self, s: &Subject<'_>) -> bool {
        self.terms.iter().all(|t| match t {
            Term::LabelEq { key, value, negate } => {
                (s.labels.get(key).map(String::as_str) == Some(value.as_str())) != *negate
            }
            Term::LabelExists { key } => s.labels.contains_key(key),
            Term::Status { value, negate } => (s.status == value) != *negate,
            Term::Name { value, negate } => (s.name == value) != *negate,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Open,
    Close,
    Eq,
    Ne,
    Has,
    Word(String),
    Quoted(String),
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = src.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                out.push(Tok::Open);
            }
            ')' => {
                chars.next();
                out.push(Tok::Close);
            }
            '=' => {
                chars.next();
                out.push(Tok::Eq);
            }
            ':' => {
                chars.next();
                out.push(Tok::Has);
            }
            '!' => {
                chars.next();
                if chars.next() != Some('=') {
                    return Err("`!` must be followed by `=`".into());
                }
                out.push(Tok::Ne);
            }
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('\\') => match chars.next() {
                            Some(e) => s.push(e),
                            None => return Err("unterminated string".into()),
                        },
                        Some('"') => break,
                        Some(ch) => s.push(ch),
                        None => return Err("unterminated string".into()),
                    }
                }
                out.push(Tok::Quoted(s));
            }
            _ => {
                let mut s = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_whitespace() || matches!(ch, '(' | ')' | '=' | '!' | ':' | '"') {
                        break;
                    }
                    s.push(ch);
                    chars.next();
                }
                out.push(Tok::Word(s));
            }
        }
    }
    Ok(out)
}

fn term(field: &str, op: &Tok, value: Option<&Tok>) -> Result<Term, String> {
    let value_str = |v: Option<&Tok>| match v {
        Some(Tok::Word(w)) | Some(Tok::Quoted(w)) => Ok(w.clone()),
        _ => Err(format!("a value must follow the operator after `{field}`")),
    };
    if let Tok::Has = op {
        return match (field.strip_prefix("labels."), value) {
            (Some(key), Some(Tok::Word(w))) if w == "*" && !key.is_empty() => {
                Ok(Term::LabelExists { key: key.into() })
            }
            _ => Err(format!(
                "`{field}:` is only supported as `labels.KEY:*` by this fake"
            )),
        };
    }
    let negate = matches!(op, Tok::Ne);
    let value = value_str(value)?;
    if let Some(key) = field.strip_prefix("labels.") {
        if key.is_empty() {
            return Err("`labels.` needs a key".into());
        }
        return Ok(Term::LabelEq {
            key: key.into(),
            value,
            negate,
        });
    }
    match field {
        "status" => Ok(Term::Status { value, negate }),
        "name" => Ok(Term::Name { value, negate }),
        other => Err(format!("unknown field `{other}`")),
    }
}

/// Parses a filter; the error is the reason, for a 400 answer.
pub(crate) fn parse(src: &str) -> Result<Filter, String> {
    let toks = lex(src)?;
    let mut terms = Vec::new();
    let mut i = 0;
    let mut bare = 0usize;
    while i < toks.len() {
        match &toks[i] {
            Tok::Word(w) if w == "AND" && !terms.is_empty() => {
                i += 1;
                continue;
            }
            Tok::Word(w) if w == "OR" => {
                return Err("OR is not supported by this fake".into());
            }
            _ => {}
        }
        let open = toks[i] == Tok::Open;
        if open {
            i += 1;
        } else {
            bare += 1;
        }
        let Some(Tok::Word(field)) = toks.get(i) else {
            return Err("expected a field name".into());
        };
        let op = toks
            .get(i + 1)
            .filter(|t| matches!(t, Tok::Eq | Tok::Ne | Tok::Has))
            .ok_or_else(|| format!("expected `=`, `!=` or `:` after `{field}`"))?;
        terms.push(term(field, op, toks.get(i + 2))?);
        i += 3;
        if open {
            if toks.get(i) != Some(&Tok::Close) {
                return Err("expected `)`".into());
            }
            i += 1;
        }
    }
    // The reference requires parentheses around each expression once there are several.
    if bare > 0 && terms.len() > 1 {
        return Err("several expressions must each be in parentheses".into());
    }
    Ok(Filter { terms })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject<'a>(
        name: &'a str,
        status: &'a str,
        labels: &'a BTreeMap<String, String>,
    ) -> Subject<'a> {
        Subject {
            name,
            status,
            labels,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parenthesised_terms_joined_by_and_all_must_hold() {
        let f = parse(r#"(labels.cluster = "prod") AND (labels.role:*) AND (status = RUNNING)"#)
            .unwrap();
        assert_eq!(f.terms.len(), 3);
        let l = labels(&[("cluster", "prod"), ("role", "w")]);
        assert!(f.matches(&subject("a", "RUNNING", &l)));
        assert!(!f.matches(&subject("a", "STOPPED", &l)));
        let l2 = labels(&[("cluster", "prod")]);
        assert!(!f.matches(&subject("a", "RUNNING", &l2)));
        let l3 = labels(&[("cluster", "dev"), ("role", "w")]);
        assert!(!f.matches(&subject("a", "RUNNING", &l3)));
    }

    #[test]
    fn whitespace_between_parenthesised_terms_means_and() {
        let f = parse(r#"(labels.a = "1") (status != TERMINATED)"#).unwrap();
        let l = labels(&[("a", "1")]);
        assert!(f.matches(&subject("x", "RUNNING", &l)));
        assert!(!f.matches(&subject("x", "TERMINATED", &l)));
    }

    #[test]
    fn a_single_bare_term_and_an_empty_filter_are_accepted() {
        let f = parse("status = RUNNING").unwrap();
        assert_eq!(f.terms.len(), 1);
        assert_eq!(parse("").unwrap(), Filter::default());
    }

    #[test]
    fn quoted_values_keep_spaces_and_escapes() {
        let f = parse(r#"labels.k = "a \"b\" c""#).unwrap();
        assert_eq!(
            f.terms,
            vec![Term::LabelEq {
                key: "k".into(),
                value: r#"a "b" c"#.into(),
                negate: false
            }]
        );
    }

    #[test]
    fn unsupported_syntax_is_refused_with_a_reason() {
        for bad in [
            "(a = b) OR (c = d)",
            "zone = x",
            "labels.k",
            "(labels.k = v",
            "labels.k = v status = RUNNING",
            "name:*",
            r#"labels.k = "open"#,
        ] {
            assert!(parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
