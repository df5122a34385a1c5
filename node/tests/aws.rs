//! End to end on EC2 discovery: `node` processes in network namespaces whose addresses are the
//! private IPs of instances seeded in LocalStack form both clusters with `--discovery=aws`,
//! and a stopped instance's node is never a candidate.
//!
//! LocalStack stays on loopback (started by `cargo xtask test`, URL in `LOCALSTACK_ENDPOINT`);
//! the test relays the bridge's own address to it, so the hosts reach it through the bridge.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
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

/// Forwards TCP connections from the bridge address to LocalStack until dropped.
struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(bind: Ipv4Addr, upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind((bind, 0)).expect("bind the relay on the bridge");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((down, _)) => {
                        let _ = down.set_nonblocking(false);
                        if let Ok(up) =
                            TcpStream::connect_timeout(&upstream, Duration::from_secs(3))
                        {
                            pipe(down, up);
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Relay { addr, stop }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies both directions until either side closes; reads time out so threads never hang.
fn pipe(a: TcpStream, b: TcpStream) {
    for (mut from, mut to) in [
        (a.try_clone().expect("clone"), b.try_clone().expect("clone")),
        (b, a),
    ] {
        let _ = from.set_read_timeout(Some(Duration::from_secs(120)));
        thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Both);
        });
    }
}

/// The /16 that holds the bed's subnet, as the VPC CIDR.
fn vpc_cidr(bed: &Testbed) -> String {
    let o = bed.bridge_ip().octets();
    format!("{}.{}.0.0/16", o[0], o[1])
}

async fn seed(bed: &Testbed, tag: &str, ep: SocketAddr) -> Vec<String> {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(REGION))
        .endpoint_url(format!("http://{ep}"))
        .load()
        .await;
    let ec2 = Client::new(&conf);
    let vpc = ec2
        .create_vpc()
        .cidr_block(vpc_cidr(bed))
        .send()
        .await
        .expect("create vpc");
    let subnet = ec2
        .create_subnet()
        .vpc_id(vpc.vpc().and_then(|v| v.vpc_id()).expect("vpc id"))
        .cidr_block(bed.cidr())
        .send()
        .await
        .expect("create subnet");
    let subnet = subnet.subnet().and_then(|s| s.subnet_id()).expect("subnet");
    let mut ids = Vec::new();
    for h in bed.hosts() {
        let out = ec2
            .run_instances()
            .image_id("ami-df5de72bdb3b")
            .min_count(1)
            .max_count(1)
            .subnet_id(subnet)
            .private_ip_address(h.ip.to_string())
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(Tag::builder().key("cluster").value(tag).build())
                    .build(),
            )
            .send()
            .await
            .expect("run instance");
        ids.push(out.instances()[0].instance_id().expect("id").to_owned());
    }
    // The last host's instance is stopped.
    let last = ids.last().expect("ids").clone();
    ec2.stop_instances()
        .instance_ids(&last)
        .send()
        .await
        .expect("stop");
    for _ in 0..100 {
        let out = ec2
            .describe_instances()
            .instance_ids(&last)
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("stopped")
                    .build(),
            )
            .send()
            .await
            .expect("describe");
        if !out.reservations().is_empty() {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the instance {last} did not stop within 10 s");
}

fn aws_node(role: &str, tag: &str, endpoint: &str, cidr: &str) -> Command {
    let mut c = Command::new(BIN);
    c.args(["--role", role, "--discovery", "aws"])
        .args(["--aws_tags", &format!("cluster={tag}")])
        .args(["--aws_endpoint", endpoint, "--aws_region", REGION])
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
    let relay = Relay::start(bed.bridge_ip(), ls);
    let endpoint = format!("http://{}", relay.addr);
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
