//! EC2 discovery: running instances that carry the cluster's tags, found with DescribeInstances.
//!
//! Filtering happens on the server (`tag:`/`tag-key`, `instance-state-name=running`, the
//! security group), every page is read (`MaxResults` 1000 and `NextToken`), and every private
//! IPv4 of every network interface inside `--private_ip_selector` becomes a candidate.
//! Throttling and 5xx answers are retried with jittered exponential backoff; the refresh loop
//! keeps the last good set through any failure, and its first call is jittered so that a fleet
//! starting at once does not stampede the API.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::describe_instances::DescribeInstancesError;
use aws_sdk_ec2::types::{Filter, Instance, InstanceStateName};
use discovery::{
    BoxFuture, Context, Discover, DiscoveryError, Exclusion, Refresh, RefreshObserver, Report,
    Snapshot, jitter, poll_loop,
};
use tokio::sync::{OnceCell, watch};

mod region;
mod tags;

pub use region::{REGION_ENV, resolve_region};
pub use tags::{TagFilter, parse_tags};

const BACKEND: &str = "aws";
/// DescribeInstances' largest page.
pub const MAX_RESULTS: i32 = 1000;
/// A bound on pages per round: 1000 pages of up to 1000 reservations each.
const MAX_PAGES: usize = 1000;

/// Why the AWS backend cannot be configured or could not answer.
#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    /// `--aws_tags` is missing.
    #[error(
        "--aws_tags is required with --discovery=aws: give the tags that mark this cluster's instances, e.g. --aws_tags=cluster=prod"
    )]
    NoTags,
    /// `--aws_tags` cannot be parsed.
    #[error("invalid --aws_tags `{raw}`: {reason}; the syntax is k=v[,k=v], k alone or k=v1|v2")]
    BadTags {
        /// The flag as given.
        raw: String,
        /// What is wrong.
        reason: String,
    },
    /// `--aws_endpoint` is not an http(s) URL.
    #[error("invalid --aws_endpoint `{0}`: give an http:// or https:// URL")]
    BadEndpoint(String),
    /// `--aws_security_group` is empty.
    #[error("--aws_security_group is empty: give a group id (sg-...) or a group name")]
    EmptyGroup,
    /// No region was given and the instance metadata service could not tell it.
    #[error(
        "cannot determine the AWS region: {reason}; set --aws_region or AWS_REGION, or run on EC2 with IMDSv2 reachable"
    )]
    NoRegion {
        /// What was tried.
        reason: String,
    },
}

impl From<AwsError> for DiscoveryError {
    fn from(e: AwsError) -> Self {
        match e {
            AwsError::NoRegion { .. } => DiscoveryError::Unreachable {
                backend: BACKEND,
                message: e.to_string(),
                source: None,
            },
            other => DiscoveryError::Config(other.to_string()),
        }
    }
}

/// How a round retries throttling, 5xx answers and network errors before giving up.
#[derive(Debug, Clone)]
pub struct Retry {
    /// Calls per round, at least 1.
    pub attempts: u32,
    /// The first backoff; it doubles up to `max_backoff`. Each pause is half the backoff plus
    /// a random part of the other half.
    pub first_backoff: Duration,
    /// The largest backoff.
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 4,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
        }
    }
}

/// The backend's settings, from the `--aws_*` flags.
#[derive(Debug, Clone)]
pub struct AwsConfig {
    /// `--aws_region`; when absent, `AWS_REGION`, then the IMDSv2 instance identity document.
    pub region: Option<String>,
    /// `--aws_tags`, as given.
    pub tags: String,
    /// `--aws_security_group`: a group id (`sg-...`) or name.
    pub security_group: Option<String>,
    /// `--aws_endpoint`: an endpoint URL (LocalStack, a VPC endpoint).
    pub endpoint: Option<String>,
    /// Retries within one round.
    pub retry: Retry,
    /// The first refresh waits a random time up to this long (capped at the refresh interval).
    pub initial_jitter: Duration,
    /// The limit for one DescribeInstances call.
    pub call_timeout: Duration,
}

impl AwsConfig {
    /// Settings with the given tags and every other field at its default.
    pub fn new(tags: impl Into<String>) -> Self {
        Self {
            region: None,
            tags: tags.into(),
            security_group: None,
            endpoint: None,
            retry: Retry::default(),
            initial_jitter: Duration::from_secs(3),
            call_timeout: Duration::from_secs(30),
        }
    }
}

/// The EC2 backend.
#[derive(Debug)]
pub struct AwsDiscovery {
    config: AwsConfig,
    tags: Vec<TagFilter>,
    ctx: Context,
    client: OnceCell<Client>,
}

impl AwsDiscovery {
    /// Checks the flags; the client (and the region lookup) is created on the first round.
    pub fn new(config: AwsConfig, ctx: Context) -> Result<Arc<Self>, AwsError> {
        let tags = parse_tags(&config.tags)?;
        if let Some(e) = &config.endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(AwsError::BadEndpoint(e.clone()));
        }
        if let Some(g) = &config.security_group
            && g.trim().is_empty()
        {
            return Err(AwsError::EmptyGroup);
        }
        Ok(Arc::new(Self {
            config,
            tags,
            ctx,
            client: OnceCell::new(),
        }))
    }

    /// The server-side filters of a round, with the given instance states.
    pub fn filters(&self, states: &[&str]) -> Vec<Filter> {
        let mut out: Vec<Filter> = self
            .tags
            .iter()
            .map(|t| {
                let (name, values) = t.filter();
                Filter::builder()
                    .name(name)
                    .set_values(Some(values))
                    .build()
            })
            .collect();
        out.push(
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(states.iter().map(|s| (*s).to_owned()).collect()))
                .build(),
        );
        if let Some(g) = &self.config.security_group {
            let g = g.trim();
            let name = if g.starts_with("sg-") {
                "instance.group-id"
            } else {
                "instance.group-name"
            };
            out.push(Filter::builder().name(name).values(g).build());
        }
        out
    }

    async fn client(&self) -> Result<&Client, DiscoveryError> {
        self.client
            .get_or_try_init(|| async {
                let region = resolve_region(self.config.region.clone()).await?;
                tracing::info!(region = %region, endpoint = ?self.config.endpoint, "aws discovery configured");
                let mut loader = aws_config::defaults(BehaviorVersion::latest())
                    .region(aws_config::Region::new(region))
                    // Retries are ours: they back off with jitter and log each attempt.
                    .retry_config(RetryConfig::disabled())
                    .timeout_config(
                        TimeoutConfig::builder()
                            .connect_timeout(Duration::from_secs(3))
                            .operation_timeout(self.config.call_timeout)
                            .build(),
                    );
                if let Some(e) = &self.config.endpoint {
                    loader = loader.endpoint_url(e);
                }
                let shared = loader.load().await;
                Ok::<_, DiscoveryError>(Client::new(&shared))
            })
            .await
    }

    /// Every instance that the filters select, through every page.
    async fn describe(&self, filters: Vec<Filter>) -> Result<Vec<Instance>, DiscoveryError> {
        let client = self.client().await?;
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = self
                .with_retries(|| {
                    client
                        .describe_instances()
                        .set_filters(Some(filters.clone()))
                        .max_results(MAX_RESULTS)
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
            for r in page.reservations() {
                out.extend(r.instances().iter().cloned());
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                _ => return Ok(out),
            }
        }
        Err(DiscoveryError::Api {
            backend: BACKEND,
            message: format!(
                "DescribeInstances returned more than {MAX_PAGES} pages; narrow --aws_tags"
            ),
            transient: false,
        })
    }

    async fn with_retries<T, F, Fut>(&self, mut call: F) -> Result<T, DiscoveryError>
    where
        F: FnMut() -> Fut,
        Fut:
            std::future::Future<Output = Result<T, SdkError<DescribeInstancesError, HttpResponse>>>,
    {
        let r = &self.config.retry;
        let mut backoff = r.first_backoff;
        let attempts = r.attempts.max(1);
        let mut attempt = 1;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let err = map_error(e);
                    if !err.is_transient() || attempt >= attempts {
                        return Err(err);
                    }
                    let pause = backoff / 2 + jitter(backoff / 2);
                    tracing::warn!(
                        attempt,
                        retry_in_ms = pause.as_millis() as u64,
                        "DescribeInstances failed, retrying: {}",
                        discovery::escape_untrusted(&err.to_string())
                    );
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(r.max_backoff);
                    attempt += 1;
                }
            }
        }
    }

    /// One round. `explain` adds a second query for the tagged instances that are not
    /// running, so that `node discover` can say why they are skipped; the refresh loop leaves
    /// it out.
    pub async fn round(&self, explain: bool) -> Result<Report, DiscoveryError> {
        let running = self.describe(self.filters(&["running"])).await?;
        let mut report = self.classify(&running);
        if explain {
            let others = self
                .describe(self.filters(&[
                    "pending",
                    "stopping",
                    "stopped",
                    "shutting-down",
                    "terminated",
                ]))
                .await?;
            for i in others {
                let state = i
                    .state()
                    .and_then(|s| s.name())
                    .map_or("unknown".to_owned(), |n| n.as_str().to_owned());
                report.excluded.push(Exclusion {
                    id: instance_id(&i),
                    reason: format!("{state}, not running"),
                });
            }
        }
        Ok(report)
    }

    /// The refresh settings the loop runs with: the first call is jittered by up to
    /// `initial_jitter` (at most one interval) unless the caller already chose a jitter.
    pub fn refresh_settings(&self, mut refresh: Refresh) -> Refresh {
        if refresh.initial_jitter.is_zero() {
            refresh.initial_jitter = self.config.initial_jitter.min(refresh.interval);
        }
        refresh
    }

    /// Turns running instances into candidates and exclusions.
    pub fn classify(&self, instances: &[Instance]) -> Report {
        let mut report = Report::default();
        for i in instances {
            let id = instance_id(i);
            if i.state().and_then(|s| s.name()) != Some(&InstanceStateName::Running) {
                // The server filter makes this rare; an instance can change state meanwhile.
                report.excluded.push(Exclusion {
                    id,
                    reason: "not running".into(),
                });
                continue;
            }
            let ips = private_ipv4s(i);
            if ips.is_empty() {
                report.excluded.push(Exclusion {
                    id,
                    reason: "no private IPv4 address".into(),
                });
                continue;
            }
            let mut outside = Vec::new();
            let mut used = 0;
            for ip in &ips {
                match self.ctx.classify(id.clone(), *ip, self.ctx.private_port) {
                    Ok(c) => {
                        used += 1;
                        report.candidates.push(c);
                    }
                    Err(x) if x.reason == "self" => {
                        used += 1;
                        report.excluded.push(x);
                    }
                    Err(_) => outside.push(ip.to_string()),
                }
            }
            if used == 0 {
                let sel = self
                    .ctx
                    .selector
                    .map_or_else(String::new, |s| s.to_string());
                report.excluded.push(Exclusion {
                    id,
                    reason: format!(
                        "no private IP in --private_ip_selector {sel} (has {})",
                        outside.join(", ")
                    ),
                });
            }
        }
        report.candidates.sort_by_key(|a| a.ip);
        report.candidates.dedup_by(|a, b| a.ip == b.ip);
        report
    }
}

/// The instance id, or a placeholder.
fn instance_id(i: &Instance) -> String {
    i.instance_id().unwrap_or("i-unknown").to_owned()
}

/// Every private IPv4 of every network interface, falling back to the instance's primary
/// address when the answer lists no interfaces.
pub fn private_ipv4s(i: &Instance) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for eni in i.network_interfaces() {
        for a in eni.private_ip_addresses() {
            if let Some(ip) = a.private_ip_address().and_then(|s| s.parse().ok()) {
                out.push(ip);
            }
        }
        if let Some(ip) = eni.private_ip_address().and_then(|s| s.parse().ok()) {
            out.push(ip);
        }
    }
    if let Some(ip) = i.private_ip_address().and_then(|s| s.parse().ok()) {
        out.push(ip);
    }
    out.sort();
    out.dedup();
    out
}

/// Sorts an SDK failure into the discovery error kinds.
fn map_error(e: SdkError<DescribeInstancesError, HttpResponse>) -> DiscoveryError {
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e.code().map(str::to_owned);
    let message = e.message().unwrap_or_default().to_owned();
    match &e {
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => {
            let code_s = code.as_deref().unwrap_or("");
            match code_s {
                "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => {
                    DiscoveryError::Throttled {
                        backend: BACKEND,
                        message: format!("{code_s}: {message}"),
                    }
                }
                "UnauthorizedOperation"
                | "AuthFailure"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "OptInRequired"
                | "AccessDenied"
                | "AccessDeniedException" => DiscoveryError::Unauthorized {
                    backend: BACKEND,
                    message: format!(
                        "{code_s}: {message}; this node needs credentials allowed to call ec2:DescribeInstances (attach deploy/aws/iam-policy.json to the instance role)"
                    ),
                },
                _ => {
                    let transient = status.is_some_and(|s| s >= 500);
                    DiscoveryError::Api {
                        backend: BACKEND,
                        message: format!(
                            "DescribeInstances failed with HTTP {}: {} {message}",
                            status.map_or("?".to_owned(), |s| s.to_string()),
                            code.as_deref().unwrap_or("(no error code)"),
                        ),
                        transient,
                    }
                }
            }
        }
        SdkError::ConstructionFailure(_) => DiscoveryError::Config(format!(
            "cannot build the DescribeInstances request: {}",
            discovery_source_chain(&e)
        )),
        _ => {
            let text = discovery_source_chain(&e);
            let message = if text.contains("credentials") {
                format!(
                    "{text}; no AWS credentials were found: use an instance role allowed to call ec2:DescribeInstances, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                )
            } else {
                format!(
                    "DescribeInstances: {text}; check --aws_endpoint, --aws_region and the network path to EC2"
                )
            };
            DiscoveryError::Unreachable {
                backend: BACKEND,
                message,
                source: Some(Box::new(e)),
            }
        }
    }
}

/// The error and its causes, joined by `: `.
fn discovery_source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if parts.last() != Some(&t) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// The refresh loop's view of the backend: the running-only query, without the explanation.
#[derive(Debug)]
struct Refreshing(Arc<AwsDiscovery>);

impl Discover for Refreshing {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn discover(&self) -> BoxFuture<'_, Result<Report, DiscoveryError>> {
        Box::pin(self.0.round(false))
    }
}

impl Discover for AwsDiscovery {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn discover(&self) -> BoxFuture<'_, Result<Report, DiscoveryError>> {
        Box::pin(self.round(true))
    }

    fn watch(
        self: Arc<Self>,
        refresh: Refresh,
        tx: watch::Sender<Snapshot>,
        observer: Arc<dyn RefreshObserver>,
    ) -> BoxFuture<'static, ()> {
        let refresh = self.refresh_settings(refresh);
        Box::pin(poll_loop(Arc::new(Refreshing(self)), refresh, tx, observer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::{InstanceNetworkInterface, InstancePrivateIpAddress, InstanceState};

    fn ctx(ip: &str, net: &str) -> Context {
        Context::standalone(
            "t",
            discovery::Role::Worker,
            ip.parse().unwrap(),
            8081,
            Some(net.parse().unwrap()),
        )
    }

    fn instance(id: &str, state: InstanceStateName, enis: &[&[&str]]) -> Instance {
        let mut b = Instance::builder()
            .instance_id(id)
            .state(InstanceState::builder().name(state).build());
        for ips in enis {
            let mut e = InstanceNetworkInterface::builder().private_ip_address(ips[0]);
            for ip in *ips {
                e = e.private_ip_addresses(
                    InstancePrivateIpAddress::builder()
                        .private_ip_address(*ip)
                        .build(),
                );
            }
            b = b.network_interfaces(e.build());
        }
        b.build()
    }

    fn backend(ip: &str, net: &str, group: Option<&str>) -> Arc<AwsDiscovery> {
        let mut c = AwsConfig::new("cluster=prod,tier=a|b,owned");
        c.security_group = group.map(str::to_owned);
        AwsDiscovery::new(c, ctx(ip, net)).unwrap()
    }

    #[test]
    fn filters_are_tags_state_and_group() {
        let names = |fs: Vec<Filter>| -> Vec<(String, Vec<String>)> {
            fs.iter()
                .map(|f| (f.name().unwrap().to_owned(), f.values().to_vec()))
                .collect()
        };
        let d = backend("10.0.0.1", "10.0.0.0/16", Some("sg-0abc"));
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            names(d.filters(&["running"])),
            vec![
                ("tag:cluster".into(), s(&["prod"])),
                ("tag:tier".into(), s(&["a", "b"])),
                ("tag-key".into(), s(&["owned"])),
                ("instance-state-name".into(), s(&["running"])),
                ("instance.group-id".into(), s(&["sg-0abc"])),
            ]
        );
        let d = backend("10.0.0.1", "10.0.0.0/16", Some("web"));
        assert_eq!(
            names(d.filters(&["running"])).pop().unwrap(),
            ("instance.group-name".into(), s(&["web"]))
        );
    }

    #[test]
    fn every_address_inside_the_selector_is_a_candidate_and_the_rest_is_explained() {
        let d = backend("10.0.0.1", "10.0.0.0/16", None);
        let r = d.classify(&[
            instance("i-self", InstanceStateName::Running, &[&["10.0.0.1"]]),
            instance(
                "i-two",
                InstanceStateName::Running,
                &[&["10.0.0.2", "10.0.0.3"], &["10.0.1.2", "192.168.0.2"]],
            ),
            instance("i-far", InstanceStateName::Running, &[&["192.168.0.9"]]),
            instance("i-bare", InstanceStateName::Running, &[]),
            instance("i-gone", InstanceStateName::Stopping, &[&["10.0.0.9"]]),
        ]);
        let ips: Vec<String> = r.candidates.iter().map(|c| c.ip.to_string()).collect();
        assert_eq!(ips, ["10.0.0.2", "10.0.0.3", "10.0.1.2"]);
        assert!(r.candidates.iter().all(|c| c.port == 8081));
        let reasons: Vec<(&str, &str)> = r
            .excluded
            .iter()
            .map(|x| (x.id.as_str(), x.reason.as_str()))
            .collect();
        assert_eq!(reasons[0], ("i-self", "self"));
        assert_eq!(reasons[1].0, "i-far");
        assert!(reasons[1].1.contains("10.0.0.0/16") && reasons[1].1.contains("192.168.0.9"));
        assert_eq!(reasons[2], ("i-bare", "no private IPv4 address"));
        assert_eq!(reasons[3], ("i-gone", "not running"));
    }

    #[test]
    fn bad_flags_are_config_errors() {
        let c = ctx("10.0.0.1", "10.0.0.0/16");
        let e = AwsDiscovery::new(AwsConfig::new("a=1,,b"), c.clone()).unwrap_err();
        assert!(matches!(DiscoveryError::from(e), DiscoveryError::Config(_)));
        let mut cfg = AwsConfig::new("a=1");
        cfg.security_group = Some(" ".into());
        let e = AwsDiscovery::new(cfg, c).unwrap_err().to_string();
        assert!(e.contains("--aws_security_group"), "{e}");
    }

    #[test]
    fn the_refresh_loop_jitters_its_first_call() {
        let d = backend("10.0.0.1", "10.0.0.0/16", None);
        let r = d.refresh_settings(Refresh {
            interval: Duration::from_secs(10),
            ..Refresh::default()
        });
        assert_eq!(r.initial_jitter, Duration::from_secs(3));
        // Never longer than one interval, and a jitter the caller chose is kept.
        let r = d.refresh_settings(Refresh {
            interval: Duration::from_secs(1),
            ..Refresh::default()
        });
        assert_eq!(r.initial_jitter, Duration::from_secs(1));
        let r = d.refresh_settings(Refresh {
            initial_jitter: Duration::from_millis(200),
            ..Refresh::default()
        });
        assert_eq!(r.initial_jitter, Duration::from_millis(200));
    }
}
