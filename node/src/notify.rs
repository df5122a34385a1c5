//! `sd_notify`: tells systemd (a `Type=notify` unit) that the node is ready or stopping.
//!
//! The protocol is one datagram of `KEY=value` lines to the unix socket named by
//! `NOTIFY_SOCKET`; a name starting with `@` is in the abstract namespace.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `READY=1`) to `socket`, a `NOTIFY_SOCKET` value.
pub fn notify_to(socket: &str, state: &str) -> io::Result<()> {
    let addr = if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        SocketAddr::from_abstract_name(name.as_bytes())?
    } else {
        SocketAddr::from_pathname(socket)?
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// Sends `state` to systemd when `NOTIFY_SOCKET` is set; returns whether it was sent.
/// A failure is logged, never fatal: the node works without systemd.
pub fn notify(state: &str) -> bool {
    let Ok(socket) = std::env::var("NOTIFY_SOCKET") else {
        return false;
    };
    match notify_to(&socket, state) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("cannot notify systemd at NOTIFY_SOCKET={socket}: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_arrives_as_one_datagram_on_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("node-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1\nSTATUS=ok").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=ok");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_abstract_socket_is_reached_by_its_at_name() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("node-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        assert!(notify_to("/nonexistent/notify.sock", "READY=1").is_err());
    }
}
