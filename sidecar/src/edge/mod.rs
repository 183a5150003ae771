//! The HTTP edge: OpenAI's API (`POST /v1/chat/completions`, `POST
//! /v1/completions`, `GET /v1/models`) on the client sidecar
//! (`listen.http`). A request becomes the same [`Call`] a gRPC client's
//! would and goes down the same outbound stack, so keys, tenants,
//! bulkheads, routing, retries, migration, tracing and metrics apply
//! unchanged; only the framing differs. Errors come in OpenAI's shape with
//! the HTTP status its client libraries expect ([`error`]).

mod error;
mod fields;
mod listener;
mod reply;
mod request;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use mesh_proto::metadata as md;
use mesh_proto::v1::ListModelsRequest;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::json;
use tower::ServiceExt;

use crate::metrics::HttpLabels;
use crate::outbound::authenticate::ApiKeys;
use crate::stack::{Call, ListModels, Next};
pub use error::ApiError;
use error::json_response;
pub use listener::serve;
use reply::Envelope;
use request::Api;

/// What the edge's handlers share.
pub struct Edge {
    pub generate: Next,
    pub list_models: ListModels,
    pub keys: ApiKeys,
    /// The largest body read (the sidecar's `max_request_bytes`).
    pub max_body: usize,
    pub requests: Family<HttpLabels, Counter>,
}

/// The routes, each answering in OpenAI's shape, unknown ones included.
pub fn router(edge: Arc<Edge>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such route: the edge serves /v1/chat/completions, /v1/completions and /v1/models",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route")
        })
        .with_state(edge)
}

async fn chat(State(edge): State<Arc<Edge>>, headers: HeaderMap, body: Body) -> Response {
    edge.generation(Api::Chat, headers, body).await
}

async fn completions(State(edge): State<Arc<Edge>>, headers: HeaderMap, body: Body) -> Response {
    edge.generation(Api::Completions, headers, body).await
}

async fn models(State(edge): State<Arc<Edge>>, headers: HeaderMap) -> Response {
    let listed = edge.models(&headers).await;
    edge.counted("models", listed.map(|data| json_response(StatusCode::OK, &json!({"object": "list", "data": data}))))
}

async fn model(State(edge): State<Arc<Edge>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let found = edge.models(&headers).await.and_then(|data| {
        let found = data.into_iter().find(|m| m["id"] == id.as_str());
        found
            .map(|m| json_response(StatusCode::OK, &m))
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no model {id:?} is registered")))
    });
    edge.counted("models", found)
}

impl Edge {
    async fn generation(&self, api: Api, headers: HeaderMap, body: Body) -> Response {
        let route = match api {
            Api::Chat => "chat",
            Api::Completions => "completions",
        };
        let id = match request_id(&headers) {
            Ok(id) => id,
            Err(e) => return self.counted(route, Err::<Response, _>(e)),
        };
        let mut response = self.counted(route, self.generate(api, &id, headers, body).await);
        if let Ok(value) = HeaderValue::from_str(&id) {
            response.headers_mut().insert("x-request-id", value);
        }
        response
    }

    async fn generate(&self, api: Api, id: &str, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
        let parsed = request::parse(api, &self.read(&headers, body).await?)?;
        tracing::debug!(request_id = id, user = parsed.user.as_deref().unwrap_or(""), "http edge request");
        let mut req = parsed.req;
        req.request_id = id.to_string();
        let mut envelope =
            Envelope { api, id: format!("{}-{id}", prefix(api)), created: now(), model: req.model.clone() };
        let call = Call::new(grpc_request(req, &headers)?);
        let reply = self.generate.clone().oneshot(call).await.map_err(|s| ApiError::from_status(&s))?;
        // An overflowed call names the service that served it, as OpenAI's
        // "model" names the model that answered.
        if let Some(served) = reply.metadata.get(md::SERVED_BY).and_then(|v| v.to_str().ok()) {
            envelope.model = served.to_string();
        }
        let echoed: Vec<_> = [md::RESPONSE_CACHE, md::SERVED_BY]
            .into_iter()
            .filter_map(|k| Some((k, HeaderValue::from_bytes(reply.metadata.get(k)?.as_bytes()).ok()?)))
            .collect();
        let mut stream = reply.stream;
        // Wait for the first message, so a refusal still gets its own status.
        let first = reply::decode(stream.next().await)?;
        let mut response = if parsed.stream {
            let events = reply::events(envelope, parsed.include_usage, first, stream);
            let headers = [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")];
            (headers, Body::from_stream(events)).into_response()
        } else {
            json_response(StatusCode::OK, &reply::collect(&envelope, first, stream).await?)
        };
        for (key, value) in echoed {
            response.headers_mut().insert(key, value);
        }
        Ok(response)
    }

    /// The body, refused with 413 past `max_body` before it is all read.
    async fn read(&self, headers: &HeaderMap, body: Body) -> Result<bytes::Bytes, ApiError> {
        let too_large = || {
            let limit = self.max_body;
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is over {limit} bytes (max_request_bytes)"))
        };
        let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.max_body) {
            return Err(too_large());
        }
        axum::body::to_bytes(body, self.max_body).await.map_err(|e| {
            let over = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if over {
                too_large()
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read the body: {e}"))
            }
        })
    }

    /// The registered services as OpenAI model objects; any key may list them.
    async fn models(&self, headers: &HeaderMap) -> Result<Vec<serde_json::Value>, ApiError> {
        let key = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        self.keys.check_surface(key, "/v1/models", false).map_err(|s| ApiError::from_status(&s))?;
        let listed = self.list_models.clone().oneshot(ListModelsRequest {}).await;
        let models = listed.map_err(|s| ApiError::from_status(&s))?.models;
        let object = |name: String, context: u32| json!({"id": name, "object": "model", "created": 0, "owned_by": "mesh", "context_length": context});
        Ok(models.into_iter().map(|m| object(m.name, m.context_length)).collect())
    }

    /// Counts the answer by route and status.
    fn counted(&self, route: &'static str, answer: Result<impl IntoResponse, ApiError>) -> Response {
        let response = answer.map_or_else(IntoResponse::into_response, IntoResponse::into_response);
        self.requests.get_or_create(&HttpLabels { route, status: response.status().as_u16() }).inc();
        response
    }
}

/// The caller's `x-request-id` (bounded, printable), or a fresh one.
fn request_id(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(value) = headers.get("x-request-id") else {
        return Ok(format!("{:032x}", rand::random::<u128>()));
    };
    match value.to_str() {
        Ok(id) if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) => Ok(id.to_string()),
        _ => Err(ApiError::field("x-request-id", "must be 1 to 128 printable ASCII characters, no spaces")),
    }
}

/// The gRPC request an edge request becomes: the key, the trace context,
/// `cache-control` (the response cache's opt-out) and the deadline
/// (`x-request-timeout`, seconds) as metadata.
fn grpc_request(
    req: mesh_proto::v1::GenerateRequest,
    headers: &HeaderMap,
) -> Result<tonic::Request<mesh_proto::v1::GenerateRequest>, ApiError> {
    let mut request = tonic::Request::new(req);
    let meta = request.metadata_mut();
    for name in ["authorization", "traceparent", "tracestate", md::CACHE_CONTROL] {
        if let Some(value) = headers.get(name).and_then(|v| v.to_str().ok()?.parse().ok()) {
            meta.insert(name, value);
        }
    }
    if let Some(timeout) = headers.get("x-request-timeout") {
        let secs = timeout.to_str().ok().and_then(|s| s.trim().parse::<f64>().ok());
        let Some(secs) = secs.filter(|s| s.is_finite() && *s > 0.0 && *s <= MAX_TIMEOUT.as_secs_f64()) else {
            return Err(ApiError::field(
                "x-request-timeout",
                format!("must be seconds above 0, at most {}", MAX_TIMEOUT.as_secs()),
            ));
        };
        let ms = (secs * 1000.0).ceil() as u64;
        if let Ok(value) = format!("{ms}m").parse() {
            meta.insert("grpc-timeout", value);
        }
    }
    Ok(request)
}

/// The longest deadline a header may give: a day.
const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

fn prefix(api: Api) -> &'static str {
    match api {
        Api::Chat => "chatcmpl",
        Api::Completions => "cmpl",
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
