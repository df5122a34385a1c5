//! The queue of foca's timer events, by deadline; events due at the same moment fire in the
//! order they were scheduled.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use foca::Timer;

use crate::id::NodeId;

/// foca's timer events waiting for their deadline.
#[derive(Debug, Default)]
pub(crate) struct TimerQueue {
    heap: BinaryHeap<Reverse<(Duration, u64, Timer<NodeId>)>>,
    seq: u64,
}

impl TimerQueue {
    /// Schedules `ev` for `deadline`.
    pub(crate) fn push(&mut self, deadline: Duration, ev: Timer<NodeId>) {
        self.seq += 1;
        self.heap.push(Reverse((deadline, self.seq, ev)));
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Duration> {
        self.heap.peek().map(|Reverse((t, _, _))| *t)
    }

    /// Takes the earliest event due at `now`.
    pub(crate) fn pop_due(&mut self, now: Duration) -> Option<Timer<NodeId>> {
        if self.next()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse((_, _, ev))| ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_fire_by_deadline_then_in_scheduling_order() {
        let mut q = TimerQueue::default();
        let s = Duration::from_secs;
        q.push(s(2), Timer::ProbeRandomMember(2));
        q.push(s(1), Timer::ProbeRandomMember(1));
        q.push(s(2), Timer::ProbeRandomMember(3));
        q.push(s(2), Timer::ProbeRandomMember(0));
        assert_eq!(q.next(), Some(s(1)));
        assert!(q.pop_due(Duration::from_millis(999)).is_none());
        let mut fired = Vec::new();
        while let Some(Timer::ProbeRandomMember(n)) = q.pop_due(s(2)) {
            fired.push(n);
        }
        assert_eq!(fired, [1, 2, 3, 0]);
        assert_eq!(q.next(), None);
    }
}
