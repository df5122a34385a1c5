//! Test support for the LocalStack tests: the endpoint, contexts and report helpers. Seeding,
//! the fault-injecting proxy and the IMDSv2 fake are the `aws-fake` crate's; everything
//! listens on 127.0.0.1 only.

#![allow(dead_code)]

use std::net::IpAddr;

pub use aws_fake::seed::Seed;
pub use aws_fake::{FakeImds, FaultProxy, error_xml};
use discovery::{Context, Role};

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

/// A seed with a fresh VPC 198.18.0.0/16 in `region` of LocalStack.
pub async fn seed(region: &str) -> Seed {
    Seed::new(&localstack(), region, "198.18.0.0/16").await
}

/// Like [`seed`], with an Amazon-provided IPv6 /56; returns it too.
pub async fn dual_stack_seed(region: &str) -> (Seed, String) {
    Seed::dual_stack(&localstack(), region, "198.18.0.0/16").await
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
