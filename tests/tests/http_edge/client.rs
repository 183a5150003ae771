//! A small HTTP/1.1 client for the edge: whole answers, event streams read
//! as they arrive, and raw bytes for what a well-behaved client never sends.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A whole answer.
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Value,
}

/// A request with a JSON body (possibly not JSON at all) and `key` as a
/// bearer token; add headers with `headers_mut()`.
pub fn request(method: &str, path: &str, key: Option<&str>, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    let mut request = Request::builder().method(method).uri(path).header("host", "edge");
    request = request.header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    request.body(Full::new(body.into())).expect("a request")
}

/// Sends `request` on a fresh connection and reads the whole answer.
pub async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> Answer {
    let what = format!("{} {}", request.method(), request.uri());
    let (parts, body) = open(addr, request).await.into_parts();
    let bytes = body.collect().await.expect("reading the body").to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    Answer { status: parts.status.as_u16(), headers: parts.headers, body }
}

/// Sends `request` on a fresh connection and returns the response as it
/// starts: its body is read as it arrives (see [`Events`]).
pub async fn open(addr: SocketAddr, request: Request<Full<Bytes>>) -> hyper::Response<Incoming> {
    let tcp = TcpStream::connect(addr).await.expect("connecting to the edge");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    sender.send_request(request).await.expect("a response")
}

/// The `data:` payloads of a server-sent event stream, one at a time.
pub struct Events {
    body: Incoming,
    buf: String,
}

impl Events {
    pub fn new(response: hyper::Response<Incoming>) -> Events {
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Events { body: response.into_body(), buf: String::new() }
    }

    /// The next event's data (`[DONE]` included); `None` at the end.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                let data =
                    event.trim_end().strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {event:?}"));
                return Some(data.to_string());
            }
            let frame = self.body.frame().await?.expect("reading the event stream");
            if let Ok(data) = frame.into_data() {
                self.buf.push_str(std::str::from_utf8(&data).expect("UTF-8 events"));
            }
        }
    }

    /// Reads to the end: the chunks' JSON, and whether `[DONE]` closed it.
    pub async fn all(mut self) -> (Vec<Value>, bool) {
        let mut chunks = Vec::new();
        while let Some(data) = self.next().await {
            if data == "[DONE]" {
                return (chunks, self.next().await.is_none());
            }
            chunks.push(serde_json::from_str(&data).expect("a JSON chunk"));
        }
        (chunks, false)
    }
}

/// Writes `bytes` on a fresh connection and reads until the server closes it.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("connecting to the edge");
    tcp.write_all(bytes).await.expect("writing");
    let mut out = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(15), tcp.read_to_end(&mut out));
    read.await.expect("the edge closes the connection").expect("reading");
    String::from_utf8_lossy(&out).into_owned()
}
