//! Test support for EC2 discovery, next to `gce-fake` and `k8s-fake`: a proxy that sits in front
//! of LocalStack's EC2 and injects faults or recorded answers ([`FaultProxy`]), an IMDSv2 fake
//! ([`FakeImds`]), and seeding LocalStack through the SDK ([`seed::Seed`]). Tests only: the
//! product never depends on this crate.
//!
//! LocalStack is the EC2 fake (`cargo xtask test` starts it); what it cannot do is fail on
//! demand, or hold instance shapes it does not support, so the proxy answers the next N
//! requests itself: `RequestLimitExceeded` by default, or any status and XML body a test
//! sets (a recorded DescribeInstances answer, say). Both servers run on a thread of their own
//! with their own runtime, so blocking and async tests can use them alike, and stop on drop.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub mod seed;

/// The largest request head the fakes read.
const MAX_HEAD: usize = 64 * 1024;
/// The largest request body the fakes read.
const MAX_BODY: usize = 1 << 20;
/// The token the IMDS fake hands out.
pub const IMDS_TOKEN: &str = "AQAEAFakeTokenForTests==";

/// Why a fake could not start.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The upstream is not an `http://ip:port` URL.
    #[error("the upstream `{0}` is not http://ip:port")]
    Upstream(String),
    /// The runtime or its thread could not be started.
    #[error("cannot start the fake's runtime")]
    Runtime(#[source] std::io::Error),
}

/// One HTTP/1.1 request as the fakes see it.
#[derive(Debug, Clone)]
pub struct Request {
    /// The method.
    pub method: String,
    /// The path.
    pub path: String,
    /// Header names in lower case, with their values.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Request {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one request (head up to 64 KiB, `Content-Length` body up to 1 MiB). `None` at EOF or
/// when the request is too large.
pub async fn read_request(s: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
        .min(MAX_BODY);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let mut chunk = vec![0u8; len - body.len()];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

/// A whole answer that closes the connection.
fn response(status: &str, content_type: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An EC2 query-protocol error document.
pub fn error_xml(code: &str, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>"
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A server thread with its own runtime; dropping it stops the server.
#[derive(Debug)]
struct Server {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` and runs `serve` for every connection until dropped.
    fn start<F, Fut>(
        addr: SocketAddr,
        name: &str,
        serve: F,
    ) -> Result<(Self, SocketAddr), FakeError>
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let bind = |source| FakeError::Bind { addr, source };
        let std_listener = std::net::TcpListener::bind(addr).map_err(bind)?;
        std_listener.set_nonblocking(true).map_err(bind)?;
        let local = std_listener.local_addr().map_err(bind)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(FakeError::Runtime)?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    let accept = async {
                        while let Ok((s, _)) = listener.accept().await {
                            tokio::spawn(serve(s));
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stop_rx => {}
                    }
                });
                rt.shutdown_background();
            })
            .map_err(FakeError::Runtime)?;
        Ok((
            Self {
                stop: Some(stop_tx),
                thread: Some(thread),
            },
            local,
        ))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the proxy saw: when, the request body, and whether it answered itself.
#[derive(Debug, Clone)]
pub struct Seen {
    /// When the request arrived.
    pub at: Instant,
    /// The form-encoded query-protocol body.
    pub body: String,
    /// Whether the proxy answered with [`FaultProxy::fault`] instead of forwarding.
    pub faulted: bool,
}

/// A proxy in front of LocalStack that answers with [`FaultProxy::fault`] (by default
/// `RequestLimitExceeded`, HTTP 503, EC2's XML error shape) while [`FaultProxy::faults`] is above
/// zero, and forwards otherwise. Every answer closes its connection, so one request maps to one
/// answer.
#[derive(Debug)]
pub struct FaultProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    /// How many more requests to answer with the fault.
    pub faults: Arc<AtomicUsize>,
    /// Every request, in order.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// The answer while faulting: status line and XML body (an error, or a recorded answer).
    pub fault: Arc<Mutex<(&'static str, String)>>,
    _server: Server,
}

#[derive(Debug, Clone)]
struct ProxyState {
    up: SocketAddr,
    faults: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    fault: Arc<Mutex<(&'static str, String)>>,
}

impl FaultProxy {
    /// Starts the proxy on 127.0.0.1 in front of `upstream` (an `http://ip:port` URL).
    pub fn start(upstream: &str) -> Result<Self, FakeError> {
        Self::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST), upstream)
    }

    /// Starts the proxy on `bind` (a free port) in front of `upstream`; a test bed's bridge
    /// address lets its network namespaces reach a LocalStack that listens on loopback.
    pub fn start_on(bind: IpAddr, upstream: &str) -> Result<Self, FakeError> {
        let up: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .map_err(|_| FakeError::Upstream(upstream.to_owned()))?;
        let state = ProxyState {
            up,
            faults: Arc::new(AtomicUsize::new(0)),
            seen: Arc::new(Mutex::new(Vec::new())),
            fault: Arc::new(Mutex::new((
                "503 Service Unavailable",
                error_xml("RequestLimitExceeded", "Request limit exceeded."),
            ))),
        };
        let s = state.clone();
        let (server, addr) =
            Server::start(SocketAddr::new(bind, 0), "aws-fault-proxy", move |c| {
                let s = s.clone();
                async move { s.serve(c).await }
            })?;
        Ok(Self {
            addr,
            faults: state.faults,
            seen: state.seen,
            fault: state.fault,
            _server: server,
        })
    }

    /// The URL to use as `--aws_endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }

    /// Answers the next `n` requests with `status` and the XML `body` instead of forwarding.
    pub fn answer_next(&self, n: usize, status: &'static str, body: impl Into<String>) {
        *lock(&self.fault) = (status, body.into());
        self.faults.store(n, Ordering::SeqCst);
    }
}

impl ProxyState {
    async fn serve(&self, mut s: TcpStream) {
        let Some(req) = read_request(&mut s).await else {
            return;
        };
        let faulted = self
            .faults
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        lock(&self.seen).push(Seen {
            at: Instant::now(),
            body: String::from_utf8_lossy(&req.body).to_string(),
            faulted,
        });
        let answer = if faulted {
            let (status, body) = lock(&self.fault).clone();
            response(status, "text/xml", "", &body)
        } else {
            match forward(&req, self.up).await {
                Some(a) => a,
                None => return,
            }
        };
        let _ = s.write_all(&answer).await;
    }
}

/// Sends the request upstream and returns its answer, marked `Connection: close`.
async fn forward(req: &Request, up: SocketAddr) -> Option<Vec<u8>> {
    let mut u = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(up))
        .await
        .ok()?
        .ok()?;
    let mut head = format!("{} {} HTTP/1.1\r\n", req.method, req.path);
    for (k, v) in &req.headers {
        if k != "connection" {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str("connection: close\r\n\r\n");
    u.write_all(head.as_bytes()).await.ok()?;
    u.write_all(&req.body).await.ok()?;
    tokio::time::timeout(Duration::from_secs(120), read_response(&mut u))
        .await
        .ok()?
}

/// Reads one answer (`Content-Length` or chunked), without waiting for the server to close.
async fn read_response(u: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = u.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let lower = head.to_ascii_lowercase();
    let chunked = lower.contains("transfer-encoding: chunked");
    let len: Option<usize> = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok());
    loop {
        let body = &buf[head_end..];
        let done = if chunked {
            body.ends_with(b"0\r\n\r\n")
        } else {
            body.len() >= len.unwrap_or(0)
        };
        if done {
            break;
        }
        let n = u.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    // Keep the status line and headers, but make the client open a new connection next time.
    let mut out = String::new();
    for line in head.trim_end().split("\r\n") {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&buf[head_end..]);
    Some(bytes)
}

/// A small IMDSv2: `PUT /latest/api/token` hands out a token, and the identity document and
/// `placement/availability-zone` are served only with that token (401 otherwise), as on EC2.
#[derive(Debug)]
pub struct FakeImds {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Every request as `METHOD path status`.
    pub log: Arc<Mutex<Vec<String>>>,
    _server: Server,
}

impl FakeImds {
    /// Starts the fake on 127.0.0.1; the instance is in `region`, zone `<region>a`.
    pub fn start(region: &str) -> Result<Self, FakeError> {
        Self::start_with_zone(region, &format!("{region}a"))
    }

    /// Starts the fake on 127.0.0.1 with this region and availability zone (which a test can
    /// make anything, a hostile value included).
    pub fn start_with_zone(region: &str, zone: &str) -> Result<Self, FakeError> {
        let doc = Arc::new(format!(
            "{{\"accountId\":\"000000000000\",\"architecture\":\"x86_64\",\"availabilityZone\":\"{zone}\",\"imageId\":\"ami-df5de72bdb3b\",\"instanceId\":\"i-0123456789abcdef0\",\"instanceType\":\"t3.micro\",\"privateIp\":\"198.18.0.10\",\"region\":\"{region}\",\"version\":\"2017-09-30\"}}"
        ));
        let zone = Arc::new(zone.to_owned());
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let (server, addr) = Server::start(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            "aws-fake-imds",
            move |s| imds_serve(s, doc.clone(), zone.clone(), l.clone()),
        )?;
        Ok(Self {
            addr,
            log,
            _server: server,
        })
    }

    /// The URL for `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests so far.
    pub fn log(&self) -> Vec<String> {
        lock(&self.log).clone()
    }
}

async fn imds_serve(
    mut s: TcpStream,
    doc: Arc<String>,
    zone: Arc<String>,
    log: Arc<Mutex<Vec<String>>>,
) {
    let Some(req) = read_request(&mut s).await else {
        return;
    };
    let authorised = req.header("x-aws-ec2-metadata-token") == Some(IMDS_TOKEN);
    let (status, body) = match (req.method.as_str(), req.path.as_str()) {
        ("PUT", "/latest/api/token") => {
            if req.header("x-aws-ec2-metadata-token-ttl-seconds").is_some() {
                ("200 OK", IMDS_TOKEN.to_owned())
            } else {
                ("400 Bad Request", String::new())
            }
        }
        ("GET", "/latest/dynamic/instance-identity/document") if authorised => {
            ("200 OK", doc.to_string())
        }
        ("GET", "/latest/meta-data/placement/availability-zone") if authorised => {
            ("200 OK", zone.to_string())
        }
        ("GET", "/latest/dynamic/instance-identity/document")
        | ("GET", "/latest/meta-data/placement/availability-zone") => {
            ("401 Unauthorized", String::new())
        }
        _ => ("404 Not Found", String::new()),
    };
    lock(&log).push(format!("{} {} {}", req.method, req.path, &status[..3]));
    let extra = if req.method == "PUT" && status.starts_with("200") {
        "X-aws-ec2-metadata-token-ttl-seconds: 21600\r\n"
    } else {
        ""
    };
    let _ = s
        .write_all(&response(status, "text/plain", extra, &body))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn get(addr: SocketAddr, req: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn imds_insists_on_the_token() {
        let imds = FakeImds::start_with_zone("eu-west-3", "eu-west-3c").unwrap();
        let zone = "GET /latest/meta-data/placement/availability-zone HTTP/1.1\r\nHost: x\r\n";
        assert!(get(imds.addr, &format!("{zone}\r\n")).starts_with("HTTP/1.1 401"));
        let token = get(
            imds.addr,
            "PUT /latest/api/token HTTP/1.1\r\nx-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n",
        );
        assert!(token.ends_with(IMDS_TOKEN), "{token}");
        let ok = get(
            imds.addr,
            &format!("{zone}x-aws-ec2-metadata-token: {IMDS_TOKEN}\r\n\r\n"),
        );
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.ends_with("eu-west-3c"),
            "{ok}"
        );
        assert_eq!(
            imds.log(),
            [
                "GET /latest/meta-data/placement/availability-zone 401",
                "PUT /latest/api/token 200",
                "GET /latest/meta-data/placement/availability-zone 200",
            ]
        );
    }

    #[test]
    fn the_proxy_answers_faults_itself_and_forwards_the_rest() {
        // An upstream that answers every request with "up".
        let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let up_addr = up.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in up.incoming().take(1) {
                let mut s = s.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nup");
            }
        });
        let proxy = FaultProxy::start(&format!("http://{up_addr}")).unwrap();
        proxy.answer_next(1, "200 OK", "<recorded/>");
        let req = "POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        let a = get(proxy.addr, req);
        assert!(
            a.starts_with("HTTP/1.1 200") && a.ends_with("<recorded/>"),
            "{a}"
        );
        let b = get(proxy.addr, req);
        assert!(b.ends_with("up") && b.contains("connection: close"), "{b}");
        let seen = proxy.seen();
        assert_eq!(
            seen.iter()
                .map(|s| (s.faulted, s.body.as_str()))
                .collect::<Vec<_>>(),
            [(true, "abc"), (false, "abc")]
        );
        assert!(FaultProxy::start("localhost:4566").is_err());
    }
}
