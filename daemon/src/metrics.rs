//! The Prometheus endpoint (`GET /metrics`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use mesh_proto::api_key;
use telemetry::metrics::{Access, Registry};

/// Serves the metrics `register` adds on `addr` (port 0 picks one) and
/// returns the bound address, which it also logs. With `token_file`,
/// scrapes must send `authorization: Bearer <the file's token>`; without
/// one, anyone who reaches `addr` may read them (warned unless loopback).
pub async fn serve(
    addr: SocketAddr,
    token_file: Option<&Path>,
    register: impl FnOnce(&mut Registry),
) -> anyhow::Result<SocketAddr> {
    let access: Access = match token_file {
        Some(path) => {
            let digest = api_key::digest(&read_token(path)?);
            Some(Arc::new(move |token: &str| api_key::matches(token, &digest)))
        }
        None => {
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "metrics served beyond loopback without a token: anyone who reaches it reads them");
            }
            None
        }
    };
    let mut registry = Registry::default();
    register(&mut registry);
    let bound = telemetry::metrics::serve(addr, registry, access)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    tracing::info!("metrics on http://{bound}/metrics");
    Ok(bound)
}

/// The token in `path` (surrounding whitespace ignored; never empty).
fn read_token(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("metrics token file {}: {e}", path.display()))?;
    let token = text.trim();
    anyhow::ensure!(!token.is_empty(), "metrics token file {} is empty", path.display());
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn status(addr: SocketAddr, token: Option<&str>) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let request = format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).await.unwrap();
        text.lines().next().unwrap_or_default().to_string()
    }

    #[tokio::test]
    async fn a_token_file_makes_scrapes_present_the_token() {
        let file = std::env::temp_dir().join(format!("metrics-token-{}", std::process::id()));
        std::fs::write(&file, "s3cret\n").unwrap();
        let addr = serve("127.0.0.1:0".parse().unwrap(), Some(&file), |_| {}).await.unwrap();
        assert_eq!(status(addr, None).await, "HTTP/1.1 401 Unauthorized");
        assert_eq!(status(addr, Some("wrong")).await, "HTTP/1.1 401 Unauthorized");
        assert_eq!(status(addr, Some("s3cret")).await, "HTTP/1.1 200 OK");
        let open = serve("127.0.0.1:0".parse().unwrap(), None, |_| {}).await.unwrap();
        assert_eq!(status(open, None).await, "HTTP/1.1 200 OK");
        std::fs::write(&file, " \n").unwrap();
        let err = serve("127.0.0.1:0".parse().unwrap(), Some(&file), |_| {}).await.unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");
        let _ = std::fs::remove_file(&file);
    }
}
