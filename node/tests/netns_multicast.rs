//! Multicast discovery across hosts: real `node` binaries in network namespaces on one bridge
//! (the `testbed` crate), finding each other over multicast alone. Needs root, as CI has.
//!
//! The tests run one at a time (a shared lock), so that two cores are enough for their nodes.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use discovery::Role;
use discovery_multicast::Announcement;
use testbed::{Logs, ProcId, Testbed};
use uuid::Uuid;

mod common;
use common::BIN;

/// The all-instances cluster's port with the default `--private_port`.
const ALL: u16 = common::ALL_PORT;
/// The scheduler cluster's port.
const SCHED: u16 = common::SCHEDULER_PORT;
/// Forming, removing and merging take seconds; these deadlines leave room for a loaded CI.
const FORM: Duration = Duration::from_secs(60);

use common::serial;

/// A bed with `hosts` hosts; fails with the reason when this machine cannot run it.
fn bed(hosts: usize) -> Testbed {
    common::bed(hosts, "multicast")
}

/// Starts a node with multicast discovery on host `host`.
fn start(bed: &mut Testbed, host: usize, role: &str, cluster: &str) -> ProcId {
    // The bed's subnet: it picks the host's one address and admits every peer on the bridge.
    let cidr = bed.cidr();
    let mut cmd = Command::new(BIN);
    cmd.args(["--role", role, "--discovery", "multicast"])
        .args(["--private_ip_selector", &cidr])
        .args(["--cluster_name", cluster])
        .arg("--public_bind_to_any=false")
        .env("RUST_LOG", "info");
    let name = format!("{role}-{host}");
    bed.spawn(host, &name, cmd)
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
}

/// Whether every node's last list on `port` has `size` members and all are identical
/// (same members in the same order, same `ver`).
fn agree(logs: &Logs<'_>, nodes: &[ProcId], port: u16, size: usize) -> bool {
    let lists: Vec<_> = nodes.iter().map(|&n| logs.last(n, port)).collect();
    common::lists_agree(&lists, size)
}

fn check(r: Result<Duration, testbed::TestbedError>) -> Duration {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// One scheduler (host 0) and two workers (hosts 1, 2), formed.
fn three(bed: &mut Testbed) -> [ProcId; 3] {
    let nodes = [
        start(bed, 0, "scheduler", "default"),
        start(bed, 1, "worker", "default"),
        start(bed, 2, "worker", "default"),
    ];
    check(
        bed.wait_for(FORM, "all three to log one identical list of 3", |l| {
            agree(l, &nodes, ALL, 3)
        }),
    );
    nodes
}

#[test]
fn one_scheduler_and_two_workers_find_each_other_over_multicast_alone() {
    let _serial = serial();
    let mut bed = bed(3);
    let nodes = three(&mut bed);
    let logs = bed.logs();
    let s = logs
        .last(nodes[0], SCHED)
        .expect("the scheduler logs its own cluster");
    assert_eq!(s.size, 1, "scheduler cluster: {s:?}");
    assert!(s.members[0].this);
    assert_eq!(s.members[0].addr.ip(), bed.host(0).ip);
    // Workers are not in the scheduler cluster and log only the all-instances list.
    for &w in &nodes[1..] {
        assert!(logs.lists(w).iter().all(|l| l.port() == Some(ALL)));
    }
    let all = logs.last(nodes[0], ALL).unwrap();
    let mut ips: Vec<Ipv4Addr> = all
        .members
        .iter()
        .map(|m| match m.addr.ip() {
            std::net::IpAddr::V4(v4) => v4,
            other => panic!("unexpected address {other}"),
        })
        .collect();
    ips.sort();
    let mut want: Vec<Ipv4Addr> = bed.hosts().iter().map(|h| h.ip).collect();
    want.sort();
    assert_eq!(ips, want);
    // Each node marks itself, and only itself, as `this`.
    for (i, &n) in nodes.iter().enumerate() {
        let l = logs.last(n, ALL).unwrap();
        let this: Vec<_> = l.members.iter().filter(|m| m.this).collect();
        assert_eq!(this.len(), 1);
        assert_eq!(this[0].addr.ip(), bed.host(i).ip);
    }
    // `node discover` on host 0 hears the two other nodes (its own host's node does not loop
    // back without --multicast_loopback).
    let cidr = bed.cidr();
    let args = [BIN, "discover", "--discovery", "multicast"];
    let out = bed
        .exec(0, &[&args[..], &["--private_ip_selector", &cidr]].concat())
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "node discover failed: {out:?}");
    assert!(text.starts_with("candidates (2):"), "{text}");
    for h in 1..3 {
        let want = format!("{}:8081", bed.host(h).ip);
        assert!(text.contains(&want), "{want} missing from:\n{text}");
    }
}

#[test]
fn after_a_worker_is_killed_the_survivors_log_two() {
    let _serial = serial();
    let mut bed = bed(3);
    let nodes = three(&mut bed);
    bed.kill9(nodes[2]);
    let took = check(
        bed.wait_for(FORM, "the survivors to log one identical list of 2", |l| {
            agree(l, &nodes[..2], ALL, 2)
        }),
    );
    eprintln!("survivors dropped the killed worker after {took:?}");
    let l = bed.logs().last(nodes[0], ALL).unwrap();
    assert!(l.members.iter().all(|m| m.addr.ip() != bed.host(2).ip));
}

#[test]
fn a_host_cut_off_for_10_s_rejoins_into_one_list() {
    let _serial = serial();
    let mut bed = bed(3);
    let nodes = three(&mut bed);
    let before = bed.logs().last(nodes[0], ALL).unwrap().ver;

    let cut = Instant::now();
    bed.link_down(2).unwrap();
    check(bed.wait_for(
        Duration::from_secs(10),
        "each side of the cut to log its own view within the 10 s cut",
        |l| {
            agree(l, &nodes[..2], ALL, 2)
                && l.last(nodes[2], ALL)
                    .is_some_and(|x| x.size == 1 && x.members[0].this)
        },
    ));
    std::thread::sleep(Duration::from_secs(10).saturating_sub(cut.elapsed()));
    bed.link_up(2).unwrap();
    let took = check(bed.wait_for(
        FORM,
        "one merged, identical list of 3 everywhere after the link returned",
        |l| agree(l, &nodes, ALL, 3),
    ));
    eprintln!("the partition healed {took:?} after the link returned");
    let after = bed.logs().last(nodes[0], ALL).unwrap().ver;
    assert!(after > before, "ver must grow: {before} then {after}");
    assert!(
        took <= Duration::from_secs(5),
        "the merge took {took:?}, more than the 5 s the issue asks for\n{}",
        bed.summary()
    );
}

#[test]
fn clusters_with_different_names_on_one_group_never_merge() {
    let _serial = serial();
    let mut bed = bed(4);
    let blue = [
        start(&mut bed, 0, "scheduler", "blue"),
        start(&mut bed, 1, "worker", "blue"),
    ];
    let red = [
        start(&mut bed, 2, "scheduler", "red"),
        start(&mut bed, 3, "worker", "red"),
    ];
    check(
        bed.wait_for(FORM, "blue and red to form lists of 2 each", |l| {
            agree(l, &blue, ALL, 2) && agree(l, &red, ALL, 2)
        }),
    );
    // Both keep hearing each other's announcements for a while and must not join them.
    let blue_ips = [bed.host(0).ip, bed.host(1).ip];
    let red_ips = [bed.host(2).ip, bed.host(3).ip];
    let only = |l: &Logs<'_>, nodes: &[ProcId], ips: &[Ipv4Addr]| {
        nodes.iter().all(|&n| {
            l.lists(n).iter().all(|list| {
                list.members.iter().all(|m| {
                    ips.iter()
                        .any(|ip| m.addr.ip() == std::net::IpAddr::V4(*ip))
                })
            })
        })
    };
    bed.hold(
        Duration::from_secs(8),
        "each cluster to list only its own nodes",
        |l| only(l, &blue, &blue_ips) && only(l, &red, &red_ips),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Datagrams that must all be dropped: junk, oversized, truncated, a spoofed source and
/// another cluster name.
fn garbage(i: usize, valid: &[u8], foreign: &[u8]) -> Vec<u8> {
    match i % 6 {
        0 => (0..(i % 700))
            .map(|j| (i.wrapping_mul(131) ^ j) as u8)
            .collect(),
        1 => vec![0xA5; 3000],
        2 => valid[..i % valid.len()].to_vec(),
        3 => valid.to_vec(),
        4 => foreign.to_vec(),
        _ => {
            let mut v = valid.to_vec();
            let n = v.len();
            v[i % n] ^= 0xff;
            v
        }
    }
}

#[test]
fn garbage_on_the_group_does_not_disturb_a_formed_cluster() {
    let _serial = serial();
    let mut bed = bed(3);
    let nodes = three(&mut bed);
    let formed = bed.logs().last(nodes[0], ALL).unwrap().shape();

    // Sent from the bridge's address in the root namespace onto the bridge, TTL 1.
    let sock = UdpSocket::bind(SocketAddrV4::new(bed.bridge_ip(), 0)).unwrap();
    let s2 = socket2::SockRef::from(&sock);
    s2.set_multicast_if_v4(&bed.bridge_ip()).unwrap();
    s2.set_multicast_ttl_v4(1).unwrap();
    let group = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(224, 2, 2, 3), 54327));
    // A well-formed announcement claiming host 1's address: its source gives it away.
    let spoof = Announcement {
        cluster_name: "default".into(),
        role: Role::Scheduler,
        node_id: Uuid::new_v4(),
        ip: bed.host(1).ip.into(),
        port: 8081,
        interval_ms: 1000,
    };
    let foreign = Announcement {
        cluster_name: "intruder".into(),
        ip: bed.bridge_ip().into(),
        ..spoof.clone()
    };
    let (valid, foreign) = (spoof.encode().unwrap(), foreign.encode().unwrap());
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(6) && sent < 12_000 {
        for _ in 0..20 {
            if sock
                .send_to(&garbage(sent, &valid, &foreign), group)
                .is_ok()
            {
                sent += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
        // Every node is alive and its list is exactly the formed one.
        for &n in &nodes {
            assert!(
                bed.exit_status(n).is_none(),
                "{} exited during the flood\n{}",
                bed.name(n),
                bed.summary()
            );
        }
    }
    assert!(sent > 1000, "only {sent} datagrams could be sent");
    bed.hold(
        Duration::from_secs(3),
        "the formed list to stay unchanged",
        |l| {
            nodes
                .iter()
                .all(|&n| l.last(n, ALL).is_some_and(|x| x.shape() == formed))
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The garbage did arrive, and was reported as dropped.
    for &n in &nodes {
        assert!(
            bed.logs()
                .contains(n, "dropped a datagram on the multicast group"),
            "{} never reported the garbage\n{}",
            bed.name(n),
            bed.summary()
        );
    }
}
