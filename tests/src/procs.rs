//! Running our own binaries as real processes, the way Kubernetes or local mode would.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Path of a binary of this workspace (`qp-worker`, `qp-operator`): from `$QP_BIN_DIR` when set
/// (benchmarks point it at `target/release`), else built by `make test` /
/// `cargo build --workspace --bins` into the same target directory as the test executable.
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("QP_BIN_DIR") {
        return binary_in(Path::new(&dir), name);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>; a binary of this crate (the
    // bench driver) lives in target/<profile>/ itself.
    let mut dir = exe.parent().expect("executable has a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("deps/ has a parent");
    }
    binary_in(dir, name)
}

/// Path of binary `name` in `dir`, which must exist.
pub fn binary_in(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build it first with `cargo build --workspace --bins` (make test does)",
        path.display()
    );
    path
}

/// A free loopback port (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// How long [`Proc::terminate`] waits for a process to exit.
pub const TERMINATE_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);

/// A child process that is killed (SIGKILL) when dropped, so a failing test leaves nothing
/// running. Use [`Proc::terminate`] for a graceful SIGTERM stop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Start `cmd` with output captured into a log file under `target/test-logs/`.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let logs = crate::env::workspace_root().join("target/test-logs");
        std::fs::create_dir_all(&logs).expect("create log dir");
        let path = logs.join(format!("{name}.log"));
        let log = std::fs::File::create(&path).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child: Some(child),
            log: path,
        }
    }

    /// What the process has written to its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, no cleanup: what a crash or an OOM kill looks like.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit; returns whether it exited successfully. A process
    /// still running [`TERMINATE_WITHIN`] later is killed and the test fails: a stop that
    /// hangs is a bug to report, not a CI run to stall.
    pub fn terminate(&mut self) -> bool {
        match self.terminate_within(TERMINATE_WITHIN) {
            Some(ok) => ok,
            None => panic!(
                "{} still running {TERMINATE_WITHIN:?} after SIGTERM (killed)",
                self.name
            ),
        }
    }

    /// SIGTERM and wait up to `limit`: `Some(success)` when it exited, `None` when it was
    /// still running (it is then killed).
    pub fn terminate_within(&mut self, limit: std::time::Duration) -> Option<bool> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + limit;
        loop {
            match c.try_wait() {
                Ok(Some(status)) => return Some(status.success()),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return None;
                }
            }
        }
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }
}

/// Lines of a process's log printed when a test fails while it runs: CI keeps the test's
/// output, not `target/test-logs/`, so a failure must carry its own evidence.
const LOG_TAIL_ON_FAILURE: usize = 60;

impl Drop for Proc {
    fn drop(&mut self) {
        // Whether it was still running when the test gave up: a silent log reads the same for a
        // process that hung and one that died without a word (a signal).
        let state = match self.child.as_mut().map(|c| c.try_wait()) {
            None => "stopped by the test".to_owned(),
            Some(Ok(None)) => "still running".to_owned(),
            Some(Ok(Some(status))) => format!("had exited: {status}"),
            Some(Err(e)) => format!("state unknown: {e}"),
        };
        self.kill9();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_ON_FAILURE)..];
            eprintln!(
                "--- last {} lines of {} ({}; {state}) ---\n{}\n--- end of {} ---",
                tail.len(),
                self.name,
                self.log.display(),
                tail.join("\n"),
                self.name
            );
        }
    }
}

/// Established TCP connections of process `pid` to remote port `port`, from `/proc` (the
/// process's socket inodes matched against the kernel's connection table): what a client
/// really holds open, whatever it says about itself.
pub fn tcp_connections_to(pid: u32, port: u16) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let inodes: std::collections::HashSet<String> = fds
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut n = 0;
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(rem), Some(st), Some(inode)) = (cols.get(2), cols.get(3), cols.get(9)) else {
                continue;
            };
            let remote_port = rem
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *st == "01" && remote_port == Some(port) && inodes.contains(*inode) {
                n += 1;
            }
        }
    }
    n
}

/// CPU seconds (user + system) process `pid` has used so far, from `/proc/<pid>/stat`; 0 when
/// it is gone. Clock ticks are 1/100 s on Linux (`getconf CLK_TCK`).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces; every field after its `)` is plain.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 12 and 13 after the state (field 3).
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}
