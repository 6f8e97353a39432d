//! The agent-process tier: the agent binary as its own process (`run`, `local-proxy`,
//! `check-config`, `status`, the demos) against real peers: mosquitto with mutual TLS,
//! boto3 from .venv driving the emulator's control plane, tinyproxy, openssl. Without them
//! the first test that needs one stops the run with one line naming what is missing
//! (`common::require_system_peers`). `cargo test --test peers`; see TESTING.md.

#[path = "../common/mod.rs"]
mod common;

mod agent;
mod audit;
mod check_config;
mod cli;
mod consent;
mod demo;
mod doctor;
mod faults;
mod gateway;
mod lifetime;
mod local_proxy;
mod mqtt;
#[cfg(feature = "pkcs11")]
mod pkcs11;
mod proxy;
mod resilience;
mod restarts;
mod rotation;
mod secrets;
mod shadow;
mod signals;
mod status;
mod tls;
mod upgrade;
