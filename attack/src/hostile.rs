//! The hostile peer: what it knows ([`Intel`]), how it sends, each attack, and the row it
//! measures.
//!
//! The peer speaks `membership::wire` and foca's codec and binds the bridge address in the root
//! namespace. It spoofs source addresses only when asked to (a raw socket then sends a second
//! copy of each forged datagram under the claimed sender's address). In keyed runs every forged
//! message goes out in the clear and sealed with a key the cluster does not hold.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use foca::{Codec as _, Header, Member, Message, State};
use keyring::{Keyring, Sealer, SealerConfig};
use membership::wire::{self, Kind, ListMsg, PullMsg, SuspectMsg, SyncMsg};
use membership::{NodeId, Role};
use uuid::Uuid;

use crate::capture::{self, Captured};
use crate::cluster::{
    self, ALL_PORT, CLUSTER_NAME, Cluster, GOSSIP_PORTS, NODE_PORTS, PRIVATE_PORT, PUBLIC_PORT,
    SCHEDULER_PORT,
};
use crate::{Attack, AttackError, Row};

/// Fake members in the sync flood.
const FLOOD_MEMBERS: u32 = 2000;
/// Idle connections kept open at each gossip port in the stream hold.
const STREAM_HOLD_PER_PORT: usize = 150;
/// Idle connections opened to each HTTP port in the HTTP hold.
const HTTP_HOLD_PER_PORT: usize = 1000;

/// A small xorshift generator: random bytes need no quality here, only variety.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Rng(t | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn now_ms() -> u64 {
    keyring::unix_ms()
}

/// The logical cluster of a gossip port.
fn logical(port: u16) -> &'static str {
    if port == SCHEDULER_PORT {
        "scheduler"
    } else {
        "all"
    }
}

/// The cluster tag of a gossip port.
pub fn tag(port: u16) -> u64 {
    wire::cluster_tag(CLUSTER_NAME, logical(port))
}

/// A foca packet in its envelope: header, then the updates.
pub fn foca_packet(port: u16, header: &Header<NodeId>, updates: &[Member<NodeId>]) -> Vec<u8> {
    let mut buf = Vec::new();
    wire::put_header(&mut buf, Kind::Foca, tag(port));
    let mut codec = wire::Codec;
    // Encoding into a Vec cannot run out of room.
    let _ = codec.encode_header(header, &mut buf);
    if !updates.is_empty() {
        buf.extend_from_slice(&(updates.len() as u16).to_be_bytes());
        for m in updates {
            let _ = codec.encode_member(m, &mut buf);
        }
    }
    buf
}

/// An IPv4 packet holding one UDP datagram. The kernel fills in the IP checksum; the UDP
/// checksum is left out, as IPv4 allows.
fn ipv4_udp(from: std::net::SocketAddrV4, to: std::net::SocketAddrV4, data: &[u8]) -> Vec<u8> {
    let total = (20 + 8 + data.len()) as u16;
    let mut p = Vec::with_capacity(usize::from(total));
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&from.ip().octets());
    p.extend_from_slice(&to.ip().octets());
    p.extend_from_slice(&from.port().to_be_bytes());
    p.extend_from_slice(&to.port().to_be_bytes());
    p.extend_from_slice(&(8 + data.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    p
}

/// An identity at `id`'s address and UUID that wins every address conflict, so that an update
/// about it replaces whatever identity a node holds there.
fn conflict_winner(id: &NodeId) -> NodeId {
    NodeId {
        started_ms: u64::MAX - 1,
        generation: u16::MAX,
        ..*id
    }
}

/// The hostile peer's sockets and its own (wrong) key.
#[derive(Debug)]
pub struct Hostile {
    udp: UdpSocket,
    key: bool,
    wrong: Sealer,
    /// A raw socket for datagrams with a forged source address, when spoofing.
    spoof: Option<socket2::Socket>,
}

impl Hostile {
    /// Binds a UDP socket on the bed's bridge address; with `spoof`, also opens a raw socket
    /// that sends datagrams under any source address of the bed.
    pub fn new(c: &Cluster, spoof: bool) -> Result<Self, AttackError> {
        let ip = c.attacker_ip();
        let udp = UdpSocket::bind((ip, 0)).map_err(|source| AttackError::Io {
            what: format!("cannot bind the attacker's socket on {ip}"),
            source,
        })?;
        let ring = Keyring::parse(&keyring::generate(), "attacker")
            .map_err(|e| AttackError::Cluster(format!("attacker key: {e}")))?;
        let spoof = if spoof {
            let raw = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::RAW,
                Some(socket2::Protocol::UDP),
            )
            .and_then(|s| s.set_header_included_v4(true).map(|()| s))
            .map_err(|source| AttackError::Io {
                what: "cannot open a raw socket for spoofed datagrams (needs root)".into(),
                source,
            })?;
            Some(raw)
        } else {
            None
        };
        Ok(Self {
            udp,
            key: c.key(),
            wrong: Sealer::new(ring, SealerConfig::default()),
            spoof,
        })
    }

    /// When spoofing, also sends the forged message as a datagram whose source address is
    /// `from` (the member or third party it claims to come from); otherwise does nothing.
    pub fn datagram_from(&self, from: SocketAddr, to: SocketAddr, plain: &[u8]) {
        let (Some(raw), SocketAddr::V4(f), SocketAddr::V4(t)) = (&self.spoof, from, to) else {
            return;
        };
        for data in self.variants(to.port(), plain) {
            let _ = raw.send_to(&ipv4_udp(f, t, &data), &t.into());
        }
    }

    /// What goes on the wire for one forged message: the message itself, and in keyed runs
    /// also a copy sealed with the attacker's key.
    fn variants(&self, port: u16, plain: &[u8]) -> Vec<Vec<u8>> {
        let mut v = vec![plain.to_vec()];
        if self.key {
            v.push(
                self.wrong
                    .seal(&keyring::aad(CLUSTER_NAME, logical(port)), plain),
            );
        }
        v
    }

    /// Sends a forged message as a datagram.
    pub fn datagram(&self, to: SocketAddr, plain: &[u8]) {
        for data in self.variants(to.port(), plain) {
            self.raw(to, &data);
        }
    }

    /// Sends bytes exactly as given.
    pub fn raw(&self, to: SocketAddr, data: &[u8]) {
        let _ = self.udp.send_to(data, to);
    }

    /// Sends a forged message as one stream frame (a 4-byte length, then the message).
    pub fn stream(&self, to: SocketAddr, plain: &[u8]) {
        for data in self.variants(to.port(), plain) {
            let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_millis(500)) else {
                continue;
            };
            let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
            let mut frame = (data.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(&data);
            let _ = s.write_all(&frame);
        }
    }
}

/// A member as the attacker knows it.
#[derive(Debug, Clone, Copy)]
pub struct Known {
    /// Its identity: exact when sniffed, else the UUID and address with a guessed start time.
    pub id: NodeId,
    /// Whether `id` was seen on the wire.
    pub exact: bool,
    /// Its highest incarnation seen on the wire.
    pub incarnation: u16,
}

/// What the attacker learned: every logical cluster's members, oldest first.
#[derive(Debug, Default)]
pub struct Intel {
    members: HashMap<u16, Vec<Known>>,
}

impl Intel {
    /// Reads `GET /v1/members` and, for `sniff`, the bridge; keyless traffic gives exact
    /// identities and incarnations, sealed traffic gives nothing.
    pub fn gather(c: &Cluster, sniff: Duration) -> Result<Intel, AttackError> {
        let api = c
            .ips()
            .iter()
            .find_map(|ip| cluster::api_members((*ip).into()))
            .ok_or_else(|| AttackError::Cluster("no node answered GET /v1/members".into()))?;
        let mut seen: HashMap<(u16, Uuid), (NodeId, u16)> = HashMap::new();
        let mut note = |port: u16, id: NodeId, inc: Option<u16>| {
            let e = seen.entry((port, id.uuid)).or_insert((id, 0));
            if id.generation >= e.0.generation {
                e.0 = id;
            }
            e.1 = e.1.max(inc.unwrap_or(0));
        };
        for c in capture::capture(&c.ips(), &GOSSIP_PORTS, sniff, 20_000)? {
            let port = c.to.port();
            let Ok((kind, p)) = wire::split_header(&c.data, tag(port)) else {
                continue;
            };
            match kind {
                Kind::Foca => {
                    if let Some((h, updates)) = wire::peek_foca(p) {
                        note(port, h.src, Some(h.src_incarnation));
                        // The destination travels in short (generation and UUID tail): only
                        // the sender is a whole identity.
                        if h.dst.addr.port() != 0 {
                            note(port, h.dst, None);
                        }
                        for m in updates {
                            note(port, *m.id(), Some(m.incarnation()));
                        }
                    }
                }
                Kind::List => {
                    if let Ok(l) = wire::decode_list(p, 10_000) {
                        for m in l.members {
                            note(port, m, None);
                        }
                    }
                }
                Kind::Pull => {
                    if let Ok(pull) = wire::decode_pull(p) {
                        note(port, pull.from, None);
                    }
                }
                _ => {}
            }
        }
        let mut members = HashMap::new();
        for (port, list) in api {
            let known = list
                .iter()
                .map(|m| match seen.get(&(port, m.uuid)) {
                    Some((id, inc)) if !id.uuid.is_nil() => Known {
                        id: *id,
                        exact: true,
                        incarnation: *inc,
                    },
                    _ => Known {
                        id: NodeId::new(
                            m.addr,
                            m.uuid,
                            0,
                            if m.scheduler {
                                Role::Scheduler
                            } else {
                                Role::Worker
                            },
                        ),
                        exact: false,
                        incarnation: 0,
                    },
                })
                .collect();
            members.insert(port, known);
        }
        Ok(Intel { members })
    }

    /// The members of the logical cluster on `port`, oldest first.
    pub fn of(&self, port: u16) -> &[Known] {
        self.members.get(&port).map_or(&[], Vec::as_slice)
    }

    /// The member at `ip` in the logical cluster on `port`.
    pub fn at(&self, port: u16, ip: Ipv4Addr) -> Option<Known> {
        self.of(port).iter().copied().find(|k| k.id.addr.ip() == ip)
    }
}

/// How long to keep measuring after the attack ends: suspicions take up to 4 s to turn into
/// removals, and lists follow within a second.
fn settle(attack: Attack) -> Duration {
    match attack {
        Attack::ForgedSuspect => Duration::from_secs(5),
        Attack::ForgedDead | Attack::ForgedLeave | Attack::Reflection => Duration::from_secs(3),
        _ => Duration::from_secs(2),
    }
}

/// Runs one attack against the cluster and measures its row. With `spoof`, forged datagrams
/// are also sent under the source address of whoever they claim to come from.
pub fn run(c: &mut Cluster, attack: Attack, spoof: bool) -> Result<Row, AttackError> {
    let h = Hostile::new(c, spoof)?;
    // Sniffing happens before the measured window. Sealed traffic teaches nothing, so keyed
    // runs sniff only briefly (the attempt is still made).
    let sniff = if c.key() {
        Duration::from_millis(300)
    } else {
        Duration::from_millis(1000)
    };
    let intel = Intel::gather(c, sniff)?;
    let known: Vec<&Known> = GOSSIP_PORTS.iter().flat_map(|&p| intel.of(p)).collect();
    eprintln!(
        "attack: {} (key: {}): {} of {} identities known exactly",
        attack.name(),
        c.key(),
        known.iter().filter(|k| k.exact).count(),
        known.len()
    );
    let pids = c.pids();
    let base: Vec<u64> = pids.iter().map(|&p| cluster::rss(p).unwrap_or(0)).collect();
    let marks = c.log_marks();
    let bytes0 = c.third_party_bytes();
    let stop = AtomicBool::new(false);
    let (peak, problems) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = base.clone();
            // `stop` is set once the attack and its settling time are over; the time cap only
            // matters if the attack itself panicked.
            let cap = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < cap {
                for (p, pid) in peak.iter_mut().zip(&pids) {
                    *p = (*p).max(cluster::rss(*pid).unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        let problems = perform(c, &h, &intel, attack);
        std::thread::sleep(settle(attack));
        stop.store(true, Ordering::Relaxed);
        (sampler.join().unwrap_or_default(), problems)
    });
    let problems = problems?;
    let view_changed = c.any_list_since(&marks);
    let third_party_bytes = c.third_party_bytes().saturating_sub(bytes0);
    let rss_growth_bytes = peak
        .iter()
        .zip(&base)
        .map(|(p, b)| p.saturating_sub(*b))
        .max()
        .unwrap_or(0);
    let lists_update_after = c.kill_check()?;
    Ok(Row {
        attack: if spoof {
            attack.spoofed_name()
        } else {
            attack.name()
        },
        key: c.key(),
        view_changed,
        third_party_bytes,
        rss_growth_bytes,
        lists_update_after,
        problems,
    })
}

/// Carries out one attack; returns the side checks that failed.
fn perform(
    c: &mut Cluster,
    h: &Hostile,
    intel: &Intel,
    attack: Attack,
) -> Result<Vec<String>, AttackError> {
    match attack {
        Attack::VersionCapture => version_capture(h, intel),
        Attack::Reflection => reflection(c, h),
        Attack::SyncFlood => sync_flood(c, h),
        Attack::StreamHold => stream_hold(c),
        Attack::HttpHold => http_hold(c),
        Attack::ForgedSuspect => forged_suspect(h, intel),
        Attack::ForgedDead => forged_dead(h, intel),
        Attack::ForgedLeave => forged_leave(h, intel),
        Attack::Replay => replay(c, h),
        Attack::RandomBytes => random_bytes(c, h),
        Attack::WrongKey => wrong_key(c),
    }
}

/// A Pull claiming `have_ver = u64::MAX` and a List at `u64::MAX - 1`, issued in the name of
/// the real coordinator, to every node in both logical clusters.
fn version_capture(h: &Hostile, intel: &Intel) -> Result<Vec<String>, AttackError> {
    for round in 0..2 {
        for port in GOSSIP_PORTS {
            let members = intel.of(port);
            let Some(coordinator) = members.first() else {
                return Ok(vec![format!("no members known on port {port}")]);
            };
            let ids: Vec<NodeId> = members.iter().map(|k| k.id).collect();
            for (i, m) in members.iter().enumerate() {
                let pull = PullMsg {
                    from: members[(i + 1) % members.len()].id,
                    have_ver: u64::MAX,
                    have_coordinator: Uuid::new_v4(),
                    zone: None,
                };
                let data = wire::encode_pull(tag(port), &pull);
                h.datagram(m.id.addr, &data);
                h.datagram_from(pull.from.addr, m.id.addr, &data);
                let list = ListMsg {
                    ver: u64::MAX - 1,
                    coordinator: coordinator.id.uuid,
                    members: ids.clone(),
                    zones: Default::default(),
                };
                let data = wire::encode_list(tag(port), &list);
                h.datagram(m.id.addr, &data);
                h.datagram_from(coordinator.id.addr, m.id.addr, &data);
            }
        }
        if round == 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    Ok(Vec::new())
}

/// Messages whose `from` names the third party: a SyncRequest by UDP and by TCP (the answer is
/// a whole state sync, over TCP, to `from`), and a foca Announce (answered with a Feed).
fn reflection(c: &Cluster, h: &Hostile) -> Result<Vec<String>, AttackError> {
    let third = c.third_ip();
    for port in GOSSIP_PORTS {
        let from = NodeId::new(
            SocketAddr::new(third.into(), port),
            Uuid::new_v4(),
            now_ms(),
            Role::Scheduler,
        );
        let sync = wire::encode_sync(
            tag(port),
            Kind::SyncRequest,
            &SyncMsg {
                from,
                zone: None,
                members: Vec::new(),
            },
        );
        for ip in c.ips() {
            let to = SocketAddr::new(ip.into(), port);
            h.datagram(to, &sync);
            h.datagram_from(from.addr, to, &sync);
            h.stream(to, &sync);
            let announce = Header {
                src: from,
                src_incarnation: 0,
                dst: NodeId::unknown_at(to),
                message: Message::Announce,
            };
            let data = foca_packet(port, &announce, &[]);
            h.datagram(to, &data);
            h.datagram_from(from.addr, to, &data);
        }
    }
    Ok(Vec::new())
}

/// One stream sync from a fake member listing thousands of fake, older members at unused
/// addresses of the bed, to every node in both logical clusters.
fn sync_flood(c: &Cluster, h: &Hostile) -> Result<Vec<String>, AttackError> {
    for port in GOSSIP_PORTS {
        let members: Vec<Member<NodeId>> = (0..FLOOD_MEMBERS)
            .map(|i| {
                let addr = SocketAddr::new(c.unused_ip(i).into(), 20_000 + (i / 512) as u16);
                Member::alive(NodeId::new(
                    addr,
                    Uuid::new_v4(),
                    1_000 + u64::from(i),
                    Role::Scheduler,
                ))
            })
            .collect();
        let from = NodeId::new(
            SocketAddr::new(c.unused_ip(FLOOD_MEMBERS).into(), 30_000),
            Uuid::new_v4(),
            500,
            Role::Scheduler,
        );
        let data = wire::encode_sync(
            tag(port),
            Kind::SyncRequest,
            &SyncMsg {
                from,
                zone: None,
                members,
            },
        );
        for ip in c.ips() {
            h.stream(SocketAddr::new(ip.into(), port), &data);
        }
    }
    Ok(Vec::new())
}

/// Keeps up to [`STREAM_HOLD_PER_PORT`] idle connections open at every gossip port of every
/// node for 4 s, reopening those the node closes.
fn stream_hold(c: &Cluster) -> Result<Vec<String>, AttackError> {
    let targets: Vec<SocketAddr> = c
        .ips()
        .iter()
        .flat_map(|ip| GOSSIP_PORTS.map(|p| SocketAddr::new((*ip).into(), p)))
        .collect();
    let mut held: Vec<Vec<TcpStream>> = targets.iter().map(|_| Vec::new()).collect();
    let end = Instant::now() + Duration::from_secs(4);
    let mut attempts = 0usize;
    let mut peak = 0usize;
    while Instant::now() < end && attempts < 20_000 {
        for (t, conns) in targets.iter().zip(held.iter_mut()) {
            // Drop the connections the node closed.
            conns.retain(|s| {
                let _ = s.set_nonblocking(true);
                let mut b = [0u8; 1];
                match s.peek(&mut b) {
                    Ok(n) => n > 0,
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                }
            });
            let fill_until = Instant::now() + Duration::from_millis(300);
            while conns.len() < STREAM_HOLD_PER_PORT && Instant::now() < fill_until {
                attempts += 1;
                match TcpStream::connect_timeout(t, Duration::from_millis(100)) {
                    Ok(s) => conns.push(s),
                    Err(_) => break,
                }
            }
        }
        peak = peak.max(held.iter().map(Vec::len).sum());
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "attack: stream hold (key: {}): {attempts} connections opened, up to {peak} held at once",
        c.key()
    );
    Ok(Vec::new())
}

/// Opens [`HTTP_HOLD_PER_PORT`] idle connections to every node's public and private HTTP
/// port, then checks that `/healthz` still answers on each while they are held.
fn http_hold(c: &Cluster) -> Result<Vec<String>, AttackError> {
    let mut problems = Vec::new();
    let mut held = Vec::new();
    let mut opened = HashMap::new();
    for ip in c.ips() {
        for port in [PUBLIC_PORT, PRIVATE_PORT] {
            let to = SocketAddr::new(ip.into(), port);
            let end = Instant::now() + Duration::from_secs(5);
            let mut failures = 0;
            let mut n = 0;
            while n < HTTP_HOLD_PER_PORT && failures < 20 && Instant::now() < end {
                match TcpStream::connect_timeout(&to, Duration::from_millis(200)) {
                    Ok(s) => {
                        held.push(s);
                        n += 1;
                    }
                    Err(_) => failures += 1,
                }
            }
            opened.insert(to, n);
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    for ip in c.ips() {
        for port in [PUBLIC_PORT, PRIVATE_PORT] {
            let to = SocketAddr::new(ip.into(), port);
            match cluster::http_get(to, "/healthz", Duration::from_secs(3)) {
                Some((200, _)) => {}
                other => problems.push(format!(
                    "GET /healthz on {to} got {:?} while {} idle connections were held",
                    other.map(|(s, _)| s),
                    opened.get(&to).copied().unwrap_or(0)
                )),
            }
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    eprintln!(
        "attack: http hold (key: {}): {} connections held",
        c.key(),
        held.len()
    );
    drop(held);
    Ok(problems)
}

/// The victim of the forged attacks: the second-oldest member, so never the coordinator.
fn victim(intel: &Intel) -> Option<Ipv4Addr> {
    match intel.of(ALL_PORT).get(1)?.id.addr.ip() {
        std::net::IpAddr::V4(ip) => Some(ip),
        std::net::IpAddr::V6(_) => None,
    }
}

/// The victim and every other member, in one logical cluster.
fn split(intel: &Intel, port: u16, v: Ipv4Addr) -> Option<(Known, Vec<Known>)> {
    let victim = intel.at(port, v)?;
    let others = intel
        .of(port)
        .iter()
        .copied()
        .filter(|k| k.id.uuid != victim.id.uuid)
        .collect();
    Some((victim, others))
}

/// Independent suspicions of the victim at the highest incarnation, in the name of every
/// other member, plus foca gossip of the same suspicion, to every member but the victim.
fn forged_suspect(h: &Hostile, intel: &Intel) -> Result<Vec<String>, AttackError> {
    let Some(v) = victim(intel) else {
        return Ok(vec!["no victim known".into()]);
    };
    for round in 0..4 {
        for port in GOSSIP_PORTS {
            let Some((victim, others)) = split(intel, port, v) else {
                continue;
            };
            for r in &others {
                for s in others.iter().filter(|s| s.id.uuid != r.id.uuid) {
                    for incarnation in [u16::MAX, victim.incarnation] {
                        let msg = SuspectMsg {
                            from: s.id,
                            target: victim.id,
                            incarnation,
                        };
                        let data = wire::encode_suspect(tag(port), &msg);
                        h.datagram(r.id.addr, &data);
                        h.datagram_from(s.id.addr, r.id.addr, &data);
                    }
                    let header = Header {
                        src: s.id,
                        src_incarnation: s.incarnation,
                        dst: r.id,
                        message: Message::Gossip,
                    };
                    let update = Member::new(victim.id, u16::MAX, State::Suspect);
                    let data = foca_packet(port, &header, &[update]);
                    h.datagram(r.id.addr, &data);
                    h.datagram_from(s.id.addr, r.id.addr, &data);
                }
            }
        }
        if round < 3 {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    Ok(Vec::new())
}

/// foca gossip, in the name of another member, declaring the victim down (its exact identity
/// and one that wins the address conflict), to every member but the victim.
fn forged_dead(h: &Hostile, intel: &Intel) -> Result<Vec<String>, AttackError> {
    let Some(v) = victim(intel) else {
        return Ok(vec!["no victim known".into()]);
    };
    for round in 0..3 {
        for port in GOSSIP_PORTS {
            let Some((victim, others)) = split(intel, port, v) else {
                continue;
            };
            for r in &others {
                let Some(s) = others.iter().find(|s| s.id.uuid != r.id.uuid) else {
                    continue;
                };
                let header = Header {
                    src: s.id,
                    src_incarnation: s.incarnation,
                    dst: r.id,
                    message: Message::Gossip,
                };
                let updates = [
                    Member::down(victim.id),
                    Member::down(conflict_winner(&victim.id)),
                ];
                let data = foca_packet(port, &header, &updates);
                h.datagram(r.id.addr, &data);
                h.datagram_from(s.id.addr, r.id.addr, &data);
            }
        }
        if round < 2 {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    Ok(Vec::new())
}

/// Leave messages naming the victim (its exact identity and one that wins the address
/// conflict), to every member but the victim.
fn forged_leave(h: &Hostile, intel: &Intel) -> Result<Vec<String>, AttackError> {
    let Some(v) = victim(intel) else {
        return Ok(vec!["no victim known".into()]);
    };
    for round in 0..2 {
        for port in GOSSIP_PORTS {
            let Some((victim, others)) = split(intel, port, v) else {
                continue;
            };
            for r in &others {
                for id in [victim.id, conflict_winner(&victim.id)] {
                    let data = wire::encode_leave(tag(port), &id);
                    h.datagram(r.id.addr, &data);
                    h.datagram_from(victim.id.addr, r.id.addr, &data);
                }
            }
        }
        if round == 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    Ok(Vec::new())
}

/// Captures 2 s of real datagrams between the nodes on the bridge, waits 1 s, and resends every
/// one, byte for byte, to its original destination.
fn replay(c: &Cluster, h: &Hostile) -> Result<Vec<String>, AttackError> {
    let captured: Vec<Captured> =
        capture::capture(&c.ips(), &GOSSIP_PORTS, Duration::from_secs(2), 20_000)?;
    if captured.is_empty() {
        return Ok(vec!["nothing was captured on the bridge to replay".into()]);
    }
    std::thread::sleep(Duration::from_secs(1));
    for (i, p) in captured.iter().enumerate() {
        h.raw(p.to, &p.data);
        if i % 200 == 199 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    eprintln!(
        "attack: replay (key: {}): {} datagrams captured and resent",
        c.key(),
        captured.len()
    );
    Ok(Vec::new())
}

/// Random datagrams (half of them behind a valid envelope header) and random streams at every
/// port of every node.
fn random_bytes(c: &Cluster, h: &Hostile) -> Result<Vec<String>, AttackError> {
    let mut rng = Rng::new();
    for ip in c.ips() {
        for port in NODE_PORTS {
            let to = SocketAddr::new(ip.into(), port);
            for i in 0..300 {
                let len = 1 + rng.below(1400) as usize;
                let mut data = rng.bytes(len);
                if i % 2 == 0 && len > wire::HEADER_LEN {
                    let mut head = Vec::new();
                    wire::put_header(&mut head, Kind::Foca, tag(port));
                    head[3] = 1 + rng.below(7) as u8;
                    data[..wire::HEADER_LEN].copy_from_slice(&head);
                }
                h.raw(to, &data);
                if i % 50 == 49 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            for i in 0..10 {
                let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_millis(300)) else {
                    continue;
                };
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let len = 1 + rng.below(4096) as usize;
                let mut data = rng.bytes(len + 4);
                if i == 0 {
                    data[..4].copy_from_slice(&u32::MAX.to_be_bytes());
                }
                let _ = s.write_all(&data);
            }
        }
    }
    Ok(Vec::new())
}

/// A real node with another key, told about every honest node, running for 5 s.
fn wrong_key(c: &mut Cluster) -> Result<Vec<String>, AttackError> {
    let id = c.spawn_wrong_key_member()?;
    std::thread::sleep(Duration::from_secs(5));
    let mut problems = Vec::new();
    if let Some(st) = c.bed().exit_status(id) {
        problems.push(format!("the wrong-key member exited early ({st})"));
    }
    c.bed().kill9(id);
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId::new(
            format!("198.18.0.{n}:10081").parse().unwrap(),
            Uuid::from_u128(u128::from(n)),
            u64::from(n),
            Role::Scheduler,
        )
    }

    #[test]
    fn forged_foca_packets_decode_as_the_engine_reads_them() {
        let header = Header {
            src: id(2),
            src_incarnation: 3,
            dst: id(3),
            message: Message::Gossip,
        };
        let data = foca_packet(ALL_PORT, &header, &[Member::down(id(4))]);
        let (kind, p) = wire::split_header(&data, tag(ALL_PORT)).unwrap();
        assert_eq!(kind, Kind::Foca);
        let (h, updates) = wire::peek_foca(p).unwrap();
        assert_eq!(h, header);
        assert_eq!(updates, vec![Member::down(id(4))]);
        assert!(wire::split_header(&data, tag(SCHEDULER_PORT)).is_err());
    }

    #[test]
    fn spoofed_packets_parse_back_with_the_forged_source() {
        let from = "198.18.0.9:9081".parse().unwrap();
        let to = "198.18.0.2:9081".parse().unwrap();
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&ipv4_udp(from, to, b"forged"));
        let c = capture::parse_frame(&frame).unwrap();
        assert_eq!((c.from, c.to), (from.into(), to.into()));
        assert_eq!(c.data, b"forged");
    }

    #[test]
    fn the_conflict_winner_beats_the_real_identity() {
        use foca::Identity as _;
        let real = id(5);
        assert!(conflict_winner(&real).win_addr_conflict(&real));
        assert_eq!(conflict_winner(&real).uuid, real.uuid);
    }
}
