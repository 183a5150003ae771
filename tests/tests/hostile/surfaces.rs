//! Every method on the edge's outbound port with no key, a wrong key and
//! another tenant's key: Generate, ListModels, the admin service,
//! reflection and health (open from loopback only, which this is).

use mesh_proto::v1::sidecar_admin_client::SidecarAdminClient;
use mesh_proto::v1::{GenerateRequest, InstancesRequest, ListModelsRequest};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_response};

use super::{Mesh, call, chat};

fn keyed<T>(message: T, key: Option<&str>) -> Request<T> {
    let mut req = Request::new(message);
    if let Some(k) = key {
        req.metadata_mut().insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    req
}

async fn admin(channel: &Channel, key: Option<&str>) -> Result<(), Status> {
    SidecarAdminClient::new(channel.clone()).instances(keyed(InstancesRequest {}, key)).await.map(drop)
}

async fn models(channel: &Channel, key: Option<&str>) -> Result<(), Status> {
    let mut client = mesh_proto::v1::generation_client::GenerationClient::new(channel.clone());
    client.list_models(keyed(ListModelsRequest {}, key)).await.map(drop)
}

pub async fn reflection(channel: &Channel, key: Option<&str>) -> Result<(), Status> {
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = ServerReflectionClient::new(channel.clone());
    let mut answers = client.server_reflection_info(keyed(tokio_stream::once(ask), key)).await?.into_inner();
    match answers.message().await?.and_then(|a| a.message_response) {
        Some(server_reflection_response::MessageResponse::ListServicesResponse(_)) => Ok(()),
        other => panic!("reflection answered {other:?}"),
    }
}

/// Asserts each call's code, naming the method and the key in a failure.
fn expect(method: &str, key: Option<&str>, got: Result<(), Status>, want: Code) {
    let code = got.as_ref().err().map_or(Code::Ok, Status::code);
    assert_eq!(code, want, "{method} with key {key:?}: {got:?}");
}

pub async fn every_outbound_method_takes_a_key(mesh: &Mesh) {
    let client = mesh.edge_client().await;
    let generate = |req: GenerateRequest, key| {
        let client = client.clone();
        async move { call(&client, req, key).await.map(drop) }
    };
    let plain = Channel::from_shared(format!("http://{}", mesh.edge.outbound)).unwrap().connect().await.unwrap();
    for (key, generating, listing, administering) in [
        (None, Code::Unauthenticated, Code::Unauthenticated, Code::Unauthenticated),
        (Some("guess"), Code::Unauthenticated, Code::Unauthenticated, Code::Unauthenticated),
        (Some("code-key"), Code::PermissionDenied, Code::Ok, Code::PermissionDenied),
        (Some("acme-key"), Code::Ok, Code::Ok, Code::PermissionDenied),
        (Some("ops-key"), Code::Ok, Code::Ok, Code::Ok),
    ] {
        expect("Generate", key, generate(chat(1), key).await, generating);
        expect("ListModels", key, models(&plain, key).await, listing);
        expect("reflection", key, reflection(&plain, key).await, listing);
        expect("SidecarAdmin", key, admin(&plain, key).await, administering);
    }
    // Health from loopback needs no key (systemd, a local probe).
    let mut health = tonic_health::pb::health_client::HealthClient::new(plain);
    assert!(health.check(tonic_health::pb::HealthCheckRequest::default()).await.is_ok());
    // Special tokens only with a key that allows them.
    let special = GenerateRequest { allow_special_tokens: true, ..chat(1) };
    let refused = generate(special.clone(), Some("acme-key")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().starts_with("allow_special_tokens: tenant \"acme\""), "{refused:?}");
    expect("Generate, special tokens", Some("raw-key"), generate(special, Some("raw-key")).await, Code::Ok);
    // The gate counted what it refused: three methods with no or a wrong
    // key, and the admin service with two tenants' keys.
    let refused = mesh.edge_metric("mesh_sidecar_refused_requests_total{direction=\"outbound\"}").await;
    assert_eq!(refused, 8.0);
}
