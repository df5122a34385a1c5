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
//! The sub-state machines live in their own modules, each with its own tests:
//! [`crate::lifeguard`] (suspicion timeouts, confirmations, health), [`crate::sequencer`]
//! (list versions, the adopt rules), [`crate::joins`] (candidate retries with backoff),
//! [`crate::timers`] (foca's timer queue) and [`crate::index`] (lookups into foca's state).
//! This file wires them to foca and to the wire format, and screens what peers say.
//!
//! The engine reads no clock and does no I/O: the driver passes `now` (time since some fixed
//! start) into every call and carries out the [`Output`]s. That lets [`crate::sim`] run many
//! engines in virtual time.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use foca::{AccumulatingRuntime, Foca, Member, NoCustomBroadcast, OwnedNotification, Timer};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};
use uuid::Uuid;

use crate::MembershipError;
pub use crate::config::Config;
use crate::id::{NodeId, Zone};
use crate::index::MemberIndex;
use crate::joins::Joins;
use crate::lifeguard::Lifeguard;
use crate::list::MemberList;
use crate::sequencer::{Issue, ListSequencer};
use crate::timers::TimerQueue;
use crate::wire::{self, Codec, Kind, ListMsg, PullMsg, SyncMsg};

/// Where member updates come from, for [`Engine::screen`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Piggybacked on a foca datagram.
    Gossip,
    /// A state sync over a stream.
    Sync,
}

/// How many members are told of each independent suspicion (see `Engine::witnesses`).
const WITNESSES: usize = 4;

/// FNV-1a over `b`, spread with a final multiply so that sums of hashes mix well.
fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9)
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

/// Something the driver must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A UDP datagram to the peer's gossip address.
    Datagram {
        /// Destination.
        to: SocketAddr,
        /// The whole message.
        data: Arc<[u8]>,
    },
    /// A message over a stream (TCP) to the peer's gossip address; reliable, any size. A
    /// message to many (a list pushed to every member) shares one buffer.
    Stream {
        /// Destination.
        to: SocketAddr,
        /// The whole message.
        data: Arc<[u8]>,
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

/// One member's view of one logical cluster.
pub struct Engine {
    me: NodeId,
    foca: Foca<NodeId, Codec, StdRng, NoCustomBroadcast>,
    /// What foca asked for since the last [`Engine::flush`]: sends and timers wait in it.
    rt: AccumulatingRuntime<NodeId>,
    /// foca's notifications since the last flush, taken out of `rt` after every foca call so
    /// that the index learns of membership changes at once.
    notes: Vec<OwnedNotification<NodeId>>,
    index: MemberIndex,
    timers: TimerQueue,
    tag: u64,
    cfg: Config,
    now: Duration,
    seq: ListSequencer,
    lifeguard: Lifeguard,
    joins: Joins,
    /// Members heard from directly: an accepted message whose sender identity is the member and
    /// whose source is its address. Only these coordinate or appear in issued lists.
    heard: HashMap<SocketAddr, Uuid>,
    /// The oldest alive member when it is older than the coordinator but not heard from yet;
    /// it is pulled too, so that it hears from this member.
    pull_unheard: Option<SocketAddr>,
    /// Set when the view may have changed, so the list must be recomputed.
    dirty: bool,
    told_down: HashMap<SocketAddr, Duration>,
    next_pull: Duration,
    /// The pause after the next pull: `pull_interval` after a change, doubling while quiet.
    pull_pause: Duration,
    next_sync: Duration,
    out: Vec<Output>,
    rng: StdRng,
    left: bool,
    stats: Stats,
    probe: Option<(foca::ProbeNumber, NodeId, Duration)>,
    /// foca's current timer token, from the timers it submits, for the suspicion timers the
    /// engine starts itself (see [`Engine::arm_suspicion`]).
    foca_token: Option<foca::TimerToken>,
    /// This member's zone, sent in pulls, syncs and lists.
    zone: Option<Zone>,
    /// Other members' zones by UUID (see [`Engine::note_zone`]); only members foca holds.
    zones: HashMap<Uuid, ZoneClaim>,
    /// The held list's encoding, keyed by its issuer and version (see [`Engine::send_list`]).
    list_wire: Option<EncodedList>,
}

/// A list's encoding and the (issuer, version) it encodes.
type EncodedList = ((Uuid, u64), Arc<[u8]>);

/// A member's zone as this member learned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ZoneClaim {
    zone: Option<Zone>,
    /// Whether the member said it itself (a pull, a sync, or its own list), rather than a
    /// coordinator's list naming it.
    direct: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("me", &self.me)
            .field("list", self.seq.list())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts an engine for member `me` of the cluster whose messages carry `tag`
    /// (see [`wire::cluster_tag`]). The first list, holding only `me`, is ready in
    /// [`Engine::drain_changes`].
    pub fn new(me: NodeId, tag: u64, cfg: Config, seed: u64, now: Duration) -> Self {
        let foca = Foca::new(me, cfg.swim.clone(), StdRng::seed_from_u64(seed), Codec);
        let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        let next_sync = now + cfg.sync_interval.mul_f64(rng.random_range(0.5..1.5));
        Self {
            me,
            foca,
            rt: AccumulatingRuntime::new(),
            notes: Vec::new(),
            index: MemberIndex::default(),
            timers: TimerQueue::default(),
            tag,
            now,
            seq: ListSequencer::new(me, cfg.list_min_interval),
            lifeguard: Lifeguard::new(cfg.lifeguard()),
            joins: Joins::new(now, cfg.join_retry, cfg.join_retry_max, cfg.join_fanout),
            heard: HashMap::new(),
            pull_unheard: None,
            dirty: true,
            told_down: HashMap::new(),
            next_pull: now,
            pull_pause: cfg.pull_interval,
            next_sync,
            out: Vec::new(),
            rng,
            left: false,
            stats: Stats::default(),
            probe: None,
            foca_token: None,
            zone: None,
            zones: HashMap::new(),
            list_wire: None,
            cfg,
        }
    }

    /// Sets this member's own zone, which it reports in pulls, syncs and the lists it issues.
    /// Call it right after [`Engine::new`]: a member's zone is fixed for its UUID, and peers
    /// refuse a change (`zone_changed`).
    pub fn with_zone(mut self, zone: Option<Zone>) -> Self {
        self.zone = zone;
        self.seq.set_own_zone(zone);
        self
    }

    /// This member's own zone.
    pub fn zone(&self) -> Option<Zone> {
        self.zone
    }

    /// The zone of the member with this UUID as this member knows it: this member's own, what
    /// the member reported directly, or else what the coordinator's list said.
    pub fn zone_of(&self, uuid: Uuid) -> Option<Zone> {
        if uuid == self.me.uuid {
            return self.zone;
        }
        self.zones.get(&uuid).and_then(|c| c.zone)
    }

    /// This member's current identity.
    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// The member list this member holds now.
    pub fn list(&self) -> &MemberList {
        self.seq.list()
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

    /// The live members other than this one.
    fn alive_others(&self) -> Vec<NodeId> {
        let mut all = self.alive();
        all.retain(|m| m.uuid != self.me.uuid);
        all
    }

    /// Replaces the discovered candidates: gossip addresses of peers to join.
    pub fn set_candidates(&mut self, candidates: Vec<SocketAddr>, now: Duration) {
        self.now = self.now.max(now);
        self.joins
            .set_candidates(candidates, self.me.addr, self.now);
    }

    /// Takes the messages to send.
    pub fn drain_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    /// Takes the member lists adopted since the last call, oldest first.
    pub fn drain_changes(&mut self) -> Vec<MemberList> {
        self.seq.drain_changes()
    }

    /// The next moment [`Engine::tick`] has work to do.
    pub fn next_deadline(&self) -> Duration {
        let mut d = self.next_sync;
        if let Some(t) = self.timers.next() {
            d = d.min(t);
        }
        if self.left {
            return d;
        }
        if let Some(t) = self.seq.issue_at() {
            d = d.min(t);
        }
        if !self.seq.coordinating() || self.pull_unheard.is_some() {
            d = d.min(self.next_pull);
        }
        d.min(self.joins.next_deadline()).max(self.now)
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

    /// Takes foca's notifications out of the runtime after every foca call; a membership change
    /// makes the index rebuild at its next use.
    fn after_foca(&mut self) {
        while let Some(n) = self.rt.to_notify() {
            if matches!(
                n,
                OwnedNotification::MemberUp(_)
                    | OwnedNotification::MemberDown(_)
                    | OwnedNotification::Rename(..)
                    | OwnedNotification::Rejoin(_)
            ) {
                self.index.invalidate();
                // The members outside the view may have changed: a join round may be due.
                self.joins.wake(self.now);
            }
            self.notes.push(n);
        }
    }

    /// Applies member updates through foca.
    fn apply(
        &mut self,
        updates: impl IntoIterator<Item = Member<NodeId>>,
    ) -> Result<(), MembershipError> {
        let res = self
            .foca
            .apply_many(updates.into_iter(), true, &mut self.rt);
        self.after_foca();
        res.map_err(|e| MembershipError::Swim(e.to_string()))
    }

    /// Announces this member to `to` through foca.
    fn announce_to(&mut self, to: NodeId) {
        if let Err(e) = self.foca.announce(to, &mut self.rt) {
            tracing::debug!("announce to {}: {e}", to.addr);
        }
        self.after_foca();
    }

    /// The index, brought up to date with foca's state.
    fn index(&mut self) -> &MemberIndex {
        let len = self.foca.iter_membership_state().len();
        self.index.refresh(len, self.foca.iter_membership_state());
        &self.index
    }

    /// Whether foca holds a member (alive, suspect or down) at `addr`.
    fn in_state(&mut self, addr: SocketAddr) -> bool {
        self.index().contains(addr)
    }

    /// Whether `id` is an active member of the view, exactly (generation included).
    fn is_active(&mut self, id: &NodeId) -> bool {
        self.index().is_active(id)
    }

    /// The address of the active member with this UUID (its latest generation).
    fn member_addr(&mut self, uuid: Uuid) -> Option<SocketAddr> {
        self.index().addr_of(uuid)
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
    fn uuid_elsewhere(&mut self, id: &NodeId) -> bool {
        (id.uuid == self.me.uuid && id.addr != self.me.addr)
            || self.index().uuid_elsewhere(id.uuid, id.addr)
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
            .index()
            .at(addr)
            .is_some_and(|(id, active)| active && id.uuid == uuid);
        if member {
            tracing::debug!(%addr, "heard from a member directly");
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
            Kind::SyncRequest | Kind::SyncResponse | Kind::SyncDigest if !stream => {
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
                // The coordinator's own entry is its own claim.
                if msg.members.iter().any(|m| m.uuid == msg.coordinator) {
                    self.check_zone(msg.coordinator, msg.zones.get(&msg.coordinator).copied())?;
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
                self.check_zone(msg.from.uuid, msg.zone)?;
                if !self.in_state(from) && from != self.me.addr && self.room_for(1) {
                    // A puller speaks from its own address, as a foca sender does: it joins the
                    // view at once, so the coordinator lists it without waiting for gossip.
                    self.apply(std::iter::once(Member::alive(msg.from)))?;
                }
                self.note_heard(from, msg.from.uuid);
                self.note_zone(msg.from.uuid, msg.zone, true);
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
                        data: wire::encode_sync(self.tag, Kind::SyncResponse, &reply).into(),
                    });
                }
                Ok(())
            }
            Kind::SyncDigest => {
                let msg = wire::decode_digest(p)?;
                if !same_source(msg.from.addr, from, true) {
                    return Err(MembershipError::Refused("spoofed_source"));
                }
                if msg.from.uuid.is_nil() {
                    return Err(MembershipError::Refused("nil_identity"));
                }
                if msg.from.uuid == self.me.uuid || msg.from.addr == self.me.addr {
                    return Err(MembershipError::Decode("sync from ourselves"));
                }
                if self.uuid_elsewhere(&msg.from) {
                    return Err(MembershipError::Refused("uuid_conflict"));
                }
                // Views that agree need nothing more. Otherwise a whole sync goes back, as a
                // request: the asker applies it and answers with its own state, so both learn.
                let known = self.is_active(&msg.from);
                if known {
                    self.note_heard(msg.from.addr, msg.from.uuid);
                }
                if !known || self.view_digest(msg.from.uuid) != msg.digest {
                    self.send_sync(msg.from.addr);
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
                self.apply(std::iter::once(Member::down(id)))
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
        if let Some(updates) = pkt.updates.take() {
            let reserved = usize::from(new_sender);
            let (kept, _, conf) = self.screen(&src, updates, Via::Gossip, reserved);
            pkt.updates = Some(kept);
            confirmed = conf;
        }
        // The wire carries the destination in short; foca wants the whole identity. A packet
        // for an earlier identity of ours keeps its short form, so foca ignores its payload,
        // and an announce to our address gets the placeholder foca accepts.
        let dst = pkt.header.dst;
        pkt.header.dst = if wire::dst_is(&dst, &self.me) {
            self.me
        } else if dst == wire::unsent_dst() {
            NodeId::unknown_at(self.me.addr)
        } else {
            dst
        };
        let data = wire::encode_foca_for_foca(&pkt)?;
        let res = self.foca.handle_data(&data, &mut self.rt);
        self.after_foca();
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
                                self.lifeguard.mark_relayed(id.addr);
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
                            self.lifeguard.suspicion(id, u.incarnation(), self.now);
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
            .index()
            .at(h.src.addr)
            .is_some_and(|(id, active)| !active && id == h.src);
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
        self.lifeguard.bump_health();
        self.stats.health = self.lifeguard.health();
    }

    /// Another member's probe of `target` failed.
    fn on_suspect(&mut self, msg: wire::SuspectMsg) {
        if msg.target.uuid == self.me.uuid {
            if msg.target == self.me {
                // Refute at once rather than waiting for the gossip to reach us.
                self.bump_health();
                let me = Member::new(self.me, msg.incarnation, foca::State::Suspect);
                if let Err(e) = self.apply(std::iter::once(me)) {
                    tracing::debug!("refute: {e}");
                }
                // And tell the suspicion's author directly: foca's header carries our new
                // incarnation, which refutes it there within a round trip.
                self.announce_to(msg.from);
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
        if let Err(e) = self.apply(std::iter::once(update)) {
            tracing::debug!("suspect: {e}");
        }
        self.arm_suspicion(msg.target.addr);
    }

    /// Records `by`'s independent confirmation that `target` at `incarnation` is failing;
    /// returns false when it was ignored (our own, about an older incarnation, or no room).
    fn confirm(&mut self, target: NodeId, incarnation: u16, by: Uuid) -> bool {
        let ok = self
            .lifeguard
            .confirm(self.me.uuid, target, incarnation, by, self.now);
        if ok {
            self.stats.confirmations += 1;
        }
        ok
    }

    /// A suspicion was confirmed (a `Suspect` message or a relayed `Down`): this member decides
    /// with its own Lifeguard timer. foca runs one only for its own failed probes, so the
    /// engine starts one when there is none, and tells the target, which refutes at once if it
    /// is alive.
    fn arm_suspicion(&mut self, addr: SocketAddr) {
        let Some(s) = self.lifeguard.get(addr) else {
            return;
        };
        if s.timer.is_some() {
            let others = self.foca.num_members();
            if let Some((ev, due)) = self.lifeguard.earlier(addr, self.now, others) {
                self.timers.push(due, ev);
            }
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
            data: wire::encode_suspect(self.tag, &msg).into(),
        });
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
            let others = self.foca.num_members();
            deadline = self
                .lifeguard
                .deadline(*member_id, *incarnation, &ev, self.now, others);
        }
        self.timers.push(deadline, ev);
    }

    /// The members told of every independent suspicion of `target`: the [`WITNESSES`] active
    /// members (other than the target and this one) whose hash with the target's UUID is
    /// lowest. Every member with the same view picks the same ones, so confirmations from
    /// independent probers add up at them and shrink their Lifeguard timeout, instead of
    /// scattering one each over random members.
    fn witnesses(&self, target: &NodeId) -> Vec<SocketAddr> {
        let mut scored: Vec<(u64, SocketAddr)> = self
            .foca
            .iter_members()
            .map(|m| m.id())
            .filter(|id| id.addr != target.addr && id.uuid != self.me.uuid)
            .map(|id| {
                let mut b = [0u8; 32];
                b[..16].copy_from_slice(target.uuid.as_bytes());
                b[16..].copy_from_slice(id.uuid.as_bytes());
                (fnv(&b), id.addr)
            })
            .collect();
        let n = scored.len().min(WITNESSES);
        if n > 0 {
            scored.select_nth_unstable(n - 1);
        }
        scored.truncate(n);
        scored.into_iter().map(|(_, a)| a).collect()
    }

    /// Tells the target's witnesses that our probe of it failed (Lifeguard's independent
    /// suspicion), and the target itself, so that it can refute at once.
    fn announce_suspicion(&mut self, target: NodeId, incarnation: u16) {
        self.stats.suspicions_raised += 1;
        let msg = wire::SuspectMsg {
            from: self.me,
            target,
            incarnation,
        };
        let data: Arc<[u8]> = wire::encode_suspect(self.tag, &msg).into();
        let mut to = self.witnesses(&target);
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
        self.check_zone(msg.from.uuid, msg.zone)?;
        let new_sender = !self.in_state(msg.from.addr);
        if new_sender && !self.room_for(1) {
            return Err(MembershipError::Refused("member_cap"));
        }
        let (updates, _, confirmed) =
            self.screen(&msg.from, msg.members, Via::Sync, usize::from(new_sender));
        self.apply(std::iter::once(Member::alive(msg.from)).chain(updates))?;
        self.note_heard(msg.from.addr, msg.from.uuid);
        self.note_zone(msg.from.uuid, msg.zone, true);
        for addr in confirmed {
            self.arm_suspicion(addr);
        }
        Ok(())
    }

    /// Refuses a member's own claim of a zone other than the one it claimed before: a zone is
    /// fixed for a UUID (one process), so a change is a lie or a clone.
    fn check_zone(&self, uuid: Uuid, zone: Option<Zone>) -> Result<(), MembershipError> {
        match self.zones.get(&uuid) {
            Some(c) if c.direct && c.zone != zone => Err(MembershipError::Refused("zone_changed")),
            _ => Ok(()),
        }
    }

    /// Records a member's zone: `direct` when the member itself said it (checked first with
    /// [`Engine::check_zone`]), otherwise from its coordinator's list, which never overrides a
    /// direct claim. Only members foca holds are recorded, so the table stays within the
    /// member cap.
    fn note_zone(&mut self, uuid: Uuid, zone: Option<Zone>, direct: bool) {
        if uuid == self.me.uuid {
            return;
        }
        let claim = ZoneClaim { zone, direct };
        match self.zones.get(&uuid) {
            Some(c) if *c == claim || (c.direct && !direct) => return,
            Some(_) => {}
            None => {
                let member = self
                    .foca
                    .iter_membership_state()
                    .any(|m| m.id().uuid == uuid);
                if !member || self.zones.len() >= self.cfg.member_cap.saturating_mul(2) {
                    return;
                }
            }
        }
        if self.zones.get(&uuid).and_then(|c| c.zone) != zone {
            self.dirty = true;
        }
        self.zones.insert(uuid, claim);
    }

    fn sync_msg(&self) -> SyncMsg {
        SyncMsg {
            from: self.me,
            zone: self.zone,
            members: self.foca.iter_membership_state().cloned().collect(),
        }
    }

    /// A list from the member at its coordinator's address (checked by the caller); the
    /// sequencer applies the adopt rules (see [`ListSequencer::offer`]).
    fn on_list(&mut self, msg: ListMsg) {
        if std::mem::take(&mut self.dirty) {
            // The sender may have just been heard from: it may be the coordinator now.
            self.reconcile();
        }
        if self.seq.offer(msg) {
            self.pull_soon();
            self.joins.wake(self.now);
            let list = self.seq.list();
            let claims: Vec<(Uuid, Option<Zone>, bool)> = list
                .members
                .iter()
                .map(|m| (m.uuid, list.zone(m.uuid), m.uuid == list.coordinator))
                .collect();
            for (uuid, zone, direct) in claims {
                self.note_zone(uuid, zone, direct);
            }
        }
    }

    /// Pulls within `pull_interval` and with that pause again: the view or the list changed, so
    /// a push may have been lost.
    fn pull_soon(&mut self) {
        self.pull_pause = self.cfg.pull_interval;
        self.next_pull = self.next_pull.min(self.now + self.cfg.pull_interval);
    }

    /// A pull never moves versions: the coordinator only answers, to the packet's source,
    /// when the puller holds another list than its own.
    fn on_pull(&mut self, from: SocketAddr, msg: &PullMsg) {
        let before = self.seq.held();
        if std::mem::take(&mut self.dirty) {
            // The puller may have just been heard from: a new version then reaches it anyway.
            self.reconcile();
        }
        if self
            .seq
            .answers_pull(before, (msg.have_coordinator, msg.have_ver))
        {
            self.send_list(from);
        }
    }

    /// Does the periodic work due at `now`: timers, joins, pulls and syncs.
    pub fn tick(&mut self, now: Duration) {
        self.now = self.now.max(now);
        self.fire_timers();
        if self.seq.take_due(self.now) {
            self.reconcile();
        }
        self.lifeguard.expire(self.now);
        if !self.left {
            self.join_candidates();
            self.pull_if_due();
        }
        self.sync_if_due();
        self.flush();
    }

    /// Hands foca the timers that are due.
    fn fire_timers(&mut self) {
        while let Some(ev) = self.timers.pop_due(self.now) {
            if let Err(e) = self.foca.handle_timer(ev, &mut self.rt) {
                tracing::debug!("timer: {e}");
            }
            self.after_foca();
        }
    }

    /// Asks the coordinator (and an older member not heard from yet) for its list, once per
    /// `pull_interval`.
    fn pull_if_due(&mut self) {
        if (self.seq.coordinating() && self.pull_unheard.is_none()) || self.now < self.next_pull {
            return;
        }
        self.next_pull = self.now + self.pull_pause;
        self.pull_pause = (self.pull_pause * 2).min(self.cfg.pull_interval_max);
        let mut to: Vec<SocketAddr> = Vec::with_capacity(2);
        if !self.seq.coordinating()
            && let Some(c) = self.member_addr(self.seq.coordinator())
        {
            to.push(c);
        }
        if let Some(a) = self.pull_unheard
            && !to.contains(&a)
        {
            to.push(a);
        }
        let (have_coordinator, have_ver) = self.seq.held();
        let pull = PullMsg {
            from: self.me,
            have_ver,
            have_coordinator,
            zone: self.zone,
        };
        let data: Arc<[u8]> = wire::encode_pull(self.tag, &pull).into();
        tracing::debug!(?to, have_ver, "pulling the list");
        for c in to {
            self.push_out(Output::Datagram {
                to: c,
                data: data.clone(),
            });
        }
    }

    /// Syncs with a random member now and then. A sync carries the whole state, so larger
    /// clusters sync less often (memberlist's push/pull scaling): x1 up to 32 members, then +1
    /// per doubling.
    fn sync_if_due(&mut self) {
        if self.now < self.next_sync {
            return;
        }
        let n = (self.foca.num_members() + 1) as f64;
        let scale = 1.0 + (n / 32.0).log2().max(0.0);
        self.next_sync = self.now
            + self
                .cfg
                .sync_interval
                .mul_f64(scale * self.rng.random_range(0.5..1.5));
        if self.left {
            return;
        }
        let others = self.alive_others();
        if let Some(peer) = others.choose(&mut self.rng).copied() {
            self.send_digest(peer.addr, peer.uuid);
        }
    }

    /// A digest of the active view without this member and `other`: two members whose views
    /// agree on everyone else compute the same digest for each other. The sum of a hash per
    /// identity, so the order does not matter.
    fn view_digest(&self, other: Uuid) -> u64 {
        let mut buf = Vec::with_capacity(wire::MAX_ID_LEN);
        let mut d = 0u64;
        for m in self.foca.iter_members() {
            let id = m.id();
            if id.uuid != other && id.uuid != self.me.uuid {
                buf.clear();
                wire::put_id(&mut buf, id);
                d = d.wrapping_add(fnv(&buf));
            }
        }
        d
    }

    /// Announces this member, and sends a state sync, to the candidates outside the view that
    /// are due (see [`Joins::due`]).
    fn join_candidates(&mut self) {
        // Nothing is due before the deadline `Joins` keeps (it is woken when the view or the
        // list changes); building the set below on every tick was most of the engine's
        // hashing while 200 members started.
        if self.now < self.joins.next_deadline() {
            return;
        }
        // A candidate in the held list is in the cluster: its coordinator heard from it. This
        // member's view learns of it through gossip and syncs; joining it again would send two
        // whole states, over and over while the view lags (hundreds of members).
        let mut active: HashSet<SocketAddr> = self.index().active_addrs().collect();
        active.extend(self.seq.list().members.iter().map(|m| m.addr));
        for c in self.joins.due(&active, self.now, &mut self.rng) {
            self.announce_to(NodeId::unknown_at(c));
            // A retry sends a digest: a live candidate answers it with its whole state, as it
            // does not know this member, and a dead one (a static entry, say) costs 60 bytes
            // every 8 s instead of a whole state (10 KB at 200 members) from every member.
            if self.joins.retried(c) {
                self.send_digest(c, Uuid::nil());
            } else {
                self.send_sync(c);
            }
        }
    }

    /// Sends a digest of the view to `to`, whose UUID is `uuid` (nil when unknown): it answers
    /// with its whole state only when its view differs.
    fn send_digest(&mut self, to: SocketAddr, uuid: Uuid) {
        let msg = wire::DigestMsg {
            from: self.me,
            digest: self.view_digest(uuid),
        };
        self.push_out(Output::Stream {
            to,
            data: wire::encode_digest(self.tag, &msg).into(),
        });
    }

    fn send_sync(&mut self, to: SocketAddr) {
        let msg = self.sync_msg();
        self.push_out(Output::Stream {
            to,
            data: wire::encode_sync(self.tag, Kind::SyncRequest, &msg).into(),
        });
    }

    /// Leaves the cluster: every member is told directly, and the engine goes quiet.
    pub fn leave(&mut self, now: Duration) {
        self.now = self.now.max(now);
        if self.left {
            return;
        }
        let others = self.alive_others();
        if let Err(e) = self.foca.leave_cluster(&mut self.rt) {
            tracing::debug!("leave: {e}");
        }
        self.after_foca();
        let data: Arc<[u8]> = wire::encode_leave(self.tag, &self.me).into();
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

    /// Sends the held list to `to`. The encoding is made once per list and shared by every
    /// push and pull answer: a coordinator of 200 encoded 10 KB per member per version.
    fn send_list(&mut self, to: SocketAddr) {
        let held = self.seq.held();
        let data = match &self.list_wire {
            Some((h, data)) if *h == held => data.clone(),
            _ => {
                let list = self.seq.list();
                let data: Arc<[u8]> = wire::encode_list(
                    self.tag,
                    &ListMsg {
                        ver: list.ver,
                        coordinator: list.coordinator,
                        members: list.members.clone(),
                        zones: list.zones.clone(),
                    },
                )
                .into();
                self.list_wire = Some((held, data.clone()));
                data
            }
        };
        if data.len() <= self.cfg.max_datagram {
            self.push_out(Output::Datagram { to, data });
        } else {
            self.push_out(Output::Stream { to, data });
        }
    }

    /// Carries out what foca asked for, then brings the member list up to date.
    fn flush(&mut self) {
        self.after_foca();
        let mut timers = Vec::new();
        while let Some(t) = self.rt.to_schedule() {
            timers.push(t);
        }
        let notes = std::mem::take(&mut self.notes);
        self.send_foca_packets();
        self.announce_failed_probes(&notes, &timers);
        self.schedule_foca_timers(timers);
        self.apply_notifications(notes);
        if !self.left && std::mem::take(&mut self.dirty) {
            self.reconcile();
        }
    }

    /// Wraps foca's packets in the envelope and sends them.
    fn send_foca_packets(&mut self) {
        while let Some((to, data)) = self.rt.to_send() {
            let mut buf = Vec::with_capacity(wire::HEADER_LEN + data.len());
            wire::put_header(&mut buf, Kind::Foca, self.tag);
            buf.extend_from_slice(&data);
            self.push_out(Output::Datagram {
                to: to.addr,
                data: buf.into(),
            });
        }
    }

    /// Lifeguard's independent suspicions: for each of this member's own probes that failed,
    /// tells a few members and the target (the incarnation comes from foca's suspicion timer).
    fn announce_failed_probes(
        &mut self,
        notes: &[OwnedNotification<NodeId>],
        timers: &[(Duration, Timer<NodeId>)],
    ) {
        for note in notes {
            let OwnedNotification::ProbeFailed(_, id) = note else {
                continue;
            };
            let inc = timers.iter().find_map(|(_, ev)| match ev {
                Timer::ChangeSuspectToDown {
                    member_id,
                    incarnation,
                    ..
                } if member_id == id => Some(*incarnation),
                _ => None,
            });
            if let Some(inc) = inc {
                self.announce_suspicion(*id, inc);
            }
        }
    }

    /// Queues foca's timers, noting its current token for the suspicion timers the engine
    /// starts itself.
    fn schedule_foca_timers(&mut self, timers: Vec<(Duration, Timer<NodeId>)>) {
        for (after, ev) in timers {
            if let Timer::ProbeRandomMember(token)
            | Timer::SendIndirectProbe { token, .. }
            | Timer::ChangeSuspectToDown { token, .. } = &ev
            {
                self.foca_token = Some(*token);
            }
            self.schedule(after, ev);
        }
    }

    /// Updates counters, probe round trips, health, identity and joins from foca's
    /// notifications; a membership change marks the list for recomputing.
    fn apply_notifications(&mut self, notes: Vec<OwnedNotification<NodeId>>) {
        for note in notes {
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
            if matches!(
                note,
                OwnedNotification::MemberUp(_)
                    | OwnedNotification::MemberDown(_)
                    | OwnedNotification::Rename(..)
                    | OwnedNotification::Rejoin(_)
            ) {
                self.pull_soon();
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
                    ) && self.lifeguard.heal()
                    {
                        // A probe answered: Lifeguard heals the score one step.
                        self.stats.health = self.lifeguard.health();
                    }
                }
                OwnedNotification::MemberDown(id) => {
                    self.stats.members_down += 1;
                    self.lifeguard.forget(id.addr);
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
                    self.joins.reset(self.now);
                }
                OwnedNotification::DataSent(h) => {
                    if let foca::Message::Ping(n) = h.message {
                        self.probe = Some((n, h.dst, self.now));
                    }
                }
                _ => {}
            }
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

    /// Recomputes the coordinator (the oldest eligible member) and, on the coordinator, issues
    /// a new list version when the view changed; the others only note who it is, and pull from
    /// it soon when that changes.
    fn reconcile(&mut self) {
        let state: HashMap<SocketAddr, Uuid> = self
            .foca
            .iter_membership_state()
            .map(|m| (m.id().addr, m.id().uuid))
            .collect();
        self.heard.retain(|a, u| state.get(a) == Some(u));
        let uuids: BTreeSet<Uuid> = state.values().copied().collect();
        self.zones.retain(|u, _| uuids.contains(u));
        let mut alive = self.alive();
        alive.sort_by(NodeId::cmp_age);
        let members = self.eligible(&alive);
        let coordinator = members[0];
        if self.seq.set_coordinator(coordinator.uuid) {
            tracing::debug!(coordinator = %coordinator.addr, "coordinator changed");
            self.pull_pause = self.cfg.pull_interval;
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
        let zones: BTreeMap<Uuid, Zone> = members
            .iter()
            .filter_map(|m| self.zone_of(m.uuid).map(|z| (m.uuid, z)))
            .collect();
        if self.seq.issue(members, zones, self.now) == Issue::Issued {
            tracing::debug!(ver = self.seq.held().1, "issued a list");
            // Only this member's own lists are sent, and a number it issued before may come
            // again (it adopted an older list from a coordinator that insisted), so an
            // encoding never outlives the issue it was made for.
            self.list_wire = None;
            self.joins.wake(self.now);
            let targets: Vec<SocketAddr> = self
                .seq
                .list()
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Role;
    use crate::sequencer::STALE_LISTS_TO_ADOPT;
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
                    Some(data.to_vec())
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

    /// `e` coordinates a view of its own: four younger members join it one by one, so it
    /// issues versions 2 to 5.
    fn coordinate_alone_up_to_ver_5(e: &mut Engine, first: u8) {
        for n in first..first + 4 {
            let x = engine(id(n, u64::from(n)));
            sync_into(e, &x);
            settle(e);
        }
        assert_eq!(e.list().ver, 5);
        assert_eq!(e.list().coordinator, e.me.uuid);
        e.drain_outputs();
    }

    #[test]
    fn a_member_holding_another_coordinators_list_converges_to_ours() {
        let mut a = engine(id(1, 1));
        let mut b = engine(id(2, 2));
        // `b` coordinated a view of its own for a while and holds its own list at ver 5, above
        // anything `a` issued (two coordinators during a concurrent start).
        coordinate_alone_up_to_ver_5(&mut b, 10);
        sync_into(&mut a, &b);
        sync_into(&mut b, &a);
        assert_eq!(a.list().ver, 2, "a issued its second list");
        // `a`'s push reaches b, which adopts it although its ver is lower: the coordinator
        // changed.
        deliver(&mut a, &mut b);
        assert_eq!(b.list(), a.list());
        assert_eq!(b.list().ver, 2);
        // Had the push been lost, the member's pull (holding its own list) would get it too.
        let mut c = engine(id(3, 3));
        coordinate_alone_up_to_ver_5(&mut c, 20);
        sync_into(&mut a, &c);
        sync_into(&mut c, &a);
        settle(&mut a);
        assert_eq!(a.list().ver, 3);
        a.drain_outputs();
        assert_eq!(
            c.list().coordinator,
            c.me.uuid,
            "c still holds its own list"
        );
        c.now += Duration::from_secs(2);
        c.tick(c.now);
        deliver(&mut c, &mut a);
        let answers: Vec<Vec<u8>> = sent_to(&mut a, c.me.addr)
            .into_iter()
            .filter(|d| kind_of(d) == Kind::List)
            .collect();
        assert_eq!(answers.len(), 1, "a answers the pull");
        c.handle_datagram(a.me.addr, &answers[0], c.now);
        assert_eq!(c.list(), a.list());
        // A member that already holds our list causes no answer and no new version.
        let ver = a.list().ver;
        c.now += Duration::from_secs(1);
        c.tick(c.now);
        deliver(&mut c, &mut a);
        let answers = sent_to(&mut a, c.me.addr);
        assert!(answers.iter().all(|d| kind_of(d) != Kind::List));
        assert_eq!(a.list().ver, ver);
    }

    fn zone(s: &str) -> Option<Zone> {
        Some(Zone::new(s).unwrap())
    }

    #[test]
    fn zones_travel_in_syncs_pulls_and_lists() {
        let mut a = engine(id(1, 1)).with_zone(zone("us-central1-a"));
        let mut b = engine(id(2, 2)).with_zone(zone("us-central1-b"));
        let mut c = engine(id(3, 3));
        assert_eq!(a.list().zone(a.me.uuid), zone("us-central1-a"));
        sync_into(&mut a, &b);
        sync_into(&mut b, &a);
        sync_into(&mut a, &c);
        sync_into(&mut c, &a);
        settle(&mut a);
        for o in a.drain_outputs() {
            if let Output::Datagram { to, data } = o {
                for e in [&mut b, &mut c] {
                    if e.me.addr == to {
                        e.handle_datagram(a.me.addr, &data, e.now);
                    }
                }
            }
        }
        for e in [&a, &b, &c] {
            let l = e.list();
            assert_eq!(l.members.len(), 3, "{:?}: {l:?}", e.me);
            assert_eq!(l.zone(a.me.uuid), zone("us-central1-a"));
            assert_eq!(l.zone(b.me.uuid), zone("us-central1-b"));
            assert_eq!(l.zone(c.me.uuid), None);
        }
        assert_eq!(c.zone_of(b.me.uuid), zone("us-central1-b"));
        // b's pull tells the coordinator its zone too; the same zone changes nothing.
        let ver = a.list().ver;
        let (a_uuid, b_me) = (a.me.uuid, b.me);
        let pull = |z: Option<Zone>| {
            wire::encode_pull(
                TAG,
                &PullMsg {
                    from: b_me,
                    have_ver: ver,
                    have_coordinator: a_uuid,
                    zone: z,
                },
            )
        };
        a.handle_datagram(b.me.addr, &pull(zone("us-central1-b")), a.now);
        settle(&mut a);
        assert_eq!(a.list().ver, ver);
        // A zone is fixed for a UUID: another one, or none, is refused and changes nothing.
        for lie in [zone("eu-west-1b"), None] {
            a.handle_datagram(b.me.addr, &pull(lie), a.now);
            settle(&mut a);
            assert_eq!(a.list().zone(b.me.uuid), zone("us-central1-b"));
            assert_eq!(a.list().ver, ver);
        }
        assert_eq!(a.stats().rejected.get("zone_changed"), Some(&2));
        let sync = wire::encode_sync(
            TAG,
            Kind::SyncRequest,
            &SyncMsg {
                zone: zone("elsewhere"),
                ..b.sync_msg()
            },
        );
        a.handle_stream(b.me.addr, &sync, a.now);
        assert_eq!(a.stats().rejected.get("zone_changed"), Some(&3));
        assert_eq!(a.zone_of(b.me.uuid), zone("us-central1-b"));
    }

    #[test]
    fn a_list_cannot_override_what_a_member_said_of_itself() {
        let (a, mut b) = pair();
        let mut c = engine(id(3, 3)).with_zone(zone("zone-c"));
        sync_into(&mut b, &c);
        assert_eq!(b.zone_of(c.me.uuid), zone("zone-c"));
        sync_into(&mut c, &b);
        // The coordinator lists c with another zone: b shows the coordinator's list as issued,
        // but keeps what c said of itself for the lists it may issue later.
        let list = wire::encode_list(
            TAG,
            &ListMsg {
                ver: b.list().ver + 1,
                coordinator: a.me.uuid,
                members: vec![a.me, b.me, c.me],
                zones: [(c.me.uuid, Zone::new("zone-x").unwrap())].into(),
            },
        );
        b.handle_datagram(a.me.addr, &list, b.now);
        assert_eq!(b.list().zone(c.me.uuid), zone("zone-x"));
        assert_eq!(b.zone_of(c.me.uuid), zone("zone-c"));
        // The coordinator's own entry is its own claim: changing it is refused.
        let mut a2 = a;
        a2.zone = zone("new");
        let list = wire::encode_list(
            TAG,
            &ListMsg {
                ver: b.list().ver + 1,
                coordinator: a2.me.uuid,
                members: vec![a2.me, b.me],
                zones: [(a2.me.uuid, Zone::new("new").unwrap())].into(),
            },
        );
        b.handle_datagram(a2.me.addr, &list, b.now);
        assert_eq!(b.stats().rejected.get("zone_changed"), Some(&1));
        assert!(b.list().contains(c.me.uuid));
    }

    #[test]
    fn a_new_issue_is_encoded_afresh_even_under_a_number_issued_before() {
        let (mut a, mut b) = pair();
        let ver = a.list().ver;
        let c = engine(id(3, 3));
        let pull = wire::encode_pull(
            TAG,
            &PullMsg {
                from: c.me,
                have_ver: 1,
                have_coordinator: c.me.uuid,
                zone: None,
            },
        );
        a.handle_datagram(c.me.addr, &pull, a.now);
        // An encoding left from an earlier issue under the number the next issue will take.
        a.list_wire = Some(((a.me.uuid, ver + 1), Arc::from(&b"stale"[..])));
        settle(&mut a);
        assert_eq!(a.list().ver, ver + 1);
        let pushed: Vec<Vec<u8>> = sent_to(&mut a, b.me.addr)
            .into_iter()
            .filter(|d| kind_of(d) == Kind::List)
            .collect();
        assert_eq!(pushed.len(), 1);
        b.handle_stream(a.me.addr, &pushed[0], b.now);
        assert_eq!(
            b.list(),
            a.list(),
            "b holds the new list, all three members"
        );
        assert_eq!(b.list().members.len(), 3);
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
                    zone: None,
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
                    zones: Default::default(),
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
                zones: Default::default(),
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
                    zones: Default::default(),
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
        // Serial order: after u64::MAX comes 0, then 1. u64::MAX - 1 is "older" than what b
        // holds, so the coordinator insists until b believes it.
        for _ in 0..STALE_LISTS_TO_ADOPT {
            b.handle_datagram(a.me.addr, &list(u64::MAX - 1), b.now);
        }
        assert_eq!(b.list().ver, u64::MAX - 1);
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
                zone: None,
            },
        );
        assert_eq!(data.len(), 51);
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
            zone: None,
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
                zone: None,
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
                zone: None,
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
        let s = a.lifeguard.get(b.me.addr).expect("a suspicion");
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
                zones: Default::default(),
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
                zone: None,
            },
        );
        a.handle_stream(b.me.addr, &data, a.now);
        assert_eq!(a.foca.num_members() + 1, a.cfg.member_cap);
        for _ in 0..5 {
            a.now += Duration::from_millis(500);
            a.tick(a.now);
        }
        assert_eq!(
            a.seq.coordinator(),
            a.me.uuid,
            "a ghost became the coordinator"
        );
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

    /// Runs `a` and `b` for `d` in steps of 50 ms, delivering everything between them; returns
    /// when `b` pulled.
    fn run_pair(a: &mut Engine, b: &mut Engine, d: Duration) -> Vec<Duration> {
        let mut pulls = Vec::new();
        let end = b.now + d;
        while b.now < end {
            let step = Duration::from_millis(50);
            a.now += step;
            b.now += step;
            a.tick(a.now);
            b.tick(b.now);
            for _ in 0..3 {
                for o in b.drain_outputs() {
                    if let Output::Datagram { to, data } = o
                        && to == a.me.addr
                    {
                        if kind_of(&data) == Kind::Pull {
                            pulls.push(b.now);
                        }
                        a.handle_datagram(b.me.addr, &data, a.now);
                    }
                }
                deliver(a, b);
            }
        }
        pulls
    }

    #[test]
    fn pulls_back_off_while_quiet_and_return_after_a_change() {
        let (mut a, mut b) = pair();
        let pulls = run_pair(&mut a, &mut b, Duration::from_secs(70));
        let gaps: Vec<f64> = pulls
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        assert!(gaps.len() >= 5, "{pulls:?}");
        assert!(gaps[0] <= 2.1, "the first pauses are short: {gaps:?}");
        assert!(
            gaps.windows(2).all(|g| g[1] >= g[0] - 0.06),
            "the pause only grows while quiet: {gaps:?}"
        );
        assert!(gaps.iter().all(|g| *g <= 30.06), "at most 30 s: {gaps:?}");
        assert!(gaps.iter().any(|g| *g >= 16.0), "{gaps:?}");
        assert_eq!(b.list(), a.list(), "b kept the list all along");
        // A change in b's view brings the next pull within a second.
        let c = engine(id(3, 3));
        sync_into(&mut b, &c);
        let at = b.now;
        let pulls = run_pair(&mut a, &mut b, Duration::from_millis(1100));
        assert!(
            pulls
                .first()
                .is_some_and(|t| *t - at <= Duration::from_millis(1050))
        );
    }

    #[test]
    fn a_periodic_sync_opens_with_a_digest_and_only_a_differing_view_costs_a_whole_state() {
        let (mut a, b) = pair();
        let digest = |from: &Engine, to: &Engine| {
            wire::encode_digest(
                TAG,
                &wire::DigestMsg {
                    from: from.me,
                    digest: from.view_digest(to.me.uuid),
                },
            )
        };
        // Views that agree (each knows only the other): no answer.
        a.handle_stream(b.me.addr, &digest(&b, &a), a.now);
        assert!(a.drain_outputs().is_empty());
        // a learns of c; b's view lacks it: a whole state goes back, as a request.
        let c = engine(id(3, 3));
        sync_into(&mut a, &c);
        a.drain_outputs();
        a.handle_stream(b.me.addr, &digest(&b, &a), a.now);
        let back = sent_to(&mut a, b.me.addr);
        assert_eq!(back.len(), 1);
        assert_eq!(kind_of(&back[0]), Kind::SyncRequest);
        // Only over a stream, and only from the sender's IP.
        a.handle_datagram(b.me.addr, &digest(&b, &a), a.now);
        a.handle_stream("10.0.0.9:4000".parse().unwrap(), &digest(&b, &a), a.now);
        assert!(a.drain_outputs().is_empty());
        assert_eq!(a.stats().rejected.get("sync_over_datagram"), Some(&1));
        assert_eq!(a.stats().rejected.get("spoofed_source"), Some(&1));
        // A stranger's digest gets a whole state at its own address (it is not in the view).
        let d = engine(id(4, 4));
        a.handle_stream(d.me.addr, &digest(&d, &a), a.now);
        let back = sent_to(&mut a, d.me.addr);
        assert_eq!(back.len(), 1);
        assert_eq!(kind_of(&back[0]), Kind::SyncRequest);
    }

    #[test]
    fn a_candidate_gets_a_whole_state_once_and_digests_on_retries() {
        let mut a = engine(id(1, 1));
        let dead: SocketAddr = "10.0.0.99:10081".parse().unwrap();
        a.set_candidates(vec![dead], Duration::ZERO);
        let mut streams = Vec::new();
        for _ in 0..6 {
            let t = a.next_deadline();
            a.tick(t);
            let kinds: Vec<Kind> = sent_to(&mut a, dead).iter().map(|d| kind_of(d)).collect();
            // Each contact is a foca announce and one stream.
            assert_eq!(kinds.len(), 2, "{kinds:?}");
            assert!(kinds.contains(&Kind::Foca), "{kinds:?}");
            streams.extend(kinds.into_iter().filter(|k| *k != Kind::Foca));
        }
        assert_eq!(streams[0], Kind::SyncRequest);
        assert!(
            streams[1..].iter().all(|k| *k == Kind::SyncDigest),
            "{streams:?}"
        );
    }

    #[test]
    fn every_prober_tells_the_same_witnesses() {
        let mut es: Vec<Engine> = (1..=10).map(|n| engine(id(n, u64::from(n)))).collect();
        for i in 0..es.len() {
            for j in 0..es.len() {
                if i != j {
                    let peer = wire::encode_sync(TAG, Kind::SyncResponse, &es[j].sync_msg());
                    let from = es[j].me.addr;
                    let now = es[i].now;
                    es[i].handle_stream(from, &peer, now);
                }
            }
        }
        let target = es[9].me;
        let sets: Vec<HashSet<SocketAddr>> = es[..9]
            .iter()
            .map(|e| e.witnesses(&target).into_iter().collect())
            .collect();
        for (i, w) in sets.iter().enumerate() {
            assert_eq!(w.len(), WITNESSES);
            assert!(!w.contains(&target.addr) && !w.contains(&es[i].me.addr));
        }
        // Two probers that are not witnesses themselves pick exactly the same ones.
        let outside: Vec<usize> = (0..9)
            .filter(|&i| !sets.iter().any(|w| w.contains(&es[i].me.addr)))
            .collect();
        assert!(outside.len() >= 2, "{outside:?}");
        assert_eq!(sets[outside[0]], sets[outside[1]]);
    }
}
