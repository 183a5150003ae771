//! A minimal HTTP/1.1 GET over a plain TCP connection: enough for a health
//! or metrics endpoint on loopback, without an HTTP client dependency.

use std::io::{Error, ErrorKind};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The longest one GET may take, connection included: a loopback endpoint
/// answers in milliseconds, and a probe must never wait forever.
const GET_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET path` from `addr`: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let text = tokio::time::timeout(GET_TIMEOUT, exchange(addr, path)).await.map_err(|_| {
        Error::new(ErrorKind::TimedOut, format!("GET {path} from {addr}: no answer in {GET_TIMEOUT:?}"))
    })??;
    let bad = || Error::new(ErrorKind::InvalidData, format!("not an HTTP response: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    Ok((status, body.to_string()))
}

async fn exchange(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    // A connect to a loopback port nobody listens on yet (a probe racing a
    // starting server) can pick that same port as its source and connect to
    // itself (TCP simultaneous open): it would read back its own request
    // and hold the port the server is about to bind.
    if conn.local_addr()? == addr {
        return Err(Error::new(ErrorKind::ConnectionRefused, format!("{addr}: connected to itself")));
    }
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await?;
    Ok(text)
}
