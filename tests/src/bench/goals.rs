//! The goals the issues set for the figures, and the summary table `qp-bench` prints after
//! the figures: each figure, its goal, and whether this run met it. Figures without a goal
//! (absolute rates, the parts of a ratio) are listed too, so the table is the whole run.

use std::fmt::Write;

use super::Figure;

/// A bound a figure must keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

impl Goal {
    pub fn met(self, value: f64) -> bool {
        match self {
            Goal::AtLeast(g) => value >= g,
            Goal::AtMost(g) => value <= g,
        }
    }
}

impl std::fmt::Display for Goal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Goal::AtLeast(g) => write!(f, ">= {g}"),
            Goal::AtMost(g) => write!(f, "<= {g}"),
        }
    }
}

/// Every figure with a goal, and where the goal comes from (BENCHMARKS.md explains each).
pub const GOALS: &[(&str, Goal)] = &[
    ("worker.ratio_gated_vs_ungated", Goal::AtLeast(0.8)),
    ("worker.ratio_gated_vs_seedstyle", Goal::AtLeast(5.0)),
    ("worker.redis_roundtrips_per_msg", Goal::AtMost(0.3)),
    ("worker.wake_p99_ms", Goal::AtMost(2.0)),
    ("worker.ratio_stream_vs_kafka", Goal::AtLeast(0.8)),
    ("worker.redis_roundtrips_per_msg_stream", Goal::AtMost(0.3)),
    ("worker.ratio_gated_vs_kcat", Goal::AtLeast(0.25)),
    ("worker.ratio_list_vs_kafka", Goal::AtLeast(0.8)),
    ("gateway.ratio_submit_vs_noop", Goal::AtLeast(0.3)),
    ("gateway.longpoll_waiters_10k_rss_mb", Goal::AtMost(100.0)),
    ("gateway.longpoll_wake_p99_ms", Goal::AtMost(20.0)),
    ("operator.rss_mb_100_qps", Goal::AtMost(64.0)),
    ("operator.kafka_requests_per_poll", Goal::AtMost(4.0)),
    ("operator.rss_mb_1000_qps", Goal::AtMost(150.0)),
    (
        "operator.decision_latency_p99_s_1000_qps",
        Goal::AtMost(3.0),
    ),
    (
        "operator.kafka_requests_per_poll_1000_qps",
        Goal::AtMost(50.0),
    ),
    ("operator.api_requests_per_qp_per_poll", Goal::AtMost(1.0)),
    ("chaos.lost", Goal::AtMost(0.0)),
    ("chaos.max_concurrency_over_limit", Goal::AtMost(0.0)),
    ("chaos.max_stall_s", Goal::AtMost(3.0)),
    ("chaos.resume_after_kafka_restart_s", Goal::AtMost(3.0)),
    ("chaos.max_stall_before_kafka_restart_s", Goal::AtMost(3.0)),
    ("chaos.resume_after_redis_crash_s", Goal::AtMost(3.0)),
];

/// The goal of a figure, if it has one.
pub fn goal_of(name: &str) -> Option<Goal> {
    GOALS.iter().find(|(n, _)| *n == name).map(|(_, g)| *g)
}

/// The summary table, one `# `-prefixed line per figure (so that a reader of the
/// `name value unit` lines can skip it as comments), then a count of goals met.
pub fn summary(figures: &[Figure], format_value: impl Fn(f64) -> String) -> String {
    let rows: Vec<(&str, String, String, &str)> = figures
        .iter()
        .map(|(name, value, unit)| {
            let shown = format!("{} {unit}", format_value(*value));
            match goal_of(name) {
                Some(g) => {
                    let verdict = if g.met(*value) { "met" } else { "NOT MET" };
                    (name.as_str(), shown, g.to_string(), verdict)
                }
                None => (name.as_str(), shown, "-".to_owned(), ""),
            }
        })
        .collect();
    let w_name = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(6);
    let w_value = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(5);
    let w_goal = rows.iter().map(|r| r.2.len()).max().unwrap_or(0).max(4);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# {:w_name$}  {:>w_value$}  {:>w_goal$}  met",
        "figure", "value", "goal"
    );
    for (name, shown, goal, verdict) in &rows {
        let line = format!("# {name:w_name$}  {shown:>w_value$}  {goal:>w_goal$}  {verdict}");
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let with_goal = rows.iter().filter(|r| !r.3.is_empty()).count();
    let met = rows.iter().filter(|r| r.3 == "met").count();
    let _ = writeln!(out, "# {met} of {with_goal} goals met");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, v: f64) -> Figure {
        (name.to_owned(), v, "x".to_owned())
    }

    #[test]
    fn goals_are_met_at_their_bound_and_not_past_it() {
        assert!(Goal::AtLeast(0.8).met(0.8));
        assert!(!Goal::AtLeast(0.8).met(0.79));
        assert!(Goal::AtMost(2.0).met(2.0));
        assert!(!Goal::AtMost(2.0).met(2.01));
        assert!(
            !Goal::AtMost(2.0).met(f64::NAN),
            "an unmeasured figure meets nothing"
        );
    }

    #[test]
    fn the_summary_lists_every_figure_and_counts_goals() {
        let figures = [
            f("worker.wake_p99_ms", 0.5),
            f("worker.ratio_gated_vs_kcat", 0.1),
            f("worker.gated_msgs_per_s", 45000.0),
        ];
        let table = summary(&figures, |v| format!("{v}"));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert!(lines.iter().all(|l| l.starts_with("# ")));
        assert!(lines[1].contains("<= 2") && lines[1].ends_with("met"));
        assert!(lines[2].contains(">= 0.25") && lines[2].ends_with("NOT MET"));
        assert!(lines[3].ends_with(" -") && !lines[3].contains("met"));
        assert_eq!(lines[4], "# 1 of 2 goals met");
    }

    #[test]
    fn every_goal_names_a_figure_once() {
        for (i, (name, _)) in GOALS.iter().enumerate() {
            assert!(name.contains('.'), "{name} is group.what");
            assert!(
                !GOALS[i + 1..].iter().any(|(n, _)| n == name),
                "{name} twice"
            );
        }
    }
}
