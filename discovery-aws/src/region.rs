//! The region chain (`--aws_region`, else `AWS_REGION`, else the IMDSv2 instance identity
//! document) and this instance's availability zone, with the environment injected.
//!
//! As in smithy-rs' aws-config, the policy is in one place ([`resolve_region`]) and each
//! provider only answers "here it is", "not here" (`Ok(None)`) or "failed"; every variable is
//! read from one [`AwsEnv`], so tests pass their own instead of changing the process's.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::AwsError;

/// The environment variable read when `--aws_region` is absent.
pub const REGION_ENV: &str = "AWS_REGION";
/// `true` turns the instance metadata service off.
pub const METADATA_DISABLED_ENV: &str = "AWS_EC2_METADATA_DISABLED";
/// An IMDS endpoint URL (a fake, or the IPv6 endpoint).
pub const METADATA_ENDPOINT_ENV: &str = "AWS_EC2_METADATA_SERVICE_ENDPOINT";
/// `IPv6` picks IMDS' IPv6 endpoint when no endpoint is given.
pub const METADATA_MODE_ENV: &str = "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE";
const IMDS_V4: &str = "http://169.254.169.254";
const IMDS_V6: &str = "http://[fd00:ec2::254]";
const IDENTITY_DOCUMENT: &str = "/latest/dynamic/instance-identity/document";
const ZONE_PATH: &str = "/latest/meta-data/placement/availability-zone";
/// The longest zone name taken from IMDS or the API (real ones are about 20 characters).
pub const MAX_ZONE_LEN: usize = 64;

/// The environment the region chain and IMDS read: the variables above, captured once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AwsEnv {
    vars: BTreeMap<&'static str, String>,
}

impl AwsEnv {
    /// The variables this backend reads, from the process environment.
    pub fn from_process() -> Self {
        let mut vars = BTreeMap::new();
        for k in [
            REGION_ENV,
            METADATA_DISABLED_ENV,
            METADATA_ENDPOINT_ENV,
            METADATA_MODE_ENV,
        ] {
            if let Ok(v) = std::env::var(k) {
                vars.insert(k, v);
            }
        }
        Self { vars }
    }

    /// An environment with only these variables, for tests and embedding.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'static str, &'a str)>) -> Self {
        Self {
            vars: pairs.into_iter().map(|(k, v)| (k, v.to_owned())).collect(),
        }
    }

    /// A variable's value, trimmed; `None` when unset or blank.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// Whether `AWS_EC2_METADATA_DISABLED=true`.
    pub fn imds_disabled(&self) -> bool {
        self.get(METADATA_DISABLED_ENV)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    /// The IMDS endpoint: the variable, else the IPv6 or IPv4 link-local address by mode.
    pub fn imds_endpoint(&self) -> String {
        match self.get(METADATA_ENDPOINT_ENV) {
            Some(e) => e.to_owned(),
            None if self
                .get(METADATA_MODE_ENV)
                .is_some_and(|m| m.eq_ignore_ascii_case("ipv6")) =>
            {
                IMDS_V6.to_owned()
            }
            None => IMDS_V4.to_owned(),
        }
    }
}

/// An IMDSv2 client at the environment's endpoint, with short, bounded timeouts; `None` when
/// IMDS is turned off.
fn imds(env: &AwsEnv) -> Result<Option<aws_config::imds::Client>, AwsError> {
    if env.imds_disabled() {
        return Ok(None);
    }
    let endpoint = env.imds_endpoint();
    let builder = aws_config::imds::Client::builder()
        .max_attempts(2)
        .connect_timeout(Duration::from_secs(1))
        .read_timeout(Duration::from_secs(2))
        .operation_timeout(Duration::from_secs(5))
        .endpoint(&endpoint)
        .map_err(|source| AwsError::ImdsEndpoint {
            endpoint: endpoint.clone(),
            source,
        })?;
    Ok(Some(builder.build()))
}

/// Picks the region: the flag, then `AWS_REGION`, then IMDSv2 (unless
/// `AWS_EC2_METADATA_DISABLED=true`), all read from `env`.
pub async fn resolve_region(flag: Option<String>, env: &AwsEnv) -> Result<String, AwsError> {
    if let Some(r) = flag.as_deref().map(str::trim).filter(|r| !r.is_empty()) {
        return Ok(r.to_owned());
    }
    if let Some(r) = env.get(REGION_ENV) {
        return Ok(r.to_owned());
    }
    match region_from_imds(env).await? {
        Some(r) => Ok(r),
        None => Err(AwsError::NoRegion {
            reason: format!(
                "{REGION_ENV} is unset and {METADATA_DISABLED_ENV}=true turns off IMDS"
            ),
            source: None,
        }),
    }
}

/// The region from the IMDSv2 identity document; `Ok(None)` when IMDS is turned off.
async fn region_from_imds(env: &AwsEnv) -> Result<Option<String>, AwsError> {
    let Some(client) = imds(env)? else {
        return Ok(None);
    };
    let doc = client
        .get(IDENTITY_DOCUMENT)
        .await
        .map_err(|e| AwsError::NoRegion {
            reason: format!(
                "IMDSv2 {IDENTITY_DOCUMENT} at {} failed",
                env.imds_endpoint()
            ),
            source: Some(Box::new(e)),
        })?;
    region_from_document(doc.as_ref()).map(Some)
}

/// Reads `region` from an instance identity document.
pub fn region_from_document(doc: &str) -> Result<String, AwsError> {
    let v: serde_json::Value = serde_json::from_str(doc).map_err(|e| AwsError::NoRegion {
        reason: "the IMDS identity document is not JSON".into(),
        source: Some(Box::new(e)),
    })?;
    match v.get("region").and_then(|r| r.as_str()) {
        Some(r) if !r.is_empty() => Ok(r.to_owned()),
        _ => Err(AwsError::NoRegion {
            reason: "the IMDS identity document has no `region` field".into(),
            source: None,
        }),
    }
}

/// This instance's availability zone from IMDS (`placement/availability-zone`), or `None`
/// when IMDS is off, unreachable or answers something that is not a zone name.
pub async fn local_zone(env: &AwsEnv) -> Option<String> {
    let client = match imds(env) {
        Ok(Some(c)) => c,
        Ok(None) => return None,
        Err(e) => {
            tracing::debug!("no availability zone: {}", discovery::Chain(&e));
            return None;
        }
    };
    match client.get(ZONE_PATH).await {
        Ok(z) => zone_name(z.as_ref()),
        Err(e) => {
            tracing::debug!(
                "no availability zone from IMDS {ZONE_PATH}: {}",
                discovery::Chain(&e)
            );
            None
        }
    }
}

/// A zone name as EC2 spells them (`eu-west-3a`, `us-west-2-lax-1a`): lowercase letters,
/// digits and dashes, at most [`MAX_ZONE_LEN`]; anything else is refused.
pub fn zone_name(raw: &str) -> Option<String> {
    let z = raw.trim();
    let ok = !z.is_empty()
        && z.len() <= MAX_ZONE_LEN
        && z.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ok.then(|| z.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_comes_from_the_document() {
        let doc = r#"{"accountId":"000000000000","region":"eu-west-3","instanceId":"i-1"}"#;
        assert_eq!(region_from_document(doc).unwrap(), "eu-west-3");
        let e = region_from_document("{}").unwrap_err().to_string();
        assert!(e.contains("region") && e.contains("--aws_region"), "{e}");
        let e = region_from_document("<html>").unwrap_err();
        assert!(
            std::error::Error::source(&e).is_some(),
            "the JSON error is kept"
        );
    }

    #[tokio::test]
    async fn the_flag_wins_then_the_variable() {
        let env = AwsEnv::from_pairs([(REGION_ENV, "eu-north-1")]);
        assert_eq!(
            resolve_region(Some(" us-east-2 ".into()), &env)
                .await
                .unwrap(),
            "us-east-2"
        );
        assert_eq!(
            resolve_region(Some(" ".into()), &env).await.unwrap(),
            "eu-north-1"
        );
    }

    #[tokio::test]
    async fn no_region_and_no_imds_says_what_to_set() {
        let env = AwsEnv::from_pairs([(METADATA_DISABLED_ENV, "TRUE"), (REGION_ENV, " ")]);
        let e = resolve_region(None, &env).await.unwrap_err().to_string();
        assert!(
            e.contains("AWS_EC2_METADATA_DISABLED=true") && e.contains("--aws_region"),
            "{e}"
        );
        assert_eq!(local_zone(&env).await, None);
    }

    #[test]
    fn the_imds_endpoint_follows_the_environment() {
        assert_eq!(AwsEnv::default().imds_endpoint(), IMDS_V4);
        let v6 = AwsEnv::from_pairs([(METADATA_MODE_ENV, "IPv6")]);
        assert_eq!(v6.imds_endpoint(), IMDS_V6);
        let fake = AwsEnv::from_pairs([
            (METADATA_MODE_ENV, "IPv6"),
            (METADATA_ENDPOINT_ENV, "http://127.0.0.1:9"),
        ]);
        assert_eq!(fake.imds_endpoint(), "http://127.0.0.1:9");
        assert!(!fake.imds_disabled());
    }

    #[test]
    fn zone_names_are_checked() {
        assert_eq!(zone_name("eu-west-3a\n").as_deref(), Some("eu-west-3a"));
        assert_eq!(
            zone_name("us-west-2-lax-1a").as_deref(),
            Some("us-west-2-lax-1a")
        );
        for bad in ["", "EU-WEST", "a b", "zone\u{1b}[31m", &"a".repeat(65)] {
            assert_eq!(zone_name(bad), None, "{bad:?}");
        }
    }
}
