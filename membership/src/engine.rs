//! The engine: one SWIM membership for one logical cluster, sans I/O.
//!
//! foca runs the failure detector. Around it the engine adds what plain foca lacks:
//! joins that retry every discovered candidate until it is in the view, a push/pull state sync
//! over a stream on join and periodically, a graceful leave sent to every member, and the
//! versioned member list that the oldest member sequences (Hazelcast's model). Every message
//! is checked against where it came from, and what peers claim about others is screened
//! before foca believes it, so one lying or forged packet cannot freeze lists, remove a live
//! member or make this member an amplifier.
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
use crate::list::{self, MemberList};
use crate::wire::{self, Codec, Kind, ListMsg, PullMsg, SyncMsg};

/// Lists in a row from the current coordinator, older than the one held, after which the
/// member adopts the coordinator's list anyway: the held one was then never issued by it.
const STALE_LISTS_TO_ADOPT: u32 = 3;

/// Where member updates come from, for [`Engine::screen`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Piggybacked on a foca datagram.
    Gossip,
    /// A state sync over a stream.
    Sync,
}

/// Whether a message naming `claimed` as its sender may have come from `from`. A datagram's
/// source must be the address itself. A stream's source port is ephemeral, so only its IP is
/// compared; the TCP handshake proves that IP, and any two loopback addresses are on the same
/// host, where a process can bind either.
fn same_source(claimed: SocketAddr, from: SocketAddr, stream: bool) -> bool {
    if !stream {
        return claimed == from;
    }
    let (a, b) = (claimed.ip().to_canonical(), from.ip().to_canonical());
    a == b || (a.is_loopback() && b.is_loopback())
}

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
    /// The most members, this one included, the view admits; syncs and gossip naming more add
    /// none. Down members count too, up to twice this, until foca forgets them
    /// (`swim.remove_down_after`).
    pub member_cap: usize,
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
            member_cap: 1024,
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
    /// The oldest eligible member (see [`Engine::eligible`]): the only one whose lists count.
    coordinator: Uuid,
    /// Members heard from directly: an accepted message whose sender identity is the member and
    /// whose source is its address. Only these coordinate or appear in issued lists.
    heard: HashMap<SocketAddr, Uuid>,
    /// Lists in a row from the current coordinator that were older than the one held.
    stale_lists: u32,
    /// The oldest alive member when it is older than the coordinator but not heard from yet;
    /// it is pulled too, so that it hears from this member.
    pull_unheard: Option<SocketAddr>,
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
    /// foca's current timer token, from the timers it submits, for the suspicion timers the
    /// engine starts itself (see [`Engine::arm_suspicion`]).
    foca_token: Option<foca::TimerToken>,
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
    /// Whether a member relayed a `Down` about it: that member ran its own timer to the end.
    relayed: bool,
    /// foca's timer event and the deadline it is scheduled for, once foca suspects too.
    timer: Option<(Timer<NodeId>, Duration)>,
}

impl Suspicion {
    /// The confirmations that shorten its timeout: a relayed `Down` counts as all of them.
    fn weight(&self) -> usize {
        if self.relayed {
            usize::MAX
        } else {
            self.confirmers.len()
        }
    }
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
            coordinator: me.uuid,
            heard: HashMap::new(),
            stale_lists: 0,
            pull_unheard: None,
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
            foca_token: None,
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
        if self.coordinator != self.me.uuid || self.pull_unheard.is_some() {
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
        // A datagram's source address can be forged: what a stranger makes us send back to it
        // is limited below. A stream's source passed a TCP handshake.
        let stranger = !stream && !self.in_state(from);
        let mark = self.out.len();
        if let Err(e) = self.dispatch(from, data, stream) {
            self.reject(e.reason());
            tracing::debug!(%from, "dropped a message: {e}");
        }
        self.flush();
        if stranger {
            self.limit_replies(from, data.len(), mark);
        }
    }

    /// Whether foca holds a member (alive, suspect or down) at `addr`.
    fn in_state(&self, addr: SocketAddr) -> bool {
        self.foca
            .iter_membership_state()
            .any(|m| m.id().addr == addr)
    }

    /// Whether `id` is an active member of the view, exactly (generation included).
    fn is_active(&self, id: &NodeId) -> bool {
        self.foca.iter_members().any(|m| m.id() == id)
    }

    /// The address of the active member with this UUID (its latest generation).
    fn member_addr(&self, uuid: Uuid) -> Option<SocketAddr> {
        self.foca
            .iter_members()
            .filter(|m| m.id().uuid == uuid)
            .max_by_key(|m| m.id().generation)
            .map(|m| m.id().addr)
    }

    /// Whether `n` more members fit under [`Config::member_cap`].
    fn room_for(&self, n: usize) -> bool {
        let active = self.foca.num_members() + 1;
        let total = self.foca.iter_membership_state().len() + 1;
        active + n <= self.cfg.member_cap && total + n <= self.cfg.member_cap.saturating_mul(2)
    }

    /// Whether `id`'s UUID belongs to this member or a live member at another address. A UUID
    /// is one process, whose address never changes: such an identity is a clone, which could
    /// otherwise stand in for the coordinator.
    fn uuid_elsewhere(&self, id: &NodeId) -> bool {
        (id.uuid == self.me.uuid && id.addr != self.me.addr)
            || self
                .foca
                .iter_members()
                .any(|m| m.id().uuid == id.uuid && m.id().addr != id.addr)
    }

    /// Drops what handling a stranger's datagram would send back to its source beyond the
    /// datagram's own size, so a forged source address cannot make this member an amplifier.
    /// Joins do not need more: a joiner also sends a state sync over a stream.
    fn limit_replies(&mut self, to: SocketAddr, budget: usize, mark: usize) {
        let mut spent = 0usize;
        let mut over = false;
        for o in self.out.split_off(mark) {
            let (dst, len) = match &o {
                Output::Datagram { to, data } | Output::Stream { to, data } => (*to, data.len()),
            };
            if dst == to {
                over = over || spent + len > budget;
                if over {
                    self.stats.datagrams_out = self.stats.datagrams_out.saturating_sub(1);
                    self.stats.bytes_out = self.stats.bytes_out.saturating_sub(len as u64);
                    self.reject("amplification");
                    continue;
                }
                spent += len;
            }
            self.out.push(o);
        }
    }

    /// Notes that the member `uuid` at `addr` spoke for itself from its own address.
    fn note_heard(&mut self, addr: SocketAddr, uuid: Uuid) {
        if self.heard.get(&addr) == Some(&uuid) {
            return;
        }
        let member = self
            .foca
            .iter_members()
            .any(|m| m.id().addr == addr && m.id().uuid == uuid);
        if member {
            self.heard.insert(addr, uuid);
            self.dirty = true;
        }
    }

    fn dispatch(
        &mut self,
        from: SocketAddr,
        data: &[u8],
        stream: bool,
    ) -> Result<(), MembershipError> {
        let (kind, p) = wire::split_header(data, self.tag)?;
        match kind {
            // A sync can be large and names a reply address: only a stream, whose source IP
            // the handshake proved, may carry one.
            Kind::SyncRequest | Kind::SyncResponse if !stream => {
                Err(MembershipError::Refused("sync_over_datagram"))
            }
            Kind::Foca | Kind::Pull | Kind::Leave | Kind::Suspect if stream => {
                Err(MembershipError::Refused("datagram_over_stream"))
            }
            Kind::Foca => self.on_foca(from, p),
            Kind::List => {
                let msg = wire::decode_list(p, self.cfg.max_members)?;
                let at = self
                    .member_addr(msg.coordinator)
                    .ok_or(MembershipError::Refused("unknown_sender"))?;
                if !same_source(at, from, stream) {
                    return Err(MembershipError::Refused("spoofed_source"));
                }
                self.note_heard(at, msg.coordinator);
                self.on_list(msg);
                Ok(())
            }
            Kind::Pull => {
                let msg = wire::decode_pull(p)?;
                if msg.from.addr != from || msg.from.uuid.is_nil() {
                    return Err(MembershipError::Refused("spoofed_source"));
                }
                if self.uuid_elsewhere(&msg.from) {
                    return Err(MembershipError::Refused("uuid_conflict"));
                }
                if !self.in_state(from) && from != self.me.addr && self.room_for(1) {
                    // A puller speaks from its own address, as a foca sender does: it joins the
                    // view at once, so the coordinator lists it without waiting for gossip.
                    self.foca
                        .apply_many(std::iter::once(Member::alive(msg.from)), true, &mut self.rt)
                        .map_err(|e| MembershipError::Swim(e.to_string()))?;
                }
                self.note_heard(from, msg.from.uuid);
                self.on_pull(from, &msg);
                Ok(())
            }
            Kind::SyncRequest | Kind::SyncResponse => {
                let msg = wire::decode_sync(p, self.cfg.max_members)?;
                if !same_source(msg.from.addr, from, true) {
                    return Err(MembershipError::Refused("spoofed_source"));
                }
                let to = msg.from.addr;
                self.apply_sync(msg)?;
                if kind == Kind::SyncRequest {
                    let reply = self.sync_msg();
                    self.push_out(Output::Stream {
                        to,
                        data: wire::encode_sync(self.tag, Kind::SyncResponse, &reply),
                    });
                }
                Ok(())
            }
            Kind::Suspect => {
                let msg = wire::decode_suspect(p)?;
                if msg.from.addr != from {
                    return Err(MembershipError::Refused("spoofed_source"));
                }
                if !self.is_active(&msg.from) {
                    return Err(MembershipError::Refused("unknown_sender"));
                }
                self.note_heard(from, msg.from.uuid);
                self.on_suspect(msg);
                Ok(())
            }
            Kind::Leave => {
                let id = wire::decode_leave(p)?;
                // Only a member may say that it leaves, from its own address.
                if id.addr != from {
                    return Err(MembershipError::Refused("spoofed_source"));
                }
                if !self.in_state(from) {
                    return Err(MembershipError::Refused("unknown_sender"));
                }
                self.stats.leaves += 1;
                self.foca
                    .apply_many(std::iter::once(Member::down(id)), true, &mut self.rt)
                    .map_err(|e| MembershipError::Swim(e.to_string()))
            }
        }
    }

    /// A foca packet: the sender must be at the source address, indirect probes may only
    /// target members in the view, and the updates are screened (see [`Engine::screen`])
    /// before foca applies them.
    fn on_foca(&mut self, from: SocketAddr, p: &[u8]) -> Result<(), MembershipError> {
        let mut pkt = wire::decode_foca(p)?;
        let src = pkt.header.src;
        if src.addr != from {
            return Err(MembershipError::Refused("spoofed_source"));
        }
        if src.uuid.is_nil() {
            return Err(MembershipError::Refused("nil_identity"));
        }
        if self.uuid_elsewhere(&src) {
            return Err(MembershipError::Refused("uuid_conflict"));
        }
        if let foca::Message::PingReq { target, .. } | foca::Message::IndirectAck { target, .. } =
            &pkt.header.message
            && !self.is_active(target)
        {
            return Err(MembershipError::Refused("unknown_target"));
        }
        let new_sender = !self.in_state(src.addr);
        if new_sender && !self.room_for(1) {
            return Err(MembershipError::Refused("member_cap"));
        }
        self.tell_if_down(&pkt.header, pkt.updates.as_deref().unwrap_or(&[]));
        let mut confirmed = Vec::new();
        let mut rewritten = false;
        if let Some(updates) = pkt.updates.take() {
            let reserved = usize::from(new_sender);
            let (kept, changed, conf) = self.screen(&src, updates, Via::Gossip, reserved);
            pkt.updates = Some(kept);
            rewritten = changed;
            confirmed = conf;
        }
        let res = if rewritten {
            let data = wire::encode_foca(self.tag, &pkt)?;
            self.foca
                .handle_data(&data[wire::HEADER_LEN..], &mut self.rt)
        } else {
            self.foca.handle_data(p, &mut self.rt)
        };
        res.map_err(|e| MembershipError::Swim(e.to_string()))?;
        self.note_heard(src.addr, src.uuid);
        for addr in confirmed {
            self.arm_suspicion(addr);
        }
        Ok(())
    }

    /// Screens member updates that `sender` passed on, before foca applies them:
    ///
    /// - a `Down` about a live member other than the sender becomes `Suspect` at the same
    ///   incarnation; from a live sender it confirms the suspicion fully (the sender ran its own
    ///   timer to the end), so this member's own Lifeguard timer decides at the minimum timeout
    ///   and the target can refute until then. A `Down` about anyone unknown or already down is
    ///   dropped; a `Down` about the sender itself (its leave) stays.
    /// - a `Down` about this member in gossip becomes `Suspect` too (refuted at once); only a
    ///   sync, which comes over a stream from a member that holds us down, makes us renew.
    /// - an identity with another UUID at the address of a live member is dropped: a restart
    ///   speaks for itself, or waits until the old identity is found down.
    /// - an identity whose UUID is this member's or a live member's at another address is
    ///   dropped: one UUID is one process, at one address.
    /// - new members beyond [`Config::member_cap`] are dropped (`reserved` places are kept for
    ///   the sender).
    ///
    /// Returns the updates to apply, whether any changed, and the addresses whose suspicion got
    /// a confirmation.
    fn screen(
        &mut self,
        sender: &NodeId,
        updates: Vec<Member<NodeId>>,
        via: Via,
        reserved: usize,
    ) -> (Vec<Member<NodeId>>, bool, Vec<SocketAddr>) {
        use foca::State;
        if updates.is_empty() {
            return (updates, false, Vec::new());
        }
        let known: HashMap<SocketAddr, (NodeId, u16, bool)> = self
            .foca
            .iter_membership_state()
            .map(|m| {
                (
                    m.id().addr,
                    (*m.id(), m.incarnation(), m.state() != State::Down),
                )
            })
            .collect();
        let mut live_uuids: HashMap<Uuid, SocketAddr> = known
            .iter()
            .filter(|(_, (_, _, live))| *live)
            .map(|(a, (id, _, _))| (id.uuid, *a))
            .collect();
        live_uuids.insert(self.me.uuid, self.me.addr);
        let sender_active = known
            .get(&sender.addr)
            .is_some_and(|(id, _, active)| *active && id.uuid == sender.uuid);
        let active = self.foca.num_members() + 1 + reserved;
        let total = known.len() + 1 + reserved;
        let mut room = self
            .cfg
            .member_cap
            .saturating_sub(active)
            .min(self.cfg.member_cap.saturating_mul(2).saturating_sub(total));
        let mut kept = Vec::with_capacity(updates.len());
        let mut changed = false;
        let mut confirmed = Vec::new();
        for u in updates {
            let id = *u.id();
            if id.uuid.is_nil() || live_uuids.get(&id.uuid).is_some_and(|a| *a != id.addr) {
                // No identity, or a clone of a live member's UUID at another address.
                changed = true;
                continue;
            }
            if id.addr == self.me.addr {
                if id == self.me && u.state() == State::Down && via == Via::Gossip {
                    kept.push(Member::new(id, u.incarnation(), State::Suspect));
                    changed = true;
                } else {
                    kept.push(u);
                }
                continue;
            }
            if id.addr == sender.addr {
                kept.push(u);
                continue;
            }
            match known.get(&id.addr) {
                None => {
                    if u.state() == State::Down || room == 0 {
                        changed = true;
                        continue;
                    }
                    room -= 1;
                    kept.push(u);
                }
                Some(&(k, inc, live)) => {
                    if u.state() == State::Down {
                        changed = true;
                        if k == id && live && u.incarnation() >= inc {
                            if sender_active && self.confirm(id, u.incarnation(), sender.uuid) {
                                if let Some(s) = self.suspicions.get_mut(&id.addr) {
                                    s.relayed = true;
                                }
                                confirmed.push(id.addr);
                            }
                            kept.push(Member::new(id, u.incarnation(), State::Suspect));
                        }
                    } else if live && k.uuid != id.uuid {
                        changed = true;
                    } else {
                        if u.state() == State::Suspect && k == id && live && u.incarnation() >= inc
                        {
                            // When it started matters if a relayed Down confirms it later.
                            self.suspicion(id, u.incarnation());
                        }
                        kept.push(u);
                    }
                }
            }
        }
        (kept, changed, confirmed)
    }

    /// A member that talks while this one holds it as down was removed falsely, or came back
    /// from a partition. A state sync tells it, so it renews its identity and rejoins; at most
    /// one per second per address.
    fn tell_if_down(&mut self, h: &foca::Header<NodeId>, updates: &[Member<NodeId>]) {
        if updates
            .iter()
            .any(|m| m.id() == &self.me && m.state() != foca::State::Alive)
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
                // And tell the suspicion's author directly: foca's header carries our new
                // incarnation, which refutes it there within a round trip.
                if let Err(e) = self.foca.announce(msg.from, &mut self.rt) {
                    tracing::debug!("refute to {}: {e}", msg.from.addr);
                }
            }
            return;
        }
        // Only members of the view can be suspected: a suspicion must not add anyone.
        if !self.is_active(&msg.target) || !self.confirm(msg.target, msg.incarnation, msg.from.uuid)
        {
            return;
        }
        // Suspect too, and run a timer here as well (Lifeguard: everyone who hears of a
        // suspicion times it, shrinking with confirmations).
        let update = Member::new(msg.target, msg.incarnation, foca::State::Suspect);
        if let Err(e) = self
            .foca
            .apply_many(std::iter::once(update), true, &mut self.rt)
        {
            tracing::debug!("suspect: {e}");
        }
        self.arm_suspicion(msg.target.addr);
    }

    /// Records `by`'s independent confirmation that `target` at `incarnation` is failing;
    /// returns false when it was ignored (our own, about an older incarnation, or no room).
    fn confirm(&mut self, target: NodeId, incarnation: u16, by: Uuid) -> bool {
        if by == self.me.uuid || by == target.uuid {
            return false;
        }
        let Some(s) = self.suspicion(target, incarnation) else {
            return false;
        };
        if !s.confirmers.contains(&by) && s.confirmers.len() < 16 {
            s.confirmers.push(by);
        }
        self.stats.confirmations += 1;
        true
    }

    /// The suspicion of `target` at `incarnation`, started now unless it already runs; `None`
    /// when it is about an older incarnation than the one suspected, or there is no room.
    fn suspicion(&mut self, target: NodeId, incarnation: u16) -> Option<&mut Suspicion> {
        if self.suspicions.len() >= 4096 && !self.suspicions.contains_key(&target.addr) {
            return None;
        }
        let now = self.now;
        let fresh = Suspicion {
            id: target,
            incarnation,
            started: now,
            confirmers: Vec::new(),
            relayed: false,
            timer: None,
        };
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

    /// A suspicion was confirmed (a `Suspect` message or a relayed `Down`): this member decides
    /// with its own Lifeguard timer. foca runs one only for its own failed probes, so the
    /// engine starts one when there is none, and tells the target, which refutes at once if it
    /// is alive.
    fn arm_suspicion(&mut self, addr: SocketAddr) {
        let Some(s) = self.suspicions.get(&addr) else {
            return;
        };
        if s.timer.is_some() {
            self.reschedule_suspicion(addr);
            return;
        }
        let (target, incarnation) = (s.id, s.incarnation);
        let suspect = self.foca.iter_members().any(|m| {
            m.id() == &target && m.incarnation() == incarnation && m.state() == foca::State::Suspect
        });
        let Some(token) = self.foca_token else {
            return;
        };
        if !suspect {
            return;
        }
        let ev = Timer::ChangeSuspectToDown {
            member_id: target,
            incarnation,
            token,
        };
        self.schedule(Duration::ZERO, ev);
        let msg = wire::SuspectMsg {
            from: self.me,
            target,
            incarnation,
        };
        self.push_out(Output::Datagram {
            to: target.addr,
            data: wire::encode_suspect(self.tag, &msg),
        });
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
        let due = (s.started + self.suspicion_timeout(s.weight())).max(self.now);
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
                relayed: false,
                timer: None,
            };
            let s = self
                .suspicions
                .entry(member_id.addr)
                .or_insert(fresh.clone());
            if s.id != *member_id || s.incarnation != *incarnation {
                *s = fresh;
            }
            let (started, n) = (s.started, s.weight());
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
        if msg.from.uuid == self.me.uuid || msg.from.addr == self.me.addr {
            return Err(MembershipError::Decode("sync from ourselves"));
        }
        if msg.from.uuid.is_nil() {
            return Err(MembershipError::Refused("nil_identity"));
        }
        if self.uuid_elsewhere(&msg.from) {
            return Err(MembershipError::Refused("uuid_conflict"));
        }
        let new_sender = !self.in_state(msg.from.addr);
        if new_sender && !self.room_for(1) {
            return Err(MembershipError::Refused("member_cap"));
        }
        let (updates, _, confirmed) =
            self.screen(&msg.from, msg.members, Via::Sync, usize::from(new_sender));
        let updates = std::iter::once(Member::alive(msg.from)).chain(updates);
        self.foca
            .apply_many(updates, true, &mut self.rt)
            .map_err(|e| MembershipError::Swim(e.to_string()))?;
        self.note_heard(msg.from.addr, msg.from.uuid);
        for addr in confirmed {
            self.arm_suspicion(addr);
        }
        Ok(())
    }

    fn sync_msg(&self) -> SyncMsg {
        SyncMsg {
            from: self.me,
            members: self.foca.iter_membership_state().cloned().collect(),
        }
    }

    /// A list from the member at its coordinator's address (checked by the caller). Adopted
    /// only from the member this one sees as coordinator, only if it lists this member, and
    /// only if it comes from another coordinator than the held list (a coordinator change or
    /// a restart: adopted even at a lower version) or is newer in serial-number order. A
    /// coordinator that keeps sending older lists is believed after a few: the held list was
    /// then never its own.
    fn on_list(&mut self, msg: ListMsg) {
        if std::mem::take(&mut self.dirty) {
            // The sender may have just been heard from: it may be the coordinator now.
            self.reconcile();
        }
        if msg.coordinator == self.me.uuid
            || msg.coordinator != self.coordinator
            || !msg.members.iter().any(|m| m.uuid == self.me.uuid)
        {
            return;
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
            };
            self.changes.push(self.list.clone());
        }
    }

    /// A pull never moves versions: the coordinator only answers, to the packet's source,
    /// when the puller holds another list than its own.
    fn on_pull(&mut self, from: SocketAddr, msg: &PullMsg) {
        let before = (self.list.coordinator, self.list.ver);
        if std::mem::take(&mut self.dirty) {
            // The puller may have just been heard from: a new version then reaches it anyway.
            self.reconcile();
        }
        let held = (self.list.coordinator, self.list.ver);
        if self.coordinator == self.me.uuid
            && held.0 == self.me.uuid
            && held == before
            && (msg.have_coordinator, msg.have_ver) != held
        {
            self.send_list(from);
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
            if (self.coordinator != self.me.uuid || self.pull_unheard.is_some())
                && self.now >= self.next_pull
            {
                self.next_pull = self.now + self.cfg.pull_interval;
                let mut to: Vec<SocketAddr> = Vec::with_capacity(2);
                if self.coordinator != self.me.uuid
                    && let Some(c) = self.member_addr(self.coordinator)
                {
                    to.push(c);
                }
                if let Some(a) = self.pull_unheard
                    && !to.contains(&a)
                {
                    to.push(a);
                }
                let pull = PullMsg {
                    from: self.me,
                    have_ver: self.list.ver,
                    have_coordinator: self.list.coordinator,
                };
                let data = wire::encode_pull(self.tag, &pull);
                for c in to {
                    self.push_out(Output::Datagram {
                        to: c,
                        data: data.clone(),
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
            if let Timer::ProbeRandomMember(token)
            | Timer::SendIndirectProbe { token, .. }
            | Timer::ChangeSuspectToDown { token, .. } = &ev
            {
                self.foca_token = Some(*token);
            }
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

    /// The alive members that may coordinate and be listed: this one, and those heard from
    /// directly. A member named only by a sync or by gossip is not in any issued list.
    fn eligible(&self, alive: &[NodeId]) -> Vec<NodeId> {
        alive
            .iter()
            .filter(|m| m.uuid == self.me.uuid || self.heard.get(&m.addr) == Some(&m.uuid))
            .copied()
            .collect()
    }

    /// The oldest eligible member issues a new list version whenever its view changes; the
    /// others only note who it is, and pull from it soon when that changes.
    fn reconcile(&mut self) {
        let state: HashMap<SocketAddr, Uuid> = self
            .foca
            .iter_membership_state()
            .map(|m| (m.id().addr, m.id().uuid))
            .collect();
        self.heard.retain(|a, u| state.get(a) == Some(u));
        let mut alive = self.alive();
        alive.sort_by(NodeId::cmp_age);
        let members = self.eligible(&alive);
        let coordinator = members[0];
        if coordinator.uuid != self.coordinator {
            self.coordinator = coordinator.uuid;
            self.stale_lists = 0;
            self.next_pull = self.now;
        }
        // Anyone older than the coordinator has not been heard from: pull it, so that it hears
        // from us, lists us and, by pushing its list, is heard from in turn.
        let unheard = Some(alive[0])
            .filter(|o| o.uuid != coordinator.uuid)
            .map(|o| o.addr);
        if unheard.is_some() && unheard != self.pull_unheard {
            self.next_pull = self.now;
        }
        self.pull_unheard = unheard;
        if coordinator.uuid != self.me.uuid {
            self.issue_at = None;
            return;
        }
        if self.list.coordinator == self.me.uuid && self.list.same_members(&members) {
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
        // The held list is ours or our former coordinator's, never a number a message only
        // claimed; versions wrap and compare in serial-number order (`list::ver_newer`).
        let ver = self.list.ver.wrapping_add(1);
        self.list = MemberList {
            ver,
            coordinator: self.me.uuid,
            members,
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
    use crate::wire::FocaPacket;
    use foca::{Header, Message, State};

    const TAG: u64 = 7;

    fn id(n: u8, started: u64) -> NodeId {
        NodeId::new(
            SocketAddr::from(([10, 0, 0, n], 10081)),
            Uuid::from_u128(u128::from(n)),
            started,
            Role::Worker,
        )
    }

    fn engine(me: NodeId) -> Engine {
        Engine::new(
            me,
            TAG,
            Config::lan(),
            u64::from(me.addr.port()),
            Duration::ZERO,
        )
    }

    /// `peer` tells `e` everything it knows, over a stream from its own address.
    fn sync_into(e: &mut Engine, peer: &Engine) {
        let data = wire::encode_sync(TAG, Kind::SyncResponse, &peer.sync_msg());
        e.handle_stream(peer.me.addr, &data, e.now);
    }

    /// Delivers `from`'s pending datagrams and streams addressed to `to`.
    fn deliver(from: &mut Engine, to: &mut Engine) {
        for o in from.drain_outputs() {
            match o {
                Output::Datagram { to: a, data } if a == to.me.addr => {
                    to.handle_datagram(from.me.addr, &data, to.now);
                }
                Output::Stream { to: a, data } if a == to.me.addr => {
                    to.handle_stream(from.me.addr, &data, to.now);
                }
                _ => {}
            }
        }
    }

    /// Two engines that know each other: `a` (older) coordinates and `b` holds its list.
    fn pair() -> (Engine, Engine) {
        let mut a = engine(id(1, 1));
        let mut b = engine(id(2, 2));
        sync_into(&mut a, &b);
        sync_into(&mut b, &a);
        deliver(&mut a, &mut b);
        assert_eq!(b.list(), a.list(), "b adopts a's list");
        assert_eq!(b.list().coordinator, a.me.uuid);
        b.drain_outputs();
        (a, b)
    }

    fn sent_to(e: &mut Engine, to: SocketAddr) -> Vec<Vec<u8>> {
        e.drain_outputs()
            .into_iter()
            .filter_map(|o| match o {
                Output::Datagram { to: a, data } | Output::Stream { to: a, data } if a == to => {
                    Some(data)
                }
                _ => None,
            })
            .collect()
    }

    fn kind_of(data: &[u8]) -> Kind {
        wire::split_header(data, TAG).unwrap().0
    }

    /// Lets the pause between two list versions pass.
    fn settle(e: &mut Engine) {
        e.now += Duration::from_millis(200);
        e.tick(e.now);
    }

    fn foca_packet(
        src: NodeId,
        dst: NodeId,
        message: Message<NodeId>,
        ups: &[Member<NodeId>],
    ) -> Vec<u8> {
        let updates = (!matches!(message, Message::Announce)).then(|| ups.to_vec());
        let pkt = FocaPacket {
            header: Header {
                src,
                src_incarnation: 0,
                dst,
                message,
            },
            updates,
            tail: Vec::new(),
        };
        wire::encode_foca(TAG, &pkt).unwrap()
    }

    fn state_of(e: &Engine, who: &NodeId) -> Option<State> {
        e.foca
            .iter_membership_state()
            .find(|m| m.id() == who)
            .map(|m| m.state())
    }

    #[test]
    fn a_member_holding_another_coordinators_list_converges_to_ours() {
        let mut a = engine(id(1, 1));
        let mut b = engine(id(2, 2));
        // `b` coordinated a view of its own for a while and holds its own list at ver 5, above
        // anything `a` issued (two coordinators during a concurrent start).
        b.list.ver = 5;
        sync_into(&mut a, &b);
        sync_into(&mut b, &a);
        assert_eq!(a.list().ver, 2, "a issued its second list");
        // `a`'s push reaches b, which adopts it although its ver is lower: the coordinator
        // changed.
        deliver(&mut a, &mut b);
        assert_eq!(b.list(), a.list());
        assert_eq!(b.list().ver, 2);
        // Had the push been lost, b's pull (holding its own list) would get it too.
        b.list = MemberList {
            ver: 5,
            coordinator: b.me.uuid,
            members: vec![b.me],
        };
        b.changes.clear();
        b.now += Duration::from_secs(2);
        b.tick(b.now);
        deliver(&mut b, &mut a);
        let answers: Vec<Vec<u8>> = sent_to(&mut a, b.me.addr)
            .into_iter()
            .filter(|d| kind_of(d) == Kind::List)
            .collect();
        assert_eq!(answers.len(), 1, "a answers the pull");
        b.handle_datagram(a.me.addr, &answers[0], b.now);
        assert_eq!(b.list(), a.list());
        // A member that already holds our list causes no answer and no new version.
        let ver = a.list().ver;
        b.now += Duration::from_secs(1);
        b.tick(b.now);
        deliver(&mut b, &mut a);
        let answers = sent_to(&mut a, b.me.addr);
        assert!(answers.iter().all(|d| kind_of(d) != Kind::List));
        assert_eq!(a.list().ver, ver);
    }

    #[test]
    fn pulls_never_move_versions() {
        let (mut a, b) = pair();
        let ver = a.list().ver;
        for (have_ver, have_coordinator) in [(u64::MAX, a.me.uuid), (u64::MAX, b.me.uuid)] {
            let pull = wire::encode_pull(
                TAG,
                &PullMsg {
                    from: b.me,
                    have_ver,
                    have_coordinator,
                },
            );
            a.handle_datagram(b.me.addr, &pull, a.now);
            let answers = sent_to(&mut a, b.me.addr);
            assert_eq!(answers.len(), 1);
            assert_eq!(kind_of(&answers[0]), Kind::List);
            assert_eq!(a.list().ver, ver, "a pull moved the version");
        }
        assert!(a.drain_changes().iter().all(|l| l.ver <= ver));
    }

    #[test]
    fn lists_are_adopted_only_from_the_coordinator_at_its_address() {
        let (a, mut b) = pair();
        let held = b.list().clone();
        let (a_me, b_me) = (a.me, b.me);
        let forged = |ver, coordinator| {
            wire::encode_list(
                TAG,
                &ListMsg {
                    ver,
                    coordinator,
                    members: vec![a_me, b_me],
                },
            )
        };
        // The coordinator's UUID from another address.
        let other: SocketAddr = "10.0.0.9:10081".parse().unwrap();
        b.handle_datagram(other, &forged(u64::MAX - 1, a.me.uuid), b.now);
        assert_eq!(b.list(), &held);
        assert_eq!(b.stats().rejected.get("spoofed_source"), Some(&1));
        // A coordinator nobody knows.
        b.handle_datagram(other, &forged(held.ver + 1, Uuid::from_u128(99)), b.now);
        assert_eq!(b.list(), &held);
        // A list that leaves the member out.
        let without = wire::encode_list(
            TAG,
            &ListMsg {
                ver: held.ver + 1,
                coordinator: a.me.uuid,
                members: vec![a.me],
            },
        );
        b.handle_datagram(a.me.addr, &without, b.now);
        assert_eq!(b.list(), &held);
        // The coordinator at its address, newer: adopted.
        b.handle_datagram(a.me.addr, &forged(held.ver + 1, a.me.uuid), b.now);
        assert_eq!(b.list().ver, held.ver + 1);
    }

    #[test]
    fn a_coordinator_that_insists_on_an_older_list_is_believed() {
        let (a, mut b) = pair();
        // A list b adopted once but the coordinator never issued: half the number circle ahead.
        let far = a.list().ver.wrapping_add(1 << 62);
        let (a_me, b_me) = (a.me, b.me);
        let list = |ver| {
            wire::encode_list(
                TAG,
                &ListMsg {
                    ver,
                    coordinator: a_me.uuid,
                    members: vec![a_me, b_me],
                },
            )
        };
        b.handle_datagram(a.me.addr, &list(far), b.now);
        assert_eq!(b.list().ver, far);
        let real = a.list().ver + 1;
        for i in 1..=STALE_LISTS_TO_ADOPT {
            b.handle_datagram(a.me.addr, &list(real), b.now);
            let adopted = b.list().ver == real;
            assert_eq!(adopted, i == STALE_LISTS_TO_ADOPT, "answer {i}");
        }
        // Serial order: after u64::MAX comes 0, then 1.
        b.list.ver = u64::MAX - 1;
        for ver in [u64::MAX, 0, 1] {
            b.handle_datagram(a.me.addr, &list(ver), b.now);
            assert_eq!(b.list().ver, ver);
        }
    }

    #[test]
    fn a_sync_by_datagram_is_refused_and_answers_nobody() {
        let mut e = engine(id(1, 1));
        e.drain_outputs();
        let third: SocketAddr = "10.0.0.7:10081".parse().unwrap();
        let stranger: SocketAddr = "10.0.0.9:10081".parse().unwrap();
        let claimed = NodeId::new(third, Uuid::from_u128(70), 5, Role::Worker);
        let data = wire::encode_sync(
            TAG,
            Kind::SyncRequest,
            &SyncMsg {
                from: claimed,
                members: Vec::new(),
            },
        );
        assert_eq!(data.len(), 50);
        e.handle_datagram(stranger, &data, Duration::from_millis(1));
        assert!(e.drain_outputs().is_empty());
        assert_eq!(e.stats().rejected.get("sync_over_datagram"), Some(&1));
        assert!(!e.in_state(third));
    }

    #[test]
    fn a_sync_stream_is_answered_only_at_its_source_ip() {
        let mut e = engine(id(1, 1));
        e.drain_outputs();
        let peer = id(2, 2);
        let msg = SyncMsg {
            from: peer,
            members: Vec::new(),
        };
        let data = wire::encode_sync(TAG, Kind::SyncRequest, &msg);
        // From another IP: refused, nobody answered, nobody added.
        e.handle_stream("10.0.0.9:40000".parse().unwrap(), &data, e.now);
        assert!(e.drain_outputs().is_empty());
        assert_eq!(e.stats().rejected.get("spoofed_source"), Some(&1));
        assert!(!e.in_state(peer.addr));
        // From the claimed IP on an ephemeral port: applied and answered at the claimed address.
        e.handle_stream("10.0.0.2:40000".parse().unwrap(), &data, e.now);
        let answers = sent_to(&mut e, peer.addr);
        assert!(answers.iter().any(|d| kind_of(d) == Kind::SyncResponse));
        assert!(e.in_state(peer.addr));
        // Loopback addresses are all on one host: a stream from 127.0.0.1 may speak for
        // 127.0.0.41, which is what an unbound connect from a loopback node looks like.
        assert!(same_source(
            "127.0.0.41:10081".parse().unwrap(),
            "127.0.0.1:50000".parse().unwrap(),
            true
        ));
        assert!(!same_source(
            "127.0.0.41:10081".parse().unwrap(),
            "127.0.0.41:50000".parse().unwrap(),
            false
        ));
    }

    #[test]
    fn a_strangers_announce_gets_at_most_its_own_size_back() {
        let (mut a, b) = pair();
        // Give a something to feed: a dozen members, learned from b's sync.
        let many: Vec<Member<NodeId>> = (10..22).map(|n| Member::alive(id(n, 100))).collect();
        let data = wire::encode_sync(
            TAG,
            Kind::SyncResponse,
            &SyncMsg {
                from: b.me,
                members: many,
            },
        );
        a.handle_stream(b.me.addr, &data, a.now);
        a.drain_outputs();
        let stranger = id(99, 50);
        let announce = foca_packet(
            stranger,
            NodeId::unknown_at(a.me.addr),
            Message::Announce,
            &[],
        );
        a.handle_datagram(stranger.addr, &announce, a.now);
        let back: usize = sent_to(&mut a, stranger.addr).iter().map(Vec::len).sum();
        assert!(
            back <= announce.len(),
            "{back} bytes back for {}",
            announce.len()
        );
        assert!(
            a.stats()
                .rejected
                .get("amplification")
                .is_some_and(|n| *n >= 1)
        );
        // Once it is a member, a second announce is fed as usual.
        a.handle_datagram(stranger.addr, &announce, a.now);
        let back: usize = sent_to(&mut a, stranger.addr).iter().map(Vec::len).sum();
        assert!(back > announce.len());
    }

    #[test]
    fn senders_must_be_at_the_source_address() {
        let (mut a, b) = pair();
        let other: SocketAddr = "10.0.0.9:10081".parse().unwrap();
        // A pull naming b, from elsewhere: no answer to either address.
        let pull = wire::encode_pull(
            TAG,
            &PullMsg {
                from: b.me,
                have_ver: 0,
                have_coordinator: b.me.uuid,
            },
        );
        a.handle_datagram(other, &pull, a.now);
        // A foca ping naming b as its sender, from elsewhere.
        let ping = foca_packet(b.me, a.me, Message::Ping(1), &[]);
        a.handle_datagram(other, &ping, a.now);
        // A suspicion naming b as its author, from elsewhere.
        let sus = wire::encode_suspect(
            TAG,
            &wire::SuspectMsg {
                from: b.me,
                target: a.me,
                incarnation: 0,
            },
        );
        a.handle_datagram(other, &sus, a.now);
        assert!(a.drain_outputs().is_empty());
        assert_eq!(a.stats().rejected.get("spoofed_source"), Some(&3));
        // A foca message over a stream is refused whatever it says.
        a.handle_stream(b.me.addr, &ping, a.now);
        assert_eq!(a.stats().rejected.get("datagram_over_stream"), Some(&1));
        assert!(a.drain_outputs().is_empty());
    }

    #[test]
    fn indirect_probes_only_target_members_of_the_view() {
        let (mut a, b) = pair();
        let outsider = id(50, 3);
        let req = foca_packet(
            b.me,
            a.me,
            Message::PingReq {
                target: outsider,
                probe_number: 1,
            },
            &[],
        );
        a.handle_datagram(b.me.addr, &req, a.now);
        assert!(sent_to(&mut a, outsider.addr).is_empty());
        assert_eq!(a.stats().rejected.get("unknown_target"), Some(&1));
        let ack = foca_packet(
            b.me,
            a.me,
            Message::IndirectAck {
                target: outsider,
                probe_number: 1,
            },
            &[],
        );
        a.handle_datagram(b.me.addr, &ack, a.now);
        assert!(sent_to(&mut a, outsider.addr).is_empty());
    }

    #[test]
    fn a_leave_counts_only_from_the_leaving_members_address() {
        let (mut a, b) = pair();
        let c = engine(id(3, 3));
        sync_into(&mut a, &c);
        let leave = wire::encode_leave(TAG, &b.me);
        a.handle_datagram(c.me.addr, &leave, a.now);
        assert_eq!(state_of(&a, &b.me), Some(State::Alive));
        assert_eq!(a.stats().leaves, 0);
        a.handle_datagram(b.me.addr, &leave, a.now);
        assert_eq!(state_of(&a, &b.me), Some(State::Down));
        settle(&mut a);
        assert!(!a.list().contains(b.me.uuid));
    }

    #[test]
    fn a_relayed_down_only_makes_the_member_suspect() {
        let (mut a, b) = pair();
        let mut c = engine(id(3, 3));
        sync_into(&mut a, &c);
        sync_into(&mut c, &a);
        settle(&mut a);
        let before = a.list().clone();
        assert!(before.contains(b.me.uuid) && before.contains(c.me.uuid));
        // c gossips that b is down.
        let gossip = foca_packet(c.me, a.me, Message::Gossip, &[Member::down(b.me)]);
        a.handle_datagram(c.me.addr, &gossip, a.now);
        assert_eq!(state_of(&a, &b.me), Some(State::Suspect));
        assert!(a.list().contains(b.me.uuid), "b left the list at once");
        let s = a.suspicions.get(&b.me.addr).expect("a suspicion");
        assert_eq!(
            s.confirmers,
            vec![c.me.uuid],
            "c's relay counts as a confirmation"
        );
        // b refutes in time (a higher incarnation, from b itself): it stays.
        let refute = FocaPacket {
            header: Header {
                src: b.me,
                src_incarnation: 1,
                dst: a.me,
                message: Message::Gossip,
            },
            updates: Some(Vec::new()),
            tail: Vec::new(),
        };
        let data = wire::encode_foca(TAG, &refute).unwrap();
        a.handle_datagram(b.me.addr, &data, a.now);
        a.tick(a.now + Duration::from_secs(10));
        assert_eq!(state_of(&a, &b.me), Some(State::Alive));
        assert!(a.list().contains(b.me.uuid));
        // A Down about the sender itself is its leave, and stays a Down.
        let bye = foca_packet(c.me, a.me, Message::Gossip, &[Member::down(c.me)]);
        a.handle_datagram(c.me.addr, &bye, a.now);
        assert_eq!(state_of(&a, &c.me), Some(State::Down));
        // A Down about ourselves in gossip is refuted, not obeyed with a renewal.
        let me = a.me;
        let about_me = foca_packet(b.me, a.me, Message::Gossip, &[Member::down(me)]);
        a.handle_datagram(b.me.addr, &about_me, a.now);
        assert_eq!(a.me, me, "a renewed its identity on a relayed Down");
        assert_eq!(a.stats().rejoins, 0);
    }

    #[test]
    fn gossip_cannot_replace_a_live_member_with_another_identity() {
        let (mut a, b) = pair();
        let mut c = engine(id(3, 3));
        sync_into(&mut a, &c);
        sync_into(&mut c, &a);
        // c claims a newer process runs at b's address.
        let ghost = NodeId::new(b.me.addr, Uuid::from_u128(77), 9_999, Role::Worker);
        let gossip = foca_packet(c.me, a.me, Message::Gossip, &[Member::alive(ghost)]);
        a.handle_datagram(c.me.addr, &gossip, a.now);
        assert_eq!(state_of(&a, &b.me), Some(State::Alive));
        assert_eq!(state_of(&a, &ghost), None);
        // The new process speaking for itself does replace it (a restart).
        let own = foca_packet(ghost, a.me, Message::Ping(1), &[]);
        a.handle_datagram(ghost.addr, &own, a.now);
        assert_eq!(state_of(&a, &ghost), Some(State::Alive));
    }

    #[test]
    fn a_clone_of_the_coordinators_uuid_cannot_stand_in_for_it() {
        let (a, mut b) = pair();
        let mut c = engine(id(3, 3));
        sync_into(&mut b, &c);
        sync_into(&mut c, &b);
        // c gossips, and then speaks as, a renewed "a" at its own address.
        let clone = NodeId {
            addr: c.me.addr,
            generation: 9,
            ..a.me
        };
        let gossip = foca_packet(c.me, b.me, Message::Gossip, &[Member::alive(clone)]);
        b.handle_datagram(c.me.addr, &gossip, b.now);
        let ping = foca_packet(clone, b.me, Message::Ping(1), &[]);
        b.handle_datagram(c.me.addr, &ping, b.now);
        assert_eq!(b.stats().rejected.get("uuid_conflict"), Some(&1));
        assert_eq!(b.member_addr(a.me.uuid), Some(a.me.addr));
        let list = wire::encode_list(
            TAG,
            &ListMsg {
                ver: b.list().ver + 1,
                coordinator: a.me.uuid,
                members: vec![b.me],
            },
        );
        b.handle_datagram(c.me.addr, &list, b.now);
        assert_eq!(b.list().coordinator, a.me.uuid);
        assert!(b.list().contains(a.me.uuid), "c's list was adopted");
    }

    #[test]
    fn a_sync_of_ten_thousand_ghosts_stays_under_the_cap_and_out_of_lists() {
        let (mut a, b) = pair();
        let ghosts: Vec<Member<NodeId>> = (0..10_000u32)
            .map(|i| {
                let [_, x, y, z] = i.to_be_bytes();
                let g = NodeId::new(
                    SocketAddr::from(([172, x, y, z], 10081)),
                    Uuid::from_u128(1_000_000 + u128::from(i)),
                    // Older than everyone: a ghost coordinator would freeze every list.
                    0,
                    Role::Worker,
                );
                Member::alive(g)
            })
            .collect();
        let data = wire::encode_sync(
            TAG,
            Kind::SyncResponse,
            &SyncMsg {
                from: b.me,
                members: ghosts,
            },
        );
        a.handle_stream(b.me.addr, &data, a.now);
        assert_eq!(a.foca.num_members() + 1, a.cfg.member_cap);
        for _ in 0..5 {
            a.now += Duration::from_millis(500);
            a.tick(a.now);
        }
        assert_eq!(a.coordinator, a.me.uuid, "a ghost became the coordinator");
        for l in a.drain_changes() {
            assert!(
                l.members
                    .iter()
                    .all(|m| m.uuid == a.me.uuid || m.uuid == b.me.uuid)
            );
        }
        assert!(a.list().contains(b.me.uuid));
        // A ghost heard from directly does count: it is then a member like any other.
        let g = *a
            .foca
            .iter_members()
            .find(|m| m.id().uuid != b.me.uuid)
            .unwrap()
            .id();
        let ping = foca_packet(g, a.me, Message::Ping(3), &[]);
        a.handle_datagram(g.addr, &ping, a.now);
        assert!(a.heard.contains_key(&g.addr));
    }

    #[test]
    fn down_members_are_forgotten_after_a_bounded_time() {
        let cfg = Config::lan();
        let after = cfg
            .swim
            .remove_down_after
            .expect("down members are forgotten");
        assert!(after <= Duration::from_secs(3600), "{after:?}");
        let (mut a, b) = pair();
        let leave = wire::encode_leave(TAG, &b.me);
        a.handle_datagram(b.me.addr, &leave, a.now);
        assert_eq!(state_of(&a, &b.me), Some(State::Down));
        a.now += after + Duration::from_secs(1);
        a.tick(a.now);
        assert_eq!(state_of(&a, &b.me), None);
        assert!(!a.in_state(b.me.addr));
    }
}
