//! Sniffing the bed's bridge: UDP datagrams between honest nodes, read with an `AF_PACKET`
//! socket in the root namespace (where the bridge and the hosts' veth ends live).
//!
//! A frame crossing the bridge is seen once per interface it passes (the sender's veth end,
//! the receiver's), so copies are dropped by content. Only IPv4 UDP between the given
//! addresses and to the given ports is kept.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::AttackError;

/// `ETH_P_ALL`, every protocol.
const ETH_P_ALL: u16 = 0x0003;

/// One datagram seen on the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// Its source.
    pub from: SocketAddr,
    /// Its destination.
    pub to: SocketAddr,
    /// The UDP payload.
    pub data: Vec<u8>,
}

/// Captures UDP datagrams sent between `hosts` to one of `ports`, for `duration` or until
/// `max` are held.
pub fn capture(
    hosts: &[Ipv4Addr],
    ports: &[u16],
    duration: Duration,
    max: usize,
) -> Result<Vec<Captured>, AttackError> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| AttackError::Io { what, source }
    };
    let proto = Protocol::from(i32::from(ETH_P_ALL.to_be()));
    let sock = Socket::new(Domain::PACKET, Type::RAW, Some(proto))
        .map_err(io("cannot open an AF_PACKET socket (needs root)"))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(io("cannot set the capture timeout"))?;
    let _ = sock.set_recv_buffer_size(8 << 20);
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut buf = vec![0u8; 65536];
    let end = Instant::now() + duration;
    while Instant::now() < end && out.len() < max {
        let n = match (&sock).read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => return Err(io("capture read failed")(e)),
        };
        let Some(c) = parse_frame(&buf[..n]) else {
            continue;
        };
        let (SocketAddr::V4(f), SocketAddr::V4(t)) = (c.from, c.to) else {
            continue;
        };
        if !hosts.contains(f.ip()) || !hosts.contains(t.ip()) || !ports.contains(&t.port()) {
            continue;
        }
        let mut h = DefaultHasher::new();
        (c.from, c.to, &c.data).hash(&mut h);
        if seen.insert(h.finish()) {
            out.push(c);
        }
    }
    Ok(out)
}

/// Parses an Ethernet frame holding IPv4 UDP; `None` for anything else.
pub fn parse_frame(frame: &[u8]) -> Option<Captured> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = frame.get(14..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip.first()? >> 4 != 4 || ihl < 20 || ip.len() < ihl || ip[9] != 17 {
        return None;
    }
    // Fragments other than the first carry no UDP header.
    let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]);
    if frag & 0x1fff != 0 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let udp = ip.get(ihl..total.min(ip.len()))?;
    let sport = u16::from_be_bytes([*udp.first()?, *udp.get(1)?]);
    let dport = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    let ulen = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    let data = udp.get(8..ulen.min(udp.len()))?.to_vec();
    Some(Captured {
        from: SocketAddr::V4(SocketAddrV4::new(src, sport)),
        to: SocketAddr::V4(SocketAddrV4::new(dst, dport)),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_udp_frame_is_parsed_and_anything_else_is_not() {
        let payload = b"hello";
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 8 + payload.len()) as u16;
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            17,
        ]);
        f.extend_from_slice(&[0, 0, 198, 18, 0, 2, 198, 18, 0, 3]);
        let ulen = (8 + payload.len()) as u16;
        f.extend_from_slice(&[0x27, 0x61, 0x27, 0x61, (ulen >> 8) as u8, ulen as u8, 0, 0]);
        f.extend_from_slice(payload);
        // Ethernet padding after the datagram is ignored.
        f.extend_from_slice(&[0; 20]);
        let c = parse_frame(&f).unwrap();
        assert_eq!(c.from, "198.18.0.2:10081".parse().unwrap());
        assert_eq!(c.to, "198.18.0.3:10081".parse().unwrap());
        assert_eq!(c.data, payload);
        let mut tcp = f.clone();
        tcp[14 + 9] = 6;
        assert!(parse_frame(&tcp).is_none());
        assert!(parse_frame(&f[..30]).is_none());
        let mut arp = f;
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(parse_frame(&arp).is_none());
    }
}
