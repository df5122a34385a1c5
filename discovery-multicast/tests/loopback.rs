//! The backend end to end on loopback (`--multicast_loopback`): two nodes on one host find each
//! other, garbage on the group is dropped and counted, and a silent peer expires.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use discovery::{Context, Discover, NoObserver, Refresh, Role, Snapshot};
use discovery_multicast::{MulticastConfig, MulticastDiscovery};
use tokio::sync::watch;

fn cfg(port: u16) -> MulticastConfig {
    MulticastConfig {
        group: Ipv4Addr::new(239, 255, 77, 3),
        port,
        loopback: true,
        listen_window: Duration::from_millis(2500),
        ..MulticastConfig::default()
    }
}

fn node(cluster: &str, private_port: u16, group_port: u16) -> Arc<MulticastDiscovery> {
    let ctx = Context::standalone(
        cluster,
        Role::Worker,
        "127.0.0.1".parse().unwrap(),
        private_port,
        Some("127.0.0.0/8".parse().unwrap()),
    );
    Arc::new(MulticastDiscovery::new(cfg(group_port), ctx).unwrap())
}

async fn until(rx: &mut watch::Receiver<Snapshot>, pred: impl Fn(&Snapshot) -> bool) -> bool {
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if pred(&rx.borrow_and_update()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await
    .is_ok()
        && pred(&rx.borrow())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_host_find_each_other_ignore_garbage_and_expire() {
    let port = 54401;
    // Names unique to this run, so a concurrent run on the same host is another cluster.
    let (blue, red) = (
        format!("blue-{}", std::process::id()),
        format!("red-{}", std::process::id()),
    );
    let a = node(&blue, 8081, port);
    let b = node(&blue, 8082, port);
    let other = node(&red, 8083, port);
    let (atx, mut arx) = watch::channel(Snapshot::default());
    let (btx, mut brx) = watch::channel(Snapshot::default());
    let (otx, orx) = watch::channel(Snapshot::default());
    let refresh = Refresh::default();
    tokio::spawn(a.clone().watch(refresh.clone(), atx, Arc::new(NoObserver)));
    let b_task = tokio::spawn(b.clone().watch(refresh.clone(), btx, Arc::new(NoObserver)));
    tokio::spawn(other.clone().watch(refresh, otx, Arc::new(NoObserver)));

    let has = |port: u16| move |s: &Snapshot| s.candidates.iter().any(|c| c.port == port);
    assert!(until(&mut arx, has(8082)).await, "a never heard b");
    assert!(until(&mut brx, has(8081)).await, "b never heard a");
    assert_eq!(
        arx.borrow().candidates.len(),
        1,
        "red must not be a candidate"
    );
    assert_eq!(arx.borrow().candidates[0].role, Some(Role::Worker));
    // Red announces on its own schedule; a hears it within a few of its intervals.
    let heard_red = tokio::time::timeout(Duration::from_secs(10), async {
        while a.stats().foreign_cluster == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(heard_red.is_ok(), "a never heard red: {:?}", a.stats());
    assert_eq!(
        arx.borrow().candidates.len(),
        1,
        "red must not be a candidate"
    );
    assert!(orx.borrow().candidates.is_empty());

    // Garbage, oversized and truncated datagrams on the group change nothing.
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket2::SockRef::from(&sender)
        .set_multicast_if_v4(&Ipv4Addr::LOCALHOST)
        .unwrap();
    let group = SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 3), port);
    let valid = a.announcement(Duration::from_secs(1)).encode().unwrap();
    for i in 0..2000usize {
        let junk: Vec<u8> = match i % 3 {
            0 => (0..(i % 300)).map(|j| (i * 31 + j) as u8).collect(),
            1 => vec![0x41; 4000],
            _ => valid[..i % valid.len()].to_vec(),
        };
        let _ = sender.send_to(&junk, group);
        if i % 20 == 0 {
            // Paced, so the kernel's receive buffer does not overflow and drop them first.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = a.stats();
    assert!(s.malformed + s.oversized >= 1000, "{s:?}");
    assert_eq!(arx.borrow().candidates.len(), 1);

    // A one-shot round hears both and names what it skipped.
    let probe = node(&blue, 8090, port);
    let report = probe.discover().await.unwrap();
    let ports: Vec<u16> = report.candidates.iter().map(|c| c.port).collect();
    assert!(ports.contains(&8081) && ports.contains(&8082), "{report:?}");
    assert!(
        report
            .excluded
            .iter()
            .any(|x| x.reason.contains(&format!("`{red}`"))),
        "{report:?}"
    );

    // b stops: a forgets it after b's announcements are missed (1 s interval: 3.5 s).
    drop(brx);
    let _ = tokio::time::timeout(Duration::from_secs(5), b_task).await;
    assert!(
        until(&mut arx, |s| s.candidates.is_empty()).await,
        "b never expired"
    );
}
