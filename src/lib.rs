//! securetunnel-agent: an AWS IoT Secure Tunneling destination agent and local proxy.
//!
//! Module map, in the direction data flows:
//! - [`protocol`]: the wire protocol: message, frame codec, and every protocol rule.
//! - [`services`]: the service map (service id -> local endpoint), an allow-list.
//! - [`bridge`]: websocket <-> local connections, destination and source mode.
//! - [`tls`], [`secret`]: TLS client configuration; tokens that never leak.
//! - [`cli`], [`signals`]: the command line (`local-proxy`, options as the reference
//!   localproxy) and SIGINT/SIGTERM as cancellation.
//! - `emulator` (feature `emulator`): a stand-in for the tunneling service, for tests.

pub mod agent;
pub mod bridge;
pub mod cli;
pub mod config;
pub mod notify;
pub mod protocol;
pub mod secret;
pub mod services;
pub mod session;
pub mod signals;
pub mod status;
pub mod tls;

#[cfg(feature = "emulator")]
pub mod emulator;
