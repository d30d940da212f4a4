//! Generates the prost messages and tonic client and server of r3map's gRPC services.
//!
//! Usage: `r3map-grpc-codegen PROTO_DIR OUT_DIR`. Uses the `protoc` of `$PROTOC` when set, else the
//! one shipped in the `protoc-bin-vendored` crate, so nothing needs installing.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let (Some(proto), Some(out)) = (args.next(), args.next()) else {
        return Err("usage: r3map-grpc-codegen PROTO_DIR OUT_DIR".into());
    };
    let proto = PathBuf::from(proto);
    let out = PathBuf::from(out);
    let protoc = match std::env::var_os("PROTOC") {
        Some(protoc) => PathBuf::from(protoc),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    std::fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .emit_rerun_if_changed(false)
        .bytes(".")
        .out_dir(&out)
        .compile_with_config(
            config,
            &[proto.join("mount/v1/backend.proto"), proto.join("migration/v1/seeder.proto")],
            &[proto],
        )?;
    Ok(())
}
