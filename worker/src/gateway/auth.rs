//! Who is calling the gateway's API: bearer tokens per client, read from a file (a mounted
//! Secret key) and re-read when it changes, and a per-client rate limit.
//!
//! The file has one `<client>:<token>` per line (`#` comments, blank lines ignored). A request
//! names its client only through its token; the client name then scopes the request ids it
//! makes (`<client>:<key>`), so a result is readable only with a token of the client that
//! submitted it, and another client's ids answer exactly like unknown ones.
//!
//! Tokens are compared as SHA-256 digests in constant time, against every client, so neither
//! the time to answer nor the order of the file tells anything about a token.

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Ready;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::future::Either;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::tls::PeerName;
use crate::{Error, Result};

/// Shortest token accepted: 128 bits of hex (a token is a password nobody types).
pub const MIN_TOKEN_CHARS: usize = 32;

/// Longest client name: the id prefix must leave room for the key (ids are at most 128 chars).
pub const MAX_CLIENT_CHARS: usize = 48;

/// How often the tokens file is checked for changes (the kubelet updates a mounted Secret
/// within a minute or so; a second more is nothing).
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// The authenticated caller of a request, put into the request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller(pub String);

/// The clients of a tokens file, as digests of their tokens.
#[derive(Default)]
pub struct Clients {
    entries: Vec<([u8; 32], String)>,
}

impl Clients {
    /// Parse a tokens file's text. Errors name the line, never the token.
    pub fn parse(text: &str) -> std::result::Result<Clients, String> {
        let mut entries = Vec::new();
        let mut names = HashSet::new();
        let mut digests = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = format!("line {}", n + 1);
            let Some((client, token)) = line.split_once(':') else {
                return Err(format!("{at}: expected <client>:<token>"));
            };
            let (client, token) = (client.trim(), token.trim());
            if !valid_client(client) {
                return Err(format!(
                    "{at}: client names are 1-{MAX_CLIENT_CHARS} characters of [a-z0-9-], \
                     starting with a letter or digit"
                ));
            }
            if token.chars().count() < MIN_TOKEN_CHARS || token.chars().any(char::is_whitespace) {
                return Err(format!(
                    "{at}: the token of {client} must be at least {MIN_TOKEN_CHARS} characters \
                     without spaces (e.g. `openssl rand -hex 32`)"
                ));
            }
            if !names.insert(client.to_owned()) {
                return Err(format!("{at}: client {client} appears twice"));
            }
            let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            if !digests.insert(digest) {
                return Err(format!("{at}: {client} has the token of another client"));
            }
            entries.push((digest, client.to_owned()));
        }
        if entries.is_empty() {
            return Err("no clients (expected lines of <client>:<token>)".into());
        }
        Ok(Clients { entries })
    }

    /// The client whose token this is. Every entry is compared, in constant time each.
    pub fn identify(&self, token: &[u8]) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for (d, client) in &self.entries {
            if bool::from(d.ct_eq(&digest)) {
                found = Some(client.as_str());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// A client name that can prefix request ids (`valid_id`'s characters, and no `:`).
pub fn valid_client(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CLIENT_CHARS
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

/// Whether request `id` is one of `client`'s: ids made under authentication are
/// `<client>:<key or uuid>`.
pub fn owns(client: &str, id: &str) -> bool {
    id.strip_prefix(client)
        .is_some_and(|rest| rest.starts_with(':'))
}

/// The gateway's authentication and rate limit.
pub struct Auth {
    /// `None`: no tokens (authentication disabled, or by client certificate).
    clients: Option<RwLock<Arc<Clients>>>,
    /// Callers are named by their verified client certificate (mTLS, `--client-ca-file`).
    certificates: bool,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
}

impl Auth {
    /// From the flags: a tokens file (read now: a bad file stops the gateway at start), client
    /// certificates, or `--no-auth`; exactly one of them is required.
    pub fn new(
        tokens_file: Option<&Path>,
        no_auth: bool,
        certificates: bool,
        rate_limit_per_client: u32,
    ) -> Result<Auth> {
        let clients = match (tokens_file, no_auth, certificates) {
            (None, false, true) => {
                info!("gateway authentication by client certificate (mTLS)");
                None
            }
            (Some(path), false, false) => {
                let clients = load(path)?;
                info!(clients = clients.len(), file = %path.display(), "gateway authentication on");
                Some(RwLock::new(Arc::new(clients)))
            }
            (None, true, false) => {
                warn!(
                    "gateway authentication is off (--no-auth): anyone who reaches it may submit and read any result"
                );
                None
            }
            _ => {
                return Err(Error::config(
                    "the gateway needs one of --tokens-file (QP_GATEWAY_TOKENS_FILE: lines of \
                     <client>:<token>), --client-ca-file (mTLS) or, to serve without \
                     authentication, --no-auth",
                ));
            }
        };
        let limiter = NonZeroU32::new(rate_limit_per_client)
            .map(|n| RateLimiter::keyed(Quota::per_second(n).allow_burst(n)));
        Ok(Auth {
            clients,
            certificates,
            limiter,
        })
    }

    /// Who presents this `Authorization` header value or client certificate (`None` with
    /// authentication off). A certificate's name must be a valid client name, since it
    /// prefixes the ids the client makes.
    fn authenticate(
        &self,
        authorization: Option<&HeaderValue>,
        peer: Option<&PeerName>,
    ) -> std::result::Result<Option<Caller>, Refusal> {
        if self.certificates {
            return match peer {
                Some(PeerName(name)) if valid_client(name) => Ok(Some(Caller(name.clone()))),
                _ => Err(Refusal::Unauthorized),
            };
        }
        let Some(clients) = &self.clients else {
            return Ok(None);
        };
        let token = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let clients = clients.read().expect("clients lock").clone();
        match token.and_then(|t| clients.identify(t.as_bytes())) {
            Some(client) => Ok(Some(Caller(client.to_owned()))),
            None => Err(Refusal::Unauthorized),
        }
    }

    /// Whether `who` is within its rate.
    fn admit(&self, who: &str) -> std::result::Result<(), Refusal> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check_key(&who.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            Refusal::RateLimited {
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            }
        })
    }
}

/// Why a request was turned away before it reached the API.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// 401 that says nothing about why: missing, malformed and unknown tokens look the same.
    Unauthorized,
    /// 429 with `Retry-After`.
    RateLimited { retry_after_secs: u64 },
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (code, msg) = match self {
            Refusal::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Refusal::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate limit exceeded; retry later",
            ),
        };
        let mut r = (code, axum::Json(serde_json::json!({ "error": msg }))).into_response();
        let h = r.headers_mut();
        match self {
            Refusal::Unauthorized => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Refusal::RateLimited { retry_after_secs } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
        }
        r
    }
}

fn load(path: &Path) -> Result<Clients> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::config(format!("reading the tokens file {}: {e}", path.display())))?;
    Clients::parse(&text).map_err(|e| Error::config(format!("tokens file {}: {e}", path.display())))
}

/// Authentication and the rate limit, as a tower layer: both checks are synchronous, so a
/// refusal is answered at once and otherwise the inner future is returned as it is. (axum's
/// `from_fn` boxes a future that holds the request for every call, a parked long poll's too:
/// 10,000 of them cost 1 KB each more.)
#[derive(Clone)]
pub struct AuthLayer(pub Arc<Auth>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            auth: self.0.clone(),
            inner,
        }
    }
}

/// A service behind [`AuthLayer`].
#[derive(Clone)]
pub struct Authenticated<S> {
    auth: Arc<Auth>,
    inner: S,
}

impl<S> tower::Service<Request> for Authenticated<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<std::result::Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        match self.auth.check(req) {
            Ok(req) => Either::Right(self.inner.call(req)),
            Err(refused) => Either::Left(std::future::ready(Ok(refused.into_response()))),
        }
    }
}

impl Auth {
    /// Who is calling (a token's or a client certificate's client, when authentication is
    /// on), and whether that client is within its rate: the request with the caller attached,
    /// or the refusal.
    fn check(&self, mut req: Request) -> std::result::Result<Request, Refusal> {
        let peer = req.extensions().get::<PeerName>();
        let caller = self.authenticate(req.headers().get(header::AUTHORIZATION), peer)?;
        let who = caller.as_ref().map_or("", |c| c.0.as_str());
        self.admit(who)?;
        if let Some(c) = caller {
            req.extensions_mut().insert(c);
        }
        Ok(req)
    }
}

/// Re-read the tokens file when its contents change. A file that fails to parse (a rotation
/// half done, a typo) keeps the clients that were in force, and says so.
pub async fn reload(auth: Arc<Auth>, path: PathBuf, stop: CancellationToken) {
    let Some(clients) = &auth.clients else {
        return;
    };
    let mut last = std::fs::read(&path).ok();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RELOAD_EVERY) => {}
        }
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        last = now;
        match load(&path) {
            Ok(c) => {
                info!(clients = c.len(), "gateway tokens reloaded");
                *clients.write().expect("clients lock") = Arc::new(c);
            }
            Err(e) => warn!(error = %e, "keeping the previous gateway tokens"),
        }
    }
}

/// Properties of the tokens file parser and of id ownership (both see outside input).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn clients() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::btree_map("[a-z0-9][a-z0-9-]{0,20}", "[A-Za-z0-9_+/=.-]{32,64}", 1..8)
            .prop_map(|m| m.into_iter().collect::<Vec<_>>())
            .prop_filter("distinct tokens", |v| {
                let t: HashSet<_> = v.iter().map(|(_, t)| t).collect();
                t.len() == v.len()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Every client of a well-formed file is known by its token, and nothing else is.
        #[test]
        fn each_token_names_its_client(pairs in clients(), other in "[A-Za-z0-9]{32}") {
            let text: String = pairs.iter().map(|(c, t)| format!("{c}:{t}\n")).collect();
            let parsed = Clients::parse(&text).unwrap();
            for (c, t) in &pairs {
                prop_assert_eq!(parsed.identify(t.as_bytes()), Some(c.as_str()));
            }
            if pairs.iter().all(|(_, t)| *t != other) {
                prop_assert_eq!(parsed.identify(other.as_bytes()), None);
            }
        }

        /// A file with a bad line is refused, and the error names the line, never a token.
        #[test]
        fn errors_never_show_tokens(pairs in clients(), bad in "[^\n:]{0,40}", at in 0usize..8) {
            let mut lines: Vec<String> = pairs.iter().map(|(c, t)| format!("{c}:{t}")).collect();
            let at = at.min(lines.len());
            lines.insert(at, format!("NOT A CLIENT {bad}"));
            let e = Clients::parse(&lines.join("\n")).err().unwrap_or_default();
            for (_, t) in &pairs {
                prop_assert!(!e.contains(t.as_str()), "{}", e);
            }
        }

        /// Arbitrary text never panics the parser.
        #[test]
        fn arbitrary_files_never_panic(text in "\\PC{0,400}") {
            let _ = Clients::parse(&text);
        }

        /// A client owns exactly the ids made under its name.
        #[test]
        fn ownership_follows_the_prefix(c in "[a-z0-9-]{1,20}", d in "[a-z0-9-]{1,20}", k in "[A-Za-z0-9._:-]{1,60}") {
            let id = format!("{c}:{k}");
            prop_assert!(owns(&c, &id));
            prop_assert_eq!(owns(&d, &id), c == d || id.starts_with(&format!("{d}:")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";

    #[test]
    fn parses_clients_and_identifies_their_tokens() {
        let c = Clients::parse(&format!(
            "# gateway clients\n\norders:{A}\n billing : {B} \n"
        ))
        .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c.identify(A.as_bytes()), Some("orders"));
        assert_eq!(c.identify(B.as_bytes()), Some("billing"));
        assert_eq!(c.identify(b"0123456789abcdef0123456789abcdeX"), None);
        assert_eq!(c.identify(b""), None);
    }

    #[test]
    fn rejects_bad_files_without_echoing_tokens() {
        for (text, want) in [
            ("", "no clients"),
            ("orders", "line 1: expected"),
            (&format!("Orders:{A}") as &str, "client names"),
            (&format!("-x:{A}"), "client names"),
            ("orders:short", "at least 32"),
            (&format!("orders:{A}\norders:{B}"), "appears twice"),
            (
                &format!("orders:{A}\nbilling:{A}"),
                "token of another client",
            ),
        ] {
            let e = Clients::parse(text)
                .err()
                .unwrap_or_else(|| panic!("{text:?} parsed"));
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains(A) && !e.contains("short"), "{e} shows a token");
        }
    }

    #[test]
    fn a_client_owns_only_ids_under_its_name() {
        assert!(owns("orders", "orders:42"));
        assert!(!owns("orders", "orders-eu:42"));
        assert!(!owns("orders", "billing:orders:42"));
        assert!(!owns("orders", "orders"));
    }

    #[test]
    fn client_names_fit_request_ids() {
        assert!(valid_client("orders-eu-1"));
        assert!(!valid_client("orders:eu"));
        assert!(!valid_client(&"a".repeat(MAX_CLIENT_CHARS + 1)));
    }

    #[test]
    fn auth_is_required_unless_explicitly_disabled() {
        let e = Auth::new(None, false, false, 0).err().unwrap().to_string();
        assert!(
            e.contains("--tokens-file")
                && e.contains("--client-ca-file")
                && e.contains("--no-auth"),
            "{e}"
        );
        assert!(Auth::new(None, true, false, 0).is_ok());
        assert!(Auth::new(None, true, true, 0).is_err(), "two modes at once");
    }

    #[test]
    fn a_certificate_names_the_client_if_the_name_fits_ids() {
        let auth = Auth::new(None, false, true, 0).unwrap();
        let peer = |n: &str| PeerName(n.to_owned());
        assert_eq!(
            auth.authenticate(None, Some(&peer("orders"))),
            Ok(Some(Caller("orders".into())))
        );
        for bad in ["Orders", "a:b", ""] {
            assert_eq!(
                auth.authenticate(None, Some(&peer(bad))),
                Err(Refusal::Unauthorized),
                "{bad:?}"
            );
        }
        // A bearer token is no substitute for the certificate.
        let token = HeaderValue::from_static("Bearer 0123456789abcdef0123456789abcdef");
        assert_eq!(
            auth.authenticate(Some(&token), None),
            Err(Refusal::Unauthorized)
        );
    }

    #[test]
    fn a_client_over_its_rate_gets_429_with_retry_after() {
        let auth = Auth::new(None, true, false, 2).unwrap();
        assert!(auth.admit("orders").is_ok());
        assert!(auth.admit("orders").is_ok());
        let refused = auth.admit("orders").unwrap_err();
        assert_eq!(
            refused,
            Refusal::RateLimited {
                retry_after_secs: 1
            }
        );
        let r = refused.into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        // Another client has its own budget.
        assert!(auth.admit("billing").is_ok());
    }
}
