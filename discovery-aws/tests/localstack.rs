//! The backend's production code against LocalStack's EC2: filters, states, groups, several
//! network interfaces, IPv6 addresses, zones and roles, pagination (and pages published as they
//! arrive), the region and zone from IMDSv2 (the `aws-fake` IMDS), throttling and authorisation
//! errors (the `aws-fake` proxy).
//!
//! `cargo xtask test` starts LocalStack and passes its URL in `LOCALSTACK_ENDPOINT`. LocalStack
//! keeps every instance for its lifetime, so each test tags its instances with its own value
//! and uses its own subnet of the VPC 198.18.0.0/16.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use discovery::{Candidate, Discover, DiscoveryError, NoObserver, Refresh, Role, Snapshot};
use discovery_aws::{AwsConfig, AwsDiscovery, AwsEnv, METADATA_ENDPOINT_ENV, Retry};
use support::*;
use tokio::sync::watch;

fn config(tags: &str, endpoint: &str) -> AwsConfig {
    let mut c = AwsConfig::new(tags);
    c.region = Some(REGION.into());
    c.endpoint = Some(endpoint.into());
    // IMDS is the fake's or none: never the real one.
    c.env = AwsEnv::from_pairs([("AWS_EC2_METADATA_DISABLED", "true")]);
    c
}

fn proxy(upstream: &str) -> FaultProxy {
    FaultProxy::start(upstream).expect("start the fault proxy")
}

async fn discover(c: AwsConfig, ctx: discovery::Context) -> discovery::Report {
    AwsDiscovery::new(c, ctx)
        .expect("valid config")
        .discover()
        .await
        .expect("discovery succeeds")
}

#[tokio::test]
async fn tag_terms_are_anded_and_values_are_ored() {
    let ep = localstack();
    let seed = seed(REGION).await;
    let subnet = seed.subnet("198.18.1.0/24").await;
    let u = unique("tags");
    let u = u.as_str();
    seed.instance(&subnet, "198.18.1.11", &[("cluster", u), ("tier", "a")])
        .await;
    seed.instance(&subnet, "198.18.1.12", &[("cluster", u), ("tier", "b")])
        .await;
    seed.instance(&subnet, "198.18.1.13", &[("cluster", u), ("tier", "c")])
        .await;
    seed.instance(&subnet, "198.18.1.14", &[("cluster", u)])
        .await;
    seed.instance(&subnet, "198.18.1.15", &[("other", u)]).await;

    let at = || ctx("198.18.1.100", "198.18.0.0/16");
    let cases: [(String, &[&str]); 5] = [
        (
            format!("cluster={u}"),
            &["198.18.1.11", "198.18.1.12", "198.18.1.13", "198.18.1.14"],
        ),
        (
            format!("cluster={u},tier=a|b"),
            &["198.18.1.11", "198.18.1.12"],
        ),
        (
            format!("cluster={u},tier"),
            &["198.18.1.11", "198.18.1.12", "198.18.1.13"],
        ),
        (format!("cluster={u},tier=a"), &["198.18.1.11"]),
        (format!("cluster={u},tier=z"), &[]),
    ];
    for (tags, want) in cases {
        let r = discover(config(&tags, &ep), at()).await;
        assert_eq!(ips(&r), parse_ips(want), "--aws_tags={tags}");
    }

    // The node's own instance is reported as self, not as a candidate.
    let r = discover(
        config(&format!("cluster={u},tier=a|b"), &ep),
        ctx("198.18.1.11", "198.18.0.0/16"),
    )
    .await;
    assert_eq!(ips(&r), parse_ips(&["198.18.1.12"]));
    assert!(r.excluded.iter().any(|x| x.reason == "self"), "{r:?}");
}

#[tokio::test]
async fn only_running_instances_count_and_discover_says_why_others_do_not() {
    let ep = localstack();
    let seed = seed(REGION).await;
    let subnet = seed.subnet("198.18.2.0/24").await;
    let elsewhere = seed.subnet("198.18.3.0/24").await;
    let u = unique("state");
    let tag = [("cluster", u.as_str())];
    seed.instance(&subnet, "198.18.2.11", &tag).await;
    seed.instance(&subnet, "198.18.2.12", &tag).await;
    let stopped = seed.instance(&subnet, "198.18.2.13", &tag).await;
    let outside = seed.instance(&elsewhere, "198.18.3.11", &tag).await;
    seed.stop(std::slice::from_ref(&stopped)).await;

    let proxy = proxy(&ep);
    let d = AwsDiscovery::new(
        config(&format!("cluster={u}"), &proxy.url()),
        ctx("198.18.2.11", "198.18.2.0/24"),
    )
    .expect("config");

    // `node discover`: candidates plus every exclusion with its reason.
    let r = d.explain().await.expect("explain");
    assert_eq!(ips(&r), parse_ips(&["198.18.2.12"]));
    let reason = |id: &str| {
        r.excluded
            .iter()
            .find(|x| x.id == id)
            .map(|x| x.reason.clone())
            .unwrap_or_else(|| panic!("{id} is not reported as excluded: {r:?}"))
    };
    assert!(reason(&stopped).contains("stopped"), "{r:?}");
    assert!(
        reason(&outside).contains("no IPv4 address inside --private_ip_selector 198.18.2.0/24"),
        "{r:?}"
    );
    assert!(r.excluded.iter().any(|x| x.reason == "self"), "{r:?}");
    let seen = proxy.seen();
    assert_eq!(seen.len(), 2, "one running query and one for the rest");
    assert!(seen[1].body.contains("stopped"), "{}", seen[1].body);

    // The refresh loop asks for running instances only: one filtered call per round.
    let (tx, mut rx) = watch::channel(Snapshot::default());
    let refresh = Refresh {
        interval: Duration::from_secs(60),
        ..Refresh::default()
    };
    let mut c = config(&format!("cluster={u}"), &proxy.url());
    c.initial_jitter = Duration::ZERO;
    let d = AwsDiscovery::new(c, ctx("198.18.2.11", "198.18.2.0/24")).expect("config");
    let task = tokio::spawn(d.watch(refresh, tx, Arc::new(NoObserver)));
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| s.refreshes == 1))
        .await
        .expect("first refresh within 20 s")
        .expect("loop alive");
    assert_eq!(
        rx.borrow()
            .candidates
            .iter()
            .map(|c| c.ip)
            .collect::<Vec<_>>(),
        parse_ips(&["198.18.2.12"])
    );
    let seen = proxy.seen();
    assert_eq!(seen.len(), 3, "the refresh made exactly one call");
    let body = &seen[2].body;
    assert!(
        body.contains("instance-state-name")
            && body.contains("running")
            && !body.contains("stopped"),
        "{body}"
    );
    assert!(body.contains("MaxResults=1000"), "{body}");
    task.abort();
}

#[tokio::test]
async fn the_security_group_filter_takes_an_id_or_a_name() {
    let ep = localstack();
    let seed = seed(REGION).await;
    let subnet = seed.subnet("198.18.4.0/24").await;
    let u = unique("sg");
    let group_name = format!("g-{u}");
    let group = seed.group(&group_name).await;
    let tag = [("cluster", u.as_str())];
    seed.instance_in(&subnet, "198.18.4.11", &tag, Some(&group))
        .await;
    seed.instance(&subnet, "198.18.4.12", &tag).await;

    let at = || ctx("198.18.4.100", "198.18.4.0/24");
    let all = discover(config(&format!("cluster={u}"), &ep), at()).await;
    assert_eq!(ips(&all), parse_ips(&["198.18.4.11", "198.18.4.12"]));
    for g in [group.clone(), group_name.clone()] {
        let mut c = config(&format!("cluster={u}"), &ep);
        c.security_group = Some(g.clone());
        let r = discover(c, at()).await;
        assert_eq!(
            ips(&r),
            parse_ips(&["198.18.4.11"]),
            "--aws_security_group={g}"
        );
    }
}

#[tokio::test]
async fn an_instance_with_two_interfaces_is_its_lowest_address_inside_the_selector() {
    let ep = localstack();
    let seed = seed(REGION).await;
    let a = seed.subnet("198.18.5.0/24").await;
    let b = seed.subnet("198.18.6.0/24").await;
    let u = unique("eni");
    let tag = [("cluster", u.as_str())];
    let id = seed
        .two_enis((&a, &b), ("198.18.5.11", "198.18.6.11"), &tag)
        .await;

    let tags = format!("cluster={u}");
    let r = discover(config(&tags, &ep), ctx("198.18.0.1", "198.18.0.0/16")).await;
    assert_eq!(ips(&r), parse_ips(&["198.18.5.11"]), "{r:?}");
    assert!(r.candidates.iter().all(|c| c.id.as_deref() == Some(&id)));

    // A narrower selector picks the interface inside it.
    let r = discover(config(&tags, &ep), ctx("198.18.6.1", "198.18.6.0/24")).await;
    assert_eq!(ips(&r), parse_ips(&["198.18.6.11"]), "{r:?}");
}

#[tokio::test]
async fn every_page_is_read_past_a_thousand_reservations() {
    let ep = localstack();
    // A region of its own, so the other tests' queries need not wade through these instances.
    let region = "ap-southeast-2";
    let seed = seed(region).await;
    let subnet = seed.subnet("198.18.64.0/20").await;
    let u = unique("pages");
    // LocalStack pages count reservations, so each instance gets its own RunInstances call.
    const N: usize = 1005;
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::new();
    for _ in 0..N {
        let seed = seed.clone();
        let subnet = subnet.clone();
        let u = u.clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.expect("semaphore");
            seed.many(&subnet, 1, &[("cluster", &u)]).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("seed task").len(), 1);
    }
    eprintln!("seeded {N} reservations in {:?}", started.elapsed());

    let proxy = proxy(&ep);
    let mut c = config(&format!("cluster={u}"), &proxy.url());
    c.region = Some(region.into());
    // LocalStack takes seconds to render a page of 1000 instances.
    c.call_timeout = Duration::from_secs(120);
    let d = AwsDiscovery::new(c, ctx("198.18.64.1", "198.18.64.0/20")).expect("config");
    // Each page's candidates are handed over as the page arrives, before the round ends.
    let started = Instant::now();
    let pages = std::sync::Mutex::new(Vec::<(Duration, usize)>::new());
    let on_page = |page: &[Candidate]| {
        pages
            .lock()
            .expect("lock")
            .push((started.elapsed(), page.len()))
    };
    let r = d.discover_pages(&on_page).await.expect("round");
    let whole = started.elapsed();
    let pages = pages.into_inner().expect("lock");
    eprintln!(
        "read {} instances in {whole:?}; pages handed over at {pages:?}",
        r.candidates.len(),
    );
    assert_eq!(r.candidates.len(), N, "every instance on every page");
    assert_eq!(pages.len(), 2, "{pages:?}");
    assert_eq!(pages.iter().map(|p| p.1).sum::<usize>(), N);
    assert_eq!(pages[0].1, 1000, "the first page is a whole page");
    assert!(
        pages[0].0 < whole,
        "the first page came before the round ended"
    );
    let seen = proxy.seen();
    assert!(
        seen.len() >= 2,
        "pagination needs a second call: {}",
        seen.len()
    );
    assert!(!seen[0].body.contains("NextToken"));
    assert!(seen[1..].iter().all(|s| s.body.contains("NextToken=")));
    assert!(seen.iter().all(|s| s.body.contains("MaxResults=1000")));
}

#[tokio::test]
async fn throttling_backs_off_with_jitter_and_keeps_the_last_good_set() {
    let ep = localstack();
    let seed = seed(REGION).await;
    let subnet = seed.subnet("198.18.7.0/24").await;
    let u = unique("throttle");
    let tag = [("cluster", u.as_str())];
    seed.instance(&subnet, "198.18.7.11", &tag).await;
    seed.instance(&subnet, "198.18.7.12", &tag).await;

    let proxy = proxy(&ep);
    let mut c = config(&format!("cluster={u}"), &proxy.url());
    c.initial_jitter = Duration::ZERO;
    c.retry = Retry {
        attempts: 3,
        min_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(2),
    };
    let d = AwsDiscovery::new(c, ctx("198.18.7.100", "198.18.7.0/24")).expect("config");
    let refresh = Refresh {
        interval: Duration::from_millis(300),
        initial_jitter: Duration::ZERO,
        min_backoff: Duration::from_millis(200),
    };
    let (tx, mut rx) = watch::channel(Snapshot::default());
    let task = tokio::spawn(d.watch(refresh, tx, Arc::new(NoObserver)));
    let want = parse_ips(&["198.18.7.11", "198.18.7.12"]);
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| s.refreshes >= 1))
        .await
        .expect("first refresh within 20 s")
        .expect("loop alive");

    // Five throttled answers: a round of three attempts fails, the next succeeds on its third.
    let before = proxy.seen().len();
    let good = rx.borrow().refreshes;
    proxy.faults.store(5, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = rx.borrow().clone();
        let got: Vec<_> = s.candidates.iter().map(|c| c.ip).collect();
        assert_eq!(got, want, "the published set never changes while throttled");
        if proxy.faults.load(Ordering::SeqCst) == 0 && s.refreshes > good {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();

    let seen = proxy.seen();
    let burst = &seen[before..before + 6];
    assert_eq!(
        burst.iter().map(|s| s.faulted).collect::<Vec<_>>(),
        [true, true, true, true, true, false]
    );
    let gaps: Vec<Duration> = burst.windows(2).map(|w| w[1].at - w[0].at).collect();
    // Pauses are half the backoff plus jitter: retries within a round wait >= 100 ms, then
    // >= 200 ms; the refresh loop waits >= 100 ms before the next round.
    let floors = [100, 200, 100, 100, 200];
    for (g, floor) in gaps.iter().zip(floors) {
        assert!(
            *g >= Duration::from_millis(floor),
            "gaps {gaps:?} must be at least {floors:?} ms"
        );
    }
}

#[tokio::test]
async fn a_throttled_round_fails_as_throttled_and_an_auth_failure_names_the_permission() {
    let ep = localstack();
    let proxy = proxy(&ep);
    let mut c = config("cluster=unused", &proxy.url());
    c.retry = Retry {
        attempts: 2,
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(100),
    };
    let d = AwsDiscovery::new(c, ctx("198.18.8.1", "198.18.8.0/24")).expect("config");

    proxy.faults.store(2, Ordering::SeqCst);
    let e = d.discover().await.expect_err("throttled twice");
    assert!(matches!(e, DiscoveryError::Throttled { .. }), "{e:?}");
    assert!(e.to_string().contains("RequestLimitExceeded"), "{e}");
    assert!(e.is_transient());

    *proxy.fault.lock().expect("lock") = (
        "403 Forbidden",
        error_xml(
            "UnauthorizedOperation",
            "You are not authorized to perform this operation.",
        ),
    );
    proxy.faults.store(1, Ordering::SeqCst);
    let n = proxy.seen().len();
    let e = d.discover().await.expect_err("unauthorised");
    assert!(matches!(e, DiscoveryError::Unauthorized { .. }), "{e:?}");
    assert!(e.to_string().contains("ec2:DescribeInstances"), "{e}");
    assert!(!e.is_transient());
    assert_eq!(
        proxy.seen().len(),
        n + 1,
        "an authorisation failure is not retried"
    );

    // A 500 is retried: the second attempt reaches LocalStack and succeeds.
    *proxy.fault.lock().expect("lock") = (
        "500 Internal Server Error",
        error_xml("InternalError", "An internal error has occurred."),
    );
    proxy.faults.store(1, Ordering::SeqCst);
    let r = d
        .discover()
        .await
        .unwrap_or_else(|e| panic!("not retried after a 500: {e}\n{:#?}", proxy.seen()));
    assert!(r.candidates.is_empty());
}

#[tokio::test]
async fn bad_flags_are_refused_with_the_fix() {
    let c = ctx("198.18.9.1", "198.18.9.0/24");
    let e = AwsDiscovery::new(AwsConfig::new(""), c.clone()).unwrap_err();
    assert!(e.to_string().contains("--aws_tags is required"), "{e}");
    let mut cfg = AwsConfig::new("cluster=prod");
    cfg.endpoint = Some("localhost:4566".into());
    let e = AwsDiscovery::new(cfg, c).unwrap_err();
    assert!(e.to_string().contains("http://"), "{e}");
}

#[tokio::test]
async fn the_region_comes_from_the_imds_identity_document() {
    let ep = localstack();
    let region = "eu-west-3";
    let seed = seed(region).await;
    let subnet = seed.subnet("198.18.10.0/24").await;
    let u = unique("imds");
    seed.instance(&subnet, "198.18.10.11", &[("cluster", &u)])
        .await;
    let imds = FakeImds::start(region).expect("imds");

    // No flag and no AWS_REGION: the injected environment points IMDS at the fake, so this
    // needs no child process with another environment.
    let mut c = AwsConfig::new(format!("cluster={u}"));
    c.endpoint = Some(ep);
    c.env = AwsEnv::from_pairs([(METADATA_ENDPOINT_ENV, imds.url().as_str())]);
    let d = AwsDiscovery::new(c, ctx("198.18.10.1", "198.18.10.0/24")).expect("config");
    let r = d.discover().await.expect("discover");
    assert_eq!(ips(&r), parse_ips(&["198.18.10.11"]));
    let log = imds.log();
    assert!(
        log.contains(&"PUT /latest/api/token 200".to_owned()),
        "{log:?}"
    );
    assert!(
        log.contains(&"GET /latest/dynamic/instance-identity/document 200".to_owned()),
        "{log:?}"
    );
}

#[tokio::test]
async fn the_local_zone_comes_from_imds_and_a_bad_one_is_refused() {
    let zone_of = |imds: &FakeImds| {
        let mut c = AwsConfig::new("cluster=unused");
        c.env = AwsEnv::from_pairs([(METADATA_ENDPOINT_ENV, imds.url().as_str())]);
        AwsDiscovery::new(c, ctx("198.18.11.1", "198.18.11.0/24")).expect("config")
    };
    let imds = FakeImds::start_with_zone("eu-west-3", "eu-west-3b").expect("imds");
    let d = zone_of(&imds);
    assert_eq!(d.local_zone().await.as_deref(), Some("eu-west-3b"));
    assert!(
        imds.log()
            .contains(&"GET /latest/meta-data/placement/availability-zone 200".to_owned()),
        "{:?}",
        imds.log()
    );
    // A zone that is not a zone name (control characters, say) is no zone.
    let hostile = FakeImds::start_with_zone("eu-west-3", "eu\u{1b}[2J").expect("imds");
    assert_eq!(zone_of(&hostile).local_zone().await, None);
    // IMDS turned off, or nobody listening: no zone, within a bounded time.
    let mut c = AwsConfig::new("cluster=unused");
    c.env = AwsEnv::from_pairs([("AWS_EC2_METADATA_DISABLED", "true")]);
    let off = AwsDiscovery::new(c, ctx("198.18.11.1", "198.18.11.0/24")).expect("config");
    assert_eq!(off.local_zone().await, None);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let mut c = AwsConfig::new("cluster=unused");
    c.env = AwsEnv::from_pairs([(METADATA_ENDPOINT_ENV, url.as_str())]);
    let gone = AwsDiscovery::new(c, ctx("198.18.11.1", "198.18.11.0/24")).expect("config");
    let started = Instant::now();
    assert_eq!(gone.local_zone().await, None);
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn candidates_carry_their_zone_and_role_and_ipv6_nodes_get_ipv6_addresses() {
    let ep = localstack();
    let (seed, vpc6) = dual_stack_seed(REGION).await;
    let u = unique("v6");
    let (subnet, prefix) = seed.dual_stack_subnet("198.18.12.0/24", &vpc6).await;
    let zone = seed.subnet_zone(&subnet).await;
    let s = seed
        .dual_stack_instance(
            &subnet,
            "198.18.12.11",
            &[("cluster", &u), ("role", "scheduler")],
        )
        .await;
    let w = seed
        .dual_stack_instance(
            &subnet,
            "198.18.12.12",
            &[("cluster", &u), ("role", "worker")],
        )
        .await;
    let tags = format!("cluster={u}");

    // An IPv4 node: the IPv4 addresses, with zone and role.
    let r = discover(config(&tags, &ep), ctx("198.18.12.100", "198.18.12.0/24")).await;
    assert_eq!(ips(&r), parse_ips(&["198.18.12.11", "198.18.12.12"]));
    let by_id = |r: &discovery::Report, id: &str| -> Candidate {
        r.candidates
            .iter()
            .find(|c| c.id.as_deref() == Some(id))
            .cloned()
            .unwrap_or_else(|| panic!("{id} is not a candidate: {r:?}"))
    };
    assert_eq!(by_id(&r, &s).role, Some(Role::Scheduler));
    assert_eq!(by_id(&r, &w).role, Some(Role::Worker));
    assert!(
        r.candidates
            .iter()
            .all(|c| c.zone.as_deref() == Some(zone.as_str())),
        "{r:?}"
    );

    // An IPv6 node inside the subnet's /64: the interfaces' IPv6 addresses.
    let net: std::net::Ipv6Addr = prefix
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("the subnet's /64");
    let mut segments = net.segments();
    segments[7] = 0xffff;
    let node = std::net::Ipv6Addr::from(segments);
    let v6 = discovery::Context::standalone(
        "test",
        Role::Worker,
        node.into(),
        8081,
        Some(prefix.parse().expect("the subnet's /64")),
    );
    let r = discover(config(&tags, &ep), v6).await;
    assert_eq!(r.candidates.len(), 2, "{r:?}");
    assert!(r.candidates.iter().all(|c| c.ip.is_ipv6()), "{r:?}");
    let want = seed.ipv6_of(&[s.clone(), w.clone()]).await;
    assert_eq!(ips(&r), want);
    assert_eq!(by_id(&r, &s).role, Some(Role::Scheduler));
}
