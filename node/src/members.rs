//! `node members`: asks the local node's internal API for its members and prints them the way
//! `serf members` does, one member per line.
//!
//! The client is a minimal HTTP/1.1 GET over a `TcpStream`: one request, `Connection: close`,
//! a bounded body, plain or chunked.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::NodeError;
use crate::cli::ClusterArg;
use crate::http::{ClusterJson, MembersJson};

/// The largest body accepted; a list of 10 000 members is about 2 MB.
const MAX_BODY: usize = 16 << 20;
/// The largest answer read: the body, its header and chunk framing.
const MAX_ANSWER: usize = MAX_BODY + 64 * 1024;
/// The most hex digits a chunk size may have; `MAX_BODY` needs 7.
const MAX_CHUNK_DIGITS: usize = 8;

fn too_large() -> String {
    format!(
        "the answer is larger than {} MiB, more than any node sends: is another service listening on this port?",
        MAX_BODY >> 20
    )
}

fn unreachable(addr: SocketAddr, why: impl std::fmt::Display) -> NodeError {
    NodeError::Config(format!(
        "cannot read the members from the node's internal API at http://{addr}/v1/members: {why}. Is the node running, with the same --private_ip_selector and --private_port as given here?"
    ))
}

/// Fetches `GET /v1/members` from `addr`, within `timeout`.
pub async fn fetch(addr: SocketAddr, timeout: Duration) -> Result<MembersJson, NodeError> {
    let body = tokio::time::timeout(timeout, get(addr, "/v1/members"))
        .await
        .map_err(|_| unreachable(addr, format!("no answer within {timeout:?}")))?
        .map_err(|e| unreachable(addr, e))?;
    serde_json::from_slice(&body).map_err(|e| unreachable(addr, format!("bad JSON: {e}")))
}

/// One HTTP/1.1 GET; returns the body of a 200 answer.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
    let (code, body) = request(addr, path).await?;
    if code != 200 {
        return Err(format!("the node answered {code}"));
    }
    Ok(body)
}

/// One HTTP/1.1 GET, `Connection: close`; returns the status and the body, whatever the
/// status (`/readyz` answers 503 until the node is ready).
pub async fn request(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    (&mut s)
        .take(MAX_ANSWER as u64 + 1)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| e.to_string())?;
    if raw.len() > MAX_ANSWER {
        return Err(too_large());
    }
    parse_status(&raw)
}

/// Splits an HTTP/1.1 response into its body, which must come with status 200; decodes a
/// chunked body.
pub fn parse_response(raw: &[u8]) -> Result<Vec<u8>, String> {
    let status = raw.split(|&b| b == b'\r').next().unwrap_or_default();
    match parse_status(raw)? {
        (200, body) => Ok(body),
        _ => Err(format!(
            "the node answered {:?}",
            String::from_utf8_lossy(status)
        )),
    }
}

/// Splits an HTTP/1.1 response into its status and body; decodes a chunked body.
pub fn parse_status(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer has no complete header")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "the header is not UTF-8")?;
    let body = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let code = status.split(' ').nth(1).unwrap_or_default();
    let code: u16 = match code.parse() {
        Ok(c) if status.starts_with("HTTP/1.") && code.len() == 3 => c,
        _ => return Err(format!("not an HTTP answer: {status:?}")),
    };
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    if !chunked {
        if body.len() > MAX_BODY {
            return Err(too_large());
        }
        return Ok((code, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk size line is cut")?;
        let size_txt = std::str::from_utf8(&rest[..eol]).map_err(|_| "bad chunk size")?;
        let size_txt = size_txt.split(';').next().unwrap_or_default().trim();
        // Only hex digits, and few enough that no size can overflow: `from_str_radix` alone
        // accepts a sign, and `ffffffffffffffff` overflowed `size + 2`.
        if size_txt.is_empty()
            || size_txt.len() > MAX_CHUNK_DIGITS
            || !size_txt.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(format!(
                "bad chunk size {:?}: expected at most {MAX_CHUNK_DIGITS} hex digits",
                size_txt.escape_debug().to_string()
            ));
        }
        let size = usize::from_str_radix(size_txt, 16).map_err(|_| "bad chunk size")?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok((code, out));
        }
        if size > MAX_BODY - out.len() {
            return Err(too_large());
        }
        if rest.len() < size + 2 {
            return Err("a chunk is cut short".into());
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Keeps the asked cluster, or explains why this node is not in it.
pub fn select(all: MembersJson, cluster: Option<ClusterArg>) -> Result<MembersJson, NodeError> {
    let Some(c) = cluster else {
        return Ok(all);
    };
    let clusters: Vec<ClusterJson> = all
        .clusters
        .into_iter()
        .filter(|x| x.cluster == c.name())
        .collect();
    if clusters.is_empty() {
        return Err(NodeError::Config(format!(
            "this node is not in the {} cluster: only schedulers are; use --cluster all",
            c.name()
        )));
    }
    Ok(MembersJson { clusters })
}

fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// The text `node members` prints: per cluster a header with the version, then one line per
/// member (address, UUID, role, zone, state, age), oldest first, like `serf members`. Every string
/// came over the network, so each is escaped: none can forge a line or a terminal sequence.
pub fn render(m: &MembersJson) -> String {
    use discovery::escape_untrusted as esc;
    let mut out = String::new();
    for c in &m.clusters {
        let _ = writeln!(
            out,
            "cluster {} (port {}): ver {}, {} members",
            esc(&c.cluster),
            c.port,
            c.version,
            c.members.len()
        );
        let _ = writeln!(
            out,
            "  {:<24} {:<36}  {:<9} {:<16} {:<6} {:>7}",
            "ADDRESS", "UUID", "ROLE", "ZONE", "STATE", "AGE"
        );
        for x in &c.members {
            let this = if x.this { "  this" } else { "" };
            let _ = writeln!(
                out,
                "  {:<24} {:<36}  {:<9} {:<16} {:<6} {:>7}{this}",
                esc(&x.address),
                esc(&x.uuid),
                esc(&x.role),
                esc(x.zone.as_deref().unwrap_or("-")),
                esc(&x.state),
                age(x.age_seconds)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_and_a_chunked_body_decode_to_the_same_bytes() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_response(plain).unwrap(), b"hello");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), b"hello");
    }

    #[test]
    fn errors_name_the_status_or_the_damage() {
        let e = parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n").unwrap_err();
        assert!(e.contains("404"), "{e}");
        let e = parse_response(b"SSH-2.0-OpenSSH\r\n").unwrap_err();
        assert!(e.contains("header"), "{e}");
        let e = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nab")
            .unwrap_err();
        assert!(e.contains("cut"), "{e}");
    }

    #[test]
    fn huge_or_malformed_chunk_sizes_are_errors_not_panics() {
        let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        for size in [
            "ffffffffffffffff",
            "fffffffffffffff0",
            "+5",
            "-1",
            "",
            "1000001",
        ] {
            let raw = format!("{head}{size}\r\nab\r\n0\r\n\r\n");
            let r = std::panic::catch_unwind(|| parse_response(raw.as_bytes()));
            let e = r
                .unwrap_or_else(|_| panic!("chunk size {size:?} panicked"))
                .unwrap_err();
            assert!(
                e.contains("chunk size") || e.contains("larger"),
                "{size}: {e}"
            );
        }
        // Chunks that each fit but together pass the body bound.
        let mut raw = head.to_owned();
        let chunk = "x".repeat(1 << 20);
        for _ in 0..=(MAX_BODY >> 20) {
            raw.push_str(&format!("100000\r\n{chunk}\r\n"));
        }
        raw.push_str("0\r\n\r\n");
        let e = parse_response(raw.as_bytes()).unwrap_err();
        assert!(e.contains("larger than 16 MiB"), "{e}");
        // The largest body allowed still decodes.
        let mut raw = head.to_owned();
        for _ in 0..(MAX_BODY >> 20) {
            raw.push_str(&format!("100000\r\n{chunk}\r\n"));
        }
        raw.push_str("0\r\n\r\n");
        assert_eq!(parse_response(raw.as_bytes()).unwrap().len(), MAX_BODY);
    }

    #[test]
    fn the_table_escapes_what_the_server_sent() {
        let body = r#"{"clusters":[{"cluster":"all\n\tMember [10.0.0.9]:5701 - forged","port":9081,
            "version":3,"this":"u1","rejected":{},"members":[
            {"uuid":"u1\u001b[2J","address":"127.0.0.1:9081\n  Member [10.0.0.8]:5701",
             "role":"worker","state":"alive\r","this":true,"age_seconds":5.0}]}]}"#;
        let m: MembersJson = serde_json::from_str(body).unwrap();
        let text = render(&m);
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(!text.contains('\x1b') && !text.contains('\r'), "{text:?}");
        assert!(
            !text.lines().any(|l| l.trim_start().starts_with("Member")),
            "{text}"
        );
        assert!(
            text.contains(r"all\n\tMember [10.0.0.9]") && text.contains(r"u1\u{1b}[2J"),
            "{text}"
        );
    }

    #[test]
    fn the_table_shows_each_members_role_and_zone() {
        let body = r#"{"clusters":[{"cluster":"all","port":10081,"version":2,"this":"u1",
            "rejected":{},"members":[
            {"uuid":"u1","address":"10.0.0.1:10081","role":"scheduler","zone":"eu-west-1a",
             "state":"alive","this":true,"age_seconds":5.0},
            {"uuid":"u2","address":"10.0.0.2:10081","role":"worker","zone":"eu-west-1b\u001b[2J",
             "state":"alive","this":false,"age_seconds":65.0},
            {"uuid":"u3","address":"10.0.0.3:10081","role":"worker",
             "state":"alive","this":false,"age_seconds":1.0}]}]}"#;
        let m: MembersJson = serde_json::from_str(body).unwrap();
        let text = render(&m);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        let cells = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(cells(lines[1])[2..4], ["ROLE", "ZONE"]);
        assert_eq!(cells(lines[2])[2..4], ["scheduler", "eu-west-1a"]);
        // A zone that came over the network is escaped; a member without one shows `-`.
        assert_eq!(cells(lines[3])[2..4], ["worker", r"eu-west-1b\u{1b}[2J"]);
        assert_eq!(cells(lines[4])[2..4], ["worker", "-"]);
        assert!(!text.contains('\x1b'), "{text:?}");
    }

    #[test]
    fn ages_read_like_serf() {
        assert_eq!(age(3.7), "3s");
        assert_eq!(age(125.0), "2m5s");
        assert_eq!(age(7300.0), "2h1m");
    }
}
