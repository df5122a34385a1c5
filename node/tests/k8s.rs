//! End to end on loopback: `node` processes with `--discovery=k8s` against the Kubernetes API
//! fake, whose pods carry the nodes' addresses (127.0.0.41-45). They form both clusters; a pod
//! deleted in the fake leaves (SIGTERM, as the kubelet does) or dies (SIGKILL) and is dropped.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_fake::{FakeApi, running_pod};
use membership::{LoggedList, parse_logged_lists};

const BIN: &str = env!("CARGO_BIN_EXE_node");
const NS: &str = "builds";
const TOKEN: &str = "e2e-token";
const APP: (&str, &str) = ("app", "cluster-start");
const ROLE: &str = "app.kubernetes.io/component";

/// A node process whose stderr is collected; killed when dropped.
struct Node {
    child: Child,
    log: Arc<Mutex<String>>,
}

fn node_command(fake: &FakeApi, sa_dir: &Path, role: &str, ip: &str) -> Command {
    let mut c = Command::new(BIN);
    c.args(["--role", role, "--discovery", "k8s"])
        .args(["--private_ip_selector", &format!("{ip}/32")])
        .args(["--k8s_label_selector", "app=cluster-start"])
        .args(["--public_port", "18080", "--public_bind_to_any=false"])
        .args(["--discovery_refresh", "60s"])
        .env("KUBERNETES_SERVICE_HOST", fake.addr().ip().to_string())
        .env("KUBERNETES_SERVICE_PORT", fake.addr().port().to_string())
        .env("NODE_K8S_SERVICE_ACCOUNT_DIR", sa_dir)
        .env_remove("KUBECONFIG")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    c
}

impl Node {
    fn start(fake: &FakeApi, sa_dir: &Path, role: &str, ip: &str) -> Node {
        let mut child = node_command(fake, sa_dir, role, ip)
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
        Node { child, log }
    }

    fn text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn last(&self, port: u16) -> Option<LoggedList> {
        parse_logged_lists(&self.text())
            .into_iter()
            .rfind(|l| l.port() == Some(port))
    }

    fn me(&self) -> uuid::Uuid {
        self.last(10081)
            .and_then(|l| l.members.into_iter().find(|m| m.this))
            .expect("a logged list")
            .uuid
    }

    fn signal(&self, sig: &str) {
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
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
        std::thread::sleep(Duration::from_millis(100));
    }
    pred()
}

fn logs(nodes: &[&Node]) -> String {
    nodes
        .iter()
        .map(|n| n.text())
        .collect::<Vec<_>>()
        .join("\n-----\n")
}

#[test]
fn nodes_find_each_other_through_the_fake_api_and_drop_deleted_pods() {
    let fake = FakeApi::start(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 40))).unwrap();
    fake.grant(TOKEN, &[NS]);
    let dir = tempfile::tempdir().unwrap();
    fake.write_service_account(dir.path(), TOKEN, NS).unwrap();
    let pods = [
        ("sched-0", "127.0.0.41", "scheduler"),
        ("sched-1", "127.0.0.42", "scheduler"),
        ("worker-a", "127.0.0.43", "worker"),
        ("worker-b", "127.0.0.44", "worker"),
        ("worker-c", "127.0.0.45", "worker"),
    ];
    for (name, ip, role) in pods {
        fake.put_pod(NS, &running_pod(name, ip, &[APP, (ROLE, role)]));
    }
    // Pods that must not count: one terminating, one not scheduled yet, one of another app.
    fake.put_pod(NS, &running_pod("old", "127.0.0.49", &[APP]));
    fake.terminate_pod(NS, "old");
    fake.put_pod(
        NS,
        &serde_json::from_value(serde_json::json!({
            "metadata": {"name": "unscheduled", "labels": {"app": "cluster-start"}},
            "status": {"phase": "Pending"},
        }))
        .unwrap(),
    );
    fake.put_pod(NS, &running_pod("other", "127.0.0.48", &[("app", "else")]));

    // `node discover` reports every pod it skipped, with the reason.
    let out = node_command(&fake, dir.path(), "scheduler", "127.0.0.41")
        .args(["discover", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ips: Vec<&str> = v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["ip"].as_str().unwrap())
        .collect();
    ips.sort();
    assert_eq!(
        ips,
        ["127.0.0.42", "127.0.0.43", "127.0.0.44", "127.0.0.45"]
    );
    let excluded: Vec<(String, String)> = v["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["id"].as_str().unwrap().to_owned(),
                x["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(excluded.len(), 3, "{excluded:?}");
    assert!(excluded.contains(&("pod/sched-0".into(), "self".into())));
    assert!(
        excluded
            .iter()
            .any(|(id, r)| id == "pod/old" && r.contains("deletionTimestamp"))
    );
    assert!(
        excluded
            .iter()
            .any(|(id, r)| id == "pod/unscheduled" && r.contains("no podIP"))
    );

    let nodes: Vec<Node> = pods
        .iter()
        .map(|(_, ip, role)| Node::start(&fake, dir.path(), role, ip))
        .collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    let formed = wait_until(Duration::from_secs(20), || {
        let all: Vec<_> = nodes.iter().map(|n| n.last(10081)).collect();
        all.iter().all(|l| l.as_ref().is_some_and(|l| l.size == 5))
            && all.windows(2).all(|w| {
                w[0].as_ref().map(LoggedList::shape) == w[1].as_ref().map(LoggedList::shape)
            })
            && nodes[..2]
                .iter()
                .all(|n| n.last(9081).is_some_and(|l| l.size == 2))
    });
    assert!(formed, "the clusters did not form:\n{}", logs(&refs));
    for w in &nodes[2..] {
        assert!(
            w.last(9081).is_none(),
            "a worker joined the scheduler cluster"
        );
    }
    // The nodes follow the API with a watch, not only with lists.
    assert!(
        fake.requests().iter().any(|q| q.contains("watch=true")),
        "{:?}",
        fake.requests()
    );

    // The kubelet's way: the pod is deleted and its container gets SIGTERM, so it leaves.
    let c = nodes[4].me();
    assert!(fake.delete_pod(NS, "worker-c"));
    nodes[4].signal("TERM");
    let left = wait_until(Duration::from_secs(10), || {
        nodes[..4].iter().all(|n| {
            n.last(10081)
                .is_some_and(|l| l.size == 4 && !l.members.iter().any(|m| m.uuid == c))
        })
    });
    assert!(left, "worker-c's leave was not logged:\n{}", logs(&refs));

    // A pod that dies without a word (node lost): the failure detector removes it.
    let b = nodes[3].me();
    nodes[3].signal("KILL");
    assert!(fake.delete_pod(NS, "worker-b"));
    let dropped = wait_until(Duration::from_secs(30), || {
        nodes[..3].iter().all(|n| {
            n.last(10081)
                .is_some_and(|l| l.size == 3 && !l.members.iter().any(|m| m.uuid == b))
        })
    });
    assert!(dropped, "worker-b was not dropped:\n{}", logs(&refs));
    assert_eq!(
        nodes[0].last(9081).map(|l| l.size),
        Some(2),
        "the scheduler cluster is untouched"
    );
}

#[test]
fn a_node_without_rbac_says_which_rule_is_missing() {
    let fake = FakeApi::start(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 40))).unwrap();
    fake.grant(TOKEN, &["other-namespace"]);
    let dir = tempfile::tempdir().unwrap();
    fake.write_service_account(dir.path(), TOKEN, NS).unwrap();
    let out = node_command(&fake, dir.path(), "worker", "127.0.0.46")
        .arg("discover")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("403") && err.contains("\"pods\"") && err.contains("\"watch\""),
        "{err}"
    );
}
