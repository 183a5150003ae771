//! Server reflection in both versions tools speak: `grpc.reflection.v1`
//! (grpcurl, grpc-go) and `grpc.reflection.v1alpha` (Python's
//! grpcio-reflection, older grpcurl, most GUI clients), so none of them
//! gets UNIMPLEMENTED. Each lists only what its listener serves: a client
//! that reads the node's list must not go looking for the sidecar's admin
//! service there.

use tonic::service::Routes;
use tonic_reflection::pb::{v1, v1alpha};
use tonic_reflection::server::Builder;

/// The v1 reflection service's name, as listed.
pub const V1: &str = "grpc.reflection.v1.ServerReflection";
/// The v1alpha reflection service's name, as listed.
pub const V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// `routes` plus both reflection services, listing `served` and themselves.
/// Every name in the mesh contract and health stays resolvable (a
/// descriptor holds more than one service); only the list is narrowed.
pub fn add(routes: Routes, served: &[&'static str]) -> Routes {
    // The sets are compiled in; the tests below build them.
    let v1 = builder(served).build_v1().expect("the embedded descriptor sets are valid");
    let alpha = builder(served).build_v1alpha().expect("the embedded descriptor sets are valid");
    routes.add_service(v1).add_service(alpha)
}

/// One version's builder; both register both versions' descriptors, so
/// each resolves the other's symbols as it lists the other's name.
fn builder(served: &[&'static str]) -> Builder<'static> {
    let builder = Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(mesh_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(v1alpha::FILE_DESCRIPTOR_SET);
    // Naming any service turns off listing every service in the sets.
    served.iter().chain(&[V1, V1ALPHA]).fold(builder, |b, name| b.with_service_name(*name))
}

#[cfg(test)]
mod tests {
    use mesh_proto::v1::sidecar_admin_server::{SidecarAdmin, SidecarAdminServer};
    use mesh_proto::v1::{InstancesRequest, InstancesResponse};
    use tokio::net::TcpListener;
    use tonic::server::NamedService;
    use tonic::transport::Channel;
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::grpc::{Listening, Services, serve};
    use crate::health::Health;

    /// A service that is in the mesh descriptor set, to serve alone.
    struct Admin;

    #[tonic::async_trait]
    impl SidecarAdmin for Admin {
        async fn instances(&self, _: Request<InstancesRequest>) -> Result<Response<InstancesResponse>, Status> {
            Err(Status::unimplemented("test"))
        }
    }

    /// Sends one request over `$version`'s client and hands its answer to `$read`.
    macro_rules! ask {
        ($version:ident, $channel:expr, $request:ident($arg:expr), $read:pat => $out:expr) => {{
            use $version::server_reflection_client::ServerReflectionClient;
            use $version::server_reflection_request::MessageRequest;
            use $version::server_reflection_response::MessageResponse;
            let ask = $version::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::$request($arg)),
            };
            let mut client = ServerReflectionClient::new($channel.clone());
            let mut answers = client.server_reflection_info(tokio_stream::once(ask)).await.unwrap().into_inner();
            match answers.message().await.unwrap().and_then(|a| a.message_response) {
                Some($read) => $out,
                other => panic!("{} answered {other:?}", stringify!($version)),
            }
        }};
    }

    macro_rules! list {
        ($version:ident, $channel:expr) => {
            ask!($version, $channel, ListServices(String::new()),
                MessageResponse::ListServicesResponse(list) => {
                    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
                    names.sort();
                    names
                })
        };
    }

    /// Serves `services` on a fresh loopback port; the server stops with the test.
    async fn served(services: Services) -> Channel {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (health, health_server) = Health::new();
        health.set(true).await;
        tokio::spawn(serve(Listening::default(), listener, health_server, services, std::future::pending()));
        Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
    }

    #[test]
    fn the_embedded_descriptor_sets_build_with_the_listed_names() {
        assert_eq!(name_of(&builder(&[]).build_v1().unwrap()), V1);
        assert_eq!(name_of(&builder(&[]).build_v1alpha().unwrap()), V1ALPHA);
    }

    fn name_of<S: NamedService>(_: &S) -> &'static str {
        S::NAME
    }

    #[tokio::test]
    async fn both_versions_list_exactly_what_the_listener_serves() {
        let services = Services::new(SidecarAdminServer::new(Admin));
        assert_eq!(services.names(), ["mesh.v1.SidecarAdmin"]);
        let channel = served(services).await;
        // mesh.v1.Generation is in the same descriptor set, and not served here.
        let want = ["grpc.health.v1.Health", V1, V1ALPHA, "mesh.v1.SidecarAdmin"];
        assert_eq!(list!(v1, channel), want);
        assert_eq!(list!(v1alpha, channel), want);
    }

    #[tokio::test]
    async fn each_version_describes_the_other() {
        let channel = served(Services::default()).await;
        for (symbol, listed) in [(V1ALPHA, list!(v1, channel)), (V1, list!(v1alpha, channel))] {
            assert!(listed.iter().any(|n| n == symbol), "{symbol} missing from {listed:?}");
        }
        let v1_finds_alpha = ask!(v1, channel, FileContainingSymbol(V1ALPHA.into()),
            MessageResponse::FileDescriptorResponse(files) => files.file_descriptor_proto.len());
        let alpha_finds_v1 = ask!(v1alpha, channel, FileContainingSymbol(V1.into()),
            MessageResponse::FileDescriptorResponse(files) => files.file_descriptor_proto.len());
        assert!(v1_finds_alpha > 0 && alpha_finds_v1 > 0, "{v1_finds_alpha} and {alpha_finds_v1} files");
    }
}
