//! The wire under one logical cluster: sealing, stream framing, the limits on what peers may
//! send (datagram size, stream rate, read slots, deadlines) and the counters of what was dropped.
//! The engine loop in `cluster` hands it datagrams and outputs; nothing here knows the engine.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyring::Sealer;
use membership::{Output, wire};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, mpsc, watch};

/// Streams being sent at once; more wait in line (see [`SendQueue`]).
const MAX_OUTGOING_STREAMS: usize = 64;
/// Outgoing streams waiting or in flight at once; more are dropped, and the pull path
/// recovers. A list pushed to every member of the largest cluster (`--max_members`, 1024 by
/// default) fits several times over.
const MAX_QUEUED_STREAMS: usize = 4096;
/// Bytes of outgoing streams waiting or in flight at once; more are dropped.
const MAX_QUEUED_BYTES: usize = 32 << 20;
/// How long a connect may take: past the first SYN retransmission (1 s), so a SYN dropped by
/// a busy peer's full accept queue costs a second, not the stream.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(2500);
/// How long a stream may wait for its turn; an older one is stale and dropped.
const QUEUE_WAIT: Duration = Duration::from_secs(2);
/// Streams being read at once; more connections are closed at once.
const MAX_INCOMING_STREAMS: usize = 128;
/// Of the read slots, those only known peers (members in the view, discovered candidates) may
/// use, so strangers holding every other slot cannot stop syncs between members.
const RESERVED_STREAMS: usize = 32;
/// Read slots one unknown source (an IPv4 address, an IPv6 /64) may hold at once.
const STREAMS_PER_SOURCE: usize = 4;
/// Read slots one known peer IP may hold at once; several nodes may share an address.
const STREAMS_PER_PEER_IP: usize = 16;
/// How long a new connection has to deliver its stream head (authenticated when a key is set).
const HEAD_DEADLINE: Duration = Duration::from_secs(1);
/// How long the body may take once the head was accepted.
const BODY_DEADLINE: Duration = Duration::from_secs(4);
/// The body buffer's first capacity; it grows only as bytes arrive.
const BODY_INITIAL_CAPACITY: usize = 16 * 1024;
/// The stream head's plaintext starts with this: a magic that differs from the envelope's (so a
/// head never decodes as a message, nor a message as a head) and the head's format version.
const HEAD_MAGIC: [u8; 3] = [0xC5, 0x1B, 1];
/// The head's plaintext: the magic and the body length (u32, big-endian).
const HEAD_PLAIN_LEN: usize = HEAD_MAGIC.len() + 4;
/// An encoded member in a sync: its identity, incarnation (u16) and state (u8).
const MEMBER_LEN: usize = wire::MAX_ID_LEN + 2 + 1;
/// New streams (syncs, the join path) one source IP may open in a burst.
const STREAM_BURST: f64 = 20.0;
/// New streams per second one source IP may open once its burst is spent.
const STREAM_RATE: f64 = 10.0;
/// Source IPs whose stream rate is tracked; beyond it the idle ones are forgotten.
const MAX_TRACKED_SOURCES: usize = 4096;
/// The shortest pause between two warnings about dropped packets.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The largest stream body a legal message needs: a sync or a list of `max_members` members
/// of the largest encoding (IPv6, the longest zone), plus the sealing when `sealed`.
pub fn max_stream_body(max_members: usize, sealed: bool) -> usize {
    let sync =
        wire::HEADER_LEN + wire::MAX_ID_LEN + wire::MAX_ZONE_LEN + 4 + max_members * MEMBER_LEN;
    let list =
        wire::HEADER_LEN + 8 + 16 + 4 + max_members * (wire::MAX_ID_LEN + wire::MAX_ZONE_LEN);
    sync.max(list) + if sealed { keyring::OVERHEAD } else { 0 }
}

/// How a cluster's traffic is protected: every datagram and stream frame is sealed with the
/// cluster key, bound to the cluster name and logical cluster by `aad`.
#[derive(Debug, Clone)]
pub struct Protection {
    /// The sealer, shared by both clusters of a node and reloaded on SIGHUP.
    pub sealer: Arc<Sealer>,
    /// `keyring::aad(cluster_name, logical)`.
    pub aad: Vec<u8>,
}

impl Protection {
    fn seal(&self, plain: &[u8]) -> Vec<u8> {
        self.sealer.seal(&self.aad, plain)
    }
}

fn open<'a>(p: Option<&Protection>, data: &'a [u8]) -> Result<Cow<'a, [u8]>, &'static str> {
    match p {
        None => Ok(Cow::Borrowed(data)),
        Some(p) => p
            .sealer
            .open(&p.aad, data)
            .map(Cow::Owned)
            .map_err(|e| e.reason()),
    }
}

/// Packets the driver dropped before the engine saw them, by reason, and when it last warned.
#[derive(Debug)]
struct Drops {
    cluster: &'static str,
    counts: BTreeMap<&'static str, u64>,
    last_warn: Option<Instant>,
    since_warn: u64,
}

type SharedDrops = Arc<Mutex<Drops>>;

impl Drops {
    fn shared(cluster: &'static str) -> SharedDrops {
        Arc::new(Mutex::new(Drops {
            cluster,
            counts: BTreeMap::new(),
            last_warn: None,
            since_warn: 0,
        }))
    }
}

fn drop_packet(drops: &SharedDrops, reason: &'static str, from: SocketAddr) {
    let mut d = drops.lock().unwrap_or_else(|p| p.into_inner());
    *d.counts.entry(reason).or_default() += 1;
    d.since_warn += 1;
    let now = Instant::now();
    if d.last_warn
        .is_none_or(|t| now.duration_since(t) >= WARN_INTERVAL)
    {
        tracing::warn!(
            cluster = d.cluster,
            %from,
            reason,
            dropped = d.since_warn,
            "dropped packets that failed checks (count since the last warning); if this peer is \
             yours, check that every node has the same --cluster_key_file, --cluster_name and \
             a synchronised clock"
        );
        d.last_warn = Some(now);
        d.since_warn = 0;
    }
}

/// A token bucket per source IP for new streams, so one host cannot flood the join path.
#[derive(Debug, Default)]
struct StreamRate {
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl StreamRate {
    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let ip = source_key(ip);
        if self.buckets.len() >= MAX_TRACKED_SOURCES && !self.buckets.contains_key(&ip) {
            // Forget sources whose bucket has refilled: they are idle.
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * STREAM_RATE < STREAM_BURST
            });
            if self.buckets.len() >= MAX_TRACKED_SOURCES {
                return false;
            }
        }
        let (tokens, at) = self.buckets.entry(ip).or_insert((STREAM_BURST, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * STREAM_RATE).min(STREAM_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The key a source's share of read slots is counted under: the IPv4 address, or the /64 of an
/// IPv6 address (one host usually holds a whole /64).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

/// How the read slots of incoming streams are shared.
#[derive(Debug, Clone, Copy)]
struct SlotLimits {
    /// Slots in all.
    total: usize,
    /// Of those, slots only known peers may take once the others are held.
    reserved: usize,
    /// Slots one unknown source may hold.
    per_source: usize,
    /// Slots one known peer IP may hold.
    per_peer_ip: usize,
}

impl Default for SlotLimits {
    fn default() -> Self {
        Self {
            total: MAX_INCOMING_STREAMS,
            reserved: RESERVED_STREAMS,
            per_source: STREAMS_PER_SOURCE,
            per_peer_ip: STREAMS_PER_PEER_IP,
        }
    }
}

#[derive(Debug, Default)]
struct SlotState {
    general: usize,
    reserved: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// The read slots of incoming streams: a fair share per source, and a reserve that only known
/// peers can use. The table holds only sources with a slot, so it is bounded by `total`.
#[derive(Debug)]
struct Slots {
    limits: SlotLimits,
    state: Mutex<SlotState>,
}

/// One held read slot, given back when dropped.
#[derive(Debug)]
struct Slot {
    slots: Arc<Slots>,
    source: IpAddr,
    reserved: bool,
}

impl Slots {
    fn new(limits: SlotLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::new(SlotState::default()),
        })
    }

    /// Takes a slot for a stream from `ip`, or says why not (the drop counter's reason).
    fn acquire(slots: &Arc<Self>, ip: IpAddr, known: bool) -> Result<Slot, &'static str> {
        let l = slots.limits;
        let source = source_key(ip);
        let mut s = slots.state.lock().unwrap_or_else(|p| p.into_inner());
        let held = s.by_source.get(&source).copied().unwrap_or(0);
        if held >= if known { l.per_peer_ip } else { l.per_source } {
            return Err("busy_source");
        }
        let reserved = if s.general < l.total - l.reserved {
            s.general += 1;
            false
        } else if known && s.reserved < l.reserved {
            s.reserved += 1;
            true
        } else {
            return Err("busy");
        };
        *s.by_source.entry(source).or_default() += 1;
        Ok(Slot {
            slots: slots.clone(),
            source,
            reserved,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.reserved {
            s.reserved -= 1;
        } else {
            s.general -= 1;
        }
        if let Some(n) = s.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                s.by_source.remove(&self.source);
            }
        }
    }
}

/// The IPs of known peers (members in the view and discovered candidates), shared with the
/// accept loop so it can keep reserved read slots for them.
pub type KnownPeers = Arc<HashSet<IpAddr>>;

/// Aborts a task when dropped, so a cancelled cluster task does not leave its accept loop behind.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a cluster's traffic may be: the largest datagram and how many members a stream frame
/// may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireLimits {
    /// The largest datagram accepted from the network, sealing included (the engine's own
    /// `Config::max_datagram` is that less the seal's overhead).
    pub max_wire_datagram: usize,
    /// The engine's `max_members`: it sizes the largest stream frame accepted.
    pub max_members: usize,
}

impl WireLimits {
    /// The engine's configuration for a cluster whose datagrams stay below the engine's default
    /// `max_datagram` on the wire, sealing included (MTU-safe on IPv4 and IPv6), and the limits
    /// that go with it.
    pub fn engine_config(member_cap: usize, sealed: bool) -> (membership::Config, Self) {
        let mut cfg = membership::Config::lan();
        cfg.member_cap = member_cap;
        let limits = Self {
            max_wire_datagram: cfg.max_datagram,
            max_members: cfg.max_members,
        };
        if sealed {
            cfg.max_datagram -= keyring::OVERHEAD;
        }
        cfg.swim.max_packet_size = std::num::NonZeroUsize::new(cfg.max_datagram - wire::HEADER_LEN)
            .expect("max_datagram is far above the header");
        (cfg, limits)
    }
}

/// The wire of one logical cluster: it opens what arrives, seals and frames what leaves, and
/// counts every packet and stream it refuses.
#[derive(Debug)]
pub struct Transport {
    cluster: &'static str,
    protection: Option<Protection>,
    drops: SharedDrops,
    limits: WireLimits,
    max_body: usize,
    /// Streams leave from the gossip address, so peers recognise this member by its source IP.
    bind_ip: IpAddr,
    permits: Arc<Semaphore>,
    queue: Arc<SendQueue>,
}

/// The outgoing streams waiting or in flight: a count and a byte budget. Before, streams beyond
/// the ones in flight were dropped, so a list pushed to 200 members reached 64 and the rest
/// learned it at their next pull, a second or more later. Streams that share one buffer (a
/// list pushed to every member) count its bytes once.
#[derive(Debug, Default)]
struct SendQueue {
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    streams: usize,
    bytes: usize,
    /// The buffers held, by address: how many streams hold each.
    buffers: HashMap<usize, usize>,
}

impl SendQueue {
    /// Takes a place for a stream of `data`, or `None` when the queue is full.
    fn admit(self: &Arc<Self>, data: &Arc<[u8]>) -> Option<QueuePlace> {
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let key = data.as_ptr() as usize;
        let new = !h.buffers.contains_key(&key);
        if h.streams >= MAX_QUEUED_STREAMS || (new && h.bytes + data.len() > MAX_QUEUED_BYTES) {
            return None;
        }
        h.streams += 1;
        if new {
            h.bytes += data.len();
        }
        *h.buffers.entry(key).or_default() += 1;
        Some(QueuePlace {
            queue: self.clone(),
            data: data.clone(),
        })
    }

    /// (streams, bytes) held now.
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        let h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        (h.streams, h.bytes)
    }
}

/// A stream's place in the [`SendQueue`] and its message, given back when it is sent or
/// dropped.
#[derive(Debug)]
struct QueuePlace {
    queue: Arc<SendQueue>,
    data: Arc<[u8]>,
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        let mut h = self.queue.held.lock().unwrap_or_else(|p| p.into_inner());
        h.streams -= 1;
        let key = self.data.as_ptr() as usize;
        if let Some(n) = h.buffers.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                h.buffers.remove(&key);
                h.bytes -= self.data.len();
            }
        }
    }
}

impl Transport {
    /// The transport of `cluster`, sending streams from `bind_ip`.
    pub fn new(
        cluster: &'static str,
        protection: Option<Protection>,
        limits: WireLimits,
        bind_ip: IpAddr,
    ) -> Self {
        Self {
            cluster,
            max_body: max_stream_body(limits.max_members, protection.is_some()),
            protection,
            drops: Drops::shared(cluster),
            limits,
            bind_ip,
            permits: Arc::new(Semaphore::new(MAX_OUTGOING_STREAMS)),
            queue: Arc::default(),
        }
    }

    /// Starts accepting streams on `tcp`; each one read whole and opened arrives on the
    /// returned channel. `known` names the peers the reserved read slots are kept for.
    pub fn accept(
        &self,
        tcp: TcpListener,
        known: watch::Receiver<KnownPeers>,
    ) -> (AbortOnDrop, mpsc::Receiver<(SocketAddr, Vec<u8>)>) {
        let (tx, rx) = mpsc::channel(256);
        let inc = Incoming {
            protection: self.protection.clone(),
            drops: self.drops.clone(),
            known,
            max_body: self.max_body,
            limits: SlotLimits::default(),
            head_deadline: HEAD_DEADLINE,
        };
        (AbortOnDrop(tokio::spawn(accept_loop(tcp, tx, inc))), rx)
    }

    /// Opens a datagram of `n` bytes from the network, or counts why it was dropped.
    pub fn open_datagram<'a>(&self, from: SocketAddr, data: &'a [u8]) -> Option<Cow<'a, [u8]>> {
        if data.len() > self.limits.max_wire_datagram {
            drop_packet(&self.drops, "oversized", from);
            return None;
        }
        match open(self.protection.as_ref(), data) {
            Ok(plain) => Some(plain),
            Err(reason) => {
                drop_packet(&self.drops, reason, from);
                None
            }
        }
    }

    /// Sends one engine output: a datagram on `udp`, or a stream in a task of its own (at most
    /// [`MAX_OUTGOING_STREAMS`] at once; more wait their turn in a bounded [`SendQueue`]).
    pub async fn send(&self, udp: &UdpSocket, output: Output) {
        match output {
            Output::Datagram { to, data } => {
                let sealed;
                let bytes: &[u8] = match &self.protection {
                    Some(p) => {
                        sealed = p.seal(&data);
                        &sealed
                    }
                    None => &data,
                };
                if let Err(e) = udp.send_to(bytes, to).await {
                    tracing::debug!(cluster = self.cluster, %to, "udp send: {e}");
                }
            }
            Output::Stream { to, data } => {
                let Some(place) = self.queue.admit(&data) else {
                    tracing::debug!(cluster = self.cluster, %to, "too many streams waiting; dropped one");
                    return;
                };
                let (permits, bind_ip) = (self.permits.clone(), self.bind_ip);
                let (protection, max_body) = (self.protection.clone(), self.max_body);
                tokio::spawn(async move {
                    // Tokio's semaphore is fair: streams leave in the order they were sent.
                    let Ok(Ok(_permit)) =
                        tokio::time::timeout(QUEUE_WAIT, permits.acquire_owned()).await
                    else {
                        tracing::debug!(%to, "stream waited too long for its turn; dropped");
                        return;
                    };
                    // Framed (and sealed) only now, so waiting streams share their message.
                    let Some(bytes) = frame(protection.as_ref(), &place.data, max_body) else {
                        tracing::debug!(
                            %to,
                            len = place.data.len(),
                            "stream frame larger than any peer accepts; dropped"
                        );
                        return;
                    };
                    if let Err(e) = send_stream(Some(bind_ip), to, &bytes).await {
                        tracing::debug!(%to, "stream send: {e}");
                    }
                });
            }
        }
    }

    /// Packets and streams refused so far, by reason.
    pub fn dropped(&self) -> BTreeMap<&'static str, u64> {
        self.drops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counts
            .clone()
    }
}

/// Frames a message for a stream: `head_len (u8) | head | body`. The head is the magic and the
/// body length; with a key, head and body are sealed separately, so a receiver authenticates
/// the small head before it reads (or buffers) the body. `None` when the body would exceed
/// `max_body`, which every receiver refuses.
fn frame(p: Option<&Protection>, data: &[u8], max_body: usize) -> Option<Vec<u8>> {
    let body = match p {
        Some(p) => p.seal(data),
        None => data.to_vec(),
    };
    if body.len() > max_body {
        return None;
    }
    let mut head = Vec::with_capacity(HEAD_PLAIN_LEN);
    head.extend_from_slice(&HEAD_MAGIC);
    head.extend_from_slice(&u32::try_from(body.len()).ok()?.to_be_bytes());
    let head = match p {
        Some(p) => p.seal(&head),
        None => head,
    };
    let mut out = Vec::with_capacity(1 + head.len() + body.len());
    out.push(u8::try_from(head.len()).ok()?);
    out.extend_from_slice(&head);
    out.extend_from_slice(&body);
    Some(out)
}

/// Connects to `to` (from `bind_ip` when given) and writes one framed stream.
async fn send_stream(bind_ip: Option<IpAddr>, to: SocketAddr, bytes: &[u8]) -> std::io::Result<()> {
    let sock = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = bind_ip.filter(|ip| ip.is_ipv4() == to.is_ipv4() && !ip.is_unspecified()) {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let mut s = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    tokio::time::timeout(HEAD_DEADLINE + BODY_DEADLINE, async {
        s.write_all(bytes).await?;
        s.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))?
}

/// What the accept loop needs besides its listener and the engine's channel.
#[derive(Debug)]
struct Incoming {
    protection: Option<Protection>,
    drops: SharedDrops,
    known: watch::Receiver<KnownPeers>,
    max_body: usize,
    limits: SlotLimits,
    /// [`HEAD_DEADLINE`], except in tests that need slots held longer.
    head_deadline: Duration,
}

/// Accepts streams: a per-source rate, a fair share of read slots per source and a reserve for
/// known peers decide which are read; each must deliver its head within [`HEAD_DEADLINE`] and
/// its body within [`BODY_DEADLINE`] more. Every refusal is counted in the drop counters.
async fn accept_loop(tcp: TcpListener, tx: mpsc::Sender<(SocketAddr, Vec<u8>)>, inc: Incoming) {
    let slots = Slots::new(inc.limits);
    let mut rate = StreamRate::default();
    loop {
        let (mut sock, from) = match tcp.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Usually out of file descriptors: let other tasks close some.
                tracing::debug!("stream accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !rate.allow(from.ip(), Instant::now()) {
            drop_packet(&inc.drops, "rate_limited", from);
            continue;
        }
        let known = inc.known.borrow().contains(&from.ip());
        let slot = match Slots::acquire(&slots, from.ip(), known) {
            Ok(slot) => slot,
            Err(reason) => {
                drop_packet(&inc.drops, reason, from);
                continue;
            }
        };
        let tx = tx.clone();
        let protection = inc.protection.clone();
        let drops = inc.drops.clone();
        let (max_body, head_deadline) = (inc.max_body, inc.head_deadline);
        tokio::spawn(async move {
            let _slot = slot;
            match read_stream(&mut sock, protection.as_ref(), max_body, head_deadline).await {
                Ok(plain) => {
                    if tx.try_send((from, plain)).is_err() {
                        drop_packet(&drops, "busy", from);
                    }
                }
                Err(reason) => drop_packet(&drops, reason, from),
            }
        });
    }
}

/// Reads one framed stream and returns the opened message, or the reason it was refused. The
/// head must arrive within `head_deadline` and open (authenticate) before the body is read;
/// the body buffer grows only as bytes arrive, up to `max_body`.
async fn read_stream(
    sock: &mut TcpStream,
    p: Option<&Protection>,
    max_body: usize,
    head_deadline: Duration,
) -> Result<Vec<u8>, &'static str> {
    let mut head = [0u8; u8::MAX as usize];
    let read_head = async {
        let n = usize::from(sock.read_u8().await?);
        sock.read_exact(&mut head[..n]).await?;
        Ok::<_, std::io::Error>(n)
    };
    let n = match tokio::time::timeout(head_deadline, read_head).await {
        Ok(Ok(n)) => n,
        Ok(Err(_)) => return Err("stream_truncated"),
        Err(_) => return Err("stream_timeout"),
    };
    let plain = open(p, &head[..n])?;
    if plain.len() != HEAD_PLAIN_LEN || plain[..HEAD_MAGIC.len()] != HEAD_MAGIC {
        return Err("malformed");
    }
    let len = u32::from_be_bytes(plain[HEAD_MAGIC.len()..].try_into().expect("4 bytes")) as usize;
    if len > max_body {
        return Err("oversized");
    }
    let mut body = Vec::with_capacity(len.min(BODY_INITIAL_CAPACITY));
    let mut limited = (&mut *sock).take(len as u64);
    match tokio::time::timeout(BODY_DEADLINE, limited.read_to_end(&mut body)).await {
        Ok(Ok(_)) if body.len() == len => {}
        Ok(_) => return Err("stream_truncated"),
        Err(_) => return Err("stream_timeout"),
    }
    match p {
        None => Ok(body),
        Some(_) => Ok(open(p, &body)?.into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use membership::NodeId;

    use super::*;

    #[test]
    fn one_source_cannot_open_streams_faster_than_the_rate() {
        let mut r = StreamRate::default();
        let t0 = Instant::now();
        let a: IpAddr = "127.0.0.31".parse().unwrap();
        let b: IpAddr = "127.0.0.32".parse().unwrap();
        let burst = (0..100).filter(|_| r.allow(a, t0)).count();
        assert_eq!(burst, STREAM_BURST as usize);
        assert!(r.allow(b, t0), "another source keeps its own budget");
        assert!(!r.allow(a, t0));
        assert!(r.allow(a, t0 + Duration::from_millis(150)));
    }

    #[test]
    fn a_flood_of_drops_warns_once_per_interval_and_counts_every_one() {
        let drops = Drops::shared("all");
        let from: SocketAddr = "127.0.4.61:1".parse().unwrap();
        for i in 0..1000 {
            drop_packet(
                &drops,
                if i % 2 == 0 {
                    "malformed"
                } else {
                    "auth_failed"
                },
                from,
            );
        }
        let d = drops.lock().unwrap();
        assert_eq!(d.counts.get("malformed"), Some(&500));
        assert_eq!(d.counts.get("auth_failed"), Some(&500));
        // Only the first drop warned; the rest wait for the interval, counted for the next one.
        assert!(d.last_warn.is_some());
        assert_eq!(d.since_warn, 999);
    }

    #[test]
    fn an_ipv6_source_is_rate_limited_by_its_64_as_read_slots_count_it() {
        let mut r = StreamRate::default();
        let t0 = Instant::now();
        // One host spreading its connections over the addresses of its /64 spends one budget.
        let burst = (0..100u16)
            .filter(|i| r.allow(ip(&format!("2001:db8:7:1::{:x}", i + 1)), t0))
            .count();
        assert_eq!(burst, STREAM_BURST as usize);
        assert!(!r.allow(ip("2001:db8:7:1:ffff::1"), t0));
        assert_eq!(r.buckets.len(), 1);
        // The next /64 is another source; an IPv4-mapped address counts as its IPv4 address.
        assert!(r.allow(ip("2001:db8:7:2::1"), t0));
        assert!(r.allow(ip("10.9.0.1"), t0));
        for _ in 1..STREAM_BURST as usize {
            assert!(r.allow(ip("10.9.0.1"), t0));
        }
        assert!(!r.allow(ip("::ffff:10.9.0.1"), t0));
    }

    #[test]
    fn datagrams_over_the_limit_or_under_another_key_are_counted_not_opened() {
        let limits = WireLimits {
            max_wire_datagram: 100,
            max_members: 10,
        };
        let from: SocketAddr = "127.0.4.51:1".parse().unwrap();
        let t = Transport::new("all", Some(protection(K1)), limits, ip("127.0.4.50"));
        let sealed = protection(K1).seal(b"hello");
        assert_eq!(
            t.open_datagram(from, &sealed).as_deref(),
            Some(&b"hello"[..])
        );
        assert!(
            t.open_datagram(from, &protection(K2).seal(b"hello"))
                .is_none()
        );
        assert!(t.open_datagram(from, &[0u8; 101]).is_none());
        assert!(t.open_datagram(from, b"plain").is_none());
        let d = t.dropped();
        assert_eq!(d.get("auth_failed"), Some(&1), "{d:?}");
        assert_eq!(d.get("oversized"), Some(&1), "{d:?}");
        assert_eq!(d.values().sum::<u64>(), 3, "{d:?}");
        // Without a key the bytes pass as they are, within the same size limit.
        let plain = Transport::new("all", None, limits, ip("127.0.4.50"));
        assert_eq!(plain.open_datagram(from, b"x").as_deref(), Some(&b"x"[..]));
        assert!(plain.open_datagram(from, &[0u8; 101]).is_none());
    }

    #[test]
    fn a_sealed_engine_leaves_room_for_the_seal_within_the_same_wire_limit() {
        let (plain, lp) = WireLimits::engine_config(64, false);
        let (sealed, ls) = WireLimits::engine_config(64, true);
        assert_eq!(lp, ls, "the wire limit does not depend on the key");
        assert_eq!(plain.max_datagram, lp.max_wire_datagram);
        assert_eq!(
            sealed.max_datagram + keyring::OVERHEAD,
            ls.max_wire_datagram
        );
        assert_eq!(
            sealed.swim.max_packet_size.get(),
            sealed.max_datagram - wire::HEADER_LEN
        );
        assert_eq!((plain.member_cap, sealed.member_cap), (64, 64));
        assert!(
            ls.max_wire_datagram <= 1400,
            "MTU-safe: {}",
            ls.max_wire_datagram
        );
    }

    #[test]
    fn the_source_table_stays_bounded() {
        let mut r = StreamRate::default();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED_SOURCES as u32 + 100) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x7f00_0000 + i));
            r.allow(ip, t0);
        }
        assert!(r.buckets.len() <= MAX_TRACKED_SOURCES);
        // Once the buckets refill, the idle sources are forgotten and new ones are served.
        assert!(r.allow("127.255.0.1".parse().unwrap(), t0 + Duration::from_secs(5)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_streams_beyond_those_in_flight_waits_its_turn_and_arrives_whole() {
        // A coordinator pushes a list to every member at once: 300 streams, where 64 may be
        // in flight. Before, the other 236 were dropped.
        let listener = TcpListener::bind((ip("127.0.4.60"), 0)).await.unwrap();
        let to = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            // Like the accept loop: each connection is read in a task of its own.
            let mut reads = tokio::task::JoinSet::new();
            for _ in 0..300 {
                let (mut s, _) = listener.accept().await.unwrap();
                reads.spawn(async move {
                    let mut buf = Vec::new();
                    s.read_to_end(&mut buf).await.unwrap();
                    // `len(1) | head | body`, no key: the body is the last 5 bytes.
                    buf.ends_with(b"hello")
                });
            }
            reads.join_all().await.into_iter().filter(|&w| w).count()
        });
        let limits = WireLimits {
            max_wire_datagram: 1400,
            max_members: 10,
        };
        let t = Transport::new("all", None, limits, ip("127.0.4.61"));
        let udp = UdpSocket::bind((ip("127.0.4.61"), 0)).await.unwrap();
        for _ in 0..300 {
            let data = b"hello".to_vec().into();
            t.send(&udp, Output::Stream { to, data }).await;
        }
        let whole = tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("every stream arrives within 20 s")
            .unwrap();
        assert_eq!(whole, 300);
        // Every place in the queue was given back.
        assert_eq!(t.queue.held(), (0, 0));
    }

    #[test]
    fn the_send_queue_is_bounded_in_streams_and_bytes_and_counts_a_shared_buffer_once() {
        let q = Arc::new(SendQueue::default());
        let one: Arc<[u8]> = vec![0u8; 100].into();
        let places: Vec<QueuePlace> = (0..MAX_QUEUED_STREAMS)
            .map(|_| q.admit(&one).expect("room"))
            .collect();
        assert_eq!(
            q.held(),
            (MAX_QUEUED_STREAMS, 100),
            "one buffer, counted once"
        );
        assert!(q.admit(&vec![1u8].into()).is_none(), "the count is bounded");
        drop(places);
        assert_eq!(q.held(), (0, 0));
        let big = q
            .admit(&vec![0u8; MAX_QUEUED_BYTES - 10].into())
            .expect("room");
        assert!(
            q.admit(&vec![0u8; 11].into()).is_none(),
            "the bytes are bounded"
        );
        let small = q
            .admit(&vec![0u8; 10].into())
            .expect("exactly the rest fits");
        drop((big, small));
        assert_eq!(q.held(), (0, 0));
    }

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    fn protection(key: &str) -> Protection {
        let ring = keyring::Keyring::parse(key, "test").unwrap();
        Protection {
            sealer: Arc::new(Sealer::new(ring, keyring::SealerConfig::default())),
            aad: keyring::aad("stream-test", "all"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An accept loop on a loopback listener, stopped when dropped.
    struct Loop {
        addr: SocketAddr,
        rx: mpsc::Receiver<(SocketAddr, Vec<u8>)>,
        drops: SharedDrops,
        _task: AbortOnDrop,
    }

    impl Loop {
        async fn start(at: &str, protection: Option<Protection>, known: &[&str]) -> Self {
            Self::start_with(at, protection, known, HEAD_DEADLINE).await
        }

        async fn start_with(
            at: &str,
            protection: Option<Protection>,
            known: &[&str],
            head_deadline: Duration,
        ) -> Self {
            let tcp = TcpListener::bind((ip(at), 0)).await.unwrap();
            let addr = tcp.local_addr().unwrap();
            let drops = Drops::shared("all");
            let (tx, rx) = mpsc::channel(16);
            let known: KnownPeers = Arc::new(known.iter().map(|s| ip(s)).collect());
            let inc = Incoming {
                max_body: max_stream_body(100, protection.is_some()),
                protection,
                drops: drops.clone(),
                known: watch::channel(known).1,
                limits: SlotLimits::default(),
                head_deadline,
            };
            let task = AbortOnDrop(tokio::spawn(accept_loop(tcp, tx, inc)));
            Self {
                addr,
                rx,
                drops,
                _task: task,
            }
        }

        fn dropped(&self, reason: &str) -> u64 {
            let d = self.drops.lock().unwrap();
            d.counts.get(reason).copied().unwrap_or(0)
        }

        /// Waits up to `within` for `dropped(reason)` to reach `n`.
        async fn wait_dropped(&self, reason: &str, n: u64, within: Duration) -> bool {
            let end = Instant::now() + within;
            while Instant::now() < end {
                if self.dropped(reason) >= n {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.dropped(reason) >= n
        }

        /// The next stream handed to the engine within `within`.
        async fn next(&mut self, within: Duration) -> Option<(SocketAddr, Vec<u8>)> {
            tokio::time::timeout(within, self.rx.recv()).await.ok()?
        }
    }

    async fn connect_from(src: &str, to: SocketAddr) -> TcpStream {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(ip(src), 0)).unwrap();
        sock.connect(to).await.unwrap()
    }

    /// How long until the server closes `s` (read returns end of file or an error).
    async fn time_to_close(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        let mut b = [0u8; 16];
        match tokio::time::timeout(limit, s.read(&mut b)).await {
            Ok(Ok(0) | Err(_)) => Some(t0.elapsed()),
            Ok(Ok(_)) => panic!("the server never writes on a stream"),
            Err(_) => None,
        }
    }

    #[tokio::test]
    async fn frames_arrive_whole_with_and_without_a_key() {
        for p in [None, Some(protection(K1))] {
            let mut l = Loop::start("127.0.4.1", p.clone(), &[]).await;
            let msg: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
            let bytes = frame(p.as_ref(), &msg, max_stream_body(100, p.is_some())).unwrap();
            send_stream(Some(ip("127.0.4.2")), l.addr, &bytes)
                .await
                .unwrap();
            let (from, got) = l.next(Duration::from_secs(2)).await.expect("delivered");
            assert_eq!(from.ip(), ip("127.0.4.2"), "sent from the bound address");
            assert_eq!(got, msg);
        }
    }

    #[tokio::test]
    async fn idle_connections_from_one_source_do_not_stop_a_members_sync() {
        let p = protection(K1);
        let mut l = Loop::start("127.0.4.11", Some(p.clone()), &["127.0.4.13"]).await;
        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push(connect_from("127.0.4.12", l.addr).await);
        }
        // Every one beyond the source's share is refused at once.
        assert!(
            l.wait_dropped("busy_source", 1, Duration::from_millis(500))
                .await
        );
        let t0 = Instant::now();
        let bytes = frame(Some(&p), b"sync", max_stream_body(100, true)).unwrap();
        send_stream(Some(ip("127.0.4.13")), l.addr, &bytes)
            .await
            .unwrap();
        let (from, got) = l
            .next(Duration::from_millis(1500))
            .await
            .expect("the member's sync was accepted within 1.5 s");
        assert!(t0.elapsed() < Duration::from_millis(1500));
        assert_eq!(
            (from.ip(), got.as_slice()),
            (ip("127.0.4.13"), &b"sync"[..])
        );
        let refused = l.dropped("busy_source") + l.dropped("rate_limited");
        assert!(refused >= 150, "{refused} of 200 refused at once");
        // Strangers also still get their share: another source is read.
        let bytes = frame(Some(&p), b"join", max_stream_body(100, true)).unwrap();
        send_stream(Some(ip("127.0.4.14")), l.addr, &bytes)
            .await
            .unwrap();
        assert!(l.next(Duration::from_millis(1500)).await.is_some());
        drop(idle);
    }

    #[tokio::test]
    async fn known_peers_keep_reserved_slots_when_strangers_hold_the_rest() {
        let p = protection(K1);
        // Idle connections hold their slots for 10 s here, so a slow machine cannot pass the
        // test by letting them expire first.
        let mut l = Loop::start_with(
            "127.0.4.21",
            Some(p.clone()),
            &["127.0.4.22"],
            Duration::from_secs(10),
        )
        .await;
        // 40 sources with 4 idle connections each: more than every slot outside the reserve.
        let mut idle = Vec::new();
        for i in 0..40 {
            let src = format!("127.0.5.{}", i + 1);
            for _ in 0..STREAMS_PER_SOURCE {
                idle.push(connect_from(&src, l.addr).await);
            }
        }
        let over = (40 * STREAMS_PER_SOURCE - (MAX_INCOMING_STREAMS - RESERVED_STREAMS)) as u64;
        assert!(
            l.wait_dropped("busy", over, Duration::from_secs(5)).await,
            "{:?}",
            l.drops.lock().unwrap().counts
        );
        // A newcomer finds no slot and is closed at once ...
        let mut stranger = connect_from("127.0.5.200", l.addr).await;
        let closed = time_to_close(&mut stranger, Duration::from_millis(500)).await;
        assert!(closed.is_some(), "a stranger was given a reserved slot");
        // ... while a member in the view is read from the reserve.
        let bytes = frame(Some(&p), b"sync", max_stream_body(100, true)).unwrap();
        send_stream(Some(ip("127.0.4.22")), l.addr, &bytes)
            .await
            .unwrap();
        let (from, _) = l
            .next(Duration::from_millis(500))
            .await
            .expect("the member was read");
        assert_eq!(from.ip(), ip("127.0.4.22"));
        drop(idle);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_about_a_second() {
        let l = Loop::start("127.0.4.31", Some(protection(K1)), &[]).await;
        let mut s = connect_from("127.0.4.32", l.addr).await;
        // Half a head does not buy more time.
        s.write_all(&[56, 1, 2, 3]).await.unwrap();
        let t = time_to_close(&mut s, Duration::from_secs(3))
            .await
            .expect("closed");
        assert!(
            t >= Duration::from_millis(900) && t < Duration::from_millis(1600),
            "closed after {t:?}"
        );
        assert!(
            l.wait_dropped("stream_timeout", 1, Duration::from_millis(200))
                .await
        );
    }

    #[tokio::test]
    async fn a_forged_or_oversized_head_is_refused_before_any_body_is_read() {
        let p = protection(K1);
        let l = Loop::start("127.0.4.41", Some(p.clone()), &[]).await;
        let max = max_stream_body(100, true);
        let head = |p: &Protection, len: usize| {
            let mut plain = HEAD_MAGIC.to_vec();
            plain.extend_from_slice(&(len as u32).to_be_bytes());
            let sealed = p.seal(&plain);
            let mut out = vec![sealed.len() as u8];
            out.extend_from_slice(&sealed);
            out
        };
        // Another key, claiming the largest legal body: refused without waiting for it.
        let mut s = connect_from("127.0.4.42", l.addr).await;
        s.write_all(&head(&protection(K2), max)).await.unwrap();
        let t = time_to_close(&mut s, Duration::from_millis(500)).await;
        assert!(t.is_some(), "a forged head held the connection");
        assert!(
            l.wait_dropped("auth_failed", 1, Duration::from_millis(200))
                .await
        );
        // The right key, one byte over the largest legal message.
        let mut s = connect_from("127.0.4.42", l.addr).await;
        s.write_all(&head(&p, max + 1)).await.unwrap();
        let t = time_to_close(&mut s, Duration::from_millis(500)).await;
        assert!(t.is_some(), "an oversized head held the connection");
        assert!(
            l.wait_dropped("oversized", 1, Duration::from_millis(200))
                .await
        );
    }

    #[test]
    fn the_frame_limit_is_the_largest_legal_sync_or_list() {
        let n = 50;
        let id = |i: u16| {
            NodeId::new(
                SocketAddr::new(ip("fd00::1"), 10_000 + i),
                uuid::Uuid::from_u128(u128::from(i)),
                1,
                membership::Role::Scheduler,
            )
        };
        let zone = membership::Zone::new(&"z".repeat(membership::Zone::MAX_LEN)).unwrap();
        let members: Vec<foca::Member<NodeId>> = (0..n)
            .map(|i| foca::Member::new(id(i as u16), 7, foca::State::Alive))
            .collect();
        let sync = wire::encode_sync(
            1,
            wire::Kind::SyncResponse,
            &wire::SyncMsg {
                from: id(999),
                zone: Some(zone),
                members,
            },
        );
        let list = wire::encode_list(
            1,
            &wire::ListMsg {
                ver: 1,
                coordinator: uuid::Uuid::nil(),
                members: (0..n).map(|i| id(i as u16)).collect(),
                zones: (0..n).map(|i| (id(i as u16).uuid, zone)).collect(),
            },
        );
        assert_eq!(list.len(), max_stream_body(n, false));
        assert!(sync.len() <= max_stream_body(n, false));
        let p = protection(K1);
        assert!(frame(Some(&p), &list, max_stream_body(n, true)).is_some());
        assert!(frame(Some(&p), &list, max_stream_body(n - 1, true)).is_none());
        // The engine's default of 10 000 members needs well under the old flat 4 MiB.
        let lan = max_stream_body(membership::Config::lan().max_members, true);
        assert!(lan < 1200 * 1024, "{lan}");
    }

    #[test]
    fn slots_are_shared_per_source_and_the_reserve_is_for_known_peers() {
        let slots = Slots::new(SlotLimits {
            total: 6,
            reserved: 2,
            per_source: 2,
            per_peer_ip: 3,
        });
        let take = |s: &str, known| Slots::acquire(&slots, ip(s), known);
        let a1 = take("10.0.0.1", false).unwrap();
        let _a2 = take("10.0.0.1", false).unwrap();
        assert_eq!(take("10.0.0.1", false).unwrap_err(), "busy_source");
        let _b1 = take("10.0.0.2", false).unwrap();
        let _b2 = take("10.0.0.2", false).unwrap();
        // The four general slots are held: strangers wait, known peers use the reserve.
        assert_eq!(take("10.0.0.3", false).unwrap_err(), "busy");
        let m1 = take("10.0.0.9", true).unwrap();
        assert!(m1.reserved);
        let _m2 = take("10.0.0.9", true).unwrap();
        assert_eq!(take("10.0.0.8", true).unwrap_err(), "busy");
        // A released slot is free again, and the per-source count goes with it.
        drop(a1);
        assert!(!take("10.0.0.1", false).unwrap().reserved);
        drop(m1);
        let state = slots.state.lock().unwrap();
        assert_eq!((state.general, state.reserved), (3, 1));
        assert_eq!(state.by_source.len(), 3);
    }

    #[test]
    fn an_ipv6_source_is_counted_by_its_64() {
        assert_eq!(
            source_key(ip("2001:db8:1:2:aaaa::1")),
            source_key(ip("2001:db8:1:2:bbbb::7"))
        );
        assert_ne!(
            source_key(ip("2001:db8:1:2::1")),
            source_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(source_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }
}
