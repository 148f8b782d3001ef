//! Compiles `proto/exo/shard/v1/shard.proto` (needs `protoc`: `apt install protobuf-compiler`,
//! or point `PROTOC` at one).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/exo/shard/v1/shard.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&[proto], &["../../proto"])
        .map_err(|e| {
            format!("compiling {proto}: {e} (is protoc installed? `apt install protobuf-compiler`)")
        })?;
    Ok(())
}
