//! The command line: every flag, its default and its `NODE_*` environment variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use ipnetwork::IpNetwork;

use crate::backends;
use crate::ports;

/// Starts a scheduler or worker and joins its clusters.
#[derive(Debug, Parser)]
#[command(name = "node", version, about, long_about = None)]
pub struct Cli {
    /// What to do; `run` when absent.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The node's settings.
    #[command(flatten)]
    pub flags: Flags,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node (the default).
    Run,
    /// Run the configured discovery backend once and print what it found and skipped.
    Discover {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a new random cluster key (base64) for a --cluster_key_file.
    Keygen,
    /// Ask the local node (its internal API on --private_ip_selector and --private_port) for its
    /// members: address, UUID, role, state and age, and the list version.
    Members {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Only this cluster; every cluster the node is in when absent.
        #[arg(long, value_enum)]
        cluster: Option<ClusterArg>,
    },
}

/// A logical cluster, for `node members --cluster`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClusterArg {
    /// The schedulers' cluster (private_port + 1000).
    Scheduler,
    /// The all-instances cluster (private_port + 2000).
    All,
}

impl ClusterArg {
    /// The logical cluster it names.
    pub fn logical(self) -> &'static crate::logical::Logical {
        match self {
            ClusterArg::Scheduler => &crate::logical::SCHEDULER,
            ClusterArg::All => &crate::logical::ALL,
        }
    }

    /// The name the internal API uses.
    pub fn name(self) -> &'static str {
        self.logical().name
    }
}

/// How records on stderr look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line per record; a member list keeps its lines.
    Text,
    /// One JSON object per line, for pods and log shippers.
    Json,
}

/// Where records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogTarget {
    /// journald when systemd connected stderr to the journal (JOURNAL_STREAM), else stderr.
    Auto,
    /// Standard error, in --log_format.
    Stderr,
    /// journald's native protocol: one journal entry per record.
    Journald,
}

/// Logging settings; levels come from `RUST_LOG` (default `info`).
#[derive(Debug, Clone, Args)]
pub struct LogFlags {
    /// Format of records on stderr.
    #[arg(long = "log_format", env = "NODE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Where records go.
    #[arg(long = "log_target", env = "NODE_LOG_TARGET", value_enum, default_value_t = LogTarget::Auto, global = true)]
    pub log_target: LogTarget,

    /// SYSLOG_IDENTIFIER of journal entries written through journald's native protocol.
    #[arg(
        long = "syslog_identifier",
        env = "NODE_SYSLOG_IDENTIFIER",
        default_value = "node",
        global = true
    )]
    pub syslog_identifier: String,
}

/// The node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Serves clients; joins the scheduler and all-instances clusters.
    Scheduler,
    /// Joins the all-instances cluster.
    Worker,
}

/// The discovery backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiscoveryArg {
    /// Labelled GCE instances, through the Compute API.
    Gcp,
    /// Tagged EC2 instances, through DescribeInstances.
    Aws,
    /// Pods, through the Kubernetes API.
    K8s,
    /// Announcements on a multicast group.
    Multicast,
    /// A fixed list, `--static_members`.
    Static,
}

impl DiscoveryArg {
    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            DiscoveryArg::Gcp => "gcp",
            DiscoveryArg::Aws => "aws",
            DiscoveryArg::K8s => "k8s",
            DiscoveryArg::Multicast => "multicast",
            DiscoveryArg::Static => "static",
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 10s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("`{s}`: use the units ms, s or m")),
    };
    if !(0.1..=3600.0).contains(&secs) {
        return Err(format!("`{s}` must be between 100ms and 60m"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `--min_cluster_size`: at least 1 (this node), at most the largest cluster supported.
fn parse_min_cluster_size(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number of members such as 3"))?;
    if !(1..=10_000).contains(&n) {
        return Err(format!(
            "`{s}` must be between 1 (this node alone) and 10000 members"
        ));
    }
    Ok(n)
}

/// `--max_members`: from 2 to the 10 000 members a message may name.
fn parse_max_members(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number of members such as 1024"))?;
    if !(2..=10_000).contains(&n) {
        return Err(format!("`{s}` must be between 2 and 10000 members"));
    }
    Ok(n)
}

/// `--zone`: a Kubernetes label value, as membership checks every zone it carries.
fn parse_zone(s: &str) -> Result<membership::Zone, String> {
    membership::Zone::new(s.trim()).map_err(|e| e.to_string())
}

/// `--private_port` when not given: the internal API; the clusters' ports derive from it.
pub const DEFAULT_PRIVATE_PORT: u16 = 8081;

/// Every setting of a node. Each flag can also come from `NODE_<FLAG>`.
#[derive(Debug, Clone, Args)]
pub struct Flags {
    /// The node's role.
    #[arg(long = "role", env = "NODE_ROLE", value_enum, default_value_t = RoleArg::Worker, global = true)]
    pub role: RoleArg,

    /// How peers are found.
    #[arg(long = "discovery", env = "NODE_DISCOVERY", value_enum, default_value_t = DiscoveryArg::Static, global = true)]
    pub discovery: DiscoveryArg,

    /// CIDR that holds this node's private IP, IPv4 or IPv6; when absent, the host's only private address.
    #[arg(
        long = "private_ip_selector",
        env = "NODE_PRIVATE_IP_SELECTOR",
        global = true
    )]
    pub private_ip_selector: Option<IpNetwork>,

    /// Internal API port; the scheduler cluster uses +1000 and the all-instances cluster +2000.
    #[arg(long = "private_port", env = "NODE_PRIVATE_PORT", default_value_t = DEFAULT_PRIVATE_PORT, value_parser = ports::parse_private_port, global = true)]
    pub private_port: u16,

    /// Client port of schedulers.
    #[arg(long = "public_port", env = "NODE_PUBLIC_PORT", default_value = "8080", value_parser = ports::parse_port, global = true)]
    pub public_port: u16,

    /// Bind the public port on every interface; false binds the private IP only.
    #[arg(long = "public_bind_to_any", env = "NODE_PUBLIC_BIND_TO_ANY", default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", global = true)]
    pub public_bind_to_any: bool,

    /// Nodes with another cluster name are never merged.
    #[arg(
        long = "cluster_name",
        env = "NODE_CLUSTER_NAME",
        default_value = "default",
        global = true
    )]
    pub cluster_name: String,

    /// How often discovery runs again after start-up (e.g. 10s, 500ms, 2m).
    #[arg(long = "discovery_refresh", env = "NODE_DISCOVERY_REFRESH", default_value = "10s", value_parser = parse_duration, global = true)]
    pub discovery_refresh: Duration,

    /// Start-up gate: /readyz and systemd's READY wait until the all-instances cluster holds
    /// this many members (this node included); 1 means ready once discovery has answered.
    #[arg(long = "min_cluster_size", env = "NODE_MIN_CLUSTER_SIZE", default_value = "1", value_parser = parse_min_cluster_size, global = true)]
    pub min_cluster_size: usize,

    /// Most members one logical cluster admits; syncs and gossip beyond it add no one, so a
    /// flood of forged identities costs bounded memory. Down members count against twice it.
    #[arg(long = "max_members", env = "NODE_MAX_MEMBERS", default_value = "1024", value_parser = parse_max_members, global = true)]
    pub max_members: usize,

    /// This node's availability zone, shown with it in every member's lists, API and metrics;
    /// when absent, the platform's (EC2, GCE, the Kubernetes node's label), if it answers
    /// within 2 s.
    #[arg(long = "zone", env = "NODE_ZONE", value_parser = parse_zone, global = true)]
    pub zone: Option<membership::Zone>,

    /// File of base64 cluster keys, one per line: the first seals, all open; re-read on SIGHUP.
    /// Without it, cluster traffic is neither authenticated nor encrypted.
    #[arg(
        long = "cluster_key_file",
        env = "NODE_CLUSTER_KEY_FILE",
        global = true
    )]
    pub cluster_key_file: Option<PathBuf>,

    /// Static discovery.
    #[command(flatten, next_help_heading = "Static discovery (--discovery=static)")]
    pub static_: backends::static_::StaticFlags,

    /// GCP discovery.
    #[command(flatten, next_help_heading = "GCP discovery (--discovery=gcp)")]
    pub gcp: backends::gcp::GcpFlags,

    /// Kubernetes discovery.
    #[command(flatten, next_help_heading = "Kubernetes discovery (--discovery=k8s)")]
    pub k8s: backends::k8s::K8sFlags,

    /// Multicast discovery.
    #[command(
        flatten,
        next_help_heading = "Multicast discovery (--discovery=multicast)"
    )]
    pub multicast: backends::multicast::MulticastFlags,

    /// Logging.
    #[command(
        flatten,
        next_help_heading = "Logging (levels from RUST_LOG, default info)"
    )]
    pub log: LogFlags,
    /// EC2 discovery.
    #[command(flatten, next_help_heading = "EC2 discovery (--discovery=aws)")]
    pub aws: backends::aws::AwsFlags,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("node").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_work_without_flags() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.flags.role, RoleArg::Worker);
        assert_eq!(c.flags.private_port, 8081);
        assert_eq!(c.flags.public_port, 8080);
        assert!(c.flags.public_bind_to_any);
        assert_eq!(c.flags.cluster_name, "default");
        assert_eq!(c.flags.discovery_refresh, Duration::from_secs(10));
    }

    #[test]
    fn underscored_spellings_and_explicit_booleans() {
        let c = parse(&[
            "--role",
            "scheduler",
            "--private_ip_selector",
            "fd00::/8",
            "--public_bind_to_any=false",
            "--discovery_refresh",
            "500ms",
            "discover",
            "--json",
        ])
        .unwrap();
        assert_eq!(c.flags.role, RoleArg::Scheduler);
        assert!(!c.flags.public_bind_to_any);
        assert_eq!(c.flags.discovery_refresh, Duration::from_millis(500));
        assert!(matches!(c.command, Some(Command::Discover { json: true })));
    }

    #[test]
    fn bad_values_name_the_problem() {
        let e = parse(&["--private_port", "64000"]).unwrap_err().to_string();
        assert!(e.contains("65000") && e.contains("66000"), "{e}");
        let e = parse(&["--private_ip_selector", "10.0.0.0/33"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--private_ip_selector"), "{e}");
        let e = parse(&["--discovery_refresh", "10h"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ms, s or m"), "{e}");
        let e = parse(&["--discovery", "consul"]).unwrap_err().to_string();
        assert!(e.contains("gcp") && e.contains("static"), "{e}");
        for bad in ["1", "x", "10001"] {
            let e = parse(&["--max_members", bad]).unwrap_err().to_string();
            assert!(e.contains("--max_members"), "{bad}: {e}");
        }
        assert_eq!(parse(&[]).unwrap().flags.max_members, 1024);
        for bad in ["0", "-1", "three", "10001"] {
            let e = parse(&[&format!("--min_cluster_size={bad}")])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--min_cluster_size"), "{bad}: {e}");
        }
        assert_eq!(parse(&[]).unwrap().flags.min_cluster_size, 1);
        let c = parse(&["--min_cluster_size", "3"]).unwrap();
        assert_eq!(c.flags.min_cluster_size, 3);
    }

    #[test]
    fn a_zone_is_checked_like_every_zone_membership_carries() {
        assert_eq!(parse(&[]).unwrap().flags.zone, None);
        let c = parse(&["--zone", "europe-west1-b"]).unwrap();
        assert_eq!(c.flags.zone.unwrap().as_str(), "europe-west1-b");
        for bad in ["", "-a", "a b", "zone\u{1b}", &"z".repeat(64)] {
            let e = parse(&[&format!("--zone={bad}")]).unwrap_err().to_string();
            assert!(
                e.contains("--zone") && e.contains("invalid zone"),
                "{bad:?}: {e}"
            );
        }
    }
}
