//! The backend's production code against LocalStack's EC2: filters, states, groups, several
//! network interfaces, pagination, the region from IMDSv2, throttling and authorisation errors.
//!
//! `cargo xtask test` starts LocalStack and passes its URL in `LOCALSTACK_ENDPOINT`. LocalStack
//! keeps every instance for its lifetime, so each test tags its instances with its own value
//! and uses its own subnet of the VPC 198.18.0.0/16.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use discovery::{Discover, DiscoveryError, NoObserver, Refresh, Snapshot};
use discovery_aws::{AwsConfig, AwsDiscovery, Retry};
use support::*;
use tokio::sync::watch;

fn config(tags: &str, endpoint: &str) -> AwsConfig {
    let mut c = AwsConfig::new(tags);
    c.region = Some(REGION.into());
    c.endpoint = Some(endpoint.into());
    c
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
    let seed = Seed::new(REGION).await;
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
    let seed = Seed::new(REGION).await;
    let subnet = seed.subnet("198.18.2.0/24").await;
    let elsewhere = seed.subnet("198.18.3.0/24").await;
    let u = unique("state");
    let tag = [("cluster", u.as_str())];
    seed.instance(&subnet, "198.18.2.11", &tag).await;
    seed.instance(&subnet, "198.18.2.12", &tag).await;
    let stopped = seed.instance(&subnet, "198.18.2.13", &tag).await;
    let outside = seed.instance(&elsewhere, "198.18.3.11", &tag).await;
    seed.stop(std::slice::from_ref(&stopped)).await;

    let proxy = FaultProxy::start(&ep).await;
    let d = AwsDiscovery::new(
        config(&format!("cluster={u}"), &proxy.url()),
        ctx("198.18.2.11", "198.18.2.0/24"),
    )
    .expect("config");

    // `node discover`: candidates plus every exclusion with its reason.
    let r = d.discover().await.expect("discover");
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
        reason(&outside).contains("no private IP in --private_ip_selector 198.18.2.0/24"),
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
    let seed = Seed::new(REGION).await;
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
async fn every_private_ip_of_every_interface_inside_the_selector_counts() {
    let ep = localstack();
    let seed = Seed::new(REGION).await;
    let a = seed.subnet("198.18.5.0/24").await;
    let b = seed.subnet("198.18.6.0/24").await;
    let u = unique("eni");
    let tag = [("cluster", u.as_str())];
    let id = seed
        .two_enis((&a, &b), ("198.18.5.11", "198.18.6.11"), &tag)
        .await;

    let tags = format!("cluster={u}");
    let r = discover(config(&tags, &ep), ctx("198.18.0.1", "198.18.0.0/16")).await;
    assert_eq!(ips(&r), parse_ips(&["198.18.5.11", "198.18.6.11"]), "{r:?}");
    assert!(r.candidates.iter().all(|c| c.id.as_deref() == Some(&id)));

    // A narrower selector keeps only the interface inside it.
    let r = discover(config(&tags, &ep), ctx("198.18.6.1", "198.18.6.0/24")).await;
    assert_eq!(ips(&r), parse_ips(&["198.18.6.11"]), "{r:?}");
}

#[tokio::test]
async fn every_page_is_read_past_a_thousand_reservations() {
    let ep = localstack();
    // A region of its own, so the other tests' queries need not wade through these instances.
    let region = "ap-southeast-2";
    let seed = Seed::new(region).await;
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

    let proxy = FaultProxy::start(&ep).await;
    let mut c = config(&format!("cluster={u}"), &proxy.url());
    c.region = Some(region.into());
    // LocalStack takes seconds to render a page of 1000 instances.
    c.call_timeout = Duration::from_secs(120);
    let d = AwsDiscovery::new(c, ctx("198.18.64.1", "198.18.64.0/20")).expect("config");
    let started = Instant::now();
    let r = d.round(false).await.expect("round");
    eprintln!(
        "read {} instances in {:?}",
        r.candidates.len(),
        started.elapsed()
    );
    assert_eq!(r.candidates.len(), N, "every instance on every page");
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
    let seed = Seed::new(REGION).await;
    let subnet = seed.subnet("198.18.7.0/24").await;
    let u = unique("throttle");
    let tag = [("cluster", u.as_str())];
    seed.instance(&subnet, "198.18.7.11", &tag).await;
    seed.instance(&subnet, "198.18.7.12", &tag).await;

    let proxy = FaultProxy::start(&ep).await;
    let mut c = config(&format!("cluster={u}"), &proxy.url());
    c.initial_jitter = Duration::ZERO;
    c.retry = Retry {
        attempts: 3,
        first_backoff: Duration::from_millis(200),
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
    let proxy = FaultProxy::start(&ep).await;
    let mut c = config("cluster=unused", &proxy.url());
    c.retry = Retry {
        attempts: 2,
        first_backoff: Duration::from_millis(50),
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

/// The child half of the IMDS test: runs with IMDS pointed at the fake and no region set.
#[tokio::test]
#[ignore = "run by the_region_comes_from_the_imds_identity_document in a child process"]
async fn imds_child() {
    let ep = std::env::var(ENDPOINT_ENV).expect("endpoint");
    let tags = std::env::var("IMDS_CHILD_TAGS").expect("tags");
    let want = std::env::var("IMDS_CHILD_WANT").expect("want");
    let mut c = AwsConfig::new(tags);
    c.endpoint = Some(ep);
    let r = discover(c, ctx("198.18.10.1", "198.18.10.0/24")).await;
    assert_eq!(ips(&r), parse_ips(&[want.as_str()]));
}

#[tokio::test]
async fn the_region_comes_from_the_imds_identity_document() {
    // Fails with instructions when LocalStack is not set up.
    localstack();
    let region = "eu-west-3";
    let seed = Seed::new(region).await;
    let subnet = seed.subnet("198.18.10.0/24").await;
    let u = unique("imds");
    seed.instance(&subnet, "198.18.10.11", &[("cluster", &u)])
        .await;
    let imds = FakeImds::start(region).await;

    // The fake insists on the IMDSv2 token, as EC2 does.
    let mut s = tokio::net::TcpStream::connect(imds.addr)
        .await
        .expect("imds");
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        b"GET /latest/dynamic/instance-identity/document HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .expect("write");
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut answer)
        .await
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    let exe = std::env::current_exe().expect("test binary");
    let out = tokio::process::Command::new(exe)
        .args(["--ignored", "--exact", "imds_child", "--nocapture"])
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env_remove("AWS_EC2_METADATA_DISABLED")
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url())
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("IMDS_CHILD_TAGS", format!("cluster={u}"))
        .env("IMDS_CHILD_WANT", "198.18.10.11")
        .output()
        .await
        .expect("run the child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the child test did not run:\n{text}"
    );
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
