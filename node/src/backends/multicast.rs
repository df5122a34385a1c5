//! Flags and constructor of multicast discovery.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use clap::{ArgAction, Args};
#[cfg(feature = "multicast")]
use discovery::{Context, Discover, DiscoveryError};
#[cfg(feature = "multicast")]
use discovery_multicast::{MulticastConfig, MulticastDiscovery, MulticastError};

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

    /// IPv6 multicast group of link-local scope (ff02::/16), used instead when the private IP is IPv6.
    #[arg(
        long = "multicast_group6",
        env = "NODE_MULTICAST_GROUP6",
        default_value = "ff02::224:2:2:3",
        global = true
    )]
    pub multicast_group6: Ipv6Addr,

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

/// The cluster key as the discovery contract's [`discovery::Seal`], for [`discovery::Context`]:
/// the keyring knows nothing of discovery, so the node adapts it here.
pub fn context_seal(sealer: Arc<keyring::Sealer>) -> Arc<dyn discovery::Seal> {
    Arc::new(KeyringSeal(sealer))
}

/// [`keyring::Sealer`] seen as a [`discovery::Seal`].
#[derive(Debug)]
struct KeyringSeal(Arc<keyring::Sealer>);

impl discovery::Seal for KeyringSeal {
    fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        self.0.seal(aad, plain)
    }

    fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, &'static str> {
        self.0.open(aad, sealed).map_err(|e| e.reason())
    }
}

#[cfg(feature = "multicast")]
/// Builds the backend.
pub fn build(flags: &MulticastFlags, ctx: Context) -> Result<Arc<dyn Discover>, DiscoveryError> {
    let cfg = MulticastConfig {
        group: flags.multicast_group,
        group6: flags.multicast_group6,
        port: flags.multicast_port,
        ttl: flags.multicast_ttl,
        loopback: flags.multicast_loopback,
        ..MulticastConfig::default()
    };
    let seal = ctx.seal.clone().map(|inner| {
        Arc::new(KeySeal {
            aad: keyring::aad(&ctx.cluster_name, "multicast"),
            inner,
        }) as Arc<dyn discovery_multicast::Seal>
    });
    let backend = MulticastDiscovery::new(cfg, ctx)?;
    Ok(Arc::new(match seal {
        Some(s) => backend.with_seal(s),
        None => backend,
    }))
}

#[cfg(feature = "multicast")]
/// Seals announcements with the cluster key, bound to the cluster name and `multicast`, so an
/// announcement never verifies as gossip of either cluster or as another cluster's.
#[derive(Debug)]
struct KeySeal {
    aad: Vec<u8>,
    inner: Arc<dyn discovery::Seal>,
}

#[cfg(feature = "multicast")]
impl discovery_multicast::Seal for KeySeal {
    fn seal(&self, payload: Vec<u8>) -> Vec<u8> {
        self.inner.seal(&self.aad, &payload)
    }

    fn open(&self, datagram: &[u8]) -> Result<Vec<u8>, MulticastError> {
        self.inner
            .open(&self.aad, datagram)
            .map_err(|_| MulticastError::Unauthenticated)
    }
}

#[cfg(all(test, feature = "multicast"))]
mod tests {
    use clap::Parser;
    use discovery_multicast::Seal as _;

    use super::KeySeal;

    use crate::cli::Cli;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("node").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_follow_the_issue() {
        let f = parse(&[]).unwrap().flags.multicast;
        assert_eq!(f.multicast_group.to_string(), "224.2.2.3");
        assert_eq!(f.multicast_group6, discovery_multicast::DEFAULT_GROUP6);
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
            &["--multicast_group6", "224.2.2.3"],
            &["--multicast_group6", "ff02::1::2"],
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(args[0]), "{e}");
        }
    }

    fn key_seal(keys: &str, cluster: &str) -> KeySeal {
        let ring = keyring::Keyring::parse(keys, "test").unwrap();
        KeySeal {
            aad: keyring::aad(cluster, "multicast"),
            inner: super::context_seal(std::sync::Arc::new(keyring::Sealer::new(
                ring,
                Default::default(),
            ))),
        }
    }

    #[test]
    fn announcements_are_sealed_with_the_cluster_key() {
        const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
        let a = key_seal(K1, "prod");
        let sealed = a.seal(b"announcement".to_vec());
        assert!(sealed.len() <= discovery_multicast::MAX_DATAGRAM);
        assert_eq!(key_seal(K1, "prod").open(&sealed).unwrap(), b"announcement");
        assert!(key_seal(K2, "prod").open(&sealed).is_err(), "another key");
        assert!(
            key_seal(K1, "test").open(&sealed).is_err(),
            "another cluster"
        );
        assert!(
            key_seal(K1, "prod").open(b"announcement").is_err(),
            "plaintext"
        );
        // Gossip of the all-instances cluster never verifies as an announcement.
        let ring = keyring::Keyring::parse(K1, "test").unwrap();
        let gossip = keyring::Sealer::new(ring, Default::default())
            .seal(&keyring::aad("prod", "all"), b"announcement");
        assert!(a.open(&gossip).is_err());
    }
}
