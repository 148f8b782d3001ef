//! What this machine is: memory, CPU model, cores and host name for the node's profile, and this
//! process's own memory. Read through `sysinfo`, so a node on macOS or Windows offers its memory
//! like one on Linux does.
//!
//! Nothing here fails: a figure the platform does not give is `None` (memory) or a stand-in
//! (`unknown`, the architecture's name), and the node still starts.

use sysinfo::{
    CpuRefreshKind, MemoryRefreshKind, Process, ProcessRefreshKind, ProcessesToUpdate, System,
};

use crate::profile::MemoryInfo;

/// This process's memory, bytes. `None` where the platform does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessMemory {
    /// Memory resident now (the resident set; the working set on Windows).
    pub resident_bytes: Option<u64>,
    /// The most that was ever resident at once since the process started.
    pub peak_bytes: Option<u64>,
}

/// This process's resident and peak resident memory, read now.
///
/// Resident memory comes from `sysinfo`; the peak, which `sysinfo` does not report, from the
/// platform: `VmHWM` on Linux (not `getrusage`, whose figure after `posix_spawn` can include the
/// parent's peak), `getrusage` on the other Unixes, `GetProcessMemoryInfo` on Windows.
pub fn process_memory() -> ProcessMemory {
    ProcessMemory {
        resident_bytes: resident_bytes(),
        peak_bytes: peak_bytes(),
    }
}

/// The CPU model (`AMD Ryzen 7 5800X`, `Apple M2`, `Cortex-A76`), or `<arch> cpu` where the
/// platform does not name it.
pub fn cpu_name() -> String {
    let brand = System::new().ok().and_then(|mut system| {
        system.refresh_cpu_list(CpuRefreshKind::nothing());
        system
            .cpus()
            .first()
            .map(|cpu| cpu.brand().trim().to_owned())
    });
    brand
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| format!("{} cpu", std::env::consts::ARCH))
}

/// Logical CPU cores this process can use: the machine's, capped by the affinity mask and CPU
/// quota the standard library sees (a container given 2 of 64 cores has 2). At least 1.
pub(crate) fn logical_cores() -> u32 {
    let listed = System::new().map_or(0, |mut system| {
        system.refresh_cpu_list(CpuRefreshKind::nothing());
        system.cpus().len()
    });
    let usable = std::thread::available_parallelism().ok().map(|n| n.get());
    cap_cores(listed, usable)
}

/// The host name, or `unknown`.
pub(crate) fn host_name() -> String {
    System::host_name()
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The operating system for people (`Linux (Debian GNU/Linux 12)`, `macOS 15.1.1 Sequoia`,
/// `Windows 11 Pro`), or the platform's short name (`linux`) where it does not say more.
pub(crate) fn os_name() -> String {
    System::long_os_version()
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| std::env::consts::OS.to_owned())
}

/// The memory this node offers: the machine's, capped by its container's (cgroup) limit on Linux
/// and by `limit`.
pub(crate) fn read_memory(limit: Option<u64>) -> MemoryInfo {
    cap_memory(read_machine_memory(), limit)
}

/// Memory figures as the platform reports them, before any cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct MemoryReading {
    /// Physical memory.
    total: Option<u64>,
    /// Memory available for new work (on Windows, free memory).
    available: Option<u64>,
    /// The limit of the cgroup this node runs in, if it is below physical memory (Linux).
    cgroup: Option<CgroupMemory>,
}

/// A cgroup's memory limit and what is left under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CgroupMemory {
    total: u64,
    free: u64,
}

fn read_machine_memory() -> MemoryReading {
    let Ok(mut system) = System::new() else {
        return MemoryReading::default();
    };
    system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
    // A platform that cannot tell reports 0, which no machine that runs us has.
    let known = |bytes: u64| (bytes > 0).then_some(bytes);
    MemoryReading {
        total: known(system.total_memory()),
        available: known(system.available_memory()),
        // `sysinfo` reads cgroup v1 and v2, through nested groups, and only reports a limit
        // below physical memory.
        cgroup: system.cgroup_limits().map(|limits| CgroupMemory {
            total: limits.total_memory,
            free: limits.free_memory,
        }),
    }
}

/// Applies the caps: a container's limit is what the node can really use, and the configured
/// limit is what it may offer. Available memory never exceeds total memory.
fn cap_memory(reading: MemoryReading, limit: Option<u64>) -> MemoryInfo {
    let cap = |value: Option<u64>, cap: Option<u64>| match (value, cap) {
        (Some(v), Some(c)) => Some(v.min(c)),
        (v, c) => v.or(c),
    };
    let mut total = cap(reading.total, reading.cgroup.map(|c| c.total));
    let mut available = cap(reading.available, reading.cgroup.map(|c| c.free));
    total = cap(total, limit);
    available = cap(available, limit);
    available = match (available, total) {
        (Some(a), Some(t)) => Some(a.min(t)),
        (a, _) => a,
    };
    MemoryInfo {
        total_bytes: total,
        available_bytes: available,
    }
}

/// The smaller of the cores the machine lists and the cores the process may use, where known;
/// at least 1.
fn cap_cores(listed: usize, usable: Option<usize>) -> u32 {
    let listed = (listed > 0).then_some(listed);
    let cores = match (listed, usable) {
        (Some(l), Some(u)) => l.min(u),
        (l, u) => l.or(u).unwrap_or(1),
    };
    u32::try_from(cores.max(1)).unwrap_or(u32::MAX)
}

fn resident_bytes() -> Option<u64> {
    let pid = sysinfo::get_current_pid().ok()?;
    let mut system = System::new().ok()?;
    system.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        false,
        ProcessRefreshKind::nothing().with_memory(),
    );
    system
        .process(pid)
        .map(Process::memory)
        .filter(|&bytes| bytes > 0)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn peak_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status_kib(&status, "VmHWM:").and_then(|kib| kib.checked_mul(1024))
}

#[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
fn peak_bytes() -> Option<u64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `getrusage` only writes the `rusage` it is given, which lives for the call; on
    // success it has filled every field (and a zeroed `rusage` is a valid value anyway).
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return None;
        }
        usage.assume_init()
    };
    let max = u64::try_from(usage.ru_maxrss).ok()?;
    // Apple's kernels count bytes here, the BSDs kibibytes.
    if cfg!(any(target_os = "macos", target_os = "ios")) {
        Some(max)
    } else {
        max.checked_mul(1024)
    }
}

#[cfg(windows)]
fn peak_bytes() -> Option<u64> {
    use windows_sys::Win32::System::ProcessStatus::{
        GetProcessMemoryInfo, PROCESS_MEMORY_COUNTERS,
    };
    use windows_sys::Win32::System::Threading::GetCurrentProcess;

    let size = u32::try_from(std::mem::size_of::<PROCESS_MEMORY_COUNTERS>()).ok()?;
    let mut counters = std::mem::MaybeUninit::<PROCESS_MEMORY_COUNTERS>::zeroed();
    // SAFETY: `GetCurrentProcess` returns a pseudo-handle that needs no closing;
    // `GetProcessMemoryInfo` writes at most `size` bytes into `counters`, which lives for the
    // call, and a zeroed `PROCESS_MEMORY_COUNTERS` is a valid value.
    let counters = unsafe {
        if GetProcessMemoryInfo(GetCurrentProcess(), counters.as_mut_ptr(), size) == 0 {
            return None;
        }
        counters.assume_init()
    };
    u64::try_from(counters.PeakWorkingSetSize).ok()
}

#[cfg(not(any(unix, windows)))]
fn peak_bytes() -> Option<u64> {
    None
}

/// The value of a `Name:   1234 kB` line of `/proc/<pid>/status`, in KiB.
#[cfg(any(target_os = "linux", target_os = "android", test))]
fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    const GIB: u64 = 1 << 30;

    fn reading(total: u64, available: u64, cgroup: Option<(u64, u64)>) -> MemoryReading {
        MemoryReading {
            total: Some(total),
            available: Some(available),
            cgroup: cgroup.map(|(total, free)| CgroupMemory { total, free }),
        }
    }

    fn info(total: u64, available: u64) -> MemoryInfo {
        MemoryInfo {
            total_bytes: Some(total),
            available_bytes: Some(available),
        }
    }

    #[test]
    fn the_machine_figures_are_offered_when_nothing_caps_them() {
        assert_eq!(
            cap_memory(reading(16 * GIB, 9 * GIB, None), None),
            info(16 * GIB, 9 * GIB)
        );
    }

    #[test]
    fn a_cgroup_limit_caps_total_and_its_free_memory_caps_available() {
        // A 4 GiB container with 1 GiB in use on a 16 GiB machine with 9 GiB available.
        let capped = cap_memory(reading(16 * GIB, 9 * GIB, Some((4 * GIB, 3 * GIB))), None);
        assert_eq!(capped, info(4 * GIB, 3 * GIB));
        // The machine is the tighter bound: little available outside the container.
        let capped = cap_memory(reading(16 * GIB, GIB, Some((4 * GIB, 3 * GIB))), None);
        assert_eq!(capped, info(4 * GIB, GIB));
    }

    #[test]
    fn the_configured_limit_caps_both_below_every_other_bound() {
        let capped = cap_memory(
            reading(16 * GIB, 9 * GIB, Some((4 * GIB, 3 * GIB))),
            Some(2 * GIB),
        );
        assert_eq!(capped, info(2 * GIB, 2 * GIB));
        // A limit above what there is changes nothing.
        let capped = cap_memory(reading(16 * GIB, 9 * GIB, None), Some(64 * GIB));
        assert_eq!(capped, info(16 * GIB, 9 * GIB));
        // Between available and total: only total moves.
        let capped = cap_memory(reading(16 * GIB, 9 * GIB, None), Some(12 * GIB));
        assert_eq!(capped, info(12 * GIB, 9 * GIB));
    }

    #[test]
    fn a_platform_that_reports_nothing_offers_only_the_caps() {
        assert_eq!(
            cap_memory(MemoryReading::default(), None),
            MemoryInfo::default()
        );
        assert_eq!(
            cap_memory(MemoryReading::default(), Some(GIB)),
            info(GIB, GIB)
        );
        let cgroup_only = MemoryReading {
            cgroup: Some(CgroupMemory {
                total: 2 * GIB,
                free: GIB,
            }),
            ..MemoryReading::default()
        };
        assert_eq!(cap_memory(cgroup_only, None), info(2 * GIB, GIB));
    }

    #[test]
    fn available_never_exceeds_total() {
        assert_eq!(
            cap_memory(reading(GIB, 2 * GIB, None), None),
            info(GIB, GIB)
        );
    }

    #[test]
    fn cores_are_the_smaller_known_count_and_at_least_one() {
        assert_eq!(cap_cores(64, Some(2)), 2);
        assert_eq!(cap_cores(8, Some(16)), 8);
        assert_eq!(cap_cores(0, Some(4)), 4);
        assert_eq!(cap_cores(12, None), 12);
        assert_eq!(cap_cores(0, None), 1);
    }

    #[test]
    fn this_machine_reports_sane_figures() {
        let memory = read_memory(None);
        let total = memory.total_bytes.expect("total memory");
        let available = memory.available_bytes.expect("available memory");
        assert!(available > 0, "{memory:?}");
        assert!(total >= available, "{memory:?}");
        assert!(total > 64 << 20, "{memory:?}");

        let limit = 1 << 20;
        let limited = read_memory(Some(limit));
        assert_eq!(limited.total_bytes, Some(limit));
        assert!(limited.available_bytes.unwrap() <= limit, "{limited:?}");

        let cores = logical_cores();
        assert!(cores >= 1);
        assert!(
            cores as usize <= std::thread::available_parallelism().unwrap().get(),
            "{cores}"
        );
        let cpu = cpu_name();
        assert!(!cpu.trim().is_empty());
        assert_eq!(cpu, cpu.trim());
        let host = host_name();
        assert!(!host.is_empty());
        assert_eq!(host, host.trim());
    }

    #[test]
    fn this_process_memory_is_reported() {
        let before = process_memory();
        let resident = before.resident_bytes.expect("resident memory");
        let peak = before.peak_bytes.expect("peak memory");
        assert!(resident > 1 << 20, "{before:?}");
        // Touch 64 MiB so the peak has to move past it (`black_box`: the optimiser must not
        // drop the allocation of a release build).
        let block = std::hint::black_box(vec![1u8; 64 << 20]);
        let touched: u64 = block.iter().step_by(4096).map(|&b| u64::from(b)).sum();
        assert_eq!(touched, (64 << 20) / 4096);
        let after = process_memory();
        let peak_after = after.peak_bytes.unwrap();
        assert!(peak_after >= peak, "{before:?} {after:?}");
        assert!(peak_after >= 64 << 20, "{after:?}");
        drop(block);
    }

    #[test]
    fn status_lines_are_read_in_kib() {
        let status = "Name:\texo-node\nVmPeak:\t  900 kB\nVmHWM:\t    5120 kB\nVmRSS:\t 4096 kB\n";
        assert_eq!(status_kib(status, "VmHWM:"), Some(5120));
        assert_eq!(status_kib(status, "VmRSS:"), Some(4096));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        assert_eq!(status_kib("VmHWM:\tlots kB", "VmHWM:"), None);
    }
}
