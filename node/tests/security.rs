//! Cluster-key and hardening tests on loopback (127.0.0.31-39, 127.0.0.81-84; strangers from
//! 127.0.7.0/24). In-process (whole nodes with ephemeral ports): a wrong key is shut out,
//! forged and replayed packets change nothing, a flood of random datagrams removes no one, and
//! idle stream connections from strangers do not stop a join. As processes (what needs one):
//! keys rotate on SIGHUP with no member change, idle HTTP connections starve neither health
//! checks nor gossip under a low open-file limit, and sealed multicast across namespaces.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keyring::{Keyring, Sealer, SealerConfig};
use membership::{NodeId, Role, wire};
use node::cluster::view::ClusterJson;
use node::logical::{ALL, Logical, SCHEDULER};

mod common;
use common::{BIN, InProcess, Node, converged, eventually, in_process_converged, wait_until};

const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

/// Writes a key file readable by its owner only.
fn key_file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// One cluster as `GET /v1/members` shows it, reduced to what these tests compare.
#[derive(Debug, Clone, PartialEq)]
struct View {
    ver: u64,
    this: String,
    members: Vec<String>,
    rejected: BTreeMap<String, u64>,
}

impl View {
    fn of(c: &ClusterJson) -> Self {
        Self {
            ver: c.version,
            this: c.this.clone(),
            members: c.members.iter().map(|m| m.uuid.clone()).collect(),
            rejected: c.rejected.clone(),
        }
    }

    fn rejected(&self, reason: &str) -> u64 {
        self.rejected.get(reason).copied().unwrap_or(0)
    }
}

/// Asserts that every cluster of `before` holds the same list (version and members) `now`.
fn assert_same_lists(before: &BTreeMap<String, View>, now: &BTreeMap<String, View>, on: &str) {
    for (cluster, v) in before {
        let w = &now[cluster];
        assert_eq!(
            (w.ver, &w.members),
            (v.ver, &v.members),
            "{cluster} on {on}"
        );
    }
}

/// Every cluster's [`View`] from the API at `addr`.
fn views_at(addr: SocketAddr) -> Option<BTreeMap<String, View>> {
    let m = common::members(addr)?;
    Some(
        m.clusters
            .iter()
            .map(|c| (c.cluster.clone(), View::of(c)))
            .collect(),
    )
}

impl InProcess {
    async fn views(&self) -> Option<BTreeMap<String, View>> {
        let m = self.members().await?;
        Some(
            m.clusters
                .iter()
                .map(|c| (c.cluster.clone(), View::of(c)))
                .collect(),
        )
    }
}

/// Binds every node first, so each can name all the others, then starts them in cluster
/// `name` with their keys.
async fn cluster(name: &str, specs: &[(&str, Role, Option<&Path>)]) -> Vec<InProcess> {
    let mut bound = Vec::new();
    for (ip, role, _) in specs {
        bound.push(InProcess::bind(ip, *role).await);
    }
    let peers: Vec<String> = bound.iter().map(InProcess::peer).collect();
    let peers = peers.join(",");
    bound
        .into_iter()
        .zip(specs)
        .map(|(b, (_, _, key))| {
            let mut args = vec!["--cluster_name", name, "--static_members", &peers];
            if let Some(k) = key {
                args.extend(["--cluster_key_file", k.to_str().unwrap()]);
            }
            InProcess::start(b, &args)
        })
        .collect()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_key_or_no_key_never_appears_in_any_list() {
    common::capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let good = key_file(&dir, "good", &format!("{K1}\n"));
    let bad = key_file(&dir, "bad", &format!("{K2}\n"));
    let n = cluster(
        "sec-wrongkey",
        &[
            ("127.0.0.31", Role::Worker, Some(&good)),
            ("127.0.0.32", Role::Worker, Some(&good)),
            ("127.0.0.33", Role::Worker, Some(&bad)),
            // Keyless, on the same IP as the wrong key.
            ("127.0.0.33", Role::Worker, None),
        ],
    )
    .await;
    let (a, b, c, d) = (&n[0], &n[1], &n[2], &n[3]);
    let pair: &[&InProcess] = &[a, b];
    assert!(
        eventually(Duration::from_secs(30), move || in_process_converged(
            pair, "all", 2
        ))
        .await,
        "the two nodes with the right key did not converge: {:?}",
        a.members().await
    );
    // Give the outsiders time to keep trying, while no list ever names them.
    let outsiders = [c.view("all").await.this, d.view("all").await.this];
    let end = Instant::now() + Duration::from_secs(4);
    while Instant::now() < end {
        for x in pair {
            let v = x.view("all").await;
            assert!(
                v.members.iter().all(|m| !outsiders.contains(&m.uuid)),
                "an outsider was listed: {v:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let [va, vb, vc, vd] = [a, b, c, d].map(|x| x.views());
    let (va, vb, vc, vd) = (
        va.await.unwrap(),
        vb.await.unwrap(),
        vc.await.unwrap(),
        vd.await.unwrap(),
    );
    let (va, vb, vc, vd) = (&va["all"], &vb["all"], &vc["all"], &vd["all"]);
    assert_eq!(va.members, vb.members);
    assert_eq!(va.members.len(), 2, "{va:?}");
    for outsider in [vc, vd] {
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
    // The drop warning names where the refused packets came from.
    let logs = common::logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("dropped packets that failed checks")
                && l.contains("from=127.0.0.33:")),
        "{logs}"
    );
}

/// A node's view of the all-instances cluster.
async fn all_view(x: &InProcess) -> View {
    x.views().await.expect("the API answers")["all"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_leaves_leave_the_view_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(&dir, "key", &format!("{K1}\n"));
    let name = "sec-replay";
    let mut n = cluster(
        name,
        &[
            ("127.0.0.37", Role::Worker, Some(&key)),
            ("127.0.0.38", Role::Worker, Some(&key)),
        ],
    )
    .await;
    let b = n.pop().unwrap();
    let a = n.pop().unwrap();
    let pair: &[&InProcess] = &[&a, &b];
    assert!(
        eventually(Duration::from_secs(30), move || in_process_converged(
            pair, "all", 2
        ))
        .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = all_view(&a).await;
    let b_uuid: uuid::Uuid = all_view(&b).await.this.parse().unwrap();
    // A leave naming B with an identity that wins every address conflict: if accepted, it
    // replaces B by a member that is down.
    let forged_id = NodeId::new(b.gossip(&ALL), b_uuid, u64::MAX - 1, Role::Worker);
    let leave = wire::encode_leave(wire::cluster_tag(name, "all"), &forged_id);
    let aad = keyring::aad(name, "all");
    let s = sealer(K1);
    let now = keyring::unix_ms();
    let to = a.gossip(&ALL);

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
    tokio::time::sleep(Duration::from_millis(300)).await;
    send(to, &harmless);

    let a = &a;
    assert!(
        eventually(Duration::from_secs(5), move || async move {
            let v = all_view(a).await;
            v.rejected("sealed_malformed") >= 1
                && v.rejected("auth_failed") >= 2
                && v.rejected("stale") >= 1
                && v.rejected("replayed") >= 1
        })
        .await,
        "{:?}",
        all_view(a).await
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = all_view(a).await;
    assert_eq!((after.ver, &after.members), (base.ver, &base.members));

    // Control: the same leave, sealed now with the right key, passes every check of the key
    // and reaches the engine, which refuses it because it does not come from B's address: a
    // key holder cannot make a member leave for it.
    let spoofed_before = all_view(a).await.rejected("spoofed_source");
    send(to, &s.seal(&aad, &leave));
    assert!(
        eventually(Duration::from_secs(5), move || async move {
            all_view(a).await.rejected("spoofed_source") > spoofed_before
        })
        .await,
        "the fresh, rightly sealed leave was not refused as spoofed: {:?}",
        all_view(a).await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b_text = b_uuid.to_string();
    assert!(all_view(a).await.members.contains(&b_text));
    // B's own leave, from its address, does remove it at once.
    b.leave().await.expect("a clean leave");
    let b_text = &b_text;
    assert!(
        eventually(Duration::from_secs(5), move || async move {
            !all_view(a).await.members.contains(b_text)
        })
        .await,
        "B's own leave had no effect: {:?}",
        all_view(a).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_random_datagrams_removes_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(&dir, "key", &format!("{K1}\n"));
    let n = cluster(
        "sec-flood",
        &[
            ("127.0.0.38", Role::Scheduler, Some(&key)),
            ("127.0.0.39", Role::Scheduler, Some(&key)),
        ],
    )
    .await;
    let (a, b) = (&n[0], &n[1]);
    let pair: &[&InProcess] = &[a, b];
    assert!(
        eventually(Duration::from_secs(30), move || async move {
            in_process_converged(pair, "all", 2).await
                && in_process_converged(pair, "scheduler", 2).await
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = (a.views().await.unwrap(), b.views().await.unwrap());
    let targets = [
        a.gossip(&SCHEDULER),
        a.gossip(&ALL),
        b.gossip(&SCHEDULER),
        b.gossip(&ALL),
    ];
    // The flood runs on a thread of its own, so the nodes keep the runtime's workers.
    let sent = tokio::task::spawn_blocking(move || flood(targets))
        .await
        .unwrap();
    assert!(sent > 10_000, "only {sent} datagrams sent");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (x, before) in [(a, &base.0), (b, &base.1)] {
        let now = x.views().await.unwrap();
        assert_same_lists(before, &now, &x.ip.to_string());
        for (cluster, w) in &now {
            let dropped: u64 = w.rejected.values().sum();
            assert!(dropped > 1000, "{cluster} on {}: {w:?}", x.ip);
        }
    }
    let all = &a.views().await.unwrap()["all"];
    assert!(all.rejected("rate_limited") > 0, "{all:?}");
}

/// About 8000 datagrams a second for 10 s, of 1 to 1500 random bytes, at `targets`; then 100
/// streams of random frames from one source at the second target, so the per-source rate
/// limit trips. Returns the datagrams sent.
fn flood(targets: [SocketAddr; 4]) -> u64 {
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
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_stream_connections_from_strangers_do_not_stop_a_join() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(&dir, "key", &format!("{K1}\n"));
    let bound_a = InProcess::bind("127.0.0.83", Role::Scheduler).await;
    let bound_b = InProcess::bind("127.0.0.84", Role::Scheduler).await;
    let peers = [InProcess::peer(&bound_a), InProcess::peer(&bound_b)].join(",");
    let targets = [
        bound_a.gossip_addr(&SCHEDULER),
        bound_a.gossip_addr(&ALL),
        bound_b.gossip_addr(&SCHEDULER),
        bound_b.gossip_addr(&ALL),
    ];
    let args = [
        "--cluster_name",
        "sec-streamjam",
        "--static_members",
        &peers,
        "--cluster_key_file",
        key.to_str().unwrap(),
    ];
    let a = InProcess::start(bound_a, &args);
    assert!(
        eventually(Duration::from_secs(10), || async {
            a.members().await.is_some()
        })
        .await,
        "A did not start"
    );
    // 40 strangers keep 4 idle connections each at both stream ports of A and of B (bound,
    // not yet running): more than every read slot outside the members' reserve, the whole
    // time B joins. Joins need a stream sync to get through one way or the other.
    let sources: Vec<String> = (1..=40).map(|i| format!("127.0.7.{i}")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let jam_start = tokio::time::Instant::now();
    let jam = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            hold_idle_streams(&sources, &targets, 4, &stop, Duration::from_secs(40))
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = InProcess::start(bound_b, &args);
    let pair: &[&InProcess] = &[&a, &b];
    let joined = eventually(Duration::from_secs(20), move || async move {
        in_process_converged(pair, "all", 2).await
            && in_process_converged(pair, "scheduler", 2).await
    })
    .await;
    let views = a.views().await;
    // Keep the jam up for several head deadlines however fast B joined, so the node closed
    // and the jam reopened connections the whole time.
    tokio::time::sleep_until(jam_start + Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let opened = jam.await.unwrap();
    assert!(joined, "B did not join under the jam: {views:?}");
    assert!(opened >= 640, "the jam opened only {opened} connections");
    let all = &views.unwrap()["all"];
    assert!(
        all.rejected("busy") > 0,
        "the jam never filled the slots: {all:?}"
    );
    assert!(all.rejected("stream_timeout") > 0, "{all:?}");
}

// ---------------------------------------------------------------------------------------------
// Process tests: what needs a process of its own.

/// A node process on `ip:port`; its stderr is collected by [`Node`].
struct Proc {
    node: Node,
    ip: String,
    port: u16,
}

impl Proc {
    fn start(cluster: &str, ip: &str, port: u16, peers: &[&str], key: &Path) -> Self {
        Self::start_wrapped(cluster, ip, port, peers, key, &[])
    }

    /// Like [`Proc::start`], through `wrapper` (a program that execs the rest, like
    /// `prlimit`). Every node here is a scheduler.
    fn start_wrapped(
        cluster: &str,
        ip: &str,
        port: u16,
        peers: &[&str],
        key: &Path,
        wrapper: &[&str],
    ) -> Self {
        let mut cmd = match wrapper {
            [] => Command::new(BIN),
            [program, args @ ..] => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
        };
        cmd.args(["--role", "scheduler", "--discovery", "static"])
            .args(["--private_ip_selector", &format!("{ip}/32")])
            .args(["--private_port", &port.to_string()])
            .args(["--public_port", &(port - 1).to_string()])
            .args(["--public_bind_to_any=false", "--discovery_refresh", "1s"])
            .args(["--cluster_name", cluster])
            .args(["--static_members", &peers.join(",")])
            .arg("--cluster_key_file")
            .arg(key)
            .env("RUST_LOG", "info")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("GCE_METADATA_HOST", "127.0.0.1:9")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("NODE_CLUSTER_KEY_FILE");
        Self {
            node: Node::spawn(cmd),
            ip: ip.to_owned(),
            port,
        }
    }

    fn api(&self) -> SocketAddr {
        format!("{}:{}", self.ip, self.port).parse().unwrap()
    }

    fn gossip(&self, cluster: &Logical) -> SocketAddr {
        SocketAddr::new(self.ip.parse().unwrap(), cluster.port(self.port).unwrap())
    }

    fn views(&self) -> Option<BTreeMap<String, View>> {
        views_at(self.api())
    }

    fn view(&self, cluster: &str) -> View {
        self.views()
            .and_then(|mut v| v.remove(cluster))
            .unwrap_or_else(|| panic!("no {cluster} view from {}", self.api()))
    }

    fn log(&self) -> String {
        self.node.text()
    }
}

/// Whether every process holds the same `cluster` list of `n` members.
fn procs_converged(nodes: &[&Proc], cluster: &str, n: usize) -> bool {
    let views: Vec<_> = nodes.iter().map(|p| common::members(p.api())).collect();
    converged(&views, cluster, n)
}

#[test]
fn rolling_key_rotation_removes_no_one_and_keeps_the_version() {
    let dir = tempfile::tempdir().unwrap();
    let ips = ["127.0.0.34", "127.0.0.35", "127.0.0.36"];
    let files: Vec<PathBuf> = ips
        .iter()
        .map(|ip| key_file(&dir, ip, &format!("{K1}\n")))
        .collect();
    let nodes: Vec<Proc> = ips
        .iter()
        .zip(&files)
        .map(|(ip, f)| Proc::start("sec-rotate", ip, 8081, &ips, f))
        .collect();
    let refs: Vec<&Proc> = nodes.iter().collect();
    assert!(
        wait_until(Duration::from_secs(40), || procs_converged(&refs, "all", 3)
            && procs_converged(&refs, "scheduler", 3)),
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
            n.node.signal("HUP");
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
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", n.node.child.id())).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(!cmdline.contains(K1) && !cmdline.contains(K2));
    }
    // The retired key is refused now.
    let target = nodes[0].gossip(&ALL);
    let before = nodes[0].view("all").rejected("auth_failed");
    send(
        target,
        &sealer(K1).seal(&keyring::aad("sec-rotate", "all"), b"x"),
    );
    assert!(wait_until(Duration::from_secs(5), || {
        nodes[0].view("all").rejected("auth_failed") > before
    }));
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

/// One GET; the body of a 200 answer that arrived within `limit`.
fn get_within(to: SocketAddr, path: &str, limit: Duration) -> Result<String, String> {
    let t0 = Instant::now();
    let body = common::get(to, path)?;
    if t0.elapsed() > limit {
        return Err(format!("answered after {:?}", t0.elapsed()));
    }
    Ok(body)
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
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(&dir, "key", &format!("{K1}\n"));
    let peers = ["127.0.0.81:8381", "127.0.0.82:8381"];
    let name = "sec-idlehttp";
    let a = Proc::start(name, "127.0.0.81", 8381, &peers, &key);
    // B may open only 640 files: its caps ((640 - 512) / 2 = 64 a listener, against A's 128)
    // are far below 1000 connections, so only closing the longest-idle ones keeps it answering,
    // and it warns that the open-file limit set them.
    let b = Proc::start_wrapped(
        name,
        "127.0.0.82",
        8381,
        &peers,
        &key,
        &["prlimit", "--nofile=640:640"],
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            procs_converged(&[&a, &b], "all", 2) && procs_converged(&[&a, &b], "scheduler", 2)
        }),
        "the cluster did not converge:\n{}\n{}",
        a.log(),
        b.log()
    );
    let base = (a.views().unwrap(), b.views().unwrap());
    let http = |n: &Proc, port: u16| -> SocketAddr { format!("{}:{port}", n.ip).parse().unwrap() };
    let ports = |n: &Proc| [http(n, n.port - 1), http(n, n.port)];
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
        assert_same_lists(before, &now, &n.ip);
        for w in now.values() {
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

/// Multicast discovery with a key, across network namespaces (needs root, as CI has): keyed
/// nodes find each other through sealed announcements, and a keyless node on the same group
/// hears nothing it can use and is never listed.
#[test]
fn sealed_multicast_announcements_admit_only_key_holders() {
    if let Err(e) = testbed::check_prerequisites() {
        panic!("the network-namespace test cannot run here: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(&dir, "key", &format!("{K1}\n"));
    let mut bed = testbed::Testbed::new(3).unwrap_or_else(|e| panic!("test bed: {e}"));
    let cidr = bed.cidr();
    let mut start = |host: usize, key: Option<&Path>| {
        let mut cmd = Command::new(BIN);
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
    let all = common::port(&ALL);
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
