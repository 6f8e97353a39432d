//! Dead-link detection for the long-lived sockets (websocket, MQTT): TCP keepalive probes and
//! `TCP_USER_TIMEOUT`, so a peer that vanished (cellular IP change, NAT timeout, a pulled
//! cable) is noticed within a minute instead of after the kernel's 15 minutes or more of
//! retransmissions.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// An idle link is probed after this long...
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(20);
/// ...every this long...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ...and declared dead after this many unanswered probes (50 s in all).
pub const KEEPALIVE_PROBES: u32 = 3;
/// Data left unacknowledged this long ends the connection.
pub const USER_TIMEOUT: Duration = Duration::from_secs(45);

/// Rule: every long-lived socket gets keepalive probes and a user timeout.
pub fn harden(sock: SockRef<'_>) -> io::Result<()> {
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(Some(USER_TIMEOUT))
}

/// Hardens this process's TCP sockets connected to one of `peers` that are not hardened yet;
/// returns how many. rumqttc 0.25 does not hand out its socket, so the MQTT connection is
/// found among the process's descriptors by its peer address after it connected.
pub fn harden_sockets_to(peers: &[SocketAddr]) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let mut hardened = 0;
    for entry in dir.flatten() {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // Work on a duplicate this function owns, so the descriptor cannot be closed under
        // it. If the number was reused meanwhile, the peer check below skips it.
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) has no memory effects; it returns -1 or a new fd.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            continue;
        }
        // SAFETY: `dup` is a fresh descriptor nothing else owns; OwnedFd closes it.
        let fd = unsafe { OwnedFd::from_raw_fd(dup) };
        let sock = SockRef::from(&fd);
        let wanted = sock
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| peers.contains(&a));
        if wanted && !sock.keepalive().unwrap_or(true) && harden(sock).is_ok() {
            hardened += 1;
        }
    }
    hardened
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hardened_socket_has_keepalive_and_a_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let sock = SockRef::from(&client);
        assert!(!sock.keepalive().unwrap());
        assert_eq!(harden_sockets_to(&[addr]), 1);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        // Already hardened: left alone.
        assert_eq!(harden_sockets_to(&[addr]), 0);
    }
}
