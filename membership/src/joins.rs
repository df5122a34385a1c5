//! Joins: which discovered candidates outside the view to contact now, with doubling backoff
//! per candidate and a few per round.
//!
//! The engine announces itself to each candidate this returns, with its whole state on the
//! first contact and a digest on retries; the candidate leaves the schedule once it is in the
//! view.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use rand::RngExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// When a candidate is tried next, and the pause after that.
#[derive(Debug, Clone, Copy)]
struct JoinState {
    next_at: Duration,
    backoff: Duration,
    /// Times this candidate was contacted since it was last in the view.
    tries: u32,
}

/// The candidates and their join schedule.
#[derive(Debug)]
pub(crate) struct Joins {
    candidates: Vec<SocketAddr>,
    states: HashMap<SocketAddr, JoinState>,
    /// The earliest moment a candidate outside the view is due.
    next_join: Duration,
    retry: Duration,
    retry_max: Duration,
    fanout: usize,
}

impl Joins {
    /// No candidates yet; `retry` is the first pause, doubling up to `retry_max`, and at most
    /// `fanout` candidates are contacted per round.
    pub(crate) fn new(now: Duration, retry: Duration, retry_max: Duration, fanout: usize) -> Self {
        Self {
            candidates: Vec::new(),
            states: HashMap::new(),
            next_join: now,
            retry,
            retry_max,
            fanout: fanout.max(1),
        }
    }

    /// Replaces the candidates (without `me`); those that stay keep their backoff, and a round
    /// is due at once.
    pub(crate) fn set_candidates(
        &mut self,
        candidates: Vec<SocketAddr>,
        me: SocketAddr,
        now: Duration,
    ) {
        self.states.retain(|a, _| candidates.contains(a));
        self.candidates = candidates;
        self.candidates.retain(|a| *a != me);
        self.next_join = now;
    }

    /// Forgets every backoff and makes a round due at once (this member is alone again).
    pub(crate) fn reset(&mut self, now: Duration) {
        self.states.clear();
        self.next_join = now;
    }

    /// Makes a round due at `now` at the latest: the view or the list changed, so the set of
    /// candidates outside it may have too.
    pub(crate) fn wake(&mut self, now: Duration) {
        self.next_join = self.next_join.min(now);
    }

    /// When the next round is due.
    pub(crate) fn next_deadline(&self) -> Duration {
        self.next_join
    }

    /// Whether `c` was contacted before this round without entering the view since: a dead
    /// static entry, a partitioned peer, or one slow to answer.
    pub(crate) fn retried(&self, c: SocketAddr) -> bool {
        self.states.get(&c).is_some_and(|s| s.tries > 1)
    }

    /// The candidates outside the view (`active` holds the addresses in it) to contact now: at
    /// most `fanout`, chosen at random among those due; the other due ones wait half a first
    /// pause or so, and the chosen ones back off (doubling, ±25 %).
    pub(crate) fn due(
        &mut self,
        active: &HashSet<SocketAddr>,
        now: Duration,
        rng: &mut StdRng,
    ) -> Vec<SocketAddr> {
        let mut due = Vec::new();
        for c in &self.candidates {
            if active.contains(c) {
                self.states.remove(c);
                continue;
            }
            let st = self.states.entry(*c).or_insert(JoinState {
                next_at: now,
                backoff: self.retry,
                tries: 0,
            });
            if now >= st.next_at {
                due.push(*c);
            }
        }
        // A few per round: a simultaneous start of hundreds must not be N² syncs. The rest wait
        // for the next round, by which time the syncs have usually brought them into the view.
        let n = due.len().min(self.fanout);
        let (chosen, rest) = due.partial_shuffle(rng, n);
        for c in rest.iter() {
            if let Some(st) = self.states.get_mut(c) {
                st.next_at = now + self.retry.mul_f64(rng.random_range(0.5..1.0));
            }
        }
        let due: Vec<SocketAddr> = chosen.to_vec();
        for c in &due {
            if let Some(st) = self.states.get_mut(c) {
                let pause = st.backoff.mul_f64(rng.random_range(0.75..1.25));
                st.next_at = now + pause;
                st.backoff = (st.backoff * 2).min(self.retry_max);
                st.tries = st.tries.saturating_add(1);
            }
        }
        // Joins only wake the engine while some candidate is outside the view; syncs and
        // timers wake it anyway, and `set_candidates` resets this.
        self.next_join = self
            .candidates
            .iter()
            .filter(|c| !active.contains(*c))
            .filter_map(|c| self.states.get(c).map(|j| j.next_at))
            .min()
            .unwrap_or(Duration::MAX)
            .max(now + Duration::from_millis(1));
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 10081))
    }

    fn joins() -> Joins {
        Joins::new(
            Duration::ZERO,
            Duration::from_millis(500),
            Duration::from_secs(8),
            3,
        )
    }

    #[test]
    fn a_candidate_is_retried_with_doubling_backoff_up_to_the_cap() {
        let mut j = joins();
        let mut rng = StdRng::seed_from_u64(1);
        j.set_candidates(vec![addr(1), addr(2)], addr(1), Duration::ZERO);
        let none = HashSet::new();
        let mut now = Duration::ZERO;
        let mut pauses = Vec::new();
        for i in 0..10 {
            assert_eq!(j.due(&none, now, &mut rng), vec![addr(2)], "at {now:?}");
            assert_eq!(
                j.retried(addr(2)),
                i > 0,
                "only the first contact is not a retry"
            );
            let next = j.next_deadline();
            pauses.push((next - now).as_secs_f64());
            // Nothing is due before the deadline.
            assert!(
                j.due(&none, next - Duration::from_millis(1), &mut rng)
                    .is_empty()
            );
            now = next;
        }
        // 0.5, 1, 2, 4, 8, 8, ... seconds, each ±25 %.
        for (i, p) in pauses.iter().enumerate() {
            let base = (0.5 * 2f64.powi(i as i32)).min(8.0);
            assert!(*p >= base * 0.75 && *p <= base * 1.25, "pause {i}: {p}");
        }
    }

    #[test]
    fn members_of_the_view_are_not_contacted_and_nothing_wakes_the_engine() {
        let mut j = joins();
        let mut rng = StdRng::seed_from_u64(2);
        j.set_candidates(vec![addr(2), addr(3)], addr(1), Duration::ZERO);
        let active: HashSet<SocketAddr> = [addr(2), addr(3)].into();
        assert!(j.due(&active, Duration::ZERO, &mut rng).is_empty());
        assert_eq!(j.next_deadline(), Duration::MAX);
        // New candidates make a round due at once.
        j.set_candidates(vec![addr(2), addr(4)], addr(1), Duration::from_secs(3));
        assert_eq!(j.next_deadline(), Duration::from_secs(3));
        assert_eq!(
            j.due(&active, Duration::from_secs(3), &mut rng),
            vec![addr(4)]
        );
    }

    #[test]
    fn a_round_contacts_at_most_fanout_candidates() {
        let mut j = joins();
        let mut rng = StdRng::seed_from_u64(3);
        let all: Vec<SocketAddr> = (2..=40).map(addr).collect();
        j.set_candidates(all.clone(), addr(1), Duration::ZERO);
        let none = HashSet::new();
        let mut seen = HashSet::new();
        let mut now = Duration::ZERO;
        for _ in 0..200 {
            let due = j.due(&none, now, &mut rng);
            assert!(due.len() <= 3);
            seen.extend(due);
            now = j.next_deadline();
        }
        assert_eq!(seen.len(), all.len(), "every candidate gets its turn");
    }

    #[test]
    fn a_wake_makes_a_round_due_without_forgetting_the_backoff() {
        let mut j = joins();
        let mut rng = StdRng::seed_from_u64(5);
        j.set_candidates(vec![addr(2), addr(3)], addr(1), Duration::ZERO);
        let both: HashSet<SocketAddr> = [addr(2), addr(3)].into();
        assert!(j.due(&both, Duration::ZERO, &mut rng).is_empty());
        assert_eq!(j.next_deadline(), Duration::MAX, "nothing outside the view");
        // addr(3) left the view: a wake lets the next tick see it.
        let t = Duration::from_secs(1);
        j.wake(t);
        assert_eq!(j.next_deadline(), t);
        let one: HashSet<SocketAddr> = [addr(2)].into();
        assert_eq!(j.due(&one, t, &mut rng), vec![addr(3)]);
        // A wake never postpones a round already due.
        j.wake(Duration::from_secs(60));
        assert!(j.next_deadline() < Duration::from_secs(60));
    }

    #[test]
    fn a_reset_forgets_the_backoff() {
        let mut j = joins();
        let mut rng = StdRng::seed_from_u64(4);
        j.set_candidates(vec![addr(2)], addr(1), Duration::ZERO);
        let none = HashSet::new();
        let mut now = Duration::ZERO;
        for _ in 0..5 {
            j.due(&none, now, &mut rng);
            now = j.next_deadline();
        }
        let t = now + Duration::from_millis(1);
        assert!(j.retried(addr(2)));
        j.reset(t);
        assert_eq!(j.next_deadline(), t);
        assert_eq!(j.due(&none, t, &mut rng), vec![addr(2)]);
        assert!(!j.retried(addr(2)), "a reset starts the tries over");
        let pause = j.next_deadline() - t;
        assert!(pause <= Duration::from_millis(625), "{pause:?}");
    }
}
