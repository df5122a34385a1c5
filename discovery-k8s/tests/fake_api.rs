//! The backend's production client code against the Kubernetes API fake, over verified TLS:
//! selectors, pages (published as they arrive), readiness, ports and roles, EndpointSlices,
//! the watch and its failures, node zones (readable or forbidden), this pod's zone, dual-stack
//! pods, RBAC wording and configuration inference.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use discovery::{Context, Discover, DiscoveryError, NoObserver, Refresh, Role, Snapshot};
use discovery_k8s::{ConfigEnv, ConfigSource, K8sDiscovery, K8sError, Settings, Source};
use k8s_fake::{FakeApi, node_in_zone, running_pod};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::watch;

const NS: &str = "builds";
const TOKEN: &str = "sa-token-1";
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));

fn fake() -> FakeApi {
    let f = FakeApi::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("start the fake");
    f.grant(TOKEN, &[NS]);
    f
}

fn ctx() -> Context {
    Context::standalone("t", Role::Worker, LOCAL, 8081, None)
}

/// The in-cluster environment of a pod whose service account lives in `dir`.
fn in_cluster_env(f: &FakeApi, dir: &Path) -> ConfigEnv {
    ConfigEnv {
        service_host: Some(f.addr().ip().to_string()),
        service_port: Some(f.addr().port().to_string()),
        service_account_dir: dir.to_owned(),
        kubeconfig: None,
        home: None,
        pod_name: None,
    }
}

fn settings(source: Source) -> Settings {
    Settings {
        namespace: None,
        source,
        include_not_ready: true,
        page_size: 500,
    }
}

/// A backend configured the way a pod configures it, from a service account mount.
fn backend(f: &FakeApi, dir: &tempfile::TempDir, token: &str, s: Settings) -> Arc<K8sDiscovery> {
    f.write_service_account(dir.path(), token, NS).unwrap();
    K8sDiscovery::new(s, in_cluster_env(f, dir.path()), ctx())
}

fn labels_backend(f: &FakeApi, dir: &tempfile::TempDir, sel: &str) -> Arc<K8sDiscovery> {
    backend(f, dir, TOKEN, settings(Source::Labels(sel.into())))
}

fn ids(r: &discovery::Report) -> BTreeSet<String> {
    r.candidates
        .iter()
        .map(|c| c.id.clone().unwrap_or_default())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| format!("pod/{n}")).collect()
}

fn pod_json(v: serde_json::Value) -> Pod {
    serde_json::from_value(v).unwrap()
}

#[tokio::test]
async fn every_selector_form_picks_the_right_pods() {
    let f = fake();
    f.put_pod(
        NS,
        &running_pod("a", "10.0.0.11", &[("app", "web"), ("tier", "front")]),
    );
    f.put_pod(
        NS,
        &running_pod("b", "10.0.0.12", &[("app", "web"), ("tier", "back")]),
    );
    f.put_pod(NS, &running_pod("c", "10.0.0.13", &[("app", "db")]));
    f.put_pod("other", &running_pod("d", "10.0.0.14", &[("app", "web")]));
    let dir = tempfile::tempdir().unwrap();
    for (sel, want) in [
        ("app=web", &["a", "b"][..]),
        ("app==web", &["a", "b"]),
        ("app!=web", &["c"]),
        ("tier in (front,side)", &["a"]),
        ("tier notin (front)", &["b", "c"]),
        ("tier", &["a", "b"]),
        ("!tier", &["c"]),
        ("app=web,tier notin (back)", &["a"]),
    ] {
        let b = labels_backend(&f, &dir, sel);
        let r = b.discover().await.unwrap();
        assert_eq!(ids(&r), set(want), "selector {sel}");
    }
    let b = labels_backend(&f, &dir, "app in (web");
    let e = b.discover().await.unwrap_err();
    assert!(e.to_string().contains("400"), "{e}");
}

#[tokio::test]
async fn lists_are_paginated_with_limit_and_continue() {
    let f = fake();
    for i in 0..7 {
        f.put_pod(
            NS,
            &running_pod(&format!("p{i}"), &format!("10.0.1.{i}"), &[("app", "x")]),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(Source::Labels("app=x".into()));
    s.page_size = 3;
    let b = backend(&f, &dir, TOKEN, s);
    let r = b.discover().await.unwrap();
    assert_eq!(r.candidates.len(), 7);
    let lists: Vec<String> = f
        .requests()
        .into_iter()
        .filter(|q| q.contains("/pods"))
        .collect();
    assert_eq!(lists.len(), 3, "{lists:?}");
    assert!(lists.iter().all(|q| q.contains("limit=3")), "{lists:?}");
    assert!(!lists[0].contains("continue="), "{lists:?}");
    assert!(
        lists[1..].iter().all(|q| q.contains("continue=")),
        "{lists:?}"
    );
}

#[tokio::test]
async fn not_ready_pending_and_terminating_pods_are_sorted_with_reasons() {
    let f = fake();
    let l = [("app", "x")];
    f.put_pod(NS, &running_pod("ready", "10.0.2.1", &l));
    let mut not_ready = running_pod("not-ready", "10.0.2.2", &l);
    not_ready
        .status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()[0]
        .status = "False".into();
    f.put_pod(NS, &not_ready);
    let mut pending_ip = running_pod("pending-ip", "10.0.2.3", &l);
    pending_ip.status.as_mut().unwrap().phase = Some("Pending".into());
    pending_ip.status.as_mut().unwrap().conditions = None;
    f.put_pod(NS, &pending_ip);
    f.put_pod(
        NS,
        &pod_json(serde_json::json!({
            "metadata": {"name": "pending-no-ip", "labels": {"app": "x"}},
            "status": {"phase": "Pending"},
        })),
    );
    let mut done = running_pod("succeeded", "10.0.2.5", &l);
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    f.put_pod(NS, &done);
    f.put_pod(NS, &running_pod("leaving", "10.0.2.6", &l));
    assert!(f.terminate_pod(NS, "leaving"));
    f.put_pod(NS, &running_pod("me", &LOCAL.to_string(), &l));

    let dir = tempfile::tempdir().unwrap();
    let b = labels_backend(&f, &dir, "app=x");
    let r = b.discover().await.unwrap();
    assert_eq!(ids(&r), set(&["ready", "not-ready", "pending-ip"]));
    let reason = |id: &str| {
        r.excluded
            .iter()
            .find(|x| x.id == format!("pod/{id}"))
            .map(|x| x.reason.clone())
            .unwrap_or_else(|| panic!("{id} not excluded: {r:?}"))
    };
    assert!(reason("pending-no-ip").contains("no podIP"));
    assert!(reason("succeeded").contains("Succeeded"));
    assert!(reason("leaving").contains("deletionTimestamp"));
    assert_eq!(reason("me"), "self");
    assert_eq!(r.excluded.len(), 4);

    let mut s = settings(Source::Labels("app=x".into()));
    s.include_not_ready = false;
    let b = backend(&f, &dir, TOKEN, s);
    let r = b.discover().await.unwrap();
    assert_eq!(ids(&r), set(&["ready"]));
    assert!(
        r.excluded
            .iter()
            .any(|x| x.id == "pod/pending-ip" && x.reason.contains("not ready"))
    );
}

#[tokio::test]
async fn a_named_private_port_and_the_role_label_are_used() {
    let f = fake();
    let mut p = running_pod(
        "s",
        "10.0.3.1",
        &[("app", "x"), ("app.kubernetes.io/component", "scheduler")],
    );
    p.spec.as_mut().unwrap().containers[0].ports = Some(vec![
        serde_json::from_value(serde_json::json!({"name": "private", "containerPort": 7001}))
            .unwrap(),
    ]);
    f.put_pod(NS, &p);
    let dir = tempfile::tempdir().unwrap();
    let r = labels_backend(&f, &dir, "app=x").discover().await.unwrap();
    assert_eq!(r.candidates.len(), 1);
    assert_eq!(r.candidates[0].port, 7001);
    assert_eq!(r.candidates[0].role, Some(Role::Scheduler));
}

#[tokio::test]
async fn a_service_name_reads_its_endpoint_slices() {
    let f = fake();
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "peers-abc", "labels": {"kubernetes.io/service-name": "peers"}},
        "addressType": "IPv4",
        "ports": [{"name": "private", "port": 8081, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.0.4.1"], "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "name": "w1"}, "zone": "zone-x", "nodeName": "n1"},
            {"addresses": ["10.0.4.2"], "conditions": {"ready": false},
             "targetRef": {"kind": "Pod", "name": "w2"}},
            {"addresses": ["10.0.4.3"], "conditions": {"ready": false, "terminating": true},
             "targetRef": {"kind": "Pod", "name": "w3"}},
        ],
    }))
    .unwrap();
    f.put_endpoint_slice(NS, &slice);
    let other: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "else-xyz", "labels": {"kubernetes.io/service-name": "else"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.5.1"]}],
    }))
    .unwrap();
    f.put_endpoint_slice(NS, &other);
    // The Service's IPv6 slice (dual-stack): not this IPv4 node's family.
    let v6: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "peers-v6", "labels": {"kubernetes.io/service-name": "peers"}},
        "addressType": "IPv6",
        "endpoints": [{"addresses": ["2001:2::41"], "targetRef": {"kind": "Pod", "name": "w1"}}],
    }))
    .unwrap();
    f.put_endpoint_slice(NS, &v6);
    let dir = tempfile::tempdir().unwrap();
    let b = backend(&f, &dir, TOKEN, settings(Source::Service("peers".into())));
    let r = b.discover().await.unwrap();
    assert_eq!(ids(&r), set(&["w1", "w2"]));
    // The slice's own zone is used; no node is read for it.
    let w1 = r.candidates.iter().find(|c| c.ip.to_string() == "10.0.4.1");
    assert_eq!(w1.unwrap().zone.as_deref(), Some("zone-x"));
    assert!(
        r.excluded
            .iter()
            .any(|x| x.id == "endpointslice/peers-v6" && x.reason.contains("addressType IPv6")),
        "{r:?}"
    );
    assert!(
        r.excluded
            .iter()
            .any(|x| x.id == "pod/w3" && x.reason.contains("terminating"))
    );
    assert!(
        f.requests().iter().any(|q| q
            .starts_with("/apis/discovery.k8s.io/v1/namespaces/builds/endpointslices?")
            && q.contains("kubernetes.io%2Fservice-name%3Dpeers")),
        "{:?}",
        f.requests()
    );
}

async fn wait_for(
    rx: &mut watch::Receiver<Snapshot>,
    within: Duration,
    what: &str,
    ok: impl Fn(&Snapshot) -> bool,
) -> Duration {
    let start = Instant::now();
    let seen = matches!(
        tokio::time::timeout(within, rx.wait_for(|s| ok(s))).await,
        Ok(Ok(_))
    );
    assert!(
        seen,
        "{what}: not seen within {within:?}; last {:?}",
        *rx.borrow()
    );
    start.elapsed()
}

fn has(s: &Snapshot, ip: &str) -> bool {
    s.candidates.iter().any(|c| c.ip.to_string() == ip)
}

#[tokio::test]
async fn the_watch_follows_pod_changes_within_a_second() {
    let f = fake();
    f.put_pod(NS, &running_pod("a", "10.0.6.1", &[("app", "x")]));
    let dir = tempfile::tempdir().unwrap();
    let b = labels_backend(&f, &dir, "app=x");
    let (tx, mut rx) = watch::channel(Snapshot::default());
    // A refresh interval far longer than the test, so only the watch can explain updates.
    let refresh = Refresh {
        interval: Duration::from_secs(600),
        ..Refresh::default()
    };
    let task = tokio::spawn(b.clone().watch(refresh, tx, Arc::new(NoObserver)));
    wait_for(&mut rx, Duration::from_secs(10), "initial list", |s| {
        has(s, "10.0.6.1")
    })
    .await;

    f.put_pod(NS, &running_pod("b", "10.0.6.2", &[("app", "x")]));
    let took = wait_for(&mut rx, Duration::from_secs(1), "added pod", |s| {
        has(s, "10.0.6.2")
    })
    .await;
    assert!(took < Duration::from_secs(1));
    eprintln!("an added pod reached the candidate set after {took:?}");

    // A pod that loses the label leaves the selection (the server sends DELETED).
    f.put_pod(NS, &running_pod("a", "10.0.6.1", &[("app", "y")]));
    wait_for(&mut rx, Duration::from_secs(1), "relabelled pod", |s| {
        !has(s, "10.0.6.1")
    })
    .await;

    assert!(f.terminate_pod(NS, "b"));
    wait_for(&mut rx, Duration::from_secs(1), "terminating pod", |s| {
        !has(s, "10.0.6.2")
    })
    .await;

    f.put_pod(NS, &running_pod("c", "10.0.6.3", &[("app", "x")]));
    wait_for(&mut rx, Duration::from_secs(1), "third pod", |s| {
        has(s, "10.0.6.3")
    })
    .await;
    assert!(f.delete_pod(NS, "c"));
    wait_for(&mut rx, Duration::from_secs(1), "deleted pod", |s| {
        !has(s, "10.0.6.3")
    })
    .await;
    let watches = f
        .requests()
        .iter()
        .filter(|q| q.contains("watch=true"))
        .count();
    assert!(watches >= 1);
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the watch loop ends once nobody listens")
        .unwrap();
}

#[tokio::test]
async fn without_watch_permission_it_falls_back_to_listing() {
    let f = FakeApi::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
    f.grant_without_watch(TOKEN, &[NS]);
    f.put_pod(NS, &running_pod("a", "10.0.7.1", &[("app", "x")]));
    let dir = tempfile::tempdir().unwrap();
    let b = labels_backend(&f, &dir, "app=x");
    let (tx, mut rx) = watch::channel(Snapshot::default());
    let refresh = Refresh {
        interval: Duration::from_millis(300),
        ..Refresh::default()
    };
    let task = tokio::spawn(b.clone().watch(refresh, tx, Arc::new(NoObserver)));
    wait_for(&mut rx, Duration::from_secs(10), "initial list", |s| {
        has(s, "10.0.7.1")
    })
    .await;
    f.put_pod(NS, &running_pod("b", "10.0.7.2", &[("app", "x")]));
    wait_for(&mut rx, Duration::from_secs(5), "listed again", |s| {
        has(s, "10.0.7.2")
    })
    .await;
    // The forbidden watch never cleared the set.
    assert!(has(&rx.borrow(), "10.0.7.1"));
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_watch_that_expires_lists_again_and_keeps_going() {
    let f = fake();
    f.put_pod(NS, &running_pod("a", "10.0.8.1", &[("app", "x")]));
    let dir = tempfile::tempdir().unwrap();
    let b = labels_backend(&f, &dir, "app=x");
    let (tx, mut rx) = watch::channel(Snapshot::default());
    let task = tokio::spawn(
        b.clone()
            .watch(Refresh::default(), tx, Arc::new(NoObserver)),
    );
    wait_for(&mut rx, Duration::from_secs(10), "initial", |s| {
        has(s, "10.0.8.1")
    })
    .await;
    // The watch closes and may only resume from a compacted resourceVersion: 410 Gone.
    f.restart_with_change(NS, &running_pod("b", "10.0.8.2", &[("app", "x")]));
    wait_for(&mut rx, Duration::from_secs(2), "after the 410", |s| {
        has(s, "10.0.8.2") && has(s, "10.0.8.1")
    })
    .await;
    let lists = f
        .requests()
        .iter()
        .filter(|q| q.contains("/pods") && !q.contains("watch=true"))
        .count();
    assert!(lists >= 2, "no list after the 410: {:?}", f.requests());
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

fn pod_lists(f: &FakeApi) -> usize {
    f.requests()
        .iter()
        .filter(|q| q.contains("/pods") && !q.contains("watch=true"))
        .count()
}

#[tokio::test]
async fn a_server_that_keeps_answering_410_is_listed_with_a_growing_backoff() {
    let f = fake();
    f.put_pod(NS, &running_pod("a", "10.0.9.1", &[("app", "x")]));
    f.always_expire_watches(true);
    let dir = tempfile::tempdir().unwrap();
    let b = labels_backend(&f, &dir, "app=x");
    let (tx, mut rx) = watch::channel(Snapshot::default());
    let task = tokio::spawn(
        b.clone()
            .watch(Refresh::default(), tx, Arc::new(NoObserver)),
    );
    wait_for(&mut rx, Duration::from_secs(10), "initial", |s| {
        has(s, "10.0.9.1")
    })
    .await;
    let first = pod_lists(&f);
    tokio::time::sleep(Duration::from_secs(4)).await;
    // A fixed pause of at most 125 ms made 30 or more lists in 4 s. Doubling from 62-125 ms,
    // even the shortest pauses (62, 125, 250, 500, 1000, 2000 ms) allow at most 7.
    let lists = pod_lists(&f) - first;
    assert!(
        (2..=8).contains(&lists),
        "{lists} lists in 4 s against a server answering every watch with 410"
    );
    assert!(has(&rx.borrow(), "10.0.9.1"), "the set was kept");

    // Once watches work again, a watch that delivered events resets the backoff: the next 410
    // is followed by a quick relist.
    f.always_expire_watches(false);
    f.put_pod(NS, &running_pod("b", "10.0.9.2", &[("app", "x")]));
    wait_for(&mut rx, Duration::from_secs(15), "watching again", |s| {
        has(s, "10.0.9.2")
    })
    .await;
    // `b` came with a list made after watches were fixed, so this one arrives as a watch event.
    f.put_pod(NS, &running_pod("c", "10.0.9.3", &[("app", "x")]));
    wait_for(&mut rx, Duration::from_secs(2), "watched pod", |s| {
        has(s, "10.0.9.3")
    })
    .await;
    let before = pod_lists(&f);
    // The resumed watch must meet a 410 even when the change reached it as an event first
    // (then its resourceVersion is not yet compacted away): expire watches for this step.
    f.always_expire_watches(true);
    f.restart_with_change(NS, &running_pod("d", "10.0.9.4", &[("app", "x")]));
    wait_for(
        &mut rx,
        Duration::from_secs(1),
        "relist after one 410",
        |s| has(s, "10.0.9.4"),
    )
    .await;
    // `d` reaches the set only through the relist that follows the 410, within the second.
    let relisted = tokio::time::timeout(Duration::from_secs(1), async {
        while pod_lists(&f) <= before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(relisted.is_ok(), "no relist within 1 s of one 410");
    f.always_expire_watches(false);
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn auth_failures_name_the_rbac_rule() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let b = backend(
        &f,
        &dir,
        "wrong-token",
        settings(Source::Labels("app=x".into())),
    );
    let e = b.discover().await.unwrap_err();
    assert!(matches!(e, DiscoveryError::Unauthorized { .. }), "{e}");
    assert!(!e.is_transient());
    let msg = e.to_string();
    assert!(msg.contains("401") && msg.contains("\"pods\""), "{msg}");

    let mut s = settings(Source::Labels("app=x".into()));
    s.namespace = Some("kube-system".into());
    let b = backend(&f, &dir, TOKEN, s);
    let e = b.discover().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DiscoveryError::Unauthorized { .. }), "{msg}");
    assert!(
        msg.contains("403")
            && msg.contains("kube-system")
            && msg.contains("\"get\", \"list\", \"watch\"")
            && msg.contains("RoleBinding"),
        "{msg}"
    );

    let b = backend(&f, &dir, TOKEN, {
        let mut s = settings(Source::Service("peers".into()));
        s.namespace = Some("kube-system".into());
        s
    });
    let msg = b.discover().await.unwrap_err().to_string();
    assert!(
        msg.contains("endpointslices") && msg.contains("discovery.k8s.io"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let f = fake();
    let other = FakeApi::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The mount holds the other server's CA, so the handshake with `f` must fail.
    other.write_service_account(dir.path(), TOKEN, NS).unwrap();
    let b = K8sDiscovery::new(
        settings(Source::Labels("app=x".into())),
        in_cluster_env(&f, dir.path()),
        ctx(),
    );
    let e = b.discover().await.unwrap_err();
    assert!(matches!(e, DiscoveryError::Unreachable { .. }), "{e}");
    assert!(e.is_transient());
    assert!(f.requests().is_empty());
}

#[tokio::test]
async fn in_cluster_configuration_comes_from_the_service_account_files() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    f.write_service_account(dir.path(), TOKEN, NS).unwrap();
    let env = in_cluster_env(&f, dir.path());
    let (config, source) = discovery_k8s::config::infer(&env).await.unwrap();
    assert_eq!(source, ConfigSource::InCluster);
    assert_eq!(config.default_namespace, NS);
    // The namespace defaults to the service account's.
    f.put_pod(NS, &running_pod("a", "10.0.9.1", &[("app", "x")]));
    let b = K8sDiscovery::new(settings(Source::Labels("app=x".into())), env, ctx());
    assert_eq!(b.discover().await.unwrap().candidates.len(), 1);
    assert!(f.requests()[0].starts_with("/api/v1/namespaces/builds/pods"));

    // A missing token names the file.
    std::fs::remove_file(dir.path().join("token")).unwrap();
    let e = discovery_k8s::config::in_cluster(&in_cluster_env(&f, dir.path()))
        .await
        .unwrap_err();
    assert!(
        matches!(e, K8sError::ServiceAccountFile { what: "token", .. }),
        "{e}"
    );
}

#[tokio::test]
async fn a_kubeconfig_is_used_outside_a_pod() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config");
    f.write_kubeconfig(&path, TOKEN, NS).unwrap();
    let env = ConfigEnv {
        service_host: None,
        service_port: None,
        service_account_dir: dir.path().join("absent"),
        kubeconfig: Some(path.clone().into_os_string()),
        home: None,
        pod_name: None,
    };
    let (config, source) = discovery_k8s::config::infer(&env).await.unwrap();
    assert_eq!(source, ConfigSource::Kubeconfig);
    assert_eq!(config.default_namespace, NS);
    f.put_pod(NS, &running_pod("a", "10.0.10.1", &[("app", "x")]));
    let b = K8sDiscovery::new(settings(Source::Labels("app=x".into())), env, ctx());
    assert_eq!(b.discover().await.unwrap().candidates.len(), 1);

    // ~/.kube/config is the fallback when KUBECONFIG is unset.
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join(".kube")).unwrap();
    std::fs::copy(&path, home.path().join(".kube/config")).unwrap();
    let env = ConfigEnv {
        kubeconfig: None,
        home: Some(home.path().to_owned()),
        service_account_dir: dir.path().join("absent"),
        ..ConfigEnv::default()
    };
    let (_, source) = discovery_k8s::config::infer(&env).await.unwrap();
    assert_eq!(source, ConfigSource::Kubeconfig);
}

#[tokio::test]
async fn when_every_source_fails_both_causes_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let env = ConfigEnv {
        service_host: Some("127.0.0.1".into()),
        service_port: Some("6443".into()),
        service_account_dir: dir.path().join("no-mount"),
        kubeconfig: Some(dir.path().join("missing-config").into_os_string()),
        home: None,
        pod_name: None,
    };
    let e = discovery_k8s::config::infer(&env).await.unwrap_err();
    let K8sError::NoConfig {
        in_cluster,
        kubeconfig,
    } = &e
    else {
        panic!("{e}");
    };
    assert!(matches!(**in_cluster, K8sError::ServiceAccountFile { .. }));
    assert!(matches!(**kubeconfig, K8sError::KubeconfigFile { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("no-mount") && msg.contains("missing-config") && msg.contains("KUBECONFIG"),
        "{msg}"
    );
    // Through the backend, the same message arrives as a configuration error.
    let b = K8sDiscovery::new(settings(Source::Labels("app=x".into())), env, ctx());
    let e = b.discover().await.unwrap_err();
    assert!(matches!(e, DiscoveryError::Config(_)), "{e}");
}

#[test]
fn flags_must_name_exactly_one_source() {
    let e = Settings::from_flags(None, None, None, true).unwrap_err();
    assert!(e.to_string().contains("--k8s_label_selector"), "{e}");
    let e = Settings::from_flags(None, Some("a=b".into()), Some("svc".into()), true).unwrap_err();
    assert!(e.to_string().contains("alternatives"), "{e}");
    let e =
        Settings::from_flags(Some("Bad_NS".into()), Some("a=b".into()), None, true).unwrap_err();
    assert!(e.to_string().contains("--k8s_namespace"), "{e}");
    let s = Settings::from_flags(None, None, Some("peers".into()), false).unwrap();
    assert_eq!(s.source, Source::Service("peers".into()));
}

/// `running_pod` scheduled on `node`.
fn pod_on(name: &str, ip: &str, node: &str) -> Pod {
    let mut p = running_pod(name, ip, &[("app", "x")]);
    p.spec.as_mut().unwrap().node_name = Some(node.into());
    p
}

fn node_reads(f: &FakeApi) -> usize {
    f.requests()
        .iter()
        .filter(|q| q.starts_with("/api/v1/nodes/"))
        .count()
}

#[tokio::test]
async fn candidates_carry_their_nodes_zone_when_nodes_may_be_read() {
    let f = fake();
    f.grant_nodes(TOKEN);
    f.put_node(&node_in_zone("n1", Some("zone-a")));
    f.put_node(&node_in_zone("n2", Some("zone-b")));
    f.put_node(&node_in_zone("n3", None));
    // A zone label that is not a label value (a lying API server) is dropped.
    f.put_node(&node_in_zone("n4", Some("zone\nMember 10.9.9.9")));
    f.put_pod(NS, &pod_on("a", "10.0.11.1", "n1"));
    f.put_pod(NS, &pod_on("b", "10.0.11.2", "n2"));
    f.put_pod(NS, &pod_on("c", "10.0.11.3", "n1"));
    f.put_pod(NS, &pod_on("d", "10.0.11.4", "n3"));
    f.put_pod(NS, &pod_on("e", "10.0.11.5", "gone"));
    f.put_pod(NS, &pod_on("f", "10.0.11.6", "n4"));
    // A node name that is not one is never put into a request path.
    f.put_pod(NS, &pod_on("g", "10.0.11.7", "../pods/a"));
    let dir = tempfile::tempdir().unwrap();
    let b = labels_backend(&f, &dir, "app=x");
    let zones = |r: &discovery::Report| -> Vec<(String, Option<String>)> {
        r.candidates
            .iter()
            .map(|c| (c.id.clone().unwrap(), c.zone.clone()))
            .collect()
    };
    let want: Vec<(String, Option<String>)> = [
        ("pod/a", Some("zone-a")),
        ("pod/b", Some("zone-b")),
        ("pod/c", Some("zone-a")),
        ("pod/d", None),
        ("pod/e", None),
        ("pod/f", None),
        ("pod/g", None),
    ]
    .iter()
    .map(|(p, z)| (p.to_string(), z.map(str::to_owned)))
    .collect();
    assert_eq!(zones(&b.discover().await.unwrap()), want);
    // One read per valid node name, including the missing node.
    assert_eq!(node_reads(&f), 5, "{:?}", f.requests());
    assert!(!f.requests().iter().any(|q| q.contains("..")));
    // The zones are cached: the next round reads no node.
    assert_eq!(zones(&b.discover().await.unwrap()), want);
    assert_eq!(node_reads(&f), 5);
}

#[tokio::test]
async fn forbidden_nodes_cost_one_request_and_discovery_goes_on_without_zones() {
    let f = fake();
    f.put_node(&node_in_zone("n1", Some("zone-a")));
    f.put_node(&node_in_zone("n2", Some("zone-b")));
    f.put_pod(NS, &pod_on("a", "10.0.12.1", "n1"));
    f.put_pod(NS, &pod_on("b", "10.0.12.2", "n2"));
    let dir = tempfile::tempdir().unwrap();
    let b = labels_backend(&f, &dir, "app=x");
    for _ in 0..3 {
        let r = b.discover().await.unwrap();
        assert_eq!(ids(&r), set(&["a", "b"]));
        assert!(r.candidates.iter().all(|c| c.zone.is_none()), "{r:?}");
    }
    assert_eq!(node_reads(&f), 1, "{:?}", f.requests());
}

#[tokio::test]
async fn the_fake_answers_node_and_pod_reads_as_the_api_server_does() {
    let f = fake();
    f.put_node(&node_in_zone("n1", Some("europe-west1-b")));
    f.put_pod(NS, &pod_on("a", "10.0.13.1", "n1"));
    let dir = tempfile::tempdir().unwrap();
    f.write_service_account(dir.path(), TOKEN, NS).unwrap();
    let (config, _) = discovery_k8s::config::infer(&in_cluster_env(&f, dir.path()))
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    let kube::Error::Api(st) = nodes.get("n1").await.unwrap_err() else {
        panic!("not a Status");
    };
    assert_eq!((st.code, st.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        st.message,
        "nodes \"n1\" is forbidden: User \"system:serviceaccount:builds:cluster-start\" cannot get resource \"nodes\" in API group \"\" at the cluster scope"
    );
    f.grant_nodes(TOKEN);
    let n = nodes.get("n1").await.unwrap();
    assert_eq!(
        n.metadata.labels.unwrap()["topology.kubernetes.io/zone"],
        "europe-west1-b"
    );
    assert!(n.metadata.resource_version.is_some());
    assert!(nodes.get_opt("n9").await.unwrap().is_none());
    let pods: kube::Api<Pod> = kube::Api::namespaced(client, NS);
    let p = pods.get("a").await.unwrap();
    assert_eq!(p.spec.unwrap().node_name.as_deref(), Some("n1"));
    let kube::Error::Api(st) = pods.get("zz").await.unwrap_err() else {
        panic!("not a Status");
    };
    assert_eq!((st.code, st.reason.as_str()), (404, "NotFound"));
    assert_eq!(st.message, "pods \"zz\" not found");
}

#[tokio::test]
async fn the_local_zone_is_this_pods_nodes_zone() {
    let f = fake();
    f.put_node(&node_in_zone("n1", Some("zone-c")));
    f.put_pod(NS, &pod_on("me", "10.0.14.1", "n1"));
    let dir = tempfile::tempdir().unwrap();
    f.write_service_account(dir.path(), TOKEN, NS).unwrap();
    let env = |pod: Option<&str>| ConfigEnv {
        pod_name: pod.map(str::to_owned),
        ..in_cluster_env(&f, dir.path())
    };
    let s = || settings(Source::Labels("app=x".into()));
    // Nodes not readable: no zone, and no error.
    let b = K8sDiscovery::new(s(), env(Some("me")), ctx());
    assert_eq!(b.local_zone().await, None);
    f.grant_nodes(TOKEN);
    let b = K8sDiscovery::new(s(), env(Some("me")), ctx());
    assert_eq!(b.local_zone().await.as_deref(), Some("zone-c"));
    assert!(
        f.requests()
            .iter()
            .any(|q| q == "/api/v1/namespaces/builds/pods/me"),
        "{:?}",
        f.requests()
    );
    // No pod name, or a pod that is not there: no zone.
    let b = K8sDiscovery::new(s(), env(None), ctx());
    assert_eq!(b.local_zone().await, None);
    let b = K8sDiscovery::new(s(), env(Some("someone-else")), ctx());
    assert_eq!(b.local_zone().await, None);
    // A name that is not a pod name never reaches a request path.
    let before = f.requests().len();
    let b = K8sDiscovery::new(s(), env(Some("../nodes/n1")), ctx());
    assert_eq!(b.local_zone().await, None);
    assert_eq!(f.requests().len(), before, "{:?}", f.requests());
}

#[tokio::test]
async fn the_first_list_publishes_each_page_before_the_last_is_served() {
    let f = fake();
    for i in 0..5 {
        f.put_pod(
            NS,
            &running_pod(
                &format!("p{i}"),
                &format!("10.0.15.{}", i + 1),
                &[("app", "x")],
            ),
        );
    }
    // Every page after the first takes 1.5 s: the third one is served after 3 s.
    f.delay_continued_lists(Duration::from_millis(1500));
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(Source::Labels("app=x".into()));
    s.page_size = 2;
    let b = backend(&f, &dir, TOKEN, s);
    let (tx, mut rx) = watch::channel(Snapshot::default());
    let refresh = Refresh {
        interval: Duration::from_secs(600),
        ..Refresh::default()
    };
    let started = Instant::now();
    let task = tokio::spawn(b.clone().watch(refresh, tx, Arc::new(NoObserver)));
    wait_for(&mut rx, Duration::from_secs(10), "the first page", |s| {
        !s.candidates.is_empty()
    })
    .await;
    let first = started.elapsed();
    let snap = rx.borrow().clone();
    let continued = f
        .requests()
        .iter()
        .filter(|q| q.contains("continue="))
        .count();
    assert_eq!(snap.candidates.len(), 2, "{snap:?}");
    assert_eq!(snap.refreshes, 0, "the list is not complete yet");
    assert_eq!(
        continued, 0,
        "a later page was served before the first was published"
    );
    assert!(first < Duration::from_millis(1500), "{first:?}");
    wait_for(&mut rx, Duration::from_secs(10), "the whole list", |s| {
        s.refreshes >= 1 && s.candidates.len() == 5
    })
    .await;
    eprintln!(
        "first page published after {first:?}, the whole list after {:?}",
        started.elapsed()
    );
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn an_ipv6_node_finds_dual_stack_pods_at_their_ipv6_pod_ips() {
    let f = fake();
    let dual = |name: &str, v4: &str, v6: &str| {
        let mut p = running_pod(name, v4, &[("app", "x")]);
        p.status.as_mut().unwrap().pod_ips = Some(vec![
            serde_json::from_value(serde_json::json!({"ip": v4})).unwrap(),
            serde_json::from_value(serde_json::json!({"ip": v6})).unwrap(),
        ]);
        p
    };
    f.put_pod(NS, &dual("me", "10.0.16.1", "2001:2:0:16::1"));
    f.put_pod(NS, &dual("a", "10.0.16.2", "2001:2:0:16::2"));
    f.put_pod(NS, &dual("b", "10.0.16.3", "2001:2:0:16::3"));
    f.put_pod(NS, &running_pod("v4-only", "10.0.16.4", &[("app", "x")]));
    let dir = tempfile::tempdir().unwrap();
    f.write_service_account(dir.path(), TOKEN, NS).unwrap();
    // The pod's own selector is its /32 (/128): it must not exclude the peers.
    let ctx6 = Context::standalone(
        "t",
        Role::Worker,
        "2001:2:0:16::1".parse().unwrap(),
        8081,
        Some("2001:2:0:16::1/128".parse().unwrap()),
    );
    let b = K8sDiscovery::new(
        settings(Source::Labels("app=x".into())),
        in_cluster_env(&f, dir.path()),
        ctx6,
    );
    let r = b.discover().await.unwrap();
    let ips: BTreeSet<String> = r.candidates.iter().map(|c| c.ip.to_string()).collect();
    assert_eq!(
        ips,
        BTreeSet::from(["2001:2:0:16::2".to_owned(), "2001:2:0:16::3".to_owned()])
    );
    let reason = |id: &str| {
        r.excluded
            .iter()
            .find(|x| x.id == id)
            .map(|x| x.reason.clone())
    };
    assert_eq!(reason("pod/me").as_deref(), Some("self"));
    assert_eq!(
        reason("pod/v4-only").as_deref(),
        Some("no IPv6 address (has 10.0.16.4)")
    );
}
