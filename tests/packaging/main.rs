//! The packaging tier: the OpenWrt .ipk packages, built from the static ARM binaries that
//! `./test.sh` cross-builds and names (SECURETUNNEL_IPK_BINARY_*), unpacked and checked as
//! opkg would see them. Without those binaries or nFPM the run stops with one line
//! (`common::require_system_peers`). `cargo test --test packaging`; see TESTING.md.

#[path = "../common/mod.rs"]
mod common;

mod ipk;
