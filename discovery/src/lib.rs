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
    /// The peer's role, when the platform tells it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
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
}

/// Why discovery failed. Every variant says what to change, and [`DiscoveryError::is_transient`]
/// says whether a retry may help.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The flags do not describe a usable backend configuration.
    #[error("invalid discovery configuration: {0}")]
    Config(String),
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

/// A source of peers on one platform.
pub trait Discover: Send + Sync + 'static {
    /// The `--discovery` value this backend answers to.
    fn name(&self) -> &'static str;

    /// Runs one discovery round.
    fn discover(&self) -> BoxFuture<'_, Result<Report, DiscoveryError>>;

    /// Publishes candidate sets until every receiver of `tx` is gone.
    ///
    /// The default polls [`Discover::discover`]; push-based backends (multicast, watches)
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

/// The default refresh loop: poll, publish on success, back off with jitter on failure.
///
/// A failed round keeps the last good set published. The loop ends when `tx` has no receivers.
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
    let mut backoff = refresh.min_backoff.max(Duration::from_millis(10));
    let mut refreshes = 0u64;
    loop {
        if tx.is_closed() {
            return;
        }
        let started = Instant::now();
        let pause = match backend.discover().await {
            Ok(report) => {
                observer.round(started.elapsed(), Ok(report.candidates.len()));
                refreshes += 1;
                backoff = refresh.min_backoff.max(Duration::from_millis(10));
                tx.send_replace(Snapshot {
                    candidates: report.candidates,
                    refreshes,
                });
                interval.mul_f64(rand::rng().random_range(0.9..1.1))
            }
            Err(err) => {
                observer.round(started.elapsed(), Err(&err));
                if err.is_transient() {
                    // "Equal jitter": at least half the backoff, so retries stay spaced out.
                    let pause = backoff / 2 + jitter(backoff / 2);
                    tracing::warn!(
                        backend = backend.name(),
                        kind = err.kind(),
                        retry_in_ms = pause.as_millis() as u64,
                        "discovery failed, keeping the last good candidate set: {}",
                        escape_untrusted(&err.to_string())
                    );
                    backoff = (backoff * 2).min(interval);
                    pause
                } else {
                    tracing::error!(
                        backend = backend.name(),
                        kind = err.kind(),
                        "discovery failed, keeping the last good candidate set: {}",
                        escape_untrusted(&err.to_string())
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
                        candidates: vec![Candidate {
                            ip: "10.0.0.7".parse().unwrap(),
                            port: 8081,
                            id: None,
                            role: None,
                        }],
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
}
