//! What the node shows of one logical cluster: the view the HTTP API and `/metrics` read, the
//! Hazelcast-format log record of every adopted list, and the JSON of `GET /v1/members`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use membership::{MemberList, NodeId, Stats};
use serde::{Deserialize, Serialize};

/// What the HTTP API shows of one cluster.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// `scheduler` or `all`.
    pub name: &'static str,
    /// The gossip port.
    pub port: u16,
    /// This member.
    pub me: NodeId,
    /// The current member list, with the zones its members reported.
    pub list: MemberList,
    /// When each member was first seen in a list, for ages.
    pub first_seen: Vec<(uuid::Uuid, Instant)>,
    /// The engine's counters, with the transport's drops merged into `rejected`.
    pub stats: Stats,
}

/// Shared, read-mostly state of one cluster.
pub type SharedView = Arc<RwLock<ClusterView>>;

impl ClusterView {
    /// The view of a cluster whose engine starts as `me` with `list`.
    pub fn shared(name: &'static str, me: NodeId, list: MemberList) -> SharedView {
        Arc::new(RwLock::new(Self {
            name,
            port: me.addr.port(),
            me,
            list,
            first_seen: Vec::new(),
            stats: Stats::default(),
        }))
    }

    /// Takes the engine's identity and counters, the transport's drops, and the last of the
    /// lists adopted since the last call (`changes`, oldest first), stamping the members not
    /// seen before with `now`.
    pub fn update(
        &mut self,
        me: NodeId,
        stats: &Stats,
        dropped: &BTreeMap<&'static str, u64>,
        changes: &[MemberList],
        now: Instant,
    ) {
        self.stats = stats.clone();
        for (reason, n) in dropped {
            *self.stats.rejected.entry(reason).or_default() += n;
        }
        self.me = me;
        let Some(last) = changes.last() else {
            return;
        };
        self.list = last.clone();
        let members: Vec<uuid::Uuid> = last.members.iter().map(|m| m.uuid).collect();
        self.first_seen.retain(|(u, _)| members.contains(u));
        for u in members {
            if !self.first_seen.iter().any(|(x, _)| *x == u) {
                self.first_seen.push((u, now));
            }
        }
    }

    /// This cluster as `GET /v1/members` shows it.
    pub fn json(&self, now: Instant) -> ClusterJson {
        ClusterJson {
            cluster: self.name.to_owned(),
            port: self.port,
            version: self.list.ver,
            this: self.me.uuid.to_string(),
            rejected: self
                .stats
                .rejected
                .iter()
                .map(|(k, n)| ((*k).to_owned(), *n))
                .collect(),
            members: self
                .list
                .members
                .iter()
                .map(|m| MemberJson {
                    uuid: m.uuid.to_string(),
                    address: m.addr.to_string(),
                    role: m.role.to_string(),
                    zone: self.list.zone(m.uuid).map(|z| z.to_string()),
                    state: "alive".to_owned(),
                    this: m.uuid == self.me.uuid,
                    age_seconds: self
                        .first_seen
                        .iter()
                        .find(|(u, _)| *u == m.uuid)
                        .map_or(0.0, |(_, t)| now.duration_since(*t).as_secs_f64()),
                })
                .collect(),
        }
    }
}

/// Logs each adopted list as one record in Hazelcast's layout (`Members {size:N, ver:V} [`, a
/// tab-led line per member, `]`), marking `this` member. The record has no fields: they would
/// follow the closing `]` and break the layout that operators and tests parse.
pub fn log_lists(changes: &[MemberList], this: uuid::Uuid) {
    for list in changes {
        tracing::info!(target: "members", "{}", list.render(this));
    }
}

/// One member in `GET /v1/members`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberJson {
    /// The member's UUID.
    pub uuid: String,
    /// Its gossip address.
    pub address: String,
    /// `scheduler` or `worker`.
    pub role: String,
    /// The availability zone the member reported (`--zone` or its platform's), when it did.
    #[serde(default)]
    pub zone: Option<String>,
    /// `alive`: a list holds only the members its coordinator sees alive; failed and departed
    /// members are removed from it.
    pub state: String,
    /// Whether it is this node.
    pub this: bool,
    /// Seconds since this node first saw it in a list.
    pub age_seconds: f64,
}

/// One cluster in `GET /v1/members`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterJson {
    /// `scheduler` or `all`.
    pub cluster: String,
    /// The gossip port.
    pub port: u16,
    /// The member-list version.
    pub version: u64,
    /// This node's UUID.
    pub this: String,
    /// The members, oldest first.
    pub members: Vec<MemberJson>,
    /// Messages dropped, by reason (`auth_failed`, `stale`, `replayed`, `malformed`, ...).
    pub rejected: BTreeMap<String, u64>,
}

/// The body of `GET /v1/members`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembersJson {
    /// The clusters, scheduler first when present.
    pub clusters: Vec<ClusterJson>,
}

/// Builds the body of `GET /v1/members` from the views.
pub fn members_json(views: &[SharedView]) -> MembersJson {
    let now = Instant::now();
    MembersJson {
        clusters: views
            .iter()
            .map(|v| v.read().unwrap_or_else(|p| p.into_inner()).json(now))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use membership::{Role, Zone, parse_logged_lists};

    use super::*;

    fn id(last: u8, role: Role) -> NodeId {
        NodeId::new(
            SocketAddr::new([10, 0, 0, last].into(), 10081),
            uuid::Uuid::from_u128(u128::from(last)),
            u64::from(last),
            role,
        )
    }

    fn list(ver: u64, members: &[NodeId], zones: &[(u8, &str)]) -> MemberList {
        MemberList {
            ver,
            coordinator: members[0].uuid,
            members: members.to_vec(),
            zones: zones
                .iter()
                .map(|(u, z)| (uuid::Uuid::from_u128(u128::from(*u)), Zone::new(z).unwrap()))
                .collect(),
        }
    }

    #[test]
    fn the_json_shows_each_members_role_zone_and_age() {
        let (a, b) = (id(1, Role::Scheduler), id(2, Role::Worker));
        let view = ClusterView::shared("all", a, list(1, &[a], &[]));
        let mut v = view.write().unwrap();
        let t0 = Instant::now();
        let mut dropped = BTreeMap::new();
        dropped.insert("auth_failed", 3);
        v.update(
            a,
            &Stats::default(),
            &dropped,
            &[list(2, &[a, b], &[(1, "eu-west-1a")])],
            t0,
        );
        let j = v.json(t0 + Duration::from_secs(5));
        assert_eq!((j.cluster.as_str(), j.port, j.version), ("all", 10081, 2));
        assert_eq!(j.rejected.get("auth_failed"), Some(&3));
        let rows: Vec<_> = j
            .members
            .iter()
            .map(|m| {
                (
                    m.address.as_str(),
                    m.role.as_str(),
                    m.zone.as_deref(),
                    m.this,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("10.0.0.1:10081", "scheduler", Some("eu-west-1a"), true),
                ("10.0.0.2:10081", "worker", None, false),
            ]
        );
        assert!((j.members[0].age_seconds - 5.0).abs() < 1e-6);
        // A member that leaves loses its first-seen time; no list keeps the old one.
        v.update(a, &Stats::default(), &BTreeMap::new(), &[], t0);
        assert_eq!(v.list.ver, 2, "no change keeps the list");
        v.update(
            a,
            &Stats::default(),
            &BTreeMap::new(),
            &[list(3, &[a], &[])],
            t0,
        );
        assert_eq!(v.first_seen.len(), 1);
        // Zone round-trips through the JSON `node members` reads; an older node's JSON has none.
        let text = serde_json::to_string(&j).unwrap();
        assert!(text.contains(r#""zone":"eu-west-1a""#), "{text}");
        let old = text.replace(r#""zone":"eu-west-1a","#, "");
        let back: ClusterJson = serde_json::from_str(&old).unwrap();
        assert_eq!(back.members[0].zone, None);
    }

    #[test]
    fn the_log_record_keeps_the_hazelcast_layout_whatever_the_zones() {
        let (a, b) = (id(5, Role::Scheduler), id(6, Role::Worker));
        let l = list(4, &[a, b], &[(5, "us-central1-a"), (6, "us-central1-b")]);
        let text = l.render(b.uuid);
        assert_eq!(
            text,
            format!(
                "Members {{size:2, ver:4}} [\n\tMember [10.0.0.5]:10081 - {}\n\tMember [10.0.0.6]:10081 - {} this\n]",
                a.uuid, b.uuid
            )
        );
        let parsed = parse_logged_lists(&text);
        assert_eq!(parsed.len(), 1);
        assert_eq!(
            parsed[0].shape(),
            (4, vec![(a.addr, a.uuid), (b.addr, b.uuid)])
        );
    }
}
