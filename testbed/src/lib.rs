//! A multi-host test bed for tests: Linux network namespaces on one bridge, with processes,
//! kill -9, cut links, packet loss and waits over parsed member logs. Dev-only; needs root.
//!
//! # Layout
//!
//! [`Testbed::new`] reserves a `/22` subnet of `198.18.0.0/15` (the range reserved for
//! benchmarking) and creates:
//!
//! - one bridge in the root namespace, `<prefix>br`, holding the subnet's first address
//!   ([`Testbed::bridge_ip`]), so processes started in the root namespace (LocalStack, API
//!   fakes) can bind there and be reached from every host;
//! - N hosts. Host `i` is the network namespace `<prefix>h<i>` with `lo` up and one veth whose
//!   inside end is `eth0`, holding [`Host::ip`]; its root end `<prefix>v<i>` is a bridge port.
//!   Each host has a route for `224.0.0.0/4` on `eth0` and no default route, so nothing a host
//!   sends can leave the bridge.
//! - IPv6 too: the bed's slot also picks a `/64` of `2001:2::/48` (the IPv6 benchmarking
//!   range), `2001:2:0:<slot>::/64` ([`Testbed::cidr6`]). The bridge holds `::1`
//!   ([`Testbed::bridge_ip6`]) and host `i` holds `::<i + 2>` ([`Host::ip6`]) on `eth0`, both
//!   `nodad` so they are usable at once; hosts also have their kernel's link-local `fe80::`
//!   address. The hosts reach each other over the bridge (layer 2, no forwarding) and have
//!   no default route; the root namespace routes the bed's `/64` to the bridge only and holds
//!   `unreachable 2001:2::/48` while any bed exists, so an address of a bed that is gone never
//!   follows the root's default route out of the machine.
//!
//! The prefix is `tb` + the test process id + a counter (9 characters), so interface names
//! stay within Linux's 15 and parallel or aborted runs never collide. [`Testbed::new`] first
//! removes leftovers of runs whose process is gone (see [`sweep_stale`]).
//!
//! # Processes
//!
//! [`Testbed::spawn`] runs a [`Command`] inside a host with `ip netns exec` (the program keeps
//! the process id, so [`Testbed::kill9`] hits it directly) and collects its stdout and stderr
//! into one log. [`Testbed::spawn_root`] does the same in the root namespace, for fakes bound
//! to the bridge address. Every process gets `AWS_EC2_METADATA_DISABLED=true` and
//! `GCE_METADATA_HOST=127.0.0.1:9` and loses `KUBERNETES_SERVICE_HOST`, unless the command sets
//! them itself, so no SDK probes a real metadata server. Set `TESTBED_ECHO=1` to see every
//! line live on stderr, prefixed with the process name.
//!
//! # Faults
//!
//! - [`Testbed::kill9`] and [`Testbed::terminate`] signal one process.
//! - [`Testbed::link_down`] / [`Testbed::link_up`] cut a host off the bridge and bring it back.
//! - [`Testbed::set_loss`] drops a percentage of the packets entering and leaving a host with
//!   nftables (`numgen random mod 100 < P drop`; Debian's `nftables` package), inside the
//!   host's namespace.
//!
//! # Waiting
//!
//! [`Testbed::wait_for`] polls a predicate over [`Logs`] (the parsed member lists of every
//! process) until it holds or a deadline passes; the error then shows every process's last
//! lists and log lines. [`Testbed::hold`] checks that a predicate stays true for a while.
//!
//! # Cleanup
//!
//! Dropping the [`Testbed`], also while a test panics, kills every process with SIGKILL (and
//! anything else still running inside a host), deletes the namespaces (which deletes the
//! veths and nftables rules with them) and the bridge, and frees the subnet.
//!
//! # Large beds
//!
//! A bed of hundreds of hosts works (`cargo xtask bench` runs 200), with one step the caller
//! takes: [`Testbed::static_neighbors`]. The kernel's neighbor table is shared by every
//! namespace and holds 1024 dynamic entries by default, which about 32 fully meshed hosts
//! fill ("neighbor table overflow" in the kernel log, then dropped packets), and every
//! address resolution is flooded to every bridge port; permanent entries avoid both. Setup
//! costs about 50 ms a host (seven `ip` commands); [`Drop`] clears a bed of any size in one
//! pass over `/proc` and one `ip -batch`.
//!
//! # Booted images
//!
//! [`image::ImageBed`] boots a Debian image with systemd as PID 1 in each host
//! (`systemd-nspawn`), for tests of packages, units and launch scripts; see [`image`].
//!
//! ```no_run
//! use std::process::Command;
//! use std::time::Duration;
//! use testbed::Testbed;
//!
//! testbed::check_prerequisites().expect("the test bed needs root and iproute2");
//! let mut bed = Testbed::new(2).unwrap();
//! let ip = bed.host(0).ip;
//! // In node's integration tests this is env!("CARGO_BIN_EXE_node").
//! let node_bin = "target/debug/node";
//! let mut cmd = Command::new(node_bin);
//! cmd.args(["--private_ip_selector", &format!("{ip}/32")]);
//! let node = bed.spawn(0, "worker-1", cmd).unwrap();
//! bed.wait_for(Duration::from_secs(20), "a list of 1", |logs| {
//!     logs.last(node, 10081).is_some_and(|l| l.size == 1)
//! })
//! .unwrap();
//! bed.kill9(node);
//! ```

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

pub use membership::{LoggedList, LoggedMember, parse_logged_lists};

pub mod cargo;
pub mod image;

/// The prefix length of each bed's subnet.
pub const PREFIX_LEN: u8 = 22;
/// How many `/22` subnets `198.18.0.0/15` holds.
const SLOTS: u32 = 128;
/// The most hosts one bed can hold: a /22 minus network, broadcast and the bridge.
pub const MAX_HOSTS: usize = 1021;
/// A log is halved when it grows past this, so a chatty process cannot exhaust memory.
const LOG_CAP: usize = 64 << 20;

/// Why the test bed could not do something. Every message names the fix.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// The test does not run as root.
    #[error(
        "the network-namespace test bed needs root (it creates namespaces, a bridge and veths): run the test as root, e.g. `sudo -E cargo test`, as CI does"
    )]
    NotRoot,
    /// A program is missing.
    #[error(
        "`{program}` is not installed: install the Debian package `{package}` (cargo xtask test does)"
    )]
    MissingTool {
        /// The program.
        program: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// A command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A program could not be started.
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Every subnet of 198.18.0.0/15 is taken by running beds.
    #[error(
        "all {0} test-bed subnets of 198.18.0.0/15 are reserved by running tests: run fewer at once"
    )]
    NoSubnet(u32),
    /// Too many hosts were asked for.
    #[error("a test bed holds at most {MAX_HOSTS} hosts, {0} were asked for")]
    TooManyHosts(usize),
    /// A predicate did not hold in time.
    #[error("timed out after {waited:?} waiting for {what}\n{state}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
        /// Every process's last member lists and log lines.
        state: String,
    },
    /// A predicate that had to stay true became false.
    #[error("{what} stopped holding after {after:?}\n{state}")]
    Broken {
        /// What had to hold.
        what: String,
        /// When it broke.
        after: Duration,
        /// Every process's last member lists and log lines.
        state: String,
    },
}

/// Checks that the test bed can run here: root, and `ip` from iproute2.
///
/// Tests should call this first and fail (not skip) when it errs.
pub fn check_prerequisites() -> Result<(), TestbedError> {
    if !is_root() {
        return Err(TestbedError::NotRoot);
    }
    need_program("ip", "iproute2")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|rest| rest.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}

fn need_program(program: &'static str, package: &'static str) -> Result<(), TestbedError> {
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .chain(["/usr/sbin".into(), "/sbin".into()])
                .any(|d| d.join(program).is_file())
        })
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(TestbedError::MissingTool { program, package })
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a short command and returns its stdout, or an error with its stderr.
fn run<I, S>(args: I) -> Result<String, TestbedError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut it = args.into_iter();
    let program = it.next().map(|p| p.as_ref().to_owned()).unwrap_or_default();
    let mut cmd = Command::new(program);
    cmd.args(it).stdin(Stdio::null());
    let out = cmd.output();
    let out = checked(&cmd, out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The output of `cmd` once it ran, or why it could not start or failed.
fn checked(cmd: &Command, out: std::io::Result<Output>) -> Result<Output, TestbedError> {
    let out = out.map_err(|source| TestbedError::Spawn {
        command: describe(cmd),
        source,
    })?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            command: describe(cmd),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// Runs a cleanup command; failures are reported on stderr, never raised.
fn run_quiet(args: &[&str]) {
    if let Err(e) = run(args) {
        eprintln!("testbed cleanup: {e}");
    }
}

const BASE36: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

fn base36(mut n: u64, width: usize) -> String {
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = BASE36[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(out).unwrap_or_default()
}

fn from_base36(s: &str) -> Option<u64> {
    s.bytes().try_fold(0u64, |acc, b| {
        let d = BASE36.iter().position(|&c| c == b)? as u64;
        acc.checked_mul(36)?.checked_add(d)
    })
}

/// The process id encoded in a bed's name (`tb` + 5 base-36 digits + ...), if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("tb")?.get(..5)?;
    if name.len() < 9 {
        return None;
    }
    from_base36(digits).and_then(|p| u32::try_from(p).ok())
}

fn pid_alive(pid: u32) -> bool {
    PathBuf::from(format!("/proc/{pid}")).exists()
}

fn reservation_dir() -> PathBuf {
    let run = PathBuf::from("/run");
    if run.is_dir() {
        run.join("testbed")
    } else {
        std::env::temp_dir().join("testbed")
    }
}

fn slot_base(slot: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + slot * (1 << (32 - PREFIX_LEN)))
}

/// The IPv6 benchmarking range (RFC 5180); beds use one `/64` of it each.
pub const BENCH6: &str = "2001:2::/48";
/// The prefix length of each bed's IPv6 subnet.
pub const PREFIX6_LEN: u8 = 64;

/// The bed's IPv6 `/64`: `2001:2:0:<slot>::`, inside `2001:2::/48` whatever the slot.
fn slot_base6(slot: u32) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, (slot % SLOTS) as u16, 0, 0, 0, 0)
}

/// The address `n` of a bed's `/64`.
fn addr6(base: Ipv6Addr, n: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(base) + u128::from(n))
}

fn kill_netns_pids(ns: &str) {
    if let Ok(pids) = run(["ip", "netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            let _ = run(["kill", "-9", pid]);
        }
    }
}

/// The processes inside any of the named namespaces, in one pass over `/proc` (`ip netns
/// pids` scans it once per namespace, which takes seconds for hundreds of hosts).
fn pids_in_netns(names: &[&str]) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let ns_of = |path: PathBuf| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let wanted: std::collections::HashSet<(u64, u64)> = names
        .iter()
        .filter_map(|n| ns_of(PathBuf::from(format!("/run/netns/{n}"))))
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            ns_of(PathBuf::from(format!("/proc/{pid}/ns/net"))).is_some_and(|k| wanted.contains(&k))
        })
        .collect()
}

/// Runs `ip [-n NETNS] -force -batch -` with `lines` on stdin: one process for many commands.
fn run_batch(netns: Option<&str>, lines: &str) -> Result<(), TestbedError> {
    use std::io::Write as _;
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| TestbedError::Spawn {
        command: describe(&cmd),
        source,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows up as the command's failure below.
        let _ = stdin.write_all(lines.as_bytes());
    }
    checked(&cmd, child.wait_with_output())?;
    Ok(())
}

/// Removes namespaces, bridges and subnet reservations left by test processes that are gone
/// (killed before their `Drop` ran). Beds of live processes are left alone.
pub fn sweep_stale() {
    if let Ok(list) = run(["ip", "netns", "list"]) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if owner_pid(ns).is_some_and(|p| !pid_alive(p)) {
                kill_netns_pids(ns);
                run_quiet(&["ip", "netns", "del", ns]);
            }
        }
    }
    if let Ok(list) = run(["ip", "-o", "link", "show", "type", "bridge"]) {
        for line in list.lines() {
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if name.ends_with("br") && owner_pid(name).is_some_and(|p| !pid_alive(p)) {
                run_quiet(&["ip", "link", "del", name]);
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(reservation_dir()) {
        for e in dir.flatten() {
            let owner = std::fs::read_to_string(e.path()).unwrap_or_default();
            if owner_pid(owner.trim()).is_some_and(|p| !pid_alive(p)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Serialises adding and removing the `unreachable 2001:2::/48` guard route across beds and
/// processes (an exclusive `flock`, released when the file is dropped). Best effort: without
/// the lock the route is still added; at worst a concurrent last drop removes it early.
fn guard_route_lock() -> Option<std::fs::File> {
    let dir = reservation_dir();
    std::fs::create_dir_all(&dir).ok()?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("route.lock"))
        .ok()?;
    f.lock().ok()?;
    Some(f)
}

/// Reserves a free subnet slot with an exclusively created file naming the owner.
fn reserve(prefix: &str, seed: u32) -> Result<(u32, PathBuf), TestbedError> {
    let dir = reservation_dir();
    std::fs::create_dir_all(&dir).map_err(|source| TestbedError::Io {
        what: format!("cannot create {}", dir.display()),
        source,
    })?;
    for k in 0..SLOTS {
        let slot = (seed + k) % SLOTS;
        let path = dir.join(format!("slot-{slot}"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                use std::io::Write as _;
                f.write_all(prefix.as_bytes())
                    .map_err(|source| TestbedError::Io {
                        what: format!("cannot write {}", path.display()),
                        source,
                    })?;
                return Ok((slot, path));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(TestbedError::Io {
                    what: format!("cannot create {}", path.display()),
                    source,
                });
            }
        }
    }
    Err(TestbedError::NoSubnet(SLOTS))
}

/// One host: a network namespace on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its position, 0-based.
    pub index: usize,
    /// The network namespace, for `ip netns exec`.
    pub netns: String,
    /// The veth end in the root namespace, a bridge port.
    pub veth: String,
    /// Its address, on `eth0` inside the namespace.
    pub ip: Ipv4Addr,
    /// Its IPv6 address (in [`Testbed::cidr6`]), on `eth0` too.
    pub ip6: Ipv6Addr,
}

/// A process started by the bed; pass it back to [`Testbed`] and [`Logs`] methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcId(usize);

#[derive(Debug)]
struct Proc {
    name: String,
    host: Option<usize>,
    child: Mutex<Child>,
    log: Arc<Mutex<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn collect<R: Read + Send + 'static>(src: R, log: Arc<Mutex<String>>, echo: Option<String>) {
    thread::spawn(move || {
        for line in BufReader::new(src).lines().map_while(Result::ok) {
            if let Some(name) = &echo {
                eprintln!("[{name}] {line}");
            }
            let mut l = lock(&log);
            if l.len() > LOG_CAP {
                let cut = l[l.len() / 2..]
                    .find('\n')
                    .map_or(l.len() / 2, |i| l.len() / 2 + i + 1);
                l.drain(..cut);
            }
            l.push_str(&line);
            l.push('\n');
        }
    });
}

/// The logs of every process of a bed, as the wait predicates see them.
#[derive(Debug)]
pub struct Logs<'a> {
    procs: &'a [Proc],
}

impl Logs<'_> {
    /// Everything the process wrote so far.
    pub fn text(&self, id: ProcId) -> String {
        self.procs
            .get(id.0)
            .map(|p| lock(&p.log).clone())
            .unwrap_or_default()
    }

    /// Every member list the process logged, oldest first.
    pub fn lists(&self, id: ProcId) -> Vec<LoggedList> {
        parse_logged_lists(&self.text(id))
    }

    /// The last member list the process logged for the cluster on `port` (the members'
    /// gossip port: `private_port + 1000` or `+ 2000`).
    pub fn last(&self, id: ProcId, port: u16) -> Option<LoggedList> {
        self.lists(id)
            .into_iter()
            .rev()
            .find(|l| l.port() == Some(port))
    }

    /// Whether the text occurs in the process's log.
    pub fn contains(&self, id: ProcId, needle: &str) -> bool {
        self.procs
            .get(id.0)
            .is_some_and(|p| lock(&p.log).contains(needle))
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A bridge, its hosts and the processes running in them; removed on drop.
#[derive(Debug)]
pub struct Testbed {
    prefix: String,
    base: Ipv4Addr,
    base6: Ipv6Addr,
    bridge: String,
    hosts: Vec<Host>,
    procs: Vec<Proc>,
    reservation: Option<PathBuf>,
    bridge_created: bool,
}

impl Testbed {
    /// Creates the bridge and `hosts` hosts, after removing stale beds of dead test processes.
    pub fn new(hosts: usize) -> Result<Self, TestbedError> {
        check_prerequisites()?;
        if hosts > MAX_HOSTS {
            return Err(TestbedError::TooManyHosts(hosts));
        }
        sweep_stale();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("tb{}{}", base36(u64::from(pid), 5), base36(u64::from(n), 2));
        let (slot, path) = reserve(&prefix, pid.wrapping_mul(31).wrapping_add(n))?;
        let mut bed = Testbed {
            bridge: format!("{prefix}br"),
            prefix,
            base: slot_base(slot),
            base6: slot_base6(slot),
            hosts: Vec::new(),
            procs: Vec::new(),
            reservation: Some(path),
            bridge_created: false,
        };
        // From here on, a failure drops `bed`, which removes whatever was created.
        let br = bed.bridge.clone();
        run([
            "ip",
            "link",
            "add",
            "name",
            &br,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        bed.bridge_created = true;
        let cidr = format!("{}/{PREFIX_LEN}", bed.bridge_ip());
        run(["ip", "addr", "add", &cidr, "dev", &br])?;
        // Anything in 2001:2::/48 outside a live bed's /64 goes nowhere (not the default route).
        {
            let _lock = guard_route_lock();
            run(["ip", "-6", "route", "replace", "unreachable", BENCH6])?;
        }
        let cidr6 = format!("{}/{PREFIX6_LEN}", bed.bridge_ip6());
        run(["ip", "-6", "addr", "add", &cidr6, "dev", &br, "nodad"])?;
        run(["ip", "link", "set", &br, "up"])?;
        for _ in 0..hosts {
            bed.add_host()?;
        }
        Ok(bed)
    }

    /// Adds one more host to the bridge and returns its index.
    pub fn add_host(&mut self) -> Result<usize, TestbedError> {
        let index = self.hosts.len();
        if index >= MAX_HOSTS {
            return Err(TestbedError::TooManyHosts(index + 1));
        }
        let host = Host {
            index,
            netns: format!("{}h{index}", self.prefix),
            veth: format!("{}v{}", self.prefix, base36(index as u64, 2)),
            ip: Ipv4Addr::from(u32::from(self.base) + 2 + index as u32),
            ip6: addr6(self.base6, 2 + index as u32),
        };
        let ns = host.netns.clone();
        run(["ip", "netns", "add", &ns])?;
        // Registered before configuring, so that Drop removes a half-built host too.
        self.hosts.push(host.clone());
        let v = host.veth.as_str();
        let cidr = format!("{}/{PREFIX_LEN}", host.ip);
        run([
            "ip", "link", "add", v, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        run(["ip", "link", "set", v, "master", &self.bridge, "up"])?;
        run(["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        run(["ip", "-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
        let cidr6 = format!("{}/{PREFIX6_LEN}", host.ip6);
        run([
            "ip", "-n", &ns, "-6", "addr", "add", &cidr6, "dev", "eth0", "nodad",
        ])?;
        run(["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        run([
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "224.0.0.0/4",
            "dev",
            "eth0",
        ])?;
        Ok(index)
    }

    /// The per-run name prefix (9 characters).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bridge's name in the root namespace.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The bridge's own address: processes in the root namespace bound here are reachable
    /// from every host.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    /// The bed's subnet, e.g. `198.18.4.0/22`.
    pub fn cidr(&self) -> String {
        format!("{}/{PREFIX_LEN}", self.base)
    }

    /// The bridge's IPv6 address, like [`Testbed::bridge_ip`].
    pub fn bridge_ip6(&self) -> Ipv6Addr {
        addr6(self.base6, 1)
    }

    /// The bed's IPv6 subnet, e.g. `2001:2:0:1::/64`.
    pub fn cidr6(&self) -> String {
        format!("{}/{PREFIX6_LEN}", self.base6)
    }

    /// Every host.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// One host. Panics if there is no such host.
    pub fn host(&self, index: usize) -> &Host {
        &self.hosts[index]
    }

    fn spawn_inner(
        &mut self,
        host: Option<usize>,
        name: &str,
        cmd: Command,
    ) -> Result<ProcId, TestbedError> {
        let mut c = match host {
            Some(h) => {
                let ns = &self.hosts[h].netns;
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(cmd.get_program());
                c
            }
            None => Command::new(cmd.get_program()),
        };
        c.args(cmd.get_args());
        c.env("AWS_EC2_METADATA_DISABLED", "true")
            .env("GCE_METADATA_HOST", "127.0.0.1:9")
            .env_remove("KUBERNETES_SERVICE_HOST");
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|source| TestbedError::Spawn {
            command: describe(&c),
            source,
        })?;
        let log = Arc::new(Mutex::new(String::new()));
        let echo = std::env::var_os("TESTBED_ECHO").map(|_| name.to_owned());
        if let Some(out) = child.stdout.take() {
            collect(out, log.clone(), echo.clone());
        }
        if let Some(err) = child.stderr.take() {
            collect(err, log.clone(), echo);
        }
        self.procs.push(Proc {
            name: name.to_owned(),
            host,
            child: Mutex::new(child),
            log,
        });
        Ok(ProcId(self.procs.len() - 1))
    }

    /// Runs `cmd` inside host `host`, collecting its stdout and stderr under `name`.
    pub fn spawn(&mut self, host: usize, name: &str, cmd: Command) -> Result<ProcId, TestbedError> {
        if host >= self.hosts.len() {
            return Err(TestbedError::Command {
                command: format!("spawn {name}"),
                status: "not run".into(),
                stderr: format!("no host {host}: the bed has {}", self.hosts.len()),
            });
        }
        self.spawn_inner(Some(host), name, cmd)
    }

    /// Runs `cmd` in the root namespace (e.g. a fake bound to [`Testbed::bridge_ip`]), with
    /// the same log collection and cleanup as [`Testbed::spawn`].
    pub fn spawn_root(&mut self, name: &str, cmd: Command) -> Result<ProcId, TestbedError> {
        self.spawn_inner(None, name, cmd)
    }

    /// Runs a short command inside a host and returns its output, whatever its exit status.
    pub fn exec(&self, host: usize, args: &[&str]) -> Result<Output, TestbedError> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[host].netns])
            .args(args)
            .stdin(Stdio::null());
        c.output().map_err(|source| TestbedError::Spawn {
            command: describe(&c),
            source,
        })
    }

    /// The process's name.
    pub fn name(&self, id: ProcId) -> &str {
        &self.procs[id.0].name
    }

    /// The host a process runs in (`None` for the root namespace).
    pub fn host_of(&self, id: ProcId) -> Option<usize> {
        self.procs[id.0].host
    }

    /// Its exit status, once it has exited.
    pub fn exit_status(&self, id: ProcId) -> Option<ExitStatus> {
        lock(&self.procs[id.0].child).try_wait().ok().flatten()
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill9(&self, id: ProcId) {
        let mut c = lock(&self.procs[id.0].child);
        let _ = c.kill();
        let _ = c.wait();
    }

    /// The process id, for `/proc` readings such as its RSS.
    pub fn pid(&self, id: ProcId) -> u32 {
        lock(&self.procs[id.0].child).id()
    }

    /// Sends a signal by name (`INT`, `HUP`, ...) without waiting.
    pub fn signal(&self, id: ProcId, sig: &str) {
        let pid = lock(&self.procs[id.0].child).id().to_string();
        let _ = run(["kill", &format!("-{sig}"), &pid]);
    }

    /// Sends SIGTERM, for a graceful stop; does not wait.
    pub fn terminate(&self, id: ProcId) {
        let pid = lock(&self.procs[id.0].child).id().to_string();
        let _ = run(["kill", "-TERM", &pid]);
    }

    /// Cuts a host off the bridge (its bridge port goes down; the host keeps its addresses).
    pub fn link_down(&self, host: usize) -> Result<(), TestbedError> {
        run(["ip", "link", "set", &self.hosts[host].veth, "down"]).map(drop)
    }

    /// Puts a host back on the bridge.
    pub fn link_up(&self, host: usize) -> Result<(), TestbedError> {
        run(["ip", "link", "set", &self.hosts[host].veth, "up"]).map(drop)
    }

    /// Drops `inbound` percent of the packets entering the host and `outbound` percent of those
    /// leaving it, at random, with nftables inside the host. 0 and 0 remove the rules.
    pub fn set_loss(&self, host: usize, inbound: u8, outbound: u8) -> Result<(), TestbedError> {
        need_program("nft", "nftables")?;
        let (inbound, outbound) = (inbound.min(100), outbound.min(100));
        let ns = &self.hosts[host].netns;
        // Creating then deleting makes the removal work whether or not the table exists.
        let mut script =
            String::from("table inet testbed_loss {}\ndelete table inet testbed_loss\n");
        if inbound > 0 || outbound > 0 {
            script.push_str("table inet testbed_loss {\n");
            // Loopback traffic inside the host is never dropped.
            let chains = [
                ("inbound", "input", "iifname", inbound),
                ("outbound", "output", "oifname", outbound),
            ];
            for (chain, hook, dev, p) in chains {
                let _ = writeln!(
                    script,
                    "  chain {chain} {{\n    type filter hook {hook} priority 0; policy accept;"
                );
                if p >= 100 {
                    let _ = writeln!(script, "    {dev} != \"lo\" drop");
                } else if p > 0 {
                    let _ = writeln!(
                        script,
                        "    {dev} != \"lo\" numgen random mod 100 < {p} drop"
                    );
                }
                script.push_str("  }\n");
            }
            script.push_str("}\n");
        }
        let path = std::env::temp_dir().join(format!("{}-loss-{host}.nft", self.prefix));
        std::fs::write(&path, &script).map_err(|source| TestbedError::Io {
            what: format!("cannot write {}", path.display()),
            source,
        })?;
        let path_s = path.to_string_lossy().into_owned();
        let result = run(["ip", "netns", "exec", ns, "nft", "-f", &path_s]).map(drop);
        let _ = std::fs::remove_file(&path);
        result
    }

    /// Gives every host a permanent neighbor entry (address to MAC, IPv4 and IPv6) for every
    /// other host and the bridge, so no host ever resolves a neighbor. Large beds need it: a
    /// resolution request is flooded to every bridge port (N² copies when N hosts start talking
    /// at once), and the kernel's neighbor table is shared by every namespace, 1024 dynamic
    /// entries by default (`net.ipv4.neigh.default.gc_thresh3`), which about 32 fully meshed
    /// hosts fill ("neighbor table overflow", then dropped packets); permanent entries do not
    /// count against it. Hosts added afterwards get no entries.
    pub fn static_neighbors(&self) -> Result<(), TestbedError> {
        let mac_of = |ns: &str| -> Result<String, TestbedError> {
            let out = run(["ip", "-n", ns, "-o", "link", "show", "dev", "eth0"])?;
            out.split_whitespace()
                .skip_while(|w| *w != "link/ether")
                .nth(1)
                .map(str::to_owned)
                .ok_or_else(|| TestbedError::Command {
                    command: format!("ip -n {ns} -o link show dev eth0"),
                    status: "no link/ether".into(),
                    stderr: out.trim().to_owned(),
                })
        };
        // Each step is one short `ip` per host; a few threads overlap their start-up.
        let par = |f: &(dyn Fn(&Host) -> Result<String, TestbedError> + Sync)| {
            let chunk = self.hosts.len().div_ceil(8).max(1);
            thread::scope(|s| {
                let handles: Vec<_> = self
                    .hosts
                    .chunks(chunk)
                    .map(|hs| s.spawn(move || hs.iter().map(f).collect::<Vec<_>>()))
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().unwrap_or_default())
                    .collect::<Result<Vec<String>, TestbedError>>()
            })
        };
        let macs = par(&|h: &Host| mac_of(&h.netns))?;
        let bridge_mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", self.bridge))
            .map_err(|source| TestbedError::Io {
                what: format!("cannot read the MAC address of {}", self.bridge),
                source,
            })?;
        let mut all: Vec<(String, &str)> = vec![
            (self.bridge_ip().to_string(), bridge_mac.trim()),
            (self.bridge_ip6().to_string(), bridge_mac.trim()),
        ];
        for (h, mac) in self.hosts.iter().zip(&macs) {
            all.push((h.ip.to_string(), mac));
            all.push((h.ip6.to_string(), mac));
        }
        par(&|h: &Host| {
            let (ip, ip6) = (h.ip.to_string(), h.ip6.to_string());
            let lines: String = all
                .iter()
                .filter(|(a, _)| *a != ip && *a != ip6)
                .map(|(a, mac)| format!("neigh replace {a} lladdr {mac} dev eth0 nud permanent\n"))
                .collect();
            run_batch(Some(&h.netns), &lines).map(|()| String::new())
        })
        .map(drop)
    }

    /// The logs of every process.
    pub fn logs(&self) -> Logs<'_> {
        Logs { procs: &self.procs }
    }

    /// Everything a process wrote so far.
    pub fn log(&self, id: ProcId) -> String {
        self.logs().text(id)
    }

    /// Every process's state, last member list per cluster port and last log lines: for
    /// failure messages.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for (i, p) in self.procs.iter().enumerate() {
            let host = p
                .host
                .map_or_else(|| "root".to_owned(), |h| self.hosts[h].ip.to_string());
            let state = match lock(&p.child).try_wait() {
                Ok(Some(st)) => format!("exited: {st}"),
                _ => "running".to_owned(),
            };
            let _ = writeln!(s, "--- {} on {host} ({state})", p.name);
            let lists = self.logs().lists(ProcId(i));
            let mut ports: Vec<u16> = lists.iter().filter_map(LoggedList::port).collect();
            ports.sort_unstable();
            ports.dedup();
            for port in ports {
                if let Some(l) = lists.iter().rev().find(|l| l.port() == Some(port)) {
                    let _ = write!(s, "  last list on :{port}: size {} ver {} [", l.size, l.ver);
                    for m in &l.members {
                        let _ = write!(s, " {}{}", m.addr, if m.this { "*" } else { "" });
                    }
                    s.push_str(" ]\n");
                }
            }
            let text = lock(&p.log).clone();
            let lines: Vec<&str> = text.lines().collect();
            for l in &lines[lines.len().saturating_sub(8)..] {
                let _ = writeln!(s, "  | {l}");
            }
        }
        s
    }

    /// Polls `pred` every 100 ms until it holds (returns how long that took) or `timeout`
    /// passes (an error naming `what`, with [`Testbed::summary`]).
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&Logs<'_>) -> bool,
    ) -> Result<Duration, TestbedError> {
        let start = Instant::now();
        loop {
            if pred(&self.logs()) {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= timeout {
                return Err(TestbedError::Timeout {
                    what: what.to_owned(),
                    waited: start.elapsed(),
                    state: self.summary(),
                });
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Checks `pred` every 100 ms for `duration`; errs as soon as it is false.
    pub fn hold(
        &self,
        duration: Duration,
        what: &str,
        mut pred: impl FnMut(&Logs<'_>) -> bool,
    ) -> Result<(), TestbedError> {
        let start = Instant::now();
        while start.elapsed() < duration {
            if !pred(&self.logs()) {
                return Err(TestbedError::Broken {
                    what: what.to_owned(),
                    after: start.elapsed(),
                    state: self.summary(),
                });
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Signal every process first and reap after, so hundreds of exits overlap.
        for p in &self.procs {
            let _ = lock(&p.child).kill();
        }
        for p in &self.procs {
            let _ = lock(&p.child).wait();
        }
        // Anything else still inside a host (children of the processes), in one /proc pass.
        let names: Vec<&str> = self.hosts.iter().map(|h| h.netns.as_str()).collect();
        let strays: Vec<String> = pids_in_netns(&names).iter().map(u32::to_string).collect();
        if !strays.is_empty() {
            let _ = Command::new("kill")
                .arg("-9")
                .args(&strays)
                .stderr(Stdio::null())
                .status();
        }
        // One `ip` for every host: deleting the root end of a veth removes the pair at once
        // (a namespace's devices otherwise go later, asynchronously). Errors are expected
        // for parts never created; any namespace still there is retried alone, loudly.
        let dels: String = self
            .hosts
            .iter()
            .map(|h| format!("link del {}\nnetns del {}\n", h.veth, h.netns))
            .collect();
        if !dels.is_empty() {
            let _ = run_batch(None, &dels);
        }
        for h in &self.hosts {
            if PathBuf::from(format!("/run/netns/{}", h.netns)).exists() {
                run_quiet(&["ip", "netns", "del", &h.netns]);
            }
        }
        if self.bridge_created {
            run_quiet(&["ip", "link", "del", &self.bridge]);
        }
        // The last bed of the machine takes the guard route with it. Under the lock, a bed
        // that reserved its slot after this check adds the route again after this removal.
        let _lock = guard_route_lock();
        if let Some(path) = self.reservation.take() {
            let _ = std::fs::remove_file(path);
        }
        let others = std::fs::read_dir(reservation_dir())
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("slot-"))
            })
            .unwrap_or(false);
        if !others {
            let _ = run(["ip", "-6", "route", "del", "unreachable", BENCH6]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_encode_the_owner_and_fit_interface_limits() {
        let prefix = format!("tb{}{}", base36(4_194_303, 5), base36(1295, 2));
        assert_eq!(prefix.len(), 9);
        assert_eq!(owner_pid(&prefix), Some(4_194_303));
        assert_eq!(owner_pid(&format!("{prefix}h12")), Some(4_194_303));
        assert!(format!("{prefix}v{}", base36(1020, 2)).len() <= 15);
        assert!(format!("{prefix}br").len() <= 15);
        assert_eq!(owner_pid("tbx"), None);
        assert_eq!(owner_pid("eth0"), None);
        assert_eq!(owner_pid("tb!!!!!00"), None);
    }

    #[test]
    fn every_slot_is_inside_the_benchmark_range() {
        assert_eq!(slot_base(0), Ipv4Addr::new(198, 18, 0, 0));
        assert_eq!(slot_base(1), Ipv4Addr::new(198, 18, 4, 0));
        let last = u32::from(slot_base(SLOTS - 1)) + (1 << (32 - PREFIX_LEN)) - 1;
        assert_eq!(Ipv4Addr::from(last), Ipv4Addr::new(198, 19, 255, 255));
    }

    #[test]
    fn every_ipv6_subnet_and_host_is_inside_2001_2_48() {
        // The first 48 bits are 2001:0002:0000, the next 16 the slot, the last 64 the host.
        let in_range = |a: Ipv6Addr| u128::from(a) >> 80 == 0x2001_0002_0000;
        let subnet = |a: Ipv6Addr| u128::from(a) >> 64;
        assert_eq!(BENCH6, "2001:2::/48");
        assert_eq!(slot_base6(0), "2001:2::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(slot_base6(5), "2001:2:0:5::".parse::<Ipv6Addr>().unwrap());
        for slot in [0, 1, SLOTS - 1, SLOTS, u32::MAX] {
            let base = slot_base6(slot);
            assert_eq!(u128::from(base) & u128::from(u64::MAX), 0, "slot {slot}");
            for n in [1, 2, 2 + MAX_HOSTS as u32] {
                let a = addr6(base, n);
                assert!(in_range(a) && subnet(a) == subnet(base), "{a}");
            }
        }
        assert_eq!(
            addr6(slot_base6(3), 2 + 1020),
            "2001:2:0:3::3fe".parse::<Ipv6Addr>().unwrap()
        );
    }
}
