//! End to end across network namespaces: `node` processes on testbed hosts with
//! `--discovery=k8s`, against the Kubernetes API fake bound to the bridge address, whose pods
//! carry the hosts' addresses. They form both clusters; a pod deleted in the fake leaves
//! (SIGTERM, as the kubelet does) or dies (SIGKILL) and is dropped by the others.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_fake::{FakeApi, running_pod};
use testbed::{ProcId, Testbed};

mod common;
use common::{ALL_PORT, BIN, SCHEDULER_PORT};

const NS: &str = "builds";
const TOKEN: &str = "netns-token";

fn node(fake: &FakeApi, sa_dir: &Path, role: &str, ip: &str) -> Command {
    let mut c = Command::new(BIN);
    c.args(["--role", role, "--discovery", "k8s"])
        .args(["--private_ip_selector", &format!("{ip}/32")])
        .args(["--k8s_label_selector", "app=cluster-start"])
        .args(["--discovery_refresh", "60s"])
        .env("KUBERNETES_SERVICE_HOST", fake.addr().ip().to_string())
        .env("KUBERNETES_SERVICE_PORT", fake.addr().port().to_string())
        .env("NODE_K8S_SERVICE_ACCOUNT_DIR", sa_dir)
        .env_remove("KUBECONFIG")
        .env("RUST_LOG", "info");
    c
}

fn me(bed: &Testbed, id: ProcId) -> uuid::Uuid {
    bed.logs()
        .last(id, ALL_PORT)
        .and_then(|l| l.members.into_iter().find(|m| m.this))
        .expect("a logged list")
        .uuid
}

#[test]
fn pods_on_namespace_hosts_form_both_clusters_and_deleted_pods_are_dropped() {
    testbed::check_prerequisites().expect("the netns test bed needs root and iproute2");
    let mut bed = Testbed::new(5).unwrap();
    let fake = FakeApi::start(IpAddr::V4(bed.bridge_ip())).unwrap();
    fake.grant(TOKEN, &[NS]);
    let dir = tempfile::tempdir().unwrap();
    fake.write_service_account(dir.path(), TOKEN, NS).unwrap();

    let roles = ["scheduler", "scheduler", "worker", "worker", "worker"];
    let mut ids = Vec::new();
    for (i, role) in roles.iter().enumerate() {
        let ip = bed.host(i).ip.to_string();
        let name = format!("{role}-{i}");
        fake.put_pod(
            NS,
            &running_pod(
                &name,
                &ip,
                &[
                    ("app", "cluster-start"),
                    ("app.kubernetes.io/component", role),
                ],
            ),
        );
        let cmd = node(&fake, dir.path(), role, &ip);
        ids.push((name.clone(), bed.spawn(i, &name, cmd).unwrap()));
    }

    bed.wait_for(Duration::from_secs(30), "both clusters formed", |logs| {
        let all: Vec<_> = ids.iter().map(|(_, id)| logs.last(*id, ALL_PORT)).collect();
        common::lists_agree(&all, 5)
            && ids[..2]
                .iter()
                .all(|(_, id)| logs.last(*id, SCHEDULER_PORT).is_some_and(|l| l.size == 2))
    })
    .unwrap();
    {
        let logs = bed.logs();
        for (_, id) in &ids[2..] {
            assert!(
                logs.last(*id, SCHEDULER_PORT).is_none(),
                "a worker joined the scheduler cluster"
            );
        }
        // Every member address is a namespace host's, as the pods said.
        let hosts: Vec<String> = bed.hosts().iter().map(|h| h.ip.to_string()).collect();
        let last = logs.last(ids[0].1, ALL_PORT).unwrap();
        for m in &last.members {
            assert!(hosts.contains(&m.addr.ip().to_string()), "{m:?}");
        }
    }

    // Deleted pod, SIGTERM to its container: a leave.
    let (name, id) = ids[4].clone();
    let gone = me(&bed, id);
    assert!(fake.delete_pod(NS, &name));
    bed.terminate(id);
    bed.wait_for(Duration::from_secs(10), "the leave is logged", |logs| {
        ids[..4].iter().all(|(_, id)| {
            logs.last(*id, ALL_PORT)
                .is_some_and(|l| l.size == 4 && !l.members.iter().any(|m| m.uuid == gone))
        })
    })
    .unwrap();

    // A pod whose node vanished: the failure detector drops it.
    let (name, id) = ids[3].clone();
    let dead = me(&bed, id);
    bed.kill9(id);
    assert!(fake.delete_pod(NS, &name));
    bed.wait_for(Duration::from_secs(30), "the dead pod is dropped", |logs| {
        ids[..3].iter().all(|(_, id)| {
            logs.last(*id, ALL_PORT)
                .is_some_and(|l| l.size == 3 && !l.members.iter().any(|m| m.uuid == dead))
        })
    })
    .unwrap();
    assert_eq!(
        bed.logs().last(ids[0].1, SCHEDULER_PORT).map(|l| l.size),
        Some(2)
    );

    // The nodes followed the API with watches.
    assert!(fake.requests().iter().any(|q| q.contains("watch=true")));
}
