//! An index of foca's membership state by address and by UUID, so the checks every packet
//! goes through (is the sender known, is this identity active, where is this UUID) cost a
//! lookup instead of a scan of every member.
//!
//! foca offers no lookup, so the index is rebuilt from `iter_membership_state` when foca's
//! state may have changed: the engine calls [`MemberIndex::invalidate`] on every membership
//! notification (a member up, down or renamed), and a change in the number of members (a down
//! member forgotten or added silently) is caught by [`MemberIndex::refresh`] itself.

use std::collections::HashMap;
use std::net::SocketAddr;

use foca::{Member, State};
use uuid::Uuid;

use crate::id::NodeId;

/// Identities by address and active identities by UUID.
#[derive(Debug, Default)]
pub(crate) struct MemberIndex {
    /// Every identity foca holds, and whether it is active (alive or suspect).
    by_addr: HashMap<SocketAddr, (NodeId, bool)>,
    /// The addresses and generations of the active identities with each UUID, in foca's order.
    active_by_uuid: HashMap<Uuid, Vec<(SocketAddr, u16)>>,
    len: usize,
    valid: bool,
}

impl MemberIndex {
    /// Marks the index out of date.
    pub(crate) fn invalidate(&mut self) {
        self.valid = false;
    }

    /// Rebuilds the index if it is out of date or the number of members changed.
    pub(crate) fn refresh<'a>(
        &mut self,
        len: usize,
        state: impl Iterator<Item = &'a Member<NodeId>>,
    ) {
        if self.valid && self.len == len {
            return;
        }
        self.by_addr.clear();
        self.active_by_uuid.clear();
        for m in state {
            let id = *m.id();
            let active = m.state() != State::Down;
            self.by_addr.insert(id.addr, (id, active));
            if active {
                self.active_by_uuid
                    .entry(id.uuid)
                    .or_default()
                    .push((id.addr, id.generation));
            }
        }
        self.len = len;
        self.valid = true;
    }

    /// Whether foca holds a member (alive, suspect or down) at `addr`.
    pub(crate) fn contains(&self, addr: SocketAddr) -> bool {
        self.by_addr.contains_key(&addr)
    }

    /// The identity at `addr` and whether it is active.
    pub(crate) fn at(&self, addr: SocketAddr) -> Option<(NodeId, bool)> {
        self.by_addr.get(&addr).copied()
    }

    /// Whether `id` is active, exactly (generation included).
    pub(crate) fn is_active(&self, id: &NodeId) -> bool {
        self.at(id.addr)
            .is_some_and(|(k, active)| active && k == *id)
    }

    /// The address of the active member with this UUID (its latest generation; of equals, the
    /// last in foca's order).
    pub(crate) fn addr_of(&self, uuid: Uuid) -> Option<SocketAddr> {
        let v = self.active_by_uuid.get(&uuid)?;
        let mut best = *v.first()?;
        for &(a, g) in v {
            if g >= best.1 {
                best = (a, g);
            }
        }
        Some(best.0)
    }

    /// Whether an active member with this UUID is at another address than `addr`.
    pub(crate) fn uuid_elsewhere(&self, uuid: Uuid, addr: SocketAddr) -> bool {
        self.active_by_uuid
            .get(&uuid)
            .is_some_and(|v| v.iter().any(|(a, _)| *a != addr))
    }

    /// The addresses of the active members.
    pub(crate) fn active_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.by_addr
            .iter()
            .filter(|(_, (_, active))| *active)
            .map(|(a, _)| *a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Role;

    fn id(n: u8, uuid: u128, generation: u16) -> NodeId {
        NodeId {
            generation,
            ..NodeId::new(
                SocketAddr::from(([10, 0, 0, n], 10081)),
                Uuid::from_u128(uuid),
                1,
                Role::Worker,
            )
        }
    }

    #[test]
    fn answers_what_a_scan_of_the_state_would() {
        let state = [
            Member::alive(id(1, 1, 0)),
            Member::new(id(2, 2, 0), 3, State::Suspect),
            Member::down(id(3, 3, 0)),
            Member::alive(id(4, 2, 1)),
        ];
        let mut ix = MemberIndex::default();
        ix.refresh(state.len(), state.iter());
        assert!(ix.contains(id(3, 3, 0).addr));
        assert!(!ix.contains(id(9, 9, 0).addr));
        assert!(ix.is_active(&id(2, 2, 0)));
        assert!(!ix.is_active(&id(2, 2, 1)), "another generation");
        assert!(!ix.is_active(&id(3, 3, 0)), "down");
        assert_eq!(ix.addr_of(Uuid::from_u128(2)), Some(id(4, 2, 1).addr));
        assert_eq!(ix.addr_of(Uuid::from_u128(3)), None, "down");
        assert!(ix.uuid_elsewhere(Uuid::from_u128(2), id(2, 2, 0).addr));
        assert!(!ix.uuid_elsewhere(Uuid::from_u128(1), id(1, 1, 0).addr));
        let mut active: Vec<SocketAddr> = ix.active_addrs().collect();
        active.sort();
        assert_eq!(active.len(), 3);
        // A valid index of the same size is kept; an invalidated one is rebuilt.
        let fewer = &state[..2];
        ix.refresh(4, fewer.iter());
        assert!(ix.contains(id(3, 3, 0).addr));
        ix.invalidate();
        ix.refresh(2, fewer.iter());
        assert!(!ix.contains(id(3, 3, 0).addr));
        // So is one whose size changed.
        ix.refresh(4, state.iter());
        assert!(ix.contains(id(3, 3, 0).addr));
    }
}
