//! The node: from bound sockets ([`bind::Bound`]) and the flags, start the backend, feed one
//! engine per logical cluster, serve and log. `main.rs` parses flags, binds and calls [`run`]
//! with a shutdown future; tests bind on loopback with ephemeral ports and run whole nodes in
//! one process.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use discovery::{Context, Discover, DiscoveryError, Refresh, Report, Snapshot};
use membership::{Engine, NodeId, wire};
use tokio::sync::watch;
use uuid::Uuid;

pub mod addr;
pub mod backends;
pub mod bind;
pub mod cli;
pub mod cluster;
pub mod gate;
pub mod http;
pub mod key;
pub mod logging;
pub mod logical;
pub mod members;
pub mod metrics;
pub mod notify;
pub mod ports;
pub mod zone;

pub use bind::{Bound, Listen, private_ip};
use cli::Flags;
use cluster::transport::AbortOnDrop;
use cluster::{Protection, Transport, WireLimits};
use logical::Role;

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
        flag: String,
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Builds the discovery context and the backend for a node on `ip:private_port`, without
/// starting anything.
pub fn backend(
    flags: &Flags,
    role: Role,
    ip: IpAddr,
    private_port: u16,
    node_id: Uuid,
    members: watch::Receiver<usize>,
    seal: Option<Arc<dyn discovery::Seal>>,
) -> Result<Arc<dyn Discover>, NodeError> {
    let ctx = Context {
        cluster_name: flags.cluster_name.clone(),
        role: logical::to_discovery(role),
        node_id,
        private_ip: ip,
        private_port,
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

/// Runs one explained discovery round, for `node discover`.
pub async fn discover(flags: &Flags) -> Result<Report, NodeError> {
    backends::check_built(flags.discovery)?;
    let ip = private_ip(flags)?;
    let (_tx, rx) = watch::channel(1);
    let (sealer, _) = key::load(flags)?;
    let seal = sealer.map(backends::multicast::context_seal);
    let role = flags.role.into();
    let backend = backend(
        flags,
        role,
        ip,
        flags.private_port,
        Uuid::new_v4(),
        rx,
        seal,
    )?;
    match tokio::time::timeout(Duration::from_secs(60), backend.explain()).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(NodeError::Discovery(DiscoveryError::Unreachable {
            backend: backend.name(),
            message: "no answer within 60 s".into(),
            source: None,
        })),
    }
}

/// Tasks that end with the node: aborted when dropped, so a node run in-process leaves
/// nothing behind once [`run`] returns.
#[derive(Debug, Default)]
struct Tasks(Vec<AbortOnDrop>);

impl Tasks {
    fn spawn(&mut self, f: impl Future<Output = ()> + Send + 'static) {
        self.add(tokio::spawn(f));
    }

    fn add(&mut self, handle: tokio::task::JoinHandle<()>) {
        self.0.push(AbortOnDrop(handle));
    }
}

/// Runs the node on `bound` until `shutdown` completes, then leaves every cluster and returns.
/// The flags give everything but the address, the ports and the role, which `bound` fixed.
pub async fn run(
    bound: Bound,
    flags: Flags,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    backends::check_built(flags.discovery)?;
    let Bound {
        ip,
        role,
        ports,
        api,
        clusters,
        public,
    } = bound;
    let mut tasks = Tasks::default();
    let (sealer, key_file) = key::load(&flags)?;
    tasks.add(key::reload_on_sighup(key_file, sealer.clone())?);
    let uuid = Uuid::new_v4();
    let started = now_ms();

    let (size_tx, size_rx) = watch::channel(1usize);
    let seal = sealer.clone().map(backends::multicast::context_seal);
    let gate_size = size_rx.clone();
    let backend = backend(&flags, role, ip, ports.private, uuid, size_rx, seal)?;
    let zone = zone::choose(flags.zone, backend.as_ref(), zone::LOCAL_ZONE_TIMEOUT).await;
    let (cand_tx, cand_rx) = watch::channel(Snapshot::default());
    let discovered = Arc::new(AtomicBool::new(false));
    {
        let mut rx = cand_rx.clone();
        let discovered = discovered.clone();
        tasks.spawn(async move {
            while rx.changed().await.is_ok() {
                if rx.borrow().refreshes > 0 {
                    discovered.store(true, Ordering::Relaxed);
                }
            }
        });
    }
    let gate = Arc::new(gate::Gate::new(flags.min_cluster_size, discovered));
    let (gate_open_tx, gate_open_rx) = tokio::sync::oneshot::channel();
    tasks.spawn(gate::run(
        gate.clone(),
        gate_size,
        cand_rx.clone(),
        gate_open_tx,
    ));

    let (cfg, limits) = WireLimits::engine_config(flags.max_members, sealer.is_some());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let seed: u64 = rand::random();
    let mut size_tx = Some(size_tx);
    let mut views = Vec::new();
    let mut engines = Tasks::default();
    for (i, c) in clusters.into_iter().enumerate() {
        let logical = c.logical;
        let addr = SocketAddr::new(ip, ports.gossip(logical));
        let me = NodeId::new(addr, uuid, started, role);
        let engine = Engine::new(
            me,
            wire::cluster_tag(&flags.cluster_name, logical.name),
            cfg.clone(),
            seed ^ i as u64,
            Duration::ZERO,
        )
        .with_zone(zone);
        let protection = sealer.clone().map(|sealer| Protection {
            sealer,
            aad: keyring::aad(&flags.cluster_name, logical.name),
        });
        let (view, task) = cluster::spawn(cluster::ClusterSpec {
            name: logical.name,
            engine,
            udp: c.udp,
            tcp: c.tcp,
            candidates: cand_rx.clone(),
            map: Box::new(move |c| logical.candidate(c)),
            // The all-instances cluster's size drives the gate and the backend's pace.
            size_tx: if *logical == logical::ALL {
                size_tx.take()
            } else {
                None
            },
            shutdown: shutdown_rx.clone(),
            transport: Transport::new(logical.name, protection, limits, ip),
        });
        views.push(view);
        engines.add(task);
    }

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
    metrics.register_collector(Box::new(metrics::BackendCollector(backend.clone())));
    let refresh = Refresh {
        interval: flags.discovery_refresh,
        ..Refresh::default()
    };
    tasks.spawn(backend.clone().watch(refresh, cand_tx, observer));

    let state = http::ApiState {
        clusters: views,
        gate: gate.clone(),
        metrics: Arc::new(metrics),
    };
    tasks.add(http::serve(
        api,
        http::private_router(state.clone()),
        limits,
        internal_stats,
    ));
    if let Some(listener) = public {
        tasks.add(http::serve(
            listener,
            http::public_router(state),
            limits,
            public_stats,
        ));
    }
    let listening = SocketAddr::new(ip, ports.private);
    tracing::info!(
        role = %role,
        uuid = %uuid,
        zone = zone.as_ref().map_or("none", |z| z.as_str()),
        backend = backend.name(),
        private = %listening,
        "node started"
    );
    // Every listener is bound and served: a Type=notify unit may now count the node as
    // started, at once, or with `--min_cluster_size` once the cluster has that many members.
    if flags.min_cluster_size <= 1 {
        notify::notify(&format!("READY=1\nSTATUS=listening on {listening}"));
    } else {
        let min = flags.min_cluster_size;
        notify::notify(&format!(
            "STATUS=listening on {listening}; waiting for {min} members (--min_cluster_size)"
        ));
        tasks.spawn(async move {
            if gate_open_rx.await.is_ok() {
                notify::notify(&format!(
                    "READY=1\nSTATUS=listening on {listening}; {min} members reached"
                ));
            }
        });
    }

    shutdown.await;
    notify::notify("STOPPING=1\nSTATUS=leaving the cluster");
    tracing::info!("leaving the cluster");
    shutdown_tx.send_replace(true);
    for t in &mut engines.0 {
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut t.0).await;
    }
    drop(tasks);
    Ok(())
}
