//! Member identities: what foca gossips about, and how the oldest member is chosen.

use std::cmp::Ordering;
use std::fmt;
use std::net::SocketAddr;

use serde::Serialize;
use uuid::Uuid;

/// The part a member plays in the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A scheduler: member of both clusters.
    Scheduler,
    /// A worker: member of the all-instances cluster only.
    Worker,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Scheduler => "scheduler",
            Role::Worker => "worker",
        })
    }
}

/// One incarnation of a member process in one logical cluster.
///
/// `uuid` is fresh for every process start, so a restart on the same address is a new member.
/// `generation` is bumped when the member finds itself falsely declared down: it then rejoins
/// under the same UUID, and the newer generation wins the address conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId {
    /// The gossip address of this member in this cluster.
    pub addr: SocketAddr,
    /// The member's UUID, as printed in member lists.
    pub uuid: Uuid,
    /// When the process started, in milliseconds since the Unix epoch; orders members by age.
    pub started_ms: u64,
    /// Renewal counter, see [`foca::Identity::renew`].
    pub generation: u16,
    /// The member's role.
    pub role: Role,
}

impl NodeId {
    /// A fresh identity for a process that starts now.
    pub fn new(addr: SocketAddr, uuid: Uuid, started_ms: u64, role: Role) -> Self {
        Self {
            addr,
            uuid,
            started_ms,
            generation: 0,
            role,
        }
    }

    /// A placeholder for an address whose member is not known yet; foca accepts an announce
    /// addressed to it because only the address has to match.
    pub fn unknown_at(addr: SocketAddr) -> Self {
        Self::new(addr, Uuid::nil(), 0, Role::Worker)
    }

    /// The key that orders members oldest first; ties are broken by UUID.
    pub fn age_key(&self) -> (u64, Uuid) {
        (self.started_ms, self.uuid)
    }

    /// Compares two members by age, oldest first.
    pub fn cmp_age(&self, other: &Self) -> Ordering {
        self.age_key().cmp(&other.age_key())
    }
}

impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            generation: self.generation.wrapping_add(1),
            ..*self
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.started_ms, self.generation, self.uuid)
            > (adversary.started_ms, adversary.generation, adversary.uuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity;

    fn id(started: u64, n: u128) -> NodeId {
        NodeId::new(
            "127.0.0.1:10081".parse().unwrap(),
            Uuid::from_u128(n),
            started,
            Role::Worker,
        )
    }

    #[test]
    fn a_restarted_process_wins_the_address_conflict() {
        let old = id(1_000, 9);
        let new = id(2_000, 1);
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));
    }

    #[test]
    fn a_renewed_identity_keeps_its_uuid_and_wins() {
        let a = id(1_000, 5);
        let b = a.renew().unwrap();
        assert_eq!(a.uuid, b.uuid);
        assert_eq!(a.age_key(), b.age_key());
        assert!(b.win_addr_conflict(&a));
    }
}
