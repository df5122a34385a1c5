//! The logical clusters a node may join, in one table, and the node's one [`Role`] with its
//! conversions from the CLI and to and from discovery.
//!
//! Each logical cluster has a name, a port offset from `--private_port`, the roles that join
//! it, and a rule mapping a discovered candidate to its gossip address there. Binding, the
//! engines, the key's associated data and `node members --cluster` all read this table.

use std::net::SocketAddr;

pub use membership::Role;

use crate::cli::RoleArg;

/// One logical cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logical {
    /// Its name: in logs, the API, metrics and the key's associated data.
    pub name: &'static str,
    /// What its port is for, in bind errors.
    pub what: &'static str,
    /// Its gossip port's offset from `--private_port`.
    pub offset: u16,
    /// The roles whose nodes join it.
    pub joins: &'static [Role],
}

/// Schedulers only, on `--private_port + 1000`.
pub const SCHEDULER: Logical = Logical {
    name: "scheduler",
    what: "scheduler cluster",
    offset: 1000,
    joins: &[Role::Scheduler],
};

/// Every node, on `--private_port + 2000`; its size drives `--min_cluster_size`.
pub const ALL: Logical = Logical {
    name: "all",
    what: "all-instances cluster",
    offset: 2000,
    joins: &[Role::Scheduler, Role::Worker],
};

/// Every logical cluster, in the order the API lists them.
pub const CLUSTERS: [Logical; 2] = [SCHEDULER, ALL];

impl Logical {
    /// Whether a node of `role` joins this cluster.
    pub fn admits(&self, role: Role) -> bool {
        self.joins.contains(&role)
    }

    /// This cluster's gossip port for a node listening on `private_port`, when it exists.
    pub fn port(&self, private_port: u16) -> Option<u16> {
        private_port.checked_add(self.offset)
    }

    /// A candidate's gossip address in this cluster: its port plus the offset, unless the
    /// platform says its role does not join. A candidate of unknown role is tried.
    pub fn candidate(&self, c: &discovery::Candidate) -> Option<SocketAddr> {
        if c.role.is_some_and(|r| !self.admits(from_discovery(r))) {
            return None;
        }
        Some(SocketAddr::new(c.ip, self.port(c.port)?))
    }

    /// The clusters a node of `role` joins, in table order.
    pub fn joined_by(role: Role) -> impl Iterator<Item = &'static Logical> {
        CLUSTERS.iter().filter(move |l| l.admits(role))
    }

    /// The cluster of this name.
    pub fn named(name: &str) -> Option<&'static Logical> {
        CLUSTERS.iter().find(|l| l.name == name)
    }
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Scheduler => Role::Scheduler,
            RoleArg::Worker => Role::Worker,
        }
    }
}

/// The role's name, as logs, the API and metric labels spell it.
pub fn role_name(r: Role) -> &'static str {
    match r {
        Role::Scheduler => "scheduler",
        Role::Worker => "worker",
    }
}

/// The node's role as discovery names it.
pub fn to_discovery(r: Role) -> discovery::Role {
    match r {
        Role::Scheduler => discovery::Role::Scheduler,
        Role::Worker => discovery::Role::Worker,
    }
}

/// A discovered candidate's role as the engines name it.
pub fn from_discovery(r: discovery::Role) -> Role {
    match r {
        discovery::Role::Scheduler => Role::Scheduler,
        discovery::Role::Worker => Role::Worker,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(port: u16, role: Option<discovery::Role>) -> discovery::Candidate {
        let mut c = discovery::Candidate::new("10.0.0.7".parse().unwrap(), port);
        c.role = role;
        c
    }

    #[test]
    fn schedulers_join_both_clusters_and_workers_only_all() {
        let names = |r| Logical::joined_by(r).map(|l| l.name).collect::<Vec<_>>();
        assert_eq!(names(Role::Scheduler), ["scheduler", "all"]);
        assert_eq!(names(Role::Worker), ["all"]);
        assert_eq!(Logical::named("all"), Some(&ALL));
        assert_eq!(Logical::named("other"), None);
        // Offsets are distinct, so no two clusters share a port.
        assert_ne!(SCHEDULER.offset, ALL.offset);
        assert_ne!(SCHEDULER.offset, 0);
    }

    #[test]
    fn candidates_map_to_each_clusters_port_unless_their_role_stays_out() {
        let worker = candidate(8081, Some(discovery::Role::Worker));
        let unknown = candidate(8081, None);
        assert_eq!(SCHEDULER.candidate(&worker), None);
        assert_eq!(
            SCHEDULER.candidate(&unknown),
            Some("10.0.0.7:9081".parse().unwrap())
        );
        assert_eq!(
            ALL.candidate(&worker),
            Some("10.0.0.7:10081".parse().unwrap())
        );
        // A port whose offset passes 65535 is no address at all.
        assert_eq!(ALL.candidate(&candidate(64_000, None)), None);
    }

    #[test]
    fn roles_convert_both_ways() {
        for r in [Role::Scheduler, Role::Worker] {
            assert_eq!(from_discovery(to_discovery(r)), r);
            assert_eq!(to_discovery(r).to_string(), r.to_string());
            assert_eq!(role_name(r), r.to_string());
        }
        assert_eq!(Role::from(RoleArg::Scheduler), Role::Scheduler);
        assert_eq!(Role::from(RoleArg::Worker), Role::Worker);
    }
}
