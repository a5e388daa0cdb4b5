//! A TCP proxy in front of Redis that loses or delays a reply on request.
//!
//! * Lost: the connection drops after the server acted on a command but before its answer
//!   reached the client. Redis cannot be made to do that by itself (`CLIENT KILL` unblocks a
//!   blocked command before it acts), and it is the one fault after which a client cannot know
//!   what happened.
//! * Delayed: the answer to a `BLPOP` that popped something is held back for a while, as a slow
//!   network would, so that whatever the client does meanwhile (give up waiting, say) happens
//!   after the server acted and before the client heard of it.
//!
//! The proxy forwards bytes both ways and understands just enough RESP to recognise a
//! connection that sent `BLMOVE` or `LMOVE` (alone or pipelined) or `BLPOP`, and a reply that
//! carries something (a bulk string or an array, not a null; for a pipeline, the first reply).
//! When [cutting](RedisProxy::cut_next_move), it swallows the next such reply to a move and
//! closes both sides; the client reconnects through the proxy as usual.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// See the module docs. Dropping it stops accepting and closes every proxied connection.
pub struct RedisProxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

struct State {
    cut_armed: AtomicBool,
    cuts: AtomicUsize,
    /// How long to hold the next reply to a `BLPOP` that popped something.
    delay_pop: Mutex<Option<Duration>>,
    /// Replies held back so far (counted when the hold starts).
    delayed: watch::Sender<usize>,
}

impl RedisProxy {
    /// Proxies to `upstream` (`host:port`) on a free local port.
    pub async fn start(upstream: &str) -> RedisProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State {
            cut_armed: AtomicBool::new(false),
            cuts: AtomicUsize::new(0),
            delay_pop: Mutex::new(None),
            delayed: watch::channel(0).0,
        });
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
        RedisProxy { addr, state, task }
    }

    /// The proxy as a `redis://` URL.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Lose the next reply to a `BLMOVE` or `LMOVE`s that moved a message.
    pub fn cut_next_move(&self) {
        self.state.cut_armed.store(true, Ordering::SeqCst);
    }

    /// Replies lost so far.
    pub fn cuts(&self) -> usize {
        self.state.cuts.load(Ordering::SeqCst)
    }

    /// Hold the next reply to a `BLPOP` that popped something for `delay` before passing it on.
    pub fn delay_next_pop(&self, delay: Duration) {
        *self.state.delay_pop.lock().unwrap() = Some(delay);
    }

    /// Waits until `n` replies have been held back in all (the hold has started: the server
    /// acted, the client has not heard yet).
    pub async fn until_delayed(&self, n: usize) {
        let mut rx = self.state.delayed.subscribe();
        rx.wait_for(|held| *held >= n).await.expect("proxy state");
    }
}

impl Drop for RedisProxy {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection.
        self.task.abort();
    }
}

/// What a connection has sent so far, as far as the faults care.
#[derive(Default)]
struct Sent {
    moves: AtomicBool,
    pops: AtomicBool,
}

async fn pipe(client: TcpStream, server: TcpStream, state: Arc<State>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let sent = Arc::new(Sent::default());
    let seen = sent.clone();
    let upward = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // The command names as RESP bulk strings, not a script's text that mentions them.
            let chunk = &buf[..n];
            if contains_ignore_case(chunk, b"\r\nLMOVE\r\n")
                || contains_ignore_case(chunk, b"\r\nBLMOVE\r\n")
            {
                seen.moves.store(true, Ordering::SeqCst);
            }
            if contains_ignore_case(chunk, b"\r\nBLPOP\r\n") {
                seen.pops.store(true, Ordering::SeqCst);
            }
            if sw.write_all(chunk).await.is_err() {
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
            let carries = |kind: u8| chunk.len() > 1 && chunk[0] == kind && chunk[1] != b'-';
            if sent.moves.load(Ordering::SeqCst)
                && carries(b'$')
                && state.cut_armed.swap(false, Ordering::SeqCst)
            {
                state.cuts.fetch_add(1, Ordering::SeqCst);
                return; // dropping both halves closes both connections
            }
            if sent.pops.load(Ordering::SeqCst) && carries(b'*') {
                let delay = state.delay_pop.lock().unwrap().take();
                if let Some(delay) = delay {
                    state.delayed.send_modify(|held| *held += 1);
                    // The fault itself: the network is this slow, for this one reply.
                    tokio::time::sleep(delay).await;
                }
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
