//! The bounded table of peers heard recently: one entry per private address, each expiring
//! once its sender has missed a few announcements.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use discovery::{Candidate, Role};
use uuid::Uuid;

use crate::codec::Announcement;

/// How many peers the table holds at most; announcements from new addresses beyond it are
/// dropped (and counted) until entries expire, so a flood cannot grow memory.
pub const MAX_PEERS: usize = 4096;

/// How long an entry lives after its last announcement: two and a half of the sender's
/// intervals (jitter stretches one by a quarter at most, so this survives one lost datagram)
/// plus a second of slack.
pub fn expiry(interval_ms: u32) -> Duration {
    Duration::from_millis(u64::from(interval_ms) * 5 / 2) + Duration::from_secs(1)
}

#[derive(Debug, Clone)]
struct Entry {
    node_id: Uuid,
    role: Role,
    expires: Instant,
}

/// What [`Table::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// A new address.
    New,
    /// A known address and UUID, now fresh again.
    Refreshed,
    /// A known address with a new UUID or role: the node restarted.
    Replaced,
    /// A new address, but the table is full: dropped.
    Full,
}

/// The peers heard recently, keyed by private address.
#[derive(Debug)]
pub struct Table {
    entries: HashMap<(IpAddr, u16), Entry>,
    cap: usize,
}

impl Table {
    /// An empty table holding at most `cap` peers.
    pub fn new(cap: usize) -> Self {
        Self {
            entries: HashMap::new(),
            cap,
        }
    }

    /// Records an announcement heard at `now`.
    pub fn insert(&mut self, a: &Announcement, now: Instant) -> Insert {
        let key = (a.ip, a.port);
        let expires = now + expiry(a.interval_ms);
        if let Some(e) = self.entries.get_mut(&key) {
            let same = e.node_id == a.node_id && e.role == a.role;
            *e = Entry {
                node_id: a.node_id,
                role: a.role,
                expires,
            };
            return if same {
                Insert::Refreshed
            } else {
                Insert::Replaced
            };
        }
        if self.entries.len() >= self.cap {
            self.expire(now);
            if self.entries.len() >= self.cap {
                return Insert::Full;
            }
        }
        self.entries.insert(
            key,
            Entry {
                node_id: a.node_id,
                role: a.role,
                expires,
            },
        );
        Insert::New
    }

    /// Removes the entries that expired by `now`; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.expires > now);
        before - self.entries.len()
    }

    /// How many peers are held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no peer is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The peers as candidates, sorted by address.
    pub fn candidates(&self) -> Vec<Candidate> {
        let mut v: Vec<Candidate> = self
            .entries
            .iter()
            .map(|(&(ip, port), e)| Candidate {
                ip,
                port,
                id: Some(e.node_id.to_string()),
                role: Some(e.role),
                zone: None,
            })
            .collect();
        v.sort_by_key(|c| (c.ip, c.port));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ann(n: u32, interval_ms: u32) -> Announcement {
        Announcement {
            cluster_name: "default".into(),
            role: Role::Worker,
            node_id: Uuid::from_u128(u128::from(n)),
            ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + n).into(),
            port: 8081,
            interval_ms,
        }
    }

    #[test]
    fn a_flood_of_new_addresses_stops_at_the_cap_and_keeps_known_peers() {
        let now = Instant::now();
        let mut t = Table::new(8);
        for n in 1..=8 {
            assert_eq!(t.insert(&ann(n, 1000), now), Insert::New);
        }
        for n in 9..10_000 {
            assert_eq!(t.insert(&ann(n, 1000), now), Insert::Full);
        }
        assert_eq!(t.len(), 8);
        // Known peers still refresh while the table is full.
        assert_eq!(t.insert(&ann(3, 1000), now), Insert::Refreshed);
        let ips: Vec<IpAddr> = t.candidates().iter().map(|c| c.ip).collect();
        assert_eq!(ips.len(), 8);
        assert!(ips.contains(&"198.18.0.3".parse().unwrap()));
    }

    #[test]
    fn entries_expire_after_missing_announcements_and_free_room() {
        let t0 = Instant::now();
        let mut t = Table::new(2);
        t.insert(&ann(1, 1000), t0);
        t.insert(&ann(2, 10_000), t0);
        assert_eq!(t.insert(&ann(3, 1000), t0), Insert::Full);
        // 1 s interval: alive at 3.4 s, gone at 3.6 s; the 10 s one lives 26 s.
        assert_eq!(t.expire(t0 + Duration::from_millis(3400)), 0);
        assert_eq!(t.expire(t0 + Duration::from_millis(3600)), 1);
        assert_eq!(t.len(), 1);
        // A full table makes room from expired entries before refusing.
        let later = t0 + Duration::from_secs(30);
        assert_eq!(t.insert(&ann(3, 1000), later), Insert::New);
        assert_eq!(t.insert(&ann(4, 1000), later), Insert::New);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn ipv6_peers_are_keyed_by_their_full_address() {
        let now = Instant::now();
        let mut t = Table::new(4);
        let v6 = |n: u32| Announcement {
            ip: format!("2001:2::{n:x}").parse().unwrap(),
            ..ann(n, 1000)
        };
        assert_eq!(t.insert(&v6(2), now), Insert::New);
        assert_eq!(t.insert(&v6(3), now), Insert::New);
        assert_eq!(t.insert(&v6(2), now), Insert::Refreshed);
        assert_eq!(t.insert(&ann(2, 1000), now), Insert::New);
        let got: Vec<String> = t.candidates().iter().map(|c| c.ip.to_string()).collect();
        assert_eq!(got, ["198.18.0.2", "2001:2::2", "2001:2::3"]);
    }

    #[test]
    fn a_restart_on_the_same_address_replaces_the_entry() {
        let now = Instant::now();
        let mut t = Table::new(4);
        t.insert(&ann(1, 1000), now);
        let mut again = ann(1, 1000);
        again.node_id = Uuid::from_u128(99);
        assert_eq!(t.insert(&again, now), Insert::Replaced);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.candidates()[0].id.as_deref(),
            Some(Uuid::from_u128(99).to_string().as_str())
        );
    }
}
