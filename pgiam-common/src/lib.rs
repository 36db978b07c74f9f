//! Types shared by pgiam's eBPF programs and user space, mirroring `pgiam-ebpf/pgiam.h` field for
//! field (the layout test compiles the header and compares sizes and offsets), and the build of
//! the eBPF object itself.

pub mod build;

pub const COMM_LEN: usize = 16;

pub const F_ENABLED: u32 = 1 << 0;
pub const F_FAST_PATH: u32 = 1 << 1;
pub const F_BOUND_DEV: u32 = 1 << 2;
/// Record the caller's executable at connect() (set when the kernel has BTF).
pub const F_EXE: u32 = 1 << 3;

pub const STAT_CONNECT: u32 = 0;
pub const STAT_ESTABLISHED: u32 = 1;
pub const STAT_GETPEERNAME: u32 = 2;
pub const STAT_REDIRECT: u32 = 3;
/// sk_msg messages sent by TCP because the other end is not in the SOCKHASH (it has closed).
pub const STAT_FALLBACK: u32 = 4;
pub const STAT_MAX: u32 = 8;

/// `struct pgiam_config`: the single entry of the `pgiam_config` array.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Config {
    /// Network order.
    pub proxy_ip4: u32,
    /// Network order in the low 16 bits.
    pub proxy_port4: u32,
    pub proxy_ip6: [u32; 4],
    pub proxy_port6: u32,
    pub mark: u32,
    pub flags: u32,
    pub _pad: u32,
    pub netns_cookie: u64,
}

/// `struct pgiam_endpoint_key`: LPM trie key, port first.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointKey {
    pub prefixlen: u32,
    /// Network order.
    pub port: u16,
    pub _pad: u16,
    pub addr: [u8; 16],
}

/// `struct pgiam_origin`: what the kernel knew about the caller at connect() time.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Origin {
    pub addr: [u8; 16],
    /// Network order.
    pub port: u16,
    pub family: u16,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub _pad: u32,
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
    /// The caller's executable's inode (0: not read) and its filesystem's device in the
    /// kernel's encoding (major << 20 | minor).
    pub exe_ino: u64,
    pub exe_dev: u32,
    pub _pad2: u32,
}

/// `struct pgiam_peer_key`: the application socket's address, as pgiam's accept() sees it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// `struct pgiam_sock_key`: one end of a connection seen from that end.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SockKey {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u32,
    pub remote_port: u32,
}

#[cfg(feature = "aya")]
mod pod {
    // SAFETY: all are repr(C), Copy, without padding the compiler could leave uninitialised
    // (explicit `_pad` fields), and valid for any bit pattern.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::Origin {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::SockKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use std::process::Command;

    /// The header's constants, in the order of `values` in the test below.
    const CONSTANTS: [&str; 10] = [
        "PGIAM_F_ENABLED",
        "PGIAM_F_FAST_PATH",
        "PGIAM_F_BOUND_DEV",
        "PGIAM_F_EXE",
        "PGIAM_STAT_CONNECT",
        "PGIAM_STAT_ESTABLISHED",
        "PGIAM_STAT_GETPEERNAME",
        "PGIAM_STAT_REDIRECT",
        "PGIAM_STAT_FALLBACK",
        "PGIAM_STAT_MAX",
    ];

    /// Compiles a host program that prints the header's sizes and offsets, and compares.
    #[test]
    fn layouts_match_the_c_header() {
        let dir = std::env::temp_dir().join(format!("pgiam-layout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let header = build::ebpf_dir().join("pgiam.h");
        let probe = dir.join("probe.c");
        let fields: &[(&str, &[&str])] = &[
            (
                "pgiam_config",
                &[
                    "proxy_ip4",
                    "proxy_port4",
                    "proxy_ip6",
                    "proxy_port6",
                    "mark",
                    "flags",
                    "netns_cookie",
                ],
            ),
            ("pgiam_endpoint_key", &["prefixlen", "port", "addr"]),
            (
                "pgiam_origin",
                &[
                    "addr",
                    "port",
                    "family",
                    "pid",
                    "tgid",
                    "uid",
                    "gid",
                    "cgroup_id",
                    "comm",
                    "exe_ino",
                    "exe_dev",
                ],
            ),
            ("pgiam_peer_key", &["addr", "port"]),
            (
                "pgiam_sock_key",
                &["local", "remote", "local_port", "remote_port"],
            ),
        ];
        let mut c = format!(
            "#include <stdio.h>\n#include <stddef.h>\n#include \"{}\"\nint main(void) {{\n",
            header.display()
        );
        for (s, fs) in fields {
            c += &format!("printf(\"{s} %zu\\n\", sizeof(struct {s}));\n");
            for f in *fs {
                c += &format!("printf(\"{s}.{f} %zu\\n\", offsetof(struct {s}, {f}));\n");
            }
        }
        // The flag bits and counter indexes too: a stat or flag the two sides number differently
        // reads or sets the wrong one silently.
        for k in CONSTANTS {
            c += &format!("printf(\"{k} %u\\n\", (unsigned) {k});\n");
        }
        c += "return 0; }\n";
        std::fs::write(&probe, c).unwrap();
        let exe = dir.join("probe");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let st = Command::new(&cc)
            .args(["-I/usr/include/x86_64-linux-gnu", "-o"])
            .arg(&exe)
            .arg(&probe)
            .status()
            .expect("a C compiler");
        assert!(st.success());
        let out = Command::new(&exe).output().unwrap();
        std::fs::remove_dir_all(&dir).ok();
        let c_side: std::collections::HashMap<String, usize> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let (k, v) = l.split_once(' ').unwrap();
                (k.to_owned(), v.parse().unwrap())
            })
            .collect();
        let mut rust_side: Vec<(&str, usize)> = vec![
            ("pgiam_config", size_of::<Config>()),
            ("pgiam_config.proxy_ip4", offset_of!(Config, proxy_ip4)),
            ("pgiam_config.proxy_port4", offset_of!(Config, proxy_port4)),
            ("pgiam_config.proxy_ip6", offset_of!(Config, proxy_ip6)),
            ("pgiam_config.proxy_port6", offset_of!(Config, proxy_port6)),
            ("pgiam_config.mark", offset_of!(Config, mark)),
            ("pgiam_config.flags", offset_of!(Config, flags)),
            (
                "pgiam_config.netns_cookie",
                offset_of!(Config, netns_cookie),
            ),
            ("pgiam_endpoint_key", size_of::<EndpointKey>()),
            (
                "pgiam_endpoint_key.prefixlen",
                offset_of!(EndpointKey, prefixlen),
            ),
            ("pgiam_endpoint_key.port", offset_of!(EndpointKey, port)),
            ("pgiam_endpoint_key.addr", offset_of!(EndpointKey, addr)),
            ("pgiam_origin", size_of::<Origin>()),
            ("pgiam_origin.addr", offset_of!(Origin, addr)),
            ("pgiam_origin.port", offset_of!(Origin, port)),
            ("pgiam_origin.family", offset_of!(Origin, family)),
            ("pgiam_origin.pid", offset_of!(Origin, pid)),
            ("pgiam_origin.tgid", offset_of!(Origin, tgid)),
            ("pgiam_origin.uid", offset_of!(Origin, uid)),
            ("pgiam_origin.gid", offset_of!(Origin, gid)),
            ("pgiam_origin.cgroup_id", offset_of!(Origin, cgroup_id)),
            ("pgiam_origin.comm", offset_of!(Origin, comm)),
            ("pgiam_origin.exe_ino", offset_of!(Origin, exe_ino)),
            ("pgiam_origin.exe_dev", offset_of!(Origin, exe_dev)),
            ("pgiam_peer_key", size_of::<PeerKey>()),
            ("pgiam_peer_key.addr", offset_of!(PeerKey, addr)),
            ("pgiam_peer_key.port", offset_of!(PeerKey, port)),
            ("pgiam_sock_key", size_of::<SockKey>()),
            ("pgiam_sock_key.local", offset_of!(SockKey, local)),
            ("pgiam_sock_key.remote", offset_of!(SockKey, remote)),
            ("pgiam_sock_key.local_port", offset_of!(SockKey, local_port)),
            (
                "pgiam_sock_key.remote_port",
                offset_of!(SockKey, remote_port),
            ),
        ];
        let values = [
            F_ENABLED,
            F_FAST_PATH,
            F_BOUND_DEV,
            F_EXE,
            STAT_CONNECT,
            STAT_ESTABLISHED,
            STAT_GETPEERNAME,
            STAT_REDIRECT,
            STAT_FALLBACK,
            STAT_MAX,
        ];
        rust_side.extend(CONSTANTS.iter().zip(values).map(|(k, v)| (*k, v as usize)));
        assert_eq!(rust_side.len(), c_side.len(), "every C field is checked");
        for (name, rust) in rust_side {
            assert_eq!(Some(&rust), c_side.get(name), "{name}");
        }
    }
}
