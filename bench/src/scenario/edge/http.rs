//! The edge's caller: streaming chat completions over HTTP/1.1 on a pool
//! of keep-alive connections, as OpenAI's SDKs send them (httpx keeps up to
//! 100 idle connections). A request takes an idle connection or opens one,
//! and gives it back once its event stream has ended; a connection the
//! edge closed (it drops one idle for its 10 s header timeout) is skipped.
//!
//! One connection per request would price a TCP handshake into every
//! TTFT, which no SDK pays after its first requests; gRPC's side keeps its
//! HTTP/2 connections too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use super::Outcome;

type Connection = SendRequest<Full<Bytes>>;

/// Streaming chat completions to one edge, on a pool of keep-alive connections.
pub struct EdgeClient {
    addr: SocketAddr,
    idle: Mutex<Vec<Connection>>,
    opened: AtomicU64,
}

impl EdgeClient {
    pub fn new(addr: SocketAddr) -> EdgeClient {
        EdgeClient { addr, idle: Mutex::new(Vec::new()), opened: AtomicU64::new(0) }
    }

    /// Connections opened so far (the pool's growth, and its reopenings).
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Sends `body` (a chat completion with `"stream": true`) and reads its
    /// events to `[DONE]`. TTFT runs from before a connection is taken (a
    /// new one's handshake counts, as a caller waits for it) to the first
    /// chunk with non-empty content, parsed, as an SDK yields it.
    pub async fn chat(&self, body: Bytes, id: u64, deadline: Duration) -> Outcome {
        let sent = Instant::now();
        match tokio::time::timeout(deadline, self.exchange(body, id, deadline, sent)).await {
            Err(_elapsed) => Outcome::failed("DEADLINE_EXCEEDED"),
            Ok(Err(label)) => Outcome::failed(label),
            Ok(Ok(ttft)) => Outcome { status: "OK".into(), ttft: Some(ttft) },
        }
    }

    async fn exchange(&self, body: Bytes, id: u64, deadline: Duration, sent: Instant) -> Result<Duration, String> {
        let mut conn = match self.take_idle() {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        let request = hyper::Request::post("/v1/chat/completions")
            .header(hyper::header::HOST, self.addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("x-request-id", format!("mesh-bench-edge-{id}"))
            .header("x-request-timeout", format!("{:.3}", deadline.as_secs_f64()))
            .body(Full::new(body))
            .map_err(|_| "HTTP_REQUEST")?;
        let response = conn.send_request(request).await.map_err(|_| "HTTP_TRANSPORT")?;
        if response.status() != hyper::StatusCode::OK {
            return Err(format!("HTTP_{}", response.status().as_u16()));
        }
        let ttft = first_content(response.into_body(), sent).await?;
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).push(conn);
        Ok(ttft)
    }

    /// An idle connection still open, if the pool holds one.
    fn take_idle(&self) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        std::iter::from_fn(|| idle.pop()).find(|conn| !conn.is_closed())
    }

    async fn connect(&self) -> Result<Connection, &'static str> {
        let tcp = TcpStream::connect(self.addr).await.map_err(|_| "HTTP_CONNECT")?;
        tcp.set_nodelay(true).map_err(|_| "HTTP_CONNECT")?;
        let (conn, driver) =
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|_| "HTTP_CONNECT")?;
        // Drives the connection until the edge or the pool drops it.
        tokio::spawn(driver);
        self.opened.fetch_add(1, Ordering::Relaxed);
        Ok(conn)
    }
}

/// Reads an event stream to its end; returns when its first content came.
async fn first_content(mut body: Incoming, sent: Instant) -> Result<Duration, &'static str> {
    let (mut buf, mut ttft, mut done) = (Vec::new(), None, false);
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| "HTTP_BODY")?.into_data() else { continue };
        buf.extend_from_slice(&data);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            match parse_event(&event)? {
                Event::Done => done = true,
                Event::Chunk { content: true } if ttft.is_none() => ttft = Some(sent.elapsed()),
                Event::Chunk { .. } => {}
            }
        }
    }
    match (done, ttft) {
        (true, Some(ttft)) => Ok(ttft),
        (true, None) => Err("NO_CONTENT"),
        (false, _) => Err("INCOMPLETE"),
    }
}

#[derive(Debug, PartialEq)]
enum Event {
    Done,
    /// A chunk; `content` when its delta carries text.
    Chunk {
        content: bool,
    },
}

/// One `data: ...\n\n` event; an error event (the edge's mid-stream
/// failure) is an error.
fn parse_event(event: &[u8]) -> Result<Event, &'static str> {
    let data = event.strip_prefix(b"data: ").ok_or("SSE_SYNTAX")?.trim_ascii_end();
    if data == b"[DONE]" {
        return Ok(Event::Done);
    }
    let chunk: Value = serde_json::from_slice(data).map_err(|_| "SSE_SYNTAX")?;
    if chunk.get("error").is_some() {
        return Err("ERROR_EVENT");
    }
    let content = chunk["choices"][0]["delta"]["content"].as_str().is_some_and(|s| !s.is_empty());
    Ok(Event::Chunk { content })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_as_the_edge_writes_them() {
        let role = br#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(parse_event(&[&role[..], b"\n\n"].concat()), Ok(Event::Chunk { content: false }));
        let text = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" the\"}}]}\n\n";
        assert_eq!(parse_event(text), Ok(Event::Chunk { content: true }));
        assert_eq!(parse_event(b"data: [DONE]\n\n"), Ok(Event::Done));
        let error = b"data: {\"error\":{\"message\":\"draining\",\"type\":\"server_error\"}}\n\n";
        assert_eq!(parse_event(error), Err("ERROR_EVENT"));
        assert_eq!(parse_event(b"event: ping\n\n"), Err("SSE_SYNTAX"));
    }
}
