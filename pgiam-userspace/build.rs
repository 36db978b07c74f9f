//! Compiles the eBPF programs (the same function `cargo xtask build-ebpf` uses); the binary
//! embeds the object.

fn main() {
    for src in pgiam_common::build::sources() {
        println!("cargo:rerun-if-changed={}", src.display());
    }
    println!("cargo:rerun-if-env-changed=PGIAM_CLANG");
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    if let Err(e) = pgiam_common::build::build_ebpf(&out) {
        panic!("building the eBPF programs failed: {e}");
    }
}
