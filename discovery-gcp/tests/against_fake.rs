//! The production GCP backend (SDK client, credentials, retries, paging) run against the GCE
//! fake: filters, pagination, pages handed on as they arrive, zones that fail, RUNNING-only,
//! several NICs, IPv6, zones and roles, backoff, 401/403 wording and the metadata-server
//! defaults and zone.
//!
//! Every test starts its own fake on a free loopback port and passes it explicitly
//! (`Config::endpoint`, `Config::metadata_host`), so the tests run in parallel and never
//! touch a real metadata server. Instance addresses are data only: nothing is sent to them.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use discovery::{Context, Discover, DiscoveryError, NoObserver, Refresh, Role, Snapshot};
use discovery_gcp::{Config, GcpDiscovery, Retry, parse_labels};
use gce_fake::{GceFake, InstanceSpec, VmIdentity};
use tokio::sync::watch;

const PROJECT: &str = "test-project";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn fake() -> GceFake {
    GceFake::start("127.0.0.1:0".parse().unwrap()).expect("start the fake")
}

/// This node: 198.18.0.1 inside 198.18.0.0/15.
fn ctx() -> Context {
    Context::standalone(
        "c",
        Role::Worker,
        ip("198.18.0.1"),
        8081,
        Some("198.18.0.0/15".parse().unwrap()),
    )
}

fn config(f: &GceFake, labels: &str, zones: &[&str]) -> Config {
    Config {
        project: Some(PROJECT.into()),
        zones: zones.iter().map(|z| z.to_string()).collect(),
        labels: parse_labels(labels).unwrap(),
        endpoint: Some(f.endpoint()),
        metadata_host: Some(f.metadata_host()),
        request_timeout: Duration::from_secs(3),
        retry: Retry {
            attempts: 4,
            min_backoff: Duration::from_millis(40),
            max_backoff: Duration::from_millis(400),
        },
        ..Config::default()
    }
}

fn backend(c: Config) -> Arc<GcpDiscovery> {
    GcpDiscovery::new(c, ctx()).expect("valid config")
}

fn ips(r: &discovery::Report) -> Vec<String> {
    r.candidates.iter().map(|c| c.ip.to_string()).collect()
}

fn reason_of<'a>(r: &'a discovery::Report, id: &str) -> Option<&'a str> {
    r.excluded
        .iter()
        .find(|e| e.id == id)
        .map(|e| e.reason.as_str())
}

#[tokio::test]
async fn labels_and_the_running_status_are_filtered_on_the_server() {
    let f = fake();
    let z = "us-central1-a";
    f.add_instance(
        PROJECT,
        z,
        InstanceSpec::running("a")
            .label("cluster", "prod")
            .nic(ip("198.18.0.10")),
    );
    f.add_instance(
        PROJECT,
        z,
        InstanceSpec::running("b")
            .label("cluster", "dev")
            .nic(ip("198.18.0.11")),
    );
    f.add_instance(
        PROJECT,
        z,
        InstanceSpec::running("c")
            .label("cluster", "prod")
            .status("STOPPED")
            .nic(ip("198.18.0.12")),
    );
    f.add_instance(
        PROJECT,
        z,
        InstanceSpec::running("d")
            .label("cluster", "prod")
            .label("role", "scheduler")
            .nic(ip("198.18.0.13")),
    );
    f.add_instance(
        PROJECT,
        z,
        InstanceSpec::running("e").nic(ip("198.18.0.14")),
    );

    let d = backend(config(&f, "cluster=prod", &[z]));
    let r = d.discover().await.unwrap();
    assert_eq!(ips(&r), ["198.18.0.10", "198.18.0.13"]);
    let reqs = f.requests();
    assert_eq!(reqs.len(), 1, "one filtered listing per zone: {reqs:?}");
    assert_eq!(
        reqs[0].query.get("filter").map(String::as_str),
        Some(r#"(labels.cluster = "prod") AND (status = RUNNING)"#)
    );
    assert_eq!(
        reqs[0].path,
        format!("/compute/v1/projects/{PROJECT}/zones/{z}/instances")
    );

    // A bare key means "the label exists"; both labels must match.
    let d = backend(config(&f, "cluster=prod,role", &[z]));
    let r = d.discover().await.unwrap();
    assert_eq!(ips(&r), ["198.18.0.13"]);
    assert_eq!(
        f.requests().last().unwrap().query.get("filter").unwrap(),
        r#"(labels.cluster = "prod") AND (labels.role:*) AND (status = RUNNING)"#
    );

    // No labels: every running instance.
    let d = backend(config(&f, "", &[z]));
    let r = d.discover().await.unwrap();
    assert_eq!(
        ips(&r),
        ["198.18.0.10", "198.18.0.11", "198.18.0.13", "198.18.0.14"]
    );
}

#[tokio::test]
async fn every_page_is_read_past_500_instances() {
    let f = fake();
    let z = "us-central1-a";
    for n in 0..1203u32 {
        let addr = IpAddr::from([198, 18, 10 + (n / 250) as u8, (n % 250) as u8 + 2]);
        f.add_instance(
            PROJECT,
            z,
            InstanceSpec::running(format!("vm-{n}"))
                .label("cluster", "big")
                .nic(addr),
        );
    }
    // Some that must not count, spread among them.
    for n in 0..20u32 {
        f.add_instance(
            PROJECT,
            z,
            InstanceSpec::running(format!("off-{n}"))
                .label("cluster", "big")
                .status("TERMINATED")
                .nic(IpAddr::from([198, 19, 0, n as u8 + 1])),
        );
    }
    let d = backend(config(&f, "cluster=big", &[z]));
    let r = d.discover().await.unwrap();
    assert_eq!(r.candidates.len(), 1203);
    let reqs = f.requests();
    assert_eq!(reqs.len(), 3, "500 + 500 + 203");
    assert!(reqs.iter().all(|q| q.status == 200));
    assert!(
        reqs.iter()
            .all(|q| q.query.get("maxResults").map(String::as_str) == Some("500"))
    );
    assert!(!reqs[0].query.contains_key("pageToken"));
    assert!(reqs[1].query.contains_key("pageToken"));
    assert!(reqs[2].query.contains_key("pageToken"));
    assert_ne!(reqs[1].query["pageToken"], reqs[2].query["pageToken"]);
}

#[tokio::test]
async fn a_failing_zone_keeps_its_last_good_instances_and_never_hides_the_other_zones() {
    let f = fake();
    let zones = ["europe-west1-b", "europe-west1-c", "europe-west1-d"];
    for (i, z) in zones.iter().enumerate() {
        f.add_instance(
            PROJECT,
            z,
            InstanceSpec::running(format!("vm-{i}"))
                .label("cluster", "prod")
                .nic(IpAddr::from([198, 18, 1, i as u8 + 10])),
        );
    }
    let mut c = config(&f, "cluster=prod", &zones);
    c.retry.attempts = 2;
    let d = backend(c);
    let r = d.discover().await.unwrap();
    assert_eq!(ips(&r), ["198.18.1.10", "198.18.1.11", "198.18.1.12"]);

    // Zone c fails from now on; a new instance appears in zone b.
    f.fail_zone("europe-west1-c", Some(500));
    f.add_instance(
        PROJECT,
        "europe-west1-b",
        InstanceSpec::running("new")
            .label("cluster", "prod")
            .nic(ip("198.18.1.99")),
    );
    let r = d.discover().await.unwrap();
    assert_eq!(
        ips(&r),
        ["198.18.1.10", "198.18.1.11", "198.18.1.12", "198.18.1.99"],
        "zone b is fresh, zone c kept its last good instance"
    );
    let why = reason_of(&r, "zone europe-west1-c").expect("the failing zone is reported");
    assert!(why.contains("kept 1 instances"), "{why}");
    assert!(why.contains("500"), "{why}");

    // A zone that never succeeded contributes nothing, and the others still count.
    f.fail_zone("europe-west1-d", Some(403));
    let d2 = backend(config(&f, "cluster=prod", &zones));
    let r = d2.discover().await.unwrap();
    assert_eq!(ips(&r), ["198.18.1.10", "198.18.1.99"]);
    assert!(
        reason_of(&r, "zone europe-west1-d")
            .unwrap()
            .contains("compute.instances.list")
    );

    // When every zone fails, the round fails, so the refresh loop keeps the whole set.
    f.fail_zone("europe-west1-b", Some(503));
    let e = d2.discover().await.unwrap_err();
    assert!(
        !e.is_transient(),
        "the permanent 403 is the one reported: {e}"
    );
}

#[tokio::test]
async fn discover_explains_not_running_label_mismatch_self_and_cidr_exclusions() {
    let f = fake();
    let z = "us-east1-b";
    let prod = |name: &str| InstanceSpec::running(name).label("cluster", "prod");
    f.add_instance(PROJECT, z, prod("peer").nic(ip("198.18.0.20")));
    f.add_instance(PROJECT, z, prod("me").nic(ip("198.18.0.1")));
    f.add_instance(
        PROJECT,
        z,
        prod("stopped").status("STOPPED").nic(ip("198.18.0.21")),
    );
    f.add_instance(PROJECT, z, prod("elsewhere").nic(ip("127.0.0.50")));
    f.add_instance(
        PROJECT,
        z,
        InstanceSpec::running("dev")
            .label("cluster", "dev")
            .nic(ip("198.18.0.22")),
    );
    f.add_instance(
        PROJECT,
        z,
        InstanceSpec::running("bare").nic(ip("198.18.0.23")),
    );

    let d = backend(config(&f, "cluster=prod", &[z]));
    let r = d.explain().await.unwrap();
    assert_eq!(ips(&r), ["198.18.0.20"]);
    assert_eq!(reason_of(&r, "us-east1-b/me"), Some("self"));
    assert_eq!(
        reason_of(&r, "us-east1-b/stopped"),
        Some("not running (status STOPPED)")
    );
    assert_eq!(
        reason_of(&r, "us-east1-b/elsewhere"),
        Some("no IPv4 address inside --private_ip_selector 198.18.0.0/15 (has 127.0.0.50)")
    );
    assert_eq!(
        reason_of(&r, "us-east1-b/dev"),
        Some("labels do not match --gcp_labels: cluster=dev (want prod)")
    );
    assert_eq!(
        reason_of(&r, "us-east1-b/bare"),
        Some("labels do not match --gcp_labels: cluster missing (want prod)")
    );
    assert_eq!(r.excluded.len(), 5, "{:?}", r.excluded);
    // The explanation came from the server: one listing per filter, none unfiltered by us.
    let filters: Vec<Option<String>> = f
        .requests()
        .iter()
        .map(|q| q.query.get("filter").cloned())
        .collect();
    assert_eq!(
        filters,
        [
            Some(r#"(labels.cluster = "prod") AND (status = RUNNING)"#.to_string()),
            Some(r#"(labels.cluster = "prod")"#.to_string()),
            None,
        ]
    );
}

#[tokio::test]
async fn an_instance_is_one_candidate_at_its_lowest_address_inside_the_selector() {
    let f = fake();
    let z = "asia-east1-a";
    f.add_instance(
        PROJECT,
        z,
        InstanceSpec::running("multi")
            .nic(ip("198.19.3.1"))
            .nic(ip("127.0.0.77"))
            .nic(ip("198.18.3.1")),
    );
    let d = backend(config(&f, "", &[z]));
    let r = d.discover().await.unwrap();
    assert_eq!(ips(&r), ["198.18.3.1"]);
    assert_eq!(r.candidates[0].id.as_deref(), Some("asia-east1-a/multi"));
    assert_eq!(r.candidates[0].port, 8081);
}

#[tokio::test]
async fn candidates_carry_their_zone_and_the_role_label() {
    let f = fake();
    let zones = ["europe-west4-a", "europe-west4-b"];
    f.add_instance(
        PROJECT,
        zones[0],
        InstanceSpec::running("s")
            .label("role", "scheduler")
            .nic(ip("198.18.11.1")),
    );
    f.add_instance(
        PROJECT,
        zones[1],
        InstanceSpec::running("w")
            .label("role", "worker")
            .nic(ip("198.18.11.2")),
    );
    // A role label that names no role, and none at all: the role is unknown.
    f.add_instance(
        PROJECT,
        zones[1],
        InstanceSpec::running("odd")
            .label("role", "db")
            .nic(ip("198.18.11.3")),
    );
    f.add_instance(
        PROJECT,
        zones[0],
        InstanceSpec::running("bare").nic(ip("198.18.11.4")),
    );
    let r = backend(config(&f, "", &zones)).discover().await.unwrap();
    let got: Vec<(String, Option<&str>, Option<Role>)> = r
        .candidates
        .iter()
        .map(|c| (c.ip.to_string(), c.zone.as_deref(), c.role))
        .collect();
    assert_eq!(
        got,
        [
            ("198.18.11.1".into(), Some(zones[0]), Some(Role::Scheduler)),
            ("198.18.11.2".into(), Some(zones[1]), Some(Role::Worker)),
            ("198.18.11.3".into(), Some(zones[1]), None),
            ("198.18.11.4".into(), Some(zones[0]), None),
        ]
    );
}

#[tokio::test]
async fn an_ipv6_node_finds_its_peers_at_their_internal_ipv6_addresses() {
    let f = fake();
    let z = "us-east5-a";
    let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap();
    f.add_instance(
        PROJECT,
        z,
        InstanceSpec::running("me").dual_stack_nic(ip("198.18.12.1"), v6("2001:2:0:12::1")),
    );
    f.add_instance(
        PROJECT,
        z,
        InstanceSpec::running("dual").dual_stack_nic(ip("198.18.12.2"), v6("2001:2:0:12::2")),
    );
    f.add_instance(
        PROJECT,
        z,
        InstanceSpec::running("only6").ipv6_only_nic(v6("2001:2:0:12::3")),
    );
    f.add_instance(
        PROJECT,
        z,
        InstanceSpec::running("only4").nic(ip("198.18.12.4")),
    );
    let ctx6 = Context::standalone(
        "c",
        Role::Worker,
        ip("2001:2:0:12::1"),
        8081,
        Some("2001:2::/48".parse().unwrap()),
    );
    let d = GcpDiscovery::new(config(&f, "", &[z]), ctx6).unwrap();
    let r = d.discover().await.unwrap();
    assert_eq!(ips(&r), ["2001:2:0:12::2", "2001:2:0:12::3"]);
    assert_eq!(reason_of(&r, "us-east5-a/me"), Some("self"));
    assert_eq!(
        reason_of(&r, "us-east5-a/only4"),
        Some("no IPv6 address inside --private_ip_selector 2001:2::/48 (has 198.18.12.4)")
    );
    // An IPv4 node in the same project sees the IPv4 side of the dual-stack instances only.
    let r = backend(config(&f, "", &[z])).discover().await.unwrap();
    assert_eq!(ips(&r), ["198.18.12.1", "198.18.12.2", "198.18.12.4"]);
}

#[tokio::test]
async fn each_page_is_handed_on_as_it_arrives() {
    let f = fake();
    let z = "us-south1-a";
    for n in 0..5u8 {
        f.add_instance(
            PROJECT,
            z,
            InstanceSpec::running(format!("vm-{n}")).nic(IpAddr::from([198, 18, 13, n + 10])),
        );
    }
    let mut c = config(&f, "", &[z]);
    c.page_size = 2;
    let d = backend(c);
    let pages = std::sync::Mutex::new(Vec::new());
    let on_page = |p: &[discovery::Candidate]| {
        pages
            .lock()
            .unwrap()
            .push(p.iter().map(|c| c.ip.to_string()).collect::<Vec<_>>());
    };
    let r = d.discover_pages(&on_page).await.unwrap();
    let pages = pages.into_inner().unwrap();
    assert_eq!(
        pages,
        [
            vec!["198.18.13.10", "198.18.13.11"],
            vec!["198.18.13.12", "198.18.13.13"],
            vec!["198.18.13.14"],
        ]
    );
    assert_eq!(r.candidates.len(), 5, "the report is the whole round's");
}

#[tokio::test]
async fn a_starting_node_publishes_its_first_page_before_the_last_page_is_served() {
    let f = fake();
    let z = "us-south1-b";
    for n in 0..6u8 {
        f.add_instance(
            PROJECT,
            z,
            InstanceSpec::running(format!("vm-{n}")).nic(IpAddr::from([198, 18, 14, n + 10])),
        );
    }
    // Every page after the first takes 1.5 s: the last (third) one is served after 3 s.
    f.delay_later_pages(Duration::from_millis(1500));
    let mut c = config(&f, "", &[z]);
    c.page_size = 2;
    let d = backend(c);
    let (tx, mut rx) = watch::channel(Snapshot::default());
    let refresh = Refresh {
        interval: Duration::from_secs(600),
        initial_jitter: Duration::ZERO,
        min_backoff: Duration::from_millis(10),
    };
    let started = Instant::now();
    let task = tokio::spawn(d.clone().watch(refresh, tx, Arc::new(NoObserver)));
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| !s.candidates.is_empty()),
    )
    .await
    .unwrap()
    .unwrap();
    let first = started.elapsed();
    let snap = rx.borrow().clone();
    let served = f.requests().len();
    assert_eq!(snap.candidates.len(), 2, "{snap:?}");
    assert_eq!(snap.refreshes, 0, "the round is not complete yet");
    assert_eq!(
        served, 1,
        "only the first page was served when it was published"
    );
    assert!(first < Duration::from_millis(1500), "{first:?}");
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.refreshes >= 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rx.borrow().candidates.len(), 6);
    assert_eq!(f.requests().len(), 3);
    eprintln!(
        "first page published after {first:?}, the whole round after {:?}",
        started.elapsed()
    );
    task.abort();
}

#[tokio::test]
async fn the_local_zone_is_the_metadata_servers_instance_zone() {
    let f = fake();
    f.set_vm(VmIdentity {
        zone: "asia-south2-c".into(),
        ..VmIdentity::default()
    });
    let d = backend(config(&f, "", &["us-central1-a"]));
    assert_eq!(d.local_zone().await.as_deref(), Some("asia-south2-c"));
    assert!(f.metadata_requests() >= 1);
    // No metadata server: no zone, and no error.
    let mut c = config(&f, "", &["us-central1-a"]);
    c.metadata_host = Some("127.0.0.1:1".into());
    assert_eq!(backend(c).local_zone().await, None);
}

#[tokio::test]
async fn throttling_is_retried_with_growing_jittered_backoff() {
    let f = fake();
    let z = "us-west1-a";
    f.add_instance(PROJECT, z, InstanceSpec::running("a").nic(ip("198.18.4.1")));
    f.fail_next(3, 429);
    let d = backend(config(&f, "", &[z]));
    let r = d.discover().await.unwrap();
    assert_eq!(ips(&r), ["198.18.4.1"]);
    let reqs = f.requests();
    let statuses: Vec<u16> = reqs.iter().map(|q| q.status).collect();
    assert_eq!(statuses, [429, 429, 429, 200]);
    // Equal jitter: each pause is at least half the current backoff (40, 80, 160 ms).
    for (i, w) in reqs.windows(2).enumerate() {
        let gap = w[1].at - w[0].at;
        let floor = Duration::from_millis(20 << i);
        assert!(gap >= floor, "pause {i} was {gap:?}, below {floor:?}");
    }
}

#[tokio::test]
async fn errors_past_the_retry_budget_fail_the_round_and_the_refresh_loop_keeps_the_last_set() {
    let f = fake();
    let z = "us-west1-b";
    f.add_instance(PROJECT, z, InstanceSpec::running("a").nic(ip("198.18.5.1")));
    f.add_instance(PROJECT, z, InstanceSpec::running("b").nic(ip("198.18.5.2")));
    let mut c = config(&f, "", &[z]);
    c.retry.min_backoff = Duration::from_millis(5);
    c.retry.max_backoff = Duration::from_millis(10);
    let d = backend(c);

    // One round's worth of 500s: the error is transient and names the zone.
    f.fail_next(4, 500);
    let e = d.discover().await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(e.to_string().contains("zone us-west1-b"), "{e}");
    f.fail_next(4, 429);
    let e = d.discover().await.unwrap_err();
    assert!(matches!(e, DiscoveryError::Throttled { .. }), "{e}");

    // Through the refresh loop: a good round, then failures, then recovery.
    let (tx, mut rx) = watch::channel(Snapshot::default());
    let refresh = Refresh {
        interval: Duration::from_millis(50),
        initial_jitter: Duration::ZERO,
        min_backoff: Duration::from_millis(10),
    };
    let task = tokio::spawn(d.clone().watch(refresh, tx, Arc::new(NoObserver)));
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.refreshes >= 1))
        .await
        .unwrap()
        .unwrap();
    f.fail_next(40, 503);
    let end = Instant::now() + Duration::from_secs(20);
    while f.pending_failures() > 0 && Instant::now() < end {
        let s = rx.borrow().clone();
        assert_eq!(s.candidates.len(), 2, "the last good set stays published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(f.pending_failures(), 0, "the loop kept retrying");
    let before = rx.borrow().refreshes;
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.refreshes > before),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(rx.borrow().candidates.len(), 2);
    task.abort();
}

#[tokio::test]
async fn a_403_names_the_permission_or_the_access_scope_and_how_to_grant_it() {
    let f = fake();
    let z = "us-central1-f";
    f.add_zone(PROJECT, z);
    f.deny_list_permission(PROJECT, true);
    let e = backend(config(&f, "", &[z])).discover().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DiscoveryError::Unauthorized { .. }), "{msg}");
    assert!(!e.is_transient());
    assert!(msg.contains("compute.instances.list"), "{msg}");
    assert!(msg.contains("add-iam-policy-binding"), "{msg}");
    // Not retried: a permission does not appear by itself.
    assert_eq!(f.requests().len(), 1);

    f.deny_list_permission(PROJECT, false);
    f.set_vm(VmIdentity {
        scopes: vec!["https://www.googleapis.com/auth/devstorage.read_only".into()],
        ..VmIdentity::default()
    });
    let e = backend(config(&f, "", &[z])).discover().await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("access scopes"), "{msg}");
    assert!(msg.contains("compute-ro"), "{msg}");
}

#[tokio::test]
async fn the_project_and_the_zone_come_from_the_metadata_server() {
    let f = fake();
    f.set_vm(VmIdentity {
        project_id: "meta-project".into(),
        zone: "europe-north1-c".into(),
        ..VmIdentity::default()
    });
    f.add_instance(
        "meta-project",
        "europe-north1-c",
        InstanceSpec::running("a").nic(ip("198.18.6.1")),
    );
    let mut c = config(&f, "", &[]);
    c.project = None;
    let r = backend(c).discover().await.unwrap();
    assert_eq!(ips(&r), ["198.18.6.1"]);
    assert_eq!(
        f.requests()[0].path,
        "/compute/v1/projects/meta-project/zones/europe-north1-c/instances"
    );
    assert!(
        f.tokens_issued() >= 1,
        "the token came from the metadata server"
    );
}

#[tokio::test]
async fn without_a_metadata_server_the_error_names_the_flags_to_set() {
    let f = fake();
    // Nothing listens on port 1 of loopback: the metadata server is absent.
    let mut c = config(&f, "", &["us-central1-a"]);
    c.project = None;
    c.metadata_host = Some("127.0.0.1:1".into());
    let e = backend(c).discover().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DiscoveryError::Config(_)), "{msg}");
    assert!(msg.contains("--gcp_project"), "{msg}");
    // The cause is kept as a source, down to the transport error.
    let chain = discovery::Chain(&e).to_string();
    assert!(
        chain.contains("127.0.0.1:1/computeMetadata/v1/project/project-id did not answer"),
        "{chain}"
    );
    assert!(std::error::Error::source(&e).is_some());

    let mut c = config(&f, "", &[]);
    c.metadata_host = Some("127.0.0.1:1".into());
    let e = backend(c).discover().await.unwrap_err();
    assert!(e.to_string().contains("--gcp_zones"), "{e}");
}

#[tokio::test]
async fn a_region_lists_all_its_zones_through_the_aggregated_list() {
    let f = fake();
    let zones = ["us-central1-a", "us-central1-b", "us-central1-c"];
    for (i, z) in zones.iter().enumerate() {
        for n in 0..3u8 {
            f.add_instance(
                PROJECT,
                z,
                InstanceSpec::running(format!("vm-{i}-{n}"))
                    .label("cluster", "prod")
                    .nic(IpAddr::from([198, 18, 7, i as u8 * 10 + n + 1])),
            );
        }
    }
    // Another region, and a non-running instance, that must not count.
    f.add_instance(
        PROJECT,
        "us-central2-a",
        InstanceSpec::running("far")
            .label("cluster", "prod")
            .nic(ip("198.18.8.1")),
    );
    f.add_instance(
        PROJECT,
        "us-central1-a",
        InstanceSpec::running("off")
            .label("cluster", "prod")
            .status("STOPPING")
            .nic(ip("198.18.8.2")),
    );
    let mut c = config(&f, "cluster=prod", &[]);
    c.region = Some("us-central1".into());
    c.page_size = 4;
    let d = backend(c);
    let r = d.discover().await.unwrap();
    assert_eq!(r.candidates.len(), 9, "{:?}", ips(&r));
    assert!(!ips(&r).contains(&"198.18.8.1".to_string()));
    let reqs = f.requests();
    assert!(
        reqs.iter()
            .all(|q| q.path == format!("/compute/v1/projects/{PROJECT}/aggregated/instances"))
    );
    assert_eq!(reqs.len(), 3, "10 matching instances in pages of 4");
    assert_eq!(
        reqs[0].query.get("filter").unwrap(),
        r#"(labels.cluster = "prod") AND (status = RUNNING)"#
    );

    // An unreachable zone keeps its last good instances.
    f.fail_zone("us-central1-b", Some(503));
    let r = d.discover().await.unwrap();
    assert_eq!(r.candidates.len(), 9);
    assert!(reason_of(&r, "zone us-central1-b").is_some());
}

#[tokio::test]
async fn a_slow_zone_times_out_without_holding_back_the_others() {
    let f = fake();
    f.add_instance(
        PROJECT,
        "us-east4-a",
        InstanceSpec::running("fast").nic(ip("198.18.9.1")),
    );
    f.add_instance(
        PROJECT,
        "us-east4-b",
        InstanceSpec::running("slow").nic(ip("198.18.9.2")),
    );
    f.delay_zone("us-east4-b", Duration::from_secs(30));
    let mut c = config(&f, "", &["us-east4-a", "us-east4-b"]);
    c.request_timeout = Duration::from_millis(300);
    c.retry.attempts = 2;
    let r = tokio::time::timeout(Duration::from_secs(10), backend(c).discover())
        .await
        .expect("the round ends on its own")
        .unwrap();
    assert_eq!(ips(&r), ["198.18.9.1"]);
    let why = reason_of(&r, "zone us-east4-b").unwrap();
    assert!(why.contains("listing failed"), "{why}");
}

#[tokio::test]
async fn bad_flags_are_refused_before_anything_is_contacted() {
    let f = fake();
    let mut c = config(&f, "", &["us-central1-a"]);
    c.region = Some("us-central1".into());
    assert!(GcpDiscovery::new(c, ctx()).is_err());
    let mut c = config(&f, "", &["US-CENTRAL1-A"]);
    c.region = None;
    let e = GcpDiscovery::new(c, ctx()).unwrap_err().to_string();
    assert!(e.contains("--gcp_zones"), "{e}");
    assert_eq!(f.metadata_requests(), 0);
    assert!(f.requests().is_empty());
}

#[tokio::test]
async fn a_token_the_api_does_not_know_gets_401_worded_as_a_credential_problem() {
    // Tokens come from another metadata server than the one the compute fake trusts.
    let compute = fake();
    let other_metadata = fake();
    compute.add_zone(PROJECT, "us-central1-a");
    let mut c = config(&compute, "", &["us-central1-a"]);
    c.metadata_host = Some(other_metadata.metadata_host());
    let e = backend(c).discover().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DiscoveryError::Unauthorized { .. }), "{msg}");
    assert!(msg.contains("rejected the access token"), "{msg}");
    assert!(msg.contains("GOOGLE_APPLICATION_CREDENTIALS"), "{msg}");
    assert_eq!(other_metadata.tokens_issued(), 1);
    assert_eq!(compute.requests()[0].status, 401);
}
