//! `qp-bench [group...]`: run the benchmark groups (all, or the named ones) against the local
//! services and print one `name value unit` line per figure on stdout, then a summary table of
//! every figure with its goal and whether it was met, as `# ` comment lines. Progress goes to
//! stderr.
//! `make bench` builds the release binaries and runs this with `QP_BIN_DIR=target/release`.

use std::io::Write;
use std::process::ExitCode;

use qp_tests::bench::{self, GROUPS};

#[tokio::main]
async fn main() -> ExitCode {
    let filters: Vec<String> = std::env::args().skip(1).collect();
    if filters.iter().any(|f| f == "-h" || f == "--help") {
        let names: Vec<&str> = GROUPS.iter().map(|(n, _)| *n).collect();
        eprintln!("usage: qp-bench [group...]   groups: {}", names.join(" "));
        return ExitCode::SUCCESS;
    }
    for f in &filters {
        if !GROUPS.iter().any(|(n, _)| n == f) {
            let names: Vec<&str> = GROUPS.iter().map(|(n, _)| *n).collect();
            eprintln!("unknown benchmark group {f:?}; known: {}", names.join(" "));
            return ExitCode::from(2);
        }
    }
    let env = qp_tests::env::load();
    let mut failed = Vec::new();
    let mut all = Vec::new();
    for (name, budget) in GROUPS {
        if !filters.is_empty() && !filters.iter().any(|f| f == name) {
            continue;
        }
        eprintln!("[bench] group {name} (at most {}s)", budget.as_secs());
        let started = std::time::Instant::now();
        // Each group runs in its own task so that a panic (a measurement that could not be
        // taken) is reported and the other groups still run. Child processes and servers a
        // group started are killed by their destructors.
        let env = env.clone();
        let task = tokio::spawn(async move { bench::run_group(name, &env).await });
        let abort = task.abort_handle();
        match tokio::time::timeout(*budget, task).await {
            Ok(Ok(Some(figures))) => {
                let mut out = std::io::stdout().lock();
                for (figure, value, unit) in &figures {
                    let _ = writeln!(out, "{figure} {} {unit}", format_value(*value));
                }
                all.extend(figures);
                let _ = out.flush();
                eprintln!(
                    "[bench] group {name} done in {:.0}s",
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(Ok(None)) => unreachable!("group names are checked above"),
            Ok(Err(e)) => {
                eprintln!("[bench] group {name} failed: {e}");
                failed.push(*name);
            }
            Err(_) => {
                abort.abort();
                eprintln!(
                    "[bench] group {name} took longer than {}s",
                    budget.as_secs()
                );
                failed.push(*name);
            }
        }
    }
    if !all.is_empty() {
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "{}", bench::goals::summary(&all, format_value));
        let _ = out.flush();
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("[bench] failed groups: {}", failed.join(" "));
        ExitCode::FAILURE
    }
}

/// Three significant digits after the point for small values, whole numbers for big ones.
fn format_value(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    match v.abs() {
        a if a >= 1000.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.3}"),
    }
}
