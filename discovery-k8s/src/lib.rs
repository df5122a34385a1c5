//! Kubernetes discovery: pods by label selector, or a Service's EndpointSlices, through kube-rs.
//!
//! One round lists the objects page by page (`limit`/`continue`). The long-running
//! [`Discover::watch`] lists once, then follows a watch from the list's `resourceVersion`, so a
//! pod change reaches the candidate set as soon as the API server streams it. When the watch
//! fails (network, `410 Gone`, no `watch` permission) it lists again after a jittered backoff,
//! which degrades to a periodic list at `--discovery_refresh`; `410`s in a row back off too. A
//! failure never clears the published set. The first list publishes each page as it arrives,
//! so a starting node joins its first peers after one page.
//!
//! Zones: a pod's zone is its node's `topology.kubernetes.io/zone`, read with `GET` on the
//! node (cluster-scoped, so it needs a ClusterRole) and cached. When nodes may not be read
//! (403), that is logged once at info and candidates carry no zone; discovery goes on.
//! [`Discover::local_zone`] reads this pod (`POD_NAME` or `HOSTNAME`) and then its node.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use discovery::{
    Backoff, BoxFuture, Context, Discover, DiscoveryError, OnPage, Refresh, RefreshObserver,
    Report, Snapshot, escape_untrusted, jitter,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{OnceCell, watch};

pub mod classify;
pub mod config;

pub use classify::NodeZones;
pub use config::{ConfigEnv, ConfigSource};

const BACKEND: &str = "k8s";
/// How long the API server keeps one watch open before we re-watch.
const WATCH_TIMEOUT_SECS: u32 = 290;
/// The longest one list request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The most pages one list may have, so a misbehaving server cannot loop us forever.
const MAX_PAGES: usize = 10_000;
/// The longest pause before listing again after `410 Gone` (and at most `--discovery_refresh`).
const GONE_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// The longest one `GET` of a node or of this pod may take.
const GET_TIMEOUT: Duration = Duration::from_secs(5);
/// How many nodes are read at once.
const NODE_READS_IN_FLIGHT: usize = 8;
/// The most nodes one report reads; the others wait for the next report.
const MAX_NODE_READS: usize = 1000;
/// The most nodes whose zone is cached; the cache starts over beyond it.
const MAX_CACHED_NODES: usize = 10_000;
/// How long nodes are not asked again after a 403.
const NODES_DENIED_FOR: Duration = Duration::from_secs(600);
/// The RBAC rule that reading node zones needs.
const NODES_RULE: &str =
    "ClusterRole rule {apiGroups: [\"\"], resources: [\"nodes\"], verbs: [\"get\", \"list\"]}";

/// Why the Kubernetes backend cannot be configured.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// The flags do not describe what to discover.
    #[error("{0}")]
    Flags(String),
    /// `KUBERNETES_SERVICE_HOST` is not set.
    #[error("not running in a pod: KUBERNETES_SERVICE_HOST is not set")]
    NotInCluster,
    /// `KUBERNETES_SERVICE_PORT` is not a port number.
    #[error("KUBERNETES_SERVICE_PORT `{0}` is not a port number")]
    BadServicePort(String),
    /// A service account file is missing or unreadable.
    #[error(
        "cannot read the service account {what} at {path}: {source} (is automountServiceAccountToken disabled?)"
    )]
    ServiceAccountFile {
        /// Which file.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Neither `KUBECONFIG` nor `HOME` is set.
    #[error("no kubeconfig: neither KUBECONFIG nor HOME is set")]
    NoKubeconfig,
    /// A kubeconfig file cannot be read or parsed.
    #[error("cannot load the kubeconfig {path}: {source}")]
    KubeconfigFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// A kubeconfig is unusable.
    #[error("unusable kubeconfig: {0}")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    /// Every way of configuring the client failed; both causes are kept.
    #[error(
        "no kubernetes configuration found. in-cluster: {in_cluster}. kubeconfig: {kubeconfig}. Run the node in a pod with a service account, or set KUBECONFIG"
    )]
    NoConfig {
        /// Why the in-cluster configuration failed.
        #[source]
        in_cluster: Box<K8sError>,
        /// Why the kubeconfig failed.
        kubeconfig: Box<K8sError>,
    },
    /// The client could not be built from the configuration.
    #[error("cannot build the kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

impl From<K8sError> for DiscoveryError {
    fn from(e: K8sError) -> Self {
        DiscoveryError::Config(Box::new(e))
    }
}

/// What to discover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Pods matching a label selector.
    Labels(String),
    /// The endpoints of a Service, from its EndpointSlices.
    Service(String),
}

/// The backend's settings, from the `--k8s_*` flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--k8s_namespace`; `None` means the service account's (or the kubeconfig context's).
    pub namespace: Option<String>,
    /// Pods or a Service.
    pub source: Source,
    /// `--k8s_include_not_ready`.
    pub include_not_ready: bool,
    /// How many objects one list page asks for.
    pub page_size: u32,
}

impl Settings {
    /// Validates the flag combination.
    pub fn from_flags(
        namespace: Option<String>,
        label_selector: Option<String>,
        service_name: Option<String>,
        include_not_ready: bool,
    ) -> Result<Self, K8sError> {
        let label_selector = label_selector.filter(|s| !s.trim().is_empty());
        let service_name = service_name.filter(|s| !s.trim().is_empty());
        let source = match (label_selector, service_name) {
            (Some(_), Some(_)) => {
                return Err(K8sError::Flags(
                    "--k8s_label_selector and --k8s_service_name are alternatives: give one".into(),
                ));
            }
            (None, None) => {
                return Err(K8sError::Flags(
                    "--discovery=k8s needs --k8s_label_selector (e.g. app=build-cluster) or --k8s_service_name (a Service whose EndpointSlices list the peers)".into(),
                ));
            }
            (Some(s), None) => Source::Labels(s.trim().to_owned()),
            (None, Some(s)) => Source::Service(s.trim().to_owned()),
        };
        if let Some(ns) = &namespace
            && !valid_dns_label(ns)
        {
            return Err(K8sError::Flags(format!(
                "--k8s_namespace `{ns}` is not a valid namespace name (lowercase letters, digits and '-', at most 63)"
            )));
        }
        Ok(Self {
            namespace: namespace.filter(|n| !n.is_empty()),
            source,
            include_not_ready,
            page_size: 500,
        })
    }
}

/// Whether `s` is a valid object name (a DNS subdomain: at most 253 of lowercase letters,
/// digits, `-` and `.`), so it can go into a request path as it is.
fn valid_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn valid_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A kind of object the backend lists and watches.
trait Kind:
    Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    /// The RBAC rule that reading this kind needs.
    const RULE: &'static str;
    fn report<'a>(
        ctx: &Context,
        include_not_ready: bool,
        zones: &NodeZones,
        items: impl Iterator<Item = &'a Self>,
    ) -> Report;
    /// The nodes whose zone this object's candidates need.
    fn nodes(&self) -> impl Iterator<Item = &str>;
}

impl Kind for Pod {
    const RULE: &'static str =
        "apiGroups: [\"\"], resources: [\"pods\"], verbs: [\"get\", \"list\", \"watch\"]";
    fn report<'a>(
        ctx: &Context,
        include_not_ready: bool,
        zones: &NodeZones,
        items: impl Iterator<Item = &'a Self>,
    ) -> Report {
        classify::pods(ctx, include_not_ready, zones, items)
    }
    fn nodes(&self) -> impl Iterator<Item = &str> {
        self.spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .into_iter()
    }
}

impl Kind for EndpointSlice {
    const RULE: &'static str = "apiGroups: [\"discovery.k8s.io\"], resources: [\"endpointslices\"], verbs: [\"get\", \"list\", \"watch\"]";
    fn report<'a>(
        ctx: &Context,
        include_not_ready: bool,
        zones: &NodeZones,
        items: impl Iterator<Item = &'a Self>,
    ) -> Report {
        classify::endpoint_slices(ctx, include_not_ready, zones, items)
    }
    /// Only endpoints without a `zone` of their own need their node.
    fn nodes(&self) -> impl Iterator<Item = &str> {
        self.endpoints
            .iter()
            .filter(|e| e.zone.is_none())
            .filter_map(|e| e.node_name.as_deref())
    }
}

/// What is known of node zones.
#[derive(Debug, Default)]
struct ZoneCache {
    /// Node name to its zone label; `None` when the node has none or is gone.
    known: HashMap<String, Option<String>>,
    /// Nodes were refused (403) and are not asked again before this.
    denied_until: Option<Instant>,
    /// The refusal was logged.
    told: bool,
}

struct Connected {
    client: kube::Client,
    namespace: String,
}

impl Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connected")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// Discovery through the Kubernetes API.
#[derive(Debug)]
pub struct K8sDiscovery {
    settings: Settings,
    env: ConfigEnv,
    ctx: Context,
    connected: OnceCell<Connected>,
    zones: Mutex<ZoneCache>,
}

/// The objects one list or watch holds, by name.
type Objects<K> = BTreeMap<String, K>;

/// How one watch ended.
enum WatchEnd {
    /// Every receiver is gone.
    Closed,
    /// The resource version is too old; list again soon. `progressed` is set when a watch
    /// delivered events or ran its course first, so the server is healthy and the relist
    /// backoff starts over.
    Gone { progressed: bool },
    /// The watch failed; back off, then list again.
    Failed(DiscoveryError),
}

impl K8sDiscovery {
    /// The backend; the client is configured on first use, from `env`.
    pub fn new(settings: Settings, env: ConfigEnv, ctx: Context) -> Arc<Self> {
        Arc::new(Self {
            settings,
            env,
            ctx,
            connected: OnceCell::new(),
            zones: Mutex::new(ZoneCache::default()),
        })
    }

    /// A backend that uses an already configured client, for tests and embedders.
    pub fn with_config(
        settings: Settings,
        config: kube::Config,
        ctx: Context,
    ) -> Result<Arc<Self>, K8sError> {
        let namespace = settings
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config).map_err(K8sError::Client)?;
        Ok(Arc::new(Self {
            settings,
            env: ConfigEnv::default(),
            ctx,
            connected: OnceCell::new_with(Some(Connected { client, namespace })),
            zones: Mutex::new(ZoneCache::default()),
        }))
    }

    async fn connected(&self) -> Result<&Connected, DiscoveryError> {
        self.connected
            .get_or_try_init(|| async {
                let (config, source) = config::infer(&self.env).await?;
                let namespace = self
                    .settings
                    .namespace
                    .clone()
                    .unwrap_or_else(|| config.default_namespace.clone());
                tracing::info!(
                    source = ?source,
                    server = %config.cluster_url,
                    namespace = %namespace,
                    "kubernetes client configured"
                );
                let client = kube::Client::try_from(config).map_err(K8sError::Client)?;
                Ok::<_, DiscoveryError>(Connected { client, namespace })
            })
            .await
    }

    fn selector(&self) -> String {
        match &self.settings.source {
            Source::Labels(s) => s.clone(),
            Source::Service(name) => format!("kubernetes.io/service-name={name}"),
        }
    }

    fn api_error<K: Kind>(&self, namespace: &str, e: kube::Error) -> DiscoveryError {
        map_error(e, K::plural(&()).as_ref(), K::RULE, namespace)
    }

    /// Lists every matching object, page by page; returns them and the list's resourceVersion.
    /// Each page's candidates go to `on_page` as the page arrives.
    async fn list_all<K: Kind>(
        &self,
        on_page: Option<OnPage<'_>>,
    ) -> Result<(Objects<K>, String), DiscoveryError> {
        let conn = self.connected().await?;
        let api: Api<K> = Api::namespaced(conn.client.clone(), &conn.namespace);
        let mut params = ListParams::default()
            .labels(&self.selector())
            .limit(self.settings.page_size);
        let mut objects = Objects::new();
        for _ in 0..MAX_PAGES {
            let page = match tokio::time::timeout(REQUEST_TIMEOUT, api.list(&params)).await {
                Ok(r) => r.map_err(|e| self.api_error::<K>(&conn.namespace, e))?,
                Err(_) => {
                    return Err(DiscoveryError::Unreachable {
                        backend: BACKEND,
                        message: format!(
                            "listing {} took longer than {} s",
                            K::plural(&()),
                            REQUEST_TIMEOUT.as_secs()
                        ),
                        source: None,
                    });
                }
            };
            if let Some(f) = on_page {
                let report = self.report(page.items.iter()).await;
                if !report.candidates.is_empty() {
                    f(&report.candidates);
                }
            }
            for item in page.items {
                let name = item.meta().name.clone().unwrap_or_default();
                objects.insert(name, item);
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => {
                    let rv = page.metadata.resource_version.unwrap_or_default();
                    return Ok((objects, rv));
                }
            }
        }
        Err(DiscoveryError::Api {
            backend: BACKEND,
            message: format!("the list did not end after {MAX_PAGES} pages"),
            transient: true,
        })
    }

    /// Sorts objects into candidates and exclusions, with the zones of their nodes.
    async fn report<'a, K: Kind>(&self, items: impl Iterator<Item = &'a K> + Clone) -> Report {
        let zones = self.node_zones(items.clone().flat_map(|o| o.nodes())).await;
        K::report(&self.ctx, self.settings.include_not_ready, &zones, items)
    }

    /// The zones of `nodes`, from the cache or read from the API (`GET` per node, a few at a
    /// time). A 403 is logged once; nodes are then not asked again for a while.
    async fn node_zones<'a>(&self, nodes: impl Iterator<Item = &'a str>) -> NodeZones {
        // A name that is not a node name is never read (it would go into the request path).
        let mut wanted: Vec<&str> = nodes.filter(|n| valid_object_name(n)).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let missing: Vec<String> = {
            let cache = self.zones.lock().unwrap_or_else(|p| p.into_inner());
            let denied = cache.denied_until.is_some_and(|t| Instant::now() < t);
            if denied {
                Vec::new()
            } else {
                wanted
                    .iter()
                    .filter(|n| !cache.known.contains_key(**n))
                    .take(MAX_NODE_READS)
                    .map(|n| n.to_string())
                    .collect()
            }
        };
        if !missing.is_empty() {
            self.read_nodes(missing).await;
        }
        let cache = self.zones.lock().unwrap_or_else(|p| p.into_inner());
        wanted
            .into_iter()
            .filter_map(|n| Some((n.to_owned(), cache.known.get(n)?.clone()?)))
            .collect()
    }

    /// Reads the zone labels of `nodes` into the cache. The first node is read alone, so a
    /// service account that may not read nodes costs one request, not one per node.
    async fn read_nodes(&self, nodes: Vec<String>) {
        let Ok(conn) = self.connected().await else {
            return;
        };
        let api: Api<Node> = Api::all(conn.client.clone());
        let read = |name: String| {
            let api = api.clone();
            async move {
                let got = tokio::time::timeout(GET_TIMEOUT, api.get_opt(&name)).await;
                (name, got)
            }
        };
        let mut rest = nodes.into_iter();
        let Some(first) = rest.next() else { return };
        let first = read(first).await;
        if !self.note_node(first) {
            return;
        }
        let mut reads = futures::stream::iter(rest)
            .map(read)
            .buffer_unordered(NODE_READS_IN_FLIGHT);
        while let Some(r) = reads.next().await {
            if !self.note_node(r) {
                return;
            }
        }
    }

    /// Records one node read; false when nodes may not be read (stop asking).
    fn note_node(
        &self,
        (name, got): (
            String,
            Result<Result<Option<Node>, kube::Error>, tokio::time::error::Elapsed>,
        ),
    ) -> bool {
        let mut cache = self.zones.lock().unwrap_or_else(|p| p.into_inner());
        let zone = match got {
            Ok(Ok(Some(node))) => node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(classify::ZONE_LABEL))
                .and_then(|z| classify::clean_zone(z)),
            // The node is gone; its pods will be too.
            Ok(Ok(None)) => None,
            Ok(Err(kube::Error::Api(status))) if status.code == 401 || status.code == 403 => {
                cache.denied_until = Some(Instant::now() + NODES_DENIED_FOR);
                if !cache.told {
                    cache.told = true;
                    tracing::info!(
                        backend = BACKEND,
                        "cannot read nodes ({} {}), so candidates carry no zone; discovery goes on. To add zones, bind a {NODES_RULE} to the node's service account (see deploy/k8s/rbac.yaml)",
                        status.code,
                        escape_untrusted(&status.message)
                    );
                }
                return false;
            }
            Ok(Err(e)) => {
                tracing::debug!(
                    backend = BACKEND,
                    "reading node {} failed: {}",
                    escape_untrusted(&name),
                    escape_untrusted(&discovery::Chain(&e).to_string())
                );
                return true;
            }
            Err(_) => {
                tracing::debug!(
                    backend = BACKEND,
                    "reading node {} timed out",
                    escape_untrusted(&name)
                );
                return true;
            }
        };
        if cache.known.len() >= MAX_CACHED_NODES {
            cache.known.clear();
        }
        cache.known.insert(name, zone);
        cache.denied_until = None;
        true
    }

    /// This pod's node's zone: `GET` on this pod (named by `POD_NAME` or `HOSTNAME`), then its
    /// node's zone label.
    async fn own_zone(&self) -> Result<Option<String>, String> {
        let Some(name) = self.env.pod_name.as_deref() else {
            return Err("neither POD_NAME nor HOSTNAME names this pod".into());
        };
        if !valid_object_name(name) {
            return Err(format!(
                "`{}` (POD_NAME, else HOSTNAME) is not a pod name; set POD_NAME from the downward API's metadata.name",
                name.chars().take(64).collect::<String>()
            ));
        }
        let conn = self
            .connected()
            .await
            .map_err(|e| discovery::Chain(&e).to_string())?;
        let api: Api<Pod> = Api::namespaced(conn.client.clone(), &conn.namespace);
        let pod = match tokio::time::timeout(GET_TIMEOUT, api.get_opt(name)).await {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => {
                return Err(format!(
                    "no pod {name} in namespace {} (set POD_NAME from the downward API's metadata.name)",
                    conn.namespace
                ));
            }
            Ok(Err(e)) => return Err(format!("reading pod {name}: {}", discovery::Chain(&e))),
            Err(_) => return Err(format!("reading pod {name} timed out")),
        };
        let Some(node) = pod.spec.and_then(|s| s.node_name) else {
            return Err(format!("pod {name} is not scheduled on a node yet"));
        };
        Ok(self
            .node_zones(std::iter::once(node.as_str()))
            .await
            .remove(&node))
    }

    async fn discover_kind<K: Kind>(
        &self,
        on_page: Option<OnPage<'_>>,
    ) -> Result<Report, DiscoveryError> {
        let (objects, _) = self.list_all::<K>(on_page).await?;
        Ok(self.report(objects.values()).await)
    }

    /// Follows a watch from `rv`, applying events to `objects` and publishing changed sets.
    async fn follow<K: Kind>(
        &self,
        objects: &mut Objects<K>,
        mut rv: String,
        tx: &watch::Sender<Snapshot>,
        refreshes: &mut u64,
    ) -> WatchEnd {
        let conn = match self.connected().await {
            Ok(c) => c,
            Err(e) => return WatchEnd::Failed(e),
        };
        let api: Api<K> = Api::namespaced(conn.client.clone(), &conn.namespace);
        let mut progressed = false;
        loop {
            let params = WatchParams::default()
                .labels(&self.selector())
                .timeout(WATCH_TIMEOUT_SECS);
            let opened = Instant::now();
            // The server closes the watch after its timeout; this bounds a silently dead one.
            let deadline = tokio::time::Instant::now()
                + Duration::from_secs(u64::from(WATCH_TIMEOUT_SECS) + 15);
            let stream = tokio::select! {
                r = tokio::time::timeout(REQUEST_TIMEOUT, api.watch(&params, &rv)) => r,
                _ = tx.closed() => return WatchEnd::Closed,
            };
            let stream = match stream {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return WatchEnd::Failed(self.api_error::<K>(&conn.namespace, e)),
                Err(_) => {
                    return WatchEnd::Failed(DiscoveryError::Unreachable {
                        backend: BACKEND,
                        message: "opening the watch timed out".into(),
                        source: None,
                    });
                }
            };
            let mut stream = std::pin::pin!(stream);
            let mut events = 0usize;
            loop {
                let next = tokio::select! {
                    n = stream.next() => n,
                    _ = tokio::time::sleep_until(deadline) => None,
                    _ = tx.closed() => return WatchEnd::Closed,
                };
                let Some(event) = next else { break };
                events += 1;
                let event = match event {
                    Ok(ev) => ev,
                    Err(e) => {
                        return WatchEnd::Failed(self.api_error::<K>(&conn.namespace, e));
                    }
                };
                if !matches!(event, WatchEvent::Error(_)) {
                    progressed = true;
                }
                match event {
                    WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                        if let Some(v) = &o.meta().resource_version {
                            rv.clone_from(v);
                        }
                        objects.insert(o.meta().name.clone().unwrap_or_default(), o);
                    }
                    WatchEvent::Deleted(o) => {
                        if let Some(v) = &o.meta().resource_version {
                            rv.clone_from(v);
                        }
                        objects.remove(o.meta().name.as_deref().unwrap_or_default());
                    }
                    WatchEvent::Bookmark(b) => {
                        rv = b.metadata.resource_version;
                        continue;
                    }
                    WatchEvent::Error(status) => {
                        if status.code == 410 {
                            return WatchEnd::Gone { progressed };
                        }
                        return WatchEnd::Failed(
                            self.api_error::<K>(&conn.namespace, kube::Error::Api(status)),
                        );
                    }
                }
                let candidates = self.report(objects.values()).await.candidates;
                tx.send_if_modified(|s| {
                    if s.candidates == candidates {
                        return false;
                    }
                    *refreshes += 1;
                    *s = Snapshot {
                        candidates,
                        refreshes: *refreshes,
                    };
                    true
                });
            }
            // A watch that closes at once without news is a broken server: back off.
            if events == 0 && opened.elapsed() < Duration::from_secs(1) {
                return WatchEnd::Failed(DiscoveryError::Api {
                    backend: BACKEND,
                    message: "the watch closed immediately".into(),
                    transient: true,
                });
            }
            progressed = true;
        }
    }

    /// The long-running loop: list, then watch; on failure back off and list again.
    async fn watch_kind<K: Kind>(
        self: Arc<Self>,
        refresh: Refresh,
        tx: watch::Sender<Snapshot>,
        observer: Arc<dyn RefreshObserver>,
    ) {
        let interval = refresh.interval.max(Duration::from_millis(10));
        let min_backoff = refresh.min_backoff.max(Duration::from_millis(10));
        if !refresh.initial_jitter.is_zero() {
            tokio::time::sleep(jitter(refresh.initial_jitter)).await;
        }
        let mut backoff = Backoff::new(min_backoff, interval);
        // A server that answers every watch with 410 would otherwise be listed several times
        // a second: relists back off too, from a short first pause (a compaction after a
        // healthy watch needs one quick relist) doubling to the cap, with jitter.
        let gone_min = (min_backoff / 4).max(Duration::from_millis(10));
        let mut gone_backoff = Backoff::new(gone_min, interval.min(GONE_BACKOFF_CAP));
        let mut gone_in_a_row = 0u32;
        let mut refreshes = 0u64;
        loop {
            if tx.is_closed() {
                return;
            }
            let started = Instant::now();
            // Until a list has completed, each page is published as it arrives.
            let publish = |page: &[discovery::Candidate]| discovery::publish_page(&tx, page);
            let on_page: Option<OnPage<'_>> = (refreshes == 0).then_some(&publish);
            let err = match self.list_all::<K>(on_page).await {
                Ok((mut objects, rv)) => {
                    let report = self.report(objects.values()).await;
                    observer.round(started.elapsed(), Ok(report.candidates.len()));
                    refreshes += 1;
                    tx.send_replace(Snapshot {
                        candidates: report.candidates,
                        refreshes,
                    });
                    match self.follow(&mut objects, rv, &tx, &mut refreshes).await {
                        WatchEnd::Closed => return,
                        WatchEnd::Gone { progressed } => {
                            backoff.reset();
                            if progressed {
                                gone_backoff.reset();
                                gone_in_a_row = 0;
                            }
                            gone_in_a_row += 1;
                            let pause = gone_backoff.next_pause();
                            if gone_in_a_row == 5 {
                                tracing::warn!(
                                    backend = BACKEND,
                                    retry_in_ms = pause.as_millis() as u64,
                                    "the API server answered {gone_in_a_row} watches in a row with 410 Gone right after a list; listing again with a growing backoff (check the API server's watch cache and etcd compaction)"
                                );
                            } else {
                                tracing::debug!(
                                    retry_in_ms = pause.as_millis() as u64,
                                    "watch resource version expired; listing again"
                                );
                            }
                            tokio::select! {
                                _ = tokio::time::sleep(pause) => {}
                                _ = tx.closed() => return,
                            }
                            continue;
                        }
                        WatchEnd::Failed(e) => e,
                    }
                }
                Err(e) => {
                    observer.round(started.elapsed(), Err(&e));
                    e
                }
            };
            let pause = if err.is_transient() {
                backoff.next_pause()
            } else {
                interval.mul_f64(0.9) + jitter(interval.mul_f64(0.2))
            };
            tracing::warn!(
                backend = BACKEND,
                kind = err.kind(),
                retry_in_ms = pause.as_millis() as u64,
                "kubernetes list or watch failed, keeping the last good candidate set and listing again: {}",
                escape_untrusted(&discovery::Chain(&err).to_string())
            );
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = tx.closed() => return,
            }
        }
    }
}

/// Maps a kube error to the discovery contract, naming the RBAC rule on 401 and 403.
fn map_error(e: kube::Error, plural: &str, rule: &str, namespace: &str) -> DiscoveryError {
    match e {
        kube::Error::Api(status) => {
            // The server's words reach logs and `node discover`: escaped, so they cannot forge
            // lines or send terminal sequences.
            let msg = escape_untrusted(if status.message.is_empty() {
                &status.reason
            } else {
                &status.message
            });
            match status.code {
                401 => DiscoveryError::Unauthorized {
                    backend: BACKEND,
                    message: format!(
                        "the API server rejected the credentials (401 {msg}); check the service account token (or the kubeconfig user), then make sure a Role in namespace {namespace} grants {{{rule}}} and a RoleBinding binds it to the service account (see deploy/k8s/rbac.yaml)"
                    ),
                },
                403 => DiscoveryError::Unauthorized {
                    backend: BACKEND,
                    message: format!(
                        "reading {plural} in namespace {namespace} is forbidden (403 {msg}); add a Role in namespace {namespace} with the rule {{{rule}}} and a RoleBinding to the node's service account (see deploy/k8s/rbac.yaml)"
                    ),
                },
                429 => DiscoveryError::Throttled {
                    backend: BACKEND,
                    message: msg,
                },
                404 => DiscoveryError::Api {
                    backend: BACKEND,
                    message: format!(
                        "{msg} (404): check --k8s_namespace {namespace} and that the API server serves {plural}"
                    ),
                    transient: false,
                },
                code => DiscoveryError::Api {
                    backend: BACKEND,
                    message: format!("{msg} ({code} {})", escape_untrusted(&status.reason)),
                    transient: code >= 500 || code == 410 || code == 0,
                },
            }
        }
        kube::Error::SerdeError(err) => DiscoveryError::Api {
            backend: BACKEND,
            message: format!("cannot decode the API server's answer: {err}"),
            transient: true,
        },
        other => DiscoveryError::Unreachable {
            backend: BACKEND,
            message: format!(
                "{other}; check that the API server is reachable and its certificate matches the CA"
            ),
            source: Some(Box::new(other)),
        },
    }
}

impl Discover for K8sDiscovery {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn discover(&self) -> BoxFuture<'_, Result<Report, DiscoveryError>> {
        Box::pin(async move {
            match self.settings.source {
                Source::Labels(_) => self.discover_kind::<Pod>(None).await,
                Source::Service(_) => self.discover_kind::<EndpointSlice>(None).await,
            }
        })
    }

    fn discover_pages<'a>(
        &'a self,
        on_page: OnPage<'a>,
    ) -> BoxFuture<'a, Result<Report, DiscoveryError>> {
        Box::pin(async move {
            match self.settings.source {
                Source::Labels(_) => self.discover_kind::<Pod>(Some(on_page)).await,
                Source::Service(_) => self.discover_kind::<EndpointSlice>(Some(on_page)).await,
            }
        })
    }

    fn local_zone(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            match self.own_zone().await {
                Ok(zone) => zone,
                Err(why) => {
                    tracing::info!(
                        backend = BACKEND,
                        "this pod's zone is unknown: {}",
                        escape_untrusted(&why)
                    );
                    None
                }
            }
        })
    }

    fn watch(
        self: Arc<Self>,
        refresh: Refresh,
        tx: watch::Sender<Snapshot>,
        observer: Arc<dyn RefreshObserver>,
    ) -> BoxFuture<'static, ()> {
        match self.settings.source {
            Source::Labels(_) => Box::pin(self.watch_kind::<Pod>(refresh, tx, observer)),
            Source::Service(_) => Box::pin(self.watch_kind::<EndpointSlice>(refresh, tx, observer)),
        }
    }
}
