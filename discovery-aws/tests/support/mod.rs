//! Test support for the LocalStack tests: the endpoint, seeding through the SDK, a
//! fault-injecting proxy and an IMDSv2 fake. Everything listens on 127.0.0.1 only.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{
    Filter, InstanceNetworkInterfaceSpecification, ResourceType, Tag, TagSpecification,
};
use discovery::{Context, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The region the tests seed, unless a test picks its own.
pub const REGION: &str = "us-east-1";
/// Where LocalStack's endpoint is passed in.
pub const ENDPOINT_ENV: &str = "LOCALSTACK_ENDPOINT";

/// LocalStack's URL. Fails with instructions when the tests were not started by xtask.
pub fn localstack() -> String {
    let hint = "run `cargo xtask test`, or run `cargo xtask localstack` in another shell and export the variables it prints";
    let ep = std::env::var(ENDPOINT_ENV).unwrap_or_else(|_| {
        panic!("{ENDPOINT_ENV} is not set: these tests run against LocalStack; {hint}")
    });
    // The SDK must never reach the real instance metadata service or real credentials.
    assert_eq!(
        std::env::var("AWS_EC2_METADATA_DISABLED").as_deref(),
        Ok("true"),
        "AWS_EC2_METADATA_DISABLED=true must be set for these tests; {hint}"
    );
    assert_eq!(
        std::env::var("AWS_ACCESS_KEY_ID").as_deref(),
        Ok("test"),
        "AWS_ACCESS_KEY_ID=test (dummy credentials) must be set for these tests; {hint}"
    );
    ep
}

/// A tag value no other test uses, since LocalStack keeps every instance until it stops.
pub fn unique(name: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{name}-{}-{:x}", std::process::id(), n & 0xffff_ffff)
}

/// A discovery context for a node at `ip` with the selector `net`.
pub fn ctx(ip: &str, net: &str) -> Context {
    Context::standalone(
        "test",
        Role::Worker,
        ip.parse().expect("ip"),
        8081,
        Some(net.parse().expect("cidr")),
    )
}

/// An SDK client for seeding, in `region`.
pub async fn client(region: &str) -> Client {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_owned()))
        .endpoint_url(localstack())
        .load()
        .await;
    Client::new(&conf)
}

/// Seeds instances through the SDK.
#[derive(Debug, Clone)]
pub struct Seed {
    /// The client.
    pub ec2: Client,
    /// The VPC, 198.18.0.0/16.
    pub vpc: String,
}

fn tags(pairs: &[(&str, &str)]) -> TagSpecification {
    let mut spec = TagSpecification::builder().resource_type(ResourceType::Instance);
    for (k, v) in pairs {
        spec = spec.tags(Tag::builder().key(*k).value(*v).build());
    }
    spec.build()
}

impl Seed {
    /// A fresh VPC 198.18.0.0/16 in `region`.
    pub async fn new(region: &str) -> Self {
        let ec2 = client(region).await;
        let vpc = ec2
            .create_vpc()
            .cidr_block("198.18.0.0/16")
            .send()
            .await
            .expect("create vpc")
            .vpc()
            .and_then(|v| v.vpc_id())
            .expect("vpc id")
            .to_owned();
        Self { ec2, vpc }
    }

    /// A subnet of the VPC.
    pub async fn subnet(&self, cidr: &str) -> String {
        self.ec2
            .create_subnet()
            .vpc_id(&self.vpc)
            .cidr_block(cidr)
            .send()
            .await
            .unwrap_or_else(|e| panic!("create subnet {cidr}: {e:?}"))
            .subnet()
            .and_then(|s| s.subnet_id())
            .expect("subnet id")
            .to_owned()
    }

    /// A security group of the VPC; returns its id.
    pub async fn group(&self, name: &str) -> String {
        self.ec2
            .create_security_group()
            .vpc_id(&self.vpc)
            .group_name(name)
            .description("discovery-aws test")
            .send()
            .await
            .expect("create security group")
            .group_id()
            .expect("group id")
            .to_owned()
    }

    /// One running instance with this private IP and tags; returns its id.
    pub async fn instance(&self, subnet: &str, ip: &str, pairs: &[(&str, &str)]) -> String {
        self.instance_in(subnet, ip, pairs, None).await
    }

    /// Like [`Seed::instance`], in a security group.
    pub async fn instance_in(
        &self,
        subnet: &str,
        ip: &str,
        pairs: &[(&str, &str)],
        group: Option<&str>,
    ) -> String {
        let out = self
            .ec2
            .run_instances()
            .image_id("ami-df5de72bdb3b")
            .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
            .min_count(1)
            .max_count(1)
            .subnet_id(subnet)
            .private_ip_address(ip)
            .set_security_group_ids(group.map(|g| vec![g.to_owned()]))
            .tag_specifications(tags(pairs))
            .send()
            .await
            .unwrap_or_else(|e| panic!("run instance {ip}: {e:?}"));
        out.instances()[0].instance_id().expect("id").to_owned()
    }

    /// `count` running instances in one reservation, with addresses LocalStack picks.
    pub async fn many(&self, subnet: &str, count: i32, pairs: &[(&str, &str)]) -> Vec<String> {
        let out = self
            .ec2
            .run_instances()
            .image_id("ami-df5de72bdb3b")
            .min_count(count)
            .max_count(count)
            .subnet_id(subnet)
            .tag_specifications(tags(pairs))
            .send()
            .await
            .expect("run instances");
        out.instances()
            .iter()
            .filter_map(|i| i.instance_id().map(str::to_owned))
            .collect()
    }

    /// One instance with two network interfaces, one in each subnet.
    pub async fn two_enis(
        &self,
        subnets: (&str, &str),
        ips: (&str, &str),
        pairs: &[(&str, &str)],
    ) -> String {
        let eni = |idx: i32, subnet: &str, ip: &str| {
            InstanceNetworkInterfaceSpecification::builder()
                .device_index(idx)
                .subnet_id(subnet)
                .private_ip_address(ip)
                .build()
        };
        let out = self
            .ec2
            .run_instances()
            .image_id("ami-df5de72bdb3b")
            .min_count(1)
            .max_count(1)
            .network_interfaces(eni(0, subnets.0, ips.0))
            .network_interfaces(eni(1, subnets.1, ips.1))
            .tag_specifications(tags(pairs))
            .send()
            .await
            .expect("run instance with two network interfaces");
        out.instances()[0].instance_id().expect("id").to_owned()
    }

    /// Stops instances and waits (bounded) until DescribeInstances shows them stopped.
    pub async fn stop(&self, ids: &[String]) {
        self.ec2
            .stop_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .expect("stop instances");
        for _ in 0..100 {
            let out = self
                .ec2
                .describe_instances()
                .set_instance_ids(Some(ids.to_vec()))
                .filters(
                    Filter::builder()
                        .name("instance-state-name")
                        .values("stopped")
                        .build(),
                )
                .send()
                .await
                .expect("describe");
            let n: usize = out.reservations().iter().map(|r| r.instances().len()).sum();
            if n == ids.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("instances {ids:?} did not stop within 10 s");
    }
}

/// The candidate IPs of a report, sorted.
pub fn ips(report: &discovery::Report) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = report.candidates.iter().map(|c| c.ip).collect();
    v.sort();
    v
}

/// Parses a list of IPs.
pub fn parse_ips(list: &[&str]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = list.iter().map(|s| s.parse().expect("ip")).collect();
    v.sort();
    v
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

/// Reads one request (head and `Content-Length` body; bounded to 1 MiB). `None` at EOF.
pub async fn read_request(s: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > 64 * 1024 {
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
        .min(1 << 20);
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

fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What the proxy saw: when, the request body, and whether it answered with a fault.
#[derive(Debug, Clone)]
pub struct Seen {
    /// When the request arrived.
    pub at: Instant,
    /// The form-encoded query-protocol body.
    pub body: String,
    /// Whether the proxy answered RequestLimitExceeded instead of forwarding.
    pub faulted: bool,
}

/// A proxy in front of LocalStack that answers `RequestLimitExceeded` (HTTP 503, EC2's XML
/// error shape) while `faults` is above zero, and forwards otherwise.
#[derive(Debug, Clone)]
pub struct FaultProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    /// How many more requests to fail.
    pub faults: Arc<AtomicUsize>,
    /// Every request, in order.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// The answer while faulting: status line and XML body.
    pub fault: Arc<Mutex<(&'static str, String)>>,
}

/// An EC2 query-protocol error document.
pub fn error_xml(code: &str, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>"
    )
}

impl FaultProxy {
    /// Starts the proxy in front of `upstream` (an `http://host:port` URL).
    pub async fn start(upstream: &str) -> Self {
        let up: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("LOCALSTACK_ENDPOINT must be http://ip:port");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let proxy = Self {
            addr: listener.local_addr().expect("addr"),
            faults: Arc::new(AtomicUsize::new(0)),
            seen: Arc::new(Mutex::new(Vec::new())),
            fault: Arc::new(Mutex::new((
                "503 Service Unavailable",
                error_xml("RequestLimitExceeded", "Request limit exceeded."),
            ))),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let p = p.clone();
                tokio::spawn(async move { p.serve(s, up).await });
            }
        });
        proxy
    }

    /// The URL to use as `--aws_endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn serve(&self, mut s: TcpStream, up: SocketAddr) {
        if let Some(req) = read_request(&mut s).await {
            let faulted = self
                .faults
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            self.seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Seen {
                    at: Instant::now(),
                    body: String::from_utf8_lossy(&req.body).to_string(),
                    faulted,
                });
            let answer = if faulted {
                let (status, body) = self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone();
                response(status, "text/xml", &body)
            } else {
                match forward(&req, up).await {
                    Some(a) => a,
                    None => return,
                }
            };
            // Every answer closes the connection, so one request maps to one answer.
            let _ = s.write_all(&answer).await;
        }
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

/// A small IMDSv2: `PUT /latest/api/token` hands out a token, and the identity document is
/// served only with that token (401 otherwise), as on EC2.
#[derive(Debug, Clone)]
pub struct FakeImds {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Every request as `METHOD path status`.
    pub log: Arc<Mutex<Vec<String>>>,
}

const TOKEN: &str = "AQAEAFakeTokenForTests==";

impl FakeImds {
    /// Starts the fake; the document names `region`.
    pub async fn start(region: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind imds");
        let imds = Self {
            addr: listener.local_addr().expect("addr"),
            log: Arc::new(Mutex::new(Vec::new())),
        };
        let doc = format!(
            "{{\"accountId\":\"000000000000\",\"architecture\":\"x86_64\",\"availabilityZone\":\"{region}a\",\"imageId\":\"ami-df5de72bdb3b\",\"instanceId\":\"i-0123456789abcdef0\",\"instanceType\":\"t3.micro\",\"privateIp\":\"198.18.0.10\",\"region\":\"{region}\",\"version\":\"2017-09-30\"}}"
        );
        let log = imds.log.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let doc = doc.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut s).await else {
                        return;
                    };
                    let (status, body) = match (req.method.as_str(), req.path.as_str()) {
                        ("PUT", "/latest/api/token") => {
                            if req.header("x-aws-ec2-metadata-token-ttl-seconds").is_some() {
                                ("200 OK", TOKEN.to_owned())
                            } else {
                                ("400 Bad Request", String::new())
                            }
                        }
                        ("GET", "/latest/dynamic/instance-identity/document") => {
                            if req.header("x-aws-ec2-metadata-token") == Some(TOKEN) {
                                ("200 OK", doc)
                            } else {
                                ("401 Unauthorized", String::new())
                            }
                        }
                        _ => ("404 Not Found", String::new()),
                    };
                    log.lock().unwrap_or_else(|p| p.into_inner()).push(format!(
                        "{} {} {}",
                        req.method,
                        req.path,
                        &status[..3]
                    ));
                    let mut answer = response(status, "text/plain", &body);
                    if req.method == "PUT" && status.starts_with("200") {
                        answer = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .into_bytes();
                    }
                    let _ = s.write_all(&answer).await;
                });
            }
        });
        imds
    }

    /// The URL for `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
