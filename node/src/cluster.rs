//! Runs one membership engine on real sockets: UDP for gossip, TCP for syncs and big lists.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use discovery::{Candidate, Snapshot};
use keyring::Sealer;
use membership::{Engine, MemberList, NodeId, Output, Stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, mpsc, watch};

/// The largest stream frame accepted: a sync of about 80 000 members.
const MAX_FRAME: usize = 4 << 20;
/// Streams being sent at once; more are dropped, and the pull path recovers.
const MAX_OUTGOING_STREAMS: usize = 64;
/// Streams being read at once; more connections are closed at once.
const MAX_INCOMING_STREAMS: usize = 128;
/// New streams (syncs, the join path) one source IP may open in a burst.
const STREAM_BURST: f64 = 20.0;
/// New streams per second one source IP may open once its burst is spent.
const STREAM_RATE: f64 = 10.0;
/// Source IPs whose stream rate is tracked; beyond it the idle ones are forgotten.
const MAX_TRACKED_SOURCES: usize = 4096;
/// The shortest pause between two warnings about dropped packets.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

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

fn open<'a>(
    p: Option<&Protection>,
    data: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>, &'static str> {
    match p {
        None => Ok(std::borrow::Cow::Borrowed(data)),
        Some(p) => p
            .sealer
            .open(&p.aad, data)
            .map(std::borrow::Cow::Owned)
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

/// What the HTTP API shows of one cluster.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// `scheduler` or `all`.
    pub name: &'static str,
    /// The gossip port.
    pub port: u16,
    /// This member.
    pub me: NodeId,
    /// The current member list.
    pub list: MemberList,
    /// When each member was first seen in a list, for ages.
    pub first_seen: Vec<(uuid::Uuid, Instant)>,
    /// The engine's counters.
    pub stats: Stats,
}

/// Shared, read-mostly state of one cluster.
pub type SharedView = Arc<RwLock<ClusterView>>;

/// How a cluster's candidates are derived from discovery's.
pub type CandidateMap = fn(&Candidate) -> Option<SocketAddr>;

/// Everything a cluster task needs.
#[derive(Debug)]
pub struct ClusterSpec {
    /// `scheduler` or `all`.
    pub name: &'static str,
    /// The engine, already created.
    pub engine: Engine,
    /// The bound gossip socket.
    pub udp: UdpSocket,
    /// The bound gossip stream listener.
    pub tcp: TcpListener,
    /// Discovery's output.
    pub candidates: watch::Receiver<Snapshot>,
    /// Maps a candidate to this cluster's gossip address, or skips it.
    pub map: CandidateMap,
    /// Receives the member count after every change.
    pub size_tx: Option<watch::Sender<usize>>,
    /// Turns true when the node must leave.
    pub shutdown: watch::Receiver<bool>,
    /// The cluster key; `None` sends and accepts plain messages.
    pub protection: Option<Protection>,
    /// The largest datagram accepted from the network, sealing included.
    pub max_datagram: usize,
}

/// Starts the cluster task; it returns after a graceful leave.
pub fn spawn(spec: ClusterSpec) -> (SharedView, tokio::task::JoinHandle<()>) {
    let view = Arc::new(RwLock::new(ClusterView {
        name: spec.name,
        port: spec.engine.me().addr.port(),
        me: *spec.engine.me(),
        list: spec.engine.list().clone(),
        first_seen: Vec::new(),
        stats: Stats::default(),
    }));
    let handle = tokio::spawn(run(spec, view.clone()));
    (view, handle)
}

async fn run(spec: ClusterSpec, view: SharedView) {
    let ClusterSpec {
        name,
        mut engine,
        udp,
        tcp,
        mut candidates,
        map,
        size_tx,
        mut shutdown,
        protection,
        max_datagram,
    } = spec;
    let udp = Arc::new(udp);
    let start = Instant::now();
    let drops: SharedDrops = Arc::new(Mutex::new(Drops {
        cluster: name,
        counts: BTreeMap::new(),
        last_warn: None,
        since_warn: 0,
    }));
    let (stream_tx, mut stream_rx) = mpsc::channel::<(SocketAddr, Vec<u8>)>(256);
    let accept = tokio::spawn(accept_loop(
        tcp,
        stream_tx,
        protection.clone(),
        drops.clone(),
    ));
    let out_permits = Arc::new(Semaphore::new(MAX_OUTGOING_STREAMS));
    let mut buf = vec![0u8; 65536];
    let mut candidates_open = true;
    set_candidates(&mut engine, &candidates.borrow_and_update(), map, start);
    publish(&mut engine, &view, size_tx.as_ref(), &drops);
    loop {
        let deadline = start + engine.next_deadline();
        tokio::select! {
            r = udp.recv_from(&mut buf) => match r {
                Ok((n, from)) if n > max_datagram => drop_packet(&drops, "oversized", from),
                Ok((n, from)) => match open(protection.as_ref(), &buf[..n]) {
                    Ok(plain) => engine.handle_datagram(from, &plain, start.elapsed()),
                    Err(reason) => drop_packet(&drops, reason, from),
                },
                Err(e) => tracing::debug!(cluster = name, "udp receive: {e}"),
            },
            Some((from, data)) = stream_rx.recv() => {
                engine.handle_stream(from, &data, start.elapsed());
            }
            r = candidates.changed(), if candidates_open => match r {
                Ok(()) => {
                    let snap = candidates.borrow_and_update().clone();
                    set_candidates(&mut engine, &snap, map, start);
                }
                Err(_) => candidates_open = false,
            },
            _ = tokio::time::sleep_until(deadline.into()) => engine.tick(start.elapsed()),
            _ = shutdown.changed() => {
                engine.leave(start.elapsed());
                send_outputs(&mut engine, &udp, &out_permits, name, protection.as_ref()).await;
                // Give the leave datagrams a moment to leave the host.
                tokio::time::sleep(Duration::from_millis(50)).await;
                break;
            }
        }
        send_outputs(&mut engine, &udp, &out_permits, name, protection.as_ref()).await;
        publish(&mut engine, &view, size_tx.as_ref(), &drops);
    }
    accept.abort();
}

fn set_candidates(engine: &mut Engine, snap: &Snapshot, map: CandidateMap, start: Instant) {
    let addrs: Vec<SocketAddr> = snap.candidates.iter().filter_map(map).collect();
    engine.set_candidates(addrs, start.elapsed());
}

fn publish(
    engine: &mut Engine,
    view: &SharedView,
    size_tx: Option<&watch::Sender<usize>>,
    drops: &SharedDrops,
) {
    let changes = engine.drain_changes();
    let me = engine.me().uuid;
    for list in &changes {
        // No fields: they would follow the closing `]` and break the layout.
        tracing::info!(target: "members", "{}", list.render(me));
    }
    let mut v = view.write().unwrap_or_else(|p| p.into_inner());
    v.stats = engine.stats().clone();
    for (reason, n) in &drops.lock().unwrap_or_else(|p| p.into_inner()).counts {
        *v.stats.rejected.entry(reason).or_default() += n;
    }
    v.me = *engine.me();
    if let Some(last) = changes.last() {
        v.list = last.clone();
        let now = Instant::now();
        let members: Vec<uuid::Uuid> = last.members.iter().map(|m| m.uuid).collect();
        v.first_seen.retain(|(u, _)| members.contains(u));
        for u in members {
            if !v.first_seen.iter().any(|(x, _)| *x == u) {
                v.first_seen.push((u, now));
            }
        }
        if let Some(tx) = size_tx {
            tx.send_replace(last.members.len());
        }
    }
}

async fn send_outputs(
    engine: &mut Engine,
    udp: &Arc<UdpSocket>,
    permits: &Arc<Semaphore>,
    name: &'static str,
    protection: Option<&Protection>,
) {
    for o in engine.drain_outputs() {
        let o = match (o, protection) {
            (o, None) => o,
            (Output::Datagram { to, data }, Some(p)) => Output::Datagram {
                to,
                data: p.seal(&data),
            },
            (Output::Stream { to, data }, Some(p)) => Output::Stream {
                to,
                data: p.seal(&data),
            },
        };
        match o {
            Output::Datagram { to, data } => {
                if let Err(e) = udp.send_to(&data, to).await {
                    tracing::debug!(cluster = name, %to, "udp send: {e}");
                }
            }
            Output::Stream { to, data } => {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::debug!(cluster = name, %to, "too many streams in flight; dropped one");
                    continue;
                };
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = send_stream(to, &data).await {
                        tracing::debug!(%to, "stream send: {e}");
                    }
                });
            }
        }
    }
}

async fn send_stream(to: SocketAddr, data: &[u8]) -> std::io::Result<()> {
    let mut s = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let len = u32::try_from(data.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too big"))?;
    tokio::time::timeout(Duration::from_secs(5), async {
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(data).await?;
        s.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))?
}

async fn accept_loop(
    tcp: TcpListener,
    tx: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    protection: Option<Protection>,
    drops: SharedDrops,
) {
    let permits = Arc::new(Semaphore::new(MAX_INCOMING_STREAMS));
    let mut rate = StreamRate::default();
    loop {
        let Ok((mut sock, from)) = tcp.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if !rate.allow(from.ip(), Instant::now()) {
            drop_packet(&drops, "rate_limited", from);
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop_packet(&drops, "busy", from);
            continue;
        };
        let tx = tx.clone();
        let protection = protection.clone();
        let drops = drops.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let read = async {
                let mut len = [0u8; 4];
                sock.read_exact(&mut len).await?;
                let len = u32::from_be_bytes(len) as usize;
                if len > MAX_FRAME {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "frame too big",
                    ));
                }
                let mut data = vec![0u8; len];
                sock.read_exact(&mut data).await?;
                Ok::<_, std::io::Error>(data)
            };
            match tokio::time::timeout(Duration::from_secs(5), read).await {
                Ok(Ok(data)) => match open(protection.as_ref(), &data) {
                    Ok(plain) => {
                        if tx.try_send((from, plain.into_owned())).is_err() {
                            drop_packet(&drops, "busy", from);
                        }
                    }
                    Err(reason) => drop_packet(&drops, reason, from),
                },
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                    drop_packet(&drops, "oversized", from);
                }
                Ok(Err(e)) => tracing::debug!(%from, "stream receive: {e}"),
                Err(_) => tracing::debug!(%from, "stream receive timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
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
}
