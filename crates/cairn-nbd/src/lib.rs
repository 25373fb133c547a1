//! qcow2 disks over NBD, with changed-block tracking from qemu's persistent dirty bitmaps.
//!
//! - [`proto`]: the NBD wire format and decoders for everything a server sends (fuzzed).
//! - [`Client`]: a small synchronous client: fixed-newstyle negotiation, structured replies,
//!   `READ` and `BLOCK_STATUS` for `base:allocation` and `qemu:dirty-bitmap:NAME`.
//! - [`qcow2`]: the qcow2 header, read before qemu opens an image: backing files refused
//!   unless allowed, `json:` backing names and external data files always.
//! - [`qcow2_write`]: a qcow2 image written in one pass, for restores to qcow2.
//! - [`qemu`]: `qemu-nbd` serving an image read-only on a private unix socket, and
//!   `qemu-img` describing an image and adding or removing its bitmaps.
//! - [`Rotation`]: one bitmap per disk and recovery point. The next is added at the moment of
//!   the view, before any data is read; the previous is trusted only if it is named for the
//!   disk's previous point, enabled and consistent; it is removed only after the point commits.
//! - [`NbdSource`]: a [`cairn_delta::BlockSource`] that reads an export and reports its
//!   allocation and its dirty ranges.
//! - [`server`]: a read-only NBD server of one export ([`server::ExportSource`]), for
//!   instant restores; [`server_proto`] decodes what clients send (fuzzed).
//!
//! The crate runs qemu's tools as processes and talks to them over unix sockets; it does not
//! link qemu. It has no async runtime: the engine reads each disk from one thread, and the
//! server answers from threads of its own.

mod client;
mod error;
pub mod proto;
pub mod qcow2;
pub mod qcow2_write;
pub mod qemu;
mod rotation;
pub mod server;
pub mod server_proto;
mod source;
mod tls;

pub use client::{Client, Export, StatusExtent};
pub use error::Error;
pub use rotation::{Previous, Rotation, bitmap_name, judge};
pub use source::NbdSource;
