//! Guest platform code: the memory map and the boot-time tables a guest kernel reads.
//!
//! Independent of the hypervisor backend: this code only writes guest memory and fills in the
//! neutral register state of [`crate::hypervisor::arch`].

pub mod aarch64;
pub mod x86_64;
