//! How a long-running regmirror process asks glibc's malloc to hold on to less memory.
//!
//! The operator decodes bursts of API objects — a watch event for every Node an agent reports
//! on, a response for every Node it patches, eight writes in flight — on a handful of threads.
//! glibc gives each thread that allocates while another holds the lock an arena of its own (up
//! to eight per core) and keeps every arena's high water: after a change reaching every node,
//! the real-API benchmark saw the resident set grow by 10 MiB that nothing used any more (see
//! BENCHMARKS.md). Two arenas, a fixed mmap threshold (large response bodies are mapped and
//! unmapped, not carved out of an arena) and handing free pages back after each pass keep the
//! resident set near what the caches hold. Other C libraries (musl) are left as they are.

/// Bounds the allocator's arenas and fixes its mmap threshold. Call it first thing in `main`,
/// before any thread starts: arenas already made stay.
pub fn bound_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets malloc's tunables; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Hands the free pages of every arena back to the system. Cheap next to a pass (a walk over
/// the arenas' free lists); call it after a burst of work, not in a hot loop.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes malloc's own locks; it is safe from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One arena per runtime worker thread (the operator runs two); threads beyond share them.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENAS: libc::c_int = 2;

/// Allocations from this size on are mapped on their own and returned to the system when freed.
/// Fixing it also stops glibc from raising it after the first large free, which would otherwise
/// let every later response body land in an arena.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// The resident set of this process, from /proc.
    fn resident_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS");
        line.split_whitespace()
            .nth(1)
            .expect("value")
            .parse()
            .expect("a number")
    }

    #[test]
    fn freed_small_allocations_go_back_to_the_system() {
        bound_allocator();
        // 64 MiB in small blocks, as decoded API objects are, touched so they are resident.
        let blocks: Vec<Box<[u8; 256]>> = (0..256 * 1024).map(|_| Box::new([1u8; 256])).collect();
        assert_eq!(
            blocks.iter().map(|b| b[255] as usize).sum::<usize>(),
            256 * 1024
        );
        let full = resident_kib();
        drop(blocks);
        release_free_memory();
        let after = resident_kib();
        assert!(
            full.saturating_sub(after) >= 32 * 1024,
            "resident {full} KiB with the blocks, {after} KiB after freeing and releasing them"
        );
    }
}
