//! The resource model: what the configured limits can need at most, checked against the
//! service unit's ceilings.

use std::time::Duration;

use super::schema::RawLimits;
use super::{AgentLimits, ConfigError, err};

/// The systemd unit's ceilings (packaging/systemd/securetunnel-agent.service; a test keeps
/// them equal).
pub const UNIT_LIMIT_NOFILE: u64 = 8192;
pub const UNIT_MEMORY_MAX: u64 = 128 << 20;
/// Descriptors besides the tunnels' (MQTT, logs, state files, resolver).
const BASE_FDS: u64 = 64;
/// Memory besides the byte budget: the binary, TLS configurations, runtime.
const BASE_MEMORY: u64 = 16 << 20;
/// Per tunnel: websocket read buffer and write batch (2 x 128 KiB), a reassembled message
/// (up to 1 MiB), TLS buffers.
const TUNNEL_MEMORY: u64 = 1536 << 10;
/// Per local connection, payload aside (that is in the budget): socket, task, queue.
const CONNECTION_MEMORY: u64 = 16 << 10;

/// Rule: what the limits can need at most, as (descriptors, bytes).
pub fn resource_needs(l: &AgentLimits) -> (u64, u64) {
    let (tunnels, conns) = (l.max_tunnels as u64, l.max_connections_per_tunnel as u64);
    let fds = BASE_FDS + tunnels * (conns + 2);
    // Queued payloads are copies of their own bytes (`bridge/local/downward.rs` `remainder_to_queue`); the
    // allocator's size classes can round each up to twice its size. Chunks read from local
    // sockets keep at most twice what they count too (`local::keep_read_buffer`).
    // Each tunnel's reserve (`bridge::TUNNEL_RESERVE`) comes on top of the shared budget,
    // for both bridges of a tunnel during a rotation.
    let reserves = 2 * tunnels * crate::bridge::TUNNEL_RESERVE as u64;
    let memory = BASE_MEMORY
        + 2 * (l.max_buffered as u64 + reserves)
        + tunnels * (TUNNEL_MEMORY + 2 * crate::bridge::DEFAULT_UPWARD_BUDGET as u64)
        + tunnels * conns * CONNECTION_MEMORY;
    (fds, memory)
}

/// Rule: the limits together fit the service unit's descriptor and memory ceilings.
pub(super) fn beyond_unit_ceilings(l: &RawLimits) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let limits = AgentLimits {
        max_tunnels: l.max_tunnels,
        max_connections_per_tunnel: l.max_connections_per_tunnel,
        max_lifetime: Duration::ZERO,
        max_buffered: l.max_buffered_kib * 1024,
    };
    let (fds, memory) = resource_needs(&limits);
    if fds > UNIT_LIMIT_NOFILE {
        errors.push(err(
            "limits.max_tunnels x limits.max_connections_per_tunnel",
            format!(
                "{} x {} connections need up to {fds} file descriptors; the service unit allows {UNIT_LIMIT_NOFILE} (LimitNOFILE)",
                l.max_tunnels, l.max_connections_per_tunnel
            ),
            "lower one of them, or raise LimitNOFILE in a drop-in and run the agent outside these checks",
        ));
    }
    if memory > UNIT_MEMORY_MAX {
        errors.push(err(
            "limits.max_tunnels x limits.max_connections_per_tunnel + limits.max_buffered_kib",
            format!(
                "these limits can need {} MiB; the service unit allows {} MiB (MemoryMax)",
                memory >> 20,
                UNIT_MEMORY_MAX >> 20
            ),
            "lower max_tunnels, max_connections_per_tunnel or max_buffered_kib",
        ));
    }
    errors
}
