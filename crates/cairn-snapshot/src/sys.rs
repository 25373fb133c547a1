//! The Linux calls that no safe wrapper covers: FIFREEZE/FITHAW, btrfs snapshots, a file's
//! extent count (FIEMAP), and ignoring termination signals in the thaw watchdog.
//!
//! This is the crate's only `unsafe` on Linux. Each call passes an opcode from the kernel's
//! uapi headers with the argument type that opcode expects, on a file descriptor we own.
#![allow(unsafe_code)]

use std::ffi::{CString, c_int};
use std::io;
use std::os::fd::AsFd;

use rustix::ioctl::{Ioctl, NoArg, Setter, Updater, ioctl, opcode};

/// `FIFREEZE`: `_IOWR('X', 119, int)` in `linux/fs.h`.
const FIFREEZE: rustix::ioctl::Opcode = opcode::read_write::<c_int>(b'X', 119);
/// `FITHAW`: `_IOWR('X', 120, int)` in `linux/fs.h`.
const FITHAW: rustix::ioctl::Opcode = opcode::read_write::<c_int>(b'X', 120);

/// Freezes the file system that `dir` (its mount point, opened) belongs to.
pub fn freeze(dir: impl AsFd) -> io::Result<()> {
    // SAFETY: FIFREEZE takes no argument the kernel reads; NoArg passes a null pointer.
    unsafe { call(dir, NoArg::<FIFREEZE>::new()) }
}

/// Thaws it. `EINVAL` means it was not frozen.
pub fn thaw(dir: impl AsFd) -> io::Result<()> {
    // SAFETY: as for `freeze`.
    unsafe { call(dir, NoArg::<FITHAW>::new()) }
}

/// Makes descriptor `fd` survive the exec of `command` (it is opened close-on-exec), so that
/// the program run can be `/proc/self/fd/N`, the very file that was checked, and a script's
/// interpreter can still open it after the exec.
pub fn keep_open_across_exec(command: &mut std::process::Command, fd: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it calls fcntl(2) alone and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Ignores SIGTERM, SIGINT and SIGHUP in this process: the thaw watchdog must outlive
/// whatever stops the agent, short of SIGKILL.
pub fn ignore_termination_signals() {
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
}

/// `struct btrfs_ioctl_vol_args_v2` from `linux/btrfs.h` (4096 bytes).
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; 4040],
}

/// `struct btrfs_ioctl_vol_args` (4096 bytes).
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

/// `BTRFS_IOC_SNAP_CREATE_V2`: `_IOW(0x94, 23, struct btrfs_ioctl_vol_args_v2)`.
const SNAP_CREATE_V2: rustix::ioctl::Opcode = opcode::write::<VolArgsV2>(0x94, 23);
/// `BTRFS_IOC_SNAP_DESTROY`: `_IOW(0x94, 15, struct btrfs_ioctl_vol_args)`.
const SNAP_DESTROY: rustix::ioctl::Opcode = opcode::write::<VolArgs>(0x94, 15);
/// `BTRFS_SUBVOL_RDONLY`.
const SUBVOL_RDONLY: u64 = 1 << 1;

fn name_bytes<const N: usize>(name: &str) -> io::Result<[u8; N]> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let bytes = c.as_bytes_with_nul();
    if bytes.len() > N || name.contains('/') {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut out = [0u8; N];
    out[..bytes.len()].copy_from_slice(bytes);
    Ok(out)
}

/// Creates a read-only snapshot of the subvolume open as `source`, named `name` in the
/// directory open as `parent`.
pub fn btrfs_snapshot(parent: impl AsFd, source: impl AsFd, name: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let args = VolArgsV2 {
        fd: i64::from(source.as_fd().as_raw_fd()),
        transid: 0,
        flags: SUBVOL_RDONLY,
        unused: [0; 4],
        name: name_bytes(name)?,
    };
    // SAFETY: the opcode's argument type is exactly `VolArgsV2`, laid out as the kernel's
    // struct; `source` stays open for the call.
    unsafe { call(parent, Setter::<SNAP_CREATE_V2, VolArgsV2>::new(args)) }
}

/// Deletes the snapshot `name` in the directory open as `parent`.
pub fn btrfs_delete(parent: impl AsFd, name: &str) -> io::Result<()> {
    let args = VolArgs { fd: 0, name: name_bytes(name)? };
    // SAFETY: the opcode's argument type is exactly `VolArgs`.
    unsafe { call(parent, Setter::<SNAP_DESTROY, VolArgs>::new(args)) }
}

/// `struct fiemap` of `linux/fiemap.h` with no extent array: asked for zero extents, the
/// kernel only counts them.
#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
}

/// `FS_IOC_FIEMAP`: `_IOWR('f', 11, struct fiemap)` in `linux/fs.h`.
const FIEMAP: rustix::ioctl::Opcode = opcode::read_write::<Fiemap>(b'f', 11);

/// How many extents the file open as `file` has (what a reflink clone must copy, one record
/// each).
pub fn extent_count(file: impl AsFd) -> io::Result<u32> {
    let mut map = Fiemap {
        start: 0,
        length: u64::MAX,
        flags: 0,
        mapped_extents: 0,
        extent_count: 0,
        reserved: 0,
    };
    // SAFETY: the opcode's argument type is exactly `Fiemap`, laid out as the kernel's struct;
    // with `extent_count` 0 the kernel writes no extent past it, only `mapped_extents`.
    unsafe { call(file, Updater::<FIEMAP, Fiemap>::new(&mut map)) }?;
    Ok(map.mapped_extents)
}

/// # Safety
/// `req` must carry an opcode whose argument matches its type.
unsafe fn call<I: Ioctl<Output = ()>>(fd: impl AsFd, req: I) -> io::Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { ioctl(fd, req) }.map_err(io::Error::from)
}
