//! The membership engine: SWIM per logical cluster, a versioned member list, and its log format.
//!
//! This crate knows nothing about clouds or discovery: it takes candidate addresses and turns
//! datagrams and time into member-list changes. See [`Engine`] for the protocol and [`sim`]
//! for the deterministic simulator that tests it.

mod config;
pub mod engine;
pub mod id;
mod index;
mod joins;
mod lifeguard;
pub mod list;
mod sequencer;
pub mod sim;
mod timers;
pub mod wire;

pub use engine::{Config, Engine, Output, PROBE_RTT_BOUNDS, Stats};
pub use id::{NodeId, Role, Zone};
pub use list::{LoggedList, LoggedMember, MemberList, parse_logged_lists};

/// Why a message was dropped or could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Decode(&'static str),
    /// A message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(&'static str),
    /// The message belongs to another cluster name or logical cluster.
    #[error("message from another cluster")]
    ForeignCluster,
    /// The message is in another wire format version: a node of another release.
    #[error(
        "message in wire format version {0}, this node speaks {version}: run the same release \
         on every node",
        version = wire::VERSION
    )]
    WireVersion(u8),
    /// foca refused the message.
    #[error("swim protocol: {0}")]
    Swim(String),
    /// A zone is not a Kubernetes label value; the text says which rule it breaks (the zone
    /// itself is never repeated, since it may come from the network).
    #[error(
        "invalid zone: {0}; a zone is 1 to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
    )]
    Zone(&'static str),
    /// A [`Config`] breaks a constraint its fields state; the text names the field.
    #[error("invalid engine configuration: {0}")]
    Config(&'static str),
    /// The message is well formed but not acceptable from where it came; the label says why
    /// (for example `spoofed_source`: the sender it names is not at the packet's source).
    #[error("message refused: {0}")]
    Refused(&'static str),
}

impl MembershipError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            MembershipError::Decode(_) => "malformed",
            MembershipError::Encode(_) => "encode",
            MembershipError::ForeignCluster => "foreign_cluster",
            MembershipError::WireVersion(_) => "wire_version",
            MembershipError::Swim(_) => "swim",
            MembershipError::Zone(_) => "bad_zone",
            MembershipError::Config(_) => "config",
            MembershipError::Refused(label) => label,
        }
    }
}
