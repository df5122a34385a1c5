//! IPv6 end to end: real `node` binaries in network namespaces (the `testbed` crate) on the
//! bed's `/64` of `2001:2::/48`, forming clusters with static discovery (`[v6]:port`) and with
//! multicast over the IPv6 link-local group, logging Hazelcast lines with bracketed addresses,
//! detecting a kill -9 and serving the HTTP API on the private IPv6 address. Needs root.
//!
//! The tests run one at a time (a shared lock), so that two cores are enough for their nodes.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use testbed::{LoggedList, Logs, ProcId, Testbed};

const BIN: &str = env!("CARGO_BIN_EXE_node");
/// The default `--private_port`: the HTTP API.
const PRIVATE: u16 = 8081;
/// The scheduler cluster's port (`--private_port` + 1000).
const SCHED: u16 = 9081;
/// The all-instances cluster's port (`--private_port` + 2000).
const ALL: u16 = 10081;
/// Forming and removing take seconds; these deadlines leave room for a loaded CI.
const FORM: Duration = Duration::from_secs(60);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A bed with `hosts` hosts; fails with the reason when this machine cannot run it.
fn bed(hosts: usize) -> Testbed {
    if let Err(e) = testbed::check_prerequisites() {
        panic!("the IPv6 network-namespace tests cannot run here: {e}");
    }
    Testbed::new(hosts).unwrap_or_else(|e| panic!("cannot build the test bed: {e}"))
}

fn check<T>(r: Result<T, testbed::TestbedError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// Starts a node on host `host`, selecting its IPv6 address by the bed's `/64`.
fn start(bed: &mut Testbed, host: usize, role: &str, discovery: &[&str]) -> ProcId {
    let cidr6 = bed.cidr6();
    let mut cmd = Command::new(BIN);
    cmd.args(["--role", role])
        .args(discovery)
        .args(["--private_ip_selector", &cidr6])
        .args(["--discovery_refresh", "1s"])
        .arg("--public_bind_to_any=false")
        .env("RUST_LOG", "info");
    let name = format!("{role}-{host}");
    bed.spawn(host, &name, cmd)
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
}

/// Whether every node's last list on `port` has `size` members and all are identical.
fn agree(logs: &Logs<'_>, nodes: &[ProcId], port: u16, size: usize) -> bool {
    let lists: Vec<_> = nodes.iter().map(|&n| logs.last(n, port)).collect();
    lists
        .iter()
        .all(|l| l.as_ref().is_some_and(|l| l.size == size))
        && lists
            .windows(2)
            .all(|w| w[0].as_ref().map(|l| l.shape()) == w[1].as_ref().map(|l| l.shape()))
}

fn v6(bed: &Testbed, host: usize) -> IpAddr {
    IpAddr::V6(bed.host(host).ip6)
}

/// The member addresses of a list, as a set.
fn addrs(l: &LoggedList) -> BTreeSet<SocketAddr> {
    l.members.iter().map(|m| m.addr).collect()
}

/// The set of `hosts`' IPv6 addresses with `port`.
fn want(bed: &Testbed, hosts: &[usize], port: u16) -> BTreeSet<SocketAddr> {
    hosts
        .iter()
        .map(|&h| SocketAddr::new(v6(bed, h), port))
        .collect()
}

/// Checks the raw log of `node` (on `host`) for Hazelcast's member line of itself, with the
/// IPv6 address in brackets, and for no unbracketed IPv6 `ip:port` anywhere in a member line.
fn assert_member_lines(bed: &Testbed, node: ProcId, host: usize, port: u16) {
    let list = bed.logs().last(node, port).expect("a logged list");
    let me = list
        .members
        .iter()
        .find(|m| m.this)
        .expect("a `this` member");
    let ip6 = bed.host(host).ip6;
    let line = format!("\tMember [{ip6}]:{port} - {} this", me.uuid);
    let text = bed.log(node);
    assert!(text.contains(&line), "{line:?} missing from:\n{text}");
    for l in text
        .lines()
        .filter(|l| l.trim_start().starts_with("Member "))
    {
        assert!(l.trim_start().starts_with("Member [2001:2:"), "{l}");
    }
}

/// `GET /v1/members` over TCP to `[ip6]:8081`, from the root namespace through the bridge.
fn members_json(ip6: Ipv6Addr) -> Result<serde_json::Value, String> {
    let addr = SocketAddr::new(IpAddr::V6(ip6), PRIVATE);
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /v1/members HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let body = node::members::parse_response(&raw)?;
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

/// The `address` fields of one cluster in a `/v1/members` answer.
fn json_addrs(v: &serde_json::Value, cluster: &str) -> BTreeSet<SocketAddr> {
    let c = v["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .find(|c| c["cluster"] == cluster)
        .unwrap_or_else(|| panic!("no {cluster} cluster in {v}"));
    c["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            let a = m["address"].as_str().expect("address");
            a.parse()
                .unwrap_or_else(|e| panic!("address {a:?} is no ip:port ({e})"))
        })
        .collect()
}

#[test]
fn three_nodes_on_ipv6_form_with_bracketed_static_members_and_detect_a_kill() {
    let _serial = serial();
    let mut bed = bed(3);
    let members: Vec<String> = (0..3)
        .map(|h| format!("[{}]:{PRIVATE}", bed.host(h).ip6))
        .collect();
    let members = members.join(",");
    let disc = ["--discovery", "static", "--static_members", &members];
    let nodes = [
        start(&mut bed, 0, "scheduler", &disc),
        start(&mut bed, 1, "scheduler", &disc),
        start(&mut bed, 2, "worker", &disc),
    ];
    check(bed.wait_for(
        FORM,
        "all three to log one list of 3 and both schedulers a scheduler list of 2",
        |l| agree(l, &nodes, ALL, 3) && agree(l, &nodes[..2], SCHED, 2),
    ));
    let logs = bed.logs();
    let all = logs.last(nodes[0], ALL).unwrap();
    assert_eq!(addrs(&all), want(&bed, &[0, 1, 2], ALL));
    let sched = logs.last(nodes[0], SCHED).unwrap();
    assert_eq!(addrs(&sched), want(&bed, &[0, 1], SCHED));
    // Each node chose its global address (never the link-local one on the same interface).
    for (h, &n) in nodes.iter().enumerate() {
        let chosen = format!("ip={}", bed.host(h).ip6);
        assert!(
            logs.contains(n, &chosen) && logs.contains(n, "private ip chosen"),
            "{} did not log {chosen}\n{}",
            bed.name(n),
            bed.log(n)
        );
    }
    // The scheduler prints both groups in Hazelcast's layout; the worker only the all list.
    for (h, &n) in nodes.iter().enumerate() {
        assert_member_lines(&bed, n, h, ALL);
    }
    assert_member_lines(&bed, nodes[0], 0, SCHED);
    assert!(logs.lists(nodes[2]).iter().all(|l| l.port() == Some(ALL)));

    // The HTTP API answers on the private IPv6 address, with bracketed addresses.
    let v = members_json(bed.host(0).ip6).unwrap_or_else(|e| panic!("GET /v1/members: {e}"));
    assert_eq!(json_addrs(&v, "all"), want(&bed, &[0, 1, 2], ALL), "{v}");
    assert_eq!(
        json_addrs(&v, "scheduler"),
        want(&bed, &[0, 1], SCHED),
        "{v}"
    );
    // And `node members` finds it from the same selector, inside the host.
    let cidr6 = bed.cidr6();
    let out = check(bed.exec(
        2,
        &[
            BIN,
            "members",
            "--private_ip_selector",
            &cidr6,
            "--cluster",
            "all",
        ],
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "node members failed: {out:?}");
    for h in 0..3 {
        let a = format!("[{}]:{ALL}", bed.host(h).ip6);
        assert!(text.contains(&a), "{a} missing from:\n{text}");
    }

    // kill -9 of a scheduler: both clusters drop it.
    bed.kill9(nodes[1]);
    let survivors = [nodes[0], nodes[2]];
    let took = check(bed.wait_for(
        FORM,
        "the survivors to log a list of 2 and the scheduler a scheduler list of 1",
        |l| agree(l, &survivors, ALL, 2) && agree(l, &nodes[..1], SCHED, 1),
    ));
    eprintln!("the killed scheduler was dropped after {took:?}");
    let l = bed.logs().last(nodes[2], ALL).unwrap();
    assert_eq!(addrs(&l), want(&bed, &[0, 2], ALL));
    let v = members_json(bed.host(2).ip6).unwrap_or_else(|e| panic!("GET /v1/members: {e}"));
    assert_eq!(json_addrs(&v, "all"), want(&bed, &[0, 2], ALL), "{v}");
}

#[test]
fn three_nodes_on_ipv6_find_each_other_over_the_link_local_group() {
    let _serial = serial();
    let mut bed = bed(3);
    let disc = ["--discovery", "multicast"];
    let nodes = [
        start(&mut bed, 0, "scheduler", &disc),
        start(&mut bed, 1, "worker", &disc),
        start(&mut bed, 2, "worker", &disc),
    ];
    check(
        bed.wait_for(FORM, "all three to log one identical list of 3", |l| {
            agree(l, &nodes, ALL, 3)
        }),
    );
    let logs = bed.logs();
    assert_eq!(
        addrs(&logs.last(nodes[1], ALL).unwrap()),
        want(&bed, &[0, 1, 2], ALL)
    );
    let sched = logs
        .last(nodes[0], SCHED)
        .expect("the scheduler's own list");
    assert_eq!(addrs(&sched), want(&bed, &[0], SCHED));
    for (h, &n) in nodes.iter().enumerate() {
        assert_member_lines(&bed, n, h, ALL);
        // The IPv6 group, scoped to the interface.
        assert!(
            logs.contains(n, "group=[ff02::224:2:2:3%"),
            "{} did not announce on the IPv6 group\n{}",
            bed.name(n),
            bed.log(n)
        );
    }
    assert_member_lines(&bed, nodes[0], 0, SCHED);

    // `node discover` on host 0 hears the two others' IPv6 announcements.
    let cidr6 = bed.cidr6();
    let out = check(bed.exec(
        0,
        &[
            BIN,
            "discover",
            "--discovery",
            "multicast",
            "--private_ip_selector",
            &cidr6,
        ],
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "node discover failed: {out:?}");
    assert!(text.starts_with("candidates (2):"), "{text}");
    for h in 1..3 {
        let a = format!("[{}]:{PRIVATE}", bed.host(h).ip6);
        assert!(text.contains(&a), "{a} missing from:\n{text}");
    }

    bed.kill9(nodes[2]);
    let took = check(
        bed.wait_for(FORM, "the survivors to log one identical list of 2", |l| {
            agree(l, &nodes[..2], ALL, 2)
        }),
    );
    eprintln!("the killed worker was dropped after {took:?}");
    assert_eq!(
        addrs(&bed.logs().last(nodes[0], ALL).unwrap()),
        want(&bed, &[0, 1], ALL)
    );
}

#[test]
fn a_selector_that_covers_only_link_local_addresses_is_refused_with_their_names() {
    let _serial = serial();
    let bed = bed(1);
    // The kernel gives eth0 a link-local address once the link is up.
    let link_local = check(
        bed.wait_for(Duration::from_secs(10), "a link-local address", |_| {
            bed.exec(
                0,
                &[
                    "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link",
                ],
            )
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("fe80::"))
        }),
    );
    eprintln!("eth0 had its link-local address after {link_local:?}");
    let out = check(bed.exec(
        0,
        &[
            BIN,
            "discover",
            "--private_ip_selector",
            "fe80::/10",
            "--static_members",
            "[2001:2::9]:8081",
        ],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a link-local address was chosen:\n{err}"
    );
    assert!(
        err.contains("matches only IPv6 link-local addresses")
            && err.contains(" on eth0")
            && err.contains("global or ULA"),
        "{err}"
    );
    // A selector as wide as the global unicast range still picks the bed's address.
    let out = check(bed.exec(
        0,
        &[
            BIN,
            "discover",
            "--private_ip_selector",
            "2000::/3",
            "--static_members",
            "[2001:2::9]:8081",
        ],
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("[2001:2::9]:8081"), "{text}");
}
