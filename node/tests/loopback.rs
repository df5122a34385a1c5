//! Loopback tests. In-process: whole nodes on 127.0.0.21-23 with ephemeral ports and static
//! discovery form both clusters, show role and zone per member in the API and metrics, and see
//! a graceful leave. As processes (what needs one): the member log's exact layout and a leave
//! on SIGTERM (127.0.0.24-25), and the CLI's exit codes and messages (127.0.0.26-29).

use std::process::Command;
use std::time::Duration;

use node::logical::{ALL, Role, SCHEDULER};

mod common;
use common::{BIN, InProcess, Node, in_process_converged, port, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_scheduler_and_two_workers_form_both_clusters_and_see_a_leave() {
    let bound = [
        InProcess::bind("127.0.0.21", Role::Scheduler).await,
        InProcess::bind("127.0.0.22", Role::Worker).await,
        InProcess::bind("127.0.0.23", Role::Worker).await,
    ];
    let peers: Vec<String> = bound.iter().map(InProcess::peer).collect();
    let peers = peers.join(",");
    let zones = [Some("zone-a"), Some("zone-b"), None];
    let mut nodes = Vec::new();
    for (b, zone) in bound.into_iter().zip(zones) {
        let mut args = vec!["--static_members", peers.as_str()];
        if let Some(z) = zone {
            args.extend(["--zone", z]);
        }
        nodes.push(InProcess::start(b, &args));
    }
    let refs: &[&InProcess] = &nodes.iter().collect::<Vec<_>>();
    let formed = common::eventually(Duration::from_secs(15), move || {
        in_process_converged(refs, "all", 3)
    })
    .await;
    assert!(formed, "no common list of 3: {:?}", refs[0].members().await);

    // Every node shows every member with its role and zone, and itself as `this`.
    for n in &nodes {
        let all = n.view("all").await;
        assert_eq!(all.port, n.gossip(&ALL).port());
        let mut rows: Vec<(String, String, Option<String>)> = all
            .members
            .iter()
            .map(|m| (m.address.clone(), m.role.clone(), m.zone.clone()))
            .collect();
        rows.sort();
        let expected: Vec<(String, String, Option<String>)> = nodes
            .iter()
            .zip(["scheduler", "worker", "worker"])
            .zip(zones)
            .map(|((x, role), zone)| {
                let addr = x.gossip(&ALL).to_string();
                (addr, role.to_owned(), zone.map(str::to_owned))
            })
            .collect();
        let mut expected = expected;
        expected.sort();
        assert_eq!(rows, expected, "on {}", n.api);
        let this: Vec<_> = all.members.iter().filter(|m| m.this).collect();
        assert_eq!(this.len(), 1);
        assert_eq!(this[0].uuid, all.this);
        assert_eq!(this[0].address, n.gossip(&ALL).to_string());
    }

    // The scheduler is in two clusters, alone in its own; workers only in `all`.
    let s = nodes[0].members().await.unwrap();
    let names: Vec<&str> = s.clusters.iter().map(|c| c.cluster.as_str()).collect();
    assert_eq!(names, ["scheduler", "all"]);
    assert_eq!(s.clusters[0].members.len(), 1);
    assert_eq!(s.clusters[0].port, nodes[0].gossip(&SCHEDULER).port());
    for w in &nodes[1..] {
        let m = w.members().await.unwrap();
        assert_eq!(m.clusters.len(), 1);
        assert_eq!(m.clusters[0].cluster, "all");
    }

    // Health and readiness on the scheduler's public port.
    let public = nodes[0].public.expect("a scheduler listens publicly");
    for path in ["/healthz", "/readyz"] {
        common::get_async(public, path).await.unwrap();
    }
    // The members gauge by role and zone.
    let metrics = common::get_async(nodes[1].api, "/metrics").await.unwrap();
    for line in [
        r#"node_cluster_zone_members{cluster="all",role="scheduler",zone="zone-a"} 1"#,
        r#"node_cluster_zone_members{cluster="all",role="worker",zone="zone-b"} 1"#,
        r#"node_cluster_zone_members{cluster="all",role="worker",zone=""} 1"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in:\n{metrics}"
        );
    }

    // A graceful leave: run returns, and the survivors drop the member within seconds.
    let gone = nodes[2].view("all").await.this;
    let leaver = nodes.pop().unwrap();
    leaver.leave().await.expect("a clean leave");
    let refs: &[&InProcess] = &nodes.iter().collect::<Vec<_>>();
    let gone = &gone;
    let left = common::eventually(Duration::from_secs(5), move || async move {
        in_process_converged(refs, "all", 2).await
            && !refs[0]
                .view("all")
                .await
                .members
                .iter()
                .any(|m| &m.uuid == gone)
    })
    .await;
    assert!(
        left,
        "survivors did not drop the leaver: {:?}",
        refs[0].members().await
    );
}

/// Starts a node process on `ip` with static discovery.
fn start(role: &str, ip: &'static str, peers: &str) -> Node {
    let mut cmd = Command::new(BIN);
    cmd.args(["--role", role, "--discovery", "static"])
        .args(["--private_ip_selector", &format!("{ip}/32")])
        .args(["--static_members", peers])
        .args(["--public_port", "18080", "--public_bind_to_any=false"])
        .env("RUST_LOG", "info");
    Node::spawn(cmd)
}

#[test]
fn processes_log_lists_in_the_hazelcast_layout_and_leave_on_sigterm() {
    let peers = "127.0.0.24,127.0.0.25";
    let sched = start("scheduler", "127.0.0.24", peers);
    let mut worker = start("worker", "127.0.0.25", peers);
    let nodes = [(&sched, "127.0.0.24"), (&worker, "127.0.0.25")];
    let all = port(&ALL);
    let converged = wait_until(Duration::from_secs(15), || {
        let lasts: Vec<_> = nodes.iter().map(|(n, _)| n.last(all)).collect();
        common::lists_agree(&lasts, 2)
    });
    assert!(
        converged,
        "no common list of 2; logs:\n{}\n---\n{}",
        sched.text(),
        worker.text()
    );

    // The exact layout: a tab before every member line, `this` on the node's own line only.
    for (n, ip) in nodes {
        let last = n.last(all).unwrap();
        let this: Vec<_> = last.members.iter().filter(|m| m.this).collect();
        assert_eq!(this.len(), 1);
        assert_eq!(this[0].addr.ip().to_string(), ip);
        let text = n.text();
        for m in &last.members {
            let line = format!(
                "\tMember [{}]:{all} - {}{}",
                m.addr.ip(),
                m.uuid,
                if m.this { " this" } else { "" }
            );
            assert!(text.lines().any(|l| l == line), "missing line {line:?}");
        }
        assert!(text.contains(&format!("Members {{size:2, ver:{}}} [", last.ver)));
        // ver only grows.
        let vers: Vec<u64> = n.lists(all).iter().map(|l| l.ver).collect();
        assert!(vers.windows(2).all(|w| w[0] < w[1]), "{vers:?}");
    }
    // The scheduler prints two groups; the worker one.
    let s = sched
        .last(port(&SCHEDULER))
        .expect("the scheduler logs its scheduler cluster");
    assert_eq!(s.size, 1);
    assert!(worker.lists(port(&SCHEDULER)).is_empty());

    // SIGTERM: the node leaves, exits 0, and the survivor logs the leave within seconds.
    let gone = worker.me(all);
    worker.signal("TERM");
    let status = worker
        .wait_exit(Duration::from_secs(5))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    let left = wait_until(Duration::from_secs(5), || {
        sched
            .last(all)
            .is_some_and(|l| l.size == 1 && !l.members.iter().any(|m| m.uuid == gone))
    });
    assert!(
        left,
        "the survivor did not log the leave:\n{}",
        sched.text()
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
    let private = common::default_private_port();
    let _held = std::net::TcpListener::bind(("127.0.0.29", private)).unwrap();
    let out = Command::new(BIN)
        .args([
            "--private_ip_selector",
            "127.0.0.29/32",
            "--static_members",
            "127.0.0.25",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("port {private} on 127.0.0.29 is already in use")),
        "{err}"
    );
    assert!(err.contains("--private_port"), "{err}");
}

#[test]
fn an_invalid_zone_is_refused_before_anything_binds() {
    let out = Command::new(BIN)
        .args([
            "--private_ip_selector",
            "127.0.0.28/32",
            "--static_members",
            "127.0.0.25",
        ])
        .args(["--zone", "bad zone"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--zone") && err.contains("invalid zone"),
        "{err}"
    );
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
    let v = common::json_output(
        Command::new(BIN)
            .args([
                "discover",
                "--json",
                "--private_ip_selector",
                "127.0.0.27/32",
            ])
            .args(["--static_members", "127.0.0.27,127.0.0.28:9000"]),
    );
    assert_eq!(v["candidates"][0]["ip"], "127.0.0.28");
    assert_eq!(v["candidates"][0]["port"], 9000);
    assert_eq!(v["excluded"][0]["id"], "127.0.0.27");
    assert_eq!(v["excluded"][0]["reason"], "self");
}
