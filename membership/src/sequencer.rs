//! List sequencing (Hazelcast's model): which coordinator's lists count, when a list is
//! adopted, and when the coordinator issues the next version.
//!
//! The engine decides who the coordinator is (the oldest eligible member) and what the members
//! are; this state machine holds the list, applies the adopt rules to lists that arrive, and
//! numbers the lists this member issues, folding bursts of changes into one version. It does no
//! I/O: the engine sends what it issues.

use std::collections::BTreeMap;
use std::time::Duration;

use uuid::Uuid;

use crate::id::{NodeId, Zone};
use crate::list::{self, MemberList};
use crate::wire::ListMsg;

/// Lists in a row from the current coordinator, older than the one held, after which the
/// member adopts the coordinator's list anyway: the held one was then never issued by it.
pub(crate) const STALE_LISTS_TO_ADOPT: u32 = 3;

/// What [`ListSequencer::issue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Issue {
    /// Nothing to issue: this member does not coordinate, or its list already says this.
    Nothing,
    /// A new version is due at this moment (bursts fold into one version).
    Later(Duration),
    /// A new version was issued; the engine pushes it to every other listed member.
    Issued,
}

/// The held list and the sequencing state around it.
#[derive(Debug)]
pub(crate) struct ListSequencer {
    me: Uuid,
    list: MemberList,
    /// The oldest eligible member, as the engine last computed it: the only one whose lists
    /// count.
    coordinator: Uuid,
    /// Lists in a row from the current coordinator that were older than the one held.
    stale_lists: u32,
    last_issue: Option<Duration>,
    issue_at: Option<Duration>,
    min_interval: Duration,
    changes: Vec<MemberList>,
}

impl ListSequencer {
    /// Starts with the list of `me` alone at version 1, ready in
    /// [`ListSequencer::drain_changes`].
    pub(crate) fn new(me: NodeId, min_interval: Duration) -> Self {
        let list = MemberList {
            ver: 1,
            coordinator: me.uuid,
            members: vec![me],
            zones: BTreeMap::new(),
        };
        Self {
            me: me.uuid,
            changes: vec![list.clone()],
            list,
            coordinator: me.uuid,
            stale_lists: 0,
            last_issue: None,
            issue_at: None,
            min_interval,
        }
    }

    /// The list held now.
    pub(crate) fn list(&self) -> &MemberList {
        &self.list
    }

    /// The version and issuer of the held list.
    pub(crate) fn held(&self) -> (Uuid, u64) {
        (self.list.coordinator, self.list.ver)
    }

    /// The coordinator as last set.
    pub(crate) fn coordinator(&self) -> Uuid {
        self.coordinator
    }

    /// Whether this member coordinates.
    pub(crate) fn coordinating(&self) -> bool {
        self.coordinator == self.me
    }

    /// When a folded version is due, if one is.
    pub(crate) fn issue_at(&self) -> Option<Duration> {
        self.issue_at
    }

    /// Takes the lists adopted or issued since the last call, oldest first.
    pub(crate) fn drain_changes(&mut self) -> Vec<MemberList> {
        std::mem::take(&mut self.changes)
    }

    /// Sets this member's zone in the lists it issued so far (before anything was sent).
    pub(crate) fn set_own_zone(&mut self, zone: Option<Zone>) {
        let me = self.me;
        for l in std::iter::once(&mut self.list).chain(self.changes.iter_mut()) {
            if l.coordinator == me {
                match zone {
                    Some(z) => l.zones.insert(me, z),
                    None => l.zones.remove(&me),
                };
            }
        }
    }

    /// Sets the coordinator; returns whether it changed (the stale count then starts over).
    pub(crate) fn set_coordinator(&mut self, coordinator: Uuid) -> bool {
        if coordinator == self.coordinator {
            return false;
        }
        self.coordinator = coordinator;
        self.stale_lists = 0;
        true
    }

    /// A list from the member at its coordinator's address (checked by the caller). Adopted
    /// only from the member this one sees as coordinator, only if it lists this member, and
    /// only if it comes from another coordinator than the held list (a coordinator change or
    /// a restart: adopted even at a lower version) or is newer in serial-number order. A
    /// coordinator that keeps sending older lists is believed after
    /// [`STALE_LISTS_TO_ADOPT`]: the held list was then never its own. Returns whether it was
    /// adopted.
    pub(crate) fn offer(&mut self, msg: ListMsg) -> bool {
        if msg.coordinator == self.me
            || msg.coordinator != self.coordinator
            || !msg.members.iter().any(|m| m.uuid == self.me)
        {
            return false;
        }
        let adopt = if msg.coordinator != self.list.coordinator
            || list::ver_newer(msg.ver, self.list.ver)
        {
            true
        } else if msg.ver == self.list.ver {
            self.stale_lists = 0;
            false
        } else {
            self.stale_lists += 1;
            self.stale_lists >= STALE_LISTS_TO_ADOPT
        };
        if adopt {
            self.stale_lists = 0;
            self.list = MemberList {
                ver: msg.ver,
                coordinator: msg.coordinator,
                members: msg.members,
                zones: msg.zones,
            };
            self.changes.push(self.list.clone());
        }
        adopt
    }

    /// Whether a pull from a member holding `have` gets this member's list: only from the
    /// coordinator, only when the list it holds is its own and did not just change (`before`,
    /// the held list when the pull arrived; a new version reaches the puller anyway), and only
    /// when the puller holds another.
    pub(crate) fn answers_pull(&self, before: (Uuid, u64), have: (Uuid, u64)) -> bool {
        let held = self.held();
        self.coordinating() && held.0 == self.me && held == before && have != held
    }

    /// Issues the next version with these members, oldest first, if this member coordinates
    /// and its list says otherwise; at most one version per `min_interval`. The held list is
    /// this member's or its former coordinator's, never a number a message only claimed, and
    /// versions wrap (compared with [`list::ver_newer`]).
    pub(crate) fn issue(
        &mut self,
        members: Vec<NodeId>,
        zones: BTreeMap<Uuid, Zone>,
        now: Duration,
    ) -> Issue {
        if !self.coordinating()
            || (self.list.coordinator == self.me
                && self.list.same_members(&members)
                && self.list.zones == zones)
        {
            self.issue_at = None;
            return Issue::Nothing;
        }
        if let Some(last) = self.last_issue
            && now < last + self.min_interval
        {
            let at = last + self.min_interval;
            self.issue_at = Some(at);
            return Issue::Later(at);
        }
        self.last_issue = Some(now);
        self.issue_at = None;
        self.list = MemberList {
            ver: self.list.ver.wrapping_add(1),
            coordinator: self.me,
            members,
            zones,
        };
        self.changes.push(self.list.clone());
        Issue::Issued
    }

    /// Whether a folded version is due at `now`; clears it, so the engine recomputes the list.
    pub(crate) fn take_due(&mut self, now: Duration) -> bool {
        if self.issue_at.is_some_and(|t| now >= t) {
            self.issue_at = None;
            return true;
        }
        false
    }

    /// Replaces the held list, for tests that start from a given state.
    #[cfg(test)]
    pub(crate) fn hold(&mut self, list: MemberList) {
        self.list = list;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Role;

    fn id(n: u8) -> NodeId {
        NodeId::new(
            std::net::SocketAddr::from(([10, 0, 0, n], 10081)),
            Uuid::from_u128(u128::from(n)),
            u64::from(n),
            Role::Worker,
        )
    }

    fn msg(ver: u64, coordinator: u8, members: &[u8]) -> ListMsg {
        ListMsg {
            ver,
            coordinator: Uuid::from_u128(u128::from(coordinator)),
            members: members.iter().map(|&n| id(n)).collect(),
            zones: BTreeMap::new(),
        }
    }

    /// Member 2, whose coordinator is member 1.
    fn follower() -> ListSequencer {
        let mut s = ListSequencer::new(id(2), Duration::from_millis(150));
        assert_eq!(s.drain_changes().len(), 1);
        assert!(s.set_coordinator(Uuid::from_u128(1)));
        assert!(!s.set_coordinator(Uuid::from_u128(1)));
        s
    }

    #[test]
    fn lists_are_adopted_only_from_the_coordinator_and_only_with_us() {
        let mut s = follower();
        assert!(!s.offer(msg(5, 3, &[3, 2])), "not our coordinator");
        assert!(!s.offer(msg(5, 2, &[2])), "our own UUID");
        assert!(!s.offer(msg(5, 1, &[1, 3])), "leaves us out");
        assert!(s.offer(msg(5, 1, &[1, 2])));
        assert_eq!(s.held(), (Uuid::from_u128(1), 5));
        assert!(!s.offer(msg(5, 1, &[1, 2])), "the same version again");
        assert!(s.offer(msg(6, 1, &[1, 2, 3])));
        assert_eq!(s.drain_changes().len(), 2);
    }

    #[test]
    fn a_coordinator_change_is_adopted_even_at_a_lower_version() {
        let mut s = follower();
        assert!(s.offer(msg(50, 1, &[1, 2])));
        assert!(s.set_coordinator(Uuid::from_u128(3)));
        assert!(s.offer(msg(2, 3, &[3, 2])));
        assert_eq!(s.held(), (Uuid::from_u128(3), 2));
    }

    #[test]
    fn versions_compare_in_serial_number_order_and_wrap() {
        let mut s = follower();
        assert!(s.offer(msg(u64::MAX - 1, 1, &[1, 2])));
        for ver in [u64::MAX, 0, 1] {
            assert!(s.offer(msg(ver, 1, &[1, 2])), "{ver}");
        }
        assert_eq!(s.held().1, 1);
    }

    #[test]
    fn an_insistent_coordinator_is_believed_after_stale_lists_to_adopt() {
        let mut s = follower();
        let far = 1u64 << 62;
        assert!(s.offer(msg(far, 1, &[1, 2])));
        for i in 1..=STALE_LISTS_TO_ADOPT {
            let adopted = s.offer(msg(7, 1, &[1, 2]));
            assert_eq!(adopted, i == STALE_LISTS_TO_ADOPT, "answer {i}");
        }
        assert_eq!(s.held().1, 7);
        // The held version in between resets the count.
        assert!(s.offer(msg(far, 1, &[1, 2])));
        assert!(!s.offer(msg(7, 1, &[1, 2])));
        assert!(!s.offer(msg(far, 1, &[1, 2])));
        assert!(!s.offer(msg(7, 1, &[1, 2])));
        assert!(!s.offer(msg(7, 1, &[1, 2])));
        assert_eq!(s.held().1, far);
        // So does a coordinator change.
        assert!(s.set_coordinator(Uuid::from_u128(3)));
        assert!(s.set_coordinator(Uuid::from_u128(1)));
        assert!(!s.offer(msg(7, 1, &[1, 2])));
        assert!(!s.offer(msg(7, 1, &[1, 2])));
        assert!(s.offer(msg(7, 1, &[1, 2])));
    }

    #[test]
    fn the_coordinator_folds_bursts_into_one_version() {
        let me = id(1);
        let mut s = ListSequencer::new(me, Duration::from_millis(150));
        s.drain_changes();
        let t = Duration::from_secs(1);
        assert_eq!(s.issue(vec![me], BTreeMap::new(), t), Issue::Nothing);
        assert_eq!(s.issue(vec![me, id(2)], BTreeMap::new(), t), Issue::Issued);
        assert_eq!(s.held(), (me.uuid, 2));
        let soon = t + Duration::from_millis(10);
        let at = t + Duration::from_millis(150);
        assert_eq!(
            s.issue(vec![me, id(2), id(3)], BTreeMap::new(), soon),
            Issue::Later(at)
        );
        assert!(!s.take_due(soon));
        assert!(s.take_due(at));
        assert_eq!(s.issue_at(), None);
        assert_eq!(
            s.issue(vec![me, id(2), id(3)], BTreeMap::new(), at),
            Issue::Issued
        );
        assert_eq!(s.held().1, 3);
        // A zone learned later is a change too.
        let zones: BTreeMap<Uuid, Zone> = [(id(3).uuid, Zone::new("z").unwrap())].into();
        let later = at + Duration::from_secs(1);
        assert_eq!(
            s.issue(vec![me, id(2), id(3)], zones.clone(), later),
            Issue::Issued
        );
        assert_eq!(s.list().zone(id(3).uuid), Zone::new("z").ok());
        assert_eq!(s.drain_changes().len(), 3);
        // Versions continue from what it holds, wrapping.
        s.hold(MemberList {
            ver: u64::MAX,
            ..s.list().clone()
        });
        assert_eq!(
            s.issue(vec![me], zones, later + Duration::from_secs(1)),
            Issue::Issued
        );
        assert_eq!(s.held().1, 0);
    }

    #[test]
    fn a_follower_issues_nothing_and_answers_no_pull() {
        let mut s = follower();
        let t = Duration::from_secs(1);
        assert_eq!(s.issue(vec![id(2)], BTreeMap::new(), t), Issue::Nothing);
        assert!(!s.answers_pull(s.held(), (Uuid::nil(), 0)));
    }

    #[test]
    fn pulls_are_answered_only_when_the_puller_holds_another_list() {
        let me = id(1);
        let mut s = ListSequencer::new(me, Duration::from_millis(150));
        let held = s.held();
        assert!(!s.answers_pull(held, held));
        assert!(s.answers_pull(held, (me.uuid, u64::MAX)));
        assert!(s.answers_pull(held, (Uuid::from_u128(2), held.1)));
        // A version issued while handling the pull reaches the puller anyway.
        s.issue(vec![me, id(2)], BTreeMap::new(), Duration::ZERO);
        assert!(!s.answers_pull(held, (Uuid::nil(), 0)));
    }
}
