//! The eBPF side of interception: load the programs, pin them under bpffs so interception
//! survives a restart of pgiam, attach them to a cgroup, and read the kernel's records.
//!
//! Pins live in a versioned directory (`<bpffs_dir>/v2`): programs and maps of an incompatible
//! layout never meet. A restarted pgiam reopens the pinned maps and finds the pinned cgroup
//! links, so it never attaches twice.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, SockHash};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::{CgroupSockAddr, SkMsg, SkSkb, SockOps};
use aya::{Ebpf, EbpfLoader};
use pgiam_common as common;

use crate::config::Interception as InterceptionConfig;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pgiam.bpf.o"));

/// Whether the running kernel describes its own types (BTF), which reading the caller's
/// executable needs.
pub fn kernel_has_btf() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| Path::new("/sys/kernel/btf/vmlinux").exists())
}

/// Bumped when map layouts or program semantics change incompatibly.
/// (v2: the origin record carries the caller's executable.)
const PIN_VERSION: &str = "v2";

const CGROUP_PROGRAMS: &[&str] = &[
    "pgiam_connect4",
    "pgiam_connect6",
    "pgiam_getpeername4",
    "pgiam_getpeername6",
    "pgiam_sockops",
];

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("no cgroup v2 hierarchy is mounted (looked in /proc/mounts)")]
    NoCgroup2,
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error("reading the network namespace cookie: {0}")]
    NetnsCookie(std::io::Error),
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> RedirectError {
    move |source| RedirectError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> RedirectError {
    move |source| RedirectError::Program { name, source }
}

/// Where the pins of a bpffs directory setting live.
pub fn pin_dir(bpffs_dir: &Path) -> PathBuf {
    bpffs_dir.join(PIN_VERSION)
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there (a fresh host).
fn ensure_bpffs(dir: &Path) -> Result<(), RedirectError> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, at, fstype) = (f.next(), f.next(), f.next());
        fstype == Some("bpf") && at.is_some_and(|at| dir.starts_with(at))
    });
    if !mounted {
        let root = Path::new("/sys/fs/bpf");
        if !dir.starts_with(root) {
            return Err(RedirectError::Bpffs(format!(
                "{} is not on a mounted bpffs",
                dir.display()
            )));
        }
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| RedirectError::Bpffs(format!("mounting bpffs at /sys/fs/bpf: {e}")))?;
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| RedirectError::Bpffs(format!("creating {}: {e}", dir.display())))
}

/// The network namespace cookie of pgiam's own namespace: only sockets there are intercepted.
fn netns_cookie() -> Result<u64, RedirectError> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").map_err(RedirectError::NetnsCookie)?;
    getsockopt_u64(&sock, libc::SO_NETNS_COOKIE).map_err(RedirectError::NetnsCookie)
}

/// A 64-bit SOL_SOCKET option (the kernel's cookies).
fn getsockopt_u64(socket: &impl AsRawFd, option: libc::c_int) -> std::io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd, and a buffer of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

fn v4_mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// One intercepted destination: an address prefix and a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub prefix: u8,
    pub port: u16,
}

impl Endpoint {
    fn key(&self) -> Key<[u8; 20]> {
        let mut data = [0u8; 20];
        data[0..2].copy_from_slice(&self.port.to_be_bytes());
        data[4..20].copy_from_slice(&v4_mapped(self.addr));
        let bits = match self.addr {
            IpAddr::V4(_) => 96 + u32::from(self.prefix),
            IpAddr::V6(_) => u32::from(self.prefix),
        };
        Key::new(32 + bits, data)
    }
}

/// Interception as installed in the kernel.
pub struct Interception {
    // Keeps the sk_msg and stream-verdict attachments alive; the cgroup links are pinned.
    _ebpf: Ebpf,
    accepted: HashMap<MapData, u64, common::Origin>,
    endpoints: LpmTrie<MapData, [u8; 20], u8>,
    config_map: Array<MapData, common::Config>,
    config: common::Config,
    installed: Vec<Endpoint>,
    fail_open: bool,
}

impl Interception {
    /// Loads (or reopens) and attaches interception for connections to `endpoints`, sending
    /// them to `listen4` (and IPv6 ones to `listen6`).
    pub fn install(
        cfg: &InterceptionConfig,
        listen4: SocketAddr,
        listen6: Option<SocketAddr>,
        endpoints: &[Endpoint],
    ) -> Result<Interception, RedirectError> {
        let mount = crate::identity::cgroup2_mount().ok_or(RedirectError::NoCgroup2)?;
        let cgroup_path = mount.join(cfg.cgroup.trim_start_matches('/'));
        let cgroup = std::fs::File::open(&cgroup_path).map_err(|source| RedirectError::Cgroup {
            path: cgroup_path.clone(),
            source,
        })?;
        let cgroup_id =
            std::os::unix::fs::MetadataExt::ino(&cgroup.metadata().map_err(|source| {
                RedirectError::Cgroup {
                    path: cgroup_path.clone(),
                    source,
                }
            })?);
        // The kernel binds a connection's record to pgiam's accepted socket when that socket's
        // handshake runs through the attached programs: pgiam must be inside the subtree.
        let own = crate::identity::read_cgroup_v2_path(std::process::id() as i32)
            .map_err(|e| RedirectError::Bpffs(format!("reading pgiam's own cgroup: {e}")))?;
        if !cgroup_contains(&cfg.cgroup, &own) {
            return Err(RedirectError::Bpffs(format!(
                "pgiam runs in cgroup {own}, outside the intercepted subtree {}: it must run \
                 inside it (the default \"/\" always holds)",
                cfg.cgroup
            )));
        }
        let pins = pin_dir(&cfg.bpffs_dir);
        ensure_bpffs(&pins)?;
        // An upgrade from another layout: its programs stay attached through their pinned
        // links until the pins go, and would intercept beside these with records pgiam no
        // longer reads.
        for old in other_layouts(&cfg.bpffs_dir) {
            let n = remove_pins(&old)
                .map_err(|e| RedirectError::Bpffs(format!("removing {}: {e}", old.display())))?;
            tracing::warn!(dir = %old.display(), pins = n, "removed the interception pins of another pgiam version");
        }

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pins)
            .load(OBJECT)?;

        // Configuration first, so programs attached below never see a half-set map.
        let mut config = common::Config {
            mark: cfg.mark,
            flags: common::F_ENABLED,
            netns_cookie: netns_cookie()?,
            ..Default::default()
        };
        if cfg.fast_path {
            config.flags |= common::F_FAST_PATH;
        }
        if cfg.intercept_bound_devices {
            config.flags |= common::F_BOUND_DEV;
        }
        // The executable is read through the kernel's own types, which only its BTF
        // describes; without it, nothing is recorded and no client has an exe: principal.
        if kernel_has_btf() {
            config.flags |= common::F_EXE;
        } else {
            tracing::warn!(
                "the kernel has no BTF (/sys/kernel/btf/vmlinux): the executable of an intercepted \
                 client cannot be recorded at connect(), so no client has an exe: principal \
                 (/proc's word after connect() can be borrowed by an exec())"
            );
        }
        let IpAddr::V4(ip4) = listen4.ip() else {
            return Err(RedirectError::Bpffs(
                "listen.tcp must be an IPv4 address".into(),
            ));
        };
        config.proxy_ip4 = u32::from_ne_bytes(ip4.octets());
        config.proxy_port4 = u32::from(listen4.port().to_be());
        if let Some(SocketAddr::V6(l6)) = listen6 {
            let o = l6.ip().octets();
            for (i, w) in config.proxy_ip6.iter_mut().enumerate() {
                *w = u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]);
            }
            config.proxy_port6 = u32::from(l6.port().to_be());
        }
        let mut config_map: Array<MapData, common::Config> = ebpf
            .take_map("pgiam_config")
            .ok_or(RedirectError::Bpffs("object has no pgiam_config".into()))?
            .try_into()
            .map_err(map_err("pgiam_config"))?;
        config_map
            .set(0, config, 0)
            .map_err(map_err("pgiam_config"))?;
        let endpoints_map: LpmTrie<MapData, [u8; 20], u8> = ebpf
            .take_map("pgiam_endpoints")
            .ok_or(RedirectError::Bpffs("object has no pgiam_endpoints".into()))?
            .try_into()
            .map_err(map_err("pgiam_endpoints"))?;
        let accepted: HashMap<MapData, u64, common::Origin> = ebpf
            .take_map("pgiam_accepted")
            .ok_or(RedirectError::Bpffs("object has no pgiam_accepted".into()))?
            .try_into()
            .map_err(map_err("pgiam_accepted"))?;

        let mut me = Interception {
            _ebpf: ebpf,
            accepted,
            endpoints: endpoints_map,
            config_map,
            config,
            installed: Vec::new(),
            fail_open: cfg.fail_open,
        };
        me.set_endpoints(endpoints)?;
        me.attach(&cgroup, cgroup_id, &pins)?;
        Ok(me)
    }

    fn attach(
        &mut self,
        cgroup: &std::fs::File,
        cgroup_id: u64,
        pins: &Path,
    ) -> Result<(), RedirectError> {
        let ebpf = &mut self._ebpf;
        // Links to another cgroup (the configuration changed) are removed; links to this one
        // are kept as they are.
        let wanted: Vec<String> = CGROUP_PROGRAMS
            .iter()
            .map(|p| format!("link_{p}_{cgroup_id}"))
            .collect();
        if let Ok(rd) = std::fs::read_dir(pins) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("link_") && !wanted.contains(&name) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        // Attached as bpf_links (kernel 5.7+), which coexist with other programs on the same
        // cgroup by nature: the kernel refuses attach flags on them, so the mode is Single.
        for (name, link_name) in CGROUP_PROGRAMS.iter().copied().zip(&wanted) {
            let link_path = pins.join(link_name);
            if PinnedLink::from_pin(&link_path).is_ok() {
                tracing::info!(
                    program = name,
                    "interception already attached (pinned link)"
                );
                continue;
            }
            // SockOps and CgroupSockAddr share these steps but no trait.
            macro_rules! attach_to_cgroup {
                ($ty:ty) => {{
                    let prog: &mut $ty = ebpf
                        .program_mut(name)
                        .expect("program in object")
                        .try_into()
                        .map_err(prog_err(name))?;
                    prog.load().map_err(prog_err(name))?;
                    let id = prog
                        .attach(cgroup, CgroupAttachMode::Single)
                        .map_err(prog_err(name))?;
                    FdLink::try_from(prog.take_link(id).map_err(prog_err(name))?).map_err(|e| {
                        RedirectError::Pin {
                            path: link_path.clone(),
                            message: e.to_string(),
                        }
                    })?
                }};
            }
            let link = if name == "pgiam_sockops" {
                attach_to_cgroup!(SockOps)
            } else {
                attach_to_cgroup!(CgroupSockAddr)
            };
            link.pin(&link_path).map_err(|e| RedirectError::Pin {
                path: link_path.clone(),
                message: e.to_string(),
            })?;
            tracing::info!(program = name, "interception attached");
        }

        // The fast path hangs off the SOCKHASH itself; it lives as long as this process.
        let socks: SockHash<MapData, common::SockKey> = ebpf
            .take_map("pgiam_socks")
            .ok_or(RedirectError::Bpffs("object has no pgiam_socks".into()))?
            .try_into()
            .map_err(map_err("pgiam_socks"))?;
        let fd = socks.fd();
        let msg: &mut SkMsg = ebpf
            .program_mut("pgiam_sk_msg")
            .expect("program in object")
            .try_into()
            .map_err(prog_err("pgiam_sk_msg"))?;
        msg.load().map_err(prog_err("pgiam_sk_msg"))?;
        msg.attach(fd).map_err(prog_err("pgiam_sk_msg"))?;
        let verdict: &mut SkSkb = ebpf
            .program_mut("pgiam_stream_verdict")
            .expect("program in object")
            .try_into()
            .map_err(prog_err("pgiam_stream_verdict"))?;
        verdict.load().map_err(prog_err("pgiam_stream_verdict"))?;
        verdict
            .attach(fd)
            .map_err(prog_err("pgiam_stream_verdict"))?;
        Ok(())
    }

    /// Replaces the set of intercepted endpoints (host names are resolved by the caller).
    pub fn set_endpoints(&mut self, endpoints: &[Endpoint]) -> Result<(), RedirectError> {
        let mut wanted = endpoints.to_vec();
        wanted.sort();
        wanted.dedup();
        for e in &wanted {
            self.endpoints
                .insert(&e.key(), 1, 0)
                .map_err(map_err("pgiam_endpoints"))?;
        }
        // Stale entries: from a previous run (the map is pinned) or a changed resolution.
        let stale: Vec<Key<[u8; 20]>> = self
            .endpoints
            .keys()
            .flatten()
            .filter(|k| !wanted.iter().any(|e| same_key(&e.key(), k)))
            .collect();
        for k in stale {
            let _ = self.endpoints.remove(&k);
        }
        if wanted != self.installed {
            tracing::info!(endpoints = ?wanted, "intercepted endpoints");
            self.installed = wanted;
        }
        Ok(())
    }

    /// The kernel's record for the accepted socket with this cookie, removed from the map. The
    /// kernel bound it to that socket during the handshake, so it can belong to no other
    /// connection.
    pub fn take_origin(&mut self, socket_cookie: u64) -> Option<common::Origin> {
        let origin = self.accepted.get(&socket_cookie, 0).ok()?;
        let _ = self.accepted.remove(&socket_cookie);
        Some(origin)
    }

    /// On a clean stop: with `fail_open`, connections go straight to the database while pgiam
    /// is down; otherwise they keep being sent to pgiam's (closed) port and are refused.
    pub fn shutdown(&mut self) {
        if self.fail_open {
            self.config.flags &= !common::F_ENABLED;
            if let Err(e) = self.config_map.set(0, self.config, 0) {
                tracing::error!("cannot disable interception for fail-open: {e}");
            } else {
                tracing::warn!("fail_open: interception disabled while pgiam is down");
            }
        }
    }
}

/// Whether cgroup path `inner` is `outer` or below it.
fn cgroup_contains(outer: &str, inner: &str) -> bool {
    let outer = outer.trim_end_matches('/');
    outer.is_empty()
        || inner == outer
        || inner
            .strip_prefix(outer)
            .is_some_and(|r| r.starts_with('/'))
}

/// The kernel's cookie of a socket (SO_COOKIE): unique for the system's lifetime.
pub fn socket_cookie(socket: &impl AsRawFd) -> std::io::Result<u64> {
    getsockopt_u64(socket, libc::SO_COOKIE)
}

fn same_key(a: &Key<[u8; 20]>, b: &Key<[u8; 20]>) -> bool {
    a.prefix_len() == b.prefix_len() && a.data() == b.data()
}

/// The original destination of an intercepted connection.
pub fn original_destination(origin: &common::Origin) -> SocketAddr {
    let ip = Ipv6Addr::from(origin.addr);
    let ip = match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    };
    SocketAddr::new(ip, u16::from_be(origin.port))
}

/// Removes every pin: cgroup links (which detaches the programs), maps, the directory.
pub fn uninstall(bpffs_dir: &Path) -> std::io::Result<usize> {
    let mut removed = remove_pins(&pin_dir(bpffs_dir))?;
    for old in other_layouts(bpffs_dir) {
        removed += remove_pins(&old)?;
    }
    let _ = std::fs::remove_dir(bpffs_dir);
    Ok(removed)
}

/// Pin directories of other layouts (`v<N>` beside this version's) under `bpffs_dir`.
fn other_layouts(bpffs_dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(bpffs_dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name != PIN_VERSION
                && name
                    .strip_prefix('v')
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect()
}

/// Removes one layout's pins (a pinned link detaches its program as it goes) and its
/// directory; how many pins there were.
fn remove_pins(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            for e in rd.flatten() {
                std::fs::remove_file(e.path())?;
                removed += 1;
            }
            std::fs::remove_dir(dir)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(removed)
}

/// Reads the pinned statistics counters (for `pgiam bpf-stats` and tests).
pub fn read_stats(bpffs_dir: &Path) -> Result<Vec<(&'static str, u64)>, RedirectError> {
    let path = pin_dir(bpffs_dir).join("pgiam_stats");
    let data = MapData::from_pin(&path).map_err(map_err("pgiam_stats"))?;
    let stats: Array<MapData, u64> =
        Array::try_from(aya::maps::Map::Array(data)).map_err(map_err("pgiam_stats"))?;
    let names = [
        (common::STAT_CONNECT, "connect"),
        (common::STAT_ESTABLISHED, "established"),
        (common::STAT_GETPEERNAME, "getpeername"),
        (common::STAT_REDIRECT, "redirect"),
        (common::STAT_FALLBACK, "fallback"),
    ];
    names
        .into_iter()
        .map(|(i, n)| Ok((n, stats.get(&i, 0).map_err(map_err("pgiam_stats"))?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_subtrees() {
        assert!(cgroup_contains("/", "/system.slice/x.service"));
        assert!(cgroup_contains("/a", "/a"));
        assert!(cgroup_contains("/a", "/a/b"));
        assert!(!cgroup_contains("/a", "/ab"));
        assert!(!cgroup_contains("/a/b", "/a"));
    }

    #[test]
    fn endpoint_keys_put_the_port_first() {
        let e = Endpoint {
            addr: "10.0.0.0".parse().unwrap(),
            prefix: 8,
            port: 5432,
        };
        let k = e.key();
        assert_eq!(k.prefix_len(), 32 + 96 + 8);
        assert_eq!(&k.data()[0..2], &5432u16.to_be_bytes());
        assert_eq!(
            &k.data()[4..20],
            &"::ffff:10.0.0.0".parse::<Ipv6Addr>().unwrap().octets()
        );
    }
}
