//! Backend-neutral CPU state, one module per guest architecture.
//!
//! Plain data, compiled on every host so the code that fills it in (boot setup) is testable
//! anywhere; backends translate it to and from their own structures.

pub mod aarch64;
pub mod x86_64;
