//! The ports a node uses, all derived from `--private_port`.

use crate::NodeError;

/// Offset of the scheduler-only cluster from `--private_port`.
pub const SCHEDULER_OFFSET: u16 = 1000;
/// Offset of the all-instances cluster from `--private_port`.
pub const ALL_OFFSET: u16 = 2000;

/// The node's ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// The internal HTTP API.
    pub private: u16,
    /// Gossip of the scheduler cluster.
    pub scheduler: u16,
    /// Gossip of the all-instances cluster.
    pub all: u16,
    /// The public listener of schedulers.
    pub public: u16,
}

/// Parses and checks `--private_port`, so that the message names all three ports.
pub fn parse_private_port(s: &str) -> Result<u16, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a port number"))?;
    let max = u64::from(u16::MAX - ALL_OFFSET);
    if n == 0 || n > max {
        return Err(format!(
            "{n} cannot be used: the node listens on {n} (internal API), {} (+1000, scheduler cluster) and {} (+2000, all-instances cluster), and ports end at 65535; choose a --private_port from 1 to {max}",
            n + 1000,
            n + 2000
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
    /// Derives every port; the flags were already range-checked by their parsers.
    pub fn new(private: u16, public: u16) -> Result<Self, NodeError> {
        let all = private.checked_add(ALL_OFFSET).ok_or_else(|| {
            NodeError::Config(parse_private_port(&private.to_string()).unwrap_err())
        })?;
        Ok(Self {
            private,
            scheduler: private + SCHEDULER_OFFSET,
            all,
            public,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_whose_plus_2000_overflows_names_all_three_ports() {
        let e = parse_private_port("64000").unwrap_err();
        assert!(
            e.contains("64000") && e.contains("65000") && e.contains("66000"),
            "{e}"
        );
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
            (p.private, p.scheduler, p.all, p.public),
            (8081, 9081, 10081, 8080)
        );
        assert!(Ports::new(64000, 8080).is_err());
    }

    #[test]
    fn public_ports_past_65535_are_rejected() {
        assert!(parse_port("65536").unwrap_err().contains("1 to 65535"));
        assert_eq!(parse_port("8080").unwrap(), 8080);
    }
}
