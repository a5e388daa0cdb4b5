//! A TCP proxy in front of Redis that loses a reply on request: the connection drops after the
//! server acted on a command but before its answer reached the client. Redis cannot be made to
//! do that by itself (`CLIENT KILL` unblocks a blocked command before it acts), and it is the
//! one fault after which a client cannot know what happened.
//!
//! The proxy forwards bytes both ways and understands just enough RESP to recognise a
//! connection that sent `BLMOVE` or `LMOVE` (alone or pipelined) and a reply that carries a
//! message (a bulk string, not a null; for a pipeline, the first reply). When
//! [armed](ReplyCutter::arm), it swallows the next such reply and closes both sides; the client
//! reconnects through the proxy as usual.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// See the module docs. Dropping it stops accepting and closes every proxied connection.
pub struct ReplyCutter {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    armed: AtomicBool,
    cuts: AtomicUsize,
}

impl ReplyCutter {
    /// Proxies to `upstream` (`host:port`) on a free local port.
    pub async fn start(upstream: &str) -> ReplyCutter {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State::default());
        let upstream = upstream.to_owned();
        let shared = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue; // the client sees a closed connection and retries
                };
                conns.spawn(pipe(client, server, shared.clone()));
            }
        });
        ReplyCutter { addr, state, task }
    }

    /// The proxy as a `redis://` URL.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Lose the next reply to a `BLMOVE` or `LMOVE`s that moved a message.
    pub fn arm(&self) {
        self.state.armed.store(true, Ordering::SeqCst);
    }

    /// Replies lost so far.
    pub fn cuts(&self) -> usize {
        self.state.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for ReplyCutter {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection.
        self.task.abort();
    }
}

async fn pipe(client: TcpStream, server: TcpStream, state: Arc<State>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let saw_blmove = Arc::new(AtomicBool::new(false));
    let seen = saw_blmove.clone();
    let upward = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // The command names as RESP bulk strings, not a script's text that mentions them.
            if contains_ignore_case(&buf[..n], b"\r\nLMOVE\r\n")
                || contains_ignore_case(&buf[..n], b"\r\nBLMOVE\r\n")
            {
                seen.store(true, Ordering::SeqCst);
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let downward = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            let carries_message = chunk.len() > 1 && chunk[0] == b'$' && chunk[1] != b'-';
            if saw_blmove.load(Ordering::SeqCst)
                && carries_message
                && state.armed.swap(false, Ordering::SeqCst)
            {
                state.cuts.fetch_add(1, Ordering::SeqCst);
                return; // dropping both halves closes both connections
            }
            if cw.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    // Whichever direction ends first ends the connection.
    tokio::select! {
        _ = upward => {}
        _ = downward => {}
    }
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}
