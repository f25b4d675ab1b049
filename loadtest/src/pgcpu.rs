//! What PostgreSQL spends: the CPU time of a local PostgreSQL server, read from
//! `/proc` (`run --pg-pid`), so a report can give PostgreSQL's CPU per client
//! operation for each target.
//!
//! The total is the postmaster's own time, plus the time of its children that have
//! ended (the kernel adds it to the postmaster's `cutime`/`cstime` when it reaps
//! them), plus that of its live children: backends, WAL writer, checkpointer,
//! autovacuum. Live processes are read from `schedstat` (nanoseconds) where the kernel
//! has it, else from `stat` (clock ticks, usually 10 ms). A child that ends between
//! two samples is counted with its whole life: a small overcount, only for
//! connections opened and closed inside a window.
//!
//! This looks behind the targets' backs on purpose: it is the one figure the wire
//! cannot show. It works only when PostgreSQL runs on this machine and `/proc` lets
//! this user read its processes.

use std::time::Duration;

use crate::db::Session;

/// A PostgreSQL server to sample.
#[derive(Debug, Clone, Copy)]
pub struct PgCpu {
    postmaster: u32,
    tick_ns: u64,
}

/// Cumulative CPU time of the whole server at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample(u64);

impl Sample {
    /// CPU time between `self` and a later sample.
    pub fn until(self, later: Sample) -> Duration {
        Duration::from_nanos(later.0.saturating_sub(self.0))
    }
}

/// The fields of `/proc/PID/stat` this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    ppid: u32,
    /// utime + stime, clock ticks.
    own: u64,
    /// cutime + cstime: children that ended and were reaped, clock ticks.
    children: u64,
}

fn parse_stat(text: &str) -> Option<Stat> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        ppid: u32::try_from(num(1)?).ok()?,
        own: num(11)? + num(12)?,
        children: num(13)? + num(14)?,
    })
}

fn read_stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Time on a CPU in nanoseconds, the first field of `/proc/PID/schedstat`.
fn read_schedstat(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux unless built otherwise).
fn ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

impl PgCpu {
    /// The server whose postmaster is `pid` (the first line of `postmaster.pid`).
    pub fn new(pid: u32) -> anyhow::Result<PgCpu> {
        if read_stat(pid).is_none() {
            anyhow::bail!(
                "--pg-pid {pid}: cannot read /proc/{pid}/stat; give the PID of a PostgreSQL \
                 postmaster on this machine (the first line of its postmaster.pid)"
            );
        }
        Ok(PgCpu {
            postmaster: pid,
            tick_ns: 1_000_000_000 / ticks_per_second(),
        })
    }

    /// The server's CPU time so far; `None` when the postmaster is gone.
    pub fn sample(&self) -> Option<Sample> {
        let pm = read_stat(self.postmaster)?;
        let mut total = (pm.own + pm.children) * self.tick_ns;
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Some(Sample(total));
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // A process may end between listing and reading: then it is in cutime.
            let Some(st) = read_stat(pid).filter(|s| s.ppid == self.postmaster) else {
                continue;
            };
            total += read_schedstat(pid).unwrap_or(st.own * self.tick_ns);
        }
        Some(Sample(total))
    }
}

/// Waits, before a round's closing sample, for the work a target still owes
/// PostgreSQL: `SPILLWAY FLUSH` through spillway waits for every acknowledged write to
/// be applied. PostgreSQL itself refuses the statement (a syntax error, cheap); then
/// `false`, and the caller stops asking that target.
pub async fn settle(session: &mut Session) -> bool {
    session.batch("SPILLWAY FLUSH").await.is_ok()
}

/// CPU per operation in microseconds.
pub fn per_op_micros(cpu: Duration, ops: u64) -> Option<f64> {
    (ops > 0).then(|| cpu.as_secs_f64() * 1e6 / ops as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_name_holding_parentheses() {
        let line = "4242 (postgres: bench (x) idle) S 4200 4200 4200 0 -1 4194560 \
                    1177 0 0 0 31 17 5 3 20 0 1 0 123 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                ppid: 4200,
                own: 48,
                children: 8
            })
        );
        assert_eq!(parse_stat("12 (short) S 1"), None);
    }

    #[test]
    fn counts_children_that_ended() {
        use std::io::BufRead;
        // A "postmaster" (sh) whose child burns CPU, ends, and is reaped by it.
        let mut sh = std::process::Command::new("sh")
            .args([
                "-c",
                "(i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done); echo done; sleep 5",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let cpu = PgCpu::new(sh.id()).expect("stat readable");
        let before = cpu.sample().expect("sample");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(sh.stdout.take().expect("stdout"));
        out.read_line(&mut line).expect("done");
        let after = cpu.sample().expect("sample");
        let _ = sh.kill();
        let _ = sh.wait();
        // 300,000 shell loop iterations take far more than 20 ms of CPU.
        assert!(
            before.until(after) >= Duration::from_millis(20),
            "{:?}",
            before.until(after)
        );
        assert!(PgCpu::new(u32::MAX).is_err());
        assert_eq!(per_op_micros(Duration::from_millis(3), 1000), Some(3.0));
        assert_eq!(per_op_micros(Duration::from_millis(3), 0), None);
    }
}
