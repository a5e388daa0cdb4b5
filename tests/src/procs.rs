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

    /// SIGTERM and wait for a graceful exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        c.wait().map(|s| s.success()).unwrap_or(false)
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
        self.kill9();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_ON_FAILURE)..];
            eprintln!(
                "--- last {} lines of {} ({}) ---\n{}\n--- end of {} ---",
                tail.len(),
                self.name,
                self.log.display(),
                tail.join("\n"),
                self.name
            );
        }
    }
}
