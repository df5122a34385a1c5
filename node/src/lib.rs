//! The node: parse the configuration, pick the address, start the backend, feed the engines,
//! serve and log. `main.rs` only parses flags and calls [`run`] or [`discover`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use discovery::{Context, Discover, DiscoveryError, NoObserver, Refresh, Report, Snapshot};
use membership::{Engine, NodeId, wire};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use uuid::Uuid;

pub mod addr;
pub mod backends;
pub mod cli;
pub mod cluster;
pub mod http;
pub mod ports;

use cli::{Flags, RoleArg};
use ports::Ports;

/// Why the node could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The private IP could not be chosen; the message lists the interfaces.
    #[error("{0}")]
    Address(String),
    /// The interfaces could not be listed.
    #[error("cannot list the network interfaces: {0}")]
    Interfaces(#[source] io::Error),
    /// A flag combination is unusable.
    #[error("{0}")]
    Config(String),
    /// A port is taken.
    #[error(
        "port {port} on {ip} is already in use ({what}, set by {flag}): stop the other process or change {flag}"
    )]
    PortInUse {
        /// The address.
        ip: IpAddr,
        /// The port.
        port: u16,
        /// What the port is for.
        what: &'static str,
        /// The flag that set it.
        flag: &'static str,
    },
    /// Another bind failure.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the port is for.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Discovery could not be set up or failed.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
}

fn role(r: RoleArg) -> (membership::Role, discovery::Role) {
    match r {
        RoleArg::Scheduler => (membership::Role::Scheduler, discovery::Role::Scheduler),
        RoleArg::Worker => (membership::Role::Worker, discovery::Role::Worker),
    }
}

/// Picks the private IP and logs the choice.
pub fn private_ip(flags: &Flags) -> Result<IpAddr, NodeError> {
    let ifaces = addr::system_interfaces()?;
    let choice = addr::choose(flags.private_ip_selector, &ifaces)?;
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

async fn bind_tcp(
    addr: SocketAddr,
    what: &'static str,
    flag: &'static str,
) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| bind_error(addr, what, flag, e))
}

async fn bind_udp(
    addr: SocketAddr,
    what: &'static str,
    flag: &'static str,
) -> Result<UdpSocket, NodeError> {
    UdpSocket::bind(addr)
        .await
        .map_err(|e| bind_error(addr, what, flag, e))
}

fn bind_error(addr: SocketAddr, what: &'static str, flag: &'static str, e: io::Error) -> NodeError {
    if e.kind() == io::ErrorKind::AddrInUse {
        NodeError::PortInUse {
            ip: addr.ip(),
            port: addr.port(),
            what,
            flag,
        }
    } else {
        NodeError::Bind {
            addr,
            what,
            source: e,
        }
    }
}

fn scheduler_addr(c: &discovery::Candidate) -> Option<SocketAddr> {
    if c.role == Some(discovery::Role::Worker) {
        return None;
    }
    let port = c.port.checked_add(ports::SCHEDULER_OFFSET)?;
    Some(SocketAddr::new(c.ip, port))
}

fn all_addr(c: &discovery::Candidate) -> Option<SocketAddr> {
    let port = c.port.checked_add(ports::ALL_OFFSET)?;
    Some(SocketAddr::new(c.ip, port))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Builds the discovery context and the backend, without starting anything.
pub fn backend(
    flags: &Flags,
    ip: IpAddr,
    node_id: Uuid,
    members: watch::Receiver<usize>,
) -> Result<Arc<dyn Discover>, NodeError> {
    let ctx = Context {
        cluster_name: flags.cluster_name.clone(),
        role: role(flags.role).1,
        node_id,
        private_ip: ip,
        private_port: flags.private_port,
        selector: flags.private_ip_selector,
        members,
    };
    Ok(backends::build(flags, ctx)?)
}

/// Runs discovery once, for `node discover`.
pub async fn discover(flags: &Flags) -> Result<Report, NodeError> {
    let ip = private_ip(flags)?;
    let (_tx, rx) = watch::channel(1);
    let backend = backend(flags, ip, Uuid::new_v4(), rx)?;
    match tokio::time::timeout(Duration::from_secs(60), backend.discover()).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(NodeError::Discovery(DiscoveryError::Unreachable {
            backend: backend.name(),
            message: "no answer within 60 s".into(),
            source: None,
        })),
    }
}

/// Runs the node until `shutdown` turns true, then leaves both clusters and returns.
pub async fn run(flags: Flags, mut shutdown: watch::Receiver<bool>) -> Result<(), NodeError> {
    let ip = private_ip(&flags)?;
    let ports = Ports::new(flags.private_port, flags.public_port)?;
    let (mrole, _) = role(flags.role);
    let scheduler = flags.role == RoleArg::Scheduler;
    let uuid = Uuid::new_v4();
    let started = now_ms();

    // Bind everything first, so a taken port fails start-up with a clear message.
    let api = bind_tcp(
        SocketAddr::new(ip, ports.private),
        "internal API",
        "--private_port",
    )
    .await?;
    let all_addr_ = SocketAddr::new(ip, ports.all);
    let all_udp = bind_udp(all_addr_, "all-instances cluster", "--private_port (+2000)").await?;
    let all_tcp = bind_tcp(all_addr_, "all-instances cluster", "--private_port (+2000)").await?;
    let sched_socks = if scheduler {
        let a = SocketAddr::new(ip, ports.scheduler);
        Some((
            bind_udp(a, "scheduler cluster", "--private_port (+1000)").await?,
            bind_tcp(a, "scheduler cluster", "--private_port (+1000)").await?,
        ))
    } else {
        None
    };
    let public = if scheduler {
        let bind_ip = match (flags.public_bind_to_any, ip) {
            (false, _) => ip,
            (true, IpAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (true, IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        Some(
            bind_tcp(
                SocketAddr::new(bind_ip, ports.public),
                "public listener",
                "--public_port",
            )
            .await?,
        )
    } else {
        None
    };

    let (size_tx, size_rx) = watch::channel(1usize);
    let backend = backend(&flags, ip, uuid, size_rx)?;
    let (cand_tx, cand_rx) = watch::channel(Snapshot::default());
    let discovered = Arc::new(AtomicBool::new(false));
    {
        let mut rx = cand_rx.clone();
        let discovered = discovered.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                if rx.borrow().refreshes > 0 {
                    discovered.store(true, Ordering::Relaxed);
                }
            }
        });
    }
    let refresh = Refresh {
        interval: flags.discovery_refresh,
        ..Refresh::default()
    };
    tokio::spawn(
        backend
            .clone()
            .watch(refresh, cand_tx, Arc::new(NoObserver)),
    );

    let cfg = membership::Config::lan();
    let seed: u64 = rand::random();
    let mut views = Vec::new();
    let mut tasks = Vec::new();
    if let Some((udp, tcp)) = sched_socks {
        let me = NodeId::new(SocketAddr::new(ip, ports.scheduler), uuid, started, mrole);
        let engine = Engine::new(
            me,
            wire::cluster_tag(&flags.cluster_name, "scheduler"),
            cfg.clone(),
            seed ^ 1,
            Duration::ZERO,
        );
        let (view, task) = cluster::spawn(cluster::ClusterSpec {
            name: "scheduler",
            engine,
            udp,
            tcp,
            candidates: cand_rx.clone(),
            map: scheduler_addr,
            size_tx: None,
            shutdown: shutdown.clone(),
        });
        views.push(view);
        tasks.push(task);
    }
    let me = NodeId::new(all_addr_, uuid, started, mrole);
    let engine = Engine::new(
        me,
        wire::cluster_tag(&flags.cluster_name, "all"),
        cfg,
        seed,
        Duration::ZERO,
    );
    let (view, task) = cluster::spawn(cluster::ClusterSpec {
        name: "all",
        engine,
        udp: all_udp,
        tcp: all_tcp,
        candidates: cand_rx,
        map: all_addr,
        size_tx: Some(size_tx),
        shutdown: shutdown.clone(),
    });
    views.push(view);
    tasks.push(task);

    let state = http::ApiState {
        clusters: views,
        discovered,
    };
    let private_app = http::private_router(state.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(api, private_app).await {
            tracing::error!("internal API stopped: {e}");
        }
    });
    if let Some(listener) = public {
        let app = http::public_router(state);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("public listener stopped: {e}");
            }
        });
    }
    tracing::info!(
        role = %mrole,
        uuid = %uuid,
        backend = backend.name(),
        private = %SocketAddr::new(ip, ports.private),
        "node started"
    );

    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    tracing::info!("leaving the cluster");
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    Ok(())
}
