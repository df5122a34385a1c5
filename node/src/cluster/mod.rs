//! Runs one membership engine on real sockets: it feeds the engine what the transport opened,
//! the candidates discovery found and the clock, and hands the engine's outputs back to the
//! transport. Sealing, framing and limits are in [`transport`]; what the API shows, in [`view`].

pub mod transport;
pub mod view;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use discovery::{Candidate, Snapshot};
use membership::{Engine, MemberList};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

pub use transport::{KnownPeers, Protection, Transport, WireLimits};
pub use view::{ClusterView, SharedView};

/// How a cluster's candidates are derived from discovery's.
pub type CandidateMap = Box<dyn Fn(&Candidate) -> Option<SocketAddr> + Send + Sync>;

/// Everything a cluster task needs.
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
    /// The wire: sealing, framing, limits and drop counters.
    pub transport: Transport,
}

impl std::fmt::Debug for ClusterSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSpec")
            .field("name", &self.name)
            .field("me", self.engine.me())
            .finish_non_exhaustive()
    }
}

/// Starts the cluster task; it returns after a graceful leave.
pub fn spawn(spec: ClusterSpec) -> (SharedView, tokio::task::JoinHandle<()>) {
    let view = ClusterView::shared(spec.name, *spec.engine.me(), spec.engine.list().clone());
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
        transport,
    } = spec;
    let start = Instant::now();
    let (known_tx, known_rx) = watch::channel(KnownPeers::default());
    let (_accept, mut stream_rx) = transport.accept(tcp, known_rx);
    let mut buf = vec![0u8; 65536];
    let mut candidates_open = true;
    let mut candidate_ips =
        set_candidates(&mut engine, &candidates.borrow_and_update(), &map, start);
    publish(&mut engine, &view, size_tx.as_ref(), &transport);
    update_known(&known_tx, engine.list(), &candidate_ips);
    loop {
        let mut candidates_changed = false;
        let deadline = start + engine.next_deadline();
        tokio::select! {
            r = udp.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    if let Some(plain) = transport.open_datagram(from, &buf[..n]) {
                        engine.handle_datagram(from, &plain, start.elapsed());
                    }
                }
                Err(e) => tracing::debug!(cluster = name, "udp receive: {e}"),
            },
            Some((from, data)) = stream_rx.recv() => {
                engine.handle_stream(from, &data, start.elapsed());
            }
            r = candidates.changed(), if candidates_open => match r {
                Ok(()) => {
                    let snap = candidates.borrow_and_update().clone();
                    candidate_ips = set_candidates(&mut engine, &snap, &map, start);
                    candidates_changed = true;
                }
                Err(_) => candidates_open = false,
            },
            _ = tokio::time::sleep_until(deadline.into()) => engine.tick(start.elapsed()),
            _ = shutdown.changed() => {
                engine.leave(start.elapsed());
                send_outputs(&mut engine, &udp, &transport).await;
                // Give the leave datagrams a moment to leave the host.
                tokio::time::sleep(Duration::from_millis(50)).await;
                break;
            }
        }
        send_outputs(&mut engine, &udp, &transport).await;
        if publish(&mut engine, &view, size_tx.as_ref(), &transport) || candidates_changed {
            update_known(&known_tx, engine.list(), &candidate_ips);
        }
    }
}

async fn send_outputs(engine: &mut Engine, udp: &UdpSocket, transport: &Transport) {
    for o in engine.drain_outputs() {
        transport.send(udp, o).await;
    }
}

/// Hands the candidates to the engine and returns their IPs.
fn set_candidates(
    engine: &mut Engine,
    snap: &Snapshot,
    map: &CandidateMap,
    start: Instant,
) -> HashSet<IpAddr> {
    let addrs: Vec<SocketAddr> = snap.candidates.iter().filter_map(map).collect();
    let ips = addrs.iter().map(SocketAddr::ip).collect();
    engine.set_candidates(addrs, start.elapsed());
    ips
}

/// Shares the IPs of the members in the list and of the candidates with the accept loop.
fn update_known(tx: &watch::Sender<KnownPeers>, list: &MemberList, candidates: &HashSet<IpAddr>) {
    let mut ips = candidates.clone();
    ips.extend(list.members.iter().map(|m| m.addr.ip()));
    tx.send_if_modified(|known| {
        if **known == ips {
            return false;
        }
        *known = Arc::new(ips);
        true
    });
}

/// Logs and shares the lists adopted since the last call; returns whether there was one.
fn publish(
    engine: &mut Engine,
    view: &SharedView,
    size_tx: Option<&watch::Sender<usize>>,
    transport: &Transport,
) -> bool {
    let changes = engine.drain_changes();
    view::log_lists(&changes, engine.me().uuid);
    let mut v = view.write().unwrap_or_else(|p| p.into_inner());
    v.update(
        *engine.me(),
        engine.stats(),
        &transport.dropped(),
        &changes,
        Instant::now(),
    );
    if let (Some(tx), Some(last)) = (size_tx, changes.last()) {
        tx.send_replace(last.members.len());
    }
    !changes.is_empty()
}
