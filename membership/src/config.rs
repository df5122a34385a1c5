//! The engine's settings, the constraints each one keeps, and the tuned defaults.

use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

use foca::PeriodicParams;

use crate::MembershipError;
use crate::lifeguard;
use crate::wire;

/// Engine settings. [`Config::lan`] gives the tuned defaults; [`Config::validate`] checks the
/// constraints each field states.
#[derive(Debug, Clone)]
pub struct Config {
    /// The SWIM settings handed to foca. `probe_rtt` must be shorter than `probe_period`, and
    /// `max_packet_size` plus the envelope (`wire::HEADER_LEN`) must fit in `max_datagram`.
    pub swim: foca::Config,
    /// The first pause before a candidate that is not in the view is tried again; above zero.
    pub join_retry: Duration,
    /// The longest pause between join attempts to one candidate (the pause doubles); at least
    /// `join_retry`.
    pub join_retry_max: Duration,
    /// The pause before a member asks the oldest member for the list it holds, after its view,
    /// its list or its coordinator changed (a lost push is then recovered within it); above
    /// zero. While nothing changes the pause doubles up to `pull_interval_max`.
    pub pull_interval: Duration,
    /// The longest pause between pulls in a quiet cluster; at least `pull_interval`.
    pub pull_interval_max: Duration,
    /// The mean pause between periodic state syncs with a random member; above zero.
    pub sync_interval: Duration,
    /// The largest datagram the engine sends; larger messages go over a stream. At least 512
    /// bytes, so every fixed-size message fits.
    pub max_datagram: usize,
    /// The most members a decoded list or sync may carry; at least `member_cap`.
    pub max_members: usize,
    /// Lifeguard: the suspicion timeout once `suspicion_k` independent confirmations arrived.
    /// Must be at least twice the gossip period so the suspect can hear of it and refute.
    pub suspicion_min: Duration,
    /// Lifeguard: the suspicion timeout with no confirmation; must be at least `suspicion_min`.
    pub suspicion_max: Duration,
    /// Lifeguard: how many independent confirmations shrink the timeout to the minimum
    /// (capped at the number of other members that could confirm); 0 means the minimum always.
    pub suspicion_k: usize,
    /// Lifeguard: the highest local health score; timeouts are multiplied by `1 + score`.
    pub max_health: u32,
    /// The shortest pause between two list versions issued by the oldest member; changes in
    /// between are folded into one version. Zero issues every change at once.
    pub list_min_interval: Duration,
    /// Candidates contacted per join round, at least 1 (0 counts as 1); the others wait for the
    /// next round.
    pub join_fanout: usize,
    /// The most members, this one included, the view admits (at least 2); syncs and gossip
    /// naming more add none. Down members count too, up to twice this, until foca forgets
    /// them (`swim.remove_down_after`).
    pub member_cap: usize,
}

impl Config {
    /// Defaults for a LAN or a cloud VPC, where round trips are well under 10 ms.
    pub fn lan() -> Self {
        Self {
            swim: foca::Config {
                // One probe every 600 ms. Each period a dead member is probed by about one
                // member (all probe round-robin), so it is first probed within about a
                // period, and its witnesses gather confirmations at that pace. Probes are most
                // of the traffic: 500 ms cost 20 % more bytes for no gain in detection that
                // the simulator could measure at 200 members.
                probe_period: Duration::from_millis(600),
                // A LAN round trip is far below this; the rest of the period is for the
                // indirect probes.
                probe_rtt: Duration::from_millis(200),
                // Three helpers for indirect probes, as in memberlist.
                num_indirect_probes: NonZeroUsize::new(3).expect("non-zero"),
                // Enough transmissions to reach every member of a few hundred with high
                // probability.
                max_transmissions: NonZeroU8::new(8).expect("non-zero"),
                // Not used as such: the engine replaces every suspicion timer with Lifeguard's
                // timeout, between `suspicion_min` and `suspicion_max` below.
                suspect_to_down_after: Duration::from_secs(3),
                // Restarts use a new UUID and renewals win the address conflict, so forgetting
                // down members late costs only memory.
                remove_down_after: Some(Duration::from_secs(15 * 60)),
                // foca's packet plus the envelope must fit in `max_datagram`, or receivers drop
                // it as oversized (large feeds did, before).
                max_packet_size: NonZeroUsize::new(1400 - wire::HEADER_LEN).expect("non-zero"),
                // Off: foca 2.0 sends its "you are down" message even when the suspicion was
                // refuted, which makes live members renew their identity for nothing. The
                // engine tells down members itself, with a state sync (see `tell_if_down`).
                notify_down_members: false,
                // Off: an announce to a member every 10 s got back a feed of up to a full
                // packet of members (150 B/s per member at 200 members, a sixth of the
                // traffic), for what the periodic syncs and the joins already do.
                periodic_announce: None,
                // Heals partitions even when discovery returns nothing new.
                periodic_announce_to_down_members: Some(PeriodicParams {
                    frequency: Duration::from_secs(5),
                    num_members: NonZeroUsize::new(2).expect("non-zero"),
                }),
                periodic_gossip: Some(PeriodicParams {
                    frequency: Duration::from_millis(100),
                    num_members: NonZeroUsize::new(3).expect("non-zero"),
                }),
            },
            join_retry: Duration::from_millis(500),
            join_retry_max: Duration::from_secs(8),
            pull_interval: Duration::from_secs(1),
            // A pull a second from every member was a ninth of the traffic; pushes reach
            // everyone at once, so pulls only mop up lost pushes and quiet clusters need few.
            pull_interval_max: Duration::from_secs(30),
            sync_interval: Duration::from_secs(30),
            max_datagram: 1400,
            max_members: 10_000,
            // With K confirmations a dead member is removed 1 s after it was first suspected;
            // a lone suspicion (often one lost packet) gets 3 s at its author and 2 s at the
            // witnesses to be refuted, and the target is told directly. 3 s instead of 4 s
            // keeps detection near 3 s at 200 members; the ten minutes at 10 % loss in the
            // simulator still remove nobody.
            suspicion_min: Duration::from_millis(1000),
            suspicion_max: Duration::from_secs(3),
            suspicion_k: 3,
            max_health: 8,
            list_min_interval: Duration::from_millis(150),
            join_fanout: 3,
            member_cap: 1024,
        }
    }

    /// Checks the constraints the fields state; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), MembershipError> {
        let bad = |why| Err(MembershipError::Config(why));
        if self.swim.probe_rtt >= self.swim.probe_period {
            return bad("swim.probe_rtt must be shorter than swim.probe_period");
        }
        if self.swim.max_packet_size.get() + wire::HEADER_LEN > self.max_datagram {
            return bad("swim.max_packet_size plus the 12-byte envelope must fit in max_datagram");
        }
        if self.join_retry.is_zero() || self.join_retry_max < self.join_retry {
            return bad("join_retry must be above zero and at most join_retry_max");
        }
        if self.pull_interval.is_zero() || self.sync_interval.is_zero() {
            return bad("pull_interval and sync_interval must be above zero");
        }
        if self.pull_interval_max < self.pull_interval {
            return bad("pull_interval_max must be at least pull_interval");
        }
        if self.max_datagram < 512 {
            return bad("max_datagram must be at least 512 bytes");
        }
        if self.member_cap < 2 || self.max_members < self.member_cap {
            return bad("member_cap must be at least 2 and at most max_members");
        }
        if self.suspicion_max < self.suspicion_min {
            return bad("suspicion_max must be at least suspicion_min");
        }
        if let Some(g) = &self.swim.periodic_gossip
            && self.suspicion_min < g.frequency * 2
        {
            return bad("suspicion_min must be at least twice swim.periodic_gossip's frequency");
        }
        Ok(())
    }

    /// Lifeguard's part of the settings.
    pub(crate) fn lifeguard(&self) -> lifeguard::Params {
        lifeguard::Params {
            min: self.suspicion_min,
            max: self.suspicion_max,
            k: self.suspicion_k,
            max_health: self.max_health,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_each_broken_constraint_is_named() {
        assert_eq!(Config::lan().validate(), Ok(()));
        type Breaks = fn(&mut Config);
        let broken: [(Breaks, &str); 7] = [
            (|c| c.swim.probe_rtt = c.swim.probe_period, "probe_rtt"),
            (|c| c.max_datagram = 1000, "max_packet_size"),
            (
                |c| c.join_retry_max = Duration::from_millis(1),
                "join_retry",
            ),
            (|c| c.pull_interval = Duration::ZERO, "pull_interval"),
            (|c| c.member_cap = c.max_members + 1, "member_cap"),
            (
                |c| c.suspicion_max = Duration::from_millis(10),
                "suspicion_max",
            ),
            (
                |c| c.suspicion_min = Duration::from_millis(150),
                "suspicion_min",
            ),
        ];
        for (breaks, field) in broken {
            let mut c = Config::lan();
            breaks(&mut c);
            let e = c.validate().unwrap_err();
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }
}
