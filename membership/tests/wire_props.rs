//! Property tests of the wire format on stable Rust, so CI covers the decoders that
//! `cargo xtask fuzz` fuzzes: every message round-trips, and garbage, truncations and bit
//! flips are refused by the decoders and the engine without a panic.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use foca::{Codec as _, Header, Member, Message, State};
use membership::wire::{self, Codec, Kind, ListMsg, PullMsg, SyncMsg};
use membership::{Config, Engine, NodeId, Role, Zone};
use proptest::prelude::*;
use uuid::Uuid;

fn node_id() -> impl Strategy<Value = NodeId> {
    (
        any::<bool>(),
        any::<u128>(),
        any::<u16>(),
        any::<u128>(),
        any::<u64>(),
        any::<u16>(),
        any::<bool>(),
    )
        .prop_map(
            |(v6, ip, port, uuid, started_ms, generation, sched)| NodeId {
                addr: SocketAddr::new(
                    if v6 {
                        IpAddr::from(ip.to_be_bytes())
                    } else {
                        IpAddr::from((ip as u32).to_be_bytes())
                    },
                    port,
                ),
                uuid: Uuid::from_u128(uuid),
                started_ms,
                generation,
                role: if sched { Role::Scheduler } else { Role::Worker },
            },
        )
}

/// A valid zone: a Kubernetes label value of 1 to 63 bytes.
fn zone() -> impl Strategy<Value = Zone> {
    "[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?".prop_map(|s| Zone::new(&s).unwrap())
}

fn member() -> impl Strategy<Value = Member<NodeId>> {
    (node_id(), any::<u16>(), 0usize..3).prop_map(|(id, inc, st)| {
        let state = [State::Alive, State::Suspect, State::Down][st];
        Member::new(id, inc, state)
    })
}

fn message() -> impl Strategy<Value = Message<NodeId>> {
    (0u8..11, node_id(), any::<u8>()).prop_map(|(k, id, n)| match k {
        0 => Message::Ping(n),
        1 => Message::Ack(n),
        2 => Message::PingReq {
            target: id,
            probe_number: n,
        },
        3 => Message::IndirectPing {
            origin: id,
            probe_number: n,
        },
        4 => Message::IndirectAck {
            target: id,
            probe_number: n,
        },
        5 => Message::ForwardedAck {
            origin: id,
            probe_number: n,
        },
        6 => Message::Announce,
        7 => Message::Feed,
        8 => Message::Gossip,
        9 => Message::Broadcast,
        _ => Message::TurnUndead,
    })
}

fn engine(tag: u64) -> Engine {
    let me = NodeId::new(
        "127.0.0.1:10081".parse().unwrap(),
        Uuid::from_u128(1),
        1,
        Role::Worker,
    );
    let mut cfg = Config::lan();
    cfg.max_members = 64;
    Engine::new(me, tag, cfg, 3, Duration::ZERO)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_message_round_trips(from in node_id(), ids in proptest::collection::vec(node_id(), 0..20),
                                 zones in proptest::collection::vec(proptest::option::of(zone()), 20),
                                 own in proptest::option::of(zone()),
                                 members in proptest::collection::vec(member(), 0..20),
                                 ver in any::<u64>(), tag in any::<u64>()) {
        let zones = ids.iter().zip(&zones).filter_map(|(m, z)| z.map(|z| (m.uuid, z))).collect();
        let list = ListMsg { ver, coordinator: from.uuid, members: ids, zones };
        let data = wire::encode_list(tag, &list);
        let (kind, p) = wire::split_header(&data, tag).unwrap();
        prop_assert_eq!(kind, Kind::List);
        prop_assert_eq!(wire::decode_list(p, 20).unwrap(), list);

        let pull = PullMsg { from, have_ver: ver, have_coordinator: from.uuid, zone: own };
        let data = wire::encode_pull(tag, &pull);
        prop_assert_eq!(wire::decode_pull(wire::split_header(&data, tag).unwrap().1).unwrap(), pull);

        let sync = SyncMsg { from, zone: own, members };
        let data = wire::encode_sync(tag, Kind::SyncRequest, &sync);
        prop_assert_eq!(wire::decode_sync(wire::split_header(&data, tag).unwrap().1, 20).unwrap(), sync);

        let data = wire::encode_leave(tag, &from);
        prop_assert_eq!(wire::decode_leave(wire::split_header(&data, tag).unwrap().1).unwrap(), from);

        let dig = wire::DigestMsg { from, digest: ver };
        let data = wire::encode_digest(tag, &dig);
        prop_assert_eq!(wire::decode_digest(wire::split_header(&data, tag).unwrap().1).unwrap(), dig);
    }

    #[test]
    fn foca_headers_and_members_round_trip(src in node_id(), dst in node_id(), message in message(),
                                           inc in any::<u16>(), m in member()) {
        let h = Header { src, src_incarnation: inc, dst, message };
        let mut buf = Vec::new();
        Codec.encode_header(&h, &mut buf).unwrap();
        Codec.encode_member(&m, &mut buf).unwrap();
        let mut rd = &buf[..];
        // The destination is not sent: it reads back as the placeholder.
        prop_assert_eq!(Codec.decode_header(&mut rd).unwrap(), Header { dst: wire::short_dst(&h.dst), ..h });
        prop_assert_eq!(Codec.decode_member(&mut rd).unwrap(), m);
        prop_assert!(rd.is_empty());
    }

    #[test]
    fn foca_packets_round_trip_through_the_engines_reader(src in node_id(), dst in node_id(),
                                                         message in message(), inc in any::<u16>(),
                                                         ups in proptest::collection::vec(member(), 0..20),
                                                         tag in any::<u64>()) {
        let updates = (message != Message::Announce && message != Message::Broadcast).then_some(ups);
        let pkt = wire::FocaPacket { header: Header { src, src_incarnation: inc, dst, message }, updates, tail: Vec::new() };
        let data = wire::encode_foca(tag, &pkt).unwrap();
        let (kind, p) = wire::split_header(&data, tag).unwrap();
        prop_assert_eq!(kind, Kind::Foca);
        let back = wire::decode_foca(p).unwrap();
        // An empty update section reads back as one (foca writes the count either way). The
        // destination travels in short.
        prop_assert_eq!(&back.header, &Header { dst: wire::short_dst(&dst), ..pkt.header.clone() });
        prop_assert_eq!(back.updates.clone().unwrap_or_default(), pkt.updates.clone().unwrap_or_default());
        prop_assert!(back.tail.is_empty());
        // What the engine hands foca carries the destination whole.
        let full = wire::encode_foca_for_foca(&pkt).unwrap();
        let again = wire::decode_foca(&full).unwrap();
        prop_assert_eq!(again.header, pkt.header);
        prop_assert_eq!(again.updates.unwrap_or_default(), pkt.updates.unwrap_or_default());
    }

    #[test]
    fn truncated_messages_are_refused(members in proptest::collection::vec(member(), 1..10),
                                      from in node_id(), cut in any::<prop::sample::Index>()) {
        let tag = 42;
        let data = wire::encode_sync(tag, Kind::SyncResponse, &SyncMsg { from, zone: None, members });
        let p = wire::split_header(&data, tag).unwrap().1;
        let cut = cut.index(p.len());
        prop_assert!(wire::decode_sync(&p[..cut], 64).is_err());
    }

    #[test]
    fn any_zone_bytes_decode_to_a_label_value_or_are_refused(from in node_id(), len in any::<u8>(),
                                                             bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let tag = 5;
        let mut data = wire::encode_pull(tag, &PullMsg { from, have_ver: 1, have_coordinator: from.uuid, zone: None });
        data.pop();
        data.push(len);
        data.extend_from_slice(&bytes);
        let p = wire::split_header(&data, tag).unwrap().1;
        match wire::decode_pull(p) {
            Ok(msg) => {
                // Accepted only when the length covers exactly the bytes, which are a valid zone.
                prop_assert_eq!(usize::from(len), bytes.len());
                if let Some(z) = msg.zone {
                    prop_assert!(z.as_bytes() == &bytes[..]);
                    prop_assert!(z.as_bytes().len() <= Zone::MAX_LEN);
                    prop_assert!(z.as_str().bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c)));
                } else {
                    prop_assert_eq!(len, 0);
                }
            }
            Err(_) => {
                let valid = len > 0 && usize::from(len) == bytes.len() && Zone::from_bytes(&bytes).is_ok();
                prop_assert!(!valid, "a valid zone was refused");
            }
        }
    }

    #[test]
    fn too_many_members_are_refused_before_allocation(from in node_id(), n in 65u32..u32::MAX) {
        let mut data = wire::encode_sync(1, Kind::SyncRequest, &SyncMsg { from, zone: None, members: vec![] });
        let len = data.len();
        data[len - 4..].copy_from_slice(&n.to_be_bytes());
        prop_assert!(wire::decode_sync(wire::split_header(&data, 1).unwrap().1, 64).is_err());
    }

    #[test]
    fn garbage_never_panics_a_decoder_or_the_engine(body in proptest::collection::vec(any::<u8>(), 0..1500),
                                                    kind in 0u8..10) {
        let tag = 7u64;
        let mut data = Vec::new();
        data.extend_from_slice(&wire::MAGIC);
        data.push(wire::VERSION);
        data.push(kind);
        data.extend_from_slice(&tag.to_be_bytes());
        data.extend_from_slice(&body);
        let _ = wire::decode_list(&body, 64);
        let _ = wire::decode_pull(&body);
        let _ = wire::decode_sync(&body, 64);
        let _ = wire::decode_leave(&body);
        let _ = wire::decode_digest(&body);
        let _ = wire::decode_foca(&body);
        let _ = Codec.decode_header(&body[..]);
        let _ = Codec.decode_member(&body[..]);
        let mut e = engine(tag);
        let from: SocketAddr = "127.0.0.2:10081".parse().unwrap();
        e.handle_datagram(from, &data, Duration::from_millis(1));
        e.handle_stream(from, &data, Duration::from_millis(2));
        e.handle_datagram(from, &body, Duration::from_millis(3));
        e.tick(Duration::from_secs(1));
        prop_assert!(e.list().members.len() <= 1 + 64, "the list stays bounded");
    }
}

/// Found by `cargo xtask fuzz` (sync_frame): a message claiming version `u64::MAX` made the
/// next list version overflow, a panic in debug builds. Versions now wrap by design and compare
/// in serial-number order; a claimed version from a member that is not our coordinator is
/// neither adopted nor able to move ours.
#[test]
fn a_claimed_maximal_version_neither_panics_nor_moves_versions() {
    let tag = 9;
    let mut e = engine(tag);
    let from = NodeId::new(
        "127.0.0.2:10081".parse().unwrap(),
        Uuid::from_u128(2),
        5,
        Role::Worker,
    );
    for (i, data) in [
        wire::encode_pull(
            tag,
            &PullMsg {
                from,
                have_ver: u64::MAX,
                have_coordinator: from.uuid,
                zone: None,
            },
        ),
        wire::encode_list(
            tag,
            &ListMsg {
                ver: u64::MAX,
                coordinator: from.uuid,
                members: vec![from],
                zones: Default::default(),
            },
        ),
    ]
    .iter()
    .enumerate()
    {
        let now = Duration::from_secs(1 + i as u64);
        e.handle_datagram(from.addr, data, now);
        e.handle_stream(from.addr, data, now);
        e.tick(now + Duration::from_secs(1));
        assert!(e.list().ver >= 1);
    }
    let vers: Vec<u64> = e.drain_changes().iter().map(|l| l.ver).collect();
    assert!(
        vers.windows(2).all(|w| w[0] <= w[1]),
        "ver went down: {vers:?}"
    );
    assert!(
        vers.iter().all(|v| *v < 16),
        "a claimed version was adopted: {vers:?}"
    );
}
