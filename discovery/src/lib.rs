//! The discovery contract: every backend turns platform state into candidate peer addresses.
//!
//! A backend implements [`Discover`]. The node runs it through [`Discover::watch`], which by
//! default polls [`Discover::discover`] every refresh interval and publishes the latest good
//! [`Snapshot`] on a `watch` channel. Failures never clear the published set: the membership
//! engine alone decides when a member is gone.
//!
//! Names, labels and messages that backends get from the network or a cloud API reach logs
//! and terminals only through [`escape_untrusted`].

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use rand::RngExt;
use serde::Serialize;
use tokio::sync::watch;
use uuid::Uuid;

/// A boxed future, so that backends can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A backend's own error, boxed so that [`DiscoveryError`] can keep it as a source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a paging backend calls with each page's candidates (see [`Discover::discover_pages`]).
pub type OnPage<'a> = &'a (dyn Fn(&[Candidate]) + Send + Sync);

/// The part a node plays; schedulers also join the scheduler-only cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Serves clients and joins both clusters.
    Scheduler,
    /// Joins the all-instances cluster only.
    Worker,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Scheduler => "scheduler",
            Role::Worker => "worker",
        })
    }
}

/// A peer that discovery found: its private IP and its private port.
///
/// Cluster ports are derived from `port` by the node (`+1000`, `+2000`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Candidate {
    /// The peer's private IP.
    pub ip: IpAddr,
    /// The peer's `--private_port`.
    pub port: u16,
    /// What the platform calls it (instance id, pod name, DNS name), if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The peer's role, when the platform tells it (a label or tag).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// The platform's zone for the peer, when known (GCE zone, EC2 availability zone, the
    /// Kubernetes node's `topology.kubernetes.io/zone`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

impl Candidate {
    /// A candidate with only an address and a port.
    pub fn new(ip: IpAddr, port: u16) -> Self {
        Self {
            ip,
            port,
            id: None,
            role: None,
            zone: None,
        }
    }
}

/// An entry that a backend saw and did not use, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exclusion {
    /// What the platform calls it.
    pub id: String,
    /// Why it is not a candidate, in a few words.
    pub reason: String,
}

/// The result of one discovery round.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Peers to join.
    pub candidates: Vec<Candidate>,
    /// Entries that were seen and skipped.
    pub excluded: Vec<Exclusion>,
}

/// What the published candidate set looks like at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The latest good candidate set.
    pub candidates: Vec<Candidate>,
    /// How many successful refreshes produced this set; 0 means none has succeeded yet.
    pub refreshes: u64,
}

/// Authenticated encryption for what a backend sends on a shared medium (multicast
/// announcements). The node passes one built from `--cluster_key_file`; backends seal every
/// announcement and drop what does not open.
pub trait Seal: Send + Sync + fmt::Debug {
    /// Encrypts and authenticates `plain`, binding `aad` (which is not sent).
    fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8>;
    /// Checks and decrypts `sealed`; the error is a short reason label for metrics
    /// (`auth_failed`, `stale`, `replayed`, `sealed_malformed`).
    fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, &'static str>;
}

/// What a backend knows about the local node.
#[derive(Debug, Clone)]
pub struct Context {
    /// `--cluster_name`.
    pub cluster_name: String,
    /// This node's role.
    pub role: Role,
    /// This node's UUID in the all-instances cluster.
    pub node_id: Uuid,
    /// The private IP chosen by `--private_ip_selector`.
    pub private_ip: IpAddr,
    /// `--private_port`.
    pub private_port: u16,
    /// `--private_ip_selector`, when given; peers outside it are excluded.
    pub selector: Option<IpNetwork>,
    /// The size of the all-instances member list, so that backends can slow down once joined.
    pub members: watch::Receiver<usize>,
    /// Seals what the backend sends on a shared medium; `None` when no cluster key is set.
    pub seal: Option<Arc<dyn Seal>>,
}

impl Context {
    /// A context for tests and one-shot runs, with a member count that never changes.
    pub fn standalone(
        cluster_name: &str,
        role: Role,
        private_ip: IpAddr,
        private_port: u16,
        selector: Option<IpNetwork>,
    ) -> Self {
        let (_tx, members) = watch::channel(1);
        Self {
            cluster_name: cluster_name.to_owned(),
            role,
            node_id: Uuid::new_v4(),
            private_ip,
            private_port,
            selector,
            members,
            seal: None,
        }
    }

    /// Like [`Context::classify`], but only `self` is excluded: for lists an operator wrote.
    pub fn classify_listed(
        &self,
        id: impl Into<String>,
        ip: IpAddr,
        port: u16,
    ) -> Result<Candidate, Exclusion> {
        let id = id.into();
        if ip == self.private_ip && port == self.private_port {
            return Err(Exclusion {
                id,
                reason: "self".into(),
            });
        }
        Ok(Candidate {
            ip,
            port,
            id: Some(id),
            role: None,
            zone: None,
        })
    }

    /// Sorts one address into a candidate or an exclusion: self and addresses outside the
    /// selector are excluded.
    pub fn classify(
        &self,
        id: impl Into<String>,
        ip: IpAddr,
        port: u16,
    ) -> Result<Candidate, Exclusion> {
        let c = self.classify_listed(id, ip, port)?;
        match self.selector {
            Some(net) if !net.contains(ip) => Err(Exclusion {
                id: c.id.unwrap_or_default(),
                reason: format!("{ip} is outside --private_ip_selector {net}"),
            }),
            _ => Ok(c),
        }
    }

    /// Sorts a host with several addresses (an instance's interfaces) into one candidate or
    /// one exclusion, the same way in every backend:
    ///
    /// - the host is `self` when any of its addresses is this node's private IP;
    /// - only addresses of the private IP's family and inside `--private_ip_selector` count;
    /// - of those, the lowest is the candidate, which is the one the peer's own node picks
    ///   (the node chooses the lowest address inside the selector).
    ///
    /// The exclusion names the addresses the host has (at most [`MAX_LISTED`] of them).
    pub fn classify_host(
        &self,
        id: impl Into<String>,
        addrs: &[IpAddr],
        port: u16,
    ) -> Result<Candidate, Exclusion> {
        let id = id.into();
        if addrs.contains(&self.private_ip) {
            return Err(Exclusion {
                id,
                reason: "self".into(),
            });
        }
        let usable = addrs
            .iter()
            .copied()
            .filter(|ip| {
                ip.is_ipv4() == self.private_ip.is_ipv4()
                    && self.selector.is_none_or(|net| net.contains(*ip))
            })
            .min();
        if let Some(ip) = usable {
            return Ok(Candidate {
                ip,
                port,
                id: Some(id),
                role: None,
                zone: None,
            });
        }
        if addrs.is_empty() {
            return Err(Exclusion {
                id,
                reason: "no private address".into(),
            });
        }
        let family = if self.private_ip.is_ipv4() {
            "IPv4"
        } else {
            "IPv6"
        };
        let within = match self.selector {
            Some(net) => format!(" inside --private_ip_selector {net}"),
            None => String::new(),
        };
        Err(Exclusion {
            id,
            reason: format!("no {family} address{within} (has {})", list_addrs(addrs)),
        })
    }
}

/// How many addresses an exclusion names; a host with more gets "and N more".
pub const MAX_LISTED: usize = 8;

/// `a, b, c`, cut after [`MAX_LISTED`] addresses.
fn list_addrs(addrs: &[IpAddr]) -> String {
    let mut out: Vec<String> = addrs
        .iter()
        .take(MAX_LISTED)
        .map(|a| a.to_string())
        .collect();
    if addrs.len() > MAX_LISTED {
        out.push(format!("and {} more", addrs.len() - MAX_LISTED));
    }
    out.join(", ")
}

/// Why discovery failed. Every variant says what to change, and [`DiscoveryError::is_transient`]
/// says whether a retry may help.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The flags do not describe a usable backend configuration. The backend's own error is
    /// kept whole (its message names the flag and the fix; its sources stay reachable through
    /// [`std::error::Error::source`]); a plain message converts with `.into()`.
    #[error(transparent)]
    Config(BoxError),
    /// The platform API could not be reached or timed out.
    #[error("{backend}: cannot reach the api: {message}")]
    Unreachable {
        /// The backend name.
        backend: &'static str,
        /// What happened and what to check.
        message: String,
        /// The underlying cause.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The platform refused the credentials or the permission.
    #[error("{backend}: not authorised: {message}")]
    Unauthorized {
        /// The backend name.
        backend: &'static str,
        /// Which permission is missing and how to grant it.
        message: String,
    },
    /// The platform asked us to slow down.
    #[error("{backend}: throttled by the api: {message}")]
    Throttled {
        /// The backend name.
        backend: &'static str,
        /// The platform's message.
        message: String,
    },
    /// The platform answered with another error.
    #[error("{backend}: the api answered with an error: {message}")]
    Api {
        /// The backend name.
        backend: &'static str,
        /// The platform's message.
        message: String,
        /// Whether a retry may help (5xx answers).
        transient: bool,
    },
    /// A name could not be resolved.
    #[error("cannot resolve {name}: {source}")]
    Resolve {
        /// The name that failed.
        name: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
}

impl DiscoveryError {
    /// Whether a retry with backoff may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            DiscoveryError::Config(_) | DiscoveryError::Unauthorized { .. } => false,
            DiscoveryError::Unreachable { .. }
            | DiscoveryError::Throttled { .. }
            | DiscoveryError::Resolve { .. } => true,
            DiscoveryError::Api { transient, .. } => *transient,
        }
    }

    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            DiscoveryError::Config(_) => "config",
            DiscoveryError::Unreachable { .. } => "unreachable",
            DiscoveryError::Unauthorized { .. } => "unauthorized",
            DiscoveryError::Throttled { .. } => "throttled",
            DiscoveryError::Api { .. } => "api",
            DiscoveryError::Resolve { .. } => "resolve",
        }
    }
}

/// How often the refresh loop runs, and how it backs off.
#[derive(Debug, Clone)]
pub struct Refresh {
    /// `--discovery_refresh`: the pause between successful rounds. Must not be zero.
    pub interval: Duration,
    /// A random delay before the first round, up to this long, so a fleet does not stampede.
    pub initial_jitter: Duration,
    /// The first backoff after a transient error; it doubles up to `interval`.
    pub min_backoff: Duration,
}

impl Default for Refresh {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            initial_jitter: Duration::ZERO,
            min_backoff: Duration::from_millis(500),
        }
    }
}

/// Observes refresh rounds, for metrics.
pub trait RefreshObserver: Send + Sync + fmt::Debug {
    /// Called after every round with its latency and its outcome.
    fn round(&self, latency: Duration, outcome: Result<usize, &DiscoveryError>);
}

/// An observer that ignores everything.
#[derive(Debug, Default)]
pub struct NoObserver;

impl RefreshObserver for NoObserver {
    fn round(&self, _latency: Duration, _outcome: Result<usize, &DiscoveryError>) {}
}

/// A backend counter for `/metrics` (see [`Discover::counters`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// The metric name, without the `_total` suffix, e.g. `node_discovery_multicast_dropped_malformed`.
    pub name: &'static str,
    /// One sentence for `# HELP`.
    pub help: &'static str,
    /// The count since the backend was built.
    pub value: u64,
}

/// A source of peers on one platform.
///
/// The refresh loop calls [`Discover::discover`] (the cheap round) and, until its first
/// complete round, [`Discover::discover_pages`]; `node discover` calls [`Discover::explain`].
pub trait Discover: Send + Sync + 'static {
    /// The `--discovery` value this backend answers to.
    fn name(&self) -> &'static str;

    /// Runs one discovery round: only what the refresh loop needs.
    fn discover(&self) -> BoxFuture<'_, Result<Report, DiscoveryError>>;

    /// Runs one explained round for `node discover`: the candidates and, where the platform
    /// can tell at some extra cost, every entry that was seen and skipped, with the reason.
    /// The default is [`Discover::discover`].
    fn explain(&self) -> BoxFuture<'_, Result<Report, DiscoveryError>> {
        self.discover()
    }

    /// Runs one round like [`Discover::discover`], calling `on_page` with the candidates of
    /// each page as it arrives. Backends that read the platform in pages override it, so
    /// that a starting node can join its first peers after one page. The returned report is
    /// the whole round's, as from `discover`. The default calls `discover` and no page.
    fn discover_pages<'a>(
        &'a self,
        on_page: OnPage<'a>,
    ) -> BoxFuture<'a, Result<Report, DiscoveryError>> {
        let _ = on_page;
        self.discover()
    }

    /// This node's own zone as the platform tells it (EC2 availability zone, GCE zone, the
    /// Kubernetes node's zone label), or `None`. Callers bound it with a short timeout.
    fn local_zone(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async { None })
    }

    /// The backend's own counters, read at scrape time for `/metrics`. The default has none.
    fn counters(&self) -> Vec<Counter> {
        Vec::new()
    }

    /// Publishes candidate sets until every receiver of `tx` is gone.
    ///
    /// The default polls (see [`poll_loop`]); push-based backends (multicast, watches)
    /// override it.
    fn watch(
        self: Arc<Self>,
        refresh: Refresh,
        tx: watch::Sender<Snapshot>,
        observer: Arc<dyn RefreshObserver>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(poll_loop(self, refresh, tx, observer))
    }
}

/// Equal-jitter exponential backoff: each pause is half the current backoff plus a random
/// part of the other half, so retries stay spread out and never come faster than half the
/// backoff; the backoff doubles after each pause, from `min` up to `max`, and [`Backoff::reset`]
/// (after a success) starts again at `min`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff from `min` (at least 1 ms) doubling up to `max` (at least `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        Self {
            min,
            max,
            current: min,
        }
    }

    /// The next pause, in `[current / 2, current]`; then the backoff doubles (up to `max`).
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.current / 2 + jitter(self.current - self.current / 2);
        self.current = self.current.saturating_mul(2).min(self.max);
        pause
    }

    /// The backoff the next pause is drawn from.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// Starts again from `min`, after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// How one call (an API page) is retried within a round: every backend's retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Calls per page, the first included; at least 1.
    pub attempts: u32,
    /// The first backoff; it doubles after each failed attempt (see [`Backoff`]).
    pub min_backoff: Duration,
    /// The largest backoff.
    pub max_backoff: Duration,
}

impl Default for Retry {
    /// 4 attempts, 500 ms doubling to 8 s: a throttled call is tried again after about
    /// 0.4, 0.8 and 1.5 s.
    fn default() -> Self {
        Self {
            attempts: 4,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
        }
    }
}

impl Retry {
    /// Runs `call` until it succeeds, fails with an error `retryable` refuses, or the
    /// attempts are spent; pauses with [`Backoff`] in between and logs each retry as a warning
    /// naming `backend` and `what`. The last error is returned.
    pub async fn run<T, E, F, Fut>(
        &self,
        backend: &'static str,
        what: &str,
        mut call: F,
        retryable: impl Fn(&E) -> bool,
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::error::Error + 'static,
    {
        let mut backoff = Backoff::new(self.min_backoff, self.max_backoff);
        let attempts = self.attempts.max(1);
        let mut attempt = 1;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt >= attempts || !retryable(&e) => return Err(e),
                Err(e) => {
                    let pause = backoff.next_pause();
                    tracing::warn!(
                        backend,
                        attempt,
                        retry_in_ms = pause.as_millis() as u64,
                        "{what} failed, retrying: {}",
                        escape_untrusted(&Chain(&e).to_string())
                    );
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
            }
        }
    }
}

/// Shows an error with its sources, joined by `: ` (a cause whose text repeats the previous
/// one is skipped), for log lines: `DiscoveryError`'s own text leaves its sources out.
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut cur = self.0.source();
        while let Some(s) = cur {
            let text = s.to_string();
            if text != last && !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            cur = s.source();
        }
        Ok(())
    }
}

/// The default refresh loop: poll, publish on success, back off with jitter on failure.
///
/// Until a round has completed, the loop runs [`Discover::discover_pages`] and publishes each
/// page's candidates at once, added to what is already published (with `refreshes` still 0),
/// so a node joins its first peers after one page. Every complete round replaces the set.
/// A failed round keeps the last good (or partial) set published. The loop ends when `tx` has
/// no receivers.
pub async fn poll_loop<D: Discover + ?Sized>(
    backend: Arc<D>,
    refresh: Refresh,
    tx: watch::Sender<Snapshot>,
    observer: Arc<dyn RefreshObserver>,
) {
    let interval = refresh.interval.max(Duration::from_millis(10));
    if !refresh.initial_jitter.is_zero() {
        tokio::time::sleep(jitter(refresh.initial_jitter)).await;
    }
    let mut backoff = Backoff::new(refresh.min_backoff.max(Duration::from_millis(10)), interval);
    let mut refreshes = 0u64;
    loop {
        if tx.is_closed() {
            return;
        }
        let started = Instant::now();
        let result = if refreshes == 0 {
            let on_page = |page: &[Candidate]| publish_page(&tx, page);
            backend.discover_pages(&on_page).await
        } else {
            backend.discover().await
        };
        let pause = match result {
            Ok(report) => {
                observer.round(started.elapsed(), Ok(report.candidates.len()));
                refreshes += 1;
                backoff.reset();
                tx.send_replace(Snapshot {
                    candidates: report.candidates,
                    refreshes,
                });
                interval.mul_f64(rand::rng().random_range(0.9..1.1))
            }
            Err(err) => {
                observer.round(started.elapsed(), Err(&err));
                let text = escape_untrusted(&Chain(&err).to_string());
                if err.is_transient() {
                    let pause = backoff.next_pause();
                    tracing::warn!(
                        backend = backend.name(),
                        kind = err.kind(),
                        retry_in_ms = pause.as_millis() as u64,
                        "discovery failed, keeping the last good candidate set: {text}"
                    );
                    pause
                } else {
                    tracing::error!(
                        backend = backend.name(),
                        kind = err.kind(),
                        "discovery failed, keeping the last good candidate set: {text}"
                    );
                    interval
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = tx.closed() => return,
        }
    }
}

/// Adds one page's candidates to the published set before the first complete round; the
/// receivers are woken only when the page added someone. Backends that override
/// [`Discover::watch`] use it for the pages of their first listing.
pub fn publish_page(tx: &watch::Sender<Snapshot>, page: &[Candidate]) {
    tx.send_if_modified(|snap| {
        let before = snap.candidates.len();
        for c in page {
            if !snap
                .candidates
                .iter()
                .any(|k| k.ip == c.ip && k.port == c.port)
            {
                snap.candidates.push(c.clone());
            }
        }
        snap.candidates.len() != before
    });
}

/// Escapes text from the network for a log line or a terminal. Control characters (newlines,
/// the ESC of terminal sequences), backslashes and invisible bidirectional or zero-width marks
/// become Rust escapes (`\n`, `\u{1b}`), so one value cannot forge or hide a line; other text
/// is kept as it is.
pub fn escape_untrusted(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' | '\n' | '\r' | '\t' => out.extend(c.escape_default()),
            c if c.is_control()
                || matches!(
                    c,
                    '\u{200b}'..='\u{200f}'
                        | '\u{2028}'..='\u{202e}'
                        | '\u{2066}'..='\u{2069}'
                        | '\u{feff}'
                ) =>
            {
                out.extend(c.escape_unicode())
            }
            c => out.push(c),
        }
    }
    out
}

/// A uniformly random duration in `[0, max]` ("full jitter").
pub fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return max;
    }
    max.mul_f64(rand::rng().random_range(0.0..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_ordinary_text_and_escapes_the_rest() {
        assert_eq!(escape_untrusted("blue-prod_1 ünï"), "blue-prod_1 ünï");
        assert_eq!(escape_untrusted("a\\n\r\0\u{7f}"), r"a\\n\r\u{0}\u{7f}");
        assert_eq!(escape_untrusted("\u{200b}\u{2066}"), r"\u{200b}\u{2066}");
    }
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ctx() -> Context {
        Context::standalone(
            "default",
            Role::Worker,
            "10.0.0.5".parse().unwrap(),
            8081,
            Some("10.0.0.0/24".parse().unwrap()),
        )
    }

    #[test]
    fn classify_excludes_self_and_addresses_outside_the_selector() {
        let c = ctx();
        assert_eq!(
            c.classify("a", "10.0.0.5".parse().unwrap(), 8081)
                .unwrap_err()
                .reason,
            "self"
        );
        assert!(
            c.classify("b", "10.0.1.5".parse().unwrap(), 8081)
                .unwrap_err()
                .reason
                .contains("outside --private_ip_selector 10.0.0.0/24")
        );
        let ok = c.classify("c", "10.0.0.6".parse().unwrap(), 8081).unwrap();
        assert_eq!(ok.ip, "10.0.0.6".parse::<IpAddr>().unwrap());
        // The same IP on another port is a different node.
        assert!(c.classify("d", "10.0.0.5".parse().unwrap(), 9081).is_ok());
    }

    #[test]
    fn transient_errors_are_the_ones_worth_retrying() {
        assert!(
            DiscoveryError::Throttled {
                backend: "aws",
                message: "x".into()
            }
            .is_transient()
        );
        assert!(
            !DiscoveryError::Unauthorized {
                backend: "aws",
                message: "x".into()
            }
            .is_transient()
        );
        assert!(!DiscoveryError::Config("x".into()).is_transient());
    }

    /// Succeeds once, then fails transiently forever.
    #[derive(Debug)]
    struct Flaky {
        calls: AtomicUsize,
    }

    impl Discover for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn discover(&self) -> BoxFuture<'_, Result<Report, DiscoveryError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n == 0 {
                    Ok(Report {
                        candidates: vec![Candidate::new("10.0.0.7".parse().unwrap(), 8081)],
                        excluded: vec![],
                    })
                } else {
                    Err(DiscoveryError::Throttled {
                        backend: "flaky",
                        message: "slow down".into(),
                    })
                }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_keep_the_last_good_set_and_back_off() {
        let backend = Arc::new(Flaky {
            calls: AtomicUsize::new(0),
        });
        let (tx, mut rx) = watch::channel(Snapshot::default());
        let refresh = Refresh {
            interval: Duration::from_secs(10),
            initial_jitter: Duration::ZERO,
            min_backoff: Duration::from_millis(500),
        };
        let task = tokio::spawn(backend.clone().watch(refresh, tx, Arc::new(NoObserver)));
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().candidates.len(), 1);
        // Two minutes of failures with backoff capped at the interval: each pause is between
        // half and all of the backoff, so 13 to 30 calls, and the set stays.
        tokio::time::sleep(Duration::from_secs(120)).await;
        let calls = backend.calls.load(Ordering::SeqCst);
        assert!((13..=30).contains(&calls), "calls = {calls}");
        assert_eq!(rx.borrow().candidates.len(), 1);
        assert_eq!(rx.borrow().refreshes, 1);
        drop(rx);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(task.is_finished(), "the loop must end when no one listens");
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_host_is_self_by_any_of_its_addresses() {
        let c = ctx();
        // Another port does not matter: a cloud host holding our IP is this node.
        let x = c
            .classify_host("i-me", &[ip("10.0.0.9"), ip("10.0.0.5")], 9999)
            .unwrap_err();
        assert_eq!((x.id.as_str(), x.reason.as_str()), ("i-me", "self"));
    }

    #[test]
    fn a_host_is_its_lowest_address_inside_the_selector() {
        let c = ctx();
        let ok = c
            .classify_host(
                "i-two",
                &[
                    ip("192.168.0.2"),
                    ip("10.0.0.9"),
                    ip("10.0.0.7"),
                    ip("10.0.1.1"),
                ],
                8081,
            )
            .unwrap();
        assert_eq!(ok.ip, ip("10.0.0.7"));
        assert_eq!(ok.id.as_deref(), Some("i-two"));
        assert_eq!((ok.port, ok.role, ok.zone.as_deref()), (8081, None, None));
    }

    #[test]
    fn a_host_outside_the_selector_or_the_family_is_explained() {
        let c = ctx();
        let x = c
            .classify_host("i-far", &[ip("192.168.0.9"), ip("fd00::9")], 8081)
            .unwrap_err();
        assert_eq!(
            x.reason,
            "no IPv4 address inside --private_ip_selector 10.0.0.0/24 (has 192.168.0.9, fd00::9)"
        );
        let x = c.classify_host("i-bare", &[], 8081).unwrap_err();
        assert_eq!(x.reason, "no private address");
        // A host with a thousand addresses gets a bounded reason.
        let many: Vec<IpAddr> = (0..1000u32)
            .map(|i| IpAddr::from([172, 16, (i >> 8) as u8, i as u8]))
            .collect();
        let x = c.classify_host("i-many", &many, 8081).unwrap_err();
        assert!(x.reason.ends_with("and 992 more)"), "{}", x.reason);
        assert!(x.reason.len() < 200, "{}", x.reason);
    }

    #[test]
    fn an_ipv6_node_picks_the_ipv6_address_of_a_dual_stack_host() {
        let v6 = Context::standalone("default", Role::Worker, ip("fd00::5"), 8081, None);
        let ok = v6
            .classify_host(
                "i-dual",
                &[ip("10.0.0.7"), ip("fd00::7"), ip("fd00::6")],
                8081,
            )
            .unwrap();
        assert_eq!(ok.ip, ip("fd00::6"));
        let v4 = Context::standalone("default", Role::Worker, ip("10.0.0.5"), 8081, None);
        let ok = v4
            .classify_host("i-dual", &[ip("fd00::7"), ip("10.0.0.7")], 8081)
            .unwrap();
        assert_eq!(ok.ip, ip("10.0.0.7"));
        let x = v6
            .classify_host("i-v4", &[ip("10.0.0.7")], 8081)
            .unwrap_err();
        assert_eq!(x.reason, "no IPv6 address (has 10.0.0.7)");
    }

    #[test]
    fn backoff_pauses_stay_within_half_and_all_of_a_doubling_backoff() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000));
        let mut expected = ms(100);
        for _ in 0..200 {
            assert_eq!(b.current(), expected);
            let p = b.next_pause();
            assert!(p >= expected / 2 && p <= expected, "{p:?} for {expected:?}");
            expected = (expected * 2).min(ms(1000));
        }
        assert_eq!(b.current(), ms(1000));
        b.reset();
        assert_eq!(b.current(), ms(100));
        // Degenerate bounds are lifted: a zero minimum is 1 ms, a maximum below it is the minimum.
        let mut z = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!(z.next_pause() <= ms(1));
        assert_eq!(z.current(), ms(1));
        // The pauses are spread, not constant.
        let mut spread = Backoff::new(ms(1000), ms(1000));
        let pauses: std::collections::HashSet<Duration> =
            (0..20).map(|_| spread.next_pause()).collect();
        assert!(pauses.len() > 1);
    }

    #[derive(Debug, thiserror::Error)]
    #[error("call failed ({0})")]
    struct CallError(&'static str);

    /// Runs `retry` over calls whose `n`th answer is `answer(n)`; returns the result and the
    /// number of calls. Only "transient" errors are retried.
    async fn run_calls(
        retry: &Retry,
        answer: fn(usize) -> Result<usize, CallError>,
    ) -> (Result<usize, CallError>, usize) {
        let calls = AtomicUsize::new(0);
        let r = retry
            .run(
                "test",
                "Call",
                || {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    async move { answer(n) }
                },
                |e| e.0 == "transient",
            )
            .await;
        (r, calls.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_attempts_or_at_a_permanent_error() {
        let retry = Retry {
            attempts: 3,
            min_backoff: Duration::from_millis(400),
            max_backoff: Duration::from_secs(1),
        };
        let started = tokio::time::Instant::now();
        let (r, calls) = run_calls(&retry, |_| Err(CallError("transient"))).await;
        assert_eq!((r.unwrap_err().0, calls), ("transient", 3));
        // Two pauses: 200..=400 ms, then 400..=800 ms.
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(600) && waited <= Duration::from_millis(1200),
            "{waited:?}"
        );
        let (r, calls) = run_calls(&retry, |_| Err(CallError("denied"))).await;
        assert_eq!((r.unwrap_err().0, calls), ("denied", 1));
        let (r, calls) = run_calls(&retry, |n| {
            if n == 0 {
                Err(CallError("transient"))
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!((r.unwrap(), calls), (1, 2));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("bad --x_flag: {reason}")]
    struct FlagError {
        reason: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn a_config_error_keeps_the_backend_error_and_its_sources() {
        let e = DiscoveryError::Config(Box::new(FlagError {
            reason: "unreadable",
            source: std::io::Error::other("permission denied"),
        }));
        assert_eq!(e.to_string(), "bad --x_flag: unreadable");
        assert_eq!(
            std::error::Error::source(&e).unwrap().to_string(),
            "permission denied"
        );
        assert_eq!(
            Chain(&e).to_string(),
            "bad --x_flag: unreadable: permission denied"
        );
        assert!(!e.is_transient());
        assert_eq!(e.kind(), "config");
        let plain = DiscoveryError::Config("use --y".into());
        assert_eq!(Chain(&plain).to_string(), "use --y");
        // A cause that the message already ends with is not repeated.
        let dup = DiscoveryError::Resolve {
            name: "db".into(),
            source: std::io::Error::other("no such host"),
        };
        assert_eq!(Chain(&dup).to_string(), "cannot resolve db: no such host");
    }

    /// Pages through three pages with a pause after each, then fails every later round.
    #[derive(Debug)]
    struct Pager {
        page_rounds: AtomicUsize,
        plain_rounds: AtomicUsize,
    }

    fn page(n: u8) -> Vec<Candidate> {
        vec![
            Candidate::new(IpAddr::from([10, 0, n, 1]), 8081),
            Candidate::new(IpAddr::from([10, 0, n, 2]), 8081),
        ]
    }

    impl Discover for Pager {
        fn name(&self) -> &'static str {
            "pager"
        }
        fn discover(&self) -> BoxFuture<'_, Result<Report, DiscoveryError>> {
            self.plain_rounds.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {
                Ok(Report {
                    candidates: page(9),
                    excluded: vec![],
                })
            })
        }
        fn discover_pages<'a>(
            &'a self,
            on_page: OnPage<'a>,
        ) -> BoxFuture<'a, Result<Report, DiscoveryError>> {
            let round = self.page_rounds.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                let mut all = Vec::new();
                for n in 0..3 {
                    if round == 0 && n == 2 {
                        // The first round fails on its last page.
                        return Err(DiscoveryError::Throttled {
                            backend: "pager",
                            message: "slow down".into(),
                        });
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    on_page(&page(n));
                    all.extend(page(n));
                }
                Ok(Report {
                    candidates: all,
                    excluded: vec![],
                })
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pages_are_published_as_they_arrive_until_a_round_completes() {
        let backend = Arc::new(Pager {
            page_rounds: AtomicUsize::new(0),
            plain_rounds: AtomicUsize::new(0),
        });
        let (tx, rx) = watch::channel(Snapshot::default());
        let refresh = Refresh {
            interval: Duration::from_secs(10),
            initial_jitter: Duration::ZERO,
            min_backoff: Duration::from_secs(4),
        };
        let _task = tokio::spawn(backend.clone().watch(refresh, tx, Arc::new(NoObserver)));
        let ips = |rx: &watch::Receiver<Snapshot>| -> Vec<IpAddr> {
            rx.borrow().candidates.iter().map(|c| c.ip).collect()
        };
        // After one page (1 s), its candidates are out, before the round has completed.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(ips(&rx), vec![ip("10.0.0.1"), ip("10.0.0.2")]);
        assert_eq!(rx.borrow().refreshes, 0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(rx.borrow().candidates.len(), 4);
        // The round fails on its third page: the partial set stays, and the retry (after
        // 2 to 4 s) pages again, adding to it; nothing is published twice.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(backend.page_rounds.load(Ordering::SeqCst), 2);
        assert_eq!(rx.borrow().candidates.len(), 4);
        assert_eq!(rx.borrow().refreshes, 0);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(rx.borrow().refreshes, 1);
        assert_eq!(rx.borrow().candidates.len(), 6);
        // Later rounds are plain rounds that replace the set at their end.
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!(backend.page_rounds.load(Ordering::SeqCst), 2);
        assert_eq!(backend.plain_rounds.load(Ordering::SeqCst), 1);
        assert_eq!(ips(&rx), vec![ip("10.0.9.1"), ip("10.0.9.2")]);
        assert_eq!(rx.borrow().refreshes, 2);
    }

    /// Counts how often receivers are woken.
    #[tokio::test]
    async fn a_page_that_adds_no_one_wakes_no_one() {
        let (tx, mut rx) = watch::channel(Snapshot::default());
        publish_page(&tx, &page(0));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        publish_page(&tx, &page(0));
        publish_page(&tx, &[]);
        assert!(!rx.has_changed().unwrap());
        publish_page(&tx, &page(1)[..1]);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow().candidates.len(), 3);
    }

    #[test]
    fn the_defaults_have_no_zone_and_no_counters() {
        let f = Flaky {
            calls: AtomicUsize::new(0),
        };
        assert!(f.counters().is_empty());
        let zone = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f.local_zone());
        assert_eq!(zone, None);
    }
}
