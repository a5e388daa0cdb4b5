//! A Redis of the benchmark's own, and a way to count the commands a client sends it.
//!
//! Counting Redis round trips per message needs a Redis that nothing else uses: the shared one
//! of `hack/env.sh` also serves the tests, the operator and the demo. [`PrivateRedis`] starts a
//! throwaway `redis-server` on a free loopback port (no persistence) and kills it when dropped.
//!
//! Redis itself cannot say how many commands a client *sent*: `INFO commandstats` (and
//! `total_commands_processed`) also count every `redis.call` a Lua script makes, so one
//! `EVALSHA` that marks 64 results shows up as a few hundred "calls". [`CountingProxy`] sits
//! between a client and the server, forwards bytes both ways untouched, and counts the RESP
//! commands in the client-to-server stream: exactly the requests the client made, pipelined or
//! not. Both numbers are useful; the benchmark reports both.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::procs::{self, Proc};

/// A `redis-server` child process on a free loopback port, without persistence.
pub struct PrivateRedis {
    pub port: u16,
    _proc: Proc,
}

impl PrivateRedis {
    /// Start it and wait until it answers `PING`.
    pub async fn start(name: &str) -> Result<PrivateRedis> {
        let port = procs::free_port();
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "yes", "--loglevel", "warning"]);
        let proc = Proc::spawn(name, cmd);
        let redis = PrivateRedis { port, _proc: proc };
        let client = redis::Client::open(redis.url())?;
        for _ in 0..200 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut c).await;
                if pong.is_ok() {
                    return Ok(redis);
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("private redis-server on port {port} did not come up (is redis-server installed?)")
    }

    /// CPU seconds this Redis has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        procs::cpu_seconds(self._proc.pid())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Empty it (`FLUSHALL SYNC`), so the next measurement starts from the same empty keyspace
    /// as every other. Without this a run pays for the keys of the runs before it: from about
    /// 500,000 keys, Redis spent a third of its CPU rehashing its growing keyspace (`dictRehash`,
    /// `dictSdsHash` in its profile) during the list run, the sixth of the group.
    pub async fn flush(&self) -> Result<()> {
        let mut conn = redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await?;
        let _: () = redis::cmd("FLUSHALL")
            .arg("SYNC")
            .query_async(&mut conn)
            .await
            .context("FLUSHALL")?;
        Ok(())
    }
}

/// Sum of `calls=` over every command in `INFO commandstats`: commands Redis executed,
/// including those run inside scripts. The `INFO` call itself counts once.
pub async fn commands_executed(conn: &mut impl redis::aio::ConnectionLike) -> Result<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .context("INFO commandstats")?;
    let mut total = 0;
    for line in info.lines() {
        let Some(stats) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let calls = stats
            .split_once(':')
            .and_then(|(_, fields)| fields.split(',').find_map(|f| f.strip_prefix("calls=")))
            .and_then(|n| n.parse::<u64>().ok());
        total += calls.with_context(|| format!("unexpected commandstats line {line:?}"))?;
    }
    Ok(total)
}

/// A TCP proxy in front of a Redis that counts the commands clients send through it.
pub struct CountingProxy {
    pub port: u16,
    commands: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl CountingProxy {
    /// Listen on a free loopback port and forward every connection to `upstream_port`.
    pub async fn start(upstream_port: u16) -> Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let commands = Arc::new(AtomicU64::new(0));
        let counter = commands.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await {
                        let _ = forward(client, server, counter).await;
                    }
                });
            }
        });
        Ok(CountingProxy {
            port,
            commands,
            accept,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Commands sent through the proxy so far.
    pub fn commands(&self) -> u64 {
        self.commands.load(Ordering::Relaxed)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn forward(client: TcpStream, server: TcpStream, counter: Arc<AtomicU64>) -> Result<()> {
    // Without NODELAY every small request or reply would wait for Nagle's algorithm.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let replies = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_rd, &mut client_wr).await;
        let _ = client_wr.shutdown().await;
    });
    let mut parser = RespCounter::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = client_rd.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let found = parser.feed(&buf[..n]);
        if found > 0 {
            counter.fetch_add(found, Ordering::Relaxed);
        }
        server_wr.write_all(&buf[..n]).await?;
    }
    let _ = server_wr.shutdown().await;
    let _ = replies.await;
    Ok(())
}

/// Counts the commands in a client-to-server RESP stream, fed in arbitrary pieces. A command
/// is an array of bulk strings (`*<n>\r\n` then `n` times `$<len>\r\n<bytes>\r\n`), or an inline
/// command (a line not starting with `*`).
#[derive(Debug, Default)]
pub struct RespCounter {
    state: State,
}

#[derive(Debug, Default)]
enum State {
    /// Between commands.
    #[default]
    Start,
    /// Reading the element count of `*<n>\r\n`.
    ArrayLen(u64),
    /// Expecting `$` of the next of `remaining` bulk strings.
    Bulk { remaining: u64 },
    /// Reading `<len>` of `$<len>\r\n`.
    BulkLen { remaining: u64, len: u64 },
    /// Skipping the payload and its `\r\n`.
    BulkData { remaining: u64, left: u64 },
    /// Inside an inline command, until `\n`.
    Inline,
}

impl RespCounter {
    /// Consume bytes; returns how many commands started in them.
    pub fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut count = 0;
        while let Some((&b, rest)) = data.split_first() {
            match &mut self.state {
                State::Start => match b {
                    b'*' => {
                        count += 1;
                        self.state = State::ArrayLen(0);
                    }
                    b'\r' | b'\n' => {}
                    _ => {
                        count += 1;
                        self.state = State::Inline;
                    }
                },
                State::ArrayLen(n) => match b {
                    b'0'..=b'9' => *n = *n * 10 + u64::from(b - b'0'),
                    b'\n' => {
                        let n = *n;
                        self.state = if n == 0 {
                            State::Start
                        } else {
                            State::Bulk { remaining: n }
                        };
                    }
                    _ => {} // '\r' (and a '-' of a null array, which clients never send)
                },
                State::Bulk { remaining } => {
                    if b == b'$' {
                        self.state = State::BulkLen {
                            remaining: *remaining,
                            len: 0,
                        };
                    }
                }
                State::BulkLen { remaining, len } => match b {
                    b'0'..=b'9' => *len = *len * 10 + u64::from(b - b'0'),
                    b'\n' => {
                        self.state = State::BulkData {
                            remaining: *remaining,
                            left: *len + 2,
                        };
                    }
                    _ => {}
                },
                State::BulkData { remaining, left } => {
                    // Skip as much of the payload as this piece holds, in one step.
                    let take = (*left).min(data.len() as u64);
                    *left -= take;
                    let done = *left == 0;
                    let remaining = *remaining - 1;
                    data = &data[take as usize..];
                    if done {
                        self.state = if remaining == 0 {
                            State::Start
                        } else {
                            State::Bulk { remaining }
                        };
                    }
                    continue;
                }
                State::Inline => {
                    if b == b'\n' {
                        self.state = State::Start;
                    }
                }
            }
            data = rest;
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(args: &[&[u8]]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend(format!("${}\r\n", a.len()).bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    #[test]
    fn counts_pipelined_commands_split_anywhere() {
        let mut stream = Vec::new();
        stream.extend(encode(&[b"GET", b"key"]));
        // Payloads that look like protocol must not be mistaken for commands.
        stream.extend(encode(&[b"SET", b"k", b"*2\r\n$3\r\nGET\r\n"]));
        stream.extend(encode(&[b"EVALSHA", &[b'x'; 1000], b"0"]));
        stream.extend(b"PING\r\n");
        stream.extend(encode(&[b"BLPOP", b"", b"1"]));
        for chunk in [1, 2, 3, 7, 64, stream.len()] {
            let mut c = RespCounter::default();
            let total: u64 = stream.chunks(chunk).map(|p| c.feed(p)).sum();
            assert_eq!(total, 5, "chunk size {chunk}");
            assert!(matches!(c.state, State::Start));
        }
    }
}
