//! Flags and constructor of static discovery.

#[cfg(feature = "static")]
use std::sync::Arc;

use clap::Args;
#[cfg(feature = "static")]
use discovery::{Context, Discover, DiscoveryError};
#[cfg(feature = "static")]
use discovery_static::{StaticDiscovery, StaticError};

/// Static discovery flags.
#[derive(Debug, Clone, Args)]
pub struct StaticFlags {
    /// Peers as IP, IP:port, host or host:port, comma-separated; the port is the peer's --private_port.
    #[arg(long = "static_members", env = "NODE_STATIC_MEMBERS", global = true)]
    pub static_members: Option<String>,
}

#[cfg(feature = "static")]
/// Builds the backend.
pub fn build(flags: &StaticFlags, ctx: Context) -> Result<Arc<dyn Discover>, DiscoveryError> {
    let raw = flags.static_members.as_deref().unwrap_or("");
    let d = StaticDiscovery::new(raw, ctx).map_err(|e: StaticError| DiscoveryError::from(e))?;
    Ok(d)
}
