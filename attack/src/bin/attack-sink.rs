//! The third party of reflection attacks: a listener that counts the bytes it receives.
//!
//! `attack-sink IP PORT[,PORT...] SECONDS` binds UDP sockets and TCP listeners on every port,
//! counts every byte that arrives, prints `sink udp=N tcp=M` whenever the totals change (at
//! most every 100 ms) and exits after SECONDS. It never sends anything back, so it cannot
//! take part in an attack itself. The attack harness runs it inside a test-bed namespace.

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Connections read at once; more are closed unread (their bytes are still counted by TCP).
const MAX_READERS: usize = 256;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(ip), Some(ports), Some(secs)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("usage: attack-sink IP PORT[,PORT...] SECONDS");
        std::process::exit(2);
    };
    let ip: IpAddr = ip
        .parse()
        .unwrap_or_else(|e| fail(&format!("bad IP {ip}: {e}")));
    let secs: u64 = secs
        .parse()
        .unwrap_or_else(|e| fail(&format!("bad seconds {secs}: {e}")));
    let udp_bytes = Arc::new(AtomicU64::new(0));
    let tcp_bytes = Arc::new(AtomicU64::new(0));
    let readers = Arc::new(AtomicUsize::new(0));
    for port in ports.split(',') {
        let port: u16 = port
            .parse()
            .unwrap_or_else(|e| fail(&format!("bad port {port}: {e}")));
        let addr = SocketAddr::new(ip, port);
        let udp = UdpSocket::bind(addr).unwrap_or_else(|e| fail(&format!("udp {addr}: {e}")));
        let tcp = TcpListener::bind(addr).unwrap_or_else(|e| fail(&format!("tcp {addr}: {e}")));
        let counter = udp_bytes.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, _)) = udp.recv_from(&mut buf) {
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
        let counter = tcp_bytes.clone();
        let readers = readers.clone();
        std::thread::spawn(move || {
            for mut conn in tcp.incoming().flatten() {
                if readers.load(Ordering::Relaxed) >= MAX_READERS {
                    continue;
                }
                readers.fetch_add(1, Ordering::Relaxed);
                let counter = counter.clone();
                let readers = readers.clone();
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    readers.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
    }
    println!("sink ready udp=0 tcp=0");
    let end = Instant::now() + Duration::from_secs(secs);
    let mut last = (0, 0);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        let now = (
            udp_bytes.load(Ordering::Relaxed),
            tcp_bytes.load(Ordering::Relaxed),
        );
        if now != last {
            println!("sink udp={} tcp={}", now.0, now.1);
            last = now;
        }
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("attack-sink: {msg}");
    std::process::exit(2)
}
