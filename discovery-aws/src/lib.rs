//! EC2 discovery: running instances that carry the cluster's tags, found with DescribeInstances.
//!
//! Filtering happens on the server (`tag:`/`tag-key`, `instance-state-name=running`, the
//! security group), every page is read (`MaxResults` 1000 and `NextToken`), and each instance
//! becomes one candidate: its lowest private address of the node's family (IPv4, or the
//! interfaces' IPv6 addresses when the node's private IP is IPv6) inside
//! `--private_ip_selector` ([`discovery::Context::classify_host`]), with its availability zone
//! and, when its `role` tag says so, its role. Pages are published as they arrive until the
//! first round completes ([`Discover::discover_pages`]). Throttling and 5xx answers are retried
//! with [`discovery::Retry`]; the refresh loop keeps the last good set through any failure, and
//! its first call is jittered so that a fleet starting at once does not stampede the API.

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
    BoxFuture, Candidate, Context, Discover, DiscoveryError, Exclusion, OnPage, Refresh,
    RefreshObserver, Report, Role, Snapshot, poll_loop,
};
use tokio::sync::{OnceCell, watch};

mod region;
mod tags;

pub use discovery::Retry;
pub use region::{
    AwsEnv, MAX_ZONE_LEN, METADATA_DISABLED_ENV, METADATA_ENDPOINT_ENV, METADATA_MODE_ENV,
    REGION_ENV, local_zone, region_from_document, resolve_region, zone_name,
};
pub use tags::{TagFilter, parse_tags};

const BACKEND: &str = "aws";
/// DescribeInstances' largest page.
pub const MAX_RESULTS: i32 = 1000;
/// A bound on pages per round: 1000 pages of up to 1000 reservations each.
const MAX_PAGES: usize = 1000;
/// The tag whose value (`scheduler` or `worker`) is a candidate's role, as in
/// `deploy/aws/launch-template.json`.
pub const ROLE_TAG: &str = "role";

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
    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT` is not a usable URL.
    #[error(
        "invalid instance metadata endpoint `{endpoint}`: fix or unset AWS_EC2_METADATA_SERVICE_ENDPOINT"
    )]
    ImdsEndpoint {
        /// The endpoint.
        endpoint: String,
        /// The SDK's reason.
        #[source]
        source: discovery::BoxError,
    },
    /// No region was given and the instance metadata service could not tell it.
    #[error(
        "cannot determine the AWS region: {reason}; set --aws_region or AWS_REGION, or run on EC2 with IMDSv2 reachable"
    )]
    NoRegion {
        /// What was tried.
        reason: String,
        /// The failure underneath, if any.
        #[source]
        source: Option<discovery::BoxError>,
    },
}

impl From<AwsError> for DiscoveryError {
    fn from(e: AwsError) -> Self {
        match e {
            AwsError::NoRegion { .. } => DiscoveryError::Unreachable {
                backend: BACKEND,
                message: "no region".into(),
                source: Some(Box::new(e)),
            },
            other => DiscoveryError::Config(Box::new(other)),
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
    /// Retries of one DescribeInstances page.
    pub retry: Retry,
    /// The first refresh waits a random time up to this long (capped at the refresh interval).
    pub initial_jitter: Duration,
    /// The limit for one DescribeInstances call.
    pub call_timeout: Duration,
    /// The variables of the region chain and IMDS (`AWS_REGION`, `AWS_EC2_METADATA_*`).
    pub env: AwsEnv,
    /// The tag that names an instance's role, `None` to ignore roles.
    pub role_tag: Option<String>,
}

impl AwsConfig {
    /// Settings with the given tags, the process environment and every other field at its
    /// default.
    pub fn new(tags: impl Into<String>) -> Self {
        Self {
            region: None,
            tags: tags.into(),
            security_group: None,
            endpoint: None,
            retry: Retry::default(),
            initial_jitter: Duration::from_secs(3),
            call_timeout: Duration::from_secs(30),
            env: AwsEnv::from_process(),
            role_tag: Some(ROLE_TAG.to_owned()),
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

/// The instance states other than running, which `explain` names.
const NOT_RUNNING: &[&str] = &[
    "pending",
    "stopping",
    "stopped",
    "shutting-down",
    "terminated",
];

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
                let region =
                    resolve_region(self.config.region.clone(), &self.config.env).await?;
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

    /// Every instance that the filters select, through every page; `on_page` sees each page's
    /// instances as they arrive.
    async fn describe(
        &self,
        filters: Vec<Filter>,
        on_page: &mut (dyn FnMut(&[Instance]) + Send),
    ) -> Result<Vec<Instance>, DiscoveryError> {
        let client = self.client().await?;
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = self
                .config
                .retry
                .run(
                    BACKEND,
                    "DescribeInstances",
                    || {
                        let call = client
                            .describe_instances()
                            .set_filters(Some(filters.clone()))
                            .max_results(MAX_RESULTS)
                            .set_next_token(token.clone());
                        async move { call.send().await.map_err(map_error) }
                    },
                    DiscoveryError::is_transient,
                )
                .await?;
            let start = out.len();
            for r in page.reservations() {
                out.extend(r.instances().iter().cloned());
            }
            on_page(&out[start..]);
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

    /// The cheap round: running instances only, `on_page` called with each page's candidates.
    async fn running(&self, on_page: Option<OnPage<'_>>) -> Result<Report, DiscoveryError> {
        let mut publish = |page: &[Instance]| {
            if let Some(f) = on_page {
                let r = self.classify(page);
                if !r.candidates.is_empty() {
                    f(&r.candidates);
                }
            }
        };
        let running = self
            .describe(self.filters(&["running"]), &mut publish)
            .await?;
        Ok(self.classify(&running))
    }

    /// The explained round: the running instances, and a second query for the tagged
    /// instances that are not running, so that `node discover` can say why they are skipped.
    async fn explained(&self) -> Result<Report, DiscoveryError> {
        let mut report = self.running(None).await?;
        let others = self
            .describe(self.filters(NOT_RUNNING), &mut |_| {})
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

    /// Turns instances into candidates and exclusions: one candidate per running instance
    /// ([`Context::classify_host`]), with its zone and role.
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
            match self
                .ctx
                .classify_host(id, &private_ips(i), self.ctx.private_port)
            {
                Ok(c) => report.candidates.push(Candidate {
                    zone: instance_zone(i),
                    role: self.role(i),
                    ..c
                }),
                Err(x) => report.excluded.push(x),
            }
        }
        report.candidates.sort_by_key(|a| a.ip);
        report.candidates.dedup_by(|a, b| a.ip == b.ip);
        report
    }

    /// The role the instance's role tag names, if it names one.
    fn role(&self, i: &Instance) -> Option<Role> {
        let key = self.config.role_tag.as_deref()?;
        let value = i.tags().iter().find(|t| t.key() == Some(key))?.value()?;
        match value.trim() {
            v if v.eq_ignore_ascii_case("scheduler") => Some(Role::Scheduler),
            v if v.eq_ignore_ascii_case("worker") => Some(Role::Worker),
            _ => None,
        }
    }
}

/// The instance id, or a placeholder.
fn instance_id(i: &Instance) -> String {
    i.instance_id().unwrap_or("i-unknown").to_owned()
}

/// The instance's availability zone, when it is a well-formed zone name.
fn instance_zone(i: &Instance) -> Option<String> {
    i.placement()
        .and_then(|p| p.availability_zone())
        .and_then(zone_name)
}

/// Every private IPv4 and every IPv6 address of every network interface, plus the instance's
/// primary ones (the only ones when the answer lists no interfaces); sorted, without repeats.
pub fn private_ips(i: &Instance) -> Vec<IpAddr> {
    let parse = |s: Option<&str>| s.and_then(|s| s.parse::<IpAddr>().ok());
    let mut out: Vec<IpAddr> = Vec::new();
    for eni in i.network_interfaces() {
        out.extend(
            eni.private_ip_addresses()
                .iter()
                .filter_map(|a| parse(a.private_ip_address())),
        );
        out.extend(parse(eni.private_ip_address()));
        out.extend(
            eni.ipv6_addresses()
                .iter()
                .filter_map(|a| parse(a.ipv6_address())),
        );
    }
    out.extend(parse(i.private_ip_address()));
    out.extend(parse(i.ipv6_address()));
    out.sort();
    out.dedup();
    out
}

/// Sorts an SDK failure into the discovery error kinds; a failure to reach EC2 keeps the SDK
/// error as its source.
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
        SdkError::ConstructionFailure(_) => DiscoveryError::Config(Box::new(Request(e))),
        _ => {
            let text = discovery::Chain(&e).to_string();
            let message = if text.contains("credentials") {
                "no AWS credentials were found: use an instance role allowed to call ec2:DescribeInstances, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            } else {
                "DescribeInstances failed; check --aws_endpoint, --aws_region and the network path to EC2"
            };
            DiscoveryError::Unreachable {
                backend: BACKEND,
                message: message.into(),
                source: Some(Box::new(e)),
            }
        }
    }
}

/// A DescribeInstances request the SDK could not build, kept with its cause.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the DescribeInstances request")]
struct Request(#[source] SdkError<DescribeInstancesError, HttpResponse>);

impl Discover for AwsDiscovery {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn discover(&self) -> BoxFuture<'_, Result<Report, DiscoveryError>> {
        Box::pin(self.running(None))
    }

    fn explain(&self) -> BoxFuture<'_, Result<Report, DiscoveryError>> {
        Box::pin(self.explained())
    }

    fn discover_pages<'a>(
        &'a self,
        on_page: OnPage<'a>,
    ) -> BoxFuture<'a, Result<Report, DiscoveryError>> {
        Box::pin(self.running(Some(on_page)))
    }

    fn local_zone(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(local_zone(&self.config.env))
    }

    fn watch(
        self: Arc<Self>,
        refresh: Refresh,
        tx: watch::Sender<Snapshot>,
        observer: Arc<dyn RefreshObserver>,
    ) -> BoxFuture<'static, ()> {
        let refresh = self.refresh_settings(refresh);
        Box::pin(poll_loop(self, refresh, tx, observer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::{
        InstanceIpv6Address, InstanceNetworkInterface, InstancePrivateIpAddress, InstanceState,
        Placement, Tag,
    };

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
    fn each_instance_is_its_lowest_address_inside_the_selector_and_the_rest_is_explained() {
        let d = backend("10.0.0.1", "10.0.0.0/16", None);
        let r = d.classify(&[
            instance("i-self", InstanceStateName::Running, &[&["10.0.0.1"]]),
            instance(
                "i-two",
                InstanceStateName::Running,
                &[&["10.0.0.3", "10.0.0.2"], &["10.0.1.2", "192.168.0.2"]],
            ),
            instance("i-far", InstanceStateName::Running, &[&["192.168.0.9"]]),
            instance("i-bare", InstanceStateName::Running, &[]),
            instance("i-gone", InstanceStateName::Stopping, &[&["10.0.0.9"]]),
        ]);
        let ips: Vec<String> = r.candidates.iter().map(|c| c.ip.to_string()).collect();
        assert_eq!(ips, ["10.0.0.2"]);
        assert_eq!(r.candidates[0].id.as_deref(), Some("i-two"));
        assert!(r.candidates.iter().all(|c| c.port == 8081));
        let reasons: Vec<(&str, &str)> = r
            .excluded
            .iter()
            .map(|x| (x.id.as_str(), x.reason.as_str()))
            .collect();
        assert_eq!(reasons[0], ("i-self", "self"));
        assert_eq!(reasons[1].0, "i-far");
        assert!(reasons[1].1.contains("10.0.0.0/16") && reasons[1].1.contains("192.168.0.9"));
        assert_eq!(reasons[2], ("i-bare", "no private address"));
        assert_eq!(reasons[3], ("i-gone", "not running"));
    }

    fn tagged(i: Instance, zone: Option<&str>, tags: &[(&str, &str)]) -> Instance {
        let mut b = i.into_builder_parts();
        if let Some(z) = zone {
            b = b.placement(Placement::builder().availability_zone(z).build());
        }
        for (k, v) in tags {
            b = b.tags(Tag::builder().key(*k).value(*v).build());
        }
        b.build()
    }

    /// `Instance` has no `to_builder`; rebuild the fields these tests set.
    trait Parts {
        fn into_builder_parts(self) -> aws_sdk_ec2::types::builders::InstanceBuilder;
    }

    impl Parts for Instance {
        fn into_builder_parts(self) -> aws_sdk_ec2::types::builders::InstanceBuilder {
            Instance::builder()
                .set_instance_id(self.instance_id().map(str::to_owned))
                .set_state(self.state().cloned())
                .set_network_interfaces(Some(self.network_interfaces().to_vec()))
        }
    }

    #[test]
    fn candidates_carry_their_zone_and_the_role_their_tag_names() {
        let d = backend("10.0.0.1", "10.0.0.0/16", None);
        let run = |id, ip| instance(id, InstanceStateName::Running, &[&[ip]]);
        let r = d.classify(&[
            tagged(
                run("i-s", "10.0.0.2"),
                Some("eu-west-3a"),
                &[("role", "scheduler")],
            ),
            tagged(
                run("i-w", "10.0.0.3"),
                Some("eu-west-3b"),
                &[("role", " Worker ")],
            ),
            tagged(
                run("i-x", "10.0.0.4"),
                Some("EU\u{1b}[31m"),
                &[("role", "boss")],
            ),
            run("i-n", "10.0.0.5"),
        ]);
        let got: Vec<(Option<&str>, Option<Role>)> = r
            .candidates
            .iter()
            .map(|c| (c.zone.as_deref(), c.role))
            .collect();
        assert_eq!(
            got,
            [
                (Some("eu-west-3a"), Some(Role::Scheduler)),
                (Some("eu-west-3b"), Some(Role::Worker)),
                // A zone that is not a zone name and a role that is not a role are dropped.
                (None, None),
                (None, None),
            ]
        );
        // Without a role tag, roles are not read.
        let mut c = AwsConfig::new("cluster=prod");
        c.role_tag = None;
        let d = AwsDiscovery::new(c, ctx("10.0.0.1", "10.0.0.0/16")).unwrap();
        let r = d.classify(&[tagged(
            run("i-s", "10.0.0.2"),
            None,
            &[("role", "scheduler")],
        )]);
        assert_eq!(r.candidates[0].role, None);
    }

    fn dual_stack(id: &str, v4: &str, v6: &[&str]) -> Instance {
        let mut e = InstanceNetworkInterface::builder().private_ip_address(v4);
        for a in v6 {
            e = e.ipv6_addresses(InstanceIpv6Address::builder().ipv6_address(*a).build());
        }
        Instance::builder()
            .instance_id(id)
            .state(
                InstanceState::builder()
                    .name(InstanceStateName::Running)
                    .build(),
            )
            .network_interfaces(e.build())
            .build()
    }

    #[test]
    fn an_ipv6_node_gets_the_ipv6_addresses_of_the_interfaces() {
        let v6 = Context::standalone(
            "t",
            Role::Worker,
            "2001:2::a".parse().unwrap(),
            8081,
            Some("2001:2::/48".parse().unwrap()),
        );
        let d = AwsDiscovery::new(AwsConfig::new("cluster=prod"), v6).unwrap();
        let instances = [
            dual_stack("i-a", "10.0.0.2", &["2001:2::c", "2001:2::b"]),
            dual_stack("i-self", "10.0.0.3", &["2001:2::a"]),
            dual_stack("i-v4", "10.0.0.4", &[]),
            dual_stack("i-out", "10.0.0.5", &["2001:db8::5"]),
        ];
        let r = d.classify(&instances);
        let ips: Vec<String> = r.candidates.iter().map(|c| c.ip.to_string()).collect();
        assert_eq!(ips, ["2001:2::b"]);
        let reasons: Vec<&str> = r.excluded.iter().map(|x| x.reason.as_str()).collect();
        assert_eq!(reasons[0], "self");
        assert!(
            reasons[1].starts_with("no IPv6 address inside"),
            "{reasons:?}"
        );
        assert!(reasons[2].contains("2001:db8::5"), "{reasons:?}");
        // The same instances for an IPv4 node: their IPv4 addresses.
        let d = backend("10.0.0.1", "10.0.0.0/16", None);
        let ips: Vec<String> = d
            .classify(&instances)
            .candidates
            .iter()
            .map(|c| c.ip.to_string())
            .collect();
        assert_eq!(ips, ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]);
    }

    #[test]
    fn a_region_failure_is_transient_and_keeps_its_cause() {
        let e = DiscoveryError::from(AwsError::NoRegion {
            reason: "IMDSv2 failed".into(),
            source: Some("connection refused".into()),
        });
        assert!(e.is_transient());
        let text = discovery::Chain(&e).to_string();
        assert!(
            text.contains("--aws_region") && text.ends_with("connection refused"),
            "{text}"
        );
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
