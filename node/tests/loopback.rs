//! Process tests on loopback: real `node` binaries on 127.0.0.21-24 with static discovery.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use membership::{LoggedList, parse_logged_lists};

const BIN: &str = env!("CARGO_BIN_EXE_node");

/// A node process whose stderr is collected; killed when dropped.
struct Node {
    child: Child,
    log: Arc<Mutex<String>>,
    ip: &'static str,
}

impl Node {
    fn start(role: &str, ip: &'static str, peers: &str) -> Node {
        let mut child = Command::new(BIN)
            .args(["--role", role, "--discovery", "static"])
            .args(["--private_ip_selector", &format!("{ip}/32")])
            .args(["--static_members", peers])
            .args(["--public_port", "18080", "--public_bind_to_any=false"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Node { child, log, ip }
    }

    fn text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Every list this node logged for the cluster on `port`.
    fn lists(&self, port: u16) -> Vec<LoggedList> {
        parse_logged_lists(&self.text())
            .into_iter()
            .filter(|l| l.port() == Some(port))
            .collect()
    }

    fn last(&self, port: u16) -> Option<LoggedList> {
        self.lists(port).pop()
    }

    fn signal(&self, sig: &str) {
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
    }

    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().unwrap() {
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

fn wait_until(within: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if pred() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    pred()
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn one_scheduler_and_two_workers_form_both_clusters_and_log_a_leave() {
    let peers = "127.0.0.21,127.0.0.22,127.0.0.23";
    let sched = Node::start("scheduler", "127.0.0.21", peers);
    let w1 = Node::start("worker", "127.0.0.22", peers);
    let mut w2 = Node::start("worker", "127.0.0.23", peers);
    let nodes = [&sched, &w1, &w2];

    let converged = wait_until(Duration::from_secs(15), || {
        let lasts: Vec<_> = nodes.iter().map(|n| n.last(10081)).collect();
        lasts
            .iter()
            .all(|l| l.as_ref().is_some_and(|l| l.size == 3))
            && lasts.windows(2).all(|w| {
                w[0].as_ref().map(LoggedList::shape) == w[1].as_ref().map(LoggedList::shape)
            })
    });
    assert!(
        converged,
        "no common list of 3; logs:\n{}\n---\n{}\n---\n{}",
        sched.text(),
        w1.text(),
        w2.text()
    );

    // The exact layout: a tab before every member line, `this` on the node's own line only.
    for n in nodes {
        let last = n.last(10081).unwrap();
        let this: Vec<_> = last.members.iter().filter(|m| m.this).collect();
        assert_eq!(this.len(), 1);
        assert_eq!(this[0].addr.ip().to_string(), n.ip);
        let text = n.text();
        for m in &last.members {
            let line = format!(
                "\tMember [{}]:10081 - {}{}",
                m.addr.ip(),
                m.uuid,
                if m.this { " this" } else { "" }
            );
            assert!(text.lines().any(|l| l == line), "missing line {line:?}");
        }
        assert!(text.contains(&format!("Members {{size:3, ver:{}}} [", last.ver)));
        // ver only grows.
        let vers: Vec<u64> = n.lists(10081).iter().map(|l| l.ver).collect();
        assert!(vers.windows(2).all(|w| w[0] < w[1]), "{vers:?}");
    }

    // The scheduler prints two groups; workers print one.
    let s = sched
        .last(9081)
        .expect("the scheduler logs its scheduler cluster");
    assert_eq!(s.size, 1);
    assert!(w1.lists(9081).is_empty() && w2.lists(9081).is_empty());

    // The internal API agrees with the logs.
    let body = http_get("127.0.0.21:8081", "/v1/members");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let json: serde_json::Value =
        serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let clusters = json["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 2);
    assert_eq!(clusters[1]["cluster"], "all");
    assert_eq!(clusters[1]["members"].as_array().unwrap().len(), 3);
    assert!(http_get("127.0.0.21:18080", "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get("127.0.0.21:18080", "/readyz").starts_with("HTTP/1.1 200"));

    // A graceful leave: the node exits 0 and the survivors log it within a second or so.
    let gone = w2
        .last(10081)
        .unwrap()
        .members
        .iter()
        .find(|m| m.this)
        .unwrap()
        .uuid;
    w2.signal("TERM");
    let status = w2
        .wait_exit(Duration::from_secs(5))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    let left = wait_until(Duration::from_secs(5), || {
        [&sched, &w1].iter().all(|n| {
            n.last(10081)
                .is_some_and(|l| l.size == 2 && !l.members.iter().any(|m| m.uuid == gone))
        })
    });
    assert!(left, "survivors did not log the leave:\n{}", sched.text());
    assert_eq!(
        sched.last(10081).unwrap().shape(),
        w1.last(10081).unwrap().shape()
    );
}

#[test]
fn a_selector_that_matches_no_interface_fails_with_the_interface_list() {
    let out = Command::new(BIN)
        .args([
            "--private_ip_selector",
            "198.19.255.0/24",
            "--static_members",
            "127.0.0.1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no interface address is inside --private_ip_selector 198.19.255.0/24"),
        "{err}"
    );
    assert!(err.contains("lo: 127.0.0.1/8"), "{err}");
}

#[test]
fn a_taken_port_names_the_port_and_the_flag() {
    let _held = std::net::TcpListener::bind("127.0.0.24:8081").unwrap();
    let out = Command::new(BIN)
        .args([
            "--private_ip_selector",
            "127.0.0.24/32",
            "--static_members",
            "127.0.0.25",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("port 8081 on 127.0.0.24 is already in use"),
        "{err}"
    );
    assert!(err.contains("--private_port"), "{err}");
}

#[test]
fn an_empty_static_list_is_named() {
    let out = Command::new(BIN)
        .args([
            "discover",
            "--private_ip_selector",
            "127.0.0.26/32",
            "--static_members",
            ",",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--static_members is empty"), "{err}");
}

#[test]
fn discover_prints_json_with_candidates_and_exclusions() {
    let out = Command::new(BIN)
        .args([
            "discover",
            "--json",
            "--private_ip_selector",
            "127.0.0.27/32",
        ])
        .args(["--static_members", "127.0.0.27,127.0.0.28:9000"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["candidates"][0]["ip"], "127.0.0.28");
    assert_eq!(v["candidates"][0]["port"], 9000);
    assert_eq!(v["excluded"][0]["id"], "127.0.0.27");
    assert_eq!(v["excluded"][0]["reason"], "self");
}
