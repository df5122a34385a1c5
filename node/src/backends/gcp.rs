//! Flags and constructor of GCE discovery (`--discovery=gcp`).

#[cfg(feature = "gcp")]
use std::sync::Arc;

use clap::Args;
#[cfg(feature = "gcp")]
use discovery::{Context, Discover, DiscoveryError};
#[cfg(feature = "gcp")]
use discovery_gcp::{Config, GcpDiscovery, GcpError, parse_labels, parse_zones};

/// GCP discovery flags.
#[derive(Debug, Clone, Args)]
pub struct GcpFlags {
    /// Project to list; default: the metadata server's project/project-id.
    #[arg(long = "gcp_project", env = "NODE_GCP_PROJECT", global = true)]
    pub gcp_project: Option<String>,

    /// Zones to list, comma-separated; default: this VM's zone (metadata instance/zone).
    #[arg(long = "gcp_zones", env = "NODE_GCP_ZONES", global = true)]
    pub gcp_zones: Option<String>,

    /// Region whose zones are all listed (instances.aggregatedList); excludes --gcp_zones.
    #[arg(long = "gcp_region", env = "NODE_GCP_REGION", global = true)]
    pub gcp_region: Option<String>,

    /// Labels every peer has, k=v[,k=v]; a bare k means the label exists.
    #[arg(long = "gcp_labels", env = "NODE_GCP_LABELS", global = true)]
    pub gcp_labels: Option<String>,

    /// Compute API endpoint, for tests (default https://compute.googleapis.com); the metadata server is GCE_METADATA_HOST.
    #[arg(long = "gcp_endpoint", env = "NODE_GCP_ENDPOINT", global = true)]
    pub gcp_endpoint: Option<String>,
}

#[cfg(feature = "gcp")]
/// Builds the backend.
pub fn build(flags: &GcpFlags, ctx: Context) -> Result<Arc<dyn Discover>, DiscoveryError> {
    let config = Config {
        project: flags.gcp_project.clone().filter(|p| !p.is_empty()),
        zones: parse_zones(flags.gcp_zones.as_deref().unwrap_or(""))?,
        region: flags.gcp_region.clone().filter(|r| !r.is_empty()),
        labels: parse_labels(flags.gcp_labels.as_deref().unwrap_or(""))?,
        endpoint: flags.gcp_endpoint.clone().filter(|e| !e.is_empty()),
        ..Config::default()
    };
    let d = GcpDiscovery::new(config, ctx).map_err(|e: GcpError| DiscoveryError::from(e))?;
    Ok(d)
}
