//! Flags and constructor of EC2 discovery (`--discovery=aws`).

#[cfg(feature = "aws")]
use std::sync::Arc;

use clap::Args;
#[cfg(feature = "aws")]
use discovery::{Context, Discover, DiscoveryError};
#[cfg(feature = "aws")]
use discovery_aws::{AwsConfig, AwsDiscovery};

/// EC2 discovery flags.
#[derive(Debug, Clone, Args)]
pub struct AwsFlags {
    /// Region to search; default AWS_REGION, else the region in the IMDSv2 instance identity document.
    #[arg(long = "aws_region", env = "NODE_AWS_REGION", global = true)]
    pub aws_region: Option<String>,

    /// Tags that mark the cluster's instances, k=v[,k=v]: all must match; k alone = key exists; k=v1|v2 = any value.
    #[arg(long = "aws_tags", env = "NODE_AWS_TAGS", global = true)]
    pub aws_tags: Option<String>,

    /// Only instances in this security group (id sg-... or name).
    #[arg(
        long = "aws_security_group",
        env = "NODE_AWS_SECURITY_GROUP",
        global = true
    )]
    pub aws_security_group: Option<String>,

    /// EC2 endpoint URL, for LocalStack or a VPC endpoint; default the region's public endpoint.
    #[arg(long = "aws_endpoint", env = "NODE_AWS_ENDPOINT", global = true)]
    pub aws_endpoint: Option<String>,
}

#[cfg(feature = "aws")]
/// Builds the backend.
pub fn build(flags: &AwsFlags, ctx: Context) -> Result<Arc<dyn Discover>, DiscoveryError> {
    let mut config = AwsConfig::new(flags.aws_tags.clone().unwrap_or_default());
    config.region = flags.aws_region.clone();
    config.security_group = flags.aws_security_group.clone();
    config.endpoint = flags.aws_endpoint.clone();
    let d = AwsDiscovery::new(config, ctx)?;
    Ok(d)
}
