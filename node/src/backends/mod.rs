//! Builds the discovery backend that `--discovery` names.
//!
//! Each backend has a module here with its flags and its constructor; this file only
//! dispatches.

use std::sync::Arc;

use discovery::{Context, Discover, DiscoveryError};

use crate::cli::{DiscoveryArg, Flags};

pub mod aws;
pub mod gcp;
pub mod k8s;
pub mod multicast;
pub mod static_;

/// The backend for these flags.
pub fn build(flags: &Flags, ctx: Context) -> Result<Arc<dyn Discover>, DiscoveryError> {
    match flags.discovery {
        DiscoveryArg::K8s => k8s::build(&flags.k8s, ctx),
        DiscoveryArg::Multicast => multicast::build(&flags.multicast, ctx),
        DiscoveryArg::Static => static_::build(&flags.static_, ctx),
        DiscoveryArg::Gcp => gcp::build(&flags.gcp, ctx),
        DiscoveryArg::Aws => aws::build(&flags.aws, ctx),
    }
}
