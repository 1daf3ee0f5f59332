//! glibc's allocator, tuned for a training loop: a step frees and re-allocates the same few hundred
//! buffers, and with the default thresholds glibc returns large ones to the kernel (mmap/munmap,
//! heap trimming), so the next step page-faults them back in (about 19 k faults per step of the
//! CPU recipe). Raising the mmap and trim thresholds keeps that memory in the process.
//!
//! The binary calls [`tune_allocator`] at start-up (`GUMBEL_MOE_MALLOC=default` leaves glibc's
//! defaults alone); a program using the library may call it too.
//! The same settings as environment variables: `MALLOC_MMAP_THRESHOLD_=268435456
//! MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=67108864`. No effect on other platforms.

/// Sets glibc's mmap threshold to 256 MiB, its trim threshold to 1 GiB and its top pad to 64 MiB.
/// Returns whether the settings were applied (glibc on Linux only).
pub fn tune_allocator() -> bool {
    if std::env::var("GUMBEL_MOE_MALLOC").is_ok_and(|v| v == "default") {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called before any thread of
        // ours starts and takes plain integers.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
                && libc::mallopt(libc::M_TOP_PAD, 64 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
