//! Hostile clients against a real gateway: a thousand idle connections, slowloris clients that
//! send their headers a line a second, oversized and malformed requests. The gateway keeps
//! answering real clients, cuts the hostile ones off, and its memory stays bounded.

use std::time::{Duration, Instant};

use futures::StreamExt;
use qp_tests::fixture::{Fixture, GatewayQueue, RedisKind, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Resident memory of a process, in MiB (from /proc).
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib / 1024.0
}

/// Wait until the server closes `stream` (a read returns 0 or an error); when it did.
async fn closed_by_server(mut stream: TcpStream) -> Instant {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return Instant::now(),
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_slow_and_oversized_clients_do_not_stop_the_gateway() {
    let fx = Fixture::new("hostile", RedisKind::Single, 0).await;
    fx.pool().set_limit(8).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let (gateway, base) = fx.gateway(GatewayQueue::RedisList(&list), &[]).await;
    let _worker = fx.list_worker("w0", &list, "echo", &[]);
    let addr = base.trim_start_matches("http://").to_owned();
    let rss_before = rss_mib(gateway.pid());

    // A thousand connections that never say anything, and twenty that dribble headers.
    let opened = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"POST /v1/requests HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    let dribble = tokio::spawn(async move {
        // One header line a second per connection: never a complete request.
        let mut closed = Vec::new();
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut open = Vec::new();
            for mut s in slow.drain(..) {
                if s.write_all(b"X-Slow: 1\r\n").await.is_ok() {
                    open.push(s);
                } else {
                    closed.push(Instant::now());
                }
            }
            slow = open;
            if slow.is_empty() {
                break;
            }
        }
        (closed, slow.len())
    });

    // Real clients are served meanwhile.
    let http = reqwest::Client::new();
    let served = Instant::now();
    for i in 0..20 {
        let r = http
            .post(format!("{base}/v1/requests"))
            .header("content-type", "text/plain")
            .body(format!("real {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
        let id = r.json::<serde_json::Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let answer: serde_json::Value = http
            .get(format!("{base}/v1/requests/{id}?wait=10"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["status"], "done", "{answer}");
    }
    let served_in = served.elapsed();
    let rss_loaded = rss_mib(gateway.pid());

    // Oversized headers and a malformed request line are answered and cut off.
    let mut big = TcpStream::connect(&addr).await.unwrap();
    let header = format!(
        "GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let _ = big.write_all(header.as_bytes()).await;
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "oversized headers: {:.60}",
        answer
    );
    let mut bad = TcpStream::connect(&addr).await.unwrap();
    bad.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    let _ = bad.read_to_string(&mut answer).await;
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "malformed: {:.60}",
        answer
    );

    // The idle connections are closed by the gateway, not left open for ever.
    let closes = futures::future::join_all(idle.into_iter().map(closed_by_server));
    let closes = tokio::time::timeout(Duration::from_secs(60), closes)
        .await
        .expect("idle connections closed within 60 s");
    let idle_closed_after = closes.iter().max().unwrap().duration_since(opened);
    let (slow_closed, still_open) = dribble.await.unwrap();
    let slow_closed_after = slow_closed.iter().max().map(|t| t.duration_since(opened));
    println!(
        "hostile clients: 1000 idle + 20 slowloris connections; 20 submits + long polls served \
         in {served_in:?}; gateway RSS {rss_before:.1} MiB before, {rss_loaded:.1} MiB with \
         them; idle connections all closed {idle_closed_after:?} after opening, slowloris ones \
         {slow_closed_after:?} ({still_open} still open)"
    );
    assert_eq!(still_open, 0, "slowloris connections cut off");
    assert!(rss_loaded - rss_before < 100.0, "memory bounded");
    // The gateway still answers afterwards.
    eventually(Duration::from_secs(5), "readyz after the storm", || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    fx.cleanup().await;
}

/// Defect (issue 16): the gateway's API served at most 4096 connections, the bound of a metrics
/// server, and every parked long poll holds one: the 4097th waiter was never served, it sat in
/// the kernel's backlog until its client gave up. 5000 long polls on pending requests must all
/// be parked at once (the gateway's own gauge), each costing a bounded amount of memory.
#[tokio::test(flavor = "multi_thread")]
async fn more_long_polls_than_a_metrics_server_allows_are_all_parked() {
    let fx = Fixture::new("parked", RedisKind::Single, 0).await;
    let list = format!("{}queue", fx.keys.prefix());
    let (gateway, base) = fx.gateway(GatewayQueue::RedisList(&list), &[]).await;
    let addr = base.trim_start_matches("http://").to_owned();
    let n = 5000;
    // Pending requests, with no worker to finish them.
    let http = reqwest::Client::new();
    let submits = (0..n).map(|i| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let r = http
                .post(format!("{base}/v1/requests"))
                .header("content-type", "text/plain")
                .header("idempotency-key", format!("park-{i}"))
                .body("x")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
        }
    });
    futures::stream::iter(submits)
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    let before = rss_mib(gateway.pid());

    let mut polls = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(
            format!("GET /v1/requests/park-{i}?wait=30 HTTP/1.1\r\nHost: gw\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        polls.push(s);
    }
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    qp_tests::cluster::until_longpolls_parked(port, n, Duration::from_secs(30)).await;
    let per_poll_kib = (rss_mib(gateway.pid()) - before) * 1024.0 / n as f64;
    println!("{n} parked long polls: {per_poll_kib:.1} KiB of gateway memory each");
    assert!(
        per_poll_kib < 48.0,
        "a parked long poll costs {per_poll_kib:.1} KiB"
    );
    drop(polls);
    fx.cleanup().await;
}
