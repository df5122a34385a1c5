//! A Kubernetes API server fake for tests, following the public API reference.
//!
//! It serves HTTPS with a CA and server certificate generated per instance (rcgen), checks
//! bearer tokens (401/403 with `Status` objects), and serves pods and EndpointSlices with
//! `labelSelector`, `limit`/`continue` (consistent snapshots), `resourceVersion` and
//! `watch=true` streams of `ADDED`/`MODIFIED`/`DELETED` events. It also serves `GET` of one pod
//! (`/api/v1/namespaces/{ns}/pods/{name}`) and the cluster-scoped nodes (`/api/v1/nodes`,
//! `/api/v1/nodes/{name}`), which a token reads only when granted at the cluster scope
//! ([`FakeApi::grant_nodes`]); otherwise the answer is the API server's `403 Forbidden`
//! `Status`. Pages after the first can be delayed ([`FakeApi::delay_continued_lists`]). It runs
//! on its own thread and runtime, so both plain and async tests can drive it; dropping it stops
//! the server.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, oneshot};

pub mod selector;

use selector::Selector;

/// Why the fake could not start or write its files.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    /// Certificate generation failed.
    #[error("cannot generate the test certificates: {0}")]
    Cert(#[from] rcgen::Error),
    /// The TLS configuration was refused.
    #[error("cannot configure tls: {0}")]
    Tls(#[from] rustls::Error),
    /// Binding, spawning or writing files failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// The resources the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Res {
    Pods,
    EndpointSlices,
    /// Cluster-scoped: stored under the namespace "".
    Nodes,
}

impl Res {
    fn plural(self) -> &'static str {
        match self {
            Res::Pods => "pods",
            Res::EndpointSlices => "endpointslices",
            Res::Nodes => "nodes",
        }
    }
    fn group(self) -> &'static str {
        match self {
            Res::Pods | Res::Nodes => "",
            Res::EndpointSlices => "discovery.k8s.io",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Res::Pods | Res::Nodes => "v1",
            Res::EndpointSlices => "discovery.k8s.io/v1",
        }
    }
    fn list_kind(self) -> &'static str {
        match self {
            Res::Pods => "PodList",
            Res::EndpointSlices => "EndpointSliceList",
            Res::Nodes => "NodeList",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Res::Pods => "Pod",
            Res::EndpointSlices => "EndpointSlice",
            Res::Nodes => "Node",
        }
    }
}

type Key = (Res, String, String);
type Objects = BTreeMap<Key, Value>;

/// One stored change, for watches that start from an older resourceVersion.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    key: Key,
    old: Option<Value>,
    new: Option<Value>,
}

/// What one bearer token may do.
#[derive(Debug, Clone)]
struct Grant {
    user: String,
    namespaces: Vec<String>,
    watch: bool,
    /// get, list and watch nodes (a ClusterRole bound at the cluster scope).
    nodes: bool,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: Objects,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get `410 Gone`.
    oldest_watchable: u64,
    /// Every watch from a resourceVersion gets `410 Gone`, however recent.
    always_gone: bool,
    /// Snapshots that `continue` tokens read from, by resourceVersion.
    snapshots: BTreeMap<u64, Arc<Objects>>,
    grants: HashMap<String, Grant>,
    requests: Vec<String>,
    /// A delay for every list request that carries a `continue` token.
    continue_delay: Duration,
    uid: u64,
}

fn put_locked(
    s: &mut State,
    events: &broadcast::Sender<Change>,
    res: Res,
    ns: &str,
    mut obj: Value,
) -> u64 {
    s.rv += 1;
    s.uid += 1;
    let rv = s.rv;
    let name = obj["metadata"]["name"].as_str().unwrap_or("").to_owned();
    let key = (res, ns.to_owned(), name);
    let old = s.objects.get(&key).cloned();
    let meta = &mut obj["metadata"];
    meta["namespace"] = json!(ns);
    meta["resourceVersion"] = json!(rv.to_string());
    let uid = old
        .as_ref()
        .map(|o| o["metadata"]["uid"].clone())
        .unwrap_or_else(|| json!(format!("00000000-0000-4000-8000-{:012}", s.uid)));
    meta["uid"] = uid;
    if meta.get("creationTimestamp").is_none_or(Value::is_null) {
        meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    s.objects.insert(key.clone(), obj.clone());
    let change = Change {
        rv,
        key,
        old,
        new: Some(obj),
    };
    s.history.push(change.clone());
    let _ = events.send(change);
    rv
}

/// A running fake API server; dropping it stops the server.
#[derive(Debug)]
pub struct FakeApi {
    addr: SocketAddr,
    ca_pem: String,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Change>,
    kick: Arc<tokio::sync::watch::Sender<u64>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeApi {
    /// Starts a server on `ip` (a loopback or test-namespace address) and an ephemeral port.
    pub fn start(ip: IpAddr) -> Result<FakeApi, FakeError> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "k8s-fake test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
        let server_key = rcgen::KeyPair::generate()?;
        let mut server_params = rcgen::CertificateParams::new(vec![
            ip.to_string(),
            "localhost".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ])?;
        server_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver");
        let server_cert = server_params.signed_by(&server_key, &ca)?;

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![server_cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
            )?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let std_listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            rv: 1000,
            oldest_watchable: 1000,
            ..State::default()
        }));
        let (events, _) = broadcast::channel(4096);
        let (stop_tx, stop_rx) = oneshot::channel();
        let kick = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let shared = Shared {
            state: state.clone(),
            events: events.clone(),
            kick: kick.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("k8s-fake".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("k8s-fake: cannot start a runtime: {e}");
                        return;
                    }
                };
                rt.block_on(serve(std_listener, acceptor, shared, stop_rx));
            })?;
        Ok(FakeApi {
            addr,
            ca_pem: ca.pem(),
            state,
            events,
            kick,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://ip:port`.
    pub fn url(&self) -> String {
        match self.addr.ip() {
            IpAddr::V6(v6) => format!("https://[{v6}]:{}", self.addr.port()),
            IpAddr::V4(v4) => format!("https://{v4}:{}", self.addr.port()),
        }
    }

    /// The CA that signed the server certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Lets `token` get, list and watch in `namespaces`, as service account `sa` of the first.
    pub fn grant(&self, token: &str, namespaces: &[&str]) {
        self.insert_grant(token, namespaces, true);
    }

    /// Lets `token` get and list, but not watch, in `namespaces`.
    pub fn grant_without_watch(&self, token: &str, namespaces: &[&str]) {
        self.insert_grant(token, namespaces, false);
    }

    fn insert_grant(&self, token: &str, namespaces: &[&str], watch: bool) {
        let first = namespaces.first().copied().unwrap_or("default");
        lock(&self.state).grants.insert(
            token.to_owned(),
            Grant {
                user: format!("system:serviceaccount:{first}:cluster-start"),
                namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
                watch,
                nodes: false,
            },
        );
    }

    /// Also lets `token` get, list and watch nodes, as a ClusterRole bound with a
    /// ClusterRoleBinding does; a token without it gets `403 Forbidden` for nodes.
    pub fn grant_nodes(&self, token: &str) {
        if let Some(g) = lock(&self.state).grants.get_mut(token) {
            g.nodes = true;
        }
    }

    /// Every list request that carries a `continue` token (every page after the first) is
    /// answered `delay` later (zero clears it), so tests can see what a client does with the
    /// first page before the last one is served.
    pub fn delay_continued_lists(&self, delay: Duration) {
        lock(&self.state).continue_delay = delay;
    }

    /// Creates or replaces a node (cluster-scoped); returns the new resourceVersion.
    pub fn put_node(&self, node: &Node) -> u64 {
        self.put(Res::Nodes, "", to_value(node))
    }

    /// Every request so far, as `path?query`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.state).requests.clone()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.state).rv
    }

    /// Simulates an API server restart during which `pod` changed and etcd compacted: every
    /// open watch closes without seeing the change (the server was down when it happened),
    /// and a watch that resumes from an older resourceVersion gets `410 Gone`, so only a new
    /// list shows the change. All of it happens under one lock, so no watch can slip in
    /// between.
    pub fn restart_with_change(&self, ns: &str, pod: &Pod) -> u64 {
        let mut s = lock(&self.state);
        self.kick.send_modify(|k| *k += 1);
        // No open watch hears of this change.
        let (unheard, _) = broadcast::channel(1);
        let rv = put_locked(&mut s, &unheard, Res::Pods, ns, to_value(pod));
        s.history.clear();
        s.oldest_watchable = s.rv;
        s.snapshots.clear();
        rv
    }

    /// Forgets the change history, so watches from an older resourceVersion get `410 Gone`
    /// and old `continue` tokens expire, as after an etcd compaction.
    pub fn compact(&self) {
        let mut s = lock(&self.state);
        s.history.clear();
        s.oldest_watchable = s.rv;
        s.snapshots.clear();
    }

    /// While `on`, every watch that resumes from a resourceVersion gets `410 Gone`, as from a
    /// server whose watch cache keeps falling behind its lists.
    pub fn always_expire_watches(&self, on: bool) {
        lock(&self.state).always_gone = on;
    }

    fn put(&self, res: Res, ns: &str, obj: Value) -> u64 {
        let mut s = lock(&self.state);
        put_locked(&mut s, &self.events, res, ns, obj)
    }

    fn remove(&self, res: Res, ns: &str, name: &str) -> bool {
        let mut s = lock(&self.state);
        let key = (res, ns.to_owned(), name.to_owned());
        let Some(old) = s.objects.remove(&key) else {
            return false;
        };
        s.rv += 1;
        let change = Change {
            rv: s.rv,
            key,
            old: Some(old),
            new: None,
        };
        s.history.push(change.clone());
        let _ = self.events.send(change);
        true
    }

    /// Creates or replaces a pod (`ADDED` or `MODIFIED`); returns the new resourceVersion.
    pub fn put_pod(&self, ns: &str, pod: &Pod) -> u64 {
        self.put(Res::Pods, ns, to_value(pod))
    }

    /// Deletes a pod at once (`DELETED`); false if it did not exist.
    pub fn delete_pod(&self, ns: &str, name: &str) -> bool {
        self.remove(Res::Pods, ns, name)
    }

    /// Starts a graceful deletion: sets `deletionTimestamp` (`MODIFIED`), as the API server does
    /// before the kubelet stops the containers.
    pub fn terminate_pod(&self, ns: &str, name: &str) -> bool {
        let current = {
            let s = lock(&self.state);
            s.objects
                .get(&(Res::Pods, ns.to_owned(), name.to_owned()))
                .cloned()
        };
        let Some(mut obj) = current else {
            return false;
        };
        obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:10:00Z");
        obj["metadata"]["deletionGracePeriodSeconds"] = json!(30);
        self.put(Res::Pods, ns, obj);
        true
    }

    /// Creates or replaces an EndpointSlice; returns the new resourceVersion.
    pub fn put_endpoint_slice(&self, ns: &str, slice: &EndpointSlice) -> u64 {
        self.put(Res::EndpointSlices, ns, to_value(slice))
    }

    /// Deletes an EndpointSlice; false if it did not exist.
    pub fn delete_endpoint_slice(&self, ns: &str, name: &str) -> bool {
        self.remove(Res::EndpointSlices, ns, name)
    }

    /// Writes `token`, `ca.crt` and `namespace` into `dir`, like a service account mount.
    pub fn write_service_account(
        &self,
        dir: &Path,
        token: &str,
        namespace: &str,
    ) -> Result<(), FakeError> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("token"), token)?;
        std::fs::write(dir.join("ca.crt"), &self.ca_pem)?;
        std::fs::write(dir.join("namespace"), namespace)?;
        Ok(())
    }

    /// Writes a kubeconfig for this server with a token user and a context namespace; the CA
    /// goes next to it as `<path>.ca.crt`, referenced by `certificate-authority`.
    pub fn write_kubeconfig(
        &self,
        path: &Path,
        token: &str,
        namespace: &str,
    ) -> Result<(), FakeError> {
        let mut ca_path = path.as_os_str().to_owned();
        ca_path.push(".ca.crt");
        let ca_path = std::path::PathBuf::from(ca_path);
        std::fs::write(&ca_path, &self.ca_pem)?;
        let text = format!(
            "# A kubeconfig written by k8s-fake for one test.\napiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: tester\n  user:\n    token: {token}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n    namespace: {namespace}\ncurrent-context: fake\n",
            self.url(),
            ca_path.display()
        );
        std::fs::write(path, text)?;
        Ok(())
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// A node as the API server shows it, labelled with its zone (`topology.kubernetes.io/zone`)
/// and region when given.
pub fn node_in_zone(name: &str, zone: Option<&str>) -> Node {
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_owned(), name.to_owned()),
        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
    ]);
    if let Some(z) = zone {
        labels.insert("topology.kubernetes.io/zone".to_owned(), z.to_owned());
        let region = z.rsplit_once('-').map_or(z, |(r, _)| r);
        labels.insert(
            "topology.kubernetes.io/region".to_owned(),
            region.to_owned(),
        );
    }
    let v = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"podCIDR": "198.18.128.0/24"},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "addresses": [{"type": "Hostname", "address": name}],
        },
    });
    serde_json::from_value(v).unwrap_or_default()
}

/// A pod as the API server would show it once scheduled: phase `Running`, `podIP` set, ready.
pub fn running_pod(name: &str, ip: &str, labels: &[(&str, &str)]) -> Pod {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let v = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "node", "image": "cluster-start:test"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    });
    serde_json::from_value(v).unwrap_or_default()
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Change>,
    kick: Arc<tokio::sync::watch::Sender<u64>>,
}

async fn serve(
    listener: std::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Shared,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("k8s-fake: {e}");
            return;
        }
    };
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => continue,
            },
            _ = &mut stop => return,
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                async move {
                    let delay = continued_list_delay(&shared, req.uri().query());
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, Infallible>(handle(&shared, req))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

/// The injected delay for a list page after the first (a request with a `continue` token).
fn continued_list_delay(shared: &Shared, query: Option<&str>) -> Duration {
    let q = query_map(query);
    if q.get("continue").is_some_and(|c| !c.is_empty()) {
        lock(&shared.state).continue_delay
    } else {
        Duration::ZERO
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn status_object(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut v = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        v["details"] = d;
    }
    v
}

fn status(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Response<Body> {
    json_response(
        code,
        &status_object(code.as_u16(), reason, message, details),
    )
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_map(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// The resource, its namespace ("" for nodes) and, for a `GET` of one object, its name.
fn route(path: &str) -> Option<(Res, String, Option<String>)> {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match parts.as_slice() {
        ["", "api", "v1", "namespaces", ns, "pods"] => Some((Res::Pods, ns.to_string(), None)),
        ["", "api", "v1", "namespaces", ns, "pods", name] => {
            Some((Res::Pods, ns.to_string(), Some(name.to_string())))
        }
        ["", "api", "v1", "nodes"] => Some((Res::Nodes, String::new(), None)),
        ["", "api", "v1", "nodes", name] => {
            Some((Res::Nodes, String::new(), Some(name.to_string())))
        }
        [
            "",
            "apis",
            "discovery.k8s.io",
            "v1",
            "namespaces",
            ns,
            "endpointslices",
        ] => Some((Res::EndpointSlices, ns.to_string(), None)),
        _ => None,
    }
}

fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn encode_continue(rv: u64, after: &str) -> String {
    let raw = json!({"rv": rv, "start": after}).to_string();
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Option<(u64, String)> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let v: Value = serde_json::from_slice(&bytes?).ok()?;
    Some((v["rv"].as_u64()?, v["start"].as_str()?.to_owned()))
}

fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    lock(&shared.state).requests.push(match &query {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    });
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let grant = token.and_then(|t| lock(&shared.state).grants.get(&t).cloned());
    let Some(grant) = grant else {
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
            None,
        );
    };
    let Some((res, ns, name)) = route(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
            None,
        );
    };
    let q = query_map(query.as_deref());
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&name, watching) {
        (Some(_), _) => "get",
        (None, true) => "watch",
        (None, false) => "list",
    };
    if req.method() != hyper::Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            None,
        );
    }
    let allowed = match res {
        Res::Nodes => grant.nodes,
        _ => grant.namespaces.contains(&ns) && (!watching || grant.watch),
    };
    if !allowed {
        return forbidden(res, &ns, name.as_deref(), verb, &grant.user);
    }
    if let Some(name) = name {
        return get_one(shared, res, &ns, &name);
    }
    let selector = match Selector::parse(q.get("labelSelector").map_or("", String::as_str)) {
        Ok(s) => s,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("unable to parse requirement: {e}"),
                None,
            );
        }
    };
    if watching {
        watch(shared, res, ns, selector, &q)
    } else {
        list(shared, res, ns, selector, &q)
    }
}

/// The API server's `403` for `user`: the object (when one is named), the verb, the resource
/// and where ("in the namespace" or "at the cluster scope").
fn forbidden(res: Res, ns: &str, name: Option<&str>, verb: &str, user: &str) -> Response<Body> {
    let group = res.group();
    let plural = res.plural();
    let what = match name {
        Some(n) => format!("{plural} \"{n}\""),
        None => plural.to_owned(),
    };
    let scope = match res {
        Res::Nodes => "at the cluster scope".to_owned(),
        _ => format!("in the namespace \"{ns}\""),
    };
    let mut details = json!({"kind": plural});
    if !group.is_empty() {
        details["group"] = json!(group);
    }
    if let Some(n) = name {
        details["name"] = json!(n);
    }
    status(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &format!(
            "{what} is forbidden: User \"{user}\" cannot {verb} resource \"{plural}\" in API group \"{group}\" {scope}"
        ),
        Some(details),
    )
}

/// `GET` of one object: the object with its `apiVersion` and `kind`, or `404 NotFound`.
fn get_one(shared: &Shared, res: Res, ns: &str, name: &str) -> Response<Body> {
    let found = lock(&shared.state)
        .objects
        .get(&(res, ns.to_owned(), name.to_owned()))
        .cloned();
    match found {
        Some(mut obj) => {
            obj["apiVersion"] = json!(res.api_version());
            obj["kind"] = json!(res.kind());
            json_response(StatusCode::OK, &obj)
        }
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} \"{name}\" not found", res.plural()),
            Some(json!({"name": name, "kind": res.plural()})),
        ),
    }
}

fn list(
    shared: &Shared,
    res: Res,
    ns: String,
    selector: Selector,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let limit = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => None,
        Some(Ok(l)) if l > 0 => Some(l as usize),
        Some(Ok(_)) => None,
        Some(Err(_)) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "limit: must be an integer",
                None,
            );
        }
    };
    let mut s = lock(&shared.state);
    if let Some(rv) = q.get("resourceVersion").filter(|v| !v.is_empty()) {
        match rv.parse::<u64>() {
            Ok(n) if n > s.rv => {
                return status(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Timeout",
                    &format!("Too large resource version: {n}, current: {}", s.rv),
                    Some(
                        json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}),
                    ),
                );
            }
            Ok(_) => {}
            Err(_) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid resource version \"{rv}\""),
                    None,
                );
            }
        }
    }
    let (snapshot, rv, start) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let Some((rv, start)) = decode_continue(token) else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "continue key is not valid: illegal base64 data",
                    None,
                );
            };
            match s.snapshots.get(&rv) {
                Some(snap) => (snap.clone(), rv, Some(start)),
                None => {
                    return status(
                        StatusCode::GONE,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                        None,
                    );
                }
            }
        }
        None => (Arc::new(s.objects.clone()), s.rv, None),
    };
    let matching: Vec<(&String, &Value)> = snapshot
        .iter()
        .filter(|((r, n, name), obj)| {
            *r == res
                && *n == ns
                && start.as_ref().is_none_or(|st| name > st)
                && selector.matches(&labels_of(obj))
        })
        .map(|((_, _, name), obj)| (name, obj))
        .collect();
    let take = limit.unwrap_or(usize::MAX).min(matching.len());
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if take < matching.len() {
        metadata["continue"] = json!(encode_continue(rv, matching[take - 1].0));
        metadata["remainingItemCount"] = json!(matching.len() - take);
        s.snapshots.entry(rv).or_insert_with(|| snapshot.clone());
        while s.snapshots.len() > 64 {
            s.snapshots.pop_first();
        }
    }
    let items: Vec<Value> = matching[..take]
        .iter()
        .map(|(_, obj)| {
            let mut o = (*obj).clone();
            if let Some(m) = o.as_object_mut() {
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    drop(s);
    json_response(
        StatusCode::OK,
        &json!({
            "kind": res.list_kind(),
            "apiVersion": res.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    )
}

/// The event a watcher with `selector` sees for `change`, if any (selector transitions become
/// `ADDED` and `DELETED`, as in the API server).
fn translate(c: &Change, res: Res, ns: &str, selector: &Selector) -> Option<Value> {
    if c.key.0 != res || c.key.1 != ns {
        return None;
    }
    let m = |o: &Option<Value>| o.as_ref().is_some_and(|o| selector.matches(&labels_of(o)));
    let (kind, mut obj) = match (m(&c.old), m(&c.new)) {
        (false, true) => ("ADDED", c.new.clone()?),
        (true, true) => ("MODIFIED", c.new.clone()?),
        (true, false) => ("DELETED", c.new.clone().or_else(|| c.old.clone())?),
        (false, false) => return None,
    };
    obj["metadata"]["resourceVersion"] = json!(c.rv.to_string());
    Some(json!({"type": kind, "object": obj}))
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

fn watch(
    shared: &Shared,
    res: Res,
    ns: String,
    selector: Selector,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800)
        .min(3600);
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let since = q.get("resourceVersion").cloned().unwrap_or_default();
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    // Subscribe before reading the state, so no change falls between the two.
    let mut live = shared.events.subscribe();
    let mut kick = shared.kick.subscribe();
    let (initial, mut last, expired) = {
        let s = lock(&shared.state);
        let mut initial = Vec::new();
        let mut expired = false;
        if since.is_empty() || since == "0" {
            for ((r, n, _), obj) in &s.objects {
                if *r == res && *n == ns && selector.matches(&labels_of(obj)) {
                    initial.push(line(&json!({"type": "ADDED", "object": obj})));
                }
            }
        } else {
            match since.parse::<u64>() {
                Ok(n) if n >= s.oldest_watchable && !s.always_gone => {
                    for c in s.history.iter().filter(|c| c.rv > n) {
                        if let Some(ev) = translate(c, res, &ns, &selector) {
                            initial.push(line(&ev));
                        }
                    }
                }
                Ok(n) => {
                    expired = true;
                    let st = status_object(
                        410,
                        "Expired",
                        &format!("too old resource version: {n} ({})", s.oldest_watchable),
                        None,
                    );
                    initial.push(line(&json!({"type": "ERROR", "object": st})));
                }
                Err(_) => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("invalid resource version \"{since}\""),
                        None,
                    );
                }
            }
        }
        (initial, s.rv, expired)
    };
    let api_version = res.api_version();
    let kind = res.kind();
    tokio::spawn(async move {
        for b in initial {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        if expired {
            return;
        }
        let end = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(end) => return,
                _ = tx.closed() => return,
                _ = kick.changed() => return,
                _ = tick.tick(), if bookmarks => {
                    let b = json!({"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": last.to_string()}}});
                    if tx.send(line(&b)).await.is_err() {
                        return;
                    }
                }
                ev = live.recv() => match ev {
                    Ok(c) => {
                        if c.rv <= last {
                            continue;
                        }
                        last = c.rv;
                        if let Some(ev) = translate(&c, res, &ns, &selector)
                            && tx.send(line(&ev)).await.is_err()
                        {
                            return;
                        }
                    }
                    // A watcher that fell behind is closed; the client watches again.
                    Err(_) => return,
                },
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
