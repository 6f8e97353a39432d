//! The in-process tier: this project's destination and source bridges against the
//! tunneling-service emulator, all in this one process. Needs only Rust: no agent process,
//! no mosquitto, no tinyproxy, no python. `cargo test --test in_process`; see TESTING.md.

#[path = "../common/mod.rs"]
mod common;

mod policies;
mod protocol_errors;
mod resets;
mod transfer;
