//! The node: parse the configuration, pick the address, start the backend, feed the engines,
//! serve and log. `main.rs` only parses flags and calls [`run`] or [`discover`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use discovery::{Context, Discover, DiscoveryError, Refresh, Report, Snapshot};
use keyring::{Keyring, Sealer, SealerConfig};
use membership::{Engine, NodeId, wire};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use uuid::Uuid;

pub mod addr;
pub mod backends;
pub mod cli;
pub mod cluster;
pub mod gate;
pub mod http;
pub mod logging;
pub mod members;
pub mod metrics;
pub mod notify;
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
    /// The cluster key file is unusable.
    #[error(transparent)]
    Key(#[from] keyring::KeyringError),
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

/// The systemd credential the packaged units load from `/etc/cluster-node/key`.
pub const KEY_CREDENTIAL: &str = "cluster-key";

/// The key file to use: `--cluster_key_file`, else the `cluster-key` credential systemd passed
/// in `$CREDENTIALS_DIRECTORY`, when it holds more than blank and `#` comment lines. The units
/// default it to a comment (`SetCredential=`), so a host without `/etc/cluster-node/key` runs
/// keyless instead of failing to start.
pub fn key_path(flags: &Flags) -> Option<PathBuf> {
    use std::io::Read as _;
    if let Some(path) = &flags.cluster_key_file {
        return Some(path.clone());
    }
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    let path = PathBuf::from(dir).join(KEY_CREDENTIAL);
    // Bounded like the keyring's own read; the keyring reads it again and checks it fully.
    // A credential that cannot be read as text goes to the keyring, which names the problem.
    let mut file = std::fs::File::open(&path).ok()?;
    let mut text = String::new();
    if (&mut file)
        .take(keyring::MAX_FILE_LEN + 1)
        .read_to_string(&mut text)
        .is_err()
    {
        return Some(path);
    }
    text.lines()
        .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .then_some(path)
}

/// Reads the key file ([`key_path`]), when there is one: refuses a file others can write, warns
/// about one they can read. Without a key, warns once that cluster traffic is unauthenticated.
pub fn load_key(flags: &Flags) -> Result<Option<Arc<Sealer>>, NodeError> {
    let Some(path) = &key_path(flags) else {
        tracing::warn!(
            "no --cluster_key_file (nor a cluster-key credential: /etc/cluster-node/key under \
             the packaged units): cluster traffic is unauthenticated and unencrypted, so \
             anyone who reaches the gossip ports can join or forge deaths; create one with \
             `node keygen > FILE && chmod 600 FILE`"
        );
        return Ok(None);
    };
    let loaded = Keyring::load(path)?;
    if let Some(w) = &loaded.permission_warning {
        tracing::warn!("{w}");
    }
    tracing::info!(keys = loaded.ring.len(), path = %path.display(), "cluster key file loaded");
    Ok(Some(Arc::new(Sealer::new(
        loaded.ring,
        SealerConfig::default(),
    ))))
}

/// Re-reads the key file on every SIGHUP; a bad file keeps the previous keys.
fn reload_on_sighup(path: Option<PathBuf>, sealer: Option<Arc<Sealer>>) -> Result<(), NodeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| NodeError::Config(format!("cannot watch SIGHUP: {e}")))?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let (Some(path), Some(sealer)) = (&path, &sealer) else {
                tracing::info!("SIGHUP received; no --cluster_key_file to reload");
                continue;
            };
            match Keyring::load(path) {
                Ok(loaded) => {
                    if let Some(w) = &loaded.permission_warning {
                        tracing::warn!("{w}");
                    }
                    tracing::info!(
                        keys = loaded.ring.len(),
                        path = %path.display(),
                        "SIGHUP: cluster key file reloaded"
                    );
                    sealer.replace(loaded.ring);
                }
                Err(e) => tracing::error!("SIGHUP: {e}; keeping the previous keys"),
            }
        }
    });
    Ok(())
}

/// Builds the discovery context and the backend, without starting anything.
pub fn backend(
    flags: &Flags,
    ip: IpAddr,
    node_id: Uuid,
    members: watch::Receiver<usize>,
    seal: Option<Arc<dyn discovery::Seal>>,
) -> Result<Arc<dyn Discover>, NodeError> {
    let ctx = Context {
        cluster_name: flags.cluster_name.clone(),
        role: role(flags.role).1,
        node_id,
        private_ip: ip,
        private_port: flags.private_port,
        selector: flags.private_ip_selector,
        members,
        seal,
    };
    Ok(backends::build(flags, ctx)?)
}

/// Reads the members from the local node's internal API, for `node members`.
pub async fn members(
    flags: &Flags,
    cluster: Option<cli::ClusterArg>,
) -> Result<http::MembersJson, NodeError> {
    let ip = private_ip(flags)?;
    let addr = SocketAddr::new(ip, flags.private_port);
    let all = members::fetch(addr, Duration::from_secs(10)).await?;
    members::select(all, cluster)
}

/// Runs discovery once, for `node discover`.
pub async fn discover(flags: &Flags) -> Result<Report, NodeError> {
    backends::check_built(flags.discovery)?;
    let ip = private_ip(flags)?;
    let (_tx, rx) = watch::channel(1);
    let seal = load_key(flags)?.map(|s| s as Arc<dyn discovery::Seal>);
    let backend = backend(flags, ip, Uuid::new_v4(), rx, seal)?;
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
    backends::check_built(flags.discovery)?;
    let ip = private_ip(&flags)?;
    let ports = Ports::new(flags.private_port, flags.public_port)?;
    let sealer = load_key(&flags)?;
    reload_on_sighup(key_path(&flags), sealer.clone())?;
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
    let seal = sealer.clone().map(|s| s as Arc<dyn discovery::Seal>);
    let gate_size = size_rx.clone();
    let backend = backend(&flags, ip, uuid, size_rx, seal)?;
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
    let gate = Arc::new(gate::Gate::new(flags.min_cluster_size, discovered));
    let (gate_open_tx, gate_open_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(gate::run(
        gate.clone(),
        gate_size,
        cand_rx.clone(),
        gate_open_tx,
    ));

    let mut cfg = membership::Config::lan();
    cfg.member_cap = flags.max_members;
    // Datagrams stay below 1400 bytes on the wire, sealing included: MTU-safe on IPv4 and IPv6.
    let max_datagram = cfg.max_datagram;
    let max_members = cfg.max_members;
    if sealer.is_some() {
        cfg.max_datagram -= keyring::OVERHEAD;
    }
    cfg.swim.max_packet_size = std::num::NonZeroUsize::new(cfg.max_datagram - wire::HEADER_LEN)
        .expect("max_datagram is far above the header");
    let protection = |logical: &str| {
        sealer.clone().map(|sealer| cluster::Protection {
            sealer,
            aad: keyring::aad(&flags.cluster_name, logical),
        })
    };
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
            protection: protection("scheduler"),
            max_datagram,
            max_members,
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
        protection: protection("all"),
        max_datagram,
        max_members,
    });
    views.push(view);
    tasks.push(task);

    // Each HTTP listener's connection cap is sized below the open-file limit.
    let (fd_soft, fd_hard) = http::open_file_limits().unwrap_or((None, None));
    let limits = http::Limits::for_fd_limit(fd_soft, if public.is_some() { 2 } else { 1 });
    if limits.limited_by_fds() {
        tracing::warn!(
            soft = ?fd_soft,
            hard = ?fd_hard,
            max_connections = limits.max_connections,
            "the open-file limit caps each HTTP listener's connections; raise it (systemd: \
             LimitNOFILE=65536, shell: ulimit -n) for more headroom"
        );
    }
    let internal_stats = http::ListenerStats::new("internal", &limits);
    let public_stats = http::ListenerStats::new("public", &limits);
    let (mut metrics, observer) = metrics::Metrics::new(views.clone());
    let mut listener_stats = vec![internal_stats.clone()];
    if public.is_some() {
        listener_stats.push(public_stats.clone());
    }
    metrics.register_collector(Box::new(http::HttpCollector(listener_stats)));
    let refresh = Refresh {
        interval: flags.discovery_refresh,
        ..Refresh::default()
    };
    tokio::spawn(backend.clone().watch(refresh, cand_tx, observer));

    let state = http::ApiState {
        clusters: views,
        gate: gate.clone(),
        metrics: Arc::new(metrics),
    };
    let _internal = http::serve(
        api,
        http::private_router(state.clone()),
        limits,
        internal_stats,
    );
    let _public = public
        .map(|listener| http::serve(listener, http::public_router(state), limits, public_stats));
    tracing::info!(
        role = %mrole,
        uuid = %uuid,
        backend = backend.name(),
        private = %SocketAddr::new(ip, ports.private),
        "node started"
    );
    // Every listener is bound and served: a Type=notify unit may now count the node as
    // started, at once, or with `--min_cluster_size` once the cluster has that many members.
    let listening = SocketAddr::new(ip, ports.private);
    if flags.min_cluster_size <= 1 {
        notify::notify(&format!("READY=1\nSTATUS=listening on {listening}"));
    } else {
        let min = flags.min_cluster_size;
        notify::notify(&format!(
            "STATUS=listening on {listening}; waiting for {min} members (--min_cluster_size)"
        ));
        tokio::spawn(async move {
            if gate_open_rx.await.is_ok() {
                notify::notify(&format!(
                    "READY=1\nSTATUS=listening on {listening}; {min} members reached"
                ));
            }
        });
    }

    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    notify::notify("STOPPING=1\nSTATUS=leaving the cluster");
    tracing::info!("leaving the cluster");
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    Ok(())
}
