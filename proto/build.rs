//! Generates the tonic/prost code from `proto/tunnel.proto` without `protoc`.

fn main() {
    let fds = protox::compile(["tunnel.proto"], ["proto"]).expect("tunnel.proto must compile");
    tonic_prost_build::configure()
        .bytes(".postern.tunnel.v1.Frame.data")
        .codec_path("crate::TunnelCodec")
        .compile_fds(fds)
        .expect("code generation for tunnel.proto");
    println!("cargo:rerun-if-changed=proto/tunnel.proto");
}
