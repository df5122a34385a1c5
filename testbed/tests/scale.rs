//! The test bed at the benchmark's scale: a bed larger than the kernel's shared neighbor table
//! allows without permanent entries builds, reaches across, and leaves nothing behind.

use std::process::Command;

use testbed::Testbed;

fn exec(bed: &Testbed, host: usize, args: &[&str]) -> String {
    let out = bed
        .exec(host, args)
        .expect("the command runs; install iproute2 and iputils-ping (cargo xtask test does)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pings(bed: &Testbed, from: usize, to: &str) -> bool {
    exec(bed, from, &["ping", "-c", "1", "-W", "2", to]).contains(" 1 received")
}

/// Namespaces and links whose name starts with `prefix`.
fn traces(prefix: &str) -> usize {
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let ns = String::from_utf8_lossy(&ns.stdout)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .count();
    let links = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter(|l| l.split(": ").nth(1).is_some_and(|n| n.starts_with(prefix)))
        .count();
    ns + links
}

#[test]
fn static_neighbors_cover_every_other_host_and_the_bridge() {
    testbed::check_prerequisites().unwrap();
    let bed = Testbed::new(3).unwrap();
    bed.static_neighbors().unwrap();
    let table = exec(
        &bed,
        0,
        &["ip", "neigh", "show", "dev", "eth0", "nud", "permanent"],
    );
    for addr in [
        bed.host(1).ip.to_string(),
        bed.host(2).ip.to_string(),
        bed.host(2).ip6.to_string(),
        bed.bridge_ip().to_string(),
    ] {
        assert!(
            table
                .lines()
                .any(|l| l.split_whitespace().next() == Some(addr.as_str())),
            "no permanent entry for {addr}:\n{table}"
        );
    }
    let own = bed.host(0).ip.to_string();
    assert!(
        !table
            .lines()
            .any(|l| l.split_whitespace().next() == Some(own.as_str())),
        "a host has no entry for itself:\n{table}"
    );
    // The entries are the right ones: traffic flows both ways.
    assert!(pings(&bed, 0, &bed.host(2).ip.to_string()));
    assert!(pings(&bed, 2, &bed.host(0).ip.to_string()));
}

#[test]
fn a_bed_of_80_hosts_reaches_across_and_is_gone_after_drop() {
    testbed::check_prerequisites().unwrap();
    let bed = Testbed::new(80).unwrap();
    let prefix = bed.prefix().to_owned();
    bed.static_neighbors().unwrap();
    // 80 hosts fully meshed would need 6,400 dynamic entries, over the default 1,024.
    let table = exec(
        &bed,
        40,
        &["ip", "neigh", "show", "dev", "eth0", "nud", "permanent"],
    );
    assert_eq!(table.lines().count(), 2 * 79 + 2, "{table}");
    assert!(pings(&bed, 0, &bed.host(79).ip.to_string()));
    assert!(pings(&bed, 79, &bed.host(0).ip.to_string()));
    // A process inside a host that the bed did not start is removed too.
    let mut sleeper = Command::new("ip")
        .args(["netns", "exec", &bed.host(5).netns, "sleep", "600"])
        .spawn()
        .unwrap();
    let entered = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{}/comm", sleeper.id()))
        .is_ok_and(|c| c.trim() != "sleep")
        && std::time::Instant::now() < entered
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(bed);
    assert!(
        sleeper.try_wait().unwrap().is_some() || {
            std::thread::sleep(std::time::Duration::from_millis(500));
            sleeper.try_wait().unwrap().is_some()
        },
        "a stray process survived the bed"
    );
    assert_eq!(traces(&prefix), 0, "namespaces or links of {prefix} remain");
}
