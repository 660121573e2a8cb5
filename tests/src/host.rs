//! What the host did to a benchmark: CPU time stolen by the hypervisor and
//! the disk's I/O pressure over a measured interval (Linux only).
//!
//! On a shared 2-core virtual machine another tenant can take a third of
//! the CPU or saturate the disk, and every latency number moves with it.
//! The benchmarks print this next to their results so a reader can tell a
//! slow build from a busy host; it is a reading, never a correction.

/// CPU tick counters (`/proc/stat`, first line) and the I/O pressure stall
/// total (`/proc/pressure/io`, microseconds) at one moment.
#[derive(Debug, Clone, Copy)]
pub struct HostSample {
    /// user, nice, system, idle, iowait, irq, softirq, steal.
    ticks: [u64; 8],
    /// Microseconds in which some task waited for I/O, since boot.
    io_stall_us: Option<u64>,
    at: std::time::Instant,
}

impl HostSample {
    /// Read the counters now; `None` where `/proc/stat` is unavailable.
    pub fn now() -> Option<HostSample> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
        let mut ticks = [0u64; 8];
        for (slot, field) in ticks.iter_mut().zip(cpu.split_whitespace()) {
            *slot = field.parse().ok()?;
        }
        let io_stall_us = std::fs::read_to_string("/proc/pressure/io")
            .ok()
            .and_then(|psi| {
                psi.lines()
                    .find_map(|l| l.strip_prefix("some "))?
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("total="))?
                    .parse()
                    .ok()
            });
        Some(HostSample {
            ticks,
            io_stall_us,
            at: std::time::Instant::now(),
        })
    }

    /// What happened between `self` and `later`: steal and I/O wait as
    /// shares of all CPU time, and the share of wall time in which some task
    /// (ours included) waited for the disk.
    pub fn until(&self, later: &HostSample) -> String {
        let d: Vec<u64> = later
            .ticks
            .iter()
            .zip(&self.ticks)
            .map(|(b, a)| b.saturating_sub(*a))
            .collect();
        let total: u64 = d.iter().sum();
        let share = |i: usize| {
            if total == 0 {
                0.0
            } else {
                100.0 * d[i] as f64 / total as f64
            }
        };
        let wall_us = later.at.duration_since(self.at).as_micros().max(1) as f64;
        let io = match (self.io_stall_us, later.io_stall_us) {
            (Some(a), Some(b)) => {
                format!(
                    ", I/O pressure {:.0}%",
                    100.0 * b.saturating_sub(a) as f64 / wall_us
                )
            }
            _ => String::new(),
        };
        format!(
            "host: CPU steal {:.0}%, iowait {:.0}%{io}",
            share(7),
            share(4)
        )
    }
}

/// `HostSample::now()` again, described relative to `start` (empty where
/// the counters are unavailable).
pub fn since(start: Option<HostSample>) -> String {
    match (start, HostSample::now()) {
        (Some(a), Some(b)) => a.until(&b),
        _ => String::new(),
    }
}

/// A process's CPU time so far, user and system over all its threads, in
/// seconds (`/proc/PID/stat`, Linux): what a server spent on a job, apart
/// from the load generator sharing its cores.
pub fn process_cpu_secs(pid: u32) -> std::io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    // The fields after the command name (which may hold spaces and
    // parentheses) start at `state`: utime and stime are the 12th and 13th.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| bad("no command name in /proc/PID/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> std::io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| bad("short /proc/PID/stat"))
    };
    let hz = rustix::param::clock_ticks_per_second().max(1) as f64;
    Ok((ticks(11)? + ticks(12)?) as f64 / hz)
}

/// One `kB` line of `/proc/PID/status` (`"VmRSS"`, or `"VmHWM"` for the
/// peak), in KiB.
pub fn process_status_kib(pid: u32, field: &str) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no {field} in /proc/{pid}/status"),
            )
        })
}

/// The first two fields of a `schedstat` file: ns on a CPU, ns waiting for
/// one.
fn parse_schedstat(stat: &str) -> Option<(u64, u64)> {
    let mut fields = stat.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some((fields.next()??, fields.next()??))
}

/// CPU time the calling thread has used, in ns (Linux; `None` elsewhere):
/// what a piece of work costs apart from waiting for the disk and for other
/// processes on a shared machine.
pub fn this_thread_cpu_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    parse_schedstat(&stat).map(|(cpu, _)| cpu)
}

/// CPU time and run-queue wait of this process's threads, summed by thread
/// name (Linux `/proc/self/task/*/schedstat`), at one moment.
///
/// The run-queue wait is the time a thread was ready to run but had no
/// core: on two cores shared by a relay, its clients and the commit writer,
/// that wait is where a latency tail comes from when the disk is fast.
#[derive(Debug, Clone, Default)]
pub struct ThreadTimes {
    /// Thread name → (ns on a CPU, ns waiting for one).
    by_name: std::collections::BTreeMap<String, (u64, u64)>,
}

impl ThreadTimes {
    /// Read every thread of this process now (empty where unavailable).
    pub fn now() -> ThreadTimes {
        let mut by_name = std::collections::BTreeMap::new();
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return ThreadTimes { by_name };
        };
        for task in tasks.flatten() {
            let dir = task.path();
            let (Ok(name), Ok(stat)) = (
                std::fs::read_to_string(dir.join("comm")),
                std::fs::read_to_string(dir.join("schedstat")),
            ) else {
                continue;
            };
            let Some((cpu, wait)) = parse_schedstat(&stat) else {
                continue;
            };
            let slot: &mut (u64, u64) = by_name.entry(name.trim().to_string()).or_default();
            slot.0 += cpu;
            slot.1 += wait;
        }
        ThreadTimes { by_name }
    }

    /// Per thread name, what happened between `self` and `later`: (ns on a
    /// CPU, ns waiting for one). Threads that ended in between are missed.
    pub fn until(&self, later: &ThreadTimes) -> Vec<(String, u64, u64)> {
        later
            .by_name
            .iter()
            .map(|(name, &(cpu, wait))| {
                let (cpu0, wait0) = self.by_name.get(name).copied().unwrap_or_default();
                (
                    name.clone(),
                    cpu.saturating_sub(cpu0),
                    wait.saturating_sub(wait0),
                )
            })
            .filter(|(_, cpu, wait)| cpu + wait > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_come_from_the_counter_deltas() {
        let at = std::time::Instant::now();
        let a = HostSample {
            ticks: [100, 0, 50, 800, 10, 0, 0, 40],
            io_stall_us: Some(1_000),
            at,
        };
        let b = HostSample {
            ticks: [160, 0, 70, 880, 30, 0, 0, 60],
            io_stall_us: Some(1_000 + 250_000),
            at: at + std::time::Duration::from_secs(1),
        };
        // Deltas: user 60, system 20, idle 80, iowait 20, steal 20 of 200.
        assert_eq!(
            a.until(&b),
            "host: CPU steal 10%, iowait 10%, I/O pressure 25%"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_process_cpu_time_and_memory_are_read_from_proc() {
        let me = std::process::id();
        let before = process_cpu_secs(me).unwrap();
        // Burn some CPU on this thread until the counter (in clock ticks)
        // has moved, bounded by a generous wall-clock limit.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while process_cpu_secs(me).unwrap() <= before
            && start.elapsed() < std::time::Duration::from_secs(10)
        {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        assert!(process_cpu_secs(me).unwrap() > before);
        let rss = process_status_kib(me, "VmRSS").unwrap();
        let peak = process_status_kib(me, "VmHWM").unwrap();
        assert!(rss > 0 && peak >= rss, "VmRSS {rss} KiB, VmHWM {peak} KiB");
        // `VmRSS` must not match a longer field name that starts with it.
        assert!(process_status_kib(me, "VmRS").is_err());
        assert!(process_status_kib(me, "NoSuchField").is_err());
        assert!(process_cpu_secs(u32::MAX).is_err());
    }

    #[test]
    fn schedstat_gives_cpu_and_wait() {
        assert_eq!(parse_schedstat("123 45 6\n"), Some((123, 45)));
        assert_eq!(parse_schedstat("123"), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
    }

    #[test]
    fn thread_times_are_deltas_by_name() {
        let mut a = ThreadTimes::default();
        a.by_name.insert("writer".into(), (1_000, 50));
        a.by_name.insert("idle".into(), (7, 7));
        let mut b = a.clone();
        b.by_name.insert("writer".into(), (4_000, 150));
        b.by_name.insert("new".into(), (20, 5));
        assert_eq!(
            a.until(&b),
            vec![
                ("new".to_string(), 20, 5),
                ("writer".to_string(), 3_000, 100)
            ]
        );
        // This process has at least the thread running this test.
        let now = ThreadTimes::now();
        if std::path::Path::new("/proc/self/task").exists() {
            assert!(!now.by_name.is_empty());
        }
    }
}
