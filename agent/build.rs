//! Compiles the SPIFFE Workload API proto (`proto/workload.proto`) with `protox` (pure Rust, no
//! `protoc` needed) and generates the tonic server and client.
//!
//! The well-known types (`google.protobuf.Struct`) are generated locally rather than taken from
//! `prost-types`, so the crate needs no extra dependency.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/workload.proto");
    let fds = protox::compile(["workload.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .compile_well_known_types(true)
        .compile_fds(fds)?;
    Ok(())
}
