//! Seeding LocalStack's EC2 through the SDK: VPCs, subnets (dual-stack too), security groups,
//! instances with tags, several interfaces or IPv6 addresses, and stopping them. Panics name
//! what failed: this is test support.

use std::net::IpAddr;
use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{
    Filter, InstanceNetworkInterfaceSpecification, ResourceType, Tag, TagSpecification,
};

/// An SDK client for `endpoint` (LocalStack's URL) in `region`; credentials come from the
/// environment (xtask sets dummy ones).
pub async fn client(endpoint: &str, region: &str) -> Client {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_owned()))
        .endpoint_url(endpoint)
        .load()
        .await;
    Client::new(&conf)
}

/// Seeds instances through the SDK.
#[derive(Debug, Clone)]
pub struct Seed {
    /// The client.
    pub ec2: Client,
    /// The VPC.
    pub vpc: String,
}

/// Instance tags for RunInstances.
pub fn tags(pairs: &[(&str, &str)]) -> TagSpecification {
    let mut spec = TagSpecification::builder().resource_type(ResourceType::Instance);
    for (k, v) in pairs {
        spec = spec.tags(Tag::builder().key(*k).value(*v).build());
    }
    spec.build()
}

impl Seed {
    /// A fresh VPC `cidr` in `region` of the EC2 at `endpoint`.
    pub async fn new(endpoint: &str, region: &str, cidr: &str) -> Self {
        Self::with_vpc(endpoint, region, cidr, false).await.0
    }

    /// A fresh VPC `cidr` with an Amazon-provided IPv6 /56; returns the seed and the /56.
    pub async fn dual_stack(endpoint: &str, region: &str, cidr: &str) -> (Self, String) {
        let (seed, v6) = Self::with_vpc(endpoint, region, cidr, true).await;
        (seed, v6.expect("the vpc's IPv6 block"))
    }

    async fn with_vpc(
        endpoint: &str,
        region: &str,
        cidr: &str,
        ipv6: bool,
    ) -> (Self, Option<String>) {
        let ec2 = client(endpoint, region).await;
        let out = ec2
            .create_vpc()
            .cidr_block(cidr)
            .amazon_provided_ipv6_cidr_block(ipv6)
            .send()
            .await
            .expect("create vpc");
        let vpc = out.vpc().expect("vpc");
        let v6 = vpc
            .ipv6_cidr_block_association_set()
            .first()
            .and_then(|a| a.ipv6_cidr_block())
            .map(str::to_owned);
        let seed = Self {
            ec2,
            vpc: vpc.vpc_id().expect("vpc id").to_owned(),
        };
        (seed, v6)
    }

    /// A subnet with `cidr` and the first /64 of the VPC's IPv6 block `vpc6`; returns its id
    /// and the /64.
    pub async fn dual_stack_subnet(&self, cidr: &str, vpc6: &str) -> (String, String) {
        let prefix = vpc6.replace("/56", "/64");
        (self.create_subnet(cidr, Some(&prefix)).await, prefix)
    }

    /// The availability zone of a subnet.
    pub async fn subnet_zone(&self, subnet: &str) -> String {
        self.ec2
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await
            .expect("describe subnets")
            .subnets()
            .first()
            .and_then(|s| s.availability_zone())
            .expect("the subnet's zone")
            .to_owned()
    }

    /// One running instance with this private IPv4, one IPv6 address the subnet picks, and
    /// these tags; returns its id.
    pub async fn dual_stack_instance(
        &self,
        subnet: &str,
        ip: &str,
        pairs: &[(&str, &str)],
    ) -> String {
        self.run_one(subnet, ip, pairs, None, Some(1)).await
    }

    /// The IPv6 addresses of these instances' interfaces, sorted.
    pub async fn ipv6_of(&self, ids: &[String]) -> Vec<IpAddr> {
        let out = self
            .ec2
            .describe_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .expect("describe");
        let mut v: Vec<IpAddr> = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .flat_map(|i| i.network_interfaces())
            .flat_map(|e| e.ipv6_addresses())
            .filter_map(|a| a.ipv6_address()?.parse().ok())
            .collect();
        v.sort();
        v
    }

    /// A subnet of the VPC.
    pub async fn subnet(&self, cidr: &str) -> String {
        self.create_subnet(cidr, None).await
    }

    async fn create_subnet(&self, cidr: &str, ipv6: Option<&str>) -> String {
        self.ec2
            .create_subnet()
            .vpc_id(&self.vpc)
            .cidr_block(cidr)
            .set_ipv6_cidr_block(ipv6.map(str::to_owned))
            .send()
            .await
            .unwrap_or_else(|e| panic!("create subnet {cidr} {ipv6:?}: {e:?}"))
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
        self.run_one(subnet, ip, pairs, group, None).await
    }

    /// One running instance, with `ipv6` addresses picked by the subnet when given.
    async fn run_one(
        &self,
        subnet: &str,
        ip: &str,
        pairs: &[(&str, &str)],
        group: Option<&str>,
        ipv6: Option<i32>,
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
            .set_ipv6_address_count(ipv6)
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
