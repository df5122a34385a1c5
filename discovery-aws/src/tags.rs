//! `--aws_tags` parsing and its translation into server-side DescribeInstances filters.

use crate::AwsError;

/// One `--aws_tags` term: a key that must exist, or a key whose value is one of several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagFilter {
    /// `k`: the tag key exists, with any value (the `tag-key` filter).
    Exists(String),
    /// `k=v1|v2`: the tag has one of these values (one `tag:k` filter, whose values are ORed).
    OneOf(String, Vec<String>),
}

impl TagFilter {
    /// The EC2 filter name and values for this term.
    pub fn filter(&self) -> (String, Vec<String>) {
        match self {
            TagFilter::Exists(k) => ("tag-key".to_owned(), vec![k.clone()]),
            TagFilter::OneOf(k, vs) => (format!("tag:{k}"), vs.clone()),
        }
    }
}

fn bad(raw: &str, reason: impl Into<String>) -> AwsError {
    AwsError::BadTags {
        raw: raw.to_owned(),
        reason: reason.into(),
    }
}

/// Parses `k=v[,k=v]`: terms are ANDed, `k` alone means the key exists, `k=v1|v2` ORs values.
pub fn parse_tags(raw: &str) -> Result<Vec<TagFilter>, AwsError> {
    if raw.trim().is_empty() {
        return Err(AwsError::NoTags);
    }
    let mut out: Vec<TagFilter> = Vec::new();
    for term in raw.split(',') {
        let term = term.trim();
        if term.is_empty() {
            return Err(bad(
                raw,
                "an empty term (two commas in a row, or a trailing comma)",
            ));
        }
        let (key, values) = match term.split_once('=') {
            None => (term, None),
            Some((k, v)) => (k.trim(), Some(v)),
        };
        if key.is_empty() {
            return Err(bad(raw, format!("`{term}` has no tag key before `=`")));
        }
        if key.len() > 128 {
            return Err(bad(
                raw,
                format!("tag key `{key}` is longer than 128 characters"),
            ));
        }
        if out.iter().any(|t| match t {
            TagFilter::Exists(k) | TagFilter::OneOf(k, _) => k == key,
        }) {
            return Err(bad(
                raw,
                format!("tag key `{key}` appears twice; give several values as {key}=v1|v2"),
            ));
        }
        match values {
            None => out.push(TagFilter::Exists(key.to_owned())),
            Some(v) => {
                let vs: Vec<String> = v.split('|').map(|s| s.trim().to_owned()).collect();
                if vs.iter().any(String::is_empty) {
                    return Err(bad(
                        raw,
                        format!(
                            "`{term}` has an empty value; write `{key}` alone to match any value"
                        ),
                    ));
                }
                out.push(TagFilter::OneOf(key.to_owned(), vs));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_are_anded_and_values_ored() {
        let t = parse_tags("cluster=prod, tier=a|b ,owned").unwrap();
        assert_eq!(
            t,
            vec![
                TagFilter::OneOf("cluster".into(), vec!["prod".into()]),
                TagFilter::OneOf("tier".into(), vec!["a".into(), "b".into()]),
                TagFilter::Exists("owned".into()),
            ]
        );
        assert_eq!(
            t[1].filter(),
            ("tag:tier".into(), vec!["a".into(), "b".into()])
        );
        assert_eq!(t[2].filter(), ("tag-key".into(), vec!["owned".into()]));
    }

    #[test]
    fn values_may_contain_equals_signs() {
        let t = parse_tags("k=a=b").unwrap();
        assert_eq!(t, vec![TagFilter::OneOf("k".into(), vec!["a=b".into()])]);
    }

    #[test]
    fn bad_terms_name_the_problem() {
        assert!(matches!(parse_tags(" "), Err(AwsError::NoTags)));
        for (raw, needle) in [
            ("a=1,,b", "empty term"),
            ("=x", "no tag key"),
            ("a=", "empty value"),
            ("a=1||2", "empty value"),
            ("a=1,a=2", "a=v1|v2"),
        ] {
            let e = parse_tags(raw).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("--aws_tags"), "{raw}: {e}");
        }
    }
}
