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
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

use foca::{Foca, Member, NoCustomBroadcast, OwnedNotification, PeriodicParams, Runtime, Timer};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
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
                // Long enough that a suspect hears of it through periodic gossip (every 100 ms
                // to 3 members) and refutes, even at 10% loss.
                suspect_to_down_after: Duration::from_millis(1500),
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
            sync_interval: Duration::from_secs(20),
            max_datagram: 1400,
            max_members: 10_000,
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
    /// Members this node's view moved from alive to suspect.
    pub suspicions_raised: u64,
    /// Suspects this node's view saw alive again (the member refuted the suspicion).
    pub suspicions_refuted: u64,
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
    told_down: HashMap<SocketAddr, Duration>,
    next_pull: Duration,
    next_sync: Duration,
    out: Vec<Output>,
    changes: Vec<MemberList>,
    rng: StdRng,
    left: bool,
    stats: Stats,
    suspects: Vec<NodeId>,
    probe: Option<(foca::ProbeNumber, NodeId, Duration)>,
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
            told_down: HashMap::new(),
            next_pull: now,
            next_sync,
            out: Vec::new(),
            rng,
            left: false,
            stats: Stats::default(),
            suspects: Vec::new(),
            probe: None,
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
        let mut v: Vec<NodeId> = Vec::with_capacity(self.foca.num_members() + 1);
        v.push(self.me);
        for m in self.foca.iter_members() {
            let id = *m.id();
            if let Some(prev) = v.iter_mut().find(|p| p.uuid == id.uuid) {
                if id.generation > prev.generation && id.uuid != self.me.uuid {
                    *prev = id;
                }
            } else {
                v.push(id);
            }
        }
        v
    }

    /// Replaces the discovered candidates: gossip addresses of peers to join.
    pub fn set_candidates(&mut self, candidates: Vec<SocketAddr>, now: Duration) {
        self.now = self.now.max(now);
        self.joins.retain(|a, _| candidates.contains(a));
        self.candidates = candidates;
        self.candidates.retain(|a| *a != self.me.addr);
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
        if self.coordinator != self.me.uuid {
            d = d.min(self.next_pull);
        }
        let alive = self.alive_addrs();
        for c in &self.candidates {
            if !alive.contains(c) {
                d = d.min(self.joins.get(c).map_or(self.now, |j| j.next_at));
            }
        }
        d.max(self.now)
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
        use foca::Codec as _;
        let Ok(h) = Codec.decode_header(p) else {
            return;
        };
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
        self.max_seen = self.max_seen.max(msg.ver);
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
            self.next_sync = self.now
                + self
                    .cfg
                    .sync_interval
                    .mul_f64(self.rng.random_range(0.5..1.5));
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

    fn alive_addrs(&self) -> Vec<SocketAddr> {
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
                let pause = st.backoff.mul_f64(self.rng.random_range(0.75..1.25));
                st.next_at = now + pause;
                st.backoff = (st.backoff * 2).min(self.cfg.join_retry_max);
                due.push(*c);
            }
        }
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
        for (after, ev) in rt.timers {
            self.timer_seq += 1;
            self.timers
                .push(Reverse((self.now + after, self.timer_seq, ev)));
        }
        for note in rt.notes {
            match note {
                OwnedNotification::MemberUp(_) => self.stats.members_up += 1,
                OwnedNotification::MemberDown(_) => self.stats.members_down += 1,
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
                }
                OwnedNotification::DataSent(h) => {
                    if let foca::Message::Ping(n) = h.message {
                        self.probe = Some((n, h.dst, self.now));
                    }
                }
                OwnedNotification::DataReceived(h) => {
                    if let (foca::Message::Ack(n), Some((p, to, at))) = (h.message, self.probe)
                        && n == p
                        && h.src == to
                    {
                        self.probe = None;
                        self.stats.probe_answered(self.now.saturating_sub(at));
                    }
                }
                _ => {}
            }
        }
        self.count_suspicions();
        if !self.left {
            self.reconcile();
        }
    }

    /// foca reports no suspicions, so the engine compares the suspects in its view with the
    /// last ones it saw: a new suspect is a suspicion raised, a former suspect seen alive is a
    /// suspicion refuted. A suspicion that starts and ends between two calls is not seen.
    fn count_suspicions(&mut self) {
        let mut now_suspect = Vec::new();
        let mut refuted = 0;
        for m in self.foca.iter_membership_state() {
            match m.state() {
                foca::State::Suspect => now_suspect.push(*m.id()),
                foca::State::Alive if self.suspects.contains(m.id()) => refuted += 1,
                _ => {}
            }
        }
        let raised = now_suspect
            .iter()
            .filter(|id| !self.suspects.contains(id))
            .count();
        self.stats.suspicions_raised += raised as u64;
        self.stats.suspicions_refuted += refuted;
        self.suspects = now_suspect;
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
            return;
        }
        let ver = self.list.ver.max(self.max_seen) + 1;
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
