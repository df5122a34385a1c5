//! A deterministic simulator: N engines in virtual time, with loss, partitions and kills.
//!
//! Everything random comes from one seeded RNG, so a failing scenario replays exactly.
//! Datagrams are lost with the configured probability; streams are reliable, as TCP is, but
//! both are cut by partitions. [`Sim::inject`] hands a host forged or foreign packets, for
//! attack scenarios. Nothing here touches a socket.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use uuid::Uuid;

use crate::engine::{Config, Engine, Output};
use crate::id::{NodeId, Role};
use crate::list::MemberList;
use crate::wire;

#[derive(Debug)]
struct Delivery {
    to: SocketAddr,
    from: SocketAddr,
    data: Arc<[u8]>,
    stream: bool,
}

/// One simulated host.
#[derive(Debug)]
pub struct SimNode {
    /// The running engine, or `None` once killed.
    pub engine: Option<Engine>,
    /// The host's gossip address.
    pub addr: SocketAddr,
    /// Every list this host adopted, in order.
    pub history: Vec<MemberList>,
    /// Partition group; hosts in different groups cannot talk.
    pub group: u32,
    /// Bytes this host sent.
    pub bytes_out: u64,
    /// What this host sent, by message kind.
    pub traffic: Traffic,
}

/// IPv4 and UDP headers: what a datagram costs on the wire beyond its payload.
pub const UDP_OVERHEAD: u64 = 20 + 8;

/// An estimate of what one stream costs on the wire beyond its payload: a TCP connection per
/// message (handshake, teardown and the receiver's acknowledgements, about 7 packets of 60
/// bytes) plus 78 bytes per 1448-byte segment (its own headers and half an acknowledgement).
pub fn stream_overhead(len: u64) -> u64 {
    420 + 78 * len.div_ceil(1448).max(1)
}

/// Messages and bytes sent, by kind: foca's messages by their SWIM type, with the member updates
/// they piggyback counted apart (`piggyback_alive`, `_suspect`, `_down`: updates, not messages,
/// so the total's message count is an upper bound), and the engine's own messages by wire kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Traffic {
    /// Per kind: messages, payload bytes, and bytes on the wire (headers included).
    pub kinds: BTreeMap<&'static str, (u64, u64, u64)>,
}

impl Traffic {
    fn add(&mut self, kind: &'static str, n: u64, payload: u64, wire: u64) {
        let e = self.kinds.entry(kind).or_default();
        e.0 += n;
        e.1 += payload;
        e.2 += wire;
    }

    /// Counts one message of the cluster with this tag, as the engine sent it.
    pub fn count(&mut self, data: &[u8], stream: bool, tag: u64) {
        let len = data.len() as u64;
        let wire = len
            + if stream {
                stream_overhead(len)
            } else {
                UDP_OVERHEAD
            };
        let Ok((kind, p)) = wire::split_header(data, tag) else {
            self.add("unknown", 1, len, wire);
            return;
        };
        let name = match kind {
            wire::Kind::Foca => match wire::decode_foca(p) {
                Ok(pkt) => {
                    let mut piggy = 0;
                    // A feed's members are its content (the answer to an announce), not
                    // piggybacked updates.
                    let feed = pkt.header.message == foca::Message::Feed;
                    for m in pkt.updates.iter().flatten().filter(|_| !feed) {
                        let len = encoded_member_len(m) as u64;
                        let kind = match m.state() {
                            foca::State::Alive => "piggyback_alive",
                            foca::State::Suspect => "piggyback_suspect",
                            foca::State::Down => "piggyback_down",
                        };
                        self.add(kind, 1, len, len);
                        piggy += len;
                    }
                    let name = foca_kind(&pkt.header.message);
                    self.add(name, 1, len - piggy, wire - piggy);
                    return;
                }
                Err(_) => "foca_malformed",
            },
            wire::Kind::List => "list",
            wire::Kind::Pull => "pull",
            wire::Kind::SyncRequest => "sync_request",
            wire::Kind::SyncResponse => "sync_response",
            wire::Kind::SyncDigest => "sync_digest",
            wire::Kind::Leave => "leave",
            wire::Kind::Suspect => "suspect",
        };
        self.add(name, 1, len, wire);
    }

    /// Adds another host's counts.
    pub fn merge(&mut self, other: &Traffic) {
        for (k, (n, p, w)) in &other.kinds {
            self.add(k, *n, *p, *w);
        }
    }

    /// The counts since `before`, scaled by `1 / div` (per member and second, say).
    pub fn since(&self, before: &Traffic, div: f64) -> BTreeMap<&'static str, (f64, f64, f64)> {
        self.kinds
            .iter()
            .map(|(k, (n, p, w))| {
                let (n0, p0, w0) = before.kinds.get(k).copied().unwrap_or_default();
                (
                    *k,
                    (
                        (n - n0) as f64 / div,
                        (p - p0) as f64 / div,
                        (w - w0) as f64 / div,
                    ),
                )
            })
            .filter(|(_, (n, p, _))| *n > 0.0 || *p > 0.0)
            .collect()
    }
}

fn encoded_member_len(m: &foca::Member<NodeId>) -> usize {
    let mut buf = Vec::new();
    use foca::Codec as _;
    let _ = wire::Codec.encode_member(m, &mut buf);
    buf.len()
}

fn foca_kind(m: &foca::Message<NodeId>) -> &'static str {
    use foca::Message;
    match m {
        Message::Ping(_) => "ping",
        Message::Ack(_) => "ack",
        Message::PingReq { .. } => "ping_req",
        Message::IndirectPing { .. } => "indirect_ping",
        Message::IndirectAck { .. } => "indirect_ack",
        Message::ForwardedAck { .. } => "forwarded_ack",
        Message::Announce => "announce",
        Message::Feed => "feed",
        Message::Gossip => "gossip",
        Message::Broadcast => "broadcast",
        Message::TurnUndead => "turn_undead",
    }
}

/// The simulated network and its hosts.
#[derive(Debug)]
pub struct Sim {
    /// The hosts, by index.
    pub nodes: Vec<SimNode>,
    now: Duration,
    rng: StdRng,
    loss: f64,
    latency: Duration,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    pending: HashMap<u64, Delivery>,
    seq: u64,
    by_addr: HashMap<SocketAddr, usize>,
    cfg: Config,
    tag: u64,
}

impl Sim {
    /// A simulator with no hosts, 1 ms latency and no loss.
    pub fn new(seed: u64, cfg: Config) -> Self {
        Self {
            nodes: Vec::new(),
            now: Duration::ZERO,
            rng: StdRng::seed_from_u64(seed),
            loss: 0.0,
            latency: Duration::from_millis(1),
            queue: BinaryHeap::new(),
            pending: HashMap::new(),
            seq: 0,
            by_addr: HashMap::new(),
            cfg,
            tag: wire::cluster_tag("sim", "all"),
        }
    }

    /// The current virtual time.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// The cluster tag every host uses, for forging messages.
    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// The gossip address of host `i`.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].addr
    }

    /// The identity host `i` runs with, if it runs.
    pub fn id(&self, i: usize) -> Option<NodeId> {
        self.nodes[i].engine.as_ref().map(|e| *e.me())
    }

    /// Hands host `to` a datagram now, as if it came from `from`: a forged or foreign packet.
    /// Whatever the host sends in answer crosses the network as usual; sent to an address
    /// no host has, it is lost.
    pub fn inject(&mut self, to: usize, from: SocketAddr, data: &[u8]) {
        let now = self.now;
        if let Some(e) = self.nodes[to].engine.as_mut() {
            e.handle_datagram(from, data, now);
        }
        self.collect(to);
    }

    /// Like [`Sim::inject`], over a stream whose source is `from`.
    pub fn inject_stream(&mut self, to: usize, from: SocketAddr, data: &[u8]) {
        let now = self.now;
        if let Some(e) = self.nodes[to].engine.as_mut() {
            e.handle_stream(from, data, now);
        }
        self.collect(to);
    }

    /// Drops this fraction of datagrams, in `[0, 1]`.
    pub fn set_loss(&mut self, loss: f64) {
        self.loss = loss.clamp(0.0, 1.0);
    }

    fn addr_of(i: usize) -> SocketAddr {
        let i = i as u32 + 1;
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(198, 18, (i >> 8) as u8, (i & 0xff) as u8)),
            10081,
        )
    }

    /// Adds `n` hosts that start now; each one's candidates are all hosts (static discovery).
    pub fn add_nodes(&mut self, n: usize) -> Vec<usize> {
        let first = self.nodes.len();
        for i in first..first + n {
            let addr = Self::addr_of(i);
            self.by_addr.insert(addr, i);
            self.nodes.push(SimNode {
                engine: None,
                addr,
                history: Vec::new(),
                group: 0,
                bytes_out: 0,
                traffic: Traffic::default(),
            });
            self.start(i);
        }
        let all: Vec<SocketAddr> = self.nodes.iter().map(|n| n.addr).collect();
        for node in &mut self.nodes {
            if let Some(e) = node.engine.as_mut() {
                e.set_candidates(all.clone(), self.now);
            }
        }
        (first..first + n).collect()
    }

    /// Starts (or restarts) host `i` with a fresh UUID.
    pub fn start(&mut self, i: usize) {
        let uuid = Uuid::from_u128(self.rng.random());
        let started_ms = 1_000_000 + self.now.as_millis() as u64 * 1000 + i as u64;
        let me = NodeId::new(self.nodes[i].addr, uuid, started_ms, Role::Worker);
        let mut e = Engine::new(me, self.tag, self.cfg.clone(), self.rng.random(), self.now);
        let all: Vec<SocketAddr> = self.nodes.iter().map(|n| n.addr).collect();
        e.set_candidates(all, self.now);
        self.nodes[i].engine = Some(e);
        self.collect(i);
    }

    /// Kills host `i` at once, like kill -9.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].engine = None;
    }

    /// Host `i` leaves gracefully, then stops.
    pub fn leave(&mut self, i: usize) {
        let now = self.now;
        if let Some(e) = self.nodes[i].engine.as_mut() {
            e.leave(now);
        }
        self.collect(i);
        self.nodes[i].engine = None;
    }

    /// Puts each host in a partition group; hosts in different groups cannot talk.
    pub fn partition(&mut self, groups: &[u32]) {
        for (n, g) in self.nodes.iter_mut().zip(groups) {
            n.group = *g;
        }
    }

    /// Removes every partition.
    pub fn heal(&mut self) {
        for n in &mut self.nodes {
            n.group = 0;
        }
    }

    fn collect(&mut self, i: usize) {
        let Some(e) = self.nodes[i].engine.as_mut() else {
            return;
        };
        let outs = e.drain_outputs();
        let changes = e.drain_changes();
        self.nodes[i].history.extend(changes);
        let from = self.nodes[i].addr;
        for o in outs {
            let (to, data, stream) = match o {
                Output::Datagram { to, data } => (to, data, false),
                Output::Stream { to, data } => (to, data, true),
            };
            self.nodes[i].bytes_out += data.len() as u64;
            let tag = self.tag;
            self.nodes[i].traffic.count(&data, stream, tag);
            if !stream && self.rng.random_bool(self.loss) {
                continue;
            }
            let jitter = self.latency.mul_f64(self.rng.random_range(0.5..1.5));
            self.seq += 1;
            self.pending.insert(
                self.seq,
                Delivery {
                    to,
                    from,
                    data,
                    stream,
                },
            );
            self.queue.push(Reverse((self.now + jitter, self.seq)));
        }
    }

    /// Runs the simulation for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.run_until(end, |_| false);
    }

    /// Runs until `done` holds (checked after each step) or virtual time reaches `deadline`.
    /// Returns whether `done` held.
    pub fn run_until(&mut self, deadline: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        // A bound on steps, far above what any scenario needs, so a bug cannot spin forever.
        let mut steps: u64 = 0;
        while self.now < deadline && steps < 200_000_000 {
            steps += 1;
            let next_msg = self.queue.peek().map(|Reverse((t, _))| *t);
            let next_tick = self
                .nodes
                .iter()
                .filter_map(|n| n.engine.as_ref().map(|e| e.next_deadline()))
                .min();
            let next = [next_msg, next_tick, Some(deadline)]
                .into_iter()
                .flatten()
                .min()
                .expect("deadline is always there");
            // Never stand still: at least 1 ms per step when only ticks are due.
            self.now = next.max(self.now).min(deadline);
            while let Some(Reverse((t, seq))) = self.queue.peek().copied() {
                if t > self.now {
                    break;
                }
                self.queue.pop();
                let Some(d) = self.pending.remove(&seq) else {
                    continue;
                };
                self.deliver(d);
            }
            let now = self.now;
            for i in 0..self.nodes.len() {
                let due = self.nodes[i]
                    .engine
                    .as_ref()
                    .is_some_and(|e| e.next_deadline() <= now);
                if due {
                    if let Some(e) = self.nodes[i].engine.as_mut() {
                        e.tick(now);
                    }
                    self.collect(i);
                }
            }
            if done(self) {
                return true;
            }
            if next_msg.is_none_or(|m| m > self.now) && next_tick.is_some_and(|t| t <= self.now) {
                // Ticks that produce no progress must still let time move.
                self.now += Duration::from_millis(1);
            }
        }
        done(self)
    }

    fn deliver(&mut self, d: Delivery) {
        let Some(&i) = self.by_addr.get(&d.to) else {
            return;
        };
        let Some(&j) = self.by_addr.get(&d.from) else {
            return;
        };
        if self.nodes[i].group != self.nodes[j].group {
            return;
        }
        let now = self.now;
        let Some(e) = self.nodes[i].engine.as_mut() else {
            return;
        };
        if d.stream {
            e.handle_stream(d.from, &d.data, now);
        } else {
            e.handle_datagram(d.from, &d.data, now);
        }
        self.collect(i);
    }

    /// The list host `i` holds now, if it runs.
    pub fn list(&self, i: usize) -> Option<&MemberList> {
        self.nodes[i].engine.as_ref().map(|e| e.list())
    }

    /// The UUID host `i` runs with, if it runs.
    pub fn uuid(&self, i: usize) -> Option<Uuid> {
        self.nodes[i].engine.as_ref().map(|e| e.me().uuid)
    }

    /// Whether every host in `hosts` runs and holds the same list, with exactly those hosts.
    pub fn converged(&self, hosts: &[usize]) -> bool {
        let mut want: Vec<Uuid> = match hosts.iter().map(|&i| self.uuid(i)).collect() {
            Some(v) => v,
            None => return false,
        };
        want.sort();
        let Some(first) = self.list(hosts[0]) else {
            return false;
        };
        let mut got: Vec<Uuid> = first.members.iter().map(|m| m.uuid).collect();
        got.sort();
        if got != want {
            return false;
        }
        hosts
            .iter()
            .all(|&i| self.list(i).is_some_and(|l| l == first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(seed: u64) -> Sim {
        Sim::new(seed, Config::lan())
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn three_nodes_converge_to_one_list_with_the_same_ver() {
        let mut s = sim(1);
        let all = s.add_nodes(3);
        assert!(s.run_until(secs(5), |s| s.converged(&all)));
        let l = s.list(0).unwrap().clone();
        // Oldest first.
        assert!(l.members.windows(2).all(|w| w[0].cmp_age(&w[1]).is_lt()));
        // ver only grows on every host.
        for n in &s.nodes {
            assert!(n.history.windows(2).all(|w| w[0].ver < w[1].ver));
        }
    }

    #[test]
    fn fifty_nodes_started_at_once_converge() {
        let mut s = sim(2);
        let all = s.add_nodes(50);
        assert!(
            s.run_until(secs(10), |s| s.converged(&all)),
            "not converged after 10 s"
        );
    }

    #[test]
    fn a_killed_node_is_removed_from_every_list() {
        let mut s = sim(3);
        let all = s.add_nodes(5);
        assert!(s.run_until(secs(5), |s| s.converged(&all)));
        s.kill(2);
        let rest = [0, 1, 3, 4];
        assert!(
            s.run_until(s.now() + secs(10), |s| s.converged(&rest)),
            "survivors did not drop the killed node"
        );
    }

    #[test]
    fn a_graceful_leave_is_seen_within_a_second() {
        let mut s = sim(4);
        let all = s.add_nodes(4);
        assert!(s.run_until(secs(5), |s| s.converged(&all)));
        s.run_for(secs(2));
        let t0 = s.now();
        s.leave(0);
        let rest = [1, 2, 3];
        assert!(s.run_until(t0 + secs(1), |s| s.converged(&rest)));
    }

    #[test]
    fn a_partition_heals_into_one_list() {
        let mut s = sim(5);
        let all = s.add_nodes(6);
        assert!(s.run_until(secs(5), |s| s.converged(&all)));
        s.partition(&[0, 0, 0, 1, 1, 1]);
        assert!(
            s.run_until(s.now() + secs(20), |s| s.converged(&[0, 1, 2])
                && s.converged(&[3, 4, 5])),
            "each side must settle on its own list"
        );
        s.heal();
        assert!(
            s.run_until(s.now() + secs(20), |s| s.converged(&all)),
            "the sides did not merge"
        );
        for n in &s.nodes {
            assert!(n.history.windows(2).all(|w| w[0].ver < w[1].ver));
        }
    }

    #[test]
    fn no_false_removal_in_ten_minutes_at_ten_percent_loss() {
        let mut s = sim(6);
        let all = s.add_nodes(3);
        assert!(s.run_until(secs(5), |s| s.converged(&all)));
        let before: Vec<usize> = s.nodes.iter().map(|n| n.history.len()).collect();
        s.set_loss(0.10);
        s.run_for(secs(600));
        for (n, b) in s.nodes.iter().zip(before) {
            for l in &n.history[b..] {
                assert_eq!(l.members.len(), 3, "a live member was removed: {l:?}");
            }
        }
        assert!(s.converged(&all));
    }

    #[test]
    fn a_restart_on_the_same_address_replaces_the_old_uuid() {
        let mut s = sim(7);
        let all = s.add_nodes(3);
        assert!(s.run_until(secs(5), |s| s.converged(&all)));
        let old = s.uuid(1).unwrap();
        s.kill(1);
        s.run_for(Duration::from_millis(200));
        s.start(1);
        assert!(s.run_until(s.now() + secs(10), |s| s.converged(&all)));
        assert!(!s.list(0).unwrap().contains(old));
    }

    /// The sizes of the lists each host adopted from `since[i]` on.
    fn lists_since(s: &Sim, since: &[usize]) -> Vec<Vec<usize>> {
        s.nodes
            .iter()
            .zip(since)
            .map(|(n, b)| n.history[*b..].iter().map(|l| l.members.len()).collect())
            .collect()
    }

    /// The capture attack: one forged message per member, then a kill. Before versions were
    /// sequenced by their coordinator only, a claimed `u64::MAX` pinned them and the killed
    /// member stayed in every list for good.
    #[test]
    fn forged_versions_cannot_stop_lists_from_changing() {
        use crate::wire::{ListMsg, PullMsg};
        let outsider: SocketAddr = "198.18.200.1:10081".parse().unwrap();
        for variant in 0..6 {
            let mut s = sim(20 + variant);
            let all = s.add_nodes(4);
            assert!(s.run_until(secs(5), |s| s.converged(&all)));
            s.run_for(secs(2));
            let tag = s.tag();
            let ids: Vec<NodeId> = all.iter().map(|&i| s.id(i).unwrap()).collect();
            let held = s.list(0).unwrap().ver;
            let list = |ver| {
                wire::encode_list(
                    tag,
                    &ListMsg {
                        ver,
                        coordinator: ids[0].uuid,
                        members: ids.clone(),
                        zones: Default::default(),
                    },
                )
            };
            let pull = |from: NodeId| {
                wire::encode_pull(
                    tag,
                    &PullMsg {
                        from,
                        have_ver: u64::MAX,
                        have_coordinator: ids[0].uuid,
                        zone: None,
                    },
                )
            };
            for i in 0..4 {
                let (from, data) = match variant {
                    // A pull from an outsider, and one from a member's own address.
                    0 => (
                        outsider,
                        pull(NodeId::new(outsider, Uuid::from_u128(9), 1, Role::Worker)),
                    ),
                    1 => {
                        let liar = ids[(i + 1) % 4];
                        (liar.addr, pull(liar))
                    }
                    // The coordinator's list from another address.
                    2 => (outsider, list(u64::MAX - 1)),
                    3 => (ids[1].addr, list(u64::MAX - 1)),
                    // The coordinator's list from its own address (a forged source, or a
                    // coordinator that lies): near the top, and half the number circle ahead.
                    4 => (ids[0].addr, list(u64::MAX - 1)),
                    _ => (ids[0].addr, list(held.wrapping_add(1 << 62))),
                };
                s.inject(i, from, &data);
            }
            // Only the list half the number circle ahead, from the coordinator's own address,
            // passes as newer; `u64::MAX - 1` is behind a small version in serial order.
            let adopted = s.list(1).unwrap().ver != held;
            assert_eq!(adopted, variant == 5, "variant {variant}");
            s.run_for(Duration::from_millis(500));
            s.kill(3);
            let t0 = s.now();
            assert!(
                s.run_until(t0 + secs(15), |s| s.converged(&[0, 1, 2])),
                "variant {variant}: survivors still list {:?}",
                (0..3)
                    .map(|i| s.list(i).map(|l| l.members.len()))
                    .collect::<Vec<_>>()
            );
            // And lists keep moving: a restart of host 3 is listed again.
            s.start(3);
            assert!(
                s.run_until(s.now() + secs(15), |s| s.converged(&all)),
                "variant {variant}: the restarted host was not listed again"
            );
            if variant < 4 {
                // Nothing forged was adopted, so versions only moved forward.
                assert!(forward_per_coordinator(&s), "variant {variant}");
            }
        }
    }

    #[test]
    fn a_forged_down_does_not_remove_a_live_member() {
        let mut s = sim(30);
        let all = s.add_nodes(4);
        assert!(s.run_until(secs(5), |s| s.converged(&all)));
        let since: Vec<usize> = s.nodes.iter().map(|n| n.history.len()).collect();
        // Host 1 (a key holder) tells everyone, from its own address, that host 2 is down.
        let liar = s.id(1).unwrap();
        let victim = s.id(2).unwrap();
        let tag = s.tag();
        for i in [0, 3] {
            let pkt = wire::FocaPacket {
                header: foca::Header {
                    src: liar,
                    src_incarnation: 0,
                    dst: s.id(i).unwrap(),
                    message: foca::Message::Gossip,
                },
                updates: Some(vec![foca::Member::down(victim)]),
                tail: Vec::new(),
            };
            let data = wire::encode_foca(tag, &pkt).unwrap();
            s.inject(i, liar.addr, &data);
        }
        // A leave in its name, from the liar's address.
        let leave = wire::encode_leave(tag, &victim);
        for i in [0, 3] {
            s.inject(i, liar.addr, &leave);
        }
        s.run_for(secs(30));
        for (i, sizes) in lists_since(&s, &since).iter().enumerate() {
            assert!(sizes.iter().all(|&n| n == 4), "host {i} logged {sizes:?}");
        }
        assert!(s.converged(&all));
    }

    /// A key holder that keeps relaying `Down`s about a live member, each at a higher
    /// incarnation than the last refutation, over a lossy network.
    #[test]
    fn a_persistent_liar_cannot_remove_a_live_member() {
        let mut s = sim(33);
        let all = s.add_nodes(5);
        assert!(s.run_until(secs(5), |s| s.converged(&all)));
        let since: Vec<usize> = s.nodes.iter().map(|n| n.history.len()).collect();
        s.set_loss(0.05);
        let liar = s.id(1).unwrap();
        let victim = s.id(2).unwrap();
        let tag = s.tag();
        for k in 0..60u16 {
            for i in [0, 3, 4] {
                let pkt = wire::FocaPacket {
                    header: foca::Header {
                        src: liar,
                        src_incarnation: 0,
                        dst: s.id(i).unwrap(),
                        message: foca::Message::Gossip,
                    },
                    updates: Some(vec![foca::Member::new(
                        victim,
                        100 + 2 * k,
                        foca::State::Down,
                    )]),
                    tail: Vec::new(),
                };
                s.inject(i, liar.addr, &wire::encode_foca(tag, &pkt).unwrap());
            }
            s.run_for(Duration::from_millis(500));
        }
        for (i, sizes) in lists_since(&s, &since).iter().enumerate() {
            assert!(sizes.iter().all(|&n| n == 5), "host {i} logged {sizes:?}");
        }
        let refuted = s.nodes[2]
            .engine
            .as_ref()
            .unwrap()
            .stats()
            .suspicions_refuted;
        assert!(
            refuted >= 30,
            "the lies reached the victim only {refuted} times"
        );
        assert_eq!(
            s.id(2),
            Some(victim),
            "the victim had to renew its identity"
        );
    }

    #[test]
    fn a_sync_flood_of_ghosts_never_reaches_a_list() {
        use crate::wire::{Kind, SyncMsg};
        let mut cfg = Config::lan();
        cfg.member_cap = 64;
        let mut s = Sim::new(31, cfg);
        let all = s.add_nodes(4);
        assert!(s.run_until(secs(5), |s| s.converged(&all)));
        let real: Vec<Uuid> = all.iter().map(|&i| s.uuid(i).unwrap()).collect();
        let ghosts: Vec<foca::Member<NodeId>> = (0..10_000u32)
            .map(|i| {
                let [_, x, y, z] = i.to_be_bytes();
                foca::Member::alive(NodeId::new(
                    SocketAddr::from(([172, 16 + x, y, z], 10081)),
                    Uuid::from_u128(u128::from(i) + 1),
                    // Older than every host: a ghost coordinator would freeze the lists.
                    0,
                    Role::Worker,
                ))
            })
            .collect();
        // Host 1 (a key holder) syncs them into host 0, over a stream from its own address.
        let from = s.id(1).unwrap();
        let data = wire::encode_sync(
            s.tag(),
            Kind::SyncRequest,
            &SyncMsg {
                from,
                members: ghosts,
                zone: None,
            },
        );
        s.inject_stream(0, from.addr, &data);
        s.run_for(secs(20));
        for n in &s.nodes {
            for l in &n.history {
                assert!(l.members.iter().all(|m| real.contains(&m.uuid)), "{l:?}");
            }
            let e = n.engine.as_ref().unwrap();
            assert!(e.alive().len() <= 64, "{} members", e.alive().len());
        }
        // Lists still follow the cluster: a kill is seen.
        s.kill(3);
        assert!(
            s.run_until(s.now() + secs(30), |s| s.converged(&[0, 1, 2])),
            "the kill was not seen"
        );
    }

    /// On every host, consecutive lists from one coordinator move forward in serial order.
    fn forward_per_coordinator(s: &Sim) -> bool {
        s.nodes.iter().all(|n| {
            n.history.windows(2).all(|w| {
                w[0].coordinator != w[1].coordinator || crate::list::ver_newer(w[1].ver, w[0].ver)
            })
        })
    }

    #[test]
    fn the_coordinator_killed_and_restarted_hands_over_without_help() {
        let mut s = sim(32);
        let all = s.add_nodes(4);
        assert!(s.run_until(secs(5), |s| s.converged(&all)));
        let first = s.list(1).unwrap().clone();
        assert_eq!(first.coordinator, s.uuid(0).unwrap());
        s.kill(0);
        assert!(s.run_until(s.now() + secs(10), |s| s.converged(&[1, 2, 3])));
        let second = s.list(1).unwrap().clone();
        assert_eq!(
            second.coordinator,
            s.uuid(1).unwrap(),
            "the next oldest took over"
        );
        assert!(
            crate::list::ver_newer(second.ver, first.ver),
            "it continued from what it held"
        );
        // The old coordinator's address comes back as a new, youngest process.
        s.start(0);
        assert!(s.run_until(s.now() + secs(10), |s| s.converged(&all)));
        assert_eq!(s.list(0).unwrap().coordinator, s.uuid(1).unwrap());
        assert!(forward_per_coordinator(&s));
    }

    #[test]
    fn stats_count_direct_probe_round_trips() {
        let mut s = sim(8);
        let all = s.add_nodes(3);
        assert!(s.run_until(secs(5), |s| s.converged(&all)));
        s.run_for(secs(60));
        for n in &s.nodes {
            let st = n.engine.as_ref().unwrap().stats();
            let probes: u64 = st.probe_rtt_buckets.iter().sum();
            // One probe every period; the simulator's 0.5 to 1.5 ms latency each way.
            let period = Config::lan().swim.probe_period.as_secs_f64();
            let want = (60.0 / period * 0.8) as u64;
            assert!(probes > want, "a member probes once a period: {probes}");
            let mean = st.probe_rtt_sum / u32::try_from(probes).unwrap();
            assert!(
                mean >= Duration::from_millis(1) && mean <= Duration::from_millis(3),
                "{mean:?}"
            );
            assert_eq!(st.probe_rtt_buckets[0], 0, "no round trip is under 500 us");
        }
    }
}

/// The simulator scenarios `cargo xtask bench` reports, in virtual seconds.
pub mod scenarios {
    use super::*;

    /// Seconds from a simultaneous start of `n` hosts until all hold one list of `n`.
    pub fn converge(n: usize, seed: u64) -> Option<f64> {
        let mut s = Sim::new(seed, Config::lan());
        let all = s.add_nodes(n);
        s.run_until(Duration::from_secs(120), |s| s.converged(&all))
            .then(|| s.now().as_secs_f64())
    }

    /// Seconds from a kill until every survivor's list lacks the victim.
    pub fn detect(n: usize, seed: u64) -> Option<f64> {
        let mut s = Sim::new(seed, Config::lan());
        let all = s.add_nodes(n);
        if !s.run_until(Duration::from_secs(120), |s| s.converged(&all)) {
            return None;
        }
        s.run_for(Duration::from_secs(5));
        let t0 = s.now();
        let victim = n / 2;
        s.kill(victim);
        let rest: Vec<usize> = all.into_iter().filter(|&i| i != victim).collect();
        s.run_until(t0 + Duration::from_secs(60), |s| s.converged(&rest))
            .then(|| (s.now() - t0).as_secs_f64())
    }

    /// Bytes sent per second per member in a converged, quiet cluster.
    pub fn bytes_per_second(n: usize, seed: u64, window: Duration) -> Option<f64> {
        let mut s = Sim::new(seed, Config::lan());
        let all = s.add_nodes(n);
        if !s.run_until(Duration::from_secs(120), |s| s.converged(&all)) {
            return None;
        }
        // Let the start-up gossip and the first periodic syncs settle.
        s.run_for(Duration::from_secs(30));
        let before: u64 = s.nodes.iter().map(|x| x.bytes_out).sum();
        s.run_for(window);
        let after: u64 = s.nodes.iter().map(|x| x.bytes_out).sum();
        Some((after - before) as f64 / n as f64 / window.as_secs_f64())
    }

    /// What a member of a converged, quiet cluster sends per second, by message kind:
    /// (messages, payload bytes, bytes on the wire with headers), and the total of each.
    pub fn traffic(
        n: usize,
        seed: u64,
        window: Duration,
    ) -> Option<BTreeMap<&'static str, (f64, f64, f64)>> {
        let mut s = Sim::new(seed, Config::lan());
        let all = s.add_nodes(n);
        if !s.run_until(Duration::from_secs(120), |s| s.converged(&all)) {
            return None;
        }
        s.run_for(Duration::from_secs(30));
        let total = |s: &Sim| {
            let mut t = Traffic::default();
            for x in &s.nodes {
                t.merge(&x.traffic);
            }
            t
        };
        let before = total(&s);
        s.run_for(window);
        let mut by_kind = total(&s).since(&before, n as f64 * window.as_secs_f64());
        let sum = by_kind
            .values()
            .fold((0.0, 0.0, 0.0), |a, v| (a.0 + v.0, a.1 + v.1, a.2 + v.2));
        by_kind.insert("total", sum);
        Some(by_kind)
    }

    /// Lists, logged by any host, that lack a member which was alive all along.
    pub fn false_removals(n: usize, seed: u64, loss: f64, window: Duration) -> Option<usize> {
        let mut s = Sim::new(seed, Config::lan());
        let all = s.add_nodes(n);
        if !s.run_until(Duration::from_secs(120), |s| s.converged(&all)) {
            return None;
        }
        let before: Vec<usize> = s.nodes.iter().map(|x| x.history.len()).collect();
        s.set_loss(loss);
        s.run_for(window);
        Some(
            s.nodes
                .iter()
                .zip(before)
                .map(|(x, b)| {
                    x.history[b..]
                        .iter()
                        .filter(|l| l.members.len() < n)
                        .count()
                })
                .sum(),
        )
    }
}

#[cfg(test)]
mod scenario_tests {
    use super::UDP_OVERHEAD;
    use super::scenarios::*;
    use std::time::Duration;

    #[test]
    fn scenarios_produce_figures_on_small_clusters() {
        let c = converge(10, 1).expect("converges");
        assert!(c > 0.0 && c < 10.0, "{c}");
        let d = detect(10, 2).expect("detects");
        assert!(d > 0.0 && d < 20.0, "{d}");
        let b = bytes_per_second(10, 3, Duration::from_secs(20)).expect("measures");
        assert!(b > 10.0, "{b}");
        assert_eq!(false_removals(3, 4, 0.0, Duration::from_secs(30)), Some(0));
    }

    #[test]
    fn traffic_is_counted_by_kind_and_adds_up() {
        let t = traffic(10, 3, Duration::from_secs(20)).expect("measures");
        let (n, payload, wire) = t["total"];
        for kind in ["ping", "ack", "pull"] {
            assert!(t.get(kind).is_some_and(|v| v.0 > 0.0), "{kind}: {t:?}");
        }
        assert!(n > 1.0 && payload > 10.0, "{t:?}");
        // Every datagram costs at least its UDP/IP headers on the wire.
        assert!(wire >= payload + n * UDP_OVERHEAD as f64, "{t:?}");
        let b = bytes_per_second(10, 3, Duration::from_secs(20)).expect("measures");
        assert!((payload - b).abs() < 1e-6, "{payload} vs {b}");
    }

    /// What a member sends per second, by kind, at a few sizes; run with
    /// `cargo test -p membership --release --lib -- --ignored --nocapture traffic_breakdown`.
    #[test]
    #[ignore = "slow: a minute of wall time at 200 members"]
    fn traffic_breakdown() {
        for n in [3, 30, 200] {
            let t = traffic(n, 3, Duration::from_secs(60)).expect("measures");
            eprintln!("n={n}: kind msgs/s payload B/s wire B/s");
            for (k, (m, p, w)) in &t {
                eprintln!("  {k:<14} {m:>7.2} {p:>9.1} {w:>9.1}");
            }
        }
    }

    /// The figures `cargo xtask bench` reports for the simulator, at its sizes; run with
    /// `cargo test -p membership --release --lib -- --ignored --nocapture figures`.
    #[test]
    #[ignore = "slow: minutes of wall time at 1000 members"]
    fn figures_at_the_bench_sizes() {
        for n in [100, 200, 500, 1000] {
            let c = converge(n, 1).expect("converges");
            let d = detect(n, 2).expect("detects");
            eprintln!("n={n} converge={c:.3} s detect={d:.3} s");
            assert!(c < 60.0 && d < 30.0, "n={n}: converge {c} s, detect {d} s");
        }
    }
}
