//! Compiling the eBPF programs. One function serves `cargo xtask build-ebpf` and the build
//! script of pgiam-userspace, so both produce the same object.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `pgiam-ebpf/` in this workspace.
pub fn ebpf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("pgiam-common has a parent")
        .join("pgiam-ebpf")
}

/// The C sources the object is built from (for rerun-if-changed).
pub fn sources() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(ebpf_dir())
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "c" || e == "h"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Compiles `pgiam-ebpf/pgiam.bpf.c` into `out_dir/pgiam.bpf.o` with
/// `clang-19 -O2 -g -target bpf` (`$PGIAM_CLANG` overrides the compiler).
pub fn build_ebpf(out_dir: &Path) -> Result<PathBuf, String> {
    let clang = std::env::var("PGIAM_CLANG").unwrap_or_else(|_| "clang-19".into());
    let src = ebpf_dir().join("pgiam.bpf.c");
    let out = out_dir.join("pgiam.bpf.o");
    std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let output = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .output()
        .map_err(|e| {
            format!("cannot run {clang}: {e} (install clang-19, llvm-19 and libbpf-dev: `cargo xtask install-deps`)")
        })?;
    if !output.status.success() {
        return Err(format!(
            "{clang} failed on {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(out)
}
