//! A fake of the GCE Compute API (instances list and aggregated list) and of the GCE metadata
//! server, written from the public REST reference, for testing `discovery-gcp` and `node`.
//!
//! No runnable GCE emulator exists, so this fake follows the documented behaviour that discovery
//! relies on: the paths, the `InstanceList` and `InstanceAggregatedList` JSON shapes, `filter`
//! (see [`filter`](crate::filter) for the subset), `maxResults` (0..=500, default 500) with
//! opaque `pageToken`s, aggregated scopes with `UNREACHABLE` warnings, bearer tokens issued
//! by the metadata server (401 otherwise), IAM and access-scope refusals (403), Google's JSON error format, and a
//! metadata server that answers only requests carrying `Metadata-Flavor: Google`.
//!
//! Faults can be injected: an error status for the next N compute calls, a persistent error or a
//! delay for one zone, a delay for every compute call, and a delay for every page after the
//! first. NICs are IPv4-only, dual-stack or IPv6-only (`networkIP`, internal `ipv6Address`). Every compute request is recorded,
//! so tests can assert on the filters and page tokens the client sent.
//!
//! Both APIs are served on one port: point `--gcp_endpoint` at [`GceFake::endpoint`] and
//! `GCE_METADATA_HOST` at [`GceFake::metadata_host`].

mod filter;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// The scope that compute calls accept besides the compute scopes.
pub const SCOPE_CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
/// The read-only compute scope, which is enough for listing instances.
pub const SCOPE_COMPUTE_RO: &str = "https://www.googleapis.com/auth/compute.readonly";
const SCOPE_COMPUTE: &str = "https://www.googleapis.com/auth/compute";
const API_BASE: &str = "https://www.googleapis.com/compute/v1";

/// Why the fake could not start.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    /// The listening socket could not be bound.
    #[error("cannot bind the gce fake on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The background runtime could not be started.
    #[error("cannot start the gce fake's runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// An instance to register in the fake.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// The instance name.
    pub name: String,
    /// `RUNNING`, `STOPPED`, `TERMINATED`, `STAGING`, ...
    pub status: String,
    /// The instance labels.
    pub labels: BTreeMap<String, String>,
    /// The NICs, in order (`nic0`, `nic1`, ...).
    pub nics: Vec<NicSpec>,
}

/// One network interface: its internal IPv4 (`networkIP`) and internal IPv6 (`ipv6Address`)
/// addresses; the `stackType` follows from which are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NicSpec {
    /// `networkIP`; `None` on an IPv6-only interface.
    pub network_ip: Option<IpAddr>,
    /// `ipv6Address` (internal IPv6, `ipv6AccessType: INTERNAL`); `None` on an IPv4-only one.
    pub ipv6: Option<Ipv6Addr>,
}

impl InstanceSpec {
    /// A running instance with no labels and no NIC.
    pub fn running(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: "RUNNING".into(),
            labels: BTreeMap::new(),
            nics: Vec::new(),
        }
    }

    /// Sets the status.
    pub fn status(mut self, status: impl Into<String>) -> Self {
        self.status = status.into();
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Adds an IPv4-only NIC with this `networkIP`.
    pub fn nic(mut self, ip: IpAddr) -> Self {
        self.nics.push(NicSpec {
            network_ip: Some(ip),
            ipv6: None,
        });
        self
    }

    /// Adds a dual-stack NIC (`stackType: IPV4_IPV6`) with this `networkIP` and internal
    /// `ipv6Address`.
    pub fn dual_stack_nic(mut self, ip: IpAddr, ipv6: Ipv6Addr) -> Self {
        self.nics.push(NicSpec {
            network_ip: Some(ip),
            ipv6: Some(ipv6),
        });
        self
    }

    /// Adds an IPv6-only NIC (`stackType: IPV6_ONLY`, no `networkIP`) with this internal
    /// `ipv6Address`.
    pub fn ipv6_only_nic(mut self, ipv6: Ipv6Addr) -> Self {
        self.nics.push(NicSpec {
            network_ip: None,
            ipv6: Some(ipv6),
        });
        self
    }
}

/// One compute request, as the fake saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The request path.
    pub path: String,
    /// The decoded query parameters.
    pub query: BTreeMap<String, String>,
    /// The status the fake answered with.
    pub status: u16,
    /// When the request arrived.
    pub at: Instant,
}

/// What this VM's metadata server reports.
#[derive(Debug, Clone)]
pub struct VmIdentity {
    /// `project/project-id`.
    pub project_id: String,
    /// `project/numeric-project-id`.
    pub project_number: u64,
    /// The zone name in `instance/zone` (`projects/NUM/zones/ZONE`).
    pub zone: String,
    /// The default service account's email.
    pub email: String,
    /// The default service account's access scopes.
    pub scopes: Vec<String>,
    /// `instance/attributes/*`: custom metadata.
    pub attributes: BTreeMap<String, String>,
}

impl Default for VmIdentity {
    fn default() -> Self {
        Self {
            project_id: "test-project".into(),
            project_number: 123_456_789_012,
            zone: "us-central1-a".into(),
            email: "123456789012-compute@developer.gserviceaccount.com".into(),
            scopes: vec![SCOPE_CLOUD_PLATFORM.into()],
            attributes: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone)]
struct Stored {
    spec: InstanceSpec,
    id: u64,
}

#[derive(Debug, Default)]
struct Project {
    zones: BTreeMap<String, Vec<Stored>>,
    /// IAM refuses `compute.instances.list` here.
    denied: bool,
}

#[derive(Debug, Default)]
struct Faults {
    /// Statuses for the next compute calls, one per call.
    next: VecDeque<u16>,
    /// A persistent error status per zone.
    zone_status: HashMap<String, u16>,
    /// A delay per zone.
    zone_delay: HashMap<String, Duration>,
    /// A delay for every compute call.
    delay: Duration,
    /// A delay for every compute call that carries a `pageToken` (every page but the first).
    later_pages: Duration,
}

#[derive(Debug, Default)]
struct Inner {
    projects: BTreeMap<String, Project>,
    vm: VmIdentity,
    /// Issued tokens and their scopes.
    tokens: HashMap<String, Vec<String>>,
    faults: Faults,
    log: Vec<Recorded>,
    next_id: u64,
    metadata_requests: u64,
}

type Shared = Arc<Mutex<Inner>>;

fn lock(s: &Shared) -> MutexGuard<'_, Inner> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running fake; it stops when dropped.
pub struct GceFake {
    addr: SocketAddr,
    state: Shared,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl fmt::Debug for GceFake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GceFake").field("addr", &self.addr).finish()
    }
}

impl GceFake {
    /// Starts the fake on `addr` (port 0 picks a free port), serving from a background thread
    /// with its own runtime, so that both async and blocking tests can use it.
    pub fn start(addr: SocketAddr) -> Result<GceFake, FakeError> {
        let std_listener =
            std::net::TcpListener::bind(addr).map_err(|source| FakeError::Bind { addr, source })?;
        std_listener
            .set_nonblocking(true)
            .map_err(|source| FakeError::Bind { addr, source })?;
        let local = std_listener
            .local_addr()
            .map_err(|source| FakeError::Bind { addr, source })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(FakeError::Runtime)?;
        let state: Shared = Arc::new(Mutex::new(Inner {
            next_id: 4_000_000_000_000_000_000,
            ..Inner::default()
        }));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let app = router(state.clone());
        let thread = std::thread::Builder::new()
            .name("gce-fake".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                        return;
                    };
                    // Stopping drops the server at once, slow (delayed) answers included.
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = stop_rx => {}
                    }
                });
                rt.shutdown_background();
            })
            .map_err(FakeError::Runtime)?;
        Ok(GceFake {
            addr: local,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The address the fake listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The value for `--gcp_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The value for `GCE_METADATA_HOST` (`host:port`, no scheme).
    pub fn metadata_host(&self) -> String {
        self.addr.to_string()
    }

    /// Sets what the metadata server reports about "this VM"; its project is created.
    pub fn set_vm(&self, vm: VmIdentity) {
        let mut s = lock(&self.state);
        s.projects.entry(vm.project_id.clone()).or_default();
        s.vm = vm;
    }

    /// What the metadata server reports about "this VM".
    pub fn vm(&self) -> VmIdentity {
        lock(&self.state).vm.clone()
    }

    /// Creates a zone (and its project) with no instances.
    pub fn add_zone(&self, project: &str, zone: &str) {
        lock(&self.state)
            .projects
            .entry(project.into())
            .or_default()
            .zones
            .entry(zone.into())
            .or_default();
    }

    /// Registers an instance in a zone, creating the zone and project as needed.
    pub fn add_instance(&self, project: &str, zone: &str, spec: InstanceSpec) {
        let mut s = lock(&self.state);
        s.next_id += 7919;
        let id = s.next_id;
        s.projects
            .entry(project.into())
            .or_default()
            .zones
            .entry(zone.into())
            .or_default()
            .push(Stored { spec, id });
    }

    /// Changes an instance's status; returns whether it exists.
    pub fn set_status(&self, project: &str, zone: &str, name: &str, status: &str) -> bool {
        let mut s = lock(&self.state);
        let Some(list) = s
            .projects
            .get_mut(project)
            .and_then(|p| p.zones.get_mut(zone))
        else {
            return false;
        };
        match list.iter_mut().find(|i| i.spec.name == name) {
            Some(i) => {
                i.spec.status = status.into();
                true
            }
            None => false,
        }
    }

    /// Removes an instance; returns whether it existed.
    pub fn remove_instance(&self, project: &str, zone: &str, name: &str) -> bool {
        let mut s = lock(&self.state);
        let Some(list) = s
            .projects
            .get_mut(project)
            .and_then(|p| p.zones.get_mut(zone))
        else {
            return false;
        };
        let before = list.len();
        list.retain(|i| i.spec.name != name);
        list.len() != before
    }

    /// Makes IAM refuse (`true`) or allow `compute.instances.list` in a project.
    pub fn deny_list_permission(&self, project: &str, denied: bool) {
        lock(&self.state)
            .projects
            .entry(project.into())
            .or_default()
            .denied = denied;
    }

    /// The next `n` compute calls answer `status` (429, 500, 503, ...).
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut s = lock(&self.state);
        s.faults.next.extend(std::iter::repeat_n(status, n));
    }

    /// How many injected failures are still pending.
    pub fn pending_failures(&self) -> usize {
        lock(&self.state).faults.next.len()
    }

    /// Every call listing `zone` answers `status`, until cleared with `None`.
    pub fn fail_zone(&self, zone: &str, status: Option<u16>) {
        let mut s = lock(&self.state);
        match status {
            Some(st) => s.faults.zone_status.insert(zone.into(), st),
            None => s.faults.zone_status.remove(zone),
        };
    }

    /// Every call listing `zone` is delayed by `delay` (zero clears it).
    pub fn delay_zone(&self, zone: &str, delay: Duration) {
        let mut s = lock(&self.state);
        if delay.is_zero() {
            s.faults.zone_delay.remove(zone);
        } else {
            s.faults.zone_delay.insert(zone.into(), delay);
        }
    }

    /// Every compute call is delayed by `delay` (zero clears it).
    pub fn delay_all(&self, delay: Duration) {
        lock(&self.state).faults.delay = delay;
    }

    /// Every compute call that carries a `pageToken`, that is every page after the first, is
    /// delayed by `delay` (zero clears it), so tests can see what a client does with the first
    /// page before the last one is served.
    pub fn delay_later_pages(&self, delay: Duration) {
        lock(&self.state).faults.later_pages = delay;
    }

    /// Every compute request so far, in the order their answers were sent.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state).log.clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.state).log.clear();
    }

    /// How many metadata requests were answered (any status).
    pub fn metadata_requests(&self) -> u64 {
        lock(&self.state).metadata_requests
    }

    /// How many access tokens the metadata server issued.
    pub fn tokens_issued(&self) -> usize {
        lock(&self.state).tokens.len()
    }
}

impl Drop for GceFake {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn router(state: Shared) -> Router {
    Router::new()
        .route(
            "/compute/v1/projects/{project}/zones/{zone}/instances",
            get(list_zone),
        )
        .route(
            "/compute/v1/projects/{project}/aggregated/instances",
            get(list_aggregated),
        )
        .route("/computeMetadata/v1/{*path}", get(metadata))
        .fallback(not_found)
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// Errors, in Google's JSON error format.

/// A compute error answer: `{"error":{"code","message","errors":[...],"status"}}`.
fn google_error(code: u16, message: &str, reason: &str, domain: &str) -> Response {
    let status = match code {
        400 => Some("INVALID_ARGUMENT"),
        401 => Some("UNAUTHENTICATED"),
        403 => Some("PERMISSION_DENIED"),
        404 => Some("NOT_FOUND"),
        429 => Some("RESOURCE_EXHAUSTED"),
        503 => Some("UNAVAILABLE"),
        // Compute's 500s carry no canonical status.
        _ => None,
    };
    let mut error = json!({
        "code": code,
        "message": message,
        "errors": [{ "message": message, "domain": domain, "reason": reason }],
    });
    if let Some(s) = status {
        error["status"] = json!(s);
    }
    let mut resp = (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        json!({ "error": error }).to_string(),
    )
        .into_response();
    if code == 401 {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"https://accounts.google.com/\""),
        );
    }
    resp
}

/// The canned answer for an injected status.
fn injected(code: u16, project_number: u64) -> Response {
    match code {
        429 => google_error(
            429,
            &format!(
                "Quota exceeded for quota metric 'Read requests' and limit 'Read requests per minute' of service 'compute.googleapis.com' for consumer 'project_number:{project_number}'."
            ),
            "rateLimitExceeded",
            "usageLimits",
        ),
        500 => google_error(
            500,
            "Internal error. Please try again or contact Google Support. (Code: '5A1B2C3D4E5F6')",
            "backendError",
            "global",
        ),
        503 => google_error(
            503,
            "The service is currently unavailable.",
            "backendError",
            "global",
        ),
        other => google_error(other, "Injected error.", "injected", "global"),
    }
}

async fn not_found() -> Response {
    google_error(
        404,
        "The requested URL was not found on this server.",
        "notFound",
        "global",
    )
}

// ---------------------------------------------------------------------------------------------
// Compute.

/// What a compute call checks before listing: auth, injected faults, project, IAM, scopes.
fn precheck(s: &mut Inner, headers: &HeaderMap, project: &str) -> Result<(), Box<Response>> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(scopes) = token.and_then(|t| s.tokens.get(t)) else {
        return Err(Box::new(google_error(
            401,
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
            "authError",
            "global",
        )));
    };
    let scoped = scopes
        .iter()
        .any(|sc| sc == SCOPE_CLOUD_PLATFORM || sc == SCOPE_COMPUTE_RO || sc == SCOPE_COMPUTE);
    if let Some(code) = s.faults.next.pop_front() {
        return Err(Box::new(injected(code, s.vm.project_number)));
    }
    let Some(p) = s.projects.get(project) else {
        return Err(Box::new(google_error(
            404,
            &format!("The resource 'projects/{project}' was not found"),
            "notFound",
            "global",
        )));
    };
    if !scoped {
        return Err(Box::new(google_error(
            403,
            "Request had insufficient authentication scopes.",
            "insufficientPermissions",
            "global",
        )));
    }
    if p.denied {
        return Err(Box::new(google_error(
            403,
            &format!("Required 'compute.instances.list' permission for 'projects/{project}'"),
            "forbidden",
            "global",
        )));
    }
    Ok(())
}

/// `maxResults`: 0..=500, default 500; 0 means the default as well.
fn max_results(q: &HashMap<String, String>) -> Result<usize, Box<Response>> {
    match q.get("maxResults") {
        None => Ok(500),
        Some(v) => match v.parse::<usize>() {
            Ok(0) => Ok(500),
            Ok(n) if n <= 500 => Ok(n),
            _ => Err(Box::new(google_error(
                400,
                &format!(
                    "Invalid value for field 'maxResults': '{v}'. Must be less than or equal to 500"
                ),
                "invalid",
                "global",
            ))),
        },
    }
}

fn parse_filter(q: &HashMap<String, String>) -> Result<(String, filter::Filter), Box<Response>> {
    let raw = q.get("filter").cloned().unwrap_or_default();
    match filter::parse(&raw) {
        Ok(f) => Ok((raw, f)),
        Err(reason) => Err(Box::new(google_error(
            400,
            &format!(
                "Invalid value for field 'filter': '{raw}'. Invalid list filter expression ({reason})."
            ),
            "invalid",
            "global",
        ))),
    }
}

/// What a list call asks for: page size, filter and where the page starts.
struct Paging {
    max: usize,
    raw_filter: String,
    filter: filter::Filter,
    offset: usize,
}

/// Reads `maxResults`, `filter` and `pageToken` (bound to `scope` and the filter), or the
/// 400 that the first bad one gets.
fn paging(q: &HashMap<String, String>, scope: &str) -> Result<Paging, Box<Response>> {
    let max = max_results(q)?;
    let (raw_filter, filter) = parse_filter(q)?;
    let offset = page_offset(q, scope, &raw_filter)?;
    Ok(Paging {
        max,
        raw_filter,
        filter,
        offset,
    })
}

fn filter_hash(scope: &str, filter: &str) -> u64 {
    let mut h = DefaultHasher::new();
    scope.hash(&mut h);
    filter.hash(&mut h);
    h.finish()
}

/// Page tokens are opaque to clients: the offset and a hash of the listing they belong to.
fn page_token(offset: usize, scope: &str, filter: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{offset}:{:016x}", filter_hash(scope, filter)))
}

fn page_offset(
    q: &HashMap<String, String>,
    scope: &str,
    filter: &str,
) -> Result<usize, Box<Response>> {
    let Some(tok) = q.get("pageToken").filter(|t| !t.is_empty()) else {
        return Ok(0);
    };
    let bad = || -> Box<Response> {
        Box::new(google_error(
            400,
            &format!("Invalid value for field 'pageToken': '{tok}'. Invalid page token."),
            "invalid",
            "global",
        ))
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(tok)
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let (off, hash) = raw.split_once(':').ok_or_else(bad)?;
    if hash != format!("{:016x}", filter_hash(scope, filter)) {
        return Err(bad());
    }
    off.parse().map_err(|_| bad())
}

/// A fingerprint: bytes in the discovery document's `byte` format, which is padded base64
/// with the URL-safe alphabet (the SDK refuses `+` and `/`).
fn fingerprint(seed: &str) -> String {
    let mut h = DefaultHasher::new();
    seed.hash(&mut h);
    base64::engine::general_purpose::URL_SAFE.encode(h.finish().to_be_bytes())
}

/// An `Instance` resource in the documented JSON shape (the fields discovery reads and a
/// representative set of the others).
fn instance_json(project: &str, zone: &str, i: &Stored) -> Value {
    let zone_url = format!("{API_BASE}/projects/{project}/zones/{zone}");
    let region = zone.rsplit_once('-').map_or(zone, |(r, _)| r);
    let nics: Vec<Value> = i
        .spec
        .nics
        .iter()
        .enumerate()
        .map(|(n, nic)| {
            let mut v = json!({
                "kind": "compute#networkInterface",
                "name": format!("nic{n}"),
                "network": format!("{API_BASE}/projects/{project}/global/networks/net{n}"),
                "subnetwork": format!("{API_BASE}/projects/{project}/regions/{region}/subnetworks/subnet{n}"),
                "fingerprint": fingerprint(&format!("{}{n}", i.spec.name)),
                "stackType": match (nic.network_ip, nic.ipv6) {
                    (Some(_), Some(_)) => "IPV4_IPV6",
                    (None, Some(_)) => "IPV6_ONLY",
                    _ => "IPV4_ONLY",
                },
            });
            if let Some(ip) = nic.network_ip {
                v["networkIP"] = json!(ip.to_string());
            }
            // Internal IPv6: the address, its access type and the subnet's /96 prefix length.
            if let Some(ip6) = nic.ipv6 {
                v["ipv6Address"] = json!(ip6.to_string());
                v["ipv6AccessType"] = json!("INTERNAL");
                v["internalIpv6PrefixLength"] = json!(96);
            }
            v
        })
        .collect();
    let mut v = json!({
        "kind": "compute#instance",
        "id": i.id.to_string(),
        "creationTimestamp": "2026-01-01T00:00:00.000-08:00",
        "name": i.spec.name,
        "machineType": format!("{zone_url}/machineTypes/e2-small"),
        "status": i.spec.status,
        "zone": zone_url,
        "canIpForward": false,
        "networkInterfaces": nics,
        "selfLink": format!("{zone_url}/instances/{}", i.spec.name),
        "labelFingerprint": fingerprint(&format!("{:?}", i.spec.labels)),
        "fingerprint": fingerprint(&i.spec.name),
        "deletionProtection": false,
    });
    if !i.spec.labels.is_empty() {
        v["labels"] = json!(i.spec.labels);
    }
    v
}

fn matches(f: &filter::Filter, i: &Stored) -> bool {
    f.matches(&filter::Subject {
        name: &i.spec.name,
        status: &i.spec.status,
        labels: &i.spec.labels,
    })
}

/// The injected delay for a call that asks for a page after the first.
fn later_page_delay(f: &Faults, q: &HashMap<String, String>) -> Duration {
    if q.get("pageToken").is_some_and(|t| !t.is_empty()) {
        f.later_pages
    } else {
        Duration::ZERO
    }
}

fn record(state: &Shared, path: String, q: &HashMap<String, String>, status: u16, at: Instant) {
    lock(state).log.push(Recorded {
        path,
        query: q.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        status,
        at,
    });
}

async fn list_zone(
    State(state): State<Shared>,
    Path((project, zone)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let at = Instant::now();
    let delay = {
        let s = lock(&state);
        s.faults.delay
            + s.faults.zone_delay.get(&zone).copied().unwrap_or_default()
            + later_page_delay(&s.faults, &q)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let resp = list_zone_inner(&state, &project, &zone, &q, &headers);
    record(
        &state,
        format!("/compute/v1/projects/{project}/zones/{zone}/instances"),
        &q,
        resp.status().as_u16(),
        at,
    );
    resp
}

fn list_zone_inner(
    state: &Shared,
    project: &str,
    zone: &str,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Response {
    let mut s = lock(state);
    if let Err(r) = precheck(&mut s, headers, project) {
        return *r;
    }
    if let Some(&code) = s.faults.zone_status.get(zone) {
        return injected(code, s.vm.project_number);
    }
    let Some(instances) = s.projects.get(project).and_then(|p| p.zones.get(zone)) else {
        return google_error(
            404,
            &format!("The resource 'projects/{project}/zones/{zone}' was not found"),
            "notFound",
            "global",
        );
    };
    let scope = format!("{project}/{zone}");
    let pg = match paging(q, &scope) {
        Ok(pg) => pg,
        Err(r) => return *r,
    };
    let hits: Vec<&Stored> = instances
        .iter()
        .filter(|i| matches(&pg.filter, i))
        .collect();
    let page: Vec<Value> = hits
        .iter()
        .skip(pg.offset)
        .take(pg.max)
        .map(|i| instance_json(project, zone, i))
        .collect();
    let mut body = json!({
        "kind": "compute#instanceList",
        "id": format!("projects/{project}/zones/{zone}/instances"),
        "selfLink": format!("{API_BASE}/projects/{project}/zones/{zone}/instances"),
    });
    if !page.is_empty() {
        body["items"] = Value::Array(page);
    }
    if pg.offset + pg.max < hits.len() {
        body["nextPageToken"] = json!(page_token(pg.offset + pg.max, &scope, &pg.raw_filter));
    }
    json_ok(body)
}

fn json_ok(body: Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        body.to_string(),
    )
        .into_response()
}

async fn list_aggregated(
    State(state): State<Shared>,
    Path(project): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let at = Instant::now();
    let delay = {
        let s = lock(&state);
        s.faults.delay + later_page_delay(&s.faults, &q)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let resp = list_aggregated_inner(&state, &project, &q, &headers);
    record(
        &state,
        format!("/compute/v1/projects/{project}/aggregated/instances"),
        &q,
        resp.status().as_u16(),
        at,
    );
    resp
}

fn list_aggregated_inner(
    state: &Shared,
    project: &str,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Response {
    let mut s = lock(state);
    if let Err(r) = precheck(&mut s, headers, project) {
        return *r;
    }
    let scope = format!("{project}/aggregated");
    let pg = match paging(q, &scope) {
        Ok(pg) => pg,
        Err(r) => return *r,
    };
    let partial = q.get("returnPartialSuccess").map(String::as_str) == Some("true");
    let Some(p) = s.projects.get(project) else {
        return google_error(
            404,
            &format!("The resource 'projects/{project}' was not found"),
            "notFound",
            "global",
        );
    };
    // An unavailable zone does not fail the whole call: its scope carries an `UNREACHABLE`
    // warning (and, with `returnPartialSuccess=true`, is also listed in `unreachables`).
    let mut unreachable = Vec::new();
    let mut hits: Vec<(&str, &Stored)> = Vec::new();
    for (zone, list) in &p.zones {
        if s.faults.zone_status.contains_key(zone) {
            unreachable.push(zone.as_str());
            continue;
        }
        hits.extend(
            list.iter()
                .filter(|i| matches(&pg.filter, i))
                .map(|i| (zone.as_str(), i)),
        );
    }
    let mut per_zone: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for (zone, i) in hits.iter().skip(pg.offset).take(pg.max) {
        per_zone
            .entry(zone)
            .or_default()
            .push(instance_json(project, zone, i));
    }
    let mut items = serde_json::Map::new();
    for zone in p.zones.keys() {
        let key = format!("zones/{zone}");
        let scoped = if unreachable.contains(&zone.as_str()) {
            json!({
                "warning": {
                    "code": "UNREACHABLE",
                    "message": format!("Scope '{key}' is unreachable."),
                    "data": [{ "key": "scope", "value": key }],
                }
            })
        } else {
            match per_zone.remove(zone.as_str()) {
                Some(instances) => json!({ "instances": instances }),
                None => json!({
                    "warning": {
                        "code": "NO_RESULTS_ON_PAGE",
                        "message": format!("There are no results for scope '{key}' on this page."),
                        "data": [{ "key": "scope", "value": key }],
                    }
                }),
            }
        };
        items.insert(key, scoped);
    }
    let mut body = json!({
        "kind": "compute#instanceAggregatedList",
        "id": format!("projects/{project}/aggregated/instances"),
        "items": items,
        "selfLink": format!("{API_BASE}/projects/{project}/aggregated/instances"),
    });
    if pg.offset + pg.max < hits.len() {
        body["nextPageToken"] = json!(page_token(pg.offset + pg.max, &scope, &pg.raw_filter));
    }
    if partial && !unreachable.is_empty() {
        let list: Vec<String> = unreachable.iter().map(|z| format!("zones/{z}")).collect();
        body["unreachables"] = json!(list);
    }
    json_ok(body)
}

// ---------------------------------------------------------------------------------------------
// The metadata server.

fn md_text(body: String) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/text"),
            (header::HeaderName::from_static("metadata-flavor"), "Google"),
        ],
        body,
    )
        .into_response()
}

fn md_json(body: Value) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::HeaderName::from_static("metadata-flavor"), "Google"),
        ],
        body.to_string(),
    )
        .into_response()
}

fn md_error(code: StatusCode, body: &str) -> Response {
    (
        code,
        [
            (header::CONTENT_TYPE, "text/html; charset=UTF-8"),
            (header::HeaderName::from_static("metadata-flavor"), "Google"),
        ],
        body.to_string(),
    )
        .into_response()
}

async fn metadata(
    State(state): State<Shared>,
    Path(path): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let mut s = lock(&state);
    s.metadata_requests += 1;
    // The real server refuses requests without the header, and proxied ones, with 403.
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return md_error(
            StatusCode::FORBIDDEN,
            "Missing required header \"Metadata-Flavor\": \"Google\"\n",
        );
    }
    if headers.contains_key("x-forwarded-for") {
        return md_error(
            StatusCode::FORBIDDEN,
            "Request with X-Forwarded-For header is forbidden\n",
        );
    }
    let vm = s.vm.clone();
    let sa = |p: &str| {
        p.strip_prefix("instance/service-accounts/default/")
            .or_else(|| p.strip_prefix(&format!("instance/service-accounts/{}/", vm.email)))
            .map(str::to_owned)
    };
    match path.as_str() {
        "project/project-id" => md_text(vm.project_id),
        "project/numeric-project-id" => md_text(vm.project_number.to_string()),
        "instance/zone" => md_text(format!("projects/{}/zones/{}", vm.project_number, vm.zone)),
        "instance/service-accounts" | "instance/service-accounts/" => {
            md_text(format!("default/\n{}/\n", vm.email))
        }
        "universe/universe-domain" => md_text("googleapis.com".into()),
        p if p.starts_with("instance/attributes/") => {
            let key = &p["instance/attributes/".len()..];
            match vm.attributes.get(key) {
                Some(v) => md_text(v.clone()),
                None => md_error(StatusCode::NOT_FOUND, "Not Found\n"),
            }
        }
        p => match sa(p).as_deref() {
            Some("") if q.get("recursive").map(String::as_str) == Some("true") => md_json(json!({
                "aliases": ["default"],
                "email": vm.email,
                "scopes": vm.scopes,
            })),
            Some("") => md_text("aliases\nemail\nidentity\nscopes\ntoken\n".into()),
            Some("email") => md_text(vm.email),
            Some("aliases") => md_text("default\n".into()),
            Some("scopes") => md_text(vm.scopes.iter().map(|sc| format!("{sc}\n")).collect()),
            Some("token") => {
                let scopes: Vec<String> = match q.get("scopes") {
                    Some(list) => list.split(',').map(str::to_owned).collect(),
                    None => vm.scopes.clone(),
                };
                let n = s.tokens.len() + 1;
                let token = format!(
                    "ya29.fake-{n}-{:016x}",
                    filter_hash(&vm.email, &n.to_string())
                );
                s.tokens.insert(token.clone(), scopes);
                md_json(json!({
                    "access_token": token,
                    "expires_in": 3599,
                    "token_type": "Bearer",
                }))
            }
            _ => md_error(StatusCode::NOT_FOUND, "Not Found\n"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_are_bound_to_their_listing() {
        let t = page_token(500, "p/z", "status = RUNNING");
        let mut q = HashMap::new();
        q.insert("pageToken".to_string(), t);
        assert_eq!(page_offset(&q, "p/z", "status = RUNNING").ok(), Some(500));
        assert!(page_offset(&q, "p/z", "").is_err());
        assert!(page_offset(&q, "p/other", "status = RUNNING").is_err());
        q.insert("pageToken".to_string(), "garbage!".into());
        assert!(page_offset(&q, "p/z", "status = RUNNING").is_err());
    }

    #[test]
    fn max_results_accepts_0_to_500() {
        let mut q = HashMap::new();
        assert_eq!(max_results(&q).ok(), Some(500));
        q.insert("maxResults".to_string(), "7".to_string());
        assert_eq!(max_results(&q).ok(), Some(7));
        q.insert("maxResults".to_string(), "501".to_string());
        assert!(max_results(&q).is_err());
        q.insert("maxResults".to_string(), "-1".to_string());
        assert!(max_results(&q).is_err());
    }
}
