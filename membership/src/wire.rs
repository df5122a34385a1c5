//! The wire format: an envelope around foca packets, member lists, pulls, syncs and leaves.
//!
//! Every message starts with a fixed header: magic, format version, kind and the cluster tag.
//! The tag is a hash of the cluster name and the logical cluster, so nodes of another cluster,
//! or of the other logical cluster, are dropped before anything is decoded. Decoding never
//! trusts a length field: every read is checked against what is left.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut};
use foca::{Header, Member, Message, State};
use uuid::Uuid;

use crate::MembershipError;
use crate::id::{NodeId, Role, Zone};

/// The first two bytes of every message.
pub const MAGIC: [u8; 2] = [0xC5, 0x1A];
/// The format version; a node drops messages of any other version.
pub const VERSION: u8 = 2;
/// Bytes before the payload: magic, version, kind and the 8-byte cluster tag.
pub const HEADER_LEN: usize = 12;
/// The largest encoded [`NodeId`].
pub const MAX_ID_LEN: usize = 1 + 16 + 2 + 16 + 8 + 2 + 1;
/// The largest encoded zone: a length byte and the zone.
pub const MAX_ZONE_LEN: usize = 1 + Zone::MAX_LEN;

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A foca SWIM packet.
    Foca = 1,
    /// A member list issued by the oldest member.
    List = 2,
    /// A request for the current member list.
    Pull = 3,
    /// A push/pull state sync request (stream).
    SyncRequest = 4,
    /// The answer to a sync request (stream).
    SyncResponse = 5,
    /// A graceful leave, sent directly to every member.
    Leave = 6,
    /// "My probe of this member failed": an independent suspicion, for Lifeguard's
    /// confirmations.
    Suspect = 7,
    /// A periodic sync's opening (stream): a digest of the sender's view, so that two members
    /// that agree exchange a few bytes instead of their whole state.
    SyncDigest = 8,
}

impl Kind {
    fn from_u8(b: u8) -> Result<Self, MembershipError> {
        Ok(match b {
            1 => Kind::Foca,
            2 => Kind::List,
            3 => Kind::Pull,
            4 => Kind::SyncRequest,
            5 => Kind::SyncResponse,
            6 => Kind::Leave,
            7 => Kind::Suspect,
            8 => Kind::SyncDigest,
            _ => return Err(MembershipError::Decode("unknown message kind")),
        })
    }
}

/// The cluster tag: FNV-1a over the cluster name and the logical cluster name.
pub fn cluster_tag(cluster_name: &str, logical: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in cluster_name
        .as_bytes()
        .iter()
        .chain(&[0u8])
        .chain(logical.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Writes the envelope header.
pub fn put_header(buf: &mut Vec<u8>, kind: Kind, tag: u64) {
    buf.extend_from_slice(&MAGIC);
    buf.push(VERSION);
    buf.push(kind as u8);
    buf.put_u64(tag);
}

/// Checks the envelope header and returns the kind and the payload.
pub fn split_header(data: &[u8], tag: u64) -> Result<(Kind, &[u8]), MembershipError> {
    if data.len() < HEADER_LEN {
        return Err(MembershipError::Decode("shorter than the header"));
    }
    if data[0..2] != MAGIC {
        return Err(MembershipError::Decode("bad magic"));
    }
    if data[2] != VERSION {
        return Err(MembershipError::WireVersion(data[2]));
    }
    let kind = Kind::from_u8(data[3])?;
    let got = u64::from_be_bytes(data[4..12].try_into().expect("8 bytes"));
    if got != tag {
        return Err(MembershipError::ForeignCluster);
    }
    Ok((kind, &data[HEADER_LEN..]))
}

fn need(buf: &impl Buf, n: usize) -> Result<(), MembershipError> {
    if buf.remaining() < n {
        Err(MembershipError::Decode("truncated"))
    } else {
        Ok(())
    }
}

/// Reads `n` bytes with `get` once they are there.
fn read<B: Buf, T>(
    buf: &mut B,
    n: usize,
    get: impl FnOnce(&mut B) -> T,
) -> Result<T, MembershipError> {
    need(buf, n)?;
    Ok(get(buf))
}

fn get_u8(buf: &mut impl Buf) -> Result<u8, MembershipError> {
    read(buf, 1, |b| b.get_u8())
}

fn get_u16(buf: &mut impl Buf) -> Result<u16, MembershipError> {
    read(buf, 2, |b| b.get_u16())
}

fn get_u32(buf: &mut impl Buf) -> Result<u32, MembershipError> {
    read(buf, 4, |b| b.get_u32())
}

fn get_u64(buf: &mut impl Buf) -> Result<u64, MembershipError> {
    read(buf, 8, |b| b.get_u64())
}

fn get_uuid(buf: &mut impl Buf) -> Result<Uuid, MembershipError> {
    need(buf, 16)?;
    let mut b = [0u8; 16];
    buf.copy_to_slice(&mut b);
    Ok(Uuid::from_bytes(b))
}

/// Encodes a member identity.
pub fn put_id(buf: &mut impl BufMut, id: &NodeId) {
    match id.addr.ip() {
        IpAddr::V4(ip) => {
            buf.put_u8(4);
            buf.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            buf.put_u8(6);
            buf.put_slice(&ip.octets());
        }
    }
    buf.put_u16(id.addr.port());
    buf.put_slice(id.uuid.as_bytes());
    buf.put_u64(id.started_ms);
    buf.put_u16(id.generation);
    buf.put_u8(match id.role {
        Role::Scheduler => 1,
        Role::Worker => 2,
    });
}

/// Decodes a member identity.
pub fn get_id(buf: &mut impl Buf) -> Result<NodeId, MembershipError> {
    let ip = match get_u8(buf)? {
        4 => {
            need(buf, 4)?;
            let mut b = [0u8; 4];
            buf.copy_to_slice(&mut b);
            IpAddr::V4(Ipv4Addr::from(b))
        }
        6 => {
            need(buf, 16)?;
            let mut b = [0u8; 16];
            buf.copy_to_slice(&mut b);
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return Err(MembershipError::Decode("bad address family")),
    };
    let port = get_u16(buf)?;
    let uuid = get_uuid(buf)?;
    let started_ms = get_u64(buf)?;
    let generation = get_u16(buf)?;
    let role = match get_u8(buf)? {
        1 => Role::Scheduler,
        2 => Role::Worker,
        _ => return Err(MembershipError::Decode("bad role")),
    };
    Ok(NodeId {
        addr: SocketAddr::new(ip, port),
        uuid,
        started_ms,
        generation,
        role,
    })
}

/// Encodes an optional zone: its length (0 for none) and its bytes.
pub fn put_zone(buf: &mut impl BufMut, zone: Option<&Zone>) {
    match zone {
        Some(z) => {
            buf.put_u8(z.as_bytes().len() as u8);
            buf.put_slice(z.as_bytes());
        }
        None => buf.put_u8(0),
    }
}

/// Decodes an optional zone; a length over [`Zone::MAX_LEN`] or bytes that are not a label
/// value (control characters, invalid UTF-8) fail the whole message.
pub fn get_zone(buf: &mut impl Buf) -> Result<Option<Zone>, MembershipError> {
    let n = usize::from(get_u8(buf)?);
    if n == 0 {
        return Ok(None);
    }
    if n > Zone::MAX_LEN {
        return Err(MembershipError::Decode("zone too long"));
    }
    need(buf, n)?;
    let mut b = [0u8; Zone::MAX_LEN];
    buf.copy_to_slice(&mut b[..n]);
    Zone::from_bytes(&b[..n])
        .map(Some)
        .map_err(|_| MembershipError::Decode("bad zone"))
}

fn put_member(buf: &mut impl BufMut, m: &Member<NodeId>) {
    put_id(buf, m.id());
    buf.put_u16(m.incarnation());
    buf.put_u8(match m.state() {
        State::Alive => 0,
        State::Suspect => 1,
        State::Down => 2,
    });
}

fn get_member(buf: &mut impl Buf) -> Result<Member<NodeId>, MembershipError> {
    let id = get_id(buf)?;
    let inc = get_u16(buf)?;
    let state = match get_u8(buf)? {
        0 => State::Alive,
        1 => State::Suspect,
        2 => State::Down,
        _ => return Err(MembershipError::Decode("bad member state")),
    };
    Ok(Member::new(id, inc, state))
}

/// A foca header's destination on the wire: the receiver knows its own identity, so a packet
/// carries only what tells a current identity from an earlier one (its generation and the first
/// bytes of its UUID), 7 bytes instead of a whole identity. The engine checks it with
/// [`dst_is`] and hands foca the full identity (`DST_FULL`), since foca only accepts payloads
/// addressed to exactly its identity.
/// How much longer a foca payload gets when the engine writes its destination whole: at most
/// a whole identity for the one-byte unknown destination.
pub const DST_HEADROOM: usize = MAX_ID_LEN;
const DST_UNKNOWN: u8 = 0;
const DST_SHORT: u8 = 1;
const DST_FULL: u8 = 2;

fn put_dst(buf: &mut impl BufMut, dst: &NodeId) {
    if dst.uuid.is_nil() {
        // An announce to an address whose member is not known yet.
        buf.put_u8(DST_UNKNOWN);
    } else {
        // Whole: the short form (`DST_SHORT`, 7 bytes) made the simulator's clusters of 300
        // and more fall into a storm of unanswered probes and renewals, not understood yet;
        // receivers still read it.
        buf.put_u8(DST_FULL);
        put_id(buf, dst);
    }
}

/// Where a decoded short destination is: no real member has port 0.
const SHORT_DST_AT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

fn get_dst(buf: &mut impl Buf) -> Result<NodeId, MembershipError> {
    match get_u8(buf)? {
        DST_UNKNOWN => Ok(unsent_dst()),
        DST_SHORT => {
            let generation = get_u16(buf)?;
            need(buf, 4)?;
            let mut u = [0u8; 16];
            buf.copy_to_slice(&mut u[12..]);
            Ok(NodeId {
                generation,
                // `started_ms` 1 tells it from the unknown destination, whose is 0.
                ..NodeId::new(SHORT_DST_AT, Uuid::from_bytes(u), 1, Role::Worker)
            })
        }
        DST_FULL => get_id(buf),
        _ => Err(MembershipError::Decode("bad destination tag")),
    }
}

/// Whether a decoded destination names `me`: its short form (generation and the last four
/// bytes of the UUID) or the whole identity.
pub fn dst_is(dst: &NodeId, me: &NodeId) -> bool {
    dst == me
        || (dst.addr == SHORT_DST_AT
            && dst.started_ms == 1
            && dst.generation == me.generation
            && dst.uuid.as_bytes()[12..] == me.uuid.as_bytes()[12..]
            && dst.uuid.as_bytes()[..12] == [0u8; 12])
}

/// The destination a decoded header holds when the packet named none (an announce to an
/// address whose member is not known yet).
pub fn unsent_dst() -> NodeId {
    NodeId::unknown_at(SHORT_DST_AT)
}

/// The destination as it reads back from the wire: the short form of `dst`.
pub fn short_dst(dst: &NodeId) -> NodeId {
    let mut b = Vec::new();
    put_dst(&mut b, dst);
    get_dst(&mut &b[..]).unwrap_or_else(|_| unsent_dst())
}

/// Writes a foca header: the destination in short, or whole (`full_dst`) for foca itself.
fn put_foca_header(
    buf: &mut impl BufMut,
    header: &Header<NodeId>,
    full_dst: bool,
) -> Result<(), MembershipError> {
    let dst_len = if full_dst { 1 + MAX_ID_LEN } else { 7 };
    if buf.remaining_mut() < 2 * MAX_ID_LEN + 6 + dst_len {
        return Err(MembershipError::Encode("no room for the header"));
    }
    put_id(buf, &header.src);
    buf.put_u16(header.src_incarnation);
    if full_dst {
        buf.put_u8(DST_FULL);
        put_id(buf, &header.dst);
    } else {
        put_dst(buf, &header.dst);
    }
    // Probes carry a number, and the indirect ones an identity too.
    let (kind, probe, id) = match &header.message {
        Message::Ping(n) => (1, Some(*n), None),
        Message::Ack(n) => (2, Some(*n), None),
        Message::PingReq {
            target,
            probe_number,
        } => (3, Some(*probe_number), Some(target)),
        Message::IndirectPing {
            origin,
            probe_number,
        } => (4, Some(*probe_number), Some(origin)),
        Message::IndirectAck {
            target,
            probe_number,
        } => (5, Some(*probe_number), Some(target)),
        Message::ForwardedAck {
            origin,
            probe_number,
        } => (6, Some(*probe_number), Some(origin)),
        Message::Announce => (7, None, None),
        Message::Feed => (8, None, None),
        Message::Gossip => (9, None, None),
        Message::Broadcast => (10, None, None),
        Message::TurnUndead => (11, None, None),
    };
    buf.put_u8(kind);
    if let Some(n) = probe {
        buf.put_u8(n);
    }
    if let Some(id) = id {
        put_id(buf, id);
    }
    Ok(())
}

/// The foca codec: a compact big-endian encoding of headers and members. A header carries the
/// sender whole and the destination in short (see [`dst_is`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct Codec;

impl foca::Codec<NodeId> for Codec {
    type Error = MembershipError;

    fn encode_header(
        &mut self,
        header: &Header<NodeId>,
        mut buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        put_foca_header(&mut buf, header, false)
    }

    fn decode_header(&mut self, mut buf: impl Buf) -> Result<Header<NodeId>, Self::Error> {
        let src = get_id(&mut buf)?;
        let src_incarnation = get_u16(&mut buf)?;
        let dst = get_dst(&mut buf)?;
        let message = match get_u8(&mut buf)? {
            1 => Message::Ping(get_u8(&mut buf)?),
            2 => Message::Ack(get_u8(&mut buf)?),
            kind @ 3..=6 => {
                let probe_number = get_u8(&mut buf)?;
                let id = get_id(&mut buf)?;
                match kind {
                    3 => Message::PingReq {
                        target: id,
                        probe_number,
                    },
                    4 => Message::IndirectPing {
                        origin: id,
                        probe_number,
                    },
                    5 => Message::IndirectAck {
                        target: id,
                        probe_number,
                    },
                    _ => Message::ForwardedAck {
                        origin: id,
                        probe_number,
                    },
                }
            }
            7 => Message::Announce,
            8 => Message::Feed,
            9 => Message::Gossip,
            10 => Message::Broadcast,
            11 => Message::TurnUndead,
            _ => return Err(MembershipError::Decode("bad foca message tag")),
        };
        Ok(Header {
            src,
            src_incarnation,
            dst,
            message,
        })
    }

    fn encode_member(
        &mut self,
        member: &Member<NodeId>,
        mut buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        // Members stop short of the end by `DST_HEADROOM`, so the receiving engine can hand
        // foca the packet with its destination whole without passing foca's size limit.
        if buf.remaining_mut() < MAX_ID_LEN + 3 + DST_HEADROOM {
            return Err(MembershipError::Encode("no room for the member"));
        }
        put_member(&mut buf, member);
        Ok(())
    }

    fn decode_member(&mut self, mut buf: impl Buf) -> Result<Member<NodeId>, Self::Error> {
        get_member(&mut buf)
    }
}

/// A member list as issued by the oldest member.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListMsg {
    /// The list version.
    pub ver: u64,
    /// The UUID of the member that issued it.
    pub coordinator: Uuid,
    /// The members, oldest first.
    pub members: Vec<NodeId>,
    /// The zones of the members that reported one, by UUID; each is encoded after its member,
    /// so zones of UUIDs not in `members` are not sent.
    pub zones: BTreeMap<Uuid, Zone>,
}

/// Encodes a whole message of kind [`Kind::List`].
pub fn encode_list(tag: u64, msg: &ListMsg) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_LEN + 26 + msg.members.len() * (MAX_ID_LEN + 16));
    put_header(&mut buf, Kind::List, tag);
    buf.put_u64(msg.ver);
    buf.put_slice(msg.coordinator.as_bytes());
    buf.put_u32(msg.members.len() as u32);
    for m in &msg.members {
        put_id(&mut buf, m);
        put_zone(&mut buf, msg.zones.get(&m.uuid));
    }
    buf
}

/// Decodes the payload of a [`Kind::List`] message.
pub fn decode_list(mut p: &[u8], max_members: usize) -> Result<ListMsg, MembershipError> {
    let ver = get_u64(&mut p)?;
    let coordinator = get_uuid(&mut p)?;
    let n = get_u32(&mut p)? as usize;
    if n > max_members {
        return Err(MembershipError::Decode("too many members"));
    }
    let mut members = Vec::with_capacity(n.min(p.len() / 31));
    let mut zones = BTreeMap::new();
    for _ in 0..n {
        let id = get_id(&mut p)?;
        if let Some(z) = get_zone(&mut p)? {
            zones.insert(id.uuid, z);
        }
        members.push(id);
    }
    if p.has_remaining() {
        return Err(MembershipError::Decode("trailing bytes"));
    }
    Ok(ListMsg {
        ver,
        coordinator,
        members,
        zones,
    })
}

/// A request for the current list: who asks, and what it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullMsg {
    /// The asking member.
    pub from: NodeId,
    /// The version it holds.
    pub have_ver: u64,
    /// The coordinator that issued what it holds.
    pub have_coordinator: Uuid,
    /// The asking member's own zone.
    pub zone: Option<Zone>,
}

/// Encodes a whole message of kind [`Kind::Pull`].
pub fn encode_pull(tag: u64, msg: &PullMsg) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_LEN + MAX_ID_LEN + 24 + MAX_ZONE_LEN);
    put_header(&mut buf, Kind::Pull, tag);
    put_id(&mut buf, &msg.from);
    buf.put_u64(msg.have_ver);
    buf.put_slice(msg.have_coordinator.as_bytes());
    put_zone(&mut buf, msg.zone.as_ref());
    buf
}

/// Decodes the payload of a [`Kind::Pull`] message.
pub fn decode_pull(mut p: &[u8]) -> Result<PullMsg, MembershipError> {
    let from = get_id(&mut p)?;
    let have_ver = get_u64(&mut p)?;
    let have_coordinator = get_uuid(&mut p)?;
    let zone = get_zone(&mut p)?;
    if p.has_remaining() {
        return Err(MembershipError::Decode("trailing bytes"));
    }
    Ok(PullMsg {
        from,
        have_ver,
        have_coordinator,
        zone,
    })
}

/// A full membership state, sent on join and periodically over a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncMsg {
    /// The sending member.
    pub from: NodeId,
    /// The sending member's own zone.
    pub zone: Option<Zone>,
    /// Everything the sender knows, down members included.
    pub members: Vec<Member<NodeId>>,
}

/// Encodes a whole sync message of the given kind.
pub fn encode_sync(tag: u64, kind: Kind, msg: &SyncMsg) -> Vec<u8> {
    let mut buf = Vec::with_capacity(
        HEADER_LEN + 4 + MAX_ZONE_LEN + (msg.members.len() + 1) * (MAX_ID_LEN + 3),
    );
    put_header(&mut buf, kind, tag);
    put_id(&mut buf, &msg.from);
    put_zone(&mut buf, msg.zone.as_ref());
    buf.put_u32(msg.members.len() as u32);
    for m in &msg.members {
        put_member(&mut buf, m);
    }
    buf
}

/// Decodes the payload of a sync message.
pub fn decode_sync(mut p: &[u8], max_members: usize) -> Result<SyncMsg, MembershipError> {
    let from = get_id(&mut p)?;
    let zone = get_zone(&mut p)?;
    let n = get_u32(&mut p)? as usize;
    if n > max_members {
        return Err(MembershipError::Decode("too many members"));
    }
    let mut members = Vec::with_capacity(n.min(p.len() / 33));
    for _ in 0..n {
        members.push(get_member(&mut p)?);
    }
    if p.has_remaining() {
        return Err(MembershipError::Decode("trailing bytes"));
    }
    Ok(SyncMsg {
        from,
        zone,
        members,
    })
}

/// The opening of a periodic sync: who asks, and a digest of its view (see
/// `Engine::view_digest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestMsg {
    /// The asking member.
    pub from: NodeId,
    /// The digest of its active view, without itself and the member asked.
    pub digest: u64,
}

/// Encodes a whole [`Kind::SyncDigest`] message.
pub fn encode_digest(tag: u64, msg: &DigestMsg) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_LEN + MAX_ID_LEN + 8);
    put_header(&mut buf, Kind::SyncDigest, tag);
    put_id(&mut buf, &msg.from);
    buf.put_u64(msg.digest);
    buf
}

/// Decodes the payload of a [`Kind::SyncDigest`] message.
pub fn decode_digest(mut p: &[u8]) -> Result<DigestMsg, MembershipError> {
    let from = get_id(&mut p)?;
    let digest = get_u64(&mut p)?;
    if p.has_remaining() {
        return Err(MembershipError::Decode("trailing bytes"));
    }
    Ok(DigestMsg { from, digest })
}

/// Encodes a whole [`Kind::Leave`] message.
pub fn encode_leave(tag: u64, from: &NodeId) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_LEN + MAX_ID_LEN);
    put_header(&mut buf, Kind::Leave, tag);
    put_id(&mut buf, from);
    buf
}

/// Decodes the payload of a [`Kind::Leave`] message.
pub fn decode_leave(mut p: &[u8]) -> Result<NodeId, MembershipError> {
    let id = get_id(&mut p)?;
    if p.has_remaining() {
        return Err(MembershipError::Decode("trailing bytes"));
    }
    Ok(id)
}

/// An independent suspicion: `from` probed `target` at incarnation `incarnation` and failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuspectMsg {
    /// The member whose probe failed.
    pub from: NodeId,
    /// The member suspected.
    pub target: NodeId,
    /// The target's incarnation when the probe failed.
    pub incarnation: u16,
}

/// Encodes a whole [`Kind::Suspect`] message.
pub fn encode_suspect(tag: u64, msg: &SuspectMsg) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_LEN + 2 * MAX_ID_LEN + 2);
    put_header(&mut buf, Kind::Suspect, tag);
    put_id(&mut buf, &msg.from);
    put_id(&mut buf, &msg.target);
    buf.put_u16(msg.incarnation);
    buf
}

/// Decodes the payload of a [`Kind::Suspect`] message.
pub fn decode_suspect(mut p: &[u8]) -> Result<SuspectMsg, MembershipError> {
    let from = get_id(&mut p)?;
    let target = get_id(&mut p)?;
    let incarnation = get_u16(&mut p)?;
    if p.has_remaining() {
        return Err(MembershipError::Decode("trailing bytes"));
    }
    Ok(SuspectMsg {
        from,
        target,
        incarnation,
    })
}

/// A decoded foca packet: the header, the member updates and whatever follows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FocaPacket {
    /// The SWIM header: sender, destination and message.
    pub header: Header<NodeId>,
    /// The piggybacked member updates; `None` when the packet has no update section.
    pub updates: Option<Vec<Member<NodeId>>>,
    /// Bytes after the updates (foca's custom broadcasts), passed on untouched.
    pub tail: Vec<u8>,
}

/// Decodes a foca payload (after the envelope) the way foca reads it, so the engine can check
/// the sender and rewrite the updates before foca applies them.
pub fn decode_foca(p: &[u8]) -> Result<FocaPacket, MembershipError> {
    use foca::Codec as _;
    let mut buf = p;
    let header = Codec.decode_header(&mut buf)?;
    let mut updates = None;
    if buf.remaining() >= 2 && header.message != Message::Broadcast {
        let n = buf.get_u16() as usize;
        if n > buf.remaining() / 30 {
            return Err(MembershipError::Decode("more updates than bytes"));
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(get_member(&mut buf)?);
        }
        updates = Some(v);
    }
    Ok(FocaPacket {
        header,
        updates,
        tail: buf.to_vec(),
    })
}

/// Encodes a foca payload (no envelope) with the destination whole, as the engine hands a
/// checked packet to foca.
pub fn encode_foca_for_foca(pkt: &FocaPacket) -> Result<Vec<u8>, MembershipError> {
    let n = pkt.updates.as_ref().map_or(0, Vec::len);
    let mut buf = Vec::with_capacity(3 * MAX_ID_LEN + 8 + n * (MAX_ID_LEN + 3) + pkt.tail.len());
    put_foca_header(&mut buf, &pkt.header, true)?;
    put_updates_and_tail(&mut buf, pkt)?;
    Ok(buf)
}

/// Writes a foca packet's updates (count first) and its tail, after its header.
fn put_updates_and_tail(buf: &mut Vec<u8>, pkt: &FocaPacket) -> Result<(), MembershipError> {
    if let Some(updates) = &pkt.updates {
        let n = u16::try_from(updates.len())
            .map_err(|_| MembershipError::Encode("too many updates"))?;
        buf.put_u16(n);
        for m in updates {
            put_member(buf, m);
        }
    }
    buf.extend_from_slice(&pkt.tail);
    Ok(())
}

/// Encodes a whole [`Kind::Foca`] message, as [`decode_foca`] reads it back.
pub fn encode_foca(tag: u64, pkt: &FocaPacket) -> Result<Vec<u8>, MembershipError> {
    use foca::Codec as _;
    let n = pkt.updates.as_ref().map_or(0, Vec::len);
    let mut buf = Vec::with_capacity(HEADER_LEN + 3 * MAX_ID_LEN + 4 + n * (MAX_ID_LEN + 3));
    put_header(&mut buf, Kind::Foca, tag);
    Codec.encode_header(&pkt.header, &mut buf)?;
    put_updates_and_tail(&mut buf, pkt)?;
    Ok(buf)
}

/// The member updates a foca packet carries after its header, for inspection (the engine uses
/// [`decode_foca`]).
/// Returns the sender and the updates; `None` when the packet is malformed (foca will then
/// reject it too).
pub fn peek_foca(p: &[u8]) -> Option<(Header<NodeId>, Vec<Member<NodeId>>)> {
    let pkt = decode_foca(p).ok()?;
    Some((pkt.header, pkt.updates.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Codec as _;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    fn id(n: u128, v6: bool) -> NodeId {
        let addr = if v6 {
            "[fd00::1]:10081".parse().unwrap()
        } else {
            "10.0.0.5:10081".parse().unwrap()
        };
        NodeId {
            addr,
            uuid: Uuid::from_u128(n),
            started_ms: 1_700_000_000_000 + n as u64,
            generation: 3,
            role: Role::Scheduler,
        }
    }

    #[test]
    fn headers_round_trip_for_every_message() {
        let msgs = vec![
            Message::Ping(1),
            Message::Ack(2),
            Message::PingReq {
                target: id(3, true),
                probe_number: 3,
            },
            Message::IndirectPing {
                origin: id(4, false),
                probe_number: 4,
            },
            Message::IndirectAck {
                target: id(5, false),
                probe_number: 5,
            },
            Message::ForwardedAck {
                origin: id(6, true),
                probe_number: 6,
            },
            Message::Announce,
            Message::Feed,
            Message::Gossip,
            Message::Broadcast,
            Message::TurnUndead,
        ];
        for message in msgs {
            let h = Header {
                src: id(1, false),
                src_incarnation: 7,
                dst: id(2, true),
                message,
            };
            let mut buf = Vec::new();
            Codec.encode_header(&h, &mut buf).unwrap();
            let back = Codec.decode_header(&buf[..]).unwrap();
            assert_eq!(
                Header {
                    dst: short_dst(&h.dst),
                    ..h
                },
                back
            );
        }
    }

    #[test]
    fn lists_syncs_pulls_and_leaves_round_trip() {
        let tag = cluster_tag("default", "all");
        let list = ListMsg {
            ver: 9,
            coordinator: Uuid::from_u128(1),
            members: vec![id(1, false), id(2, true)],
            zones: [(Uuid::from_u128(2), Zone::new("eu-west-1b").unwrap())].into(),
        };
        let data = encode_list(tag, &list);
        let (kind, p) = split_header(&data, tag).unwrap();
        assert_eq!(kind, Kind::List);
        assert_eq!(decode_list(p, 100).unwrap(), list);

        let pull = PullMsg {
            from: id(3, false),
            have_ver: 4,
            have_coordinator: Uuid::from_u128(2),
            zone: Some(Zone::new("us-central1-a").unwrap()),
        };
        let data = encode_pull(tag, &pull);
        let (kind, p) = split_header(&data, tag).unwrap();
        assert_eq!(kind, Kind::Pull);
        assert_eq!(decode_pull(p).unwrap(), pull);

        let sync = SyncMsg {
            from: id(1, true),
            zone: None,
            members: vec![
                Member::new(id(2, false), 4, State::Suspect),
                Member::down(id(3, true)),
            ],
        };
        let data = encode_sync(tag, Kind::SyncRequest, &sync);
        let (kind, p) = split_header(&data, tag).unwrap();
        assert_eq!(kind, Kind::SyncRequest);
        assert_eq!(decode_sync(p, 100).unwrap(), sync);

        let data = encode_leave(tag, &id(8, false));
        let (kind, p) = split_header(&data, tag).unwrap();
        assert_eq!(kind, Kind::Leave);
        assert_eq!(decode_leave(p).unwrap(), id(8, false));

        let dig = DigestMsg {
            from: id(5, true),
            digest: 0xdead_beef,
        };
        let data = encode_digest(tag, &dig);
        let (kind, p) = split_header(&data, tag).unwrap();
        assert_eq!(kind, Kind::SyncDigest);
        assert_eq!(decode_digest(p).unwrap(), dig);
        assert!(decode_digest(&p[..p.len() - 1]).is_err());

        let sus = SuspectMsg {
            from: id(1, false),
            target: id(2, true),
            incarnation: 9,
        };
        let data = encode_suspect(tag, &sus);
        let (kind, p) = split_header(&data, tag).unwrap();
        assert_eq!(kind, Kind::Suspect);
        assert_eq!(decode_suspect(p).unwrap(), sus);
    }

    #[test]
    fn another_wire_version_is_named_as_such() {
        let tag = cluster_tag("default", "all");
        let mut leave = encode_leave(tag, &id(3, false));
        assert!(split_header(&leave, tag).is_ok());
        leave[2] = VERSION - 1;
        let err = split_header(&leave, tag).unwrap_err();
        assert_eq!(err, MembershipError::WireVersion(VERSION - 1));
        assert_eq!(err.reason(), "wire_version");
        assert!(err.to_string().contains("same release"), "{err}");
    }

    #[test]
    fn a_destination_names_only_its_identity() {
        let me = id(7, false);
        let d = short_dst(&me);
        assert!(dst_is(&d, &me));
        assert!(dst_is(&me, &me));
        let renewed = NodeId {
            generation: me.generation + 1,
            ..me
        };
        assert!(!dst_is(&d, &renewed), "an earlier identity");
        assert!(!dst_is(&short_dst(&id(8, false)), &me), "another member");
        assert!(!dst_is(&unsent_dst(), &me));
        let nil_tail = NodeId {
            uuid: Uuid::from_u128(1 << 64),
            ..me
        };
        assert!(dst_is(&short_dst(&nil_tail), &nil_tail));
        assert_ne!(short_dst(&nil_tail), unsent_dst());
        // Seven bytes instead of a whole identity.
        let h = Header {
            src: me,
            src_incarnation: 0,
            dst: me,
            message: Message::Ping(1),
        };
        let mut short = Vec::new();
        Codec.encode_header(&h, &mut short).unwrap();
        let pkt = FocaPacket {
            header: h.clone(),
            updates: None,
            tail: Vec::new(),
        };
        let full = encode_foca_for_foca(&pkt).unwrap();
        // The destination is sent whole for now: what foca gets is what was sent.
        assert_eq!(full.len(), short.len());
        assert_eq!(Codec.decode_header(&full[..]).unwrap(), h);
    }

    #[test]
    fn a_full_packet_still_fits_foca_once_its_destination_is_whole() {
        let limit = 1388;
        let h = Header {
            src: id(1, true),
            src_incarnation: 0,
            dst: id(2, true),
            message: Message::Gossip,
        };
        // What foca does: a buffer capped at its limit, the header, the count, then members
        // until the codec says there is no room.
        let mut buf = Vec::new().limit(limit);
        Codec.encode_header(&h, &mut buf).unwrap();
        buf.put_u16(0);
        let mut updates = Vec::new();
        for n in 0.. {
            let m = Member::alive(id(100 + n, true));
            if Codec.encode_member(&m, &mut buf).is_err() {
                break;
            }
            updates.push(m);
        }
        assert!(updates.len() > 20);
        let pkt = FocaPacket {
            header: h,
            updates: Some(updates),
            tail: Vec::new(),
        };
        let full = encode_foca_for_foca(&pkt).unwrap();
        assert!(full.len() <= limit, "{} > {limit}", full.len());
    }

    #[test]
    fn foca_packets_round_trip_through_decode_and_encode() {
        let tag = cluster_tag("default", "all");
        let pkt = FocaPacket {
            header: Header {
                src: id(1, false),
                src_incarnation: 2,
                dst: unsent_dst(),
                message: Message::Gossip,
            },
            updates: Some(vec![
                Member::new(id(3, false), 4, State::Down),
                Member::alive(id(4, true)),
            ]),
            tail: Vec::new(),
        };
        let data = encode_foca(tag, &pkt).unwrap();
        let (kind, p) = split_header(&data, tag).unwrap();
        assert_eq!(kind, Kind::Foca);
        assert_eq!(decode_foca(p).unwrap(), pkt);
        // The engine's older reader sees the same header and updates.
        let (h, ups) = peek_foca(p).unwrap();
        assert_eq!(h, pkt.header);
        assert_eq!(Some(ups), pkt.updates);
        // A cut member and an update count the bytes cannot hold are refused.
        assert!(decode_foca(&p[..p.len() - 1]).is_err());
        let mut head = Vec::new();
        Codec.encode_header(&pkt.header, &mut head).unwrap();
        let mut lie = p.to_vec();
        lie[head.len()..head.len() + 2].copy_from_slice(&1000u16.to_be_bytes());
        assert!(decode_foca(&lie).is_err());
    }

    #[test]
    fn a_lying_zone_fails_the_whole_message() {
        let tag = cluster_tag("default", "all");
        let pull = PullMsg {
            from: id(3, false),
            have_ver: 4,
            have_coordinator: Uuid::from_u128(2),
            zone: Some(Zone::new("abc").unwrap()),
        };
        let good = encode_pull(tag, &pull);
        let at = good.len() - 4;
        assert_eq!(good[at], 3, "the zone's length byte");
        let with = |len: u8, bytes: &[u8]| {
            let mut d = good[..at].to_vec();
            d.push(len);
            d.extend_from_slice(bytes);
            d
        };
        for (data, why) in [
            (with(64, &[b'a'; 64]), "zone too long"),
            (with(255, &[b'a'; 255]), "zone too long"),
            (with(3, b"a\nb"), "bad zone"),
            (with(3, b"a\x1bb"), "bad zone"),
            (with(3, &[b'a', 0xc3, b'b']), "bad zone"),
            (with(2, b"-a"), "bad zone"),
            (with(5, b"abc"), "truncated"),
        ] {
            let (_, p) = split_header(&data, tag).unwrap();
            assert_eq!(decode_pull(p), Err(MembershipError::Decode(why)));
        }
        // The same rule holds for a list member's zone and a sync sender's.
        let list = ListMsg {
            ver: 1,
            coordinator: Uuid::from_u128(1),
            members: vec![id(1, false)],
            zones: [(Uuid::from_u128(1), Zone::new("z").unwrap())].into(),
        };
        let mut data = encode_list(tag, &list);
        *data.last_mut().unwrap() = b'\n';
        let (_, p) = split_header(&data, tag).unwrap();
        assert_eq!(decode_list(p, 10), Err(MembershipError::Decode("bad zone")));
        let sync = SyncMsg {
            from: id(1, false),
            zone: Some(Zone::new("z").unwrap()),
            members: Vec::new(),
        };
        let mut data = encode_sync(tag, Kind::SyncRequest, &sync);
        let z = data.len() - 5;
        data[z] = 0x80;
        let (_, p) = split_header(&data, tag).unwrap();
        assert_eq!(decode_sync(p, 10), Err(MembershipError::Decode("bad zone")));
    }

    #[test]
    fn another_cluster_name_or_logical_cluster_is_rejected() {
        let data = encode_leave(cluster_tag("prod", "all"), &id(1, false));
        assert!(matches!(
            split_header(&data, cluster_tag("staging", "all")),
            Err(MembershipError::ForeignCluster)
        ));
        assert!(matches!(
            split_header(&data, cluster_tag("prod", "scheduler")),
            Err(MembershipError::ForeignCluster)
        ));
    }

    #[test]
    fn random_and_truncated_input_never_panics() {
        let tag = cluster_tag("default", "all");
        let good = encode_list(
            tag,
            &ListMsg {
                ver: 1,
                coordinator: Uuid::from_u128(1),
                members: vec![id(1, false); 5],
                zones: BTreeMap::new(),
            },
        );
        for cut in 0..good.len() {
            if let Ok((_, p)) = split_header(&good[..cut], tag) {
                assert!(decode_list(p, 100).is_err());
            }
        }
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let len = rng.random_range(0..200);
            let mut data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if rng.random_bool(0.5) && data.len() >= HEADER_LEN {
                data[..HEADER_LEN].copy_from_slice(&good[..HEADER_LEN]);
                data[3] = rng.random_range(1..=8);
            }
            if let Ok((_, p)) = split_header(&data, tag) {
                let _ = decode_list(p, 100);
                let _ = decode_pull(p);
                let _ = decode_sync(p, 100);
                let _ = decode_leave(p);
                let _ = decode_suspect(p);
                let _ = decode_digest(p);
                let _ = peek_foca(p);
                let _ = Codec.decode_header(p);
                let _ = Codec.decode_member(p);
            }
        }
        // A count field that claims far more members than the bytes could hold fails cleanly.
        let mut lie = Vec::new();
        put_header(&mut lie, Kind::List, tag);
        lie.put_u64(1);
        lie.put_slice(&[0u8; 16]);
        lie.put_u32(99);
        let (_, p) = split_header(&lie, tag).unwrap();
        assert!(decode_list(p, 100).is_err());
        assert!(decode_list(p, 10).is_err());
    }
}
