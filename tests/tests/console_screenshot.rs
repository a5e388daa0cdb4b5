//! The Prometheus console dashboard (`charts/queue-processor/consoles/queue-processor.html`)
//! during a real local-mode run: `qp-operator local` writes its scrape targets into the shared
//! Prometheus' file_sd directory, requests flow through its gateway, and a headless Chromium
//! renders the page. The screenshot is kept as a test artifact
//! (`target/test-artifacts/console-dashboard.png`), and the test checks that the page shows
//! data: the summary table (rendered by Prometheus from instant queries) has a row for this
//! QueueProcessor, the graphs (drawn by the page's JavaScript from range queries) have lines
//! and a legend naming it, and Prometheus itself answers the same queries with data.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use qp_tests::env;
use qp_tests::fixture::{Fixture, RedisKind};
use qp_tests::local::{self, LocalMode, TestQp};

const CHROMIUM: &str = "/usr/bin/chromium";

/// `GET /api/v1/query`: the result vector (empty when the query matches nothing).
async fn instant(http: &reqwest::Client, prom: &str, query: &str) -> Vec<serde_json::Value> {
    let resp = http
        .get(format!("{prom}/api/v1/query"))
        .query(&[("query", query)])
        .send()
        .await;
    let Ok(resp) = resp else { return Vec::new() };
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    assert_ne!(v["status"], "error", "query {query} failed: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// Run headless Chromium on `url` with `mode` (`--dump-dom` or `--screenshot=<path>`) in a
/// fresh profile; returns stdout.
async fn chromium(url: &str, mode: &str, profile: &Path) -> String {
    let _ = std::fs::remove_dir_all(profile);
    std::fs::create_dir_all(profile).expect("profile dir");
    let mut cmd = tokio::process::Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args([
        "--window-size=1400,2000",
        // Virtual time runs until the page's range queries have been drawn (or 10 s passed).
        "--virtual-time-budget=10000",
        mode,
        url,
    ])
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("chromium finishes within 120 s")
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(profile);
    assert!(
        out.status.success(),
        "chromium {mode} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The markup of the element with id `id` up to the next `<h3>` (the next panel).
fn panel<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("the page has no #{id}"));
    let rest = &dom[start..];
    &rest[..rest.find("<h3>").unwrap_or(rest.len())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_dashboard_shows_a_live_local_mode_run() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: `apt-get install chromium` (make test installs it)"
    );
    let f = Fixture::new("console", RedisKind::Single, 4).await;
    let prom = f.env.get("QP_PROMETHEUS_URL");
    let targets =
        PathBuf::from(f.env.get("QP_PROMETHEUS_TARGETS")).join(format!("{}.json", f.name));
    let file = local::manifest(
        &f,
        &TestQp {
            sleep_millis: 50,
            per_replica_tokens: 4,
            max_replicas: 2,
        },
    );
    let mut lm = LocalMode::start(&f.name, &file, Some(&targets));
    let st = lm.wait_ready(Duration::from_secs(120)).await;
    let gateway = st.gateway_url.clone().expect("the gateway is enabled");
    assert!(targets.exists(), "local mode wrote {}", targets.display());

    // Steady traffic (~80 requests/s) until the end of the test.
    let http = reqwest::Client::new();
    let traffic = tokio::spawn({
        let (http, gateway) = (http.clone(), gateway.clone());
        async move {
            loop {
                let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
                let deadline = Instant::now() + Duration::from_secs(30);
                let progress = Arc::new(AtomicUsize::new(0));
                let _ = local::submit_burst(&http, &gateway, 20, 8, deadline, progress, tx).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });

    // Prometheus scraped the operator and the workers, with enough samples for lines.
    let sel = format!("namespace='{}', queueprocessor='{}'", f.namespace, f.name);
    let checks = [
        format!("max by (namespace, queueprocessor) (qp_operator_backlog{{{sel}}})"),
        format!("max(qp_operator_ready_replicas{{{sel}}}) >= 1"),
        format!("sum(rate(qp_worker_messages_total{{{sel}, outcome='done'}}[1m])) > 0"),
        format!("sum(rate(qp_gateway_requests_total{{{sel}}}[1m])) > 0"),
        format!("count_over_time(qp_operator_throughput{{{sel}}}[5m]) >= 12"),
    ];
    let deadline = Instant::now() + Duration::from_secs(120);
    for q in &checks {
        while instant(&http, &prom, q).await.is_empty() {
            assert!(
                Instant::now() < deadline,
                "Prometheus has no data for {q} after 120 s (targets in {})",
                targets.display()
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    // The page, as a browser renders it: the graphs show the last minute.
    let url = format!(
        "{prom}/consoles/queue-processor.html#pctc%7B%22duration%22%3A60%2C%22endTime%22%3A0%7D"
    );
    let profile = std::env::temp_dir().join(format!("qp-chromium-{}", f.name));
    let dom = chromium(&url, "--dump-dom", &profile).await;
    let qp = format!("{}/{}", f.namespace, f.name);
    let summary = panel(&dom, "qp-summary");
    assert!(
        summary.contains(&format!("<td>{qp}</td>")),
        "the summary table has a row for {qp}: {summary}"
    );
    for graph in [
        "backlogGraph",
        "throughputGraph",
        "replicasGraph",
        "tokensGraph",
    ] {
        let html = panel(&dom, graph);
        assert!(
            html.contains("<svg") && html.contains("class=\"path\" d=\"M"),
            "#{graph} draws lines: {}",
            &html[..html.len().min(2000)]
        );
        assert!(html.contains(&qp), "#{graph} has a legend entry for {qp}");
    }

    let artifacts = env::workspace_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifact dir");
    let png = artifacts.join("console-dashboard.png");
    let _ = std::fs::remove_file(&png);
    chromium(&url, &format!("--screenshot={}", png.display()), &profile).await;
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 50_000,
        "{} is a full-page PNG ({} bytes)",
        png.display(),
        bytes.len()
    );
    eprintln!("screenshot: {}", png.display());

    traffic.abort();
    assert!(
        lm.stop(Duration::from_secs(60)).await,
        "local mode stops cleanly; see {}",
        lm.log.display()
    );
    assert!(
        !targets.exists(),
        "local mode removed its scrape targets on stop"
    );
    f.cleanup().await;
}
