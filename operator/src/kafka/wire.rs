//! One connection to one Kafka broker: a framed request, its response.
//!
//! The messages are the `kafka-protocol` crate's; only the framing (a 4-byte size, the request
//! header, the correlation id) is here. librdkafka is not used for measuring because it sends
//! OffsetFetch for one group per request (its ListConsumerGroupOffsets "MUST" get exactly one
//! group), and a thousand groups would cost a thousand requests per poll; Kafka has answered
//! many groups in one OffsetFetch since 3.0 (KIP-709).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use kafka_protocol::messages::{RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one request (or a connect) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Responses larger than this are refused (a metadata answer for a thousand partitions is a
/// few hundred KiB).
const MAX_RESPONSE: usize = 64 << 20;

pub type WireResult<T> = Result<T, String>;

/// A connection to one broker; requests go one at a time.
pub struct Conn {
    addr: String,
    stream: TcpStream,
    next_id: i32,
    /// Requests sent by every connection of the operator (the benchmark and a metric read it).
    sent: Arc<AtomicU64>,
}

impl Conn {
    pub async fn connect(addr: &str, sent: Arc<AtomicU64>) -> WireResult<Conn> {
        let stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connecting to {addr} timed out"))?
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            addr: addr.to_owned(),
            stream,
            next_id: 0,
            sent,
        })
    }

    /// Send `req` at `version` and read its response. After an error the connection must be
    /// dropped: a response may be half read.
    pub async fn call<R: Request>(&mut self, req: &R, version: i16) -> WireResult<R::Response> {
        let addr = self.addr.clone();
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(req, version))
            .await
            .map_err(|_| format!("{addr}: no answer within {REQUEST_TIMEOUT:?}"))?
            .map_err(|e| format!("{addr}: {e}"))
    }

    async fn exchange<R: Request>(&mut self, req: &R, version: i16) -> WireResult<R::Response> {
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(id)
            .with_client_id(Some(StrBytes::from_static_str("qp-operator")));
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        header
            .encode(&mut buf, R::header_version(version))
            .map_err(|e| format!("encoding a request header: {e}"))?;
        req.encode(&mut buf, version)
            .map_err(|e| format!("encoding a request: {e}"))?;
        let size = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&size.to_be_bytes());
        self.stream
            .write_all(&buf)
            .await
            .map_err(|e| format!("sending: {e}"))?;
        self.sent.fetch_add(1, Ordering::Relaxed);

        let size = self
            .stream
            .read_i32()
            .await
            .map_err(|e| format!("reading: {e}"))?;
        let size = usize::try_from(size).map_err(|_| format!("bad response size {size}"))?;
        if size > MAX_RESPONSE {
            return Err(format!("response of {size} bytes refused"));
        }
        let mut body = BytesMut::zeroed(size);
        self.stream
            .read_exact(&mut body)
            .await
            .map_err(|e| format!("reading: {e}"))?;
        let mut body = body.freeze();
        let header = ResponseHeader::decode(&mut body, R::Response::header_version(version))
            .map_err(|e| format!("decoding a response header: {e}"))?;
        if header.correlation_id != id {
            return Err(format!(
                "answer to request {} where {id} was expected",
                header.correlation_id
            ));
        }
        let response = R::Response::decode(&mut body, version)
            .map_err(|e| format!("decoding a response: {e}"))?;
        if body.has_remaining() {
            tracing::debug!(left = body.remaining(), "response had trailing bytes");
        }
        Ok(response)
    }
}
