//! The allocator setting that keeps a backup's memory flat in the number of disks.

/// glibc gives threads their own malloc arenas (up to 8 per core), and the 2 MiB read buffers
/// one disk's engine threads free stay in their arenas, unused by the next disk's threads: a
/// backup's peak RSS grew with the disk count (54 MiB for one 512 MiB disk, 143 MiB for
/// eight, two at a time). Two arenas keep it flat (104-115 MiB for two to eight disks); see
/// `docs/performance.md`. Embedders can get the same with `MALLOC_ARENA_MAX=2`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn limit_malloc_arenas() {
    // SAFETY: mallopt only tunes the allocator; it is called first thing in main, before any
    // other thread exists. A failure (return 0) leaves glibc's default, which is only slower
    // to give memory back, so the result is ignored.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Other allocators need no setting.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_malloc_arenas() {}
