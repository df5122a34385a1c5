//! Runs one membership engine on real sockets: UDP for gossip, TCP for syncs and big lists.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use discovery::{Candidate, Snapshot};
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
    } = spec;
    let udp = Arc::new(udp);
    let start = Instant::now();
    let (stream_tx, mut stream_rx) = mpsc::channel::<(SocketAddr, Vec<u8>)>(256);
    let accept = tokio::spawn(accept_loop(tcp, stream_tx));
    let out_permits = Arc::new(Semaphore::new(MAX_OUTGOING_STREAMS));
    let mut buf = vec![0u8; 65536];
    let mut candidates_open = true;
    set_candidates(&mut engine, &candidates.borrow_and_update(), map, start);
    publish(&mut engine, &view, size_tx.as_ref());
    loop {
        let deadline = start + engine.next_deadline();
        tokio::select! {
            r = udp.recv_from(&mut buf) => match r {
                Ok((n, from)) => engine.handle_datagram(from, &buf[..n], start.elapsed()),
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
                send_outputs(&mut engine, &udp, &out_permits, name).await;
                // Give the leave datagrams a moment to leave the host.
                tokio::time::sleep(Duration::from_millis(50)).await;
                break;
            }
        }
        send_outputs(&mut engine, &udp, &out_permits, name).await;
        publish(&mut engine, &view, size_tx.as_ref());
    }
    accept.abort();
}

fn set_candidates(engine: &mut Engine, snap: &Snapshot, map: CandidateMap, start: Instant) {
    let addrs: Vec<SocketAddr> = snap.candidates.iter().filter_map(map).collect();
    engine.set_candidates(addrs, start.elapsed());
}

fn publish(engine: &mut Engine, view: &SharedView, size_tx: Option<&watch::Sender<usize>>) {
    let changes = engine.drain_changes();
    let me = engine.me().uuid;
    for list in &changes {
        // No fields: they would follow the closing `]` and break the layout.
        tracing::info!(target: "members", "{}", list.render(me));
    }
    let mut v = view.write().unwrap_or_else(|p| p.into_inner());
    v.stats = engine.stats().clone();
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
) {
    for o in engine.drain_outputs() {
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

async fn accept_loop(tcp: TcpListener, tx: mpsc::Sender<(SocketAddr, Vec<u8>)>) {
    let permits = Arc::new(Semaphore::new(MAX_INCOMING_STREAMS));
    loop {
        let Ok((mut sock, from)) = tcp.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let tx = tx.clone();
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
                Ok(Ok(data)) => {
                    let _ = tx.try_send((from, data));
                }
                Ok(Err(e)) => tracing::debug!(%from, "stream receive: {e}"),
                Err(_) => tracing::debug!(%from, "stream receive timed out"),
            }
        });
    }
}
