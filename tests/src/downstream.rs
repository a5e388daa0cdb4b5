//! A handler's downstream for fault tests: an HTTP server in the test process.

use std::time::Duration;

/// An HTTP downstream for the fault tests, measured on its side (independent of Redis, which
/// the tests break): echoes the body with 200 after `delay`, or answers 503 at once while `down`.
/// Records the most requests it served at once and how often each body (a message id) came.
pub struct Downstream {
    pub url: String,
    pub state: std::sync::Arc<DownstreamState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct DownstreamState {
    pub down: std::sync::atomic::AtomicBool,
    pub refused: std::sync::atomic::AtomicU64,
    current: std::sync::atomic::AtomicI64,
    max: std::sync::atomic::AtomicI64,
    runs: std::sync::Mutex<std::collections::HashMap<Vec<u8>, u32>>,
    /// When requests arrived, with their bodies (for the longest pause in a stream).
    arrivals: std::sync::Mutex<Vec<(std::time::Instant, Vec<u8>)>>,
}

impl Downstream {
    pub async fn start(delay: Duration, down: bool) -> Downstream {
        use axum::http::StatusCode;
        use std::sync::Arc;
        use std::sync::atomic::Ordering;
        let state = Arc::new(DownstreamState::default());
        state.down.store(down, Ordering::SeqCst);
        let st = state.clone();
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |body: axum::body::Bytes| {
                let st = st.clone();
                async move {
                    if st.down.load(Ordering::SeqCst) {
                        st.refused.fetch_add(1, Ordering::SeqCst);
                        return (StatusCode::SERVICE_UNAVAILABLE, axum::body::Bytes::new());
                    }
                    let now = st.current.fetch_add(1, Ordering::SeqCst) + 1;
                    st.max.fetch_max(now, Ordering::SeqCst);
                    *st.runs.lock().unwrap().entry(body.to_vec()).or_default() += 1;
                    let now = std::time::Instant::now();
                    st.arrivals.lock().unwrap().push((now, body.to_vec()));
                    // The handler's work, in a task of its own: a real downstream finishes a
                    // request whose client died (a killed worker), and hyper drops this
                    // future when the connection closes. Counted here, the request would
                    // then run forever and every later maximum would be one too high.
                    let work = {
                        let st = st.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            st.current.fetch_sub(1, Ordering::SeqCst);
                        })
                    };
                    let _ = work.await;
                    (StatusCode::OK, body)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Downstream { url, state, task }
    }

    /// Requests being served right now.
    pub fn current(&self) -> i64 {
        self.state.current.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn max(&self) -> i64 {
        self.state.max.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The longest time without a request, between `from` and the last request, among the
    /// requests whose body `group` puts in the same group (a partition, say): for each group,
    /// the longest gap; the largest of them, with its group.
    pub fn longest_pause_since<G: Ord + Clone>(
        &self,
        from: std::time::Instant,
        group: impl Fn(&[u8]) -> G,
    ) -> Option<(G, Duration)> {
        self.longest_pause_between(from, None, group)
    }

    /// [`Downstream::longest_pause_since`], counting only requests before `until` when given.
    pub fn longest_pause_between<G: Ord + Clone>(
        &self,
        from: std::time::Instant,
        until: Option<std::time::Instant>,
        group: impl Fn(&[u8]) -> G,
    ) -> Option<(G, Duration)> {
        let arrivals = self.state.arrivals.lock().unwrap();
        let mut last: std::collections::BTreeMap<G, std::time::Instant> = Default::default();
        let mut longest: Option<(G, Duration)> = None;
        let within = |t: &std::time::Instant| *t >= from && until.is_none_or(|u| *t < u);
        for (t, body) in arrivals.iter().filter(|(t, _)| within(t)) {
            let g = group(body);
            let gap = t.duration_since(*last.get(&g).unwrap_or(&from));
            if longest.as_ref().is_none_or(|(_, l)| gap > *l) {
                longest = Some((g.clone(), gap));
            }
            last.insert(g, *t);
        }
        longest
    }

    /// Bodies served more than once.
    pub fn twice(&self) -> usize {
        self.state
            .runs
            .lock()
            .unwrap()
            .values()
            .filter(|n| **n > 1)
            .count()
    }
}

impl Drop for Downstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::Downstream;
    use std::time::Duration;

    /// A client that goes away mid-request (a killed worker) does not leave its request
    /// counted as running: the count returns to 0 once the work is done.
    #[tokio::test]
    async fn a_request_whose_client_died_ends() {
        let ds = Downstream::start(Duration::from_millis(300), false).await;
        let client = reqwest::Client::new();
        let cut = client
            .post(&ds.url)
            .body("m1")
            .timeout(Duration::from_millis(50))
            .send()
            .await;
        assert!(cut.is_err(), "the client gives up before the answer");
        assert_eq!(ds.current(), 1, "the request is being served");
        // A second, patient request outlasts the first one's work: when it is answered, the
        // first one is over too.
        let done = client.post(&ds.url).body("m2").send().await.unwrap();
        assert!(done.status().is_success());
        assert_eq!(ds.current(), 0, "no request is left running");
        assert_eq!(ds.max(), 2);
    }
}
