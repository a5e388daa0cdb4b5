//! The chart's Grafana dashboard, its alerts and its Prometheus console page, checked with the
//! real tools rather than by eye:
//!
//! * `promtool check rules` / `promtool test rules`, the rules loaded into the running Prometheus,
//!   and every PromQL query of the dashboard, the alerts and the console page evaluated by it;
//! * the console page rendered by a Prometheus of our own.
//!
//! The tools and addresses come from the env file written by `hack/env.sh` ([`qp_tests::env`]).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use qp_tests::chart::{chart_dir, chart_file, read};
use qp_tests::procs;
use qp_tests::tools::{env_get, promtool, run_ok, test_env, unique};

// ------------------------------------------------------------------------------------------------
// Alerts, dashboard and console queries against promtool and Prometheus

#[tokio::test]
async fn alerts_pass_promtool_check_and_unit_tests() {
    let out = run_ok(
        promtool()
            .args(["check", "rules"])
            .arg(chart_file("files/alerts.yaml")),
        None,
    );
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run_ok(
        promtool()
            .args(["test", "rules"])
            .arg(chart_file("tests/alerts_test.yaml")),
        None,
    );
    assert!(out.contains("SUCCESS"), "{out}");

    // Every alert has a severity, a summary, a description, and at least one test case.
    let alerts: Yaml = serde_yaml::from_str(&read(&chart_file("files/alerts.yaml"))).unwrap();
    let tests = read(&chart_file("tests/alerts_test.yaml"));
    let mut names = Vec::new();
    for group in alerts["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().expect("alerting rule").to_string();
            assert!(rule["labels"]["severity"].is_string(), "{name}: severity");
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: summary"
            );
            assert!(
                rule["annotations"]["description"].is_string(),
                "{name}: description"
            );
            assert!(
                tests.contains(&format!("alertname: {name}\n")),
                "{name} has a promtool test"
            );
            names.push(name);
        }
    }
    for wanted in [
        "QueueProcessorBacklogGrowing",
        "QueueProcessorTokensSaturated",
        "QueueProcessorSourceUnreachable",
        "QueueProcessorDeadLetters",
        "QueueProcessorWorkerRestarting",
        "QueueProcessorLocalWorkerRestarting",
    ] {
        assert!(names.iter().any(|n| n == wanted), "alert {wanted} exists");
    }
}

/// Every `expr` string anywhere in a JSON document.
fn json_exprs(value: &Json, out: &mut Vec<String>) {
    match value {
        Json::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Json::String(s)) => out.push(s.clone()),
                    _ => json_exprs(v, out),
                }
            }
        }
        Json::Array(items) => items.iter().for_each(|v| json_exprs(v, out)),
        _ => {}
    }
}

/// The dashboard's queries with Grafana's variables replaced by what Grafana would send:
/// `$__rate_interval` a duration, the template variables "All" (`.*`). The templating queries
/// `label_values(<selector>, <label>)` are checked as their selector.
fn dashboard_queries() -> Vec<String> {
    let dashboard: Json = serde_json::from_str(&read(&chart_file("files/dashboard.json"))).unwrap();
    let mut exprs = Vec::new();
    json_exprs(&dashboard["panels"], &mut exprs);
    let variables: Vec<String> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"].as_str().unwrap_or_default();
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.rsplit_once(','))
            .map(|(selector, _)| selector.to_string())
            .unwrap_or_else(|| panic!("unexpected variable query {query}"));
        exprs.push(inner);
    }
    exprs
        .into_iter()
        .map(|e| {
            let mut e = e
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "15s")
                .replace("$__range", "1h");
            for var in &variables {
                e = e
                    .replace(&format!("${{{var}}}"), ".*")
                    .replace(&format!("${var}"), ".*");
            }
            assert!(!e.contains('$'), "unreplaced variable in {e}");
            e
        })
        .collect()
}

fn alert_queries() -> Vec<String> {
    let alerts: Yaml = serde_yaml::from_str(&read(&chart_file("files/alerts.yaml"))).unwrap();
    alerts["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .map(|r| r["expr"].as_str().unwrap().to_string())
        .collect()
}

/// Reads a Go or JavaScript double-quoted string literal starting at `s[0] == '"'`; returns the
/// unescaped text and the rest after the closing quote.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut chars = s.char_indices();
    if chars.next()?.1 != '"' {
        return None;
    }
    let mut text = String::new();
    let mut escaped = false;
    for (i, c) in chars {
        match (escaped, c) {
            (true, c) => {
                text.push(c);
                escaped = false;
            }
            (false, '\\') => escaped = true,
            (false, '"') => return Some((text, &s[i + 1..])),
            (false, c) => text.push(c),
        }
    }
    None
}

/// The console page's queries: string literals after the template functions `query`, `args`
/// and `printf` (whose `%s` placeholders are filled with a dummy value), and the strings of every
/// graph's `expr: [...]` list.
fn console_queries(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for keyword in ["query", "args", "printf"] {
        let mut rest = html;
        while let Some(i) = rest.find(keyword) {
            let before = rest[..i].chars().next_back();
            let after = &rest[i + keyword.len()..];
            rest = after;
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
                continue;
            }
            let trimmed = after.trim_start_matches([' ', '\t']);
            if trimmed.len() == after.len() {
                continue; // not followed by whitespace: some other word
            }
            if let Some((text, _)) = quoted(trimmed) {
                out.push(text.replace("%s", "x"));
            }
        }
    }
    let mut rest = html;
    while let Some(i) = rest.find("expr:") {
        rest = rest[i + 5..].trim_start();
        let Some(list) = rest.strip_prefix('[') else {
            panic!("graph expr must be a list: {}", &rest[..rest.len().min(60)]);
        };
        rest = list;
        loop {
            rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
            if let Some(after) = rest.strip_prefix(']') {
                rest = after;
                break;
            }
            let (text, after) = quoted(rest).expect("a quoted query in an expr list");
            out.push(text);
            rest = after;
        }
    }
    out
}

/// Evaluates `query` with the running Prometheus; returns the error, if any.
async fn prometheus_error(http: &reqwest::Client, url: &str, query: &str) -> Option<String> {
    let response = http
        .get(format!("{url}/api/v1/query"))
        .query(&[("query", query)])
        .send()
        .await
        .expect("Prometheus reachable");
    let body: Json = response.json().await.expect("JSON answer");
    (body["status"] != "success").then(|| format!("{query}\n    -> {}", body["error"]))
}

#[tokio::test]
async fn every_dashboard_alert_and_console_query_evaluates_in_prometheus() {
    let url = env_get("QP_PROMETHEUS_URL");
    let http = reqwest::Client::new();

    let dashboard = dashboard_queries();
    let alerts = alert_queries();
    let console = console_queries(&read(&chart_file("consoles/queue-processor.html")));
    // Guards against the extraction silently finding nothing.
    assert!(
        dashboard.len() >= 30,
        "dashboard queries found: {}",
        dashboard.len()
    );
    assert!(
        alerts.len() >= 6,
        "alert expressions found: {}",
        alerts.len()
    );
    assert!(
        console.len() >= 25,
        "console queries found: {}",
        console.len()
    );

    let mut errors = Vec::new();
    for (source, queries) in [
        ("dashboard.json", &dashboard),
        ("alerts.yaml", &alerts),
        ("queue-processor.html", &console),
    ] {
        for query in queries.iter() {
            if let Some(e) = prometheus_error(&http, &url, query).await {
                errors.push(format!("{source}: {e}"));
            }
        }
    }
    // A query that is wrong must be reported, or the check above proves nothing.
    assert!(
        prometheus_error(&http, &url, "sum by (le (rate(x[1m]))")
            .await
            .is_some(),
        "Prometheus rejects a malformed query"
    );
    assert!(
        errors.is_empty(),
        "queries Prometheus rejects:\n{}",
        errors.join("\n")
    );

    // The console page shows the same graphs as the dashboard: each metric the dashboard plots
    // also appears on the page.
    let html = read(&chart_file("consoles/queue-processor.html"));
    for metric in [
        "qp_operator_backlog",
        "qp_worker_partition_lag",
        "qp_operator_throughput",
        "qp_worker_messages_total",
        "qp_operator_desired_replicas",
        "qp_operator_ready_replicas",
        "qp_operator_tokens_in_use",
        "qp_operator_tokens_limit",
        "qp_worker_processing_seconds_bucket",
        "qp_worker_token_wait_seconds_bucket",
        "qp_worker_dead_letters_total",
    ] {
        assert!(
            dashboard.iter().any(|q| q.contains(metric)),
            "dashboard plots {metric}"
        );
        assert!(html.contains(metric), "console page plots {metric}");
    }
}

/// A rules file dropped into the running Prometheus' rule directory, removed (and Prometheus
/// reloaded) when the test ends.
struct LoadedRules {
    path: PathBuf,
    url: String,
}

impl Drop for LoadedRules {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = Command::new("curl")
            .args(["-fsS", "-X", "POST"])
            .arg(format!("{}/-/reload", self.url))
            .output();
    }
}

#[tokio::test]
async fn alerts_load_and_evaluate_cleanly_in_the_running_prometheus() {
    let url = env_get("QP_PROMETHEUS_URL");
    let dir = PathBuf::from(env_get("QP_PROMETHEUS_RULES"));
    let http = reqwest::Client::new();
    let rules = LoadedRules {
        path: dir.join(format!("{}.yml", unique("chart-test-alerts"))),
        url: url.clone(),
    };
    std::fs::copy(chart_file("files/alerts.yaml"), &rules.path).expect("copy the rules file");
    let reload = http
        .post(format!("{url}/-/reload"))
        .send()
        .await
        .expect("Prometheus reachable");
    assert!(reload.status().is_success(), "reload: {}", reload.status());

    let wanted = alert_queries().len();
    let path = rules.path.to_string_lossy().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let last = loop {
        let body: Json = http
            .get(format!("{url}/api/v1/rules"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let groups: Vec<&Json> = body["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["file"] == path.as_str())
            .collect();
        let rules: Vec<&Json> = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().iter())
            .collect();
        let evaluated = rules.len() == wanted
            && rules.iter().all(|r| {
                !r["lastEvaluation"]
                    .as_str()
                    .unwrap_or("0001")
                    .starts_with("0001")
            });
        if evaluated {
            let bad: Vec<String> = rules
                .iter()
                .filter(|r| r["health"] != "ok")
                .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
                .collect();
            assert!(bad.is_empty(), "rules failing in Prometheus: {bad:?}");
            break rules.len();
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not load and evaluate {path} within 60 s: {groups:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(last, wanted);
}

/// A Prometheus of our own serving the chart's console directory, stopped when dropped.
struct ConsolePrometheus {
    child: Child,
    data: PathBuf,
    url: String,
}

impl Drop for ConsolePrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// The console libraries (prom.lib, menu.lib) of the installed Prometheus.
fn console_libraries() -> PathBuf {
    let mut candidates: Vec<PathBuf> = test_env()
        .try_get("QP_PROMETHEUS_CONSOLE_LIBRARIES")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.extend(
        [
            "/usr/share/prometheus/console_libraries",
            "/usr/share/doc/prometheus/examples/console_libraries",
            "/etc/prometheus/console_libraries",
        ]
        .map(PathBuf::from),
    );
    candidates
        .into_iter()
        .find(|d| d.join("prom.lib").is_file() || d.join("prom_console.lib").is_file())
        .expect("Prometheus console libraries (Debian: /usr/share/doc/prometheus/examples/console_libraries)")
}

#[tokio::test]
async fn console_page_renders_in_prometheus() {
    let port = procs::free_port();
    let data = std::env::temp_dir().join(unique("qp-console-prometheus"));
    std::fs::create_dir_all(&data).unwrap();
    let config = data.join("prometheus.yml");
    std::fs::write(&config, "global:\n  scrape_interval: 15s\n").unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            data.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg(format!(
            "--web.console.templates={}",
            chart_dir().join("consoles").display()
        ))
        .arg(format!(
            "--web.console.libraries={}",
            console_libraries().display()
        ))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let prometheus = ConsolePrometheus {
        child,
        data,
        url: format!("http://127.0.0.1:{port}"),
    };

    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http.get(format!("{}/-/ready", prometheus.url)).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "private Prometheus not ready in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let response = http
        .get(format!("{}/consoles/queue-processor.html", prometheus.url))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let page = response.text().await.unwrap();
    assert!(status.is_success(), "console page: {status}\n{page}");
    assert!(!page.contains("error executing template"), "{page}");
    assert!(page.contains("<h1>Queue Processor</h1>"));
    // No metrics in this Prometheus: the summary table says so instead of failing.
    assert!(page.contains("No QueueProcessor reports metrics yet"));
    for graph in [
        "backlogGraph",
        "partitionGraph",
        "throughputGraph",
        "replicasGraph",
        "tokensGraph",
        "processingGraph",
        "tokenWaitGraph",
        "errorsGraph",
    ] {
        assert!(page.contains(&format!("id=\"{graph}\"")), "graph {graph}");
    }
    drop(prometheus);
}
