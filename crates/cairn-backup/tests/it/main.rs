//! End-to-end tests of backup, restore and verify on real files and a real local vault.

mod bad_input;
mod conformance;
mod encryption;
mod faults;
mod hostile;
mod lifecycle;
mod patches;
mod resume;
mod roundtrip;
mod support;
mod tracking;
