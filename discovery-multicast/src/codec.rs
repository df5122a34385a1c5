//! The announcement datagram: its layout, a strict decoder, and the seam for authentication.
//!
//! Layout (big-endian), 36 to 302 bytes before sealing (48 or more with an IPv6 address):
//!
//! ```text
//! magic "CSmc" | version u8 = 1 | flags u8 = 0 | role u8 (1 scheduler, 2 worker)
//! name_len u8 (1..=255) | cluster name, UTF-8 | node UUID, 16 bytes
//! family u8 (4 or 6) | IPv4 address, 4 bytes, or IPv6 address, 16 bytes
//! private port u16 | interval_ms u32
//! ```
//!
//! Family 6 was added without a version change: a decoder that knows only 4 drops it as an
//! unknown family, and IPv4 and IPv6 nodes never share a group anyway.
//!
//! `interval_ms` is the sender's current announcement interval, so that receivers expire it
//! after it has missed a few. The decoder checks every length and field and rejects trailing
//! bytes: anything else is garbage.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use discovery::Role;
use uuid::Uuid;

use crate::MulticastError;

/// The first bytes of every announcement.
pub const MAGIC: [u8; 4] = *b"CSmc";
/// The format version this build writes and reads.
pub const VERSION: u8 = 1;
/// The longest datagram accepted, sealed or not; longer ones are dropped as oversized.
pub const MAX_DATAGRAM: usize = 1024;
/// The announcement interval bounds accepted on the wire, in milliseconds.
pub const INTERVAL_MS: std::ops::RangeInclusive<u32> = 100..=600_000;

/// One node's announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// `--cluster_name`; 1 to 255 bytes.
    pub cluster_name: String,
    /// The sender's role.
    pub role: Role,
    /// The sender's UUID (its `Context::node_id`).
    pub node_id: Uuid,
    /// The sender's private IP.
    pub ip: IpAddr,
    /// The sender's `--private_port`.
    pub port: u16,
    /// How long until the sender's next announcement, in milliseconds.
    pub interval_ms: u32,
}

impl Announcement {
    /// Encodes the announcement. Fails only for a cluster name of 0 or more than 255 bytes.
    pub fn encode(&self) -> Result<Vec<u8>, MulticastError> {
        let name = self.cluster_name.as_bytes();
        let len =
            u8::try_from(name.len())
                .ok()
                .filter(|&n| n > 0)
                .ok_or(MulticastError::Malformed(
                    "cluster name must be 1 to 255 bytes",
                ))?;
        let mut out = Vec::with_capacity(48 + name.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(0);
        out.push(match self.role {
            Role::Scheduler => 1,
            Role::Worker => 2,
        });
        out.push(len);
        out.extend_from_slice(name);
        out.extend_from_slice(self.node_id.as_bytes());
        match self.ip {
            IpAddr::V4(v4) => {
                out.push(4);
                out.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                out.push(6);
                out.extend_from_slice(&v6.octets());
            }
        }
        out.extend_from_slice(&self.port.to_be_bytes());
        out.extend_from_slice(&self.interval_ms.to_be_bytes());
        Ok(out)
    }

    /// Decodes one announcement, checking every field.
    pub fn decode(buf: &[u8]) -> Result<Self, MulticastError> {
        let mut r = Reader(buf);
        if r.take(4)? != MAGIC {
            return Err(MulticastError::Malformed("bad magic"));
        }
        if r.u8()? != VERSION {
            return Err(MulticastError::Malformed("unknown format version"));
        }
        if r.u8()? != 0 {
            return Err(MulticastError::Malformed("unknown flags"));
        }
        let role = match r.u8()? {
            1 => Role::Scheduler,
            2 => Role::Worker,
            _ => return Err(MulticastError::Malformed("unknown role")),
        };
        let len = usize::from(r.u8()?);
        if len == 0 {
            return Err(MulticastError::Malformed("empty cluster name"));
        }
        let cluster_name = std::str::from_utf8(r.take(len)?)
            .map_err(|_| MulticastError::Malformed("cluster name is not UTF-8"))?
            .to_owned();
        let mut id = [0u8; 16];
        id.copy_from_slice(r.take(16)?);
        let ip = match r.u8()? {
            4 => {
                let mut ip = [0u8; 4];
                ip.copy_from_slice(r.take(4)?);
                let ip = Ipv4Addr::from(ip);
                if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
                    return Err(MulticastError::Malformed("not a unicast address"));
                }
                IpAddr::V4(ip)
            }
            6 => {
                let mut ip = [0u8; 16];
                ip.copy_from_slice(r.take(16)?);
                let ip = Ipv6Addr::from(ip);
                if ip.is_unspecified() || ip.is_multicast() || ip.to_ipv4_mapped().is_some() {
                    return Err(MulticastError::Malformed("not a unicast address"));
                }
                // Without its interface a link-local address reaches no one.
                if (ip.segments()[0] & 0xffc0) == 0xfe80 {
                    return Err(MulticastError::Malformed("link-local address"));
                }
                IpAddr::V6(ip)
            }
            _ => return Err(MulticastError::Malformed("unknown address family")),
        };
        let port = u16::from_be_bytes([r.u8()?, r.u8()?]);
        if port == 0 {
            return Err(MulticastError::Malformed("port 0"));
        }
        let b = r.take(4)?;
        let interval_ms = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if !INTERVAL_MS.contains(&interval_ms) {
            return Err(MulticastError::Malformed("interval out of range"));
        }
        if !r.0.is_empty() {
            return Err(MulticastError::Malformed("trailing bytes"));
        }
        Ok(Announcement {
            cluster_name,
            role,
            node_id: Uuid::from_bytes(id),
            ip,
            port,
            interval_ms,
        })
    }

    /// The sender's private address.
    pub fn addr(&self) -> IpAddr {
        self.ip
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MulticastError> {
        if self.0.len() < n {
            return Err(MulticastError::Malformed("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, MulticastError> {
        Ok(self.take(1)?[0])
    }
}

/// Protects announcements on the wire: the seam for authentication.
///
/// [`Plaintext`] is the default. The security work plugs an AEAD implementation (a cluster
/// key) in here through [`crate::MulticastDiscovery::with_seal`]: `seal` wraps each encoded
/// announcement before it is sent, `open` unwraps each received datagram before it is decoded
/// and rejects it with [`MulticastError::Unauthenticated`] when it does not verify. A sealed
/// datagram must stay within [`MAX_DATAGRAM`].
pub trait Seal: Send + Sync + fmt::Debug + 'static {
    /// Wraps an encoded announcement for sending.
    fn seal(&self, payload: Vec<u8>) -> Vec<u8>;
    /// Unwraps a received datagram into an encoded announcement, or rejects it.
    fn open(&self, datagram: &[u8]) -> Result<Vec<u8>, MulticastError>;
}

/// No protection: announcements travel as encoded.
#[derive(Debug, Default, Clone, Copy)]
pub struct Plaintext;

impl Seal for Plaintext {
    fn seal(&self, payload: Vec<u8>) -> Vec<u8> {
        payload
    }

    fn open(&self, datagram: &[u8]) -> Result<Vec<u8>, MulticastError> {
        Ok(datagram.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> Announcement {
        Announcement {
            cluster_name: name.into(),
            role: Role::Scheduler,
            node_id: Uuid::from_u128(0x5515cf45_9244_44df_b086_bc8eca4c83ae),
            ip: Ipv4Addr::new(198, 18, 0, 2).into(),
            port: 8081,
            interval_ms: 1000,
        }
    }

    fn sample6(name: &str) -> Announcement {
        Announcement {
            ip: "2001:2:0:1::2".parse().unwrap(),
            ..sample(name)
        }
    }

    #[test]
    fn round_trips_every_field() {
        for a in [
            sample("default"),
            Announcement {
                role: Role::Worker,
                port: 63535,
                interval_ms: 600_000,
                ..sample(&"x".repeat(255))
            },
            sample6("default"),
            Announcement {
                role: Role::Worker,
                port: 1,
                ..sample6(&"y".repeat(255))
            },
        ] {
            let bytes = a.encode().unwrap();
            assert!(bytes.len() <= 302 && bytes.len() <= MAX_DATAGRAM);
            assert_eq!(Announcement::decode(&bytes).unwrap(), a);
        }
    }

    #[test]
    fn cluster_names_of_0_or_over_255_bytes_are_refused() {
        assert!(sample("").encode().is_err());
        assert!(sample(&"x".repeat(256)).encode().is_err());
    }

    #[test]
    fn every_truncation_is_rejected() {
        for a in [sample("default"), sample6("default")] {
            let bytes = a.encode().unwrap();
            for n in 0..bytes.len() {
                assert!(
                    Announcement::decode(&bytes[..n]).is_err(),
                    "a prefix of {n} bytes was accepted"
                );
            }
        }
    }

    #[test]
    fn ipv6_announcements_are_checked_like_ipv4_ones() {
        let good = sample6("default").encode().unwrap();
        let fam = 8 + "default".len() + 16;
        assert_eq!(good[fam], 6);
        assert_eq!(good.len(), fam + 1 + 16 + 2 + 4);
        let reason = |b: &[u8]| match Announcement::decode(b) {
            Err(MulticastError::Malformed(r)) => r,
            other => panic!("expected a malformed error, got {other:?}"),
        };
        let with_ip = |ip: &str| {
            Announcement {
                ip: ip.parse().unwrap(),
                ..sample6("default")
            }
            .encode()
            .unwrap()
        };
        assert_eq!(reason(&with_ip("::")), "not a unicast address");
        assert_eq!(reason(&with_ip("ff02::1")), "not a unicast address");
        assert_eq!(
            reason(&with_ip("::ffff:198.18.0.2")),
            "not a unicast address"
        );
        assert_eq!(reason(&with_ip("fe80::1")), "link-local address");
        assert_eq!(reason(&with_ip("febf::1")), "link-local address");
        // An IPv4 family byte before 16 address bytes leaves 12 bytes trailing.
        let mut v4_tag = good.clone();
        v4_tag[fam] = 4;
        assert!(Announcement::decode(&v4_tag).is_err());
        // An IPv6 family byte before 4 address bytes is truncated.
        let mut v6_tag = sample("default").encode().unwrap();
        v6_tag[fam] = 6;
        assert_eq!(reason(&v6_tag), "truncated");
        let mut long = good.clone();
        long.push(0);
        assert_eq!(reason(&long), "trailing bytes");
        assert_eq!(
            Announcement::decode(&with_ip("fd00::1")).unwrap().addr(),
            "fd00::1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn trailing_bytes_and_bad_fields_are_rejected_with_a_reason() {
        let good = sample("default").encode().unwrap();
        let mut long = good.clone();
        long.push(0);
        let reason = |b: &[u8]| match Announcement::decode(b) {
            Err(MulticastError::Malformed(r)) => r,
            other => panic!("expected a malformed error, got {other:?}"),
        };
        assert_eq!(reason(&long), "trailing bytes");
        let patch = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            b
        };
        assert_eq!(reason(&patch(0, b'X')), "bad magic");
        assert_eq!(reason(&patch(4, 2)), "unknown format version");
        assert_eq!(reason(&patch(5, 1)), "unknown flags");
        assert_eq!(reason(&patch(6, 9)), "unknown role");
        assert_eq!(reason(&patch(7, 0)), "empty cluster name");
        assert_eq!(reason(&patch(8, 0xff)), "cluster name is not UTF-8");
        let fam = 8 + "default".len() + 16;
        assert_eq!(reason(&patch(fam, 5)), "unknown address family");
        assert_eq!(reason(&patch(fam + 1, 224)), "not a unicast address");
        let mut zero_port = good.clone();
        zero_port[fam + 5] = 0;
        zero_port[fam + 6] = 0;
        assert_eq!(reason(&zero_port), "port 0");
        let mut zero_interval = good.clone();
        let n = zero_interval.len();
        zero_interval[n - 4..].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(reason(&zero_interval), "interval out of range");
    }

    #[test]
    fn random_garbage_never_panics_and_is_almost_never_accepted() {
        // A fixed xorshift stream, so the test is reproducible.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut accepted = 0;
        for i in 0..20_000 {
            let len = i % 400;
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if Announcement::decode(&buf).is_ok() {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 0);
        // Garbage behind a valid magic and version is rejected too.
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[VERSION, 0, 1, 200]);
        b.extend_from_slice(&[0x41; 50]);
        assert!(Announcement::decode(&b).is_err());
    }

    #[test]
    fn plaintext_seal_is_the_identity() {
        let b = sample("default").encode().unwrap();
        assert_eq!(Plaintext.open(&Plaintext.seal(b.clone())).unwrap(), b);
    }
}
