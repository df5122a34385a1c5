//! The region: `--aws_region`, else `AWS_REGION`, else the IMDSv2 instance identity document.

use std::time::Duration;

use crate::AwsError;

/// The environment variable read when `--aws_region` is absent.
pub const REGION_ENV: &str = "AWS_REGION";
const IDENTITY_DOCUMENT: &str = "/latest/dynamic/instance-identity/document";

/// Picks the region: the flag, then `AWS_REGION`, then IMDSv2 (unless
/// `AWS_EC2_METADATA_DISABLED=true`). IMDS honours `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
pub async fn resolve_region(flag: Option<String>) -> Result<String, AwsError> {
    if let Some(r) = flag.filter(|r| !r.trim().is_empty()) {
        return Ok(r.trim().to_owned());
    }
    if let Ok(r) = std::env::var(REGION_ENV)
        && !r.trim().is_empty()
    {
        return Ok(r.trim().to_owned());
    }
    if std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return Err(AwsError::NoRegion {
            reason: "AWS_REGION is unset and AWS_EC2_METADATA_DISABLED=true turns off IMDS".into(),
        });
    }
    let client = aws_config::imds::Client::builder()
        .max_attempts(2)
        .connect_timeout(Duration::from_secs(1))
        .read_timeout(Duration::from_secs(2))
        .operation_timeout(Duration::from_secs(5))
        .build();
    let doc = client
        .get(IDENTITY_DOCUMENT)
        .await
        .map_err(|e| AwsError::NoRegion {
            reason: format!("IMDSv2 {IDENTITY_DOCUMENT} failed: {e}"),
        })?;
    region_from_document(doc.as_ref())
}

/// Reads `region` from an instance identity document.
pub fn region_from_document(doc: &str) -> Result<String, AwsError> {
    let v: serde_json::Value = serde_json::from_str(doc).map_err(|e| AwsError::NoRegion {
        reason: format!("the IMDS identity document is not JSON: {e}"),
    })?;
    match v.get("region").and_then(|r| r.as_str()) {
        Some(r) if !r.is_empty() => Ok(r.to_owned()),
        _ => Err(AwsError::NoRegion {
            reason: "the IMDS identity document has no `region` field".into(),
        }),
    }
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
        assert!(region_from_document("<html>").is_err());
    }

    #[tokio::test]
    async fn the_flag_wins() {
        assert_eq!(
            resolve_region(Some(" us-east-2 ".into())).await.unwrap(),
            "us-east-2"
        );
    }
}
