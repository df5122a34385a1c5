//! Flags and constructor of multicast discovery.

use std::net::Ipv4Addr;
use std::sync::Arc;

use clap::{ArgAction, Args};
use discovery::{Context, Discover, DiscoveryError};
use discovery_multicast::{MulticastConfig, MulticastDiscovery};

/// Multicast discovery flags.
#[derive(Debug, Clone, Args)]
pub struct MulticastFlags {
    /// IPv4 multicast group the nodes announce themselves on; joined only on the private IP's interface.
    #[arg(
        long = "multicast_group",
        env = "NODE_MULTICAST_GROUP",
        default_value = "224.2.2.3",
        global = true
    )]
    pub multicast_group: Ipv4Addr,

    /// UDP port of the multicast group.
    #[arg(long = "multicast_port", env = "NODE_MULTICAST_PORT", default_value_t = 54327, value_parser = clap::value_parser!(u16).range(1..), global = true)]
    pub multicast_port: u16,

    /// Hops an announcement may cross; 1 keeps it on the local subnet.
    #[arg(long = "multicast_ttl", env = "NODE_MULTICAST_TTL", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=255), global = true)]
    pub multicast_ttl: u32,

    /// Also deliver announcements to processes on this host (single-host demos).
    #[arg(long = "multicast_loopback", env = "NODE_MULTICAST_LOOPBACK", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", global = true)]
    pub multicast_loopback: bool,
}

/// Builds the backend.
pub fn build(flags: &MulticastFlags, ctx: Context) -> Result<Arc<dyn Discover>, DiscoveryError> {
    let cfg = MulticastConfig {
        group: flags.multicast_group,
        port: flags.multicast_port,
        ttl: flags.multicast_ttl,
        loopback: flags.multicast_loopback,
        ..MulticastConfig::default()
    };
    Ok(Arc::new(MulticastDiscovery::new(cfg, ctx)?))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::Cli;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("node").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_follow_the_issue() {
        let f = parse(&[]).unwrap().flags.multicast;
        assert_eq!(f.multicast_group.to_string(), "224.2.2.3");
        assert_eq!(f.multicast_port, 54327);
        assert_eq!(f.multicast_ttl, 1);
        assert!(!f.multicast_loopback);
        let f = parse(&["--multicast_loopback", "--multicast_ttl", "2"])
            .unwrap()
            .flags
            .multicast;
        assert!(f.multicast_loopback);
        assert_eq!(f.multicast_ttl, 2);
    }

    #[test]
    fn bad_values_name_the_flag() {
        for args in [
            &["--multicast_ttl", "0"][..],
            &["--multicast_ttl", "256"],
            &["--multicast_port", "0"],
            &["--multicast_group", "224.2.2"],
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(args[0]), "{e}");
        }
    }
}
