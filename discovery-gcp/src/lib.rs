//! GCE discovery: labelled, running instances in zones, through the Compute Engine API.
//!
//! The backend lists instances with `google-cloud-compute-v1` (`instances.list` per zone, or
//! `instances.aggregatedList` for a whole region), filtering on the server with
//! `(labels.K = "V") AND ... AND (status = RUNNING)` and reading every page. An instance is one
//! candidate: the lowest of its NICs' `networkIP`s (or, on an IPv6 node, internal
//! `ipv6Address`es) inside `--private_ip_selector` ([`Context::classify_host`]), with its zone
//! and, from its `role` label, its role.
//! Credentials are Application Default Credentials (`google-cloud-auth`): the metadata server
//! on a VM, `GOOGLE_APPLICATION_CREDENTIALS` elsewhere. The project and the zone default to the
//! metadata server's `project/project-id` and `instance/zone`.
//!
//! Failures: 429, 5xx, timeouts and transport errors are retried per page with jittered
//! exponential backoff; a zone that still fails keeps its last good instances while the other
//! zones are refreshed; when every zone fails the round fails and the refresh loop keeps the
//! last good set. 401 and 403 name the credential, permission or access scope to fix.
//!
//! [`Discover::discover`] (the refresh loop's round) is one filtered listing per zone;
//! [`Discover::discover_pages`] hands each page's candidates on as it arrives, so a starting
//! node joins its first peers after one page. [`Discover::explain`] (`node discover`) also
//! says what was left out: it lists again without the status term (instances that are not
//! running) and without any filter (instances whose labels the server did not match), a
//! bounded number of pages each. [`Discover::local_zone`] is the metadata server's
//! `instance/zone`.

pub mod labels;
pub mod metadata;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use discovery::Retry;
use discovery::{
    BoxFuture, Candidate, Context, Discover, DiscoveryError, Exclusion, OnPage, Report, Role,
};
use google_cloud_compute_v1::client::Instances;
use google_cloud_compute_v1::model::Instance;
use tokio::sync::OnceCell;

pub use labels::{LabelMatch, parse_labels};

const BACKEND: &str = "gcp";
/// The Compute API's public endpoint, used when `--gcp_endpoint` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://compute.googleapis.com";
/// The instance label that tells a peer's role (`scheduler` or `worker`), as
/// `deploy/gcp/instance-template.sh` sets it.
pub const ROLE_LABEL: &str = "role";

/// Why the GCP backend cannot be configured or started.
#[derive(Debug, thiserror::Error)]
pub enum GcpError {
    /// A `--gcp_labels` entry is invalid.
    #[error("invalid --gcp_labels entry `{entry}`: {reason}")]
    BadLabel {
        /// The entry as given.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A zone or region name is invalid.
    #[error("invalid {flag} value `{value}`: {reason}")]
    BadLocation {
        /// `--gcp_zones` or `--gcp_region`.
        flag: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Both a zone list and a region were given.
    #[error(
        "--gcp_zones and --gcp_region are both set: give either a zone list or a region, whose zones are all listed"
    )]
    ZonesAndRegion,
    /// A setting was not given and the metadata server could not provide it.
    #[error(
        "{what} is not set and the GCE metadata server could not tell it; off GCE, set {flags} (and GOOGLE_APPLICATION_CREDENTIALS for credentials), or point GCE_METADATA_HOST at a metadata server"
    )]
    NoMetadata {
        /// What was needed.
        what: &'static str,
        /// The flags that provide it.
        flags: &'static str,
        /// Why the metadata server did not answer.
        #[source]
        cause: metadata::MetadataError,
    },
    /// The credentials could not be loaded.
    #[error(
        "cannot load Application Default Credentials; on GCE attach a service account to the VM, elsewhere set GOOGLE_APPLICATION_CREDENTIALS to a service account key file"
    )]
    Credentials(#[source] google_cloud_auth::build_errors::Error),
    /// The Compute client could not be built.
    #[error("cannot build the compute client for {endpoint}; check --gcp_endpoint")]
    Client {
        /// The endpoint.
        endpoint: String,
        /// The builder's error.
        #[source]
        cause: google_cloud_gax::client_builder::Error,
    },
    /// The project or a zone does not exist (404).
    #[error(
        "gcp: {location} of project {project} was not found; check --gcp_project and --gcp_zones or --gcp_region"
    )]
    NotFound {
        /// `zone Z` or `region R`.
        location: String,
        /// The project.
        project: String,
        /// The API's answer.
        #[source]
        source: google_cloud_compute_v1::Error,
    },
}

impl From<GcpError> for DiscoveryError {
    fn from(e: GcpError) -> Self {
        DiscoveryError::Config(Box::new(e))
    }
}

/// The backend's configuration, from the `--gcp_*` flags.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--gcp_project`; `None` reads the metadata server's `project/project-id`.
    pub project: Option<String>,
    /// `--gcp_zones`; empty (and no region) reads the metadata server's `instance/zone`.
    pub zones: Vec<String>,
    /// `--gcp_region`: every zone of the region, through `instances.aggregatedList`.
    pub region: Option<String>,
    /// `--gcp_labels`, all of which must match.
    pub labels: Vec<LabelMatch>,
    /// `--gcp_endpoint`; `None` is the public endpoint.
    pub endpoint: Option<String>,
    /// The metadata server's `host[:port]`, for the project, the zone and the credentials
    /// (then taken from it directly instead of through Application Default Credentials).
    /// `None` reads `GCE_METADATA_HOST`, then uses `metadata.google.internal`, and takes
    /// credentials through ADC. Tests set it, since changing the environment is unsafe.
    pub metadata_host: Option<String>,
    /// `maxResults` per page, 1..=500.
    pub page_size: u32,
    /// The limit on one HTTP attempt.
    pub request_timeout: Duration,
    /// Per-page retries (4 attempts, 500 ms doubling to 8 s by default).
    pub retry: Retry,
    /// The most pages read from one listing; a bound, not a expected size (500 per page).
    pub max_pages: u32,
    /// The most pages read by each explanatory listing of [`Discover::discover`].
    pub explain_pages: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            project: None,
            zones: Vec::new(),
            region: None,
            labels: Vec::new(),
            endpoint: None,
            metadata_host: None,
            page_size: 500,
            request_timeout: Duration::from_secs(10),
            retry: Retry::default(),
            max_pages: 200,
            explain_pages: 4,
        }
    }
}

/// Whether `value` has the form of a GCE zone or region name.
fn valid_location(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && value.starts_with(|c: char| c.is_ascii_lowercase())
}

fn check_location(flag: &'static str, value: &str) -> Result<(), GcpError> {
    if valid_location(value) {
        Ok(())
    } else {
        Err(GcpError::BadLocation {
            flag,
            value: value.into(),
            reason: "expected a GCE name such as us-central1 (region) or us-central1-a (zone)"
                .into(),
        })
    }
}

/// Splits `--gcp_zones` into names.
pub fn parse_zones(raw: &str) -> Result<Vec<String>, GcpError> {
    let mut zones: Vec<String> = Vec::new();
    for z in raw.split(',').map(str::trim).filter(|z| !z.is_empty()) {
        check_location("--gcp_zones", z)?;
        if !zones.iter().any(|x| x == z) {
            zones.push(z.to_owned());
        }
    }
    Ok(zones)
}

/// Where to list.
#[derive(Debug, Clone)]
enum Scope {
    Zones(Vec<String>),
    Region(String),
}

/// What the first round resolves: the client, the project and the zones.
#[derive(Debug)]
struct Resolved {
    client: Instances,
    project: String,
    scope: Scope,
}

/// One instance as discovery sees it.
#[derive(Debug, Clone)]
struct Seen {
    zone: String,
    name: String,
    status: String,
    labels: HashMap<String, String>,
    /// Every NIC's `networkIP` and internal `ipv6Address`, in NIC order.
    addrs: Vec<IpAddr>,
}

impl Seen {
    fn from_instance(zone: &str, i: &Instance) -> Seen {
        let addrs = i
            .network_interfaces
            .iter()
            .flat_map(|nic| [nic.network_ip.as_deref(), nic.ipv_6_address.as_deref()])
            .filter_map(|a| a?.parse().ok())
            .collect();
        Seen {
            zone: zone.to_owned(),
            name: i.name.clone().unwrap_or_default(),
            status: i
                .status
                .as_ref()
                .and_then(|s| s.name())
                .unwrap_or("UNKNOWN")
                .to_owned(),
            labels: i.labels.clone(),
            addrs,
        }
    }

    fn id(&self) -> String {
        format!("{}/{}", self.zone, self.name)
    }

    /// The `role` label, when it names a role.
    fn role(&self) -> Option<Role> {
        match self.labels.get(ROLE_LABEL)?.as_str() {
            "scheduler" => Some(Role::Scheduler),
            "worker" => Some(Role::Worker),
            _ => None,
        }
    }
}

/// A listing failure, before it is worded for the operator.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Api(google_cloud_compute_v1::Error),
    #[error("no answer within {} ms", .0.as_millis())]
    TimedOut(Duration),
}

impl Failure {
    fn retryable(&self) -> bool {
        match self {
            Failure::TimedOut(_) => true,
            Failure::Api(e) => match e.http_status_code() {
                Some(code) => code == 429 || code >= 500,
                None => e.is_timeout() || e.is_io() || e.is_connect() || e.is_transport(),
            },
        }
    }
}

/// Where a listing went, for messages.
#[derive(Debug, Clone)]
struct Target<'a> {
    project: &'a str,
    location: String,
    endpoint: &'a str,
}

fn api_message(e: &google_cloud_compute_v1::Error) -> String {
    match e.status() {
        Some(s) if !s.message.is_empty() => s.message.clone(),
        _ => e.to_string(),
    }
}

/// Words a failure as a [`DiscoveryError`] that says what to do.
fn explain(f: Failure, t: &Target<'_>) -> DiscoveryError {
    let Target {
        project,
        location,
        endpoint,
    } = t;
    let e = match f {
        Failure::TimedOut(d) => {
            return DiscoveryError::Unreachable {
                backend: BACKEND,
                message: format!(
                    "listing instances in {location} of project {project} got no answer from {endpoint} within {} ms",
                    d.as_millis()
                ),
                source: None,
            };
        }
        Failure::Api(e) => e,
    };
    let msg = api_message(&e);
    match e.http_status_code() {
        Some(401) => DiscoveryError::Unauthorized {
            backend: BACKEND,
            message: format!(
                "the compute api rejected the access token for project {project} ({msg}); on GCE check that the VM has a service account attached, elsewhere set GOOGLE_APPLICATION_CREDENTIALS to a valid service account key"
            ),
        },
        Some(403) if msg.to_lowercase().contains("scope") => DiscoveryError::Unauthorized {
            backend: BACKEND,
            message: format!(
                "the VM's access scopes do not allow the compute api in project {project} ({msg}); stop the VM and give it the compute-ro or cloud-platform scope: gcloud compute instances set-service-account VM --zone ZONE --scopes=compute-ro"
            ),
        },
        Some(403) => DiscoveryError::Unauthorized {
            backend: BACKEND,
            message: format!(
                "permission compute.instances.list is missing in project {project} ({msg}); grant the VM's service account a role that has it: gcloud projects add-iam-policy-binding {project} --member=serviceAccount:SA_EMAIL --role=roles/compute.viewer (or the smaller custom role in deploy/gcp/discovery-role.yaml)"
            ),
        },
        Some(404) => DiscoveryError::Config(Box::new(GcpError::NotFound {
            location: location.clone(),
            project: project.to_string(),
            source: e,
        })),
        Some(429) => DiscoveryError::Throttled {
            backend: BACKEND,
            message: format!("listing instances in {location} of project {project}: {msg}"),
        },
        Some(code) if code >= 500 => DiscoveryError::Api {
            backend: BACKEND,
            message: format!(
                "listing instances in {location} of project {project} answered {code}: {msg}"
            ),
            transient: true,
        },
        Some(code) => DiscoveryError::Api {
            backend: BACKEND,
            message: format!(
                "listing instances in {location} of project {project} answered {code}: {msg}"
            ),
            transient: false,
        },
        None if e.is_authentication() => DiscoveryError::Unreachable {
            backend: BACKEND,
            message: format!(
                "cannot get an access token ({e}); on GCE the metadata server issues it (is a service account attached to the VM?), elsewhere set GOOGLE_APPLICATION_CREDENTIALS"
            ),
            source: Some(Box::new(e)),
        },
        None => DiscoveryError::Unreachable {
            backend: BACKEND,
            message: format!(
                "listing instances in {location} of project {project} through {endpoint} failed: {e}"
            ),
            source: Some(Box::new(e)),
        },
    }
}

/// What one zone produced in a round.
#[derive(Debug, Default, Clone)]
struct ZoneResult {
    running: Vec<Seen>,
}

/// GCE discovery.
#[derive(Debug)]
pub struct GcpDiscovery {
    config: Config,
    ctx: Context,
    metadata: metadata::Metadata,
    endpoint: String,
    running_filter: String,
    labels_filter: String,
    resolved: OnceCell<Resolved>,
    /// The last good listing of each zone, so that a failing zone keeps its instances.
    last_good: Mutex<BTreeMap<String, ZoneResult>>,
}

impl GcpDiscovery {
    /// Validates the configuration. Nothing is contacted until the first round.
    pub fn new(mut config: Config, ctx: Context) -> Result<Arc<Self>, GcpError> {
        if !config.zones.is_empty() && config.region.is_some() {
            return Err(GcpError::ZonesAndRegion);
        }
        for z in &config.zones {
            check_location("--gcp_zones", z)?;
        }
        if let Some(r) = &config.region {
            check_location("--gcp_region", r)?;
        }
        config.page_size = config.page_size.clamp(1, 500);
        config.retry.attempts = config.retry.attempts.max(1);
        config.max_pages = config.max_pages.max(1);
        let host = config
            .metadata_host
            .clone()
            .or_else(|| std::env::var("GCE_METADATA_HOST").ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| metadata::DEFAULT_HOST.to_owned());
        let metadata = metadata::Metadata::new(&host, Duration::from_secs(3));
        let endpoint = config
            .endpoint
            .clone()
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        Ok(Arc::new(Self {
            running_filter: labels::running_filter(&config.labels),
            labels_filter: labels::labels_filter(&config.labels),
            config,
            ctx,
            metadata,
            endpoint,
            resolved: OnceCell::new(),
            last_good: Mutex::new(BTreeMap::new()),
        }))
    }

    /// The server-side filter of the production listing.
    pub fn filter(&self) -> &str {
        &self.running_filter
    }

    async fn resolve(&self) -> Result<&Resolved, DiscoveryError> {
        self.resolved
            .get_or_try_init(|| async {
                let project =
                    match &self.config.project {
                        Some(p) => p.clone(),
                        None => self.metadata.project_id().await.map_err(|cause| {
                            GcpError::NoMetadata {
                                what: "--gcp_project",
                                flags: "--gcp_project",
                                cause,
                            }
                        })?,
                    };
                let scope =
                    match (&self.config.region, self.config.zones.is_empty()) {
                        (Some(r), _) => Scope::Region(r.clone()),
                        (None, false) => Scope::Zones(self.config.zones.clone()),
                        (None, true) => {
                            let zone = self.metadata.zone().await.map_err(|cause| {
                                GcpError::NoMetadata {
                                    what: "--gcp_zones",
                                    flags: "--gcp_zones (or --gcp_region)",
                                    cause,
                                }
                            })?;
                            Scope::Zones(vec![zone])
                        }
                    };
                let client = self.client().await?;
                tracing::info!(
                    project,
                    scope = ?scope,
                    filter = %self.running_filter,
                    endpoint = %self.endpoint,
                    "gcp discovery configured"
                );
                Ok::<_, DiscoveryError>(Resolved {
                    client,
                    project,
                    scope,
                })
            })
            .await
    }

    async fn client(&self) -> Result<Instances, GcpError> {
        // Application Default Credentials, unless the configuration names a metadata server:
        // then its tokens, which is what ADC picks on a VM anyway (`GCE_METADATA_HOST`, when
        // set, still wins inside the SDK).
        let creds = match &self.config.metadata_host {
            None => google_cloud_auth::credentials::Builder::default().build(),
            Some(host) => google_cloud_auth::credentials::mds::Builder::default()
                .with_endpoint(format!("http://{host}"))
                .build(),
        }
        .map_err(GcpError::Credentials)?;
        Instances::builder()
            .with_endpoint(self.endpoint.clone())
            .with_credentials(creds)
            // Retries are ours (per page, with jittered backoff, see `call`), so that 429 and
            // 5xx are retried the same way whatever the SDK's defaults are.
            .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry)
            .with_attempt_timeout(self.config.request_timeout)
            .build()
            .await
            .map_err(|cause| GcpError::Client {
                endpoint: self.endpoint.clone(),
                cause,
            })
    }

    /// Runs one API call (one page of `location`) with the per-page retry policy.
    async fn call<T, F, Fut>(&self, location: &str, mut f: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, google_cloud_compute_v1::Error>>,
    {
        let limit = self.config.request_timeout + Duration::from_secs(5);
        let what = format!("listing instances in {location}");
        self.config
            .retry
            .run(
                BACKEND,
                &what,
                || {
                    let attempt = f();
                    async move {
                        match tokio::time::timeout(limit, attempt).await {
                            Ok(r) => r.map_err(Failure::Api),
                            Err(_) => Err(Failure::TimedOut(limit)),
                        }
                    }
                },
                Failure::retryable,
            )
            .await
    }

    /// Lists one zone with `filter`, every page up to `max_pages`, handing each page to
    /// `on_page`; the flag says whether the listing was cut at that bound.
    async fn list_zone(
        &self,
        r: &Resolved,
        zone: &str,
        filter: &str,
        max_pages: u32,
        on_page: Option<SeenPage<'_>>,
    ) -> Result<(Vec<Seen>, bool), Failure> {
        let mut out = Vec::new();
        let mut token = String::new();
        let location = format!("zone {zone}");
        for _ in 0..max_pages {
            let page = self
                .call(&location, || {
                    let mut req = r
                        .client
                        .list()
                        .set_project(r.project.clone())
                        .set_zone(zone.to_owned())
                        .set_max_results(self.config.page_size);
                    if !filter.is_empty() {
                        req = req.set_filter(filter.to_owned());
                    }
                    if !token.is_empty() {
                        req = req.set_page_token(token.clone());
                    }
                    req.send()
                })
                .await?;
            let seen: Vec<Seen> = page
                .items
                .iter()
                .map(|i| Seen::from_instance(zone, i))
                .collect();
            if let Some(f) = on_page {
                f(&seen);
            }
            out.extend(seen);
            match page.next_page_token {
                Some(t) if !t.is_empty() => token = t,
                _ => return Ok((out, false)),
            }
        }
        Ok((out, true))
    }

    /// Lists the region's zones through `aggregatedList`, handing each page to `on_page`.
    /// Zones the API marks unreachable are returned in the second list.
    async fn list_region(
        &self,
        r: &Resolved,
        region: &str,
        filter: &str,
        max_pages: u32,
        on_page: Option<SeenPage<'_>>,
    ) -> Result<(BTreeMap<String, Vec<Seen>>, Vec<String>, bool), Failure> {
        let prefix = format!("zones/{region}-");
        let mut zones: BTreeMap<String, Vec<Seen>> = BTreeMap::new();
        let mut unreachable: Vec<String> = Vec::new();
        let mut token = String::new();
        let location = format!("region {region}");
        let mut truncated = true;
        for _ in 0..max_pages {
            let page = self
                .call(&location, || {
                    let mut req = r
                        .client
                        .aggregated_list()
                        .set_project(r.project.clone())
                        .set_max_results(self.config.page_size);
                    if !filter.is_empty() {
                        req = req.set_filter(filter.to_owned());
                    }
                    if !token.is_empty() {
                        req = req.set_page_token(token.clone());
                    }
                    req.send()
                })
                .await?;
            let mut seen_on_page = Vec::new();
            for (key, scoped) in &page.items {
                let Some(zone) = key.strip_prefix("zones/") else {
                    continue;
                };
                // The key becomes the candidates' zone: only a zone name of this region counts.
                if !key.starts_with(&prefix) || !valid_location(zone) {
                    continue;
                }
                let seen: Vec<Seen> = scoped
                    .instances
                    .iter()
                    .map(|i| Seen::from_instance(zone, i))
                    .collect();
                seen_on_page.extend(seen.iter().cloned());
                zones.entry(zone.to_owned()).or_default().extend(seen);
                let warned_unreachable = scoped
                    .warning
                    .as_ref()
                    .and_then(|w| w.code.as_ref())
                    .and_then(|c| c.name())
                    == Some("UNREACHABLE");
                if warned_unreachable && !unreachable.iter().any(|u| u == zone) {
                    unreachable.push(zone.to_owned());
                }
            }
            for u in &page.unreachables {
                if let Some(zone) = u.strip_prefix("zones/")
                    && u.starts_with(&prefix)
                    && !unreachable.iter().any(|x| x == zone)
                {
                    unreachable.push(zone.to_owned());
                }
            }
            if let Some(f) = on_page {
                f(&seen_on_page);
            }
            match page.next_page_token {
                Some(t) if !t.is_empty() => token = t,
                _ => {
                    truncated = false;
                    break;
                }
            }
        }
        for u in &unreachable {
            zones.remove(u);
        }
        Ok((zones, unreachable, truncated))
    }

    /// One listing of every zone in scope with `filter`: per zone, its instances or its error.
    async fn list_all(
        &self,
        r: &Resolved,
        filter: &str,
        max_pages: u32,
        on_page: Option<SeenPage<'_>>,
    ) -> Result<Vec<(String, Result<(Vec<Seen>, bool), DiscoveryError>)>, DiscoveryError> {
        let target = |location: String| Target {
            project: &r.project,
            location,
            endpoint: &self.endpoint,
        };
        match &r.scope {
            Scope::Zones(zones) => {
                let listings = zones.iter().map(|z| async move {
                    let res = self
                        .list_zone(r, z, filter, max_pages, on_page)
                        .await
                        .map_err(|f| explain(f, &target(format!("zone {z}"))));
                    (z.clone(), res)
                });
                Ok(futures::future::join_all(listings).await)
            }
            Scope::Region(region) => {
                let (zones, unreachable, truncated) = self
                    .list_region(r, region, filter, max_pages, on_page)
                    .await
                    .map_err(|f| explain(f, &target(format!("region {region}"))))?;
                let mut out: Vec<_> = zones
                    .into_iter()
                    .map(|(z, seen)| (z, Ok((seen, truncated))))
                    .collect();
                out.extend(unreachable.into_iter().map(|z| {
                    let err = DiscoveryError::Api {
                        backend: BACKEND,
                        message: format!(
                            "the aggregated listing of project {} marked zone {z} unreachable",
                            r.project
                        ),
                        transient: true,
                    };
                    (z, Err(err))
                }));
                Ok(out)
            }
        }
    }

    /// The refresh loop's round: one filtered listing per zone (each page handed to `on_page`
    /// as candidates), a failing zone's last good instances kept. Returns the report and the
    /// running instances, which [`Discover::explain`] explains further.
    async fn listed(
        &self,
        on_page: Option<OnPage<'_>>,
    ) -> Result<(&Resolved, Report, Vec<Seen>), DiscoveryError> {
        let r = self.resolve().await?;
        let publish = |seen: &[Seen]| {
            if let Some(f) = on_page {
                let mut page = Report::default();
                self.classify(seen, &mut page);
                if !page.candidates.is_empty() {
                    f(&page.candidates);
                }
            }
        };
        let listed = self
            .list_all(
                r,
                &self.running_filter,
                self.config.max_pages,
                on_page.map(|_| &publish as SeenPage<'_>),
            )
            .await?;
        let mut report = Report::default();
        let mut running: Vec<Seen> = Vec::new();
        let mut failures: Vec<(String, DiscoveryError)> = Vec::new();
        let mut ok_zones = 0usize;
        {
            let mut last = self.last_good.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(r.scope, Scope::Region(_)) {
                // Zones that left the region's listing are gone; unreachable ones stay below.
                let present: Vec<&String> = listed.iter().map(|(z, _)| z).collect();
                last.retain(|z, _| present.contains(&z));
            }
            for (zone, res) in listed {
                match res {
                    Ok((seen, truncated)) => {
                        if truncated {
                            tracing::warn!(zone, "gcp: listing cut at the page limit");
                        }
                        ok_zones += 1;
                        last.insert(
                            zone,
                            ZoneResult {
                                running: seen.clone(),
                            },
                        );
                        running.extend(seen);
                    }
                    Err(e) => {
                        let kept = last
                            .get(&zone)
                            .map(|z| z.running.clone())
                            .unwrap_or_default();
                        tracing::warn!(
                            zone,
                            kept = kept.len(),
                            "gcp: listing a zone failed, keeping its last good instances: {}",
                            discovery::escape_untrusted(&discovery::Chain(&e).to_string())
                        );
                        report.excluded.push(Exclusion {
                            id: format!("zone {zone}"),
                            reason: format!(
                                "listing failed, kept {} instances from its last good listing: {e}",
                                kept.len()
                            ),
                        });
                        running.extend(kept);
                        failures.push((zone, e));
                    }
                }
            }
        }
        if !failures.is_empty() && ok_zones == 0 {
            // Every zone failed: fail the round so the refresh loop backs off and keeps the set.
            return Err(pick_error(failures));
        }
        self.classify(&running, &mut report);
        Ok((r, report, running))
    }

    /// Turns running instances into candidates and exclusions: one candidate per instance
    /// ([`Context::classify_host`]), with its zone and role.
    fn classify(&self, running: &[Seen], report: &mut Report) {
        for s in running {
            match self
                .ctx
                .classify_host(s.id(), &s.addrs, self.ctx.private_port)
            {
                Ok(c) => report.candidates.push(Candidate {
                    role: s.role(),
                    zone: Some(s.zone.clone()),
                    ..c
                }),
                Err(x) => report.excluded.push(x),
            }
        }
    }

    /// Lists again without the status term and without any filter, to name the instances the
    /// server left out and why. Failures here only add a note.
    async fn explain_exclusions(&self, r: &Resolved, running: &[Seen], report: &mut Report) {
        let pages = self.config.explain_pages.max(1);
        let key = |s: &Seen| (s.zone.clone(), s.name.clone());
        let running_keys: Vec<(String, String)> = running.iter().map(key).collect();
        let labelled = match self.list_all(r, &self.labels_filter, pages, None).await {
            Ok(l) => l,
            Err(e) => {
                report.excluded.push(Exclusion {
                    id: "(explanation)".into(),
                    reason: format!("cannot list non-running instances: {e}"),
                });
                return;
            }
        };
        let mut labelled_keys = Vec::new();
        let mut truncated = false;
        for (zone, res) in labelled {
            match res {
                Ok((seen, t)) => {
                    truncated |= t;
                    for s in seen {
                        labelled_keys.push(key(&s));
                        if !running_keys.contains(&key(&s)) && s.status != "RUNNING" {
                            report.excluded.push(Exclusion {
                                id: s.id(),
                                reason: format!("not running (status {})", s.status),
                            });
                        }
                    }
                }
                Err(e) => report.excluded.push(Exclusion {
                    id: format!("zone {zone}"),
                    reason: format!("cannot list non-running instances: {e}"),
                }),
            }
        }
        if !self.config.labels.is_empty() {
            match self.list_all(r, "", pages, None).await {
                Ok(all) => {
                    for (zone, res) in all {
                        match res {
                            Ok((seen, t)) => {
                                truncated |= t;
                                for s in seen {
                                    // An instance whose labels do match was only cut from the
                                    // bounded labelled listing; it is not a mismatch.
                                    if !labelled_keys.contains(&key(&s))
                                        && !labels::satisfies(&self.config.labels, &s.labels)
                                    {
                                        report.excluded.push(Exclusion {
                                            id: s.id(),
                                            reason: labels::describe_mismatch(
                                                &self.config.labels,
                                                &s.labels,
                                            ),
                                        });
                                    }
                                }
                            }
                            Err(e) => report.excluded.push(Exclusion {
                                id: format!("zone {zone}"),
                                reason: format!("cannot list unlabelled instances: {e}"),
                            }),
                        }
                    }
                }
                Err(e) => report.excluded.push(Exclusion {
                    id: "(explanation)".into(),
                    reason: format!("cannot list unlabelled instances: {e}"),
                }),
            }
        }
        if truncated {
            report.excluded.push(Exclusion {
                id: "(explanation)".into(),
                reason: format!(
                    "only the first {pages} pages per zone were read to explain exclusions; more instances were left out"
                ),
            });
        }
    }

    /// A round's report in a stable order.
    fn finish(mut report: Report) -> Report {
        report
            .candidates
            .sort_by(|a, b| (a.ip, &a.id).cmp(&(b.ip, &b.id)));
        report
            .candidates
            .dedup_by(|a, b| a.ip == b.ip && a.port == b.port);
        report
    }
}

/// What a listing hands each page's instances to.
type SeenPage<'a> = &'a (dyn Fn(&[Seen]) + Send + Sync);

/// Picks the error to report when every zone failed: a permanent one first, since it needs
/// the operator.
fn pick_error(mut failures: Vec<(String, DiscoveryError)>) -> DiscoveryError {
    let idx = failures
        .iter()
        .position(|(_, e)| !e.is_transient())
        .unwrap_or(0);
    failures.swap_remove(idx).1
}

impl Discover for GcpDiscovery {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn discover(&self) -> BoxFuture<'_, Result<Report, DiscoveryError>> {
        Box::pin(async move {
            let (_, report, _) = self.listed(None).await?;
            Ok(Self::finish(report))
        })
    }

    fn discover_pages<'a>(
        &'a self,
        on_page: OnPage<'a>,
    ) -> BoxFuture<'a, Result<Report, DiscoveryError>> {
        Box::pin(async move {
            let (_, report, _) = self.listed(Some(on_page)).await?;
            Ok(Self::finish(report))
        })
    }

    fn explain(&self) -> BoxFuture<'_, Result<Report, DiscoveryError>> {
        Box::pin(async move {
            let (r, mut report, running) = self.listed(None).await?;
            self.explain_exclusions(r, &running, &mut report).await;
            Ok(Self::finish(report))
        })
    }

    fn local_zone(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            // One attempt: the node waits for this only briefly at start-up.
            match self.metadata.clone().once().zone().await {
                Ok(z) => Some(z),
                Err(e) => {
                    tracing::info!(
                        "gcp: this VM's zone is unknown: {}",
                        discovery::escape_untrusted(&discovery::Chain(&e).to_string())
                    );
                    None
                }
            }
        })
    }
}
