//! Member identities: what foca gossips about, how the oldest member is chosen, and the
//! availability zone a member reports about itself.

use std::cmp::Ordering;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::Serialize;
use uuid::Uuid;

use crate::MembershipError;

/// The availability zone a member runs in, such as `us-central1-a`, `eu-west-1b` or a
/// Kubernetes `topology.kubernetes.io/zone` value.
///
/// A Kubernetes label value: 1 to [`Zone::MAX_LEN`] ASCII letters, digits, `-`, `_` or `.`,
/// starting and ending with a letter or digit. The bytes live inline, so the type is `Copy`
/// and costs no allocation; nothing that fails the check can be built, so a zone is always
/// safe to log or print.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Zone {
    len: u8,
    bytes: [u8; Zone::MAX_LEN],
}

impl Zone {
    /// The longest zone, in bytes (a Kubernetes label value's limit).
    pub const MAX_LEN: usize = 63;

    /// Checks `s` and makes a zone of it.
    pub fn new(s: &str) -> Result<Self, MembershipError> {
        Self::from_bytes(s.as_bytes())
    }

    /// Checks raw bytes (from the network) and makes a zone of them; anything that is not a
    /// label value, invalid UTF-8 and control characters included, is refused.
    pub fn from_bytes(b: &[u8]) -> Result<Self, MembershipError> {
        if b.is_empty() {
            return Err(MembershipError::Zone("empty"));
        }
        if b.len() > Self::MAX_LEN {
            return Err(MembershipError::Zone("longer than 63 bytes"));
        }
        let edge = |c: u8| c.is_ascii_alphanumeric();
        if !edge(b[0]) || !edge(b[b.len() - 1]) {
            return Err(MembershipError::Zone(
                "must start and end with a letter or digit",
            ));
        }
        if !b
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        {
            return Err(MembershipError::Zone(
                "only letters, digits, '-', '_' and '.' are allowed",
            ));
        }
        let mut bytes = [0u8; Self::MAX_LEN];
        bytes[..b.len()].copy_from_slice(b);
        Ok(Self {
            len: b.len() as u8,
            bytes,
        })
    }

    /// The zone as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII passes `from_bytes`, so this never fails.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    /// The zone's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl FromStr for Zone {
    type Err = MembershipError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Zone({:?})", self.as_str())
    }
}

impl Serialize for Zone {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

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
    fn zones_are_kubernetes_label_values() {
        for good in [
            "us-central1-a",
            "eu-west-1b",
            "zone_1.b",
            "a",
            &"z".repeat(63),
        ] {
            let z = Zone::new(good).unwrap();
            assert_eq!(z.as_str(), good);
            assert_eq!(z.to_string().parse::<Zone>().unwrap(), z);
        }
        for bad in [
            "",
            "-a",
            "a-",
            ".a",
            "a b",
            "a\nMember [10.0.0.1]:1 - x",
            "a\u{1b}[31m",
            "zoné",
            &"z".repeat(64),
        ] {
            let e = Zone::new(bad).unwrap_err();
            assert!(matches!(e, MembershipError::Zone(_)), "{bad:?}: {e}");
            assert!(!e.to_string().contains(bad) || bad.is_empty(), "{e}");
        }
        assert!(Zone::from_bytes(&[b'a', 0xff, b'b']).is_err());
        assert!(Zone::from_bytes(&[b'a', 0, b'b']).is_err());
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
