//! Plaintext connections must open with the HTTP/2 preface, soon.
//!
//! hyper waits for a client's preface with no deadline: a peer that
//! connects and sends nothing, or half the preface, holds a socket and a
//! task for as long as it likes (TLS listeners are bounded by the
//! handshake timeout instead). So every accepted plaintext connection is
//! screened on its own task before the server sees it: it must show the
//! 24-byte preface within [`PREFACE_TIMEOUT`]; anything else (garbage, an
//! HTTP/1.1 request, silence) is closed as soon as it cannot be one.
//! Screening peeks, so the server still reads the preface itself.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::server::TcpIncoming;

/// What every HTTP/2 client sends first (RFC 9113, 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a client may take to send the preface by default
/// (`Http2::preface_timeout`): a client sends it with its first bytes, so
/// 10 s covers any real one (as the TLS handshake timeout does).
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections that passed screening and wait for the server to take them.
const ACCEPTED_BACKLOG: usize = 1024;

/// Connections screened at once: each holds a socket for up to the
/// timeout, so a flood of silent ones is bounded here (the accept loop
/// waits, and the kernel's backlog holds newcomers), not by the process's
/// file descriptors, which its own dials to etcd and nodes need too.
const MAX_SCREENING: usize = 4096;

/// After a failed accept (out of file descriptors, say), wait this long
/// before the next: retrying at once would spin a core.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The accepted connections of `incoming` that opened with the preface.
/// The accept loop ends when the server drops the stream (it stopped).
pub fn screened(
    mut incoming: TcpIncoming,
    timeout: Duration,
) -> impl futures_core::Stream<Item = io::Result<TcpStream>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_BACKLOG);
    let screening = Arc::new(Semaphore::new(MAX_SCREENING));
    tokio::spawn(async move {
        loop {
            let (permit, conn) = tokio::select! {
                next = async { (screening.clone().acquire_owned().await, incoming.next().await) } => next,
                _ = tx.closed() => return,
            };
            match conn {
                Some(Ok(stream)) => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        if opens_with_preface(&stream, timeout).await {
                            let _ = tx.send(Ok(stream)).await;
                        }
                    });
                }
                // An accept error (e.g. out of file descriptors) is the server's to log.
                Some(Err(e)) => {
                    let _ = tx.send(Err(e)).await;
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
                None => return,
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Whether the first bytes on `stream` are the preface, within the timeout.
async fn opens_with_preface(stream: &TcpStream, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, preface_check(stream)).await.unwrap_or(false)
}

async fn preface_check(stream: &TcpStream) -> bool {
    let mut buf = [0u8; PREFACE.len()];
    let mut pause = Duration::from_millis(10);
    loop {
        let n = match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return false, // closed before the preface
            Ok(n) => n,
        };
        if buf[..n] != PREFACE[..n] {
            return false;
        }
        if n == PREFACE.len() {
            return true;
        }
        // Part of it so far: peek returns at once while those bytes sit
        // unread, so look again later, less often the longer it takes (a
        // real client sends the rest at once; a stalling one is not worth
        // 100 wake-ups a second until the deadline).
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (client, listener.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn the_preface_passes_even_in_pieces_and_is_left_for_the_server() {
        let (mut client, server) = pair().await;
        client.write_all(&PREFACE[..10]).await.unwrap();
        let check = tokio::spawn(async move { (preface_check(&server).await, server) });
        tokio::time::sleep(Duration::from_millis(30)).await;
        client.write_all(&PREFACE[10..]).await.unwrap();
        let (passed, server) = check.await.unwrap();
        assert!(passed);
        let mut buf = [0u8; 24];
        assert_eq!(server.peek(&mut buf).await.unwrap(), 24, "nothing was consumed");
    }

    #[tokio::test]
    async fn http1_garbage_and_a_closed_socket_are_refused() {
        for first in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"\x16\x03\x01", b""] {
            let (mut client, server) = pair().await;
            client.write_all(first).await.unwrap();
            if first.is_empty() {
                client.shutdown().await.unwrap();
            }
            assert!(!preface_check(&server).await, "{first:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silence_is_refused_after_the_timeout() {
        let (_client, server) = pair().await;
        assert!(!opens_with_preface(&server, PREFACE_TIMEOUT).await);
    }
}
