//! The one system call restore makes that rustix does not wrap: `BLKZEROOUT`.
//!
//! This is the crate's only `unsafe`. The opcode is the kernel's (`linux/fs.h`:
//! `_IO(0x12, 127)`) and its argument is exactly what the kernel reads: two `u64`s, the start
//! and the length of the range, both multiples of the device's logical block size.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use rustix::ioctl::{Setter, ioctl, opcode};

const BLKZEROOUT: rustix::ioctl::Opcode = opcode::none(0x12, 127);

/// Makes `len` bytes at `at` of block device `device` read as zeros, whatever the device does
/// with discards.
pub(crate) fn blkzeroout(device: &File, at: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [at, len];
    // SAFETY: BLKZEROOUT reads a `uint64_t[2]` through the pointer it is given, and `Setter`
    // passes a pointer to exactly that value, alive for the call.
    unsafe { ioctl(device, Setter::<BLKZEROOUT, [u64; 2]>::new(range)) }.map_err(io::Error::from)
}
