//! The sidecar's own client and server of `mesh.v1.Generation`: the same
//! service and routes as the contract (`proto/mesh/v1/mesh.proto`), but
//! `Generate` answers with `wire::Relayed`, a response kept as the bytes it
//! arrived in, so the sidecar relays token messages without re-encoding them.

use tonic_build::manual::{Builder, Method, Service};

fn main() {
    let method = |name: &str, route: &str, input: &str, output: &str| {
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("::mesh_proto::v1::{input}"))
            .output_type(output)
            .codec_path("crate::wire::WireCodec")
    };
    let generation = Service::builder()
        .name("Generation")
        .package("mesh.v1")
        .method(method("generate", "Generate", "GenerateRequest", "crate::wire::Relayed").server_streaming().build())
        .method(
            method("list_models", "ListModels", "ListModelsRequest", "::mesh_proto::v1::ListModelsResponse").build(),
        )
        .build();
    Builder::new().compile(&[generation]);
    println!("cargo:rerun-if-changed=build.rs");
}
