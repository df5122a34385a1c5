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

/// The backend for these flags, or an error naming the cargo feature this binary lacks.
pub fn build(flags: &Flags, ctx: Context) -> Result<Arc<dyn Discover>, DiscoveryError> {
    check_built(flags.discovery)?;
    let which: DiscoveryArg = flags.discovery;
    // `ctx` is unused only in a binary built with no backend at all.
    let _ = &ctx;
    match which {
        #[cfg(feature = "k8s")]
        DiscoveryArg::K8s => k8s::build(&flags.k8s, ctx),
        #[cfg(feature = "multicast")]
        DiscoveryArg::Multicast => multicast::build(&flags.multicast, ctx),
        #[cfg(feature = "static")]
        DiscoveryArg::Static => static_::build(&flags.static_, ctx),
        #[cfg(feature = "gcp")]
        DiscoveryArg::Gcp => gcp::build(&flags.gcp, ctx),
        #[cfg(feature = "aws")]
        DiscoveryArg::Aws => aws::build(&flags.aws, ctx),
        #[allow(unreachable_patterns)]
        other => Err(not_built(other)),
    }
}

/// Whether this binary holds the backend; checked first at start-up, before anything binds.
pub fn check_built(which: DiscoveryArg) -> Result<(), DiscoveryError> {
    let built = match which {
        DiscoveryArg::Aws => cfg!(feature = "aws"),
        DiscoveryArg::Gcp => cfg!(feature = "gcp"),
        DiscoveryArg::K8s => cfg!(feature = "k8s"),
        DiscoveryArg::Multicast => cfg!(feature = "multicast"),
        DiscoveryArg::Static => cfg!(feature = "static"),
    };
    if built { Ok(()) } else { Err(not_built(which)) }
}

/// The error for a backend this binary was built without.
fn not_built(which: DiscoveryArg) -> DiscoveryError {
    let feature = which.name();
    DiscoveryError::Config(
        format!(
            "`--discovery {feature}` is not in this binary: it was built without the `{feature}` \
             feature; rebuild with `cargo build --release -p node --features {feature}` (the \
             default features include every backend)"
        )
        .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_left_out_is_named_with_its_feature() {
        for which in [
            DiscoveryArg::Aws,
            DiscoveryArg::Gcp,
            DiscoveryArg::K8s,
            DiscoveryArg::Multicast,
            DiscoveryArg::Static,
        ] {
            let e = not_built(which).to_string();
            assert!(e.contains(&format!("--features {}", which.name())), "{e}");
        }
        // The default build has every backend.
        #[cfg(all(
            feature = "aws",
            feature = "gcp",
            feature = "k8s",
            feature = "multicast",
            feature = "static"
        ))]
        for which in [DiscoveryArg::Aws, DiscoveryArg::Static] {
            assert!(check_built(which).is_ok());
        }
        #[cfg(not(feature = "aws"))]
        assert!(check_built(DiscoveryArg::Aws).is_err());
    }
}
