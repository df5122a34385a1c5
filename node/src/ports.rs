//! The ports a node uses, all derived from `--private_port` by the offsets of the logical
//! clusters ([`crate::logical::CLUSTERS`]).

use crate::NodeError;
use crate::logical::{CLUSTERS, Logical};

/// The largest offset of any logical cluster: `--private_port` may be at most this below 65535.
const MAX_OFFSET: u16 = {
    let mut max = 0;
    let mut i = 0;
    while i < CLUSTERS.len() {
        if CLUSTERS[i].offset > max {
            max = CLUSTERS[i].offset;
        }
        i += 1;
    }
    max
};

/// The node's ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// The internal HTTP API.
    pub private: u16,
    /// The public listener of schedulers.
    pub public: u16,
}

/// Parses and checks `--private_port`, so that the message names every port derived from it.
pub fn parse_private_port(s: &str) -> Result<u16, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a port number"))?;
    let max = u64::from(u16::MAX - MAX_OFFSET);
    if n == 0 || n > max {
        let derived: Vec<String> = CLUSTERS
            .iter()
            .map(|l| format!("{} (+{}, {})", n + u64::from(l.offset), l.offset, l.what))
            .collect();
        return Err(format!(
            "{n} cannot be used: the node listens on {n} (internal API) and {}, and ports end at 65535; choose a --private_port from 1 to {max}",
            derived.join(" and ")
        ));
    }
    Ok(n as u16)
}

/// Parses and checks `--public_port`.
pub fn parse_port(s: &str) -> Result<u16, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a port number"))?;
    if n == 0 || n > 65535 {
        return Err(format!("{n} is not a port: choose one from 1 to 65535"));
    }
    Ok(n as u16)
}

impl Ports {
    /// Derives every port; the flags were already range-checked by their parsers. A
    /// `private` of 0 (an ephemeral port, for tests) is checked once the port is known.
    pub fn new(private: u16, public: u16) -> Result<Self, NodeError> {
        if private.checked_add(MAX_OFFSET).is_none() {
            return Err(NodeError::Config(
                parse_private_port(&private.to_string()).unwrap_err(),
            ));
        }
        Ok(Self { private, public })
    }

    /// The gossip port of `cluster`.
    pub fn gossip(&self, cluster: &Logical) -> u16 {
        self.private + cluster.offset
    }

    /// The flag that sets the gossip port of `cluster`, for bind errors.
    pub fn flag(cluster: &Logical) -> String {
        format!("--private_port (+{})", cluster.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logical::{ALL, SCHEDULER};

    #[test]
    fn a_port_whose_plus_2000_overflows_names_all_three_ports() {
        let e = parse_private_port("64000").unwrap_err();
        assert!(
            e.contains("64000") && e.contains("65000") && e.contains("66000"),
            "{e}"
        );
        assert!(e.contains("all-instances cluster"), "{e}");
        assert!(e.contains("1 to 63535"), "{e}");
        assert!(parse_private_port("70000").unwrap_err().contains("72000"));
        assert!(parse_private_port("0").is_err());
        assert!(
            parse_private_port("http")
                .unwrap_err()
                .contains("not a port")
        );
        assert_eq!(parse_private_port("63535").unwrap(), 63535);
    }

    #[test]
    fn cluster_ports_are_derived() {
        let p = Ports::new(8081, 8080).unwrap();
        assert_eq!(
            (p.private, p.gossip(&SCHEDULER), p.gossip(&ALL), p.public),
            (8081, 9081, 10081, 8080)
        );
        assert_eq!(Ports::flag(&ALL), "--private_port (+2000)");
        assert!(Ports::new(64000, 8080).is_err());
    }

    #[test]
    fn public_ports_past_65535_are_rejected() {
        assert!(parse_port("65536").unwrap_err().contains("1 to 65535"));
        assert_eq!(parse_port("8080").unwrap(), 8080);
    }
}
