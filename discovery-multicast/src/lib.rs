//! Multicast discovery: nodes on one L2 network announce themselves on a multicast group and
//! listen there, so no one needs to know the others' addresses beforehand.
//!
//! - The group is joined only on the interface that holds the private IP, and announcements
//!   leave through it (`IP_MULTICAST_IF`) with `--multicast_ttl` (1 by default: one subnet).
//! - The private IP's family picks the group: `--multicast_group` (IPv4) or
//!   `--multicast_group6`, an IPv6 group of link-local scope (`ff02::/16`) joined on the
//!   private IP's interface (found in `/proc/net/if_inet6`), with the same hop limit and loop
//!   settings. Announcements then carry the IPv6 private address.
//! - Announcements ([`Announcement`]: format version, cluster name, role, UUID, private address
//!   and port, interval) go out every [`ALONE_INTERVAL`] while the node is alone and back off
//!   to [`announce_interval`] once `Context::members` shows a cluster, with ±25 % jitter.
//! - The listener keeps a bounded [`table::Table`] of peers heard recently, each expiring after
//!   it missed a few announcements, and publishes it as a `Snapshot` whenever it changes.
//! - Other cluster names, this node's own echo and peers outside `--private_ip_selector` are
//!   ignored; garbage, oversized or unauthenticated datagrams are dropped and counted
//!   ([`Stats`]), and reported in a rate-limited warning, never a crash.
//! - [`codec::Seal`] is the seam where the cluster key's authentication plugs in.
//! - Text from the wire (a foreign cluster name) is escaped with `discovery::escape_untrusted`
//!   where it reaches a log line, so it cannot forge lines or send escape codes.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use discovery::{
    Backoff, BoxFuture, Candidate, Chain, Context, Counter, Discover, DiscoveryError, Exclusion,
    Refresh, RefreshObserver, Report, Snapshot, escape_untrusted,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;

pub mod codec;
pub mod table;

pub use codec::{Announcement, MAX_DATAGRAM, Plaintext, Seal};
use table::{Insert, MAX_PEERS, Table};

/// The announcement interval while the node is alone.
pub const ALONE_INTERVAL: Duration = Duration::from_secs(1);
/// The announcement interval once the node is in a cluster of up to 32.
pub const JOINED_INTERVAL: Duration = Duration::from_secs(3);
/// The longest announcement interval, reached by clusters of 320 and more.
pub const MAX_INTERVAL: Duration = Duration::from_secs(30);
/// How often a warning about dropped datagrams may be logged.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// The default IPv6 group, of link-local scope: the IPv4 default 224.2.2.3 spelled in
/// `ff02::/16`.
pub const DEFAULT_GROUP6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0x224, 2, 2, 3);

/// The pause between announcements for an all-instances list of `members`.
///
/// Alone: [`ALONE_INTERVAL`], so a new or cut-off node is found fast. In a cluster:
/// [`JOINED_INTERVAL`] per started 32 members, at most [`MAX_INTERVAL`], so the group carries
/// about 10 announcements a second whatever the cluster size.
pub fn announce_interval(members: usize) -> Duration {
    if members <= 1 {
        return ALONE_INTERVAL;
    }
    let steps = members.div_ceil(32).max(1) as u32;
    (JOINED_INTERVAL * steps).min(MAX_INTERVAL)
}

/// Why multicast discovery failed or dropped a datagram.
#[derive(Debug, thiserror::Error)]
pub enum MulticastError {
    /// The flags do not make a usable configuration.
    #[error("invalid multicast configuration: {0}")]
    Config(String),
    /// A socket operation failed.
    #[error("cannot {what}: {source}")]
    Socket {
        /// What was being done, and which flag sets it.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A datagram is not a valid announcement.
    #[error("malformed announcement: {0}")]
    Malformed(&'static str),
    /// A datagram is longer than any announcement.
    #[error("oversized datagram of {0} bytes (announcements are at most {MAX_DATAGRAM})")]
    Oversized(usize),
    /// A datagram did not pass the seal's check.
    #[error("announcement failed authentication")]
    Unauthenticated,
}

impl From<MulticastError> for DiscoveryError {
    fn from(e: MulticastError) -> Self {
        match e {
            MulticastError::Socket { what, source } => DiscoveryError::Unreachable {
                backend: "multicast",
                message: format!("cannot {what}"),
                source: Some(Box::new(source)),
            },
            other => DiscoveryError::Config(Box::new(other)),
        }
    }
}

/// The multicast flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MulticastConfig {
    /// `--multicast_group`: an IPv4 multicast address, used when the private IP is IPv4.
    pub group: Ipv4Addr,
    /// `--multicast_group6`: an IPv6 multicast address of link-local scope, used when the
    /// private IP is IPv6.
    pub group6: Ipv6Addr,
    /// `--multicast_port`.
    pub port: u16,
    /// `--multicast_ttl`: 1 keeps announcements on the local subnet.
    pub ttl: u32,
    /// `--multicast_loopback`: also deliver announcements to this host, for single-host demos.
    pub loopback: bool,
    /// How long one [`Discover::discover`] round (`node discover`) listens.
    pub listen_window: Duration,
}

impl Default for MulticastConfig {
    fn default() -> Self {
        Self {
            group: Ipv4Addr::new(224, 2, 2, 3),
            group6: DEFAULT_GROUP6,
            port: 54327,
            ttl: 1,
            loopback: false,
            listen_window: Duration::from_secs(4),
        }
    }
}

/// Counters of what the listener received and sent.
#[derive(Debug, Default)]
pub struct Stats {
    received: AtomicU64,
    accepted: AtomicU64,
    sent: AtomicU64,
    send_errors: AtomicU64,
    malformed: AtomicU64,
    oversized: AtomicU64,
    unauthenticated: AtomicU64,
    foreign_cluster: AtomicU64,
    own: AtomicU64,
    excluded: AtomicU64,
    table_full: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Datagrams received.
    pub received: u64,
    /// Announcements of peers of this cluster.
    pub accepted: u64,
    /// Announcements sent.
    pub sent: u64,
    /// Announcements that could not be sent.
    pub send_errors: u64,
    /// Datagrams that are not announcements (including a source that is not the announced IP).
    pub malformed: u64,
    /// Datagrams longer than [`MAX_DATAGRAM`].
    pub oversized: u64,
    /// Datagrams the seal rejected.
    pub unauthenticated: u64,
    /// Announcements of another cluster name.
    pub foreign_cluster: u64,
    /// This node's own announcements, looped back.
    pub own: u64,
    /// Peers outside `--private_ip_selector`.
    pub excluded: u64,
    /// New peers dropped because the table was full.
    pub table_full: u64,
}

impl Stats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            received: g(&self.received),
            accepted: g(&self.accepted),
            sent: g(&self.sent),
            send_errors: g(&self.send_errors),
            malformed: g(&self.malformed),
            oversized: g(&self.oversized),
            unauthenticated: g(&self.unauthenticated),
            foreign_cluster: g(&self.foreign_cluster),
            own: g(&self.own),
            excluded: g(&self.excluded),
            table_full: g(&self.table_full),
        }
    }
}

impl StatsSnapshot {
    /// The counters as `/metrics` shows them (see [`Discover::counters`]).
    pub fn counters(&self) -> Vec<Counter> {
        let c = |name, help, value| Counter { name, help, value };
        vec![
            c(
                "node_discovery_multicast_received",
                "Datagrams received on the multicast group.",
                self.received,
            ),
            c(
                "node_discovery_multicast_accepted",
                "Announcements of peers of this cluster.",
                self.accepted,
            ),
            c(
                "node_discovery_multicast_sent",
                "Announcements sent.",
                self.sent,
            ),
            c(
                "node_discovery_multicast_send_errors",
                "Announcements that could not be sent.",
                self.send_errors,
            ),
            c(
                "node_discovery_multicast_dropped_malformed",
                "Datagrams dropped as not an announcement, or not from the announced address.",
                self.malformed,
            ),
            c(
                "node_discovery_multicast_dropped_oversized",
                "Datagrams dropped as longer than any announcement.",
                self.oversized,
            ),
            c(
                "node_discovery_multicast_dropped_unauthenticated",
                "Datagrams dropped because the cluster key did not open them.",
                self.unauthenticated,
            ),
            c(
                "node_discovery_multicast_skipped_foreign_cluster",
                "Announcements of another cluster name.",
                self.foreign_cluster,
            ),
            c(
                "node_discovery_multicast_skipped_own",
                "This node's own announcements, looped back.",
                self.own,
            ),
            c(
                "node_discovery_multicast_skipped_excluded",
                "Announcements of peers outside --private_ip_selector.",
                self.excluded,
            ),
            c(
                "node_discovery_multicast_dropped_table_full",
                "Announcements of new peers dropped because the peer table was full.",
                self.table_full,
            ),
        ]
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// Logs an announcement that was seen and skipped. Its reason may quote a foreign cluster name
/// from the wire, so it is escaped here, where it reaches the log (`node discover` escapes the
/// reasons it prints).
fn log_skipped(x: &Exclusion) {
    tracing::debug!(
        peer = %escape_untrusted(&x.id),
        reason = %escape_untrusted(&x.reason),
        "announcement skipped"
    );
}

/// What one datagram turned out to be.
#[derive(Debug)]
enum Heard {
    /// A peer of this cluster.
    Peer(Announcement),
    /// An announcement that was seen and skipped.
    Skipped(Exclusion),
    /// Not an announcement: dropped.
    Dropped(MulticastError),
}

#[derive(Debug)]
struct Sockets {
    recv: std::net::UdpSocket,
    send: std::net::UdpSocket,
}

/// The multicast backend.
#[derive(Debug)]
pub struct MulticastDiscovery {
    cfg: MulticastConfig,
    ctx: Context,
    ip: IpAddr,
    /// The index of the interface holding an IPv6 private IP (the group's scope); 0 for IPv4.
    ifindex: u32,
    seal: Arc<dyn Seal>,
    stats: Arc<Stats>,
    sockets: Mutex<Option<Sockets>>,
}

impl MulticastDiscovery {
    /// Checks the configuration and opens the sockets, so that a bad group, a taken port or an
    /// interface without multicast fails at start-up with a clear message.
    pub fn new(cfg: MulticastConfig, ctx: Context) -> Result<Self, MulticastError> {
        if !cfg.group.is_multicast() {
            return Err(MulticastError::Config(format!(
                "--multicast_group {} is not a multicast address: use one in 224.0.0.0/4, e.g. the default 224.2.2.3",
                cfg.group
            )));
        }
        if cfg.port == 0 {
            return Err(MulticastError::Config(
                "--multicast_port must be 1 to 65535".into(),
            ));
        }
        if !(1..=255).contains(&cfg.ttl) {
            return Err(MulticastError::Config(format!(
                "--multicast_ttl {} is out of range: use 1 (one subnet, the default) to 255",
                cfg.ttl
            )));
        }
        if !is_link_local_group(cfg.group6) {
            return Err(MulticastError::Config(format!(
                "--multicast_group6 {} is not an IPv6 multicast group of link-local scope: use one in ff02::/16, e.g. the default {DEFAULT_GROUP6}",
                cfg.group6
            )));
        }
        let ip = ctx.private_ip;
        let ifindex = match ip {
            IpAddr::V4(_) => 0,
            IpAddr::V6(v6) => {
                if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                    return Err(MulticastError::Config(format!(
                        "the private IP {v6} is link-local, which peers cannot reach without an interface scope: pick a global or ULA address with --private_ip_selector"
                    )));
                }
                let table =
                    std::fs::read_to_string(IF_INET6).map_err(|source| MulticastError::Socket {
                        what: format!(
                            "read {IF_INET6} to find the interface holding the private IP {v6}"
                        ),
                        source,
                    })?;
                ifindex_of(&table, v6).ok_or_else(|| {
                    MulticastError::Config(format!(
                        "no interface holds the private IP {v6} (per {IF_INET6}), so there is none to join {} on: check --private_ip_selector",
                        cfg.group6
                    ))
                })?
            }
        };
        if ctx.cluster_name.is_empty() || ctx.cluster_name.len() > 255 {
            return Err(MulticastError::Config(
                "--cluster_name must be 1 to 255 bytes for multicast announcements".into(),
            ));
        }
        let d = Self {
            cfg,
            ctx,
            ip,
            ifindex,
            seal: Arc::new(Plaintext),
            stats: Arc::new(Stats::default()),
            sockets: Mutex::new(None),
        };
        let s = d.open_sockets()?;
        *d.sockets.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
        Ok(d)
    }

    /// Replaces the [`Plaintext`] seal, e.g. with the cluster key's authentication.
    pub fn with_seal(mut self, seal: Arc<dyn Seal>) -> Self {
        self.seal = seal;
        self
    }

    /// The counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The group's address for this node's family (with the interface as the IPv6 scope).
    pub fn group(&self) -> SocketAddr {
        match self.ip {
            IpAddr::V4(_) => SocketAddr::V4(SocketAddrV4::new(self.cfg.group, self.cfg.port)),
            IpAddr::V6(_) => SocketAddr::V6(SocketAddrV6::new(
                self.cfg.group6,
                self.cfg.port,
                0,
                self.ifindex,
            )),
        }
    }

    fn open_sockets(&self) -> Result<Sockets, MulticastError> {
        let (recv, send) = match self.ip {
            IpAddr::V4(ip) => self.open_sockets_v4(ip)?,
            IpAddr::V6(ip) => self.open_sockets_v6(ip)?,
        };
        for s in [&recv, &send] {
            s.set_nonblocking(true)
                .map_err(|source| MulticastError::Socket {
                    what: "make the socket non-blocking".into(),
                    source,
                })?;
        }
        Ok(Sockets {
            recv: recv.into(),
            send: send.into(),
        })
    }

    /// A UDP socket of `domain`; for receiving, one that other processes may bind too.
    fn udp(domain: Domain, shared: bool) -> Result<Socket, MulticastError> {
        let err = |what: &str| {
            let what = what.to_owned();
            move |source| MulticastError::Socket { what, source }
        };
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))
            .map_err(err("create a UDP socket"))?;
        if domain == Domain::IPV6 {
            s.set_only_v6(true).map_err(err("set IPV6_V6ONLY"))?;
        }
        if shared {
            s.set_reuse_address(true).map_err(err("set SO_REUSEADDR"))?;
            s.set_reuse_port(true).map_err(err("set SO_REUSEPORT"))?;
        }
        Ok(s)
    }

    /// The receiving and the sending socket for an IPv6 private address (a link-local group).
    fn open_sockets_v6(&self, ip: Ipv6Addr) -> Result<(Socket, Socket), MulticastError> {
        let (group, port, ifindex) = (self.cfg.group6, self.cfg.port, self.ifindex);
        let err = |what: String| move |source| MulticastError::Socket { what, source };
        let recv = Self::udp(Domain::IPV6, true)?;
        // A link-local group is bound with its interface as the scope, which also binds the
        // socket to that interface: it hears this group on this link only.
        recv.bind(&SocketAddrV6::new(group, port, 0, ifindex).into())
            .map_err(err(format!(
                "listen on [{group}%{ifindex}]:{port} (--multicast_group6, --multicast_port)"
            )))?;
        recv.join_multicast_v6(&group, ifindex).map_err(err(format!(
            "join {group} on the interface holding {ip} (index {ifindex}): check that it supports multicast, or change --private_ip_selector"
        )))?;
        let _ = recv.set_multicast_all_v6(false);

        let send = Self::udp(Domain::IPV6, false)?;
        send.bind(&SocketAddrV6::new(ip, 0, 0, 0).into())
            .map_err(err(format!("bind the announcement socket to {ip}")))?;
        send.set_multicast_if_v6(ifindex).map_err(err(format!(
            "send multicast from the interface holding {ip} (index {ifindex})"
        )))?;
        send.set_multicast_hops_v6(self.cfg.ttl)
            .map_err(err("set --multicast_ttl as the hop limit".into()))?;
        send.set_multicast_loop_v6(self.cfg.loopback)
            .map_err(err("set --multicast_loopback".into()))?;
        Ok((recv, send))
    }

    /// The receiving and the sending socket for an IPv4 private address.
    fn open_sockets_v4(&self, ip: Ipv4Addr) -> Result<(Socket, Socket), MulticastError> {
        let (group, port) = (self.cfg.group, self.cfg.port);
        let err = |what: String| move |source| MulticastError::Socket { what, source };
        let recv = Self::udp(Domain::IPV4, true)?;
        // Bound to the group, the socket receives this group's datagrams only.
        recv.bind(&SocketAddrV4::new(group, port).into())
            .map_err(err(format!(
                "listen on {group}:{port} (--multicast_group, --multicast_port)"
            )))?;
        recv.join_multicast_v4(&group, &ip).map_err(err(format!(
            "join {group} on the interface holding {ip}: check that it supports multicast and has a route, or change --private_ip_selector"
        )))?;
        // Only the group joined on this socket, not those other sockets on the host joined.
        let _ = recv.set_multicast_all_v4(false);

        let send = Self::udp(Domain::IPV4, false)?;
        send.bind(&SocketAddrV4::new(ip, 0).into())
            .map_err(err(format!("bind the announcement socket to {ip}")))?;
        send.set_multicast_if_v4(&ip).map_err(err(format!(
            "send multicast from the interface holding {ip}"
        )))?;
        send.set_multicast_ttl_v4(self.cfg.ttl)
            .map_err(err("set --multicast_ttl".into()))?;
        send.set_multicast_loop_v4(self.cfg.loopback)
            .map_err(err("set --multicast_loopback".into()))?;
        Ok((recv, send))
    }

    /// The sockets opened by `new`, or fresh ones if a previous round took them.
    fn take_sockets(&self) -> Result<(UdpSocket, UdpSocket), MulticastError> {
        let taken = self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let s = match taken {
            Some(s) => s,
            None => self.open_sockets()?,
        };
        let tokio = |s: std::net::UdpSocket| {
            UdpSocket::from_std(s).map_err(|source| MulticastError::Socket {
                what: "register the socket with the runtime".into(),
                source,
            })
        };
        Ok((tokio(s.recv)?, tokio(s.send)?))
    }

    /// This node's announcement, promising the next one within `interval`.
    pub fn announcement(&self, interval: Duration) -> Announcement {
        let ms = u32::try_from(interval.as_millis()).unwrap_or(u32::MAX);
        Announcement {
            cluster_name: self.ctx.cluster_name.clone(),
            role: self.ctx.role,
            node_id: self.ctx.node_id,
            ip: self.ip,
            port: self.ctx.private_port,
            interval_ms: ms.clamp(*codec::INTERVAL_MS.start(), *codec::INTERVAL_MS.end()),
        }
    }

    /// Sorts one received datagram, counting it.
    fn hear(&self, datagram: &[u8], src: SocketAddr) -> Heard {
        let s = &self.stats;
        bump(&s.received);
        if datagram.len() > MAX_DATAGRAM {
            bump(&s.oversized);
            return Heard::Dropped(MulticastError::Oversized(datagram.len()));
        }
        let plain = match self.seal.open(datagram) {
            Ok(p) => p,
            Err(e) => {
                bump(&s.unauthenticated);
                return Heard::Dropped(e);
            }
        };
        let a = match Announcement::decode(&plain) {
            Ok(a) => a,
            Err(e) => {
                bump(&s.malformed);
                return Heard::Dropped(e);
            }
        };
        if src.ip() != a.addr() {
            bump(&s.malformed);
            return Heard::Dropped(MulticastError::Malformed(
                "the source address is not the announced address",
            ));
        }
        let id = format!("{} {}", SocketAddr::new(a.ip, a.port), a.node_id);
        if a.cluster_name != self.ctx.cluster_name {
            bump(&s.foreign_cluster);
            return Heard::Skipped(Exclusion {
                id,
                reason: format!(
                    "cluster name `{}`, this node's is `{}`",
                    a.cluster_name, self.ctx.cluster_name
                ),
            });
        }
        if a.node_id == self.ctx.node_id {
            bump(&s.own);
            return Heard::Skipped(Exclusion {
                id,
                reason: "self".into(),
            });
        }
        match self.ctx.classify(id, a.addr(), a.port) {
            Ok(_) => {
                bump(&s.accepted);
                Heard::Peer(a)
            }
            Err(x) => {
                bump(&s.excluded);
                Heard::Skipped(x)
            }
        }
    }

    async fn announce(&self, send: &UdpSocket, interval: Duration, warn: &mut Warner) {
        let to = self.group();
        let bytes = match self.announcement(interval).encode() {
            Ok(b) => self.seal.seal(b),
            Err(e) => {
                // `new` checked the name, so this cannot happen; log rather than crash.
                tracing::error!("cannot encode the announcement: {e}");
                return;
            }
        };
        match send.send_to(&bytes, to).await {
            Ok(_) => bump(&self.stats.sent),
            Err(e) => {
                bump(&self.stats.send_errors);
                warn.maybe(|| {
                    tracing::warn!(
                        group = %to,
                        "cannot send the multicast announcement ({e}); retrying at the next interval"
                    );
                });
            }
        }
    }

    async fn run(self: Arc<Self>, tx: watch::Sender<Snapshot>, observer: Arc<dyn RefreshObserver>) {
        let mut backoff = Backoff::new(Duration::from_secs(1), MAX_INTERVAL);
        let (recv, send) = loop {
            match self.take_sockets() {
                Ok(s) => break s,
                Err(e) => {
                    let e = DiscoveryError::from(e);
                    let pause = backoff.next_pause();
                    tracing::error!(
                        backend = "multicast",
                        retry_in_ms = pause.as_millis() as u64,
                        "{}",
                        Chain(&e)
                    );
                    observer.round(Duration::ZERO, Err(&e));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = tx.closed() => return,
                    }
                }
            }
        };
        tracing::info!(
            group = %self.group(),
            interface_ip = %self.ip,
            ttl = self.cfg.ttl,
            "multicast discovery listening and announcing"
        );
        let mut refreshes = 1u64;
        tx.send_replace(Snapshot {
            candidates: Vec::new(),
            refreshes,
        });
        observer.round(Duration::ZERO, Ok(0));
        let mut published: Vec<Candidate> = Vec::new();
        let mut table = Table::new(MAX_PEERS);
        let mut members = self.ctx.members.clone();
        let mut members_open = true;
        let mut next_announce = Instant::now() + discovery::jitter(Duration::from_millis(200));
        let mut expiry = tokio::time::interval(Duration::from_millis(250));
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        let mut drops = Warner::default();
        let mut send_warn = Warner::default();
        loop {
            let mut changed = false;
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep_until(next_announce) => {
                    let interval = announce_interval(*members.borrow());
                    self.announce(&send, interval, &mut send_warn).await;
                    next_announce = Instant::now() + jittered(interval);
                }
                r = members.changed(), if members_open => match r {
                    Ok(()) => {
                        // Alone again: announce soon, so the way back is found quickly.
                        let alone = announce_interval(*members.borrow_and_update());
                        let soon = Instant::now() + discovery::jitter(alone);
                        if soon < next_announce {
                            next_announce = soon;
                        }
                    }
                    Err(_) => members_open = false,
                },
                r = recv.recv_from(&mut buf) => match r {
                    Ok((n, src)) => match self.hear(&buf[..n], src) {
                        Heard::Peer(a) => match table.insert(&a, Instant::now().into_std()) {
                            Insert::New | Insert::Replaced => changed = true,
                            Insert::Refreshed => {}
                            Insert::Full => {
                                bump(&self.stats.table_full);
                                drops.maybe(|| tracing::warn!(
                                    peers = table.len(),
                                    "the multicast peer table is full; announcements from new addresses are dropped until entries expire"
                                ));
                            }
                        },
                        Heard::Skipped(x) => log_skipped(&x),
                        Heard::Dropped(e) => {
                            let st = self.stats.snapshot();
                            drops.maybe(|| tracing::warn!(
                                from = %src,
                                malformed = st.malformed,
                                oversized = st.oversized,
                                unauthenticated = st.unauthenticated,
                                "dropped a datagram on the multicast group: {e} (counts are totals; at most one warning a minute)"
                            ));
                        }
                    },
                    Err(e) => {
                        tracing::debug!("multicast receive failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = expiry.tick() => {
                    changed = table.expire(Instant::now().into_std()) > 0;
                }
            }
            if changed {
                let now = table.candidates();
                if now != published {
                    refreshes += 1;
                    observer.round(Duration::ZERO, Ok(now.len()));
                    tracing::debug!(candidates = now.len(), "multicast candidates changed");
                    tx.send_replace(Snapshot {
                        candidates: now.clone(),
                        refreshes,
                    });
                    published = now;
                }
            }
        }
    }
}

/// Where Linux lists every IPv6 address with its interface index.
const IF_INET6: &str = "/proc/net/if_inet6";

/// Whether `g` is an IPv6 multicast group of link-local scope (`ffX2::/16`).
fn is_link_local_group(g: Ipv6Addr) -> bool {
    (g.segments()[0] & 0xff0f) == 0xff02
}

/// The index of the interface holding `ip`, read from a `/proc/net/if_inet6` table: one
/// address a line, `<32 hex digits> <index, hex> <prefix> <scope> <flags> <name>`.
fn ifindex_of(table: &str, ip: Ipv6Addr) -> Option<u32> {
    table.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let addr = u128::from_str_radix(f.next()?, 16).ok()?;
        let index = u32::from_str_radix(f.next()?, 16).ok()?;
        (Ipv6Addr::from(addr) == ip && index > 0).then_some(index)
    })
}

/// `interval` with ±25 % jitter, so a fleet started together does not announce in step.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.75) + discovery::jitter(interval / 2)
}

/// Lets a warning through at most once per [`WARN_EVERY`].
#[derive(Debug, Default)]
struct Warner {
    last: Option<Instant>,
}

impl Warner {
    fn maybe(&mut self, log: impl FnOnce()) {
        let now = Instant::now();
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            self.last = Some(now);
            log();
        }
    }
}

/// The most distinct exclusions one `discover` round reports.
const MAX_EXCLUSIONS: usize = 256;

impl Discover for MulticastDiscovery {
    fn name(&self) -> &'static str {
        "multicast"
    }

    /// The drop and traffic counters of [`Stats`], for `/metrics`.
    fn counters(&self) -> Vec<Counter> {
        self.stats().counters()
    }

    /// Listens for [`MulticastConfig::listen_window`] without announcing (a one-shot run has
    /// no cluster ports to join), and reports the peers heard and what was skipped.
    fn discover(&self) -> BoxFuture<'_, Result<Report, DiscoveryError>> {
        Box::pin(async move {
            let (recv, _send) = self.take_sockets()?;
            let deadline = Instant::now() + self.cfg.listen_window;
            let mut table = Table::new(MAX_PEERS);
            let mut skipped: BTreeMap<String, String> = BTreeMap::new();
            let mut drops: BTreeMap<String, (u64, SocketAddr)> = BTreeMap::new();
            let mut buf = vec![0u8; MAX_DATAGRAM + 1];
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    r = recv.recv_from(&mut buf) => {
                        let Ok((n, src)) = r else { continue };
                        match self.hear(&buf[..n], src) {
                            Heard::Peer(a) => {
                                table.insert(&a, Instant::now().into_std());
                            }
                            Heard::Skipped(x) => {
                                if skipped.len() < MAX_EXCLUSIONS || skipped.contains_key(&x.id) {
                                    skipped.insert(x.id, x.reason);
                                }
                            }
                            Heard::Dropped(e) => {
                                if drops.len() < MAX_EXCLUSIONS || drops.contains_key(&e.to_string()) {
                                    let d = drops.entry(e.to_string()).or_insert((0, src));
                                    *d = (d.0 + 1, src);
                                }
                            }
                        }
                    }
                }
            }
            let mut excluded: Vec<Exclusion> = skipped
                .into_iter()
                .map(|(id, reason)| Exclusion { id, reason })
                .collect();
            excluded.extend(drops.into_iter().map(|(reason, (n, src))| Exclusion {
                id: format!("{n} datagram(s), last from {src}"),
                reason,
            }));
            Ok(Report {
                candidates: table.candidates(),
                excluded,
            })
        })
    }

    fn watch(
        self: Arc<Self>,
        _refresh: Refresh,
        tx: watch::Sender<Snapshot>,
        observer: Arc<dyn RefreshObserver>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(self.run(tx, observer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use discovery::Role;
    use uuid::Uuid;

    #[test]
    fn announcements_back_off_in_a_cluster_and_stay_bounded() {
        assert_eq!(announce_interval(0), ALONE_INTERVAL);
        assert_eq!(announce_interval(1), ALONE_INTERVAL);
        assert_eq!(announce_interval(2), JOINED_INTERVAL);
        assert_eq!(announce_interval(32), JOINED_INTERVAL);
        assert_eq!(announce_interval(33), JOINED_INTERVAL * 2);
        assert_eq!(announce_interval(100_000), MAX_INTERVAL);
        for _ in 0..1000 {
            let j = jittered(JOINED_INTERVAL);
            assert!(j >= JOINED_INTERVAL.mul_f64(0.75) && j <= JOINED_INTERVAL.mul_f64(1.25));
        }
    }

    fn ctx(selector: &str) -> Context {
        Context::standalone(
            "blue",
            Role::Worker,
            "127.0.0.1".parse().unwrap(),
            8081,
            Some(selector.parse().unwrap()),
        )
    }

    fn backend(ctx: Context) -> MulticastDiscovery {
        // An unused group and port: nothing is sent by these tests.
        let cfg = MulticastConfig {
            group: Ipv4Addr::new(239, 255, 77, 1),
            port: 54399,
            ..MulticastConfig::default()
        };
        MulticastDiscovery::new(cfg, ctx).unwrap()
    }

    fn from(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40000)
    }

    #[test]
    fn bad_flags_are_refused_with_the_fix() {
        let bad = |cfg: MulticastConfig| {
            MulticastDiscovery::new(cfg, ctx("127.0.0.0/8"))
                .unwrap_err()
                .to_string()
        };
        let e = bad(MulticastConfig {
            group: Ipv4Addr::new(10, 0, 0, 1),
            ..MulticastConfig::default()
        });
        assert!(
            e.contains("not a multicast address") && e.contains("224.2.2.3"),
            "{e}"
        );
        let e = bad(MulticastConfig {
            ttl: 0,
            ..MulticastConfig::default()
        });
        assert!(e.contains("--multicast_ttl"), "{e}");
        let e = bad(MulticastConfig {
            group6: "ff05::1:3".parse().unwrap(),
            ..MulticastConfig::default()
        });
        assert!(
            e.contains("--multicast_group6 ff05::1:3") && e.contains("link-local scope"),
            "{e}"
        );
        assert!(e.contains(&DEFAULT_GROUP6.to_string()), "{e}");
        let e = bad(MulticastConfig {
            group6: "fd00::1".parse().unwrap(),
            ..MulticastConfig::default()
        });
        assert!(e.contains("--multicast_group6"), "{e}");
        let v6 = |ip: &str| {
            let ctx = Context::standalone("blue", Role::Worker, ip.parse().unwrap(), 8081, None);
            MulticastDiscovery::new(MulticastConfig::default(), ctx)
                .unwrap_err()
                .to_string()
        };
        let e = v6("fe80::1");
        assert!(
            e.contains("link-local") && e.contains("--private_ip_selector"),
            "{e}"
        );
        // An address no interface holds (inside the documentation range).
        let e = v6("2001:db8:ffff::77");
        assert!(
            e.contains("no interface holds the private IP 2001:db8:ffff::77")
                && e.contains("--private_ip_selector"),
            "{e}"
        );
    }

    #[test]
    fn the_ipv6_interface_comes_from_the_kernels_address_table() {
        let table = "\
fd000000000000000000000000000002 04 40 00 82     eth0
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
20010002000000010000000000000002 1a 40 00 80     tb1v02
00000000000000000000000000000001 01 80 10 80       lo
garbage line
";
        let ip = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        assert_eq!(ifindex_of(table, ip("fd00::2")), Some(4));
        assert_eq!(ifindex_of(table, ip("2001:2:0:1::2")), Some(0x1a));
        assert_eq!(ifindex_of(table, ip("::1")), Some(1));
        assert_eq!(ifindex_of(table, ip("fd00::3")), None);
        assert_eq!(ifindex_of("", ip("fd00::2")), None);
        assert!(is_link_local_group(DEFAULT_GROUP6));
        assert!(is_link_local_group(ip("ff12::1")));
        assert!(!is_link_local_group(ip("ff05::1")));
        assert!(!is_link_local_group(ip("fe80::1")));
    }

    #[tokio::test]
    async fn datagrams_are_sorted_and_counted() {
        let me = ctx("127.0.0.0/8");
        let my_id = me.node_id;
        let d = backend(me);
        let peer = Announcement {
            cluster_name: "blue".into(),
            role: Role::Scheduler,
            node_id: Uuid::from_u128(7),
            ip: Ipv4Addr::new(127, 0, 0, 7).into(),
            port: 8081,
            interval_ms: 1000,
        };
        let enc = |a: &Announcement| a.encode().unwrap();
        assert!(matches!(
            d.hear(&enc(&peer), from("127.0.0.7")),
            Heard::Peer(_)
        ));
        // Another cluster name.
        let red = Announcement {
            cluster_name: "red".into(),
            ..peer.clone()
        };
        match d.hear(&enc(&red), from("127.0.0.7")) {
            Heard::Skipped(x) => assert!(x.reason.contains("`red`"), "{}", x.reason),
            other => panic!("{other:?}"),
        }
        // Our own echo.
        let own = Announcement {
            node_id: my_id,
            ..peer.clone()
        };
        assert!(
            matches!(d.hear(&enc(&own), from("127.0.0.7")), Heard::Skipped(x) if x.reason == "self")
        );
        // A source that is not the announced address.
        assert!(matches!(
            d.hear(&enc(&peer), from("127.0.0.8")),
            Heard::Dropped(MulticastError::Malformed(_))
        ));
        // Garbage and oversized datagrams.
        assert!(matches!(
            d.hear(b"GET / HTTP/1.1\r\n", from("127.0.0.9")),
            Heard::Dropped(MulticastError::Malformed(_))
        ));
        assert!(matches!(
            d.hear(&[0u8; MAX_DATAGRAM + 1], from("127.0.0.9")),
            Heard::Dropped(MulticastError::Oversized(_))
        ));
        let s = d.stats();
        assert_eq!(
            (
                s.received,
                s.accepted,
                s.foreign_cluster,
                s.own,
                s.malformed,
                s.oversized
            ),
            (6, 1, 1, 1, 2, 1)
        );
        // The same counts reach /metrics through the contract, every counter once.
        let counters = Discover::counters(&d);
        assert_eq!(counters.len(), 11);
        let value = |name: &str| counters.iter().find(|c| c.name == name).map(|c| c.value);
        assert_eq!(value("node_discovery_multicast_received"), Some(6));
        assert_eq!(value("node_discovery_multicast_dropped_malformed"), Some(2));
        assert_eq!(value("node_discovery_multicast_dropped_oversized"), Some(1));
        assert_eq!(value("node_discovery_multicast_skipped_own"), Some(1));
        let mut names: Vec<&str> = counters.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 11, "names are unique");
        assert!(
            counters
                .iter()
                .all(|c| !c.name.ends_with("_total") && c.help.ends_with('.'))
        );
    }

    /// An IPv6 backend without sockets (joining a group on `lo` is not portable), for `hear`.
    fn backend6(ip: &str, selector: &str) -> MulticastDiscovery {
        let ctx = Context::standalone(
            "blue",
            Role::Worker,
            ip.parse().unwrap(),
            8081,
            Some(selector.parse().unwrap()),
        );
        MulticastDiscovery {
            cfg: MulticastConfig::default(),
            ip: ctx.private_ip,
            ctx,
            ifindex: 7,
            seal: Arc::new(Plaintext),
            stats: Arc::new(Stats::default()),
            sockets: Mutex::new(None),
        }
    }

    #[test]
    fn ipv6_announcements_are_sorted_like_ipv4_ones() {
        let d = backend6("2001:2::2", "2001:2::/64");
        assert_eq!(
            d.group().to_string(),
            format!("[{DEFAULT_GROUP6}%7]:54327"),
            "the group carries the interface as its scope"
        );
        let mine = d.announcement(ALONE_INTERVAL);
        assert_eq!(mine.addr(), "2001:2::2".parse::<IpAddr>().unwrap());
        let peer = Announcement {
            cluster_name: "blue".into(),
            role: Role::Scheduler,
            node_id: Uuid::from_u128(7),
            ip: "2001:2::7".parse().unwrap(),
            port: 8081,
            interval_ms: 1000,
        };
        let enc = |a: &Announcement| a.encode().unwrap();
        assert!(matches!(
            d.hear(&enc(&peer), from("2001:2::7")),
            Heard::Peer(_)
        ));
        // The source must be the announced address, even within the /64.
        assert!(matches!(
            d.hear(&enc(&peer), from("2001:2::8")),
            Heard::Dropped(MulticastError::Malformed(_))
        ));
        // Our own echo, named with brackets.
        match d.hear(&enc(&mine), from("2001:2::2")) {
            Heard::Skipped(x) => {
                assert_eq!(x.reason, "self");
                assert!(x.id.starts_with("[2001:2::2]:8081 "), "{}", x.id);
            }
            other => panic!("{other:?}"),
        }
        // A peer outside the selector.
        let far = Announcement {
            ip: "2001:2:0:9::7".parse().unwrap(),
            ..peer.clone()
        };
        match d.hear(&enc(&far), from("2001:2:0:9::7")) {
            Heard::Skipped(x) => {
                assert!(x.reason.contains("outside"), "{}", x.reason);
                assert!(x.id.starts_with("[2001:2:0:9::7]:8081 "), "{}", x.id);
            }
            other => panic!("{other:?}"),
        }
        let s = d.stats();
        assert_eq!(
            (s.received, s.accepted, s.malformed, s.own, s.excluded),
            (4, 1, 1, 1, 1)
        );
    }

    /// A `MakeWriter` that keeps everything written, for reading log output back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    #[tokio::test]
    async fn a_forged_cluster_name_is_one_escaped_log_line() {
        let d = backend(ctx("127.0.0.0/8"));
        let forged = Announcement {
            cluster_name:
                "x\n\tMember [127.0.0.66]:5701 - 6f1c this\n  Member [127.0.0.67]:5701\n\x1b[2J\u{202e}"
                    .into(),
            role: Role::Worker,
            node_id: Uuid::from_u128(66),
            ip: Ipv4Addr::new(127, 0, 0, 66).into(),
            port: 8081,
            interval_ms: 1000,
        };
        let Heard::Skipped(x) = d.hear(&forged.encode().unwrap(), from("127.0.0.66")) else {
            panic!("a foreign cluster is skipped");
        };
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || log_skipped(&x));
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.ends_with('\n'));
        assert!(
            !text.contains('\x1b') && !text.contains('\u{202e}'),
            "{text:?}"
        );
        assert!(
            !text.lines().any(|l| l.trim_start().starts_with("Member")),
            "{text}"
        );
        assert!(
            text.contains(r"x\n\tMember [127.0.0.66]:5701") && text.contains(r"\u{1b}[2J\u{202e}"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn peers_outside_the_selector_are_excluded() {
        let d = backend(ctx("127.0.0.0/30"));
        let a = Announcement {
            cluster_name: "blue".into(),
            role: Role::Worker,
            node_id: Uuid::from_u128(9),
            ip: Ipv4Addr::new(127, 0, 0, 9).into(),
            port: 8081,
            interval_ms: 1000,
        };
        match d.hear(&a.encode().unwrap(), from("127.0.0.9")) {
            Heard::Skipped(x) => assert!(x.reason.contains("outside"), "{}", x.reason),
            other => panic!("{other:?}"),
        }
        assert_eq!(d.stats().excluded, 1);
    }

    /// Rejects every datagram, like a seal with the wrong key.
    #[derive(Debug)]
    struct WrongKey;

    impl Seal for WrongKey {
        fn seal(&self, payload: Vec<u8>) -> Vec<u8> {
            payload
        }
        fn open(&self, _datagram: &[u8]) -> Result<Vec<u8>, MulticastError> {
            Err(MulticastError::Unauthenticated)
        }
    }

    #[tokio::test]
    async fn the_seal_sees_every_datagram_before_the_decoder() {
        let d = backend(ctx("127.0.0.0/8")).with_seal(Arc::new(WrongKey));
        let a = d.announcement(ALONE_INTERVAL).encode().unwrap();
        assert!(matches!(
            d.hear(&a, from("127.0.0.1")),
            Heard::Dropped(MulticastError::Unauthenticated)
        ));
        assert_eq!(d.stats().unauthenticated, 1);
    }
}
