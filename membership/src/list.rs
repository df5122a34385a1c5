//! The versioned member list and its Hazelcast log format, with a parser for tests and tools.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use uuid::Uuid;

use crate::id::{NodeId, Zone};

/// A member list as the oldest member sequenced it: the same on every member once converged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemberList {
    /// The issuing coordinator's sequence number: one more with every list it issues,
    /// wrapping, compared with [`ver_newer`]. A new coordinator continues from the version it
    /// held, so lists from one coordinator only move forward.
    pub ver: u64,
    /// The member that issued this version.
    pub coordinator: Uuid,
    /// The members, oldest first.
    pub members: Vec<NodeId>,
    /// The zones of the listed members that reported one, by UUID (see [`MemberList::zone`]).
    /// Not part of the Hazelcast rendering.
    pub zones: BTreeMap<Uuid, Zone>,
}

/// Whether version `a` is newer than `b` in serial-number order (RFC 1982 over 64 bits): `a`
/// is at most 2^63 - 1 steps after `b`, wrapping. No version is newer than every other, so no
/// claimed number can stop newer lists from being accepted.
pub fn ver_newer(a: u64, b: u64) -> bool {
    let d = a.wrapping_sub(b);
    d != 0 && d < 1 << 63
}

impl MemberList {
    /// The zone the member with this UUID reported, as the list's coordinator heard it.
    pub fn zone(&self, uuid: Uuid) -> Option<Zone> {
        self.zones.get(&uuid).copied()
    }

    /// Whether the member with this UUID is in the list.
    pub fn contains(&self, uuid: Uuid) -> bool {
        self.members.iter().any(|m| m.uuid == uuid)
    }

    /// Whether two lists hold the same members at the same addresses, in the same order.
    pub fn same_members(&self, other: &[NodeId]) -> bool {
        self.members.len() == other.len()
            && self
                .members
                .iter()
                .zip(other)
                .all(|(a, b)| a.uuid == b.uuid && a.addr == b.addr)
    }

    /// Renders the list in Hazelcast's layout, marking `this` member: a first line
    /// `Members {size:2, ver:3} [`, one line per member that starts with a tab, such as
    /// `<TAB>Member [10.0.0.5]:10081 - 5515cf45-9244-44df-b086-bc8eca4c83ae this`, and `]`.
    pub fn render(&self, this: Uuid) -> String {
        let mut s = format!(
            "Members {{size:{}, ver:{}}} [\n",
            self.members.len(),
            self.ver
        );
        for m in &self.members {
            let _ = write!(
                s,
                "\tMember [{}]:{} - {}",
                m.addr.ip(),
                m.addr.port(),
                m.uuid
            );
            if m.uuid == this {
                s.push_str(" this");
            }
            s.push('\n');
        }
        s.push(']');
        s
    }
}

/// One member line read back from a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedMember {
    /// The member's gossip address.
    pub addr: SocketAddr,
    /// The member's UUID.
    pub uuid: Uuid,
    /// Whether the line was marked `this`.
    pub this: bool,
}

/// One member list read back from a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedList {
    /// The `size` field.
    pub size: usize,
    /// The `ver` field.
    pub ver: u64,
    /// The member lines, in order.
    pub members: Vec<LoggedMember>,
}

impl LoggedList {
    /// The port shared by the members: it tells which logical cluster the list belongs to.
    pub fn port(&self) -> Option<u16> {
        self.members.first().map(|m| m.addr.port())
    }

    /// The list without the `this` marks, for comparing what different members printed.
    pub fn shape(&self) -> (u64, Vec<(SocketAddr, Uuid)>) {
        (
            self.ver,
            self.members.iter().map(|m| (m.addr, m.uuid)).collect(),
        )
    }
}

/// Parses every complete member list in a log text.
///
/// The opening line may carry a log prefix before `Members {`; member lines must start with a
/// tab, exactly as rendered. A malformed block is skipped, so a test sees it as missing.
pub fn parse_logged_lists(text: &str) -> Vec<LoggedList> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(pos) = line.find("Members {size:") else {
            continue;
        };
        let head = &line[pos + "Members {size:".len()..];
        let Some((size, rest)) = head.split_once(", ver:") else {
            continue;
        };
        let Some((ver, tail)) = rest.split_once("} [") else {
            continue;
        };
        let (Ok(size), Ok(ver)) = (size.parse::<usize>(), ver.parse::<u64>()) else {
            continue;
        };
        if !tail.is_empty() {
            continue;
        }
        let mut members = Vec::new();
        let mut ok = false;
        for l in lines.by_ref() {
            if l == "]" {
                ok = true;
                break;
            }
            match parse_member_line(l) {
                Some(m) => members.push(m),
                None => break,
            }
        }
        if ok && members.len() == size {
            out.push(LoggedList { size, ver, members });
        }
    }
    out
}

fn parse_member_line(l: &str) -> Option<LoggedMember> {
    let rest = l.strip_prefix("\tMember [")?;
    let (ip, rest) = rest.split_once("]:")?;
    let (port, rest) = rest.split_once(" - ")?;
    let (uuid, this) = match rest.strip_suffix(" this") {
        Some(u) => (u, true),
        None => (rest, false),
    };
    let ip: IpAddr = ip.parse().ok()?;
    Some(LoggedMember {
        addr: SocketAddr::new(ip, port.parse().ok()?),
        uuid: uuid.parse().ok()?,
        this,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Role;

    fn m(addr: &str, n: u128) -> NodeId {
        NodeId::new(
            addr.parse().unwrap(),
            Uuid::from_u128(n),
            n as u64,
            Role::Worker,
        )
    }

    #[test]
    fn versions_compare_in_serial_number_order() {
        assert!(ver_newer(2, 1));
        assert!(!ver_newer(1, 2));
        assert!(!ver_newer(5, 5));
        // Past the largest number comes 0, which is newer: nothing pins a version.
        assert!(ver_newer(0, u64::MAX));
        assert!(ver_newer(3, u64::MAX - 1));
        assert!(!ver_newer(u64::MAX, 0));
        // Half the circle ahead is the limit.
        assert!(ver_newer(1 << 62, 0));
        assert!(!ver_newer(1 << 63, 0));
        assert!(!ver_newer(0, 1 << 63));
        for b in [0, 7, u64::MAX / 2, u64::MAX] {
            for d in [1u64, 2, 1000, (1 << 63) - 1] {
                let a = b.wrapping_add(d);
                assert!(ver_newer(a, b) && !ver_newer(b, a), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn renders_hazelcast_layout_exactly() {
        let list = MemberList {
            ver: 3,
            coordinator: Uuid::from_u128(1),
            members: vec![m("10.0.0.5:10081", 1), m("[::1]:10081", 2)],
            zones: [(Uuid::from_u128(2), Zone::new("us-central1-a").unwrap())].into(),
        };
        assert_eq!(
            list.render(Uuid::from_u128(1)),
            "Members {size:2, ver:3} [\n\
             \tMember [10.0.0.5]:10081 - 00000000-0000-0000-0000-000000000001 this\n\
             \tMember [::1]:10081 - 00000000-0000-0000-0000-000000000002\n\
             ]"
        );
    }

    #[test]
    fn parses_what_it_renders_even_behind_a_log_prefix() {
        let list = MemberList {
            ver: 7,
            coordinator: Uuid::from_u128(1),
            members: vec![m("10.0.0.5:10081", 1), m("[fd00::2]:10081", 2)],
            zones: BTreeMap::new(),
        };
        let text = format!(
            "noise\n2026-11-28T00:00:00Z  INFO members: {}\nmore noise\n",
            list.render(Uuid::from_u128(2))
        );
        let parsed = parse_logged_lists(&text);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].ver, 7);
        assert_eq!(parsed[0].size, 2);
        assert!(!parsed[0].members[0].this);
        assert!(parsed[0].members[1].this);
        assert_eq!(parsed[0].port(), Some(10081));
    }

    #[test]
    fn a_truncated_or_miscounted_block_is_skipped() {
        let text = "Members {size:2, ver:1} [\n\tMember [10.0.0.5]:1 - 00000000-0000-0000-0000-000000000001\n]\n";
        assert!(parse_logged_lists(text).is_empty());
        let text = "Members {size:1, ver:1} [\n  Member [10.0.0.5]:1 - 00000000-0000-0000-0000-000000000001\n]\n";
        assert!(parse_logged_lists(text).is_empty());
    }
}
