//! securetunnel-agent: an AWS IoT Secure Tunneling destination agent and local proxy.
//!
//! Module map, in the direction data flows:
//! - [`protocol`]: the wire protocol: message, frame codec, and every protocol rule.
//! - [`services`]: the service map (service id -> local endpoint), an allow-list.
//! - [`bridge`]: websocket <-> local connections, destination and source mode.
//! - [`backoff`]: reconnect policies (websocket and MQTT), pure state.
//! - [`tls`], [`secret`], [`proxy`]: TLS client configuration; tokens that never leak;
//!   HTTP CONNECT proxies.
//! - [`pkcs11`]: device keys in a token (TPM, secure element, HSM): the URI, and with the
//!   `pkcs11` feature the token's key as a rustls signing key.
//! - [`cli`], [`signals`]: the command line (`run`, `check-config`, `local-proxy` with the
//!   reference localproxy's options) and SIGINT/SIGTERM as cancellation.
//! - [`lookup`]: bounded name lookups of host-name services.
//! - The agent itself (private): `config` (agent.toml), `mqtt` (notify client and
//!   subscriptions) and `proxy_front` (MQTT through an HTTP proxy), `tunnels` (the tunnel
//!   table and lifecycle), `agent` (carries out the lifecycle's effects), `persist` and
//!   `persist_writer` (session files), `status` (status.json), `systemd` (notify, watchdog),
//!   `upgrade` and `upgrade_trial` (replacing the running binary),
//!   `net` (keepalive on long-lived sockets), `sandbox` (can the service's user reach each
//!   Unix-socket service). ARCHITECTURE.md has the map.
//!
//! The public API is what the binary, the emulator crate and the integration tests use to
//! run a bridge; the agent's own state stays private.
#![warn(missing_docs)]

mod agent;
mod audit;
pub mod backoff;
pub mod bridge;
pub mod cli;
mod config;
pub mod consent;
mod dates;
mod doctor;
#[cfg(fuzzing)]
#[allow(missing_docs)]
pub mod fuzzing;
pub mod lookup;
mod mqtt;
mod net;
mod persist;
mod persist_writer;
pub mod pkcs11;
pub mod protocol;
pub mod proxy;
mod proxy_front;
mod sandbox;
pub mod secret;
pub mod services;
mod shadow;
pub mod signals;
mod status;
mod systemd;
pub mod tls;
mod tunnels;
mod upgrade;
mod upgrade_trial;
