//! Compiles `proto/exo/shard/v1/shard.proto` with `protox`, a protobuf compiler written in Rust,
//! so building needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/exo/shard/v1/shard.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors =
        protox::compile([proto], ["../../proto"]).map_err(|e| format!("compiling {proto}: {e}"))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)
        .map_err(|e| format!("generating code for {proto}: {e}"))?;
    Ok(())
}
