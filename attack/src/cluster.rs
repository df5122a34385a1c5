//! The honest cluster under attack: scheduler nodes in test-bed namespaces, the third-party
//! listener, and the readings every row is made of (logged lists, RSS, bytes, kill checks).

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use membership::LoggedList;
use testbed::{ProcId, Testbed};
use uuid::Uuid;

use crate::AttackError;

/// `--private_port`: the internal HTTP API.
pub const PRIVATE_PORT: u16 = 8081;
/// `--public_port`: the public HTTP listener of schedulers.
pub const PUBLIC_PORT: u16 = 8080;
/// The scheduler cluster's gossip port.
pub const SCHEDULER_PORT: u16 = 9081;
/// The all-instances cluster's gossip port.
pub const ALL_PORT: u16 = 10081;
/// Both gossip ports.
pub const GOSSIP_PORTS: [u16; 2] = [SCHEDULER_PORT, ALL_PORT];
/// Every port a node listens on.
pub const NODE_PORTS: [u16; 4] = [PUBLIC_PORT, PRIVATE_PORT, SCHEDULER_PORT, ALL_PORT];
/// `--cluster_name` of every node.
pub const CLUSTER_NAME: &str = "attack";
/// A list version above this counts as captured: honest clusters never get near it.
const SANE_VERSION: u64 = 1 << 40;
/// How long survivors have to log the smaller list after a kill.
const KILL_DEADLINE: Duration = Duration::from_secs(12);

/// The programs the harness runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The `node` binary.
    pub node: PathBuf,
    /// The `attack-sink` binary (the third-party listener).
    pub sink: PathBuf,
}

/// A scratch directory for key files, removed on drop.
#[derive(Debug)]
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a key file readable only by its owner.
fn write_key_file(dir: &Path, name: &str) -> Result<PathBuf, AttackError> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    let io = |source| AttackError::Io {
        what: format!("cannot write {}", path.display()),
        source,
    };
    std::fs::write(&path, format!("{}\n", keyring::generate())).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(path)
}

/// One cluster of honest scheduler nodes, with or without a key, and its test bed.
///
/// Hosts `0..n` run the honest nodes, host `n` the third-party listener and host `n + 1` the
/// wrong-key member when that attack runs. Dropping it stops everything (the bed's `Drop`).
#[derive(Debug)]
pub struct Cluster {
    bed: Testbed,
    bins: Binaries,
    key: bool,
    n: usize,
    key_file: Option<PathBuf>,
    wrong_key_file: PathBuf,
    nodes: Vec<ProcId>,
    started: Vec<Instant>,
    sink: ProcId,
    _dir: Scratch,
}

impl Cluster {
    /// Creates the bed, starts the third-party listener and `n` nodes, and waits until they
    /// agree on one list of `n` in both logical clusters.
    pub fn start(bins: &Binaries, key: bool, n: usize) -> Result<Cluster, AttackError> {
        testbed::check_prerequisites()?;
        raise_fd_limit();
        let mut bed = Testbed::new(n + 2)?;
        let dir = std::env::temp_dir().join(format!("attack-{}", bed.prefix()));
        std::fs::create_dir_all(&dir).map_err(|source| AttackError::Io {
            what: format!("cannot create {}", dir.display()),
            source,
        })?;
        let scratch = Scratch(dir.clone());
        let key_file = if key {
            Some(write_key_file(&dir, "cluster.key")?)
        } else {
            None
        };
        let wrong_key_file = write_key_file(&dir, "wrong.key")?;
        let third = bed.host(n).ip.to_string();
        let ports = format!("{SCHEDULER_PORT},{ALL_PORT}");
        let mut cmd = Command::new(&bins.sink);
        // Bounded in time: it outlives any suite, and the bed kills it on drop anyway.
        cmd.args([third.as_str(), ports.as_str(), "3600"]);
        let sink = bed.spawn(n, "third-party", cmd)?;
        let mut c = Cluster {
            bed,
            bins: bins.clone(),
            key,
            n,
            key_file,
            wrong_key_file,
            nodes: Vec::new(),
            started: Vec::new(),
            sink,
            _dir: scratch,
        };
        for host in 0..n {
            let id = c.spawn_node(host)?;
            c.nodes.push(id);
            c.started.push(Instant::now());
        }
        c.wait_healthy(Duration::from_secs(40))?;
        Ok(c)
    }

    /// Whether the nodes run with a key.
    pub fn key(&self) -> bool {
        self.key
    }

    /// The bed.
    pub fn bed(&self) -> &Testbed {
        &self.bed
    }

    /// The honest nodes' addresses, host order.
    pub fn ips(&self) -> Vec<Ipv4Addr> {
        (0..self.n).map(|h| self.bed.host(h).ip).collect()
    }

    /// The third party's address.
    pub fn third_ip(&self) -> Ipv4Addr {
        self.bed.host(self.n).ip
    }

    /// The address the attacker binds: the bridge, in the root namespace.
    pub fn attacker_ip(&self) -> Ipv4Addr {
        self.bed.bridge_ip()
    }

    /// An address in the bed's subnet that no host holds (`i` below 512), for fake members:
    /// packets to it never leave the bridge, and nobody answers.
    pub fn unused_ip(&self, i: u32) -> Ipv4Addr {
        let base = u32::from(self.bed.bridge_ip()) - 1;
        Ipv4Addr::from(base + 500 + (i % 512))
    }

    /// The honest processes, host order.
    pub fn nodes(&self) -> &[ProcId] {
        &self.nodes
    }

    fn node_cmd(&self, host: usize, key: Option<&Path>) -> Command {
        let ip = self.bed.host(host).ip;
        let peers: Vec<String> = self.ips().iter().map(Ipv4Addr::to_string).collect();
        let mut cmd = Command::new(&self.bins.node);
        cmd.args(["--role", "scheduler", "--discovery", "static"])
            .args(["--private_ip_selector", &format!("{ip}/32")])
            .args(["--static_members", &peers.join(",")])
            .args(["--discovery_refresh", "1s", "--cluster_name", CLUSTER_NAME])
            .env("RUST_LOG", "info")
            .env_remove("NODE_CLUSTER_KEY_FILE");
        if let Some(k) = key {
            cmd.arg("--cluster_key_file").arg(k);
        }
        cmd
    }

    fn spawn_node(&mut self, host: usize) -> Result<ProcId, AttackError> {
        let cmd = self.node_cmd(host, self.key_file.clone().as_deref());
        Ok(self.bed.spawn(host, &format!("node-{host}"), cmd)?)
    }

    /// Starts the wrong-key member: a real node holding a key the cluster does not (in keyless
    /// runs, any key at all), that knows every honest node.
    pub fn spawn_wrong_key_member(&mut self) -> Result<ProcId, AttackError> {
        let cmd = self.node_cmd(self.n + 1, Some(&self.wrong_key_file.clone()));
        Ok(self.bed.spawn(self.n + 1, "wrong-key", cmd)?)
    }

    /// Kills every honest node and starts a fresh cluster on the same hosts.
    pub fn rebuild(&mut self) -> Result<(), AttackError> {
        eprintln!("attack: rebuilding the cluster (key: {})", self.key);
        for &id in &self.nodes {
            self.bed.kill9(id);
        }
        for host in 0..self.n {
            self.nodes[host] = self.spawn_node(host)?;
            self.started[host] = Instant::now();
        }
        self.wait_healthy(Duration::from_secs(40))
    }

    /// The last list a node logged for a gossip port.
    fn last_list(&self, id: ProcId, port: u16) -> Option<LoggedList> {
        self.bed
            .logs()
            .lists(id)
            .into_iter()
            .rev()
            .find(|l| l.port() == Some(port))
    }

    /// Whether every node runs and, in both logical clusters, every node's last list holds
    /// all `n` members, the same on every node, at a sane version.
    pub fn healthy(&self) -> bool {
        if self
            .nodes
            .iter()
            .any(|&id| self.bed.exit_status(id).is_some())
        {
            return false;
        }
        GOSSIP_PORTS.iter().all(|&port| {
            let lists: Vec<Option<LoggedList>> = self
                .nodes
                .iter()
                .map(|&id| self.last_list(id, port))
                .collect();
            let Some(Some(first)) = lists.first() else {
                return false;
            };
            lists.iter().all(|l| {
                l.as_ref().is_some_and(|l| {
                    l.size == self.n && l.ver < SANE_VERSION && l.shape() == first.shape()
                })
            })
        })
    }

    fn wait_healthy(&self, limit: Duration) -> Result<(), AttackError> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if self.healthy() {
                // Let late list pushes and gossip settle before anything is measured.
                std::thread::sleep(Duration::from_secs(1));
                if self.healthy() {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(AttackError::Cluster(format!(
            "the honest cluster (key: {}) did not converge on {} members within {limit:?}\n{}",
            self.key,
            self.n,
            self.bed.summary()
        )))
    }

    /// Waits for a healthy cluster; rebuilds it once if it does not get there.
    pub fn ensure_healthy(&mut self) -> Result<(), AttackError> {
        if self.wait_healthy(Duration::from_secs(20)).is_ok() {
            return Ok(());
        }
        self.rebuild()
    }

    /// How much each honest node has logged so far: the start of what the next reading sees.
    pub fn log_marks(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .map(|&id| self.bed.log(id).len())
            .collect()
    }

    /// Lists node `i` logged after `mark` (from [`Cluster::log_marks`]).
    pub fn lists_since(&self, i: usize, mark: usize) -> Vec<LoggedList> {
        let text = self.bed.log(self.nodes[i]);
        // The bed halves a log that grows past its cap; then everything it holds is new.
        let new = text.get(mark..).unwrap_or(&text);
        membership::parse_logged_lists(new)
    }

    /// Whether any honest node logged a list after its mark.
    pub fn any_list_since(&self, marks: &[usize]) -> bool {
        marks
            .iter()
            .enumerate()
            .any(|(i, &m)| !self.lists_since(i, m).is_empty())
    }

    /// Every honest node's process id, for RSS readings.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|&id| self.bed.pid(id)).collect()
    }

    /// Bytes the third-party listener received so far, UDP and TCP together.
    pub fn third_party_bytes(&self) -> u64 {
        let text = self.bed.log(self.sink);
        text.lines()
            .rev()
            .find_map(|l| {
                let rest = l.strip_prefix("sink ")?;
                let rest = rest.strip_prefix("ready ").unwrap_or(rest);
                let (udp, tcp) = rest.split_once(' ')?;
                let udp: u64 = udp.strip_prefix("udp=")?.parse().ok()?;
                let tcp: u64 = tcp.strip_prefix("tcp=")?.parse().ok()?;
                Some(udp + tcp)
            })
            .unwrap_or(0)
    }

    /// The UUID a node printed as `this`.
    pub fn uuid_of(&self, id: ProcId) -> Option<Uuid> {
        self.bed
            .logs()
            .lists(id)
            .iter()
            .rev()
            .find_map(|l| l.members.iter().find(|m| m.this).map(|m| m.uuid))
    }

    /// Kills the youngest honest node with SIGKILL, checks that every survivor logs, in both
    /// logical clusters, a list without it and smaller than before within the deadline, then
    /// restarts it. Returns whether every survivor did.
    pub fn kill_check(&mut self) -> Result<bool, AttackError> {
        let victim = (0..self.n)
            .max_by_key(|&i| self.started[i])
            .unwrap_or(self.n - 1);
        let vid = self.nodes[victim];
        let uuid = self.uuid_of(vid);
        let before: HashMap<(usize, u16), usize> = (0..self.n)
            .flat_map(|i| GOSSIP_PORTS.map(|p| (i, p)))
            .filter_map(|(i, p)| Some(((i, p), self.last_list(self.nodes[i], p)?.size)))
            .collect();
        let marks = self.log_marks();
        self.bed.kill9(vid);
        let end = Instant::now() + KILL_DEADLINE;
        let survivors: Vec<usize> = (0..self.n).filter(|&i| i != victim).collect();
        let mut ok = false;
        while Instant::now() < end {
            ok = survivors.iter().all(|&i| {
                let lists = self.lists_since(i, marks[i]);
                GOSSIP_PORTS.iter().all(|&p| {
                    let was = before.get(&(i, p)).copied().unwrap_or(usize::MAX);
                    lists
                        .iter()
                        .rev()
                        .find(|l| l.port() == Some(p))
                        .is_some_and(|l| {
                            l.size < was && l.members.iter().all(|m| Some(m.uuid) != uuid)
                        })
                })
            });
            if ok {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.nodes[victim] = self.spawn_node(victim)?;
        self.started[victim] = Instant::now();
        Ok(ok)
    }
}

/// Raises this process's open-file limit to its hard limit, with `prlimit` (util-linux), so
/// that the HTTP hold can open its thousands of connections; the nodes, started later, inherit
/// it, as they would a service manager's limit. Where that fails the holds open fewer.
fn raise_fd_limit() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) else {
        return;
    };
    let mut it = line.split_whitespace().skip(3);
    let (Some(soft), Some(hard)) = (it.next(), it.next()) else {
        return;
    };
    if soft == hard {
        return;
    }
    let status = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={hard}:{hard}"))
        .status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!("attack: cannot raise the open-file limit from {soft} to {hard}");
    }
}

/// The resident set size of a process, in bytes.
pub fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One `GET` over HTTP/1.0; the status and body, or `None` when there is no answer in time.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", addr.ip()).ok()?;
    let mut text = Vec::new();
    s.read_to_end(&mut text).ok()?;
    let text = String::from_utf8_lossy(&text);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// One member as `GET /v1/members` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiMember {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its gossip address.
    pub addr: SocketAddr,
    /// Whether it is a scheduler.
    pub scheduler: bool,
}

/// The members of every logical cluster, by gossip port, oldest first, as a node's internal
/// API shows them.
pub fn api_members(ip: IpAddr) -> Option<HashMap<u16, Vec<ApiMember>>> {
    let (status, body) = http_get(
        SocketAddr::new(ip, PRIVATE_PORT),
        "/v1/members",
        Duration::from_secs(2),
    )?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let mut out = HashMap::new();
    for c in v["clusters"].as_array()? {
        let port = u16::try_from(c["port"].as_u64()?).ok()?;
        let members = c["members"]
            .as_array()?
            .iter()
            .filter_map(|m| {
                Some(ApiMember {
                    uuid: m["uuid"].as_str()?.parse().ok()?,
                    addr: m["address"].as_str()?.parse().ok()?,
                    scheduler: m["role"].as_str()? == "scheduler",
                })
            })
            .collect();
        out.insert(port, members);
    }
    Some(out)
}
