//! End to end with `--discovery=gcp`: `node` processes in network-namespace hosts, each
//! registered in the GCE fake with its own address, find each other through the fake's
//! Compute API and metadata server and form both clusters; a later instance is found by the
//! refresh; `node discover` explains its exclusions; and off GCE the error names the flags.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use gce_fake::{GceFake, InstanceSpec, VmIdentity};
use testbed::{ProcId, Testbed};

const BIN: &str = env!("CARGO_BIN_EXE_node");
const PROJECT: &str = "e2e-project";
const ZONES: [&str; 2] = ["us-central1-a", "us-central1-b"];
/// `--private_port` 8081: the all-instances cluster on +2000, the schedulers' on +1000.
const ALL: u16 = 10081;
const SCHED: u16 = 9081;

fn offset(base: Ipv4Addr, n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(base) + n))
}

fn node_cmd(bed: &Testbed, fake: &GceFake, role: &str) -> Command {
    let mut c = Command::new(BIN);
    c.args(["--role", role, "--discovery", "gcp"])
        .args(["--gcp_labels", "cluster=e2e"])
        .args(["--gcp_zones", &ZONES.join(",")])
        .args(["--gcp_endpoint", &fake.endpoint()])
        .args(["--private_ip_selector", &bed.cidr()])
        .args(["--discovery_refresh", "1s"])
        .env("GCE_METADATA_HOST", fake.metadata_host())
        .env("RUST_LOG", "info");
    c
}

/// Every node lists `n` members in the all-instances cluster, and every scheduler 2 in theirs.
fn formed(n: usize, procs: Vec<(ProcId, &'static str)>) -> impl FnMut(&testbed::Logs<'_>) -> bool {
    move |logs| {
        procs.iter().all(|(id, role)| {
            logs.last(*id, ALL).is_some_and(|l| l.size == n)
                && (*role != "scheduler" || logs.last(*id, SCHED).is_some_and(|l| l.size == 2))
        })
    }
}

#[test]
fn nodes_in_netns_hosts_find_each_other_through_the_gce_fake_and_form_both_clusters() {
    testbed::check_prerequisites().expect("this test needs root and iproute2");
    let mut bed = Testbed::new(5).unwrap();
    let fake = GceFake::start(SocketAddr::new(IpAddr::V4(bed.bridge_ip()), 0)).unwrap();
    fake.set_vm(VmIdentity {
        project_id: PROJECT.into(),
        zone: ZONES[0].into(),
        ..VmIdentity::default()
    });
    let roles = ["scheduler", "worker", "worker", "scheduler", "worker"];
    for (i, role) in roles.iter().enumerate() {
        fake.add_instance(
            PROJECT,
            ZONES[i % 2],
            InstanceSpec::running(format!("node-{i}"))
                .label("cluster", "e2e")
                .label("role", *role)
                .nic(IpAddr::V4(bed.host(i).ip)),
        );
    }
    // Instances that must not be joined: stopped, or in another cluster.
    let stopped = offset(bed.bridge_ip(), 200);
    let other = offset(bed.bridge_ip(), 201);
    fake.add_instance(
        PROJECT,
        ZONES[0],
        InstanceSpec::running("stopped")
            .label("cluster", "e2e")
            .status("TERMINATED")
            .nic(stopped),
    );
    fake.add_instance(
        PROJECT,
        ZONES[1],
        InstanceSpec::running("other")
            .label("cluster", "other")
            .nic(other),
    );

    let mut procs: Vec<(ProcId, &'static str)> = Vec::new();
    for (i, role) in roles.iter().enumerate() {
        let cmd = node_cmd(&bed, &fake, role);
        procs.push((bed.spawn(i, &format!("{role}-{i}"), cmd).unwrap(), role));
    }
    bed.wait_for(
        Duration::from_secs(60),
        "5 members in the all-instances cluster and 2 in the scheduler cluster",
        formed(5, procs.clone()),
    )
    .unwrap();
    {
        let logs = bed.logs();
        for (id, _) in &procs {
            let l = logs.last(*id, ALL).unwrap();
            for m in &l.members {
                assert_ne!(m.addr.ip(), stopped, "a stopped instance was joined");
                assert_ne!(m.addr.ip(), other, "another cluster's instance was joined");
            }
        }
    }
    // The lists can form before a node's own first listing ends (peers join it), so wait.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while fake.tokens_issued() < 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        fake.tokens_issued() >= 5,
        "every node took its token from the metadata server"
    );

    // A zone that starts failing keeps its instances as candidates; a new instance in the
    // other zone is found by the refresh loop and joins everyone's lists.
    fake.fail_zone(ZONES[1], Some(503));
    let h = bed.add_host().unwrap();
    fake.add_instance(
        PROJECT,
        ZONES[0],
        InstanceSpec::running("node-late")
            .label("cluster", "e2e")
            .nic(IpAddr::V4(bed.host(h).ip)),
    );
    let cmd = node_cmd(&bed, &fake, "worker");
    procs.push((bed.spawn(h, "worker-late", cmd).unwrap(), "worker"));
    bed.wait_for(
        Duration::from_secs(60),
        "6 members after a late instance, with one zone failing",
        formed(6, procs.clone()),
    )
    .unwrap();

    // `node discover` inside host 0 names what it skipped, and why.
    fake.fail_zone(ZONES[1], None);
    let md = format!("GCE_METADATA_HOST={}", fake.metadata_host());
    let ep = fake.endpoint();
    let cidr = bed.cidr();
    let out = bed
        .exec(
            0,
            &[
                "env",
                &md,
                BIN,
                "discover",
                "--json",
                "--discovery",
                "gcp",
                "--gcp_labels",
                "cluster=e2e",
                "--gcp_zones",
                &ZONES.join(","),
                "--gcp_endpoint",
                &ep,
                "--private_ip_selector",
                &cidr,
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["candidates"].as_array().unwrap().len(), 5, "{v}");
    let reason = |id: &str| {
        v["excluded"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id)
            .map(|e| e["reason"].as_str().unwrap().to_owned())
    };
    assert_eq!(
        reason(&format!("{}/node-0", ZONES[0])).as_deref(),
        Some("self")
    );
    assert_eq!(
        reason(&format!("{}/stopped", ZONES[0])).as_deref(),
        Some("not running (status TERMINATED)")
    );
    assert_eq!(
        reason(&format!("{}/other", ZONES[1])).as_deref(),
        Some("labels do not match --gcp_labels: cluster=other (want e2e)")
    );
}

#[test]
fn off_gce_without_flags_the_error_names_the_flags_to_set() {
    // Nothing listens on 127.0.0.1:1, so the metadata server is absent.
    let out = Command::new(BIN)
        .args(["discover", "--discovery", "gcp"])
        .args(["--private_ip_selector", "127.0.0.61/32"])
        .args(["--gcp_endpoint", "http://127.0.0.1:1"])
        .env("GCE_METADATA_HOST", "127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--gcp_project"), "{err}");
    assert!(err.contains("GOOGLE_APPLICATION_CREDENTIALS"), "{err}");
}

#[test]
fn invalid_gcp_flags_are_refused_with_the_rule() {
    let out = Command::new(BIN)
        .args(["discover", "--discovery", "gcp"])
        .args(["--private_ip_selector", "127.0.0.62/32"])
        .args(["--gcp_labels", "Cluster=prod"])
        .env("GCE_METADATA_HOST", "127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--gcp_labels"), "{err}");
    assert!(err.contains("lowercase"), "{err}");
}
