//! Errors in the OpenAI shape (`{"error": {"message", "type", "param",
//! "code"}}`) with the HTTP status an OpenAI client library expects, made
//! from the edge's own checks or from the mesh's gRPC status.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use mesh_proto::metadata as md;
use serde_json::json;
use tonic::{Code, Status};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// When to come back (`Retry-After`), from the mesh's retry-after.
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None, retry_after: None }
    }

    /// A 400 naming the field at fault.
    pub fn field(param: &str, message: impl std::fmt::Display) -> Self {
        Self { param: Some(param.to_string()), ..Self::new(StatusCode::BAD_REQUEST, format!("{param}: {message}")) }
    }

    /// The status a client library maps to the same exception as the
    /// mesh's gRPC code (`RateLimitError` for 429, `AuthenticationError`
    /// for 401, ...).
    pub fn from_status(status: &Status) -> Self {
        let http = match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable | Code::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let retry_after = status
            .metadata()
            .get(md::RETRY_AFTER_MS)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .map(Duration::from_millis);
        Self { retry_after, ..Self::new(http, status.message()) }
    }

    /// OpenAI's `type` for this status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// OpenAI's `code` for this status, where it has one.
    fn code(&self) -> Option<&'static str> {
        Some(match self.status {
            StatusCode::UNAUTHORIZED => "invalid_api_key",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_exceeded",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
            StatusCode::GATEWAY_TIMEOUT => "timeout",
            _ => return None,
        })
    }

    /// The error object, as a body or as a server-sent event mid-stream.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.code()}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json_response(self.status, &self.body());
        if let Some(after) = self.retry_after {
            let headers = response.headers_mut();
            // `Retry-After` takes whole seconds; OpenAI's SDKs read `retry-after-ms` first.
            let secs = after.as_millis().div_ceil(1000).max(1);
            headers.insert("retry-after", HeaderValue::from(secs as u64));
            headers.insert("retry-after-ms", HeaderValue::from(after.as_millis().max(1) as u64));
        }
        response
    }
}

/// A JSON body with its content type.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataMap;

    use super::*;

    #[test]
    fn mesh_codes_map_to_the_statuses_client_libraries_expect() {
        let cases = [
            (Code::InvalidArgument, 400, "invalid_request_error"),
            (Code::Unauthenticated, 401, "authentication_error"),
            (Code::PermissionDenied, 403, "permission_error"),
            (Code::NotFound, 404, "invalid_request_error"),
            (Code::ResourceExhausted, 429, "rate_limit_error"),
            (Code::Unavailable, 503, "server_error"),
            (Code::DeadlineExceeded, 504, "server_error"),
            (Code::Internal, 500, "server_error"),
        ];
        for (code, http, kind) in cases {
            let e = ApiError::from_status(&Status::new(code, "why"));
            assert_eq!((e.status.as_u16(), e.kind()), (http, kind), "{code:?}");
            assert_eq!(e.body()["error"]["message"], "why");
        }
    }

    #[test]
    fn a_retry_after_becomes_headers_in_seconds_rounded_up_and_in_ms() {
        let mut meta = MetadataMap::new();
        meta.insert(md::RETRY_AFTER_MS, "1200".parse().unwrap());
        let status = Status::with_metadata(Code::ResourceExhausted, "over the tenant's limit", meta);
        let response = ApiError::from_status(&status).into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "2");
        assert_eq!(response.headers()["retry-after-ms"], "1200");
    }

    #[test]
    fn a_field_error_names_the_field() {
        let e = ApiError::field("max_tokens", "must be at least 1");
        assert_eq!(e.body()["error"]["param"], "max_tokens");
        assert_eq!(e.body()["error"]["message"], "max_tokens: must be at least 1");
    }
}
