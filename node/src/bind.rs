//! Everything a node listens on, bound before anything runs: the private IP, the internal API,
//! each logical cluster's gossip socket and stream listener, and a scheduler's public port. A
//! taken port fails here, with a message naming the port and the flag that set it.
//!
//! `main` binds from the flags ([`Bound::bind`]); tests bind on a loopback address with
//! ephemeral ports ([`Listen::ephemeral`]) and run whole nodes in one process.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::{TcpListener, TcpSocket, UdpSocket};

use crate::NodeError;
use crate::cli::Flags;
use crate::logical::{Logical, Role};
use crate::ports::Ports;

/// How many ephemeral private ports are tried before giving up: each try fails only when one of
/// the derived ports is taken.
const EPHEMERAL_TRIES: usize = 64;
/// The receive buffer asked for every gossip UDP socket.
const UDP_RECV_BUFFER: usize = 4 << 20;
/// The accept queue of every TCP listener (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 1024;

/// What to bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// The private IP.
    pub ip: IpAddr,
    /// The node's role: a scheduler also binds the scheduler cluster and the public port.
    pub role: Role,
    /// `--private_port`; 0 picks a free one whose derived ports are free too.
    pub private_port: u16,
    /// `--public_port`; 0 picks a free one.
    pub public_port: u16,
    /// `--public_bind_to_any`.
    pub public_bind_to_any: bool,
}

impl Listen {
    /// What the flags ask for, on `ip`.
    pub fn from_flags(flags: &Flags, ip: IpAddr) -> Self {
        Self {
            ip,
            role: flags.role.into(),
            private_port: flags.private_port,
            public_port: flags.public_port,
            public_bind_to_any: flags.public_bind_to_any,
        }
    }

    /// Free ports on `ip` only, for in-process tests.
    pub fn ephemeral(ip: IpAddr, role: Role) -> Self {
        Self {
            ip,
            role,
            private_port: 0,
            public_port: 0,
            public_bind_to_any: false,
        }
    }
}

/// One logical cluster's bound sockets.
#[derive(Debug)]
pub struct BoundCluster {
    /// Which cluster.
    pub logical: &'static Logical,
    /// The gossip socket.
    pub udp: UdpSocket,
    /// The stream listener on the same port.
    pub tcp: TcpListener,
}

/// Every socket of a node, bound.
#[derive(Debug)]
pub struct Bound {
    /// The private IP.
    pub ip: IpAddr,
    /// The role the sockets were bound for.
    pub role: Role,
    /// The ports, as bound (an ephemeral request resolved).
    pub ports: Ports,
    /// The internal API.
    pub api: TcpListener,
    /// The clusters this role joins, in table order.
    pub clusters: Vec<BoundCluster>,
    /// A scheduler's public listener.
    pub public: Option<TcpListener>,
}

/// Picks the private IP for the flags and logs the choice.
pub fn private_ip(flags: &Flags) -> Result<IpAddr, NodeError> {
    let ifaces = crate::addr::system_interfaces()?;
    let choice = crate::addr::choose(flags.private_ip_selector, &ifaces)?;
    if !choice.skipped.is_empty() {
        tracing::info!(
            chosen = %choice.ip,
            skipped = ?choice.skipped,
            "several addresses match --private_ip_selector; using the lowest"
        );
    }
    tracing::info!(ip = %choice.ip, interface = %choice.iface, "private ip chosen");
    Ok(choice.ip)
}

impl Bound {
    /// Chooses the private IP and binds what the flags ask for.
    pub async fn bind(flags: &Flags) -> Result<Self, NodeError> {
        let ip = private_ip(flags)?;
        Self::listen(Listen::from_flags(flags, ip)).await
    }

    /// Binds everything `l` asks for.
    pub async fn listen(l: Listen) -> Result<Self, NodeError> {
        if l.private_port != 0 {
            return Self::listen_at(l, l.private_port).await;
        }
        let mut last = None;
        for _ in 0..EPHEMERAL_TRIES {
            let probe = bind_tcp(SocketAddr::new(l.ip, 0), "internal API", "--private_port")?
                .local_addr()
                .map_err(|e| NodeError::Config(format!("cannot read a bound address: {e}")))?
                .port();
            if Ports::new(probe, 0).is_err() {
                continue;
            }
            match Self::listen_at(l, probe).await {
                Err(e @ NodeError::PortInUse { .. }) => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| {
            NodeError::Config(format!(
                "no free private port on {} leaves room for every cluster's port",
                l.ip
            ))
        }))
    }

    async fn listen_at(l: Listen, private: u16) -> Result<Self, NodeError> {
        let ports = Ports::new(private, l.public_port)?;
        let api = bind_tcp(
            SocketAddr::new(l.ip, ports.private),
            "internal API",
            "--private_port",
        )?;
        let mut clusters = Vec::new();
        for logical in Logical::joined_by(l.role) {
            let addr = SocketAddr::new(l.ip, ports.gossip(logical));
            let flag = Ports::flag(logical);
            clusters.push(BoundCluster {
                logical,
                udp: bind_udp(addr, logical.what, &flag)?,
                tcp: bind_tcp(addr, logical.what, &flag)?,
            });
        }
        let public = if l.role == Role::Scheduler {
            let ip = match (l.public_bind_to_any, l.ip) {
                (false, ip) => ip,
                (true, IpAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                (true, IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            let addr = SocketAddr::new(ip, ports.public);
            Some(bind_tcp(addr, "public listener", "--public_port")?)
        } else {
            None
        };
        let public_port = match &public {
            Some(p) => p.local_addr().map_or(ports.public, |a| a.port()),
            None => ports.public,
        };
        Ok(Self {
            ip: l.ip,
            role: l.role,
            ports: Ports {
                public: public_port,
                ..ports
            },
            api,
            clusters,
            public,
        })
    }

    /// The internal API's address.
    pub fn private_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.ports.private)
    }

    /// The gossip address of `cluster`.
    pub fn gossip_addr(&self, cluster: &Logical) -> SocketAddr {
        SocketAddr::new(self.ip, self.ports.gossip(cluster))
    }
}

fn bind_tcp(addr: SocketAddr, what: &'static str, flag: &str) -> Result<TcpListener, NodeError> {
    let listen = || {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        sock.bind(addr)?;
        // Not the standard library's 128: a coordinator of hundreds of members gets their
        // pulls in bursts, and a full accept queue drops SYNs, which cost a second each.
        sock.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|e| bind_error(addr, what, flag, e))
}

fn bind_udp(addr: SocketAddr, what: &'static str, flag: &str) -> Result<UdpSocket, NodeError> {
    let bind = || {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        // The oldest member gets every member's pulls at once while a cluster forms; with
        // the default buffer (208 KiB, a few hundred datagrams) the kernel dropped them, and
        // with them the probes it had to answer, until it was declared down. The kernel caps
        // this at `net.core.rmem_max`.
        if let Err(e) = sock.set_recv_buffer_size(UDP_RECV_BUFFER) {
            tracing::debug!(%addr, "cannot enlarge the UDP receive buffer: {e}");
        }
        sock.bind(&addr.into())?;
        sock.set_nonblocking(true)?;
        UdpSocket::from_std(sock.into())
    };
    bind().map_err(|e| bind_error(addr, what, flag, e))
}

fn bind_error(addr: SocketAddr, what: &'static str, flag: &str, e: io::Error) -> NodeError {
    if e.kind() == io::ErrorKind::AddrInUse {
        NodeError::PortInUse {
            ip: addr.ip(),
            port: addr.port(),
            what,
            flag: flag.to_owned(),
        }
    } else {
        NodeError::Bind {
            addr,
            what,
            source: e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logical::{ALL, SCHEDULER};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn a_scheduler_binds_every_port_and_a_worker_only_its_own() {
        let s = Bound::listen(Listen::ephemeral(ip("127.0.8.1"), Role::Scheduler))
            .await
            .unwrap();
        let names: Vec<_> = s.clusters.iter().map(|c| c.logical.name).collect();
        assert_eq!(names, ["scheduler", "all"]);
        for c in &s.clusters {
            let want = s.gossip_addr(c.logical);
            assert_eq!(c.udp.local_addr().unwrap(), want);
            assert_eq!(c.tcp.local_addr().unwrap(), want);
        }
        assert_eq!(s.api.local_addr().unwrap(), s.private_addr());
        let public = s.public.as_ref().expect("a scheduler listens publicly");
        assert_eq!(public.local_addr().unwrap().port(), s.ports.public);
        assert_ne!(s.ports.public, 0);
        let w = Bound::listen(Listen::ephemeral(ip("127.0.8.1"), Role::Worker))
            .await
            .unwrap();
        assert_eq!(w.clusters.len(), 1);
        assert_eq!(w.clusters[0].logical, &ALL);
        assert!(w.public.is_none());
        assert_ne!(w.ports.private, s.ports.private);
    }

    #[tokio::test]
    async fn a_taken_port_names_the_port_and_the_flag() {
        let first = Bound::listen(Listen::ephemeral(ip("127.0.8.2"), Role::Scheduler))
            .await
            .unwrap();
        let again = Listen {
            private_port: first.ports.private,
            ..Listen::ephemeral(ip("127.0.8.2"), Role::Worker)
        };
        let e = Bound::listen(again).await.unwrap_err().to_string();
        let p = first.ports.private;
        assert_eq!(
            e,
            format!(
                "port {p} on 127.0.8.2 is already in use (internal API, set by --private_port): \
                 stop the other process or change --private_port"
            )
        );
        // Only the gossip port taken: the message names the offset.
        drop(first.api);
        let held = first.clusters;
        let again = Listen {
            private_port: p,
            ..Listen::ephemeral(ip("127.0.8.2"), Role::Scheduler)
        };
        let e = Bound::listen(again).await.unwrap_err().to_string();
        let port = p + SCHEDULER.offset;
        assert!(
            e.contains(&format!("port {port} on 127.0.8.2 is already in use"))
                && e.contains("scheduler cluster, set by --private_port (+1000)"),
            "{e}"
        );
        drop(held);
    }
}
