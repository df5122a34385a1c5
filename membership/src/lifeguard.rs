//! Lifeguard on top of foca: suspicion timeouts that shrink with independent confirmations,
//! and the local health score that stretches them.
//!
//! foca times only its own failed probes and with one fixed timeout. This state machine keeps,
//! per suspected address, when the suspicion started, who confirmed it independently and the
//! deadline its `ChangeSuspectToDown` timer is scheduled for; the engine asks it for deadlines
//! and tells it about confirmations. It does no I/O and knows nothing of foca's state: the
//! engine passes the number of other members in.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use foca::Timer;
use uuid::Uuid;

use crate::id::NodeId;

/// The most suspicions tracked at once (a flood of `Suspect` messages adds no more).
const MAX_SUSPICIONS: usize = 4096;
/// The most confirmations kept per suspicion; more cannot shorten the timeout further.
const MAX_CONFIRMERS: usize = 16;

/// Lifeguard's settings, from [`crate::Config`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// The timeout once `k` independent confirmations arrived.
    pub(crate) min: Duration,
    /// The timeout with no confirmation.
    pub(crate) max: Duration,
    /// Confirmations that shrink the timeout to `min`.
    pub(crate) k: usize,
    /// The highest health score.
    pub(crate) max_health: u32,
}

/// One member under suspicion, with the independent confirmations received.
#[derive(Debug, Clone)]
pub(crate) struct Suspicion {
    pub(crate) id: NodeId,
    pub(crate) incarnation: u16,
    pub(crate) started: Duration,
    pub(crate) confirmers: Vec<Uuid>,
    /// Whether a member relayed a `Down` about it: that member ran its own timer to the end.
    pub(crate) relayed: bool,
    /// foca's timer event and the deadline it is scheduled for, once foca suspects too.
    pub(crate) timer: Option<(Timer<NodeId>, Duration)>,
}

impl Suspicion {
    fn new(id: NodeId, incarnation: u16, started: Duration) -> Self {
        Self {
            id,
            incarnation,
            started,
            confirmers: Vec::new(),
            relayed: false,
            timer: None,
        }
    }

    /// The confirmations that shorten its timeout: a relayed `Down` counts as all of them.
    pub(crate) fn weight(&self) -> usize {
        if self.relayed {
            usize::MAX
        } else {
            self.confirmers.len()
        }
    }
}

/// Suspicions and the local health score.
#[derive(Debug)]
pub(crate) struct Lifeguard {
    params: Params,
    suspicions: HashMap<SocketAddr, Suspicion>,
    health: u32,
}

impl Lifeguard {
    pub(crate) fn new(params: Params) -> Self {
        Self {
            params,
            suspicions: HashMap::new(),
            health: 0,
        }
    }

    /// The local health score: 0 is healthy.
    pub(crate) fn health(&self) -> u32 {
        self.health
    }

    /// This member found itself suspected: it becomes slower to judge others.
    pub(crate) fn bump_health(&mut self) {
        self.health = (self.health + 1).min(self.params.max_health);
    }

    /// A probe was answered: the score heals one step. Returns whether it changed.
    pub(crate) fn heal(&mut self) -> bool {
        if self.health == 0 {
            return false;
        }
        self.health -= 1;
        true
    }

    /// The timeout for `confirmations` independent confirmations among `others` other members:
    /// `max − (max − min)·log(C+1)/log(K+1)` with `K = min(k, others − 1)`, times `1 + health`.
    pub(crate) fn timeout(&self, confirmations: usize, others: usize) -> Duration {
        let k = self.params.k.min(others.saturating_sub(1));
        let mult = 1 + self.health;
        let min = self.params.min * mult;
        let max = self.params.max.max(self.params.min) * mult;
        if k == 0 {
            return min;
        }
        let frac = ((confirmations as f64 + 1.0).ln() / (k as f64 + 1.0).ln()).clamp(0.0, 1.0);
        max.saturating_sub((max - min).mul_f64(frac)).max(min)
    }

    /// The suspicion of the member at `addr`, if one runs.
    pub(crate) fn get(&self, addr: SocketAddr) -> Option<&Suspicion> {
        self.suspicions.get(&addr)
    }

    /// The suspicion of `target` at `incarnation`, started at `now` unless it already runs;
    /// `None` when it is about an older incarnation than the one suspected, or there is no
    /// room.
    pub(crate) fn suspicion(
        &mut self,
        target: NodeId,
        incarnation: u16,
        now: Duration,
    ) -> Option<&mut Suspicion> {
        if self.suspicions.len() >= MAX_SUSPICIONS && !self.suspicions.contains_key(&target.addr) {
            return None;
        }
        let fresh = Suspicion::new(target, incarnation, now);
        let s = self
            .suspicions
            .entry(target.addr)
            .or_insert_with(|| fresh.clone());
        if s.id != target || s.incarnation != incarnation {
            if s.incarnation > incarnation && s.id == target {
                return None;
            }
            *s = fresh;
        }
        Some(s)
    }

    /// Records `by`'s independent confirmation that `target` at `incarnation` is failing;
    /// returns false when it was ignored (this member's own, the target's, about an older
    /// incarnation, or no room).
    pub(crate) fn confirm(
        &mut self,
        me: Uuid,
        target: NodeId,
        incarnation: u16,
        by: Uuid,
        now: Duration,
    ) -> bool {
        if by == me || by == target.uuid {
            return false;
        }
        let Some(s) = self.suspicion(target, incarnation, now) else {
            return false;
        };
        if !s.confirmers.contains(&by) && s.confirmers.len() < MAX_CONFIRMERS {
            s.confirmers.push(by);
        }
        true
    }

    /// Notes that a member relayed a `Down` about the member at `addr`.
    pub(crate) fn mark_relayed(&mut self, addr: SocketAddr) {
        if let Some(s) = self.suspicions.get_mut(&addr) {
            s.relayed = true;
        }
    }

    /// The deadline for foca's `ChangeSuspectToDown` timer `ev` about `member` at
    /// `incarnation`: the suspicion's start plus Lifeguard's timeout, never before `now`. A
    /// suspicion of another identity or incarnation at that address starts over.
    pub(crate) fn deadline(
        &mut self,
        member: NodeId,
        incarnation: u16,
        ev: &Timer<NodeId>,
        now: Duration,
        others: usize,
    ) -> Duration {
        let fresh = Suspicion::new(member, incarnation, now);
        let s = self.suspicions.entry(member.addr).or_insert(fresh.clone());
        if s.id != member || s.incarnation != incarnation {
            *s = fresh;
        }
        let (started, n) = (s.started, s.weight());
        let deadline = (started + self.timeout(n, others)).max(now);
        if let Some(s) = self.suspicions.get_mut(&member.addr) {
            s.timer = Some((ev.clone(), deadline));
        }
        deadline
    }

    /// When confirmations shortened the timeout of the suspicion at `addr`, its timer event and
    /// the earlier deadline, which is recorded. The later copy still fires, harmlessly: foca
    /// ignores a timer for a member already down.
    pub(crate) fn earlier(
        &mut self,
        addr: SocketAddr,
        now: Duration,
        others: usize,
    ) -> Option<(Timer<NodeId>, Duration)> {
        let s = self.suspicions.get(&addr)?;
        let (ev, deadline) = s.timer.clone()?;
        let due = (s.started + self.timeout(s.weight(), others)).max(now);
        if due >= deadline {
            return None;
        }
        if let Some(s) = self.suspicions.get_mut(&addr) {
            s.timer = Some((ev.clone(), due));
        }
        Some((ev, due))
    }

    /// Forgets the suspicion of the member at `addr` (it went down).
    pub(crate) fn forget(&mut self, addr: SocketAddr) {
        self.suspicions.remove(&addr);
    }

    /// Forgets suspicions older than the longest timeout could be.
    pub(crate) fn expire(&mut self, now: Duration) {
        let horizon = self.params.max * (2 + self.params.max_health);
        self.suspicions.retain(|_, s| now < s.started + horizon);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Role;

    /// min 1 s, max 4 s, K = 3, health up to 8: round figures for the formula.
    fn lan() -> Lifeguard {
        Lifeguard::new(Params {
            min: Duration::from_secs(1),
            max: Duration::from_secs(4),
            k: 3,
            max_health: 8,
        })
    }

    fn id(n: u8) -> NodeId {
        NodeId::new(
            SocketAddr::from(([10, 0, 0, n], 10081)),
            Uuid::from_u128(u128::from(n)),
            u64::from(n),
            Role::Worker,
        )
    }

    fn ms(d: Duration) -> u128 {
        d.as_millis()
    }

    fn ev(target: NodeId, incarnation: u16) -> Timer<NodeId> {
        Timer::ChangeSuspectToDown {
            member_id: target,
            incarnation,
            token: 0,
        }
    }

    #[test]
    fn the_timeout_shrinks_with_confirmations_as_the_formula_says() {
        let lg = lan();
        // K = 3 from 4 other members on: 4 s, then 4 - 3·log(C+1)/log 4.
        for others in [4, 10, 200, 1000] {
            let t: Vec<u128> = (0..=5).map(|c| ms(lg.timeout(c, others))).collect();
            assert_eq!(t, [4000, 2500, 1622, 1000, 1000, 1000], "others={others}");
        }
        // Fewer members can confirm: K = others - 1. K = 2: 4 - 3·log 2 / log 3 = 2.107 s.
        assert_eq!(ms(lg.timeout(0, 3)), 4000);
        assert_eq!(ms(lg.timeout(1, 3)), 2107);
        assert_eq!(ms(lg.timeout(2, 3)), 1000);
        // K = 1: one confirmation is all.
        assert_eq!(ms(lg.timeout(1, 2)), 1000);
        assert_eq!(ms(lg.timeout(0, 2)), 4000);
        // Nobody else could confirm: the minimum at once.
        assert_eq!(ms(lg.timeout(0, 1)), 1000);
        assert_eq!(ms(lg.timeout(0, 0)), 1000);
        // A relayed Down counts as every confirmation.
        assert_eq!(ms(lg.timeout(usize::MAX, 200)), 1000);
    }

    #[test]
    fn the_defaults_give_three_seconds_alone_and_one_with_three_confirmations() {
        let lg = Lifeguard::new(crate::Config::lan().lifeguard());
        let t: Vec<u128> = (0..=3).map(|c| ms(lg.timeout(c, 200))).collect();
        assert_eq!(t, [3000, 2000, 1415, 1000]);
    }

    #[test]
    fn poor_health_stretches_every_timeout() {
        let mut lg = lan();
        for _ in 0..3 {
            lg.bump_health();
        }
        assert_eq!(lg.health(), 3);
        assert_eq!(ms(lg.timeout(0, 10)), 16_000);
        assert_eq!(ms(lg.timeout(3, 10)), 4000);
        for _ in 0..20 {
            lg.bump_health();
        }
        assert_eq!(lg.health(), 8, "capped at max_health");
        assert_eq!(ms(lg.timeout(0, 10)), 36_000);
        assert!(lg.heal());
        assert_eq!(lg.health(), 7);
        for _ in 0..7 {
            lg.heal();
        }
        assert!(!lg.heal(), "healthy already");
    }

    #[test]
    fn confirmations_count_once_per_member_and_never_our_own() {
        let mut lg = lan();
        let (me, t) = (Uuid::from_u128(100), id(1));
        let now = Duration::from_secs(1);
        assert!(!lg.confirm(me, t, 0, me, now), "our own suspicion");
        assert!(!lg.confirm(me, t, 0, t.uuid, now), "the target itself");
        assert!(lg.confirm(me, t, 0, Uuid::from_u128(2), now));
        assert!(lg.confirm(me, t, 0, Uuid::from_u128(2), now));
        assert!(lg.confirm(me, t, 0, Uuid::from_u128(3), now));
        assert_eq!(lg.get(t.addr).unwrap().weight(), 2);
        // About an older incarnation: ignored. A newer one starts over.
        assert!(lg.confirm(me, t, 2, Uuid::from_u128(4), now));
        assert!(!lg.confirm(me, t, 1, Uuid::from_u128(5), now));
        assert_eq!(lg.get(t.addr).unwrap().confirmers, [Uuid::from_u128(4)]);
        // At most 16 are kept.
        for n in 10..40 {
            lg.confirm(me, t, 2, Uuid::from_u128(n), now);
        }
        assert_eq!(lg.get(t.addr).unwrap().weight(), 16);
        lg.mark_relayed(t.addr);
        assert_eq!(lg.get(t.addr).unwrap().weight(), usize::MAX);
    }

    #[test]
    fn timers_move_earlier_as_confirmations_arrive() {
        let mut lg = lan();
        let me = Uuid::from_u128(100);
        let t = id(1);
        let start = Duration::from_secs(10);
        let d = lg.deadline(t, 0, &ev(t, 0), start, 10);
        assert_eq!(d, start + Duration::from_secs(4));
        assert!(lg.earlier(t.addr, start, 10).is_none(), "nothing changed");
        lg.confirm(me, t, 0, Uuid::from_u128(2), start);
        let (_, d) = lg.earlier(t.addr, start, 10).unwrap();
        assert_eq!(d, start + Duration::from_millis(2500));
        // A relayed Down makes it the minimum, which is past already: due now.
        let late = start + Duration::from_secs(2);
        lg.mark_relayed(t.addr);
        let (_, d) = lg.earlier(t.addr, late, 10).unwrap();
        assert_eq!(d, late);
        // Never later than the deadline it has.
        assert!(
            lg.earlier(t.addr, late + Duration::from_secs(1), 10)
                .is_none()
        );
        // Another identity at the address starts over.
        let other = NodeId {
            uuid: Uuid::from_u128(9),
            ..t
        };
        let d = lg.deadline(other, 0, &ev(other, 0), late, 10);
        assert_eq!(d, late + Duration::from_secs(4));
        assert_eq!(lg.get(t.addr).unwrap().weight(), 0);
    }

    #[test]
    fn suspicions_expire_and_stay_bounded() {
        let mut lg = lan();
        let me = Uuid::from_u128(1);
        for i in 0..5000u32 {
            let [_, x, y, z] = i.to_be_bytes();
            let t = NodeId::new(
                SocketAddr::from(([172, x, y, z], 1)),
                Uuid::from_u128(1000 + u128::from(i)),
                0,
                Role::Worker,
            );
            lg.confirm(me, t, 0, Uuid::from_u128(2), Duration::ZERO);
        }
        assert_eq!(lg.suspicions.len(), MAX_SUSPICIONS);
        // 4 s × (2 + 8): forgotten after 40 s.
        lg.expire(Duration::from_secs(39));
        assert_eq!(lg.suspicions.len(), MAX_SUSPICIONS);
        lg.expire(Duration::from_secs(40));
        assert!(lg.suspicions.is_empty());
    }
}
