//! End to end on EC2 discovery: `node` processes in network namespaces whose addresses are the
//! private IPs of instances seeded in LocalStack form both clusters with `--discovery=aws`,
//! and a stopped instance's node is never a candidate.
//!
//! A second test measures how fast three nodes among 1,106 tagged instances converge: EC2's
//! pages are published as they arrive, so a node joins its first peers after one page.
//!
//! LocalStack stays on loopback (started by `cargo xtask test`, URL in `LOCALSTACK_ENDPOINT`);
//! the `aws-fake` proxy listens on the bridge's own address in front of it, so the hosts reach
//! it through the bridge.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_fake::FaultProxy;
use aws_fake::seed::Seed;
use testbed::{ProcId, Testbed};

const BIN: &str = env!("CARGO_BIN_EXE_node");
const REGION: &str = "us-east-1";

fn localstack() -> SocketAddr {
    let ep = std::env::var("LOCALSTACK_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "LOCALSTACK_ENDPOINT is not set: this test runs against LocalStack; run `cargo xtask test`, or `cargo xtask localstack` in another shell and export the variables it prints"
        )
    });
    ep.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("LOCALSTACK_ENDPOINT must be http://ip:port")
}

/// LocalStack behind an `aws-fake` proxy on the bridge's address, which the hosts reach.
fn relay(bed: &Testbed, ls: SocketAddr) -> FaultProxy {
    FaultProxy::start_on(bed.bridge_ip().into(), &format!("http://{ls}"))
        .expect("start the proxy on the bridge")
}

/// The /16 that holds the bed's subnet, as the VPC CIDR.
fn vpc_cidr(bed: &Testbed) -> String {
    let o = bed.bridge_ip().octets();
    format!("{}.{}.0.0/16", o[0], o[1])
}

/// Seeds one instance per host at its address, tagged `cluster=tag`, and stops the last one.
async fn seed(bed: &Testbed, tag: &str, ep: SocketAddr) -> Vec<String> {
    let seed = Seed::new(&format!("http://{ep}"), REGION, &vpc_cidr(bed)).await;
    let subnet = seed.subnet(&bed.cidr()).await;
    let mut ids = Vec::new();
    for h in bed.hosts() {
        ids.push(
            seed.instance(&subnet, &h.ip.to_string(), &[("cluster", tag)])
                .await,
        );
    }
    seed.stop(&ids[ids.len() - 1..]).await;
    ids
}

fn aws_node(role: &str, tag: &str, endpoint: &str, cidr: &str) -> Command {
    aws_node_in(REGION, role, tag, endpoint, cidr)
}

fn aws_node_in(region: &str, role: &str, tag: &str, endpoint: &str, cidr: &str) -> Command {
    let mut c = Command::new(BIN);
    c.args(["--role", role, "--discovery", "aws"])
        .args(["--aws_tags", &format!("cluster={tag}")])
        .args(["--aws_endpoint", endpoint, "--aws_region", region])
        .args(["--private_ip_selector", cidr, "--discovery_refresh", "1s"])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "info");
    c
}

#[test]
fn nodes_on_tagged_instances_form_both_clusters_and_a_stopped_instance_is_never_a_candidate() {
    testbed::check_prerequisites().expect("the test bed needs root and iproute2");
    let ls = localstack();
    let mut bed = Testbed::new(4).expect("test bed");
    let relay = relay(&bed, ls);
    let endpoint = relay.url();
    let cidr = bed.cidr();
    let tag = format!("e2e-{}", std::process::id());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ids = rt.block_on(seed(&bed, &tag, ls));
    let host_ips: Vec<String> = bed.hosts().iter().map(|h| h.ip.to_string()).collect();
    let ip = |i: usize| host_ips[i].clone();

    // `node discover` on host 0: hosts 1 and 2 are candidates, host 3's instance is stopped.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &bed.host(0).netns.clone(),
            BIN,
            "discover",
            "--json",
        ])
        .args(aws_node("worker", &tag, &endpoint, &cidr).get_args())
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null())
        .output()
        .expect("node discover");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&text).expect("json");
    let mut cands: Vec<String> = report["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .map(|c| c["ip"].as_str().expect("ip").to_owned())
        .collect();
    cands.sort();
    let mut want = vec![ip(1), ip(2)];
    want.sort();
    assert_eq!(cands, want, "{text}");
    let excluded = report["excluded"].as_array().expect("excluded");
    assert!(
        excluded.iter().any(|x| x["id"] == ids[3].as_str()
            && x["reason"].as_str().is_some_and(|r| r.contains("stopped"))),
        "{text}"
    );
    assert!(
        excluded
            .iter()
            .any(|x| x["id"] == ids[0].as_str() && x["reason"] == "self"),
        "{text}"
    );

    // Two schedulers and a worker on the running instances. Host 3 runs a node too, but its
    // instance is stopped, so nobody joins it, and it looks for no one itself.
    let s0 = bed
        .spawn(
            0,
            "scheduler-0",
            aws_node("scheduler", &tag, &endpoint, &cidr),
        )
        .expect("spawn");
    let s1 = bed
        .spawn(
            1,
            "scheduler-1",
            aws_node("scheduler", &tag, &endpoint, &cidr),
        )
        .expect("spawn");
    let w2 = bed
        .spawn(2, "worker-2", aws_node("worker", &tag, &endpoint, &cidr))
        .expect("spawn");
    let mut lonely = Command::new(BIN);
    lonely
        .args(["--role", "worker", "--discovery", "static"])
        .args(["--private_ip_selector", &cidr, "--static_members", &ip(3)]);
    let w3 = bed.spawn(3, "worker-3-stopped", lonely).expect("spawn");

    let running: [ProcId; 3] = [s0, s1, w2];
    let all_formed = |logs: &testbed::Logs<'_>| {
        running
            .iter()
            .all(|&p| logs.last(p, 10081).is_some_and(|l| l.size == 3))
            && [s0, s1]
                .iter()
                .all(|&p| logs.last(p, 9081).is_some_and(|l| l.size == 2))
    };
    let took = bed
        .wait_for(Duration::from_secs(60), "both clusters formed", all_formed)
        .expect("both clusters form");
    eprintln!("both clusters formed in {took:?}");

    let stopped_ip = bed.host(3).ip;
    bed.hold(
        Duration::from_secs(4),
        "the stopped instance's node stays out",
        |logs| {
            all_formed(logs)
                && running.iter().all(|&p| {
                    logs.last(p, 10081)
                        .is_some_and(|l| l.members.iter().all(|m| m.addr.ip() != stopped_ip))
                })
                && logs.last(w3, 10081).is_none_or(|l| l.size == 1)
        },
    )
    .expect("the stopped instance's node is never joined");
    drop(bed);
    drop(relay);
}

/// Three workers whose instances are on the first page of 1,106 tagged instances; the other
/// 1,103 are in a subnet outside `--private_ip_selector`, so they are counted in every page
/// but excluded, as instances of the fleet that run no node. LocalStack pages count
/// reservations, so each filler is a reservation of its own; the region is this test's alone.
#[test]
fn three_nodes_among_1106_tagged_instances_converge() {
    testbed::check_prerequisites().expect("the test bed needs root and iproute2");
    const FILLERS: usize = 1103;
    let region = "sa-east-1";
    let ls = localstack();
    let mut bed = Testbed::new(3).expect("test bed");
    let relay = relay(&bed, ls);
    let endpoint = relay.url();
    let cidr = bed.cidr();
    let tag = format!("pages-{}", std::process::id());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    rt.block_on(async {
        let seed = Seed::new(&format!("http://{ls}"), region, &vpc_cidr(&bed)).await;
        let nodes = seed.subnet(&bed.cidr()).await;
        // A /20 of the /16 away from the bed's /22.
        let o = bed.bridge_ip().octets();
        let third = if o[2] < 128 { 128 } else { 0 };
        let fillers = seed
            .subnet(&format!("{}.{}.{third}.0/20", o[0], o[1]))
            .await;
        for h in bed.hosts() {
            let pairs = [("cluster", tag.as_str()), ("role", "worker")];
            seed.instance(&nodes, &h.ip.to_string(), &pairs).await;
        }
        let sem = Arc::new(tokio::sync::Semaphore::new(16));
        let mut tasks = Vec::new();
        for _ in 0..FILLERS {
            let (seed, fillers, tag, sem) =
                (seed.clone(), fillers.clone(), tag.clone(), sem.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire().await.expect("semaphore");
                seed.many(&fillers, 1, &[("cluster", &tag)]).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("seed task").len(), 1);
        }
    });
    eprintln!(
        "seeded {} tagged instances in {:?}",
        FILLERS + 3,
        started.elapsed()
    );

    let spawned = Instant::now();
    let procs: Vec<ProcId> = (0..3)
        .map(|i| {
            let c = aws_node_in(region, "worker", &tag, &endpoint, &cidr);
            bed.spawn(i, &format!("worker-{i}"), c).expect("spawn")
        })
        .collect();
    let took = bed
        .wait_for(Duration::from_secs(240), "three nodes converged", |logs| {
            procs
                .iter()
                .all(|&p| logs.last(p, 10081).is_some_and(|l| l.size == 3))
        })
        .expect("the three nodes converge");
    // When each DescribeInstances call arrived: a second-page call is the end of a first page.
    let calls: Vec<String> = relay
        .seen()
        .iter()
        .map(|s| {
            let page = if s.body.contains("NextToken=") { 2 } else { 1 };
            format!(
                "p{page}@{:.1}s",
                s.at.saturating_duration_since(spawned).as_secs_f64()
            )
        })
        .collect();
    eprintln!(
        "three nodes among {} tagged instances converged in {took:?}; DescribeInstances calls: {}",
        FILLERS + 3,
        calls.join(" ")
    );
    drop(bed);
    drop(relay);
}
