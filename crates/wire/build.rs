//! Generates the runner RPC code from `proto/runner.proto` with protox (a
//! pure-Rust protobuf compiler), so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/runner.proto");
    let descriptors = protox::compile(["runner.proto"], ["proto"])?;
    // Credentials and client keys must never print: no derived `Debug`.
    tonic_prost_build::configure()
        .skip_debug([
            "custody.runner.v1.RegistryCredential",
            "custody.runner.v1.HostTls",
            "custody.runner.v1.StepSecret",
        ])
        .compile_fds(descriptors)?;
    Ok(())
}
