//! Cluster-key and hardening tests with real `node` processes on loopback (127.0.0.31-39,
//! 127.0.0.81-84; strangers from 127.0.7.0/24): a wrong key is shut out, keys rotate with no member change, forged and
//! replayed packets change nothing, a flood of random datagrams removes no one, idle stream
//! connections from strangers do not stop a join, and idle HTTP connections starve neither
//! health checks nor gossip.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyring::{Keyring, Sealer, SealerConfig};
use membership::{NodeId, Role, wire};
use serde_json::Value;

const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

/// A scratch directory removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("node-security-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn key_file(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// One cluster as `GET /v1/members` shows it.
#[derive(Debug, Clone, PartialEq)]
struct View {
    ver: u64,
    this: String,
    members: Vec<String>,
    rejected: BTreeMap<String, u64>,
}

impl View {
    fn rejected(&self, reason: &str) -> u64 {
        self.rejected.get(reason).copied().unwrap_or(0)
    }
}

/// A running node, killed on drop.
struct Node {
    child: Child,
    ip: String,
    port: u16,
    log: PathBuf,
}

impl Node {
    fn start(
        dir: &Dir,
        cluster: &str,
        ip: &str,
        port: u16,
        role: &str,
        peers: &[&str],
        key: Option<&Path>,
    ) -> Self {
        Self::start_wrapped(dir, cluster, ip, port, role, peers, key, &[])
    }

    /// Like [`Node::start`], through `wrapper` (a program that execs the rest, like `prlimit`).
    #[allow(clippy::too_many_arguments)]
    fn start_wrapped(
        dir: &Dir,
        cluster: &str,
        ip: &str,
        port: u16,
        role: &str,
        peers: &[&str],
        key: Option<&Path>,
        wrapper: &[&str],
    ) -> Self {
        let log = dir.0.join(format!("{ip}-{port}.log"));
        let bin = env!("CARGO_BIN_EXE_node");
        let mut cmd = match wrapper {
            [] => Command::new(bin),
            [program, args @ ..] => {
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
        };
        cmd.args(["--role", role, "--discovery", "static"])
            .args(["--private_ip_selector", &format!("{ip}/32")])
            .args(["--private_port", &port.to_string()])
            .args(["--public_port", &(port - 1).to_string()])
            .args(["--public_bind_to_any=false", "--discovery_refresh", "1s"])
            .args(["--cluster_name", cluster])
            .args(["--static_members", &peers.join(",")])
            .env("RUST_LOG", "info")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("GCE_METADATA_HOST", "127.0.0.1:9")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("NODE_CLUSTER_KEY_FILE")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(k) = key {
            cmd.arg("--cluster_key_file").arg(k);
        }
        Self {
            child: cmd.spawn().expect("start node"),
            ip: ip.to_owned(),
            port,
            log,
        }
    }

    fn gossip(&self, offset: u16) -> SocketAddr {
        format!("{}:{}", self.ip, self.port + offset)
            .parse()
            .unwrap()
    }

    fn views(&self) -> Option<BTreeMap<String, View>> {
        let addr: SocketAddr = format!("{}:{}", self.ip, self.port).parse().unwrap();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET /v1/members HTTP/1.0\r\nHost: {}\r\n\r\n", self.ip).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let body = text.split_once("\r\n\r\n")?.1;
        let v: Value = serde_json::from_str(body).ok()?;
        let mut out = BTreeMap::new();
        for c in v["clusters"].as_array()? {
            let members = c["members"]
                .as_array()?
                .iter()
                .filter_map(|m| m["uuid"].as_str().map(str::to_owned))
                .collect();
            let rejected = c["rejected"]
                .as_object()?
                .iter()
                .filter_map(|(k, n)| Some((k.clone(), n.as_u64()?)))
                .collect();
            out.insert(
                c["cluster"].as_str()?.to_owned(),
                View {
                    ver: c["version"].as_u64()?,
                    this: c["this"].as_str()?.to_owned(),
                    members,
                    rejected,
                },
            );
        }
        Some(out)
    }

    fn view(&self, cluster: &str) -> View {
        self.views()
            .and_then(|mut v| v.remove(cluster))
            .unwrap_or_else(|| panic!("no {cluster} view from {}:{}", self.ip, self.port))
    }

    fn hup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP failed");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 200 ms until it holds or `limit` passes.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    f()
}

/// Whether every node holds the same `cluster` view of exactly `n` members.
fn converged(nodes: &[&Node], cluster: &str, n: usize) -> bool {
    let views: Vec<Option<View>> = nodes
        .iter()
        .map(|x| x.views().and_then(|mut v| v.remove(cluster)))
        .collect();
    views.iter().all(|v| {
        v.as_ref().is_some_and(|v| {
            v.members.len() == n
                && views[0]
                    .as_ref()
                    .is_some_and(|f| f.ver == v.ver && f.members == v.members)
        })
    })
}

fn sealer(keys: &str) -> Sealer {
    Sealer::new(
        Keyring::parse(keys, "test").unwrap(),
        SealerConfig::default(),
    )
}

fn send(to: SocketAddr, data: &[u8]) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.send_to(data, to).unwrap();
}

#[test]
fn a_node_with_the_wrong_key_or_no_key_never_appears_in_any_list() {
    let dir = Dir::new("wrongkey");
    let good = dir.key_file("good", &format!("{K1}\n"));
    let bad = dir.key_file("bad", &format!("{K2}\n"));
    let peers = ["127.0.0.31", "127.0.0.32", "127.0.0.33", "127.0.0.33:8091"];
    let name = "sec-wrongkey";
    let a = Node::start(
        &dir,
        name,
        "127.0.0.31",
        8081,
        "worker",
        &peers,
        Some(&good),
    );
    let b = Node::start(
        &dir,
        name,
        "127.0.0.32",
        8081,
        "worker",
        &peers,
        Some(&good),
    );
    let c = Node::start(&dir, name, "127.0.0.33", 8081, "worker", &peers, Some(&bad));
    // A bare IP means "same private port as mine", so the keyless node names the ports.
    let d_peers = ["127.0.0.31:8081", "127.0.0.32:8081", "127.0.0.33:8081"];
    let d = Node::start(&dir, name, "127.0.0.33", 8091, "worker", &d_peers, None);
    assert!(
        wait_until(Duration::from_secs(30), || converged(&[&a, &b], "all", 2)),
        "the two nodes with the right key did not converge"
    );
    // Give the outsiders time to keep trying.
    std::thread::sleep(Duration::from_secs(4));
    let (va, vb, vc, vd) = (a.view("all"), b.view("all"), c.view("all"), d.view("all"));
    assert_eq!(va.members, vb.members);
    assert_eq!(va.members.len(), 2, "{va:?}");
    for outsider in [&vc, &vd] {
        assert_eq!(
            outsider.members,
            vec![outsider.this.clone()],
            "{outsider:?}"
        );
    }
    assert!(
        va.rejected("auth_failed") + vb.rejected("auth_failed") > 0,
        "{va:?} {vb:?}"
    );
    assert!(
        va.rejected("sealed_malformed") + vb.rejected("sealed_malformed") > 0,
        "plain packets of the keyless node are counted: {va:?} {vb:?}"
    );
    assert!(vc.rejected("auth_failed") > 0, "{vc:?}");
    assert!(
        vd.rejected("malformed") > 0,
        "sealed packets are garbage to it: {vd:?}"
    );
    for n in [&a, &b] {
        let log = n.log();
        for list in membership::parse_logged_lists(&log) {
            for m in &list.members {
                let u = m.uuid.to_string();
                assert!(
                    u != vc.this && u != vd.this,
                    "an outsider was listed:\n{log}"
                );
            }
        }
        assert!(log.contains("dropped packets that failed checks"), "{log}");
    }
    assert!(
        d.log().contains("unauthenticated"),
        "the keyless node warns"
    );
}

#[test]
fn rolling_key_rotation_removes_no_one_and_keeps_the_version() {
    let dir = Dir::new("rotate");
    let ips = ["127.0.0.34", "127.0.0.35", "127.0.0.36"];
    let files: Vec<PathBuf> = ips
        .iter()
        .map(|ip| dir.key_file(ip, &format!("{K1}\n")))
        .collect();
    let nodes: Vec<Node> = ips
        .iter()
        .zip(&files)
        .map(|(ip, f)| Node::start(&dir, "sec-rotate", ip, 8081, "scheduler", &ips, Some(f)))
        .collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    assert!(
        wait_until(Duration::from_secs(40), || converged(&refs, "all", 3)
            && converged(&refs, "scheduler", 3)),
        "the cluster did not converge"
    );
    // Let the last list pushes settle before taking the baseline.
    std::thread::sleep(Duration::from_secs(2));
    let baseline: Vec<BTreeMap<String, View>> = nodes.iter().map(|n| n.views().unwrap()).collect();
    let lists_before: Vec<usize> = nodes
        .iter()
        .map(|n| membership::parse_logged_lists(&n.log()).len())
        .collect();
    let steps = [
        format!("{K1}\n{K2}\n"),
        format!("{K2}\n{K1}\n"),
        format!("{K2}\n"),
    ];
    for (i, text) in steps.iter().enumerate() {
        for (n, f) in nodes.iter().zip(&files) {
            std::fs::write(f, text).unwrap();
            n.hup();
            // Nodes reload one after another, as a rolling change does.
            std::thread::sleep(Duration::from_millis(700));
        }
        std::thread::sleep(Duration::from_secs(3));
        for (n, base) in nodes.iter().zip(&baseline) {
            let now = n.views().unwrap();
            for (cluster, b) in base {
                let v = &now[cluster];
                assert_eq!(
                    (v.ver, &v.members),
                    (b.ver, &b.members),
                    "step {}: {cluster} changed on {}",
                    i + 1,
                    n.ip
                );
                assert_eq!(v.rejected("auth_failed"), 0, "step {}: {v:?}", i + 1);
            }
        }
    }
    for (n, before) in nodes.iter().zip(&lists_before) {
        let log = n.log();
        assert_eq!(
            membership::parse_logged_lists(&log).len(),
            *before,
            "a list was logged during rotation:\n{log}"
        );
        assert_eq!(log.matches("cluster key file reloaded").count(), 3, "{log}");
        assert!(
            !log.contains(K1) && !log.contains(K2),
            "a key leaked into the log"
        );
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", n.child.id())).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(!cmdline.contains(K1) && !cmdline.contains(K2));
    }
    // The retired key is refused now.
    let target = nodes[0].gossip(2000);
    let before = nodes[0].view("all").rejected("auth_failed");
    send(
        target,
        &sealer(K1).seal(&keyring::aad("sec-rotate", "all"), b"x"),
    );
    assert!(wait_until(Duration::from_secs(5), || {
        nodes[0].view("all").rejected("auth_failed") > before
    }));
}

#[test]
fn forged_and_replayed_leaves_leave_the_view_unchanged() {
    let dir = Dir::new("replay");
    let key = dir.key_file("key", &format!("{K1}\n"));
    let peers = ["127.0.0.37", "127.0.0.38"];
    let name = "sec-replay";
    let a = Node::start(&dir, name, peers[0], 8081, "worker", &peers, Some(&key));
    let b = Node::start(&dir, name, peers[1], 8081, "worker", &peers, Some(&key));
    assert!(wait_until(Duration::from_secs(30), || converged(
        &[&a, &b],
        "all",
        2
    )));
    std::thread::sleep(Duration::from_secs(1));
    let base = a.view("all");
    let b_uuid: uuid::Uuid = b.view("all").this.parse().unwrap();
    // A leave naming B with an identity that wins every address conflict: if accepted, it
    // replaces B by a member that is down.
    let forged_id = NodeId {
        addr: b.gossip(2000),
        uuid: b_uuid,
        started_ms: u64::MAX - 1,
        generation: 0,
        role: Role::Worker,
    };
    let leave = wire::encode_leave(wire::cluster_tag(name, "all"), &forged_id);
    let aad = keyring::aad(name, "all");
    let s = sealer(K1);
    let now = keyring::unix_ms();
    let to = a.gossip(2000);

    // 1. No key at all.
    send(to, &leave);
    // 2. Another key.
    send(to, &sealer(K2).seal(&aad, &leave));
    // 3. The right key, captured a minute ago and replayed now.
    send(to, &s.seal_at(&aad, &leave, now - 60_000));
    // 4. The right key, but for the other logical cluster.
    send(to, &s.seal(&keyring::aad(name, "scheduler"), &leave));
    // 5. A message accepted once, then replayed within the window.
    let ghost = NodeId::new(
        "127.0.0.39:10081".parse().unwrap(),
        uuid::Uuid::from_u128(7),
        0,
        Role::Worker,
    );
    let harmless = s.seal(
        &aad,
        &wire::encode_leave(wire::cluster_tag(name, "all"), &ghost),
    );
    send(to, &harmless);
    std::thread::sleep(Duration::from_millis(300));
    send(to, &harmless);

    assert!(
        wait_until(Duration::from_secs(5), || {
            let v = a.view("all");
            v.rejected("sealed_malformed") >= 1
                && v.rejected("auth_failed") >= 2
                && v.rejected("stale") >= 1
                && v.rejected("replayed") >= 1
        }),
        "{:?}",
        a.view("all")
    );
    std::thread::sleep(Duration::from_secs(3));
    let after = a.view("all");
    assert_eq!((after.ver, &after.members), (base.ver, &base.members));

    // Control: the same leave, sealed now with the right key, passes every check of the key
    // and reaches the engine, which refuses it because it does not come from B's address: a
    // key holder cannot make a member leave for it.
    let spoofed_before = a.view("all").rejected("spoofed_source");
    send(to, &s.seal(&aad, &leave));
    assert!(
        wait_until(Duration::from_secs(5), || {
            a.view("all").rejected("spoofed_source") > spoofed_before
        }),
        "the fresh, rightly sealed leave was not refused as spoofed: {:?}",
        a.view("all")
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(a.view("all").members.contains(&b_uuid.to_string()));
    // B's own leave, from its address, does remove it at once.
    let ok = Command::new("kill")
        .args(["-TERM", &b.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert!(
        wait_until(Duration::from_secs(5), || {
            !a.view("all").members.contains(&b_uuid.to_string())
        }),
        "B's own leave had no effect: {:?}",
        a.view("all")
    );
}

#[test]
fn a_flood_of_random_datagrams_removes_no_one() {
    let dir = Dir::new("flood");
    let key = dir.key_file("key", &format!("{K1}\n"));
    let peers = ["127.0.0.38:8281", "127.0.0.39:8281"];
    let name = "sec-flood";
    let a = Node::start(
        &dir,
        name,
        "127.0.0.38",
        8281,
        "scheduler",
        &peers,
        Some(&key),
    );
    let b = Node::start(
        &dir,
        name,
        "127.0.0.39",
        8281,
        "scheduler",
        &peers,
        Some(&key),
    );
    assert!(wait_until(Duration::from_secs(30), || {
        converged(&[&a, &b], "all", 2) && converged(&[&a, &b], "scheduler", 2)
    }));
    std::thread::sleep(Duration::from_secs(1));
    let base = (a.views().unwrap(), b.views().unwrap());
    let targets = [
        a.gossip(1000),
        a.gossip(2000),
        b.gossip(1000),
        b.gossip(2000),
    ];
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let start = Instant::now();
    let mut sent = 0u64;
    // About 8000 datagrams a second for 10 s, of 1 to 1500 random bytes.
    while start.elapsed() < Duration::from_secs(10) {
        for _ in 0..80 {
            let len = 1 + (rnd() % 1500) as usize;
            let data: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            let to = targets[(rnd() % 4) as usize];
            if sock.send_to(&data, to).is_ok() {
                sent += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(sent > 10_000, "only {sent} datagrams sent");
    // Then 100 streams of random frames from one source: the per-source rate limit trips.
    for i in 0..100u64 {
        if let Ok(mut s) = TcpStream::connect_timeout(&targets[1], Duration::from_secs(1)) {
            let len = 1 + (rnd() % 4000) as u32;
            let mut frame = len.to_be_bytes().to_vec();
            frame.extend((0..len).map(|_| rnd() as u8));
            if i % 10 == 0 {
                // A length far above the frame cap.
                frame[..4].copy_from_slice(&u32::MAX.to_be_bytes());
            }
            let _ = s.write_all(&frame);
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    for (n, before) in [(&a, &base.0), (&b, &base.1)] {
        let now = n.views().unwrap();
        for (cluster, v) in before {
            let w = &now[cluster];
            assert_eq!(
                (w.ver, &w.members),
                (v.ver, &v.members),
                "{cluster} on {}",
                n.ip
            );
            let dropped: u64 = w.rejected.values().sum();
            assert!(dropped > 1000, "{cluster} on {}: {w:?}", n.ip);
        }
        let log = n.log();
        assert!(!log.contains("panicked"));
        // At most one warning per cluster every 10 s, whatever the flood.
        let warnings = log.matches("dropped packets that failed checks").count();
        assert!((1..=8).contains(&warnings), "{warnings} warnings");
    }
    let all = a.view("all");
    assert!(all.rejected("rate_limited") > 0, "{all:?}");
}

/// The soft limit on open files of this process, from `/proc/self/limits`.
fn open_file_soft_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// Opens `n` connections to `to` and keeps them; every other one has sent half a request.
fn idle_connections(to: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("connection {i} to {to}: {e}"));
            if i % 2 == 1 {
                let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
            }
            s
        })
        .collect()
}

/// One plain request; the body of a 200 answer that arrived within `limit`.
fn get_within(to: SocketAddr, path: &str, limit: Duration) -> Result<String, String> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&to, limit).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| format!("send: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("read: {e}"))?;
    if t0.elapsed() > limit {
        return Err(format!("answered after {:?}", t0.elapsed()));
    }
    match text.split_once("\r\n\r\n") {
        Some((head, body))
            if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") =>
        {
            Ok(body.to_owned())
        }
        _ => Err(format!("unexpected answer {text:?}")),
    }
}

/// The value of the sample `line` (name and labels) in a `/metrics` text.
fn metric(text: &str, line: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn idle_http_connections_leave_health_and_gossip_answering() {
    let fds = open_file_soft_limit().unwrap_or(0);
    assert!(
        fds >= 4500,
        "this test holds 4000 connections but may open only {fds} files: run `ulimit -n 8192` first"
    );
    let dir = Dir::new("idlehttp");
    let key = dir.key_file("key", &format!("{K1}\n"));
    let peers = ["127.0.0.81:8381", "127.0.0.82:8381"];
    let name = "sec-idlehttp";
    let a = Node::start(
        &dir,
        name,
        "127.0.0.81",
        8381,
        "scheduler",
        &peers,
        Some(&key),
    );
    // B may open only 640 files: its caps ((640 - 512) / 2 = 64 a listener, against A's 128)
    // are far below 1000 connections, so only closing the longest-idle ones keeps it answering,
    // and it warns that the open-file limit set them.
    let b = Node::start_wrapped(
        &dir,
        name,
        "127.0.0.82",
        8381,
        "scheduler",
        &peers,
        Some(&key),
        &["prlimit", "--nofile=640:640"],
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            converged(&[&a, &b], "all", 2) && converged(&[&a, &b], "scheduler", 2)
        }),
        "the cluster did not converge:\n{}\n{}",
        a.log(),
        b.log()
    );
    let base = (a.views().unwrap(), b.views().unwrap());
    let http = |n: &Node, port: u16| -> SocketAddr { format!("{}:{port}", n.ip).parse().unwrap() };
    let ports = |n: &Node| [http(n, n.port - 1), http(n, n.port)];
    let mut held = Vec::new();
    for n in [&a, &b] {
        for to in ports(n) {
            held.push(idle_connections(to, 1000));
        }
    }
    // While the 4000 connections are held: health answers at once on every port, every time.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        for n in [&a, &b] {
            for to in ports(n) {
                let body = get_within(to, "/healthz", Duration::from_secs(1))
                    .unwrap_or_else(|e| panic!("/healthz on {to}: {e}\n{}", n.log()));
                assert_eq!(body, "ok\n");
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // Gossip went on: the same lists, nothing dropped on the gossip paths for lack of room.
    for (n, before) in [(&a, &base.0), (&b, &base.1)] {
        let now = n.views().expect("the internal API answers");
        for (cluster, v) in before {
            let w = &now[cluster];
            assert_eq!(
                (w.ver, &w.members),
                (v.ver, &v.members),
                "{cluster} on {}",
                n.ip
            );
            assert_eq!(w.rejected("busy"), 0, "{w:?}");
        }
    }
    let text = get_within(http(&b, b.port), "/metrics", Duration::from_secs(2)).unwrap();
    assert_eq!(
        metric(&text, "node_http_connections_max{listener=\"public\"}"),
        Some(64.0),
        "{text}"
    );
    for listener in ["public", "internal"] {
        let evicted = metric(
            &text,
            &format!("node_http_connections_evicted_total{{listener=\"{listener}\"}}"),
        )
        .unwrap_or(0.0);
        assert!(evicted >= 700.0, "{listener}: {evicted} evicted\n{text}");
        let open = metric(
            &text,
            &format!("node_http_connections_open{{listener=\"{listener}\"}}"),
        )
        .unwrap_or(f64::MAX);
        assert!(open <= 256.0, "{listener}: {open} open");
    }
    assert!(b.log().contains("open-file limit caps"), "{}", b.log());
    drop(held);
}

/// Keeps up to `per_source` idle connections from each of `sources` to each of `targets`,
/// reopening those the node closes, until `stop` is set or `limit` passes. Returns how many
/// connections it opened.
fn hold_idle_streams(
    sources: &[String],
    targets: &[SocketAddr],
    per_source: usize,
    stop: &std::sync::atomic::AtomicBool,
    limit: Duration,
) -> usize {
    use socket2::{Domain, Socket, Type};
    let open = |src: &str, to: &SocketAddr| -> Option<TcpStream> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
        let from: SocketAddr = format!("{src}:0").parse().ok()?;
        s.bind(&from.into()).ok()?;
        s.connect_timeout(&(*to).into(), Duration::from_millis(200))
            .ok()?;
        let s: TcpStream = s.into();
        s.set_nonblocking(true).ok()?;
        Some(s)
    };
    let mut held: Vec<(usize, usize, Option<TcpStream>)> = Vec::new();
    for si in 0..sources.len() {
        for ti in 0..targets.len() {
            for _ in 0..per_source {
                held.push((si, ti, None));
            }
        }
    }
    let mut opened = 0;
    let end = Instant::now() + limit;
    while Instant::now() < end && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for (si, ti, conn) in &mut held {
            let closed = conn.as_mut().is_none_or(|c| {
                let mut b = [0u8; 1];
                !matches!(c.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            });
            if closed {
                *conn = open(&sources[*si], &targets[*ti]);
                opened += usize::from(conn.is_some());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    opened
}

#[test]
fn idle_stream_connections_from_strangers_do_not_stop_a_join() {
    let dir = Dir::new("streamjam");
    let key = dir.key_file("key", &format!("{K1}\n"));
    let peers = ["127.0.0.83:8481", "127.0.0.84:8481"];
    let name = "sec-streamjam";
    let a = Node::start(
        &dir,
        name,
        "127.0.0.83",
        8481,
        "scheduler",
        &peers,
        Some(&key),
    );
    assert!(
        wait_until(Duration::from_secs(10), || a.views().is_some()),
        "A did not start:\n{}",
        a.log()
    );
    // 40 strangers keep 4 idle connections each at both stream ports of A and of B (from the
    // moment B listens): more than every read slot outside the members' reserve, the whole
    // time B joins. Joins need a stream sync to get through one way or the other.
    let sources: Vec<String> = (1..=40).map(|i| format!("127.0.7.{i}")).collect();
    let b_addr =
        |offset: u16| -> SocketAddr { format!("127.0.0.84:{}", 8481 + offset).parse().unwrap() };
    let targets = [a.gossip(1000), a.gossip(2000), b_addr(1000), b_addr(2000)];
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let jam = scope
            .spawn(|| hold_idle_streams(&sources, &targets, 4, &stop, Duration::from_secs(40)));
        std::thread::sleep(Duration::from_millis(1500));
        let b = Node::start(
            &dir,
            name,
            "127.0.0.84",
            8481,
            "scheduler",
            &peers,
            Some(&key),
        );
        let joined = wait_until(Duration::from_secs(20), || {
            converged(&[&a, &b], "all", 2) && converged(&[&a, &b], "scheduler", 2)
        });
        let views = a.views();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let opened = jam.join().unwrap();
        assert!(
            joined,
            "B did not join under the jam: {views:?}\n{}",
            b.log()
        );
        assert!(opened >= 640, "the jam opened only {opened} connections");
        let all = &views.unwrap()["all"];
        assert!(
            all.rejected("busy") > 0,
            "the jam never filled the slots: {all:?}"
        );
        assert!(all.rejected("stream_timeout") > 0, "{all:?}");
    });
}

/// Multicast discovery with a key, across network namespaces (needs root, as CI has): keyed
/// nodes find each other through sealed announcements, and a keyless node on the same group
/// hears nothing it can use and is never listed.
#[test]
fn sealed_multicast_announcements_admit_only_key_holders() {
    if let Err(e) = testbed::check_prerequisites() {
        panic!("the network-namespace test cannot run here: {e}");
    }
    let dir = Dir::new("multicast");
    let key = dir.key_file("key", &format!("{K1}\n"));
    let mut bed = testbed::Testbed::new(3).unwrap_or_else(|e| panic!("test bed: {e}"));
    let cidr = bed.cidr();
    let mut start = |host: usize, key: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_node"));
        cmd.args(["--role", "worker", "--discovery", "multicast"])
            .args(["--private_ip_selector", &cidr])
            .args(["--cluster_name", "sec-multicast"])
            .env("RUST_LOG", "info");
        if let Some(k) = key {
            cmd.arg("--cluster_key_file").arg(k);
        }
        bed.spawn(host, &format!("worker-{host}"), cmd)
            .unwrap_or_else(|e| panic!("spawn: {e}"))
    };
    let a = start(0, Some(&key));
    let b = start(1, Some(&key));
    let outsider = start(2, None);
    let all = 10081;
    bed.wait_for(Duration::from_secs(60), "the keyed pair to list 2", |l| {
        [a, b]
            .iter()
            .all(|&n| l.last(n, all).is_some_and(|x| x.size == 2))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // Several announcement intervals more: the outsider must still be alone and unlisted.
    std::thread::sleep(Duration::from_secs(5));
    let logs = bed.logs();
    let lone = logs
        .last(outsider, all)
        .expect("the outsider logs its list");
    assert_eq!(lone.size, 1, "{}", logs.text(outsider));
    let outsider_uuid = lone.members[0].uuid;
    for n in [a, b] {
        for list in logs.lists(n) {
            assert!(list.members.iter().all(|m| m.uuid != outsider_uuid));
        }
    }
}
