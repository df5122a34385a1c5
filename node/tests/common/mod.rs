//! Shared by node's integration tests, so none repeats a harness: the binary ([`BIN`]) and a
//! child whose stderr is collected ([`Node`]), a node run in-process on loopback with
//! ephemeral ports ([`InProcess`]), one GET (the node's own client, [`node::members`]), one
//! convergence predicate ([`converged`]) and the ports derived from the flags.

#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser as _;
use membership::{LoggedList, parse_logged_lists};
use node::cluster::view::{ClusterJson, MembersJson};
use node::logical::{Logical, Role};
use node::{Bound, Listen, NodeError};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_node");

/// How long one GET may take.
const GET_TIMEOUT: Duration = Duration::from_secs(5);

/// The flags a node gets from `args` (after `node`), as the binary parses them.
pub fn flags(args: &[&str]) -> node::cli::Flags {
    node::cli::Cli::try_parse_from(std::iter::once("node").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("flags {args:?}: {e}"))
        .flags
}

/// `--private_port` when not given.
pub const PRIVATE_PORT: u16 = node::cli::DEFAULT_PRIVATE_PORT;
/// The all-instances cluster's gossip port for a node on the default `--private_port`.
pub const ALL_PORT: u16 = PRIVATE_PORT + node::logical::ALL.offset;
/// The scheduler cluster's gossip port for a node on the default `--private_port`.
pub const SCHEDULER_PORT: u16 = PRIVATE_PORT + node::logical::SCHEDULER.offset;

/// `--private_port` when not given, as the CLI parses it.
pub fn default_private_port() -> u16 {
    flags(&[]).private_port
}

/// The gossip port of `cluster` for a node on the default `--private_port`.
pub fn port(cluster: &Logical) -> u16 {
    cluster
        .port(default_private_port())
        .expect("the default private port leaves room")
}

/// Runs the tests of one binary that hold it one at a time (namespace tests: two cores are
/// enough for one bed's nodes at a time).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A test bed of `hosts` network namespaces; fails naming `what` and the reason when this
/// machine cannot run it.
pub fn bed(hosts: usize, what: &str) -> testbed::Testbed {
    if let Err(e) = testbed::check_prerequisites() {
        panic!("the {what} network-namespace tests cannot run here: {e}");
    }
    testbed::Testbed::new(hosts).unwrap_or_else(|e| panic!("cannot build the test bed: {e}"))
}

/// One GET with the node's own client, from async code; the body of a 200 answer.
pub async fn get_async(addr: SocketAddr, path: &str) -> Result<String, String> {
    let (code, body) = request_async(addr, path).await?;
    if code != 200 {
        return Err(format!("{path} on {addr} answered {code}: {body}"));
    }
    Ok(body)
}

/// One GET with the node's own client, from async code; the status and the body.
pub async fn request_async(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let (code, body) = tokio::time::timeout(GET_TIMEOUT, node::members::request(addr, path))
        .await
        .map_err(|_| format!("{path} on {addr}: no answer within {GET_TIMEOUT:?}"))??;
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// One GET from a test thread; the body of a 200 answer.
pub fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    block_on(get_async(addr, path))
}

/// One GET from a test thread; the status and the body, whatever the status.
pub fn get_status(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    block_on(request_async(addr, path))
}

fn block_on<T>(f: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(f)
}

/// Runs `cmd` (a `node` command printing JSON, such as `discover --json`), which must succeed;
/// its standard output, parsed.
pub fn json_output(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.output().expect("run node");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// `GET /v1/members` from a test thread, parsed.
pub fn members(addr: SocketAddr) -> Option<MembersJson> {
    serde_json::from_str(&get(addr, "/v1/members").ok()?).ok()
}

/// The view of `cluster` in a `/v1/members` answer.
pub fn cluster<'a>(m: &'a MembersJson, cluster: &str) -> Option<&'a ClusterJson> {
    m.clusters.iter().find(|c| c.cluster == cluster)
}

/// Whether every node answered and holds the same `cluster` list (version and members, in
/// order) of exactly `n` members.
pub fn converged(views: &[Option<MembersJson>], name: &str, n: usize) -> bool {
    let lists: Vec<Option<(u64, Vec<&str>)>> = views
        .iter()
        .map(|v| {
            let c = cluster(v.as_ref()?, name)?;
            let uuids = c.members.iter().map(|m| m.uuid.as_str()).collect();
            Some((c.version, uuids))
        })
        .collect();
    lists
        .iter()
        .all(|l| l.as_ref().is_some_and(|(_, m)| m.len() == n) && *l == lists[0])
}

/// The same predicate over logged lists: whether every node's last list (one per node, `None`
/// when it logged none) has `size` members and all are identical (members in order, `ver`).
pub fn lists_agree(lasts: &[Option<LoggedList>], size: usize) -> bool {
    lasts
        .iter()
        .all(|l| l.as_ref().is_some_and(|l| l.size == size))
        && lasts
            .windows(2)
            .all(|w| w[0].as_ref().map(LoggedList::shape) == w[1].as_ref().map(LoggedList::shape))
}

/// Polls the async `pred` every 100 ms until it holds or `within` passes; its last value.
pub async fn eventually<F, Fut>(within: Duration, mut pred: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < end {
        if pred().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pred().await
}

/// A whole node run by [`node::run`] in this process; it leaves when [`InProcess::leave`] is
/// called and is stopped (without a leave) when dropped.
pub struct InProcess {
    /// The private IP.
    pub ip: IpAddr,
    /// The internal API.
    pub api: SocketAddr,
    /// The public listener, for schedulers.
    pub public: Option<SocketAddr>,
    /// The gossip address of each cluster it joined.
    pub gossip: Vec<(&'static str, SocketAddr)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), NodeError>>>,
}

impl InProcess {
    /// Binds a node of `role` on `ip` with ephemeral ports.
    pub async fn bind(ip: &str, role: Role) -> Bound {
        let ip: IpAddr = ip.parse().expect("an IP");
        Bound::listen(Listen::ephemeral(ip, role))
            .await
            .unwrap_or_else(|e| panic!("bind on {ip}: {e}"))
    }

    /// The `--static_members` entry that names a bound node.
    pub fn peer(b: &Bound) -> String {
        b.private_addr().to_string()
    }

    /// Runs the node on `bound` with the flags `args` (static discovery by default).
    pub fn start(bound: Bound, args: &[&str]) -> Self {
        let mut all = vec!["--discovery", "static", "--discovery_refresh", "1s"];
        all.extend_from_slice(args);
        let flags = flags(&all);
        let gossip = bound
            .clusters
            .iter()
            .map(|c| (c.logical.name, bound.gossip_addr(c.logical)))
            .collect();
        let (ip, api) = (bound.ip, bound.private_addr());
        let public = bound
            .public
            .as_ref()
            .map(|p| p.local_addr().expect("a bound public port"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(node::run(bound, flags, async move {
            let _ = rx.await;
        }));
        Self {
            ip,
            api,
            public,
            gossip,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// The gossip address of `cluster`.
    pub fn gossip(&self, cluster: &Logical) -> SocketAddr {
        self.gossip
            .iter()
            .find(|(n, _)| *n == cluster.name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("{} is not in {}", self.api, cluster.name))
    }

    /// `GET /v1/members`, parsed; `None` until the node answers.
    pub async fn members(&self) -> Option<MembersJson> {
        serde_json::from_str(&get_async(self.api, "/v1/members").await.ok()?).ok()
    }

    /// This node's view of `cluster`; panics when it does not answer.
    pub async fn view(&self, name: &str) -> ClusterJson {
        let m = self.members().await;
        m.as_ref()
            .and_then(|m| cluster(m, name))
            .cloned()
            .unwrap_or_else(|| panic!("no {name} view from {}", self.api))
    }

    /// Leaves every cluster gracefully and waits for [`node::run`] to return.
    pub async fn leave(mut self) -> Result<(), NodeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("run returns within 10 s of the shutdown")
            .expect("run did not panic")
    }
}

/// Waits until every node holds the same `cluster` list of `n` members.
pub async fn in_process_converged(nodes: &[&InProcess], name: &str, n: usize) -> bool {
    let mut views = Vec::new();
    for x in nodes {
        views.push(x.members().await);
    }
    converged(&views, name, n)
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A running process whose stderr is collected; SIGKILLed and reaped when dropped.
pub struct Node {
    pub child: Child,
    log: Arc<Mutex<String>>,
}

impl Node {
    /// Spawns `cmd` with stdin and stdout closed and stderr collected.
    pub fn spawn(mut cmd: Command) -> Node {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap_or_else(|p| p.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        Node { child, log }
    }

    /// Everything written to stderr so far.
    pub fn text(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every member list logged for the cluster on `port`, oldest first.
    pub fn lists(&self, port: u16) -> Vec<LoggedList> {
        parse_logged_lists(&self.text())
            .into_iter()
            .filter(|l| l.port() == Some(port))
            .collect()
    }

    /// The last member list logged for the cluster on `port`.
    pub fn last(&self, port: u16) -> Option<LoggedList> {
        self.lists(port).pop()
    }

    /// This node's UUID, from the `this` line of its last list on `port`.
    pub fn me(&self, port: u16) -> uuid::Uuid {
        self.last(port)
            .and_then(|l| l.members.into_iter().find(|m| m.this))
            .expect("a logged list")
            .uuid
    }

    /// Sends a signal by name (`TERM`, `KILL`, `HUP`).
    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `pred` until it holds or `within` passes; returns its last value.
pub fn wait_until(within: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if pred() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    pred()
}

/// Everything the nodes of this test binary logged, once [`capture_logs`] was called.
static LOGS: Mutex<String> = Mutex::new(String::new());

/// A writer that appends to [`LOGS`].
struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_str(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Collects the records of every in-process node of this test binary (they share one
/// subscriber, so tests tell their nodes apart by addresses in the records). Idempotent.
pub fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter("info")
        .with_writer(|| LogSink)
        .try_init();
}

/// The records collected so far.
pub fn logs() -> String {
    LOGS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}
