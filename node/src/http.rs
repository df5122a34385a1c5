//! The HTTP endpoints: the internal API on the private port, health on the public port, and how
//! both listeners are served so that idle or half-sent connections cannot starve them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::cluster::SharedView;

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// One entry per cluster this node is in.
    pub clusters: Vec<SharedView>,
    /// Readiness: discovery answered and `--min_cluster_size` reached.
    pub gate: Arc<crate::gate::Gate>,
    /// What `GET /metrics` serves.
    pub metrics: Arc<crate::metrics::Metrics>,
}

pub use crate::cluster::view::{ClusterJson, MemberJson, MembersJson};

async fn members(State(state): State<ApiState>) -> Json<MembersJson> {
    Json(crate::cluster::view::members_json(&state.clusters))
}

async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        state.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<ApiState>) -> impl IntoResponse {
    match state.gate.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// The internal API, on `private_ip:private_port`.
pub fn private_router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/members", get(members))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// The public listener of schedulers.
pub fn public_router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// A request's headers must arrive within this, counted from the first byte awaited (hyper
/// restarts it for every request, so it also bounds an idle keep-alive connection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection is kept longer, whatever it does (a client that never reads its response).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// File descriptors kept for everything but the HTTP listeners: gossip streams (2 clusters ×
/// (128 incoming + 64 outgoing)), sockets, discovery clients, files and the journal.
const FD_RESERVE: u64 = 512;
/// The fewest and the most connections one listener holds. These endpoints answer at once, so
/// 128 is far more than probes, scrapers and `node members` need; it also bounds what an idle
/// flood costs (about 12 KB of RSS a held connection, measured: 1,000 idle connections on each
/// of two ports grew RSS by 22 MB with a cap of 4096, 15 MB with 512, 9.7 MB with 256). Beyond it the
/// connection idle the longest is evicted, so `/healthz` still answers.
const MIN_CONNECTIONS: usize = 32;
const MAX_CONNECTIONS: usize = 128;
/// hyper's read buffer per connection; requests to these endpoints are a few hundred bytes.
const MAX_BUF: usize = 16 * 1024;

/// How one HTTP listener bounds its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once. A new one beyond it closes the connection idle the longest
    /// (no request in progress), or is itself closed at once when every one is busy.
    pub max_connections: usize,
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`MAX_CONNECTION_AGE`].
    pub max_connection_age: Duration,
}

impl Limits {
    /// Sizes the connection cap of each of `listeners` listeners below the open-file limit
    /// `fd_limit` (unknown: assume the common default of 1024).
    pub fn for_fd_limit(fd_limit: Option<u64>, listeners: usize) -> Self {
        let spare = fd_limit.unwrap_or(1024).saturating_sub(FD_RESERVE);
        let per = usize::try_from(spare / listeners.max(1) as u64).unwrap_or(usize::MAX);
        Self {
            max_connections: per.clamp(MIN_CONNECTIONS, MAX_CONNECTIONS),
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connection_age: MAX_CONNECTION_AGE,
        }
    }

    /// Whether the open-file limit, rather than [`MAX_CONNECTIONS`], set the cap.
    pub fn limited_by_fds(&self) -> bool {
        self.max_connections < MAX_CONNECTIONS
    }
}

/// The soft and hard limits on open files (`None`: unlimited), from `/proc/self/limits`.
///
/// The soft limit is not raised here: `setrlimit` needs `unsafe` (or a crate outside the
/// workspace's dependencies), so the systemd units set `LimitNOFILE=` and the caps are sized
/// below whatever limit the process has.
pub fn open_file_limits() -> Option<(Option<u64>, Option<u64>)> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    let mut fields = line.split_whitespace();
    let mut value = || match fields.next()? {
        "unlimited" => Some(None),
        n => n.parse().ok().map(Some),
    };
    Some((value()?, value()?))
}

/// The counters of one listener, read by `/metrics`.
#[derive(Debug)]
pub struct ListenerStats {
    /// `public` or `internal`.
    pub listener: &'static str,
    /// The listener's [`Limits::max_connections`].
    pub max_connections: usize,
    open: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    evicted: AtomicU64,
    header_timeouts: AtomicU64,
    aged_out: AtomicU64,
}

impl ListenerStats {
    /// Zeroed counters for `listener`.
    pub fn new(listener: &'static str, limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            listener,
            max_connections: limits.max_connections,
            open: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            header_timeouts: AtomicU64::new(0),
            aged_out: AtomicU64::new(0),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections closed on arrival because every held one was busy.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Idle connections closed to make room for a new one.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Connections closed because a request's headers did not arrive in time.
    pub fn header_timeouts(&self) -> u64 {
        self.header_timeouts.load(Ordering::Relaxed)
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The HTTP listeners' counters for `/metrics`, read at scrape time.
#[derive(Debug)]
pub struct HttpCollector(pub Vec<Arc<ListenerStats>>);

impl Collector for HttpCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        type Read = fn(&ListenerStats) -> u64;
        let gauges: [(&str, &str, Read); 2] = [
            (
                "node_http_connections_open",
                "HTTP connections open, by listener.",
                ListenerStats::open,
            ),
            (
                "node_http_connections_max",
                "The most HTTP connections a listener holds.",
                |s| s.max_connections as u64,
            ),
        ];
        for (name, help, read) in gauges {
            let mut m =
                enc.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            for s in &self.0 {
                let v = i64::try_from(read(s)).unwrap_or(i64::MAX);
                ConstGauge::new(v).encode(m.encode_family(&[("listener", s.listener)])?)?;
            }
        }
        let counters: [(&str, &str, Read); 5] = [
            (
                "node_http_connections_accepted",
                "HTTP connections accepted, by listener.",
                |s| s.accepted.load(Ordering::Relaxed),
            ),
            (
                "node_http_connections_refused",
                "HTTP connections closed on arrival: the listener was full of busy connections.",
                ListenerStats::refused,
            ),
            (
                "node_http_connections_evicted",
                "Idle HTTP connections closed to make room for a new one.",
                ListenerStats::evicted,
            ),
            (
                "node_http_header_timeouts",
                "HTTP connections closed because request headers did not arrive in time.",
                ListenerStats::header_timeouts,
            ),
            (
                "node_http_connections_aged_out",
                "HTTP connections closed at the maximum connection age.",
                |s| s.aged_out.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, read) in counters {
            let mut m =
                enc.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
            for s in &self.0 {
                ConstCounter::new(read(s)).encode(m.encode_family(&[("listener", s.listener)])?)?;
            }
        }
        Ok(())
    }
}

/// One held connection in a listener's table.
#[derive(Debug)]
struct Conn {
    /// Accepted, or the end of its last request.
    last_active: Instant,
    /// Requests being handled now; a busy connection is never evicted.
    in_request: usize,
    /// Notified to close the connection.
    close: Arc<Notify>,
}

/// The connections a listener holds, bounded by `max`.
#[derive(Debug)]
struct Table {
    max: usize,
    inner: Mutex<TableInner>,
}

#[derive(Debug, Default)]
struct TableInner {
    next_id: u64,
    conns: HashMap<u64, Conn>,
}

/// A connection's place in the table; dropping it frees the place.
#[derive(Debug)]
struct ConnGuard {
    table: Arc<Table>,
    stats: Arc<ListenerStats>,
    id: u64,
    close: Arc<Notify>,
}

impl Table {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            inner: Mutex::new(TableInner::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TableInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes room for a new connection: when full, the connection idle the longest is closed;
    /// `None` when every held connection is busy.
    fn admit(table: &Arc<Self>, stats: &Arc<ListenerStats>) -> Option<ConnGuard> {
        let mut t = table.lock();
        if t.conns.len() >= table.max {
            let victim = t
                .conns
                .iter()
                .filter(|(_, c)| c.in_request == 0)
                .min_by_key(|(_, c)| c.last_active)
                .map(|(id, _)| *id);
            let Some(id) = victim else {
                bump(&stats.refused);
                return None;
            };
            if let Some(c) = t.conns.remove(&id) {
                c.close.notify_one();
                bump(&stats.evicted);
            }
        }
        let id = t.next_id;
        t.next_id += 1;
        let close = Arc::new(Notify::new());
        t.conns.insert(
            id,
            Conn {
                last_active: Instant::now(),
                in_request: 0,
                close: close.clone(),
            },
        );
        bump(&stats.accepted);
        bump(&stats.open);
        Some(ConnGuard {
            table: table.clone(),
            stats: stats.clone(),
            id,
            close,
        })
    }

    fn mark(&self, id: u64, begin: bool) {
        if let Some(c) = self.lock().conns.get_mut(&id) {
            if begin {
                c.in_request += 1;
            } else {
                c.in_request = c.in_request.saturating_sub(1);
                c.last_active = Instant::now();
            }
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.table.lock().conns.remove(&self.id);
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Marks a connection busy while one request is handled.
#[derive(Debug)]
struct InRequest {
    table: Arc<Table>,
    id: u64,
}

impl InRequest {
    fn new(table: &Arc<Table>, id: u64) -> Self {
        table.mark(id, true);
        Self {
            table: table.clone(),
            id,
        }
    }
}

impl Drop for InRequest {
    fn drop(&mut self) {
        self.table.mark(self.id, false);
    }
}

/// Serves `router` on `listener` over HTTP/1.1 with a header-read timeout, a maximum connection
/// age and a connection cap. Returns the accept task; aborting it stops new connections.
pub fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stats: Arc<ListenerStats>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let table = Table::new(limits.max_connections);
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Usually out of file descriptors: let connections time out or close.
                    tracing::debug!(listener = stats.listener, "http accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(guard) = Table::admit(&table, &stats) else {
                continue;
            };
            tokio::spawn(serve_connection(stream, router.clone(), limits, guard));
        }
    })
}

async fn serve_connection(stream: TcpStream, router: Router, limits: Limits, guard: ConnGuard) {
    let _ = stream.set_nodelay(true);
    // Until its first byte, a connection costs only its socket and this task: hyper allocates
    // its buffers (8 KiB and up) once it starts reading, which 1,000 idle connections per port
    // would turn into megabytes.
    tokio::select! {
        r = tokio::time::timeout(limits.header_read_timeout, stream.readable()) => match r {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                bump(&guard.stats.header_timeouts);
                return;
            }
        },
        () = guard.close.notified() => return,
    }
    // Boxed, so the waiting task above is small: an async fn's state is as large as its
    // largest await, and hyper's connection future is kilobytes.
    Box::pin(serve_http(stream, router, limits, guard)).await;
}

async fn serve_http(stream: TcpStream, router: Router, limits: Limits, guard: ConnGuard) {
    let (table, id) = (guard.table.clone(), guard.id);
    let inner = TowerToHyperService::new(router);
    let svc = hyper::service::service_fn(move |req| {
        let busy = InRequest::new(&table, id);
        let fut = hyper::service::Service::call(&inner, req);
        async move {
            let res = fut.await;
            drop(busy);
            res
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_BUF);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        r = tokio::time::timeout(limits.max_connection_age, conn) => match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_timeout() => bump(&guard.stats.header_timeouts),
            Ok(Err(e)) => tracing::debug!(listener = guard.stats.listener, "http connection: {e}"),
            Err(_) => bump(&guard.stats.aged_out),
        },
        // Evicted for a newer connection: dropping the connection closes the socket.
        () = guard.close.notified() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(max_connections: usize, header_ms: u64) -> Limits {
        Limits {
            max_connections,
            header_read_timeout: Duration::from_millis(header_ms),
            max_connection_age: MAX_CONNECTION_AGE,
        }
    }

    /// A listener on `ip` serving health and a slow route; the accept task stops when dropped.
    struct Server {
        addr: std::net::SocketAddr,
        stats: Arc<ListenerStats>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn server(ip: &str, limits: Limits) -> Server {
        let listener = TcpListener::bind((ip.parse::<std::net::IpAddr>().unwrap(), 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/healthz", get(healthz)).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                "slow\n"
            }),
        );
        let stats = ListenerStats::new("public", &limits);
        let task = serve(listener, router, limits, stats.clone());
        Server { addr, stats, task }
    }

    /// One request with `Connection: close`; the whole response.
    async fn get_text(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        Ok(text)
    }

    /// How long until the server closes `s`, reading (and discarding) whatever it sends.
    async fn time_to_close(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        let mut b = [0u8; 1024];
        let end = t0 + limit;
        loop {
            match tokio::time::timeout_at(end.into(), s.read(&mut b)).await {
                Ok(Ok(0) | Err(_)) => return Some(t0.elapsed()),
                Ok(Ok(_)) => {}
                Err(_) => return None,
            }
        }
    }

    #[tokio::test]
    async fn a_half_sent_request_is_closed_at_the_header_timeout() {
        let srv = server("127.0.6.1", limits(64, 300)).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
            .await
            .unwrap();
        let t = time_to_close(&mut s, Duration::from_secs(3))
            .await
            .expect("closed");
        assert!(
            t >= Duration::from_millis(250) && t < Duration::from_secs(1),
            "{t:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(srv.stats.header_timeouts(), 1);
        assert_eq!(srv.stats.open(), 0);
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_at_the_header_timeout() {
        let srv = server("127.0.6.2", limits(64, 300)).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut b = [0u8; 512];
        let n = s.read(&mut b).await.unwrap();
        assert!(String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 200"));
        // The connection stays open for another request, but not for ever.
        let t = time_to_close(&mut s, Duration::from_secs(3))
            .await
            .expect("closed");
        assert!(t < Duration::from_secs(1), "{t:?}");
    }

    #[tokio::test]
    async fn a_full_listener_closes_the_longest_idle_connection_so_health_answers() {
        let srv = server("127.0.6.3", limits(8, 30_000)).await;
        let mut idle = Vec::new();
        for _ in 0..20 {
            let mut s = TcpStream::connect(srv.addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
            idle.push(s);
        }
        let t0 = Instant::now();
        let text = tokio::time::timeout(Duration::from_secs(1), get_text(srv.addr, "/healthz"))
            .await
            .expect("answered within a second")
            .unwrap();
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("ok\n"),
            "{text}"
        );
        assert!(t0.elapsed() < Duration::from_secs(1));
        assert!(srv.stats.evicted() >= 13, "{}", srv.stats.evicted());
        assert!(srv.stats.open() <= 8, "{}", srv.stats.open());
        assert_eq!(srv.stats.refused(), 0);
        // The first connections, idle the longest, were the ones closed.
        let first = time_to_close(&mut idle[0], Duration::from_millis(200)).await;
        assert!(first.is_some(), "the oldest idle connection is still open");
    }

    #[tokio::test]
    async fn a_listener_full_of_busy_connections_refuses_new_ones_at_once() {
        let srv = server("127.0.6.4", limits(2, 30_000)).await;
        let slow: Vec<_> = (0..2)
            .map(|_| tokio::spawn(get_text(srv.addr, "/slow")))
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        let t = time_to_close(&mut s, Duration::from_millis(500)).await;
        assert!(t.is_some(), "a connection beyond the cap was kept");
        assert_eq!(srv.stats.refused(), 1);
        for h in slow {
            let text = h.await.unwrap().unwrap();
            assert!(
                text.ends_with("slow\n"),
                "busy connections are served: {text}"
            );
        }
    }

    #[test]
    fn connection_caps_stay_below_the_open_file_limit() {
        let cap = |fds, n| Limits::for_fd_limit(fds, n).max_connections;
        assert_eq!(cap(Some(640), 2), 64);
        assert_eq!(cap(None, 2), MAX_CONNECTIONS, "unknown: assume 1024");
        assert_eq!(cap(Some(1024), 1), MAX_CONNECTIONS);
        assert_eq!(cap(Some(65536), 2), MAX_CONNECTIONS);
        assert_eq!(cap(Some(100), 2), MIN_CONNECTIONS);
        assert!(Limits::for_fd_limit(Some(640), 2).limited_by_fds());
        assert!(!Limits::for_fd_limit(Some(65536), 2).limited_by_fds());
        let (soft, hard) = open_file_limits().expect("/proc/self/limits names the limit");
        if let (Some(s), Some(h)) = (soft, hard) {
            assert!(s >= 1 && s <= h, "{s} {h}");
        }
    }

    #[test]
    fn listener_counters_reach_the_metrics() {
        let l = limits(8, 1000);
        let stats = ListenerStats::new("public", &l);
        bump(&stats.evicted);
        bump(&stats.evicted);
        bump(&stats.refused);
        let (mut m, _) = crate::metrics::Metrics::new(Vec::new());
        m.register_collector(Box::new(HttpCollector(vec![stats])));
        let text = m.render();
        for line in [
            "node_http_connections_evicted_total{listener=\"public\"} 2",
            "node_http_connections_refused_total{listener=\"public\"} 1",
            "node_http_connections_max{listener=\"public\"} 8",
            "node_http_connections_open{listener=\"public\"} 0",
        ] {
            assert!(text.lines().any(|x| x == line), "no `{line}` in:\n{text}");
        }
    }
}
