//! The engine: one SWIM membership for one logical cluster, sans I/O.
//!
//! foca runs the failure detector. Around it the engine adds what plain foca lacks:
//! joins that retry every discovered candidate until it is in the view, a push/pull state sync
//! over a stream on join and periodically, a graceful leave sent to every member, and the
//! versioned member list that the oldest member sequences (Hazelcast's model).
//!
//! The engine reads no clock and does no I/O: the driver passes `now` (time since some fixed
//! start) into every call and carries out the [`Output`]s. That lets [`crate::sim`] run many
//! engines in virtual time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

use foca::{Foca, Member, NoCustomBroadcast, OwnedNotification, PeriodicParams, Runtime, Timer};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{RngExt, SeedableRng};
use uuid::Uuid;

use crate::MembershipError;
use crate::id::NodeId;
use crate::list::MemberList;
use crate::wire::{self, Codec, Kind, ListMsg, PullMsg, SyncMsg};

/// Engine settings. [`Config::lan`] gives the tuned defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// The SWIM settings handed to foca.
    pub swim: foca::Config,
    /// The first pause before a candidate that is not in the view is tried again.
    pub join_retry: Duration,
    /// The longest pause between join attempts to one candidate (the pause doubles).
    pub join_retry_max: Duration,
    /// How often a member asks the oldest member for the list it holds.
    pub pull_interval: Duration,
    /// The mean pause between periodic state syncs with a random member.
    pub sync_interval: Duration,
    /// The largest datagram the engine sends; larger messages go over a stream.
    pub max_datagram: usize,
    /// The most members a decoded list or sync may carry.
    pub max_members: usize,
    /// Lifeguard: the suspicion timeout once `suspicion_k` independent confirmations arrived.
    /// Must be at least twice the gossip period so the suspect can hear of it and refute.
    pub suspicion_min: Duration,
    /// Lifeguard: the suspicion timeout with no confirmation; must be at least `suspicion_min`.
    pub suspicion_max: Duration,
    /// Lifeguard: how many independent confirmations shrink the timeout to the minimum
    /// (capped at the number of other members that could confirm).
    pub suspicion_k: usize,
    /// Lifeguard: the highest local health score; timeouts are multiplied by `1 + score`.
    pub max_health: u32,
    /// The shortest pause between two list versions issued by the oldest member; changes in
    /// between are folded into one version.
    pub list_min_interval: Duration,
    /// Candidates contacted per join round; the others wait for the next round.
    pub join_fanout: usize,
}

impl Config {
    /// Defaults for a LAN or a cloud VPC, where round trips are well under 10 ms.
    pub fn lan() -> Self {
        Self {
            swim: foca::Config {
                // One probe every 500 ms: a dead member is probed within about N/2 periods.
                probe_period: Duration::from_millis(500),
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
                suspect_to_down_after: Duration::from_secs(4),
                // Restarts use a new UUID and renewals win the address conflict, so forgetting
                // down members late costs only memory.
                remove_down_after: Some(Duration::from_secs(15 * 60)),
                max_packet_size: NonZeroUsize::new(1400).expect("non-zero"),
                // Off: foca 2.0 sends its "you are down" message even when the suspicion was
                // refuted, which makes live members renew their identity for nothing. The
                // engine tells down members itself, with a state sync (see `tell_if_down`).
                notify_down_members: false,
                periodic_announce: Some(PeriodicParams {
                    frequency: Duration::from_secs(10),
                    num_members: NonZeroUsize::new(1).expect("non-zero"),
                }),
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
            sync_interval: Duration::from_secs(30),
            max_datagram: 1400,
            max_members: 10_000,
            // With K confirmations a dead member is removed 1 s after it was first suspected;
            // a lone suspicion (often one lost packet) gets 4 s to be refuted.
            suspicion_min: Duration::from_millis(1000),
            suspicion_max: Duration::from_secs(4),
            suspicion_k: 3,
            max_health: 8,
            list_min_interval: Duration::from_millis(150),
            join_fanout: 3,
        }
    }
}

/// Something the driver must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A UDP datagram to the peer's gossip address.
    Datagram {
        /// Destination.
        to: SocketAddr,
        /// The whole message.
        data: Vec<u8>,
    },
    /// A message over a stream (TCP) to the peer's gossip address; reliable, any size.
    Stream {
        /// Destination.
        to: SocketAddr,
        /// The whole message.
        data: Vec<u8>,
    },
}

/// Counters kept by the engine, for metrics.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Messages received, by transport.
    pub datagrams_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Messages sent.
    pub datagrams_out: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Messages dropped, by reason.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Members that became active in the local view.
    pub members_up: u64,
    /// Members declared down in the local view (failures and leaves).
    pub members_down: u64,
    /// Leaves received.
    pub leaves: u64,
    /// Times this member renewed its identity after being declared down.
    pub rejoins: u64,
    /// Probes of other members that failed (suspicions this member raised).
    pub suspicions_raised: u64,
    /// Suspicions about this member that it refuted.
    pub suspicions_refuted: u64,
    /// Independent suspicion confirmations received.
    pub confirmations: u64,
    /// The local health score (Lifeguard); 0 is healthy.
    pub health: u32,
    /// Direct probes (ping to ack) answered, by round-trip time: `probe_rtt_buckets[i]` counts
    /// answers within `PROBE_RTT_BOUNDS[i]`; the last entry counts the slower ones.
    pub probe_rtt_buckets: [u64; PROBE_RTT_BOUNDS.len() + 1],
    /// The sum of the round-trip times counted in `probe_rtt_buckets`.
    pub probe_rtt_sum: Duration,
}

/// Upper bounds of the probe round-trip buckets in [`Stats::probe_rtt_buckets`].
pub const PROBE_RTT_BOUNDS: [Duration; 8] = [
    Duration::from_micros(500),
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(100),
    Duration::from_millis(250),
];

impl Stats {
    fn probe_answered(&mut self, rtt: Duration) {
        let i = PROBE_RTT_BOUNDS
            .iter()
            .position(|b| rtt <= *b)
            .unwrap_or(PROBE_RTT_BOUNDS.len());
        self.probe_rtt_buckets[i] += 1;
        self.probe_rtt_sum += rtt;
    }
}

#[derive(Debug, Default)]
struct Rt {
    sends: Vec<(NodeId, Vec<u8>)>,
    timers: Vec<(Duration, Timer<NodeId>)>,
    notes: Vec<OwnedNotification<NodeId>>,
}

impl Runtime<NodeId> for Rt {
    fn notify(&mut self, notification: foca::Notification<'_, NodeId>) {
        self.notes.push(notification.to_owned());
    }

    fn send_to(&mut self, to: NodeId, data: &[u8]) {
        self.sends.push((to, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<NodeId>, after: Duration) {
        self.timers.push((after, event));
    }
}

#[derive(Debug, Clone, Copy)]
struct JoinState {
    next_at: Duration,
    backoff: Duration,
}

/// One member's view of one logical cluster.
pub struct Engine {
    me: NodeId,
    foca: Foca<NodeId, Codec, StdRng, NoCustomBroadcast>,
    rt: Rt,
    timers: BinaryHeap<Reverse<(Duration, u64, Timer<NodeId>)>>,
    timer_seq: u64,
    tag: u64,
    cfg: Config,
    now: Duration,
    list: MemberList,
    max_seen: u64,
    coordinator: Uuid,
    candidates: Vec<SocketAddr>,
    joins: HashMap<SocketAddr, JoinState>,
    /// The earliest moment a candidate outside the view is due for a join attempt.
    next_join: Duration,
    /// Set when the view may have changed, so the list must be recomputed.
    dirty: bool,
    told_down: HashMap<SocketAddr, Duration>,
    next_pull: Duration,
    next_sync: Duration,
    out: Vec<Output>,
    changes: Vec<MemberList>,
    rng: StdRng,
    left: bool,
    stats: Stats,
    probe: Option<(foca::ProbeNumber, NodeId, Duration)>,
    suspicions: HashMap<SocketAddr, Suspicion>,
    health: u32,
    last_issue: Option<Duration>,
    issue_at: Option<Duration>,
}

/// One member under suspicion, with the independent confirmations received.
#[derive(Debug, Clone)]
struct Suspicion {
    id: NodeId,
    incarnation: u16,
    started: Duration,
    confirmers: Vec<Uuid>,
    /// foca's timer event and the deadline it is scheduled for, once foca suspects too.
    timer: Option<(Timer<NodeId>, Duration)>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("me", &self.me)
            .field("list", &self.list)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts an engine for member `me` of the cluster whose messages carry `tag`
    /// (see [`wire::cluster_tag`]). The first list, holding only `me`, is ready in
    /// [`Engine::drain_changes`].
    pub fn new(me: NodeId, tag: u64, cfg: Config, seed: u64, now: Duration) -> Self {
        let foca = Foca::new(me, cfg.swim.clone(), StdRng::seed_from_u64(seed), Codec);
        let list = MemberList {
            ver: 1,
            coordinator: me.uuid,
            members: vec![me],
        };
        let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        let next_sync = now + cfg.sync_interval.mul_f64(rng.random_range(0.5..1.5));
        Self {
            me,
            foca,
            rt: Rt::default(),
            timers: BinaryHeap::new(),
            timer_seq: 0,
            tag,
            now,
            changes: vec![list.clone()],
            list,
            max_seen: 1,
            coordinator: me.uuid,
            candidates: Vec::new(),
            joins: HashMap::new(),
            next_join: now,
            dirty: true,
            told_down: HashMap::new(),
            next_pull: now,
            next_sync,
            out: Vec::new(),
            rng,
            left: false,
            stats: Stats::default(),
            probe: None,
            suspicions: HashMap::new(),
            health: 0,
            last_issue: None,
            issue_at: None,
            cfg,
        }
    }

    /// This member's current identity.
    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// The member list this member holds now.
    pub fn list(&self) -> &MemberList {
        &self.list
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Whether [`Engine::leave`] was called.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// The members the local failure detector considers alive, this one included.
    pub fn alive(&self) -> Vec<NodeId> {
        let mut by_uuid: HashMap<Uuid, NodeId> =
            HashMap::with_capacity(self.foca.num_members() + 1);
        by_uuid.insert(self.me.uuid, self.me);
        for m in self.foca.iter_members() {
            let id = *m.id();
            by_uuid
                .entry(id.uuid)
                .and_modify(|prev| {
                    if id.generation > prev.generation && id.uuid != self.me.uuid {
                        *prev = id;
                    }
                })
                .or_insert(id);
        }
        by_uuid.into_values().collect()
    }

    /// Replaces the discovered candidates: gossip addresses of peers to join.
    pub fn set_candidates(&mut self, candidates: Vec<SocketAddr>, now: Duration) {
        self.now = self.now.max(now);
        self.joins.retain(|a, _| candidates.contains(a));
        self.candidates = candidates;
        self.candidates.retain(|a| *a != self.me.addr);
        self.next_join = self.now;
    }

    /// Takes the messages to send.
    pub fn drain_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    /// Takes the member lists adopted since the last call, oldest first.
    pub fn drain_changes(&mut self) -> Vec<MemberList> {
        std::mem::take(&mut self.changes)
    }

    /// The next moment [`Engine::tick`] has work to do.
    pub fn next_deadline(&self) -> Duration {
        let mut d = self.next_sync;
        if let Some(Reverse((t, _, _))) = self.timers.peek() {
            d = d.min(*t);
        }
        if self.left {
            return d;
        }
        if let Some(t) = self.issue_at {
            d = d.min(t);
        }
        if self.coordinator != self.me.uuid {
            d = d.min(self.next_pull);
        }
        d.min(self.next_join).max(self.now)
    }

    /// Handles a datagram from `from`.
    pub fn handle_datagram(&mut self, from: SocketAddr, data: &[u8], now: Duration) {
        self.handle(from, data, now, false);
    }

    /// Handles a message that arrived over a stream.
    pub fn handle_stream(&mut self, from: SocketAddr, data: &[u8], now: Duration) {
        self.handle(from, data, now, true);
    }

    fn handle(&mut self, from: SocketAddr, data: &[u8], now: Duration, stream: bool) {
        self.now = self.now.max(now);
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += data.len() as u64;
        if self.left {
            return;
        }
        if !stream && data.len() > self.cfg.max_datagram {
            self.reject("oversized");
            return;
        }
        if let Err(e) = self.dispatch(from, data) {
            self.reject(e.reason());
            tracing::debug!(%from, "dropped a message: {e}");
        }
        self.flush();
    }

    fn dispatch(&mut self, _from: SocketAddr, data: &[u8]) -> Result<(), MembershipError> {
        let (kind, p) = wire::split_header(data, self.tag)?;
        match kind {
            Kind::Foca => {
                self.tell_if_down(p);
                self.foca
                    .handle_data(p, &mut self.rt)
                    .map_err(|e| MembershipError::Swim(e.to_string()))
            }
            Kind::List => {
                let msg = wire::decode_list(p, self.cfg.max_members)?;
                self.on_list(msg);
                Ok(())
            }
            Kind::Pull => {
                let msg = wire::decode_pull(p)?;
                self.on_pull(msg);
                Ok(())
            }
            Kind::SyncRequest | Kind::SyncResponse => {
                let msg = wire::decode_sync(p, self.cfg.max_members)?;
                let from = msg.from;
                self.apply_sync(msg)?;
                if kind == Kind::SyncRequest {
                    let reply = self.sync_msg();
                    self.push_out(Output::Stream {
                        to: from.addr,
                        data: wire::encode_sync(self.tag, Kind::SyncResponse, &reply),
                    });
                }
                Ok(())
            }
            Kind::Suspect => {
                let msg = wire::decode_suspect(p)?;
                self.on_suspect(msg);
                Ok(())
            }
            Kind::Leave => {
                let id = wire::decode_leave(p)?;
                self.stats.leaves += 1;
                self.foca
                    .apply_many(std::iter::once(Member::down(id)), true, &mut self.rt)
                    .map_err(|e| MembershipError::Swim(e.to_string()))
            }
        }
    }

    /// A member that talks while this one holds it as down was removed falsely, or came back
    /// from a partition. A state sync tells it, so it renews its identity and rejoins; at most
    /// one per second per address.
    fn tell_if_down(&mut self, p: &[u8]) {
        let Some((h, updates)) = wire::peek_foca(p) else {
            return;
        };
        if updates
            .iter()
            .any(|m| m.id() == &self.me && m.state() == foca::State::Suspect)
        {
            // The cluster suspects us: foca refutes; Lifeguard makes us slower to judge others.
            self.bump_health();
        }
        let down = self
            .foca
            .iter_membership_state()
            .any(|m| m.id() == &h.src && m.state() == foca::State::Down);
        if !down {
            return;
        }
        let now = self.now;
        let last = self.told_down.get(&h.src.addr).copied();
        if last.is_some_and(|t| now < t + Duration::from_secs(1)) {
            return;
        }
        if self.told_down.len() > 4096 {
            self.told_down.clear();
        }
        self.told_down.insert(h.src.addr, now);
        self.send_sync(h.src.addr);
    }

    fn bump_health(&mut self) {
        self.stats.suspicions_refuted += 1;
        self.health = (self.health + 1).min(self.cfg.max_health);
        self.stats.health = self.health;
    }

    /// Lifeguard's suspicion timeout for `confirmations` independent confirmations, scaled by
    /// the local health multiplier.
    fn suspicion_timeout(&self, confirmations: usize) -> Duration {
        let others = self.foca.num_members();
        let k = self.cfg.suspicion_k.min(others.saturating_sub(1));
        let mult = 1 + self.health;
        let min = self.cfg.suspicion_min * mult;
        let max = self.cfg.suspicion_max.max(self.cfg.suspicion_min) * mult;
        if k == 0 {
            return min;
        }
        let frac = ((confirmations as f64 + 1.0).ln() / (k as f64 + 1.0).ln()).clamp(0.0, 1.0);
        max.saturating_sub((max - min).mul_f64(frac)).max(min)
    }

    /// Another member's probe of `target` failed.
    fn on_suspect(&mut self, msg: wire::SuspectMsg) {
        if msg.target.uuid == self.me.uuid {
            if msg.target == self.me {
                // Refute at once rather than waiting for the gossip to reach us.
                self.bump_health();
                let me = Member::new(self.me, msg.incarnation, foca::State::Suspect);
                if let Err(e) = self
                    .foca
                    .apply_many(std::iter::once(me), true, &mut self.rt)
                {
                    tracing::debug!("refute: {e}");
                }
            }
            return;
        }
        if msg.from.uuid == self.me.uuid || self.suspicions.len() >= 4096 {
            return;
        }
        self.stats.confirmations += 1;
        let now = self.now;
        let s = self
            .suspicions
            .entry(msg.target.addr)
            .or_insert_with(|| Suspicion {
                id: msg.target,
                incarnation: msg.incarnation,
                started: now,
                confirmers: Vec::new(),
                timer: None,
            });
        if s.id != msg.target || s.incarnation != msg.incarnation {
            if s.incarnation > msg.incarnation && s.id == msg.target {
                return;
            }
            *s = Suspicion {
                id: msg.target,
                incarnation: msg.incarnation,
                started: now,
                confirmers: Vec::new(),
                timer: None,
            };
        }
        if !s.confirmers.contains(&msg.from.uuid) && s.confirmers.len() < 16 {
            s.confirmers.push(msg.from.uuid);
        }
        // Suspect too, so the timer (and its shrinking) starts here as well.
        let update = Member::new(msg.target, msg.incarnation, foca::State::Suspect);
        if let Err(e) = self
            .foca
            .apply_many(std::iter::once(update), true, &mut self.rt)
        {
            tracing::debug!("suspect: {e}");
        }
        self.reschedule_suspicion(msg.target.addr);
    }

    /// Moves a suspicion timer earlier when confirmations shortened its timeout. The later
    /// copy still fires, harmlessly: foca ignores a timer for a member already down.
    fn reschedule_suspicion(&mut self, addr: SocketAddr) {
        let Some(s) = self.suspicions.get(&addr) else {
            return;
        };
        let Some((ev, deadline)) = s.timer.clone() else {
            return;
        };
        let due = (s.started + self.suspicion_timeout(s.confirmers.len())).max(self.now);
        if due < deadline {
            self.timer_seq += 1;
            self.timers.push(Reverse((due, self.timer_seq, ev.clone())));
            if let Some(s) = self.suspicions.get_mut(&addr) {
                s.timer = Some((ev, due));
            }
        }
    }

    /// Schedules one timer from foca, giving suspicions Lifeguard's timeout.
    fn schedule(&mut self, after: Duration, ev: Timer<NodeId>) {
        let mut deadline = self.now + after;
        if let Timer::ChangeSuspectToDown {
            member_id,
            incarnation,
            ..
        } = &ev
        {
            let now = self.now;
            let fresh = Suspicion {
                id: *member_id,
                incarnation: *incarnation,
                started: now,
                confirmers: Vec::new(),
                timer: None,
            };
            let s = self
                .suspicions
                .entry(member_id.addr)
                .or_insert(fresh.clone());
            if s.id != *member_id || s.incarnation != *incarnation {
                *s = fresh;
            }
            let (started, n) = (s.started, s.confirmers.len());
            deadline = (started + self.suspicion_timeout(n)).max(now);
            if let Some(s) = self.suspicions.get_mut(&member_id.addr) {
                s.timer = Some((ev.clone(), deadline));
            }
        }
        self.timer_seq += 1;
        self.timers.push(Reverse((deadline, self.timer_seq, ev)));
    }

    /// Tells a few members that our probe of `target` failed (Lifeguard's independent
    /// suspicion), and the target itself, so that it can refute at once.
    fn announce_suspicion(&mut self, target: NodeId, incarnation: u16) {
        self.stats.suspicions_raised += 1;
        let msg = wire::SuspectMsg {
            from: self.me,
            target,
            incarnation,
        };
        let data = wire::encode_suspect(self.tag, &msg);
        let mut others: Vec<SocketAddr> = self
            .foca
            .iter_members()
            .map(|m| m.id().addr)
            .filter(|a| *a != target.addr)
            .collect();
        let n = others.len().min(4);
        let (chosen, _) = others.partial_shuffle(&mut self.rng, n);
        let mut to: Vec<SocketAddr> = chosen.to_vec();
        to.push(target.addr);
        for addr in to {
            self.push_out(Output::Datagram {
                to: addr,
                data: data.clone(),
            });
        }
    }

    fn apply_sync(&mut self, msg: SyncMsg) -> Result<(), MembershipError> {
        if msg.from.uuid == self.me.uuid {
            return Err(MembershipError::Decode("sync from ourselves"));
        }
        let updates = msg
            .members
            .into_iter()
            .filter(|m| !m.id().uuid.is_nil())
            .chain(std::iter::once(Member::alive(msg.from)));
        self.foca
            .apply_many(updates, true, &mut self.rt)
            .map_err(|e| MembershipError::Swim(e.to_string()))
    }

    fn sync_msg(&self) -> SyncMsg {
        SyncMsg {
            from: self.me,
            members: self.foca.iter_membership_state().cloned().collect(),
        }
    }

    fn on_list(&mut self, msg: ListMsg) {
        if msg.ver > self.max_seen {
            self.max_seen = msg.ver;
            self.dirty = true;
        }
        if msg.coordinator == self.coordinator
            && msg.coordinator != self.me.uuid
            && msg.ver > self.list.ver
            && msg.members.iter().any(|m| m.uuid == self.me.uuid)
        {
            self.list = MemberList {
                ver: msg.ver,
                coordinator: msg.coordinator,
                members: msg.members,
            };
            self.changes.push(self.list.clone());
        }
    }

    fn on_pull(&mut self, msg: PullMsg) {
        self.max_seen = self.max_seen.max(msg.have_ver);
        if msg.have_coordinator != self.me.uuid && msg.have_ver >= self.list.ver {
            // The puller holds another coordinator's list at our version or above (two
            // coordinators issued at once); it adopts only a higher version, so issue one.
            self.max_seen = self.max_seen.max(msg.have_ver.saturating_add(1));
        }
        self.reconcile();
        if self.coordinator == self.me.uuid
            && (msg.have_ver < self.list.ver || msg.have_coordinator != self.me.uuid)
        {
            self.send_list(msg.from.addr);
        }
    }

    /// Does the periodic work due at `now`: timers, joins, pulls and syncs.
    pub fn tick(&mut self, now: Duration) {
        self.now = self.now.max(now);
        while let Some(Reverse((t, _, _))) = self.timers.peek() {
            if *t > self.now {
                break;
            }
            let Some(Reverse((_, _, ev))) = self.timers.pop() else {
                break;
            };
            if let Err(e) = self.foca.handle_timer(ev, &mut self.rt) {
                tracing::debug!("timer: {e}");
            }
        }
        if self.issue_at.is_some_and(|t| self.now >= t) {
            self.issue_at = None;
            self.reconcile();
        }
        let horizon = self.cfg.suspicion_max * (2 + self.cfg.max_health);
        let now = self.now;
        self.suspicions.retain(|_, s| now < s.started + horizon);
        if !self.left {
            self.join_candidates();
            if self.coordinator != self.me.uuid && self.now >= self.next_pull {
                self.next_pull = self.now + self.cfg.pull_interval;
                if let Some(c) = self
                    .alive()
                    .into_iter()
                    .find(|m| m.uuid == self.coordinator)
                {
                    let pull = PullMsg {
                        from: self.me,
                        have_ver: self.list.ver,
                        have_coordinator: self.list.coordinator,
                    };
                    self.push_out(Output::Datagram {
                        to: c.addr,
                        data: wire::encode_pull(self.tag, &pull),
                    });
                }
            }
        }
        if self.now >= self.next_sync {
            // A sync carries the whole state, so larger clusters sync less often
            // (memberlist's push/pull scaling): x1 up to 32 members, then +1 per doubling.
            let n = (self.foca.num_members() + 1) as f64;
            let scale = 1.0 + (n / 32.0).log2().max(0.0);
            self.next_sync = self.now
                + self
                    .cfg
                    .sync_interval
                    .mul_f64(scale * self.rng.random_range(0.5..1.5));
            if !self.left {
                let others: Vec<NodeId> = self
                    .alive()
                    .into_iter()
                    .filter(|m| m.uuid != self.me.uuid)
                    .collect();
                if let Some(peer) = others.choose(&mut self.rng) {
                    let to = peer.addr;
                    self.send_sync(to);
                }
            }
        }
        self.flush();
    }

    fn alive_addrs(&self) -> HashSet<SocketAddr> {
        self.foca.iter_members().map(|m| m.id().addr).collect()
    }

    fn join_candidates(&mut self) {
        let alive = self.alive_addrs();
        let now = self.now;
        let mut due = Vec::new();
        for c in &self.candidates {
            if alive.contains(c) {
                self.joins.remove(c);
                continue;
            }
            let st = self.joins.entry(*c).or_insert(JoinState {
                next_at: now,
                backoff: self.cfg.join_retry,
            });
            if now >= st.next_at {
                due.push(*c);
            }
        }
        // A few per round: a simultaneous start of hundreds must not be N² syncs. The rest wait
        // for the next round, by which time the syncs have usually brought them into the view.
        let n = due.len().min(self.cfg.join_fanout.max(1));
        let (chosen, rest) = due.partial_shuffle(&mut self.rng, n);
        for c in rest.iter() {
            if let Some(st) = self.joins.get_mut(c) {
                st.next_at = now + self.cfg.join_retry.mul_f64(self.rng.random_range(0.5..1.0));
            }
        }
        let due: Vec<SocketAddr> = chosen.to_vec();
        for c in &due {
            if let Some(st) = self.joins.get_mut(c) {
                let pause = st.backoff.mul_f64(self.rng.random_range(0.75..1.25));
                st.next_at = now + pause;
                st.backoff = (st.backoff * 2).min(self.cfg.join_retry_max);
            }
        }
        // Joins only wake the engine while some candidate is outside the view; syncs and
        // timers wake it anyway, and `set_candidates` resets this.
        self.next_join = self
            .candidates
            .iter()
            .filter(|c| !alive.contains(*c))
            .filter_map(|c| self.joins.get(c).map(|j| j.next_at))
            .min()
            .unwrap_or(Duration::MAX)
            .max(now + Duration::from_millis(1));
        for c in due {
            if let Err(e) = self.foca.announce(NodeId::unknown_at(c), &mut self.rt) {
                tracing::debug!("announce to {c}: {e}");
            }
            self.send_sync(c);
        }
    }

    fn send_sync(&mut self, to: SocketAddr) {
        let msg = self.sync_msg();
        self.push_out(Output::Stream {
            to,
            data: wire::encode_sync(self.tag, Kind::SyncRequest, &msg),
        });
    }

    /// Leaves the cluster: every member is told directly, and the engine goes quiet.
    pub fn leave(&mut self, now: Duration) {
        self.now = self.now.max(now);
        if self.left {
            return;
        }
        let others: Vec<NodeId> = self
            .alive()
            .into_iter()
            .filter(|m| m.uuid != self.me.uuid)
            .collect();
        if let Err(e) = self.foca.leave_cluster(&mut self.rt) {
            tracing::debug!("leave: {e}");
        }
        let data = wire::encode_leave(self.tag, &self.me);
        for m in others {
            self.push_out(Output::Datagram {
                to: m.addr,
                data: data.clone(),
            });
        }
        self.left = true;
        self.flush();
    }

    fn reject(&mut self, reason: &'static str) {
        *self.stats.rejected.entry(reason).or_default() += 1;
    }

    fn push_out(&mut self, o: Output) {
        let len = match &o {
            Output::Datagram { data, .. } | Output::Stream { data, .. } => data.len(),
        };
        self.stats.datagrams_out += 1;
        self.stats.bytes_out += len as u64;
        self.out.push(o);
    }

    fn send_list(&mut self, to: SocketAddr) {
        let data = wire::encode_list(
            self.tag,
            &ListMsg {
                ver: self.list.ver,
                coordinator: self.list.coordinator,
                members: self.list.members.clone(),
            },
        );
        if data.len() <= self.cfg.max_datagram {
            self.push_out(Output::Datagram { to, data });
        } else {
            self.push_out(Output::Stream { to, data });
        }
    }

    /// Carries out what foca asked for, then brings the member list up to date.
    fn flush(&mut self) {
        let rt = std::mem::take(&mut self.rt);
        for (to, data) in rt.sends {
            let mut buf = Vec::with_capacity(wire::HEADER_LEN + data.len());
            wire::put_header(&mut buf, Kind::Foca, self.tag);
            buf.extend_from_slice(&data);
            self.push_out(Output::Datagram {
                to: to.addr,
                data: buf,
            });
        }
        let mut failed_probes = Vec::new();
        for note in &rt.notes {
            if let OwnedNotification::ProbeFailed(_, id) = note {
                failed_probes.push(*id);
            }
        }
        for id in failed_probes {
            let inc = rt.timers.iter().find_map(|(_, ev)| match ev {
                Timer::ChangeSuspectToDown {
                    member_id,
                    incarnation,
                    ..
                } if *member_id == id => Some(*incarnation),
                _ => None,
            });
            if let Some(inc) = inc {
                self.announce_suspicion(id, inc);
            }
        }
        for (after, ev) in rt.timers {
            self.schedule(after, ev);
        }
        for note in rt.notes {
            if matches!(
                note,
                OwnedNotification::MemberUp(_)
                    | OwnedNotification::MemberDown(_)
                    | OwnedNotification::Rename(..)
                    | OwnedNotification::Rejoin(_)
                    | OwnedNotification::Idle
                    | OwnedNotification::Active
            ) {
                self.dirty = true;
            }
            match note {
                OwnedNotification::DataReceived(h) => {
                    if let (foca::Message::Ack(n), Some((p, to, at))) = (&h.message, self.probe)
                        && *n == p
                        && h.src == to
                    {
                        self.probe = None;
                        self.stats.probe_answered(self.now.saturating_sub(at));
                    }
                    if matches!(
                        h.message,
                        foca::Message::Ack(_) | foca::Message::ForwardedAck { .. }
                    ) && self.health > 0
                    {
                        // A probe answered: Lifeguard heals the score one step.
                        self.health -= 1;
                        self.stats.health = self.health;
                    }
                }
                OwnedNotification::MemberDown(id) => {
                    self.stats.members_down += 1;
                    self.suspicions.remove(&id.addr);
                }
                OwnedNotification::MemberUp(_) => self.stats.members_up += 1,
                OwnedNotification::Rejoin(id) => {
                    self.stats.rejoins += 1;
                    tracing::info!(
                        generation = id.generation,
                        "this member was declared down; rejoining with a renewed identity"
                    );
                    self.me = id;
                }
                OwnedNotification::Idle => {
                    // Alone again: try every candidate right away.
                    self.joins.clear();
                    self.next_join = self.now;
                }
                OwnedNotification::DataSent(h) => {
                    if let foca::Message::Ping(n) = h.message {
                        self.probe = Some((n, h.dst, self.now));
                    }
                }
                _ => {}
            }
        }
        if !self.left && std::mem::take(&mut self.dirty) {
            self.reconcile();
        }
    }

    /// The oldest member issues a new list version whenever its view changes; the others
    /// only note who the oldest member is, and pull from it soon when that changes.
    fn reconcile(&mut self) {
        let mut alive = self.alive();
        alive.sort_by(NodeId::cmp_age);
        let coordinator = alive[0];
        if coordinator.uuid != self.coordinator {
            self.coordinator = coordinator.uuid;
            self.next_pull = self.now;
        }
        if coordinator.uuid != self.me.uuid {
            return;
        }
        if self.list.coordinator == self.me.uuid
            && self.list.same_members(&alive)
            && self.max_seen <= self.list.ver
        {
            self.issue_at = None;
            return;
        }
        if let Some(last) = self.last_issue
            && self.now < last + self.cfg.list_min_interval
        {
            // Fold bursts of changes into one version.
            self.issue_at = Some(last + self.cfg.list_min_interval);
            return;
        }
        self.last_issue = Some(self.now);
        self.issue_at = None;
        // Saturating: a peer can claim any version, and wrapping to 0 would break "ver only grows".
        let ver = self.list.ver.max(self.max_seen).saturating_add(1);
        self.max_seen = ver;
        self.list = MemberList {
            ver,
            coordinator: self.me.uuid,
            members: alive,
        };
        self.changes.push(self.list.clone());
        let targets: Vec<SocketAddr> = self
            .list
            .members
            .iter()
            .filter(|m| m.uuid != self.me.uuid)
            .map(|m| m.addr)
            .collect();
        for to in targets {
            self.send_list(to);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Role;

    #[test]
    fn a_member_holding_another_coordinators_list_at_our_version_gets_a_higher_one() {
        let a = NodeId::new(
            "10.0.0.1:10081".parse().unwrap(),
            Uuid::from_u128(1),
            1,
            Role::Worker,
        );
        let b = NodeId::new(
            "10.0.0.2:10081".parse().unwrap(),
            Uuid::from_u128(2),
            2,
            Role::Worker,
        );
        let mut e = Engine::new(a, 7, Config::lan(), 1, Duration::ZERO);
        // Alone, `a` is its own coordinator; it has issued ver 2 while `b`, coordinating a
        // different view at the same moment, also issued a ver 2.
        e.list.ver = 2;
        e.max_seen = 2;
        e.coordinator = a.uuid;
        e.on_pull(PullMsg {
            from: b,
            have_ver: 2,
            have_coordinator: b.uuid,
        });
        assert!(
            e.list.ver > 2,
            "ver stayed {}: b would never adopt it",
            e.list.ver
        );
        assert_eq!(e.list.coordinator, a.uuid);
        // A member that already holds our list at our version causes no new version.
        let ver = e.list.ver;
        e.now += Duration::from_secs(1);
        e.on_pull(PullMsg {
            from: b,
            have_ver: ver,
            have_coordinator: a.uuid,
        });
        assert_eq!(e.list.ver, ver);
    }
}
