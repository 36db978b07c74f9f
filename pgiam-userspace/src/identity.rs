//! Who is calling: the kernel's facts about a client process, enriched into principal names.
//!
//! Without eBPF the facts come from the peer socket: SO_PEERCRED for a unix socket, and for a
//! loopback TCP peer the socket table in /proc (its uid and inode) and the process that holds
//! that inode. Everything a principal is built from is read from the kernel, never from what the
//! client says about itself.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read peer credentials: {0}")]
    PeerCred(std::io::Error),
    #[error("no socket {peer} -> {local} in the kernel's TCP table (not a local process?)")]
    NoSuchSocket { peer: SocketAddr, local: SocketAddr },
    #[error("cannot read {path}: {source}")]
    Proc {
        path: &'static str,
        source: std::io::Error,
    },
    /// pgiam reached itself: nothing of pgiam's dials its own listener, so something sent one
    /// of its connections to the database back to it.
    #[error(
        "the connection comes from pgiam itself: something redirects pgiam's own connections \
         to the database back to it (an eBPF interception left attached by an earlier run \
         with [interception]? `pgiam uninstall-bpf --config` with that configuration removes it)"
    )]
    OwnConnection,
}

/// How the identity was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    UnixPeerCred,
    LoopbackProc,
    /// Recorded by the eBPF connect hook when the process called connect().
    Kernel,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::UnixPeerCred => "unix-peercred",
            Source::LoopbackProc => "loopback-proc",
            Source::Kernel => "ebpf",
        })
    }
}

/// The verified identity of a client process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub source: Source,
    pub uid: u32,
    pub gid: u32,
    /// The process that connected; `None` if it exited before pgiam could look.
    pub pid: Option<i32>,
    pub user: Option<String>,
    pub group: Option<String>,
    /// cgroup v2 path, e.g. `/system.slice/billing-api.service`.
    pub cgroup: Option<String>,
    /// The innermost systemd unit in the cgroup path (`*.service` or `*.scope`).
    pub unit: Option<String>,
    /// Container id from a docker, containerd, CRI-O or podman scope.
    pub container: Option<String>,
    pub exe: Option<Executable>,
    /// The thread name the kernel recorded (eBPF only).
    pub comm: Option<String>,
    /// The person logged in (`pgiam login`) in the login session this process belongs to,
    /// or whose ID token the client gave as its password.
    pub person: Option<std::sync::Arc<crate::people::Person>>,
}

/// The executable of the process that connected, and whose word it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Executable {
    /// The kernel recorded it at connect() (eBPF with BTF), and /proc still names that file:
    /// a credential, as uid and cgroup are (`exe:` principals, the policy's `exe`).
    Recorded(PathBuf),
    /// /proc's word when pgiam looked, after connect(): a label for logs and the audit, never
    /// a credential (a process can connect, then exec a trusted binary and keep the socket).
    Reported(PathBuf),
}

impl Executable {
    pub fn path(&self) -> &Path {
        match self {
            Executable::Recorded(p) | Executable::Reported(p) => p,
        }
    }

    /// The path, if it may be trusted.
    pub fn credential(&self) -> Option<&Path> {
        match self {
            Executable::Recorded(p) => Some(p),
            Executable::Reported(_) => None,
        }
    }
}

impl Identity {
    /// Fills in everything that follows from uid, gid and pid.
    pub fn from_kernel_facts(source: Source, uid: u32, gid: u32, pid: Option<i32>) -> Identity {
        let cgroup = pid.and_then(|p| read_cgroup_v2_path(p).ok());
        Identity::enrich(source, uid, gid, pid, cgroup, None)
    }

    /// A hypothetical client known only by one principal (for `pgiam policy test`): that
    /// attribute is set, the others are not (uid and gid are 0 unless the principal names them).
    pub fn for_principal(kind: &str, value: &str) -> Option<Identity> {
        let mut id = Identity::enrich(Source::Kernel, 0, 0, None, None, None);
        id.user = None;
        id.group = None;
        match kind {
            "uid" => id.uid = value.parse().ok()?,
            "gid" => id.gid = value.parse().ok()?,
            "user" => id.user = Some(value.to_owned()),
            "group" => id.group = Some(value.to_owned()),
            "unit" => id.unit = Some(value.to_owned()),
            "cgroup" => id.cgroup = Some(value.to_owned()),
            "container" => id.container = Some(value.to_owned()),
            "exe" => id.exe = Some(Executable::Recorded(value.into())),
            _ => return None,
        }
        Some(id)
    }

    /// The identity the eBPF connect hook recorded. The cgroup is the one the process was in at
    /// connect() time, resolved from its id, not where it may have moved since. The executable
    /// is the one that called connect(): `exe_recorded` says the kernel recorded it (it has BTF),
    /// and then /proc's path is the recorded executable only if it still names that very file
    /// (an exec() since, to borrow a trusted binary's name, leaves the session without one).
    /// Without a record, /proc's path at this moment is a label only.
    pub fn from_origin(origin: &pgiam_common::Origin, exe_recorded: bool) -> Identity {
        let comm_len = origin
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(origin.comm.len());
        let comm = String::from_utf8_lossy(&origin.comm[..comm_len]).into_owned();
        let mut id = Identity::enrich(
            Source::Kernel,
            origin.uid,
            origin.gid,
            Some(origin.tgid as i32),
            cgroup_path_by_id(origin.cgroup_id),
            Some(comm),
        );
        if exe_recorded {
            if let Some(Executable::Reported(now) | Executable::Recorded(now)) = id.exe.take() {
                if is_recorded_file(&now, origin.exe_dev, origin.exe_ino) {
                    id.exe = Some(Executable::Recorded(now));
                } else {
                    tracing::warn!(
                        pid = origin.tgid,
                        exe = %now.display(),
                        "the process runs another executable than the one that connected: no exe: principal"
                    );
                }
            }
        }
        id
    }

    fn enrich(
        source: Source,
        uid: u32,
        gid: u32,
        pid: Option<i32>,
        cgroup: Option<String>,
        comm: Option<String>,
    ) -> Identity {
        let user = nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map(|u| u.name);
        let group = nix::unistd::Group::from_gid(gid.into())
            .ok()
            .flatten()
            .map(|g| g.name);
        let exe = pid
            .and_then(|p| std::fs::read_link(format!("/proc/{p}/exe")).ok())
            .map(Executable::Reported);
        let unit = cgroup.as_deref().and_then(unit_from_cgroup_path);
        let container = cgroup.as_deref().and_then(container_from_cgroup_path);
        Identity {
            source,
            uid,
            gid,
            pid,
            user,
            group,
            cgroup,
            unit,
            container,
            exe,
            comm,
            person: None,
        }
    }

    /// Principal names this identity answers to, most specific first. Mappings in the config
    /// name one of these.
    pub fn principals(&self) -> Vec<String> {
        let mut p = Vec::with_capacity(8);
        if let Some(person) = &self.person {
            p.extend(person.principals());
        }
        if let Some(c) = &self.container {
            p.push(format!("container:{c}"));
        }
        if let Some(u) = &self.unit {
            p.push(format!("unit:{u}"));
        }
        if let Some(c) = &self.cgroup {
            p.push(format!("cgroup:{c}"));
        }
        if let Some(e) = self.exe.as_ref().and_then(Executable::credential) {
            p.push(format!("exe:{}", e.display()));
        }
        if let Some(u) = &self.user {
            p.push(format!("user:{u}"));
        }
        p.push(format!("uid:{}", self.uid));
        if let Some(g) = &self.group {
            p.push(format!("group:{g}"));
        }
        p.push(format!("gid:{}", self.gid));
        p
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={}", self.uid)?;
        if let Some(u) = &self.user {
            write!(f, "({u})")?;
        }
        write!(f, " gid={}", self.gid)?;
        match self.pid {
            Some(p) => write!(f, " pid={p}")?,
            None => write!(f, " pid=?")?,
        }
        if let Some(u) = &self.unit {
            write!(f, " unit={u}")?;
        }
        if let Some(c) = &self.cgroup {
            write!(f, " cgroup={c}")?;
        }
        if let Some(c) = &self.container {
            write!(f, " container={c}")?;
        }
        match &self.exe {
            Some(Executable::Recorded(e)) => write!(f, " exe={}", e.display())?,
            Some(Executable::Reported(e)) => write!(f, " exe={} (not recorded)", e.display())?,
            None => {}
        }
        if let Some(c) = &self.comm {
            write!(f, " comm={c}")?;
        }
        if let Some(p) = &self.person {
            write!(f, " person={}", p.principal())?;
        }
        write!(f, " via={}", self.source)
    }
}

/// The identity as an audit record field.
impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        /// A value written as its `Display` text, without a `String` in between.
        struct Shown<T>(T);
        impl<T: fmt::Display> serde::Serialize for Shown<T> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&self.0)
            }
        }
        let recorded = matches!(self.exe, Some(Executable::Recorded(_)));
        let entries = 11 + usize::from(recorded) + usize::from(self.person.is_some());
        let mut m = s.serialize_map(Some(entries))?;
        m.serialize_entry("source", &Shown(&self.source))?;
        m.serialize_entry("uid", &self.uid)?;
        m.serialize_entry("gid", &self.gid)?;
        m.serialize_entry("pid", &self.pid)?;
        m.serialize_entry("user", &self.user)?;
        m.serialize_entry("group", &self.group)?;
        m.serialize_entry("cgroup", &self.cgroup)?;
        m.serialize_entry("unit", &self.unit)?;
        m.serialize_entry("container", &self.container)?;
        m.serialize_entry("exe", &self.exe.as_ref().map(|e| Shown(e.path().display())))?;
        if recorded {
            m.serialize_entry("exe_recorded", &true)?;
        }
        m.serialize_entry("comm", &self.comm)?;
        if let Some(p) = &self.person {
            m.serialize_entry("person", p.as_ref())?;
        }
        m.end()
    }
}

/// Whether `path` is the file the kernel recorded: its inode, on the filesystem whose device
/// the kernel encodes as `major << 20 | minor` (stat encodes it otherwise).
fn is_recorded_file(path: &Path, kernel_dev: u32, ino: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    if ino == 0 {
        return false;
    }
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    meta.ino() == ino && kernel_dev >> 20 == major && kernel_dev & 0xf_ffff == minor
}

/// Identity of the process at the other end of a unix socket.
pub fn from_unix_peer(stream: &tokio::net::UnixStream) -> Result<Identity, IdentityError> {
    let cred = stream.peer_cred().map_err(IdentityError::PeerCred)?;
    Ok(Identity::from_kernel_facts(
        Source::UnixPeerCred,
        cred.uid(),
        cred.gid(),
        cred.pid(),
    ))
}

/// Identity of the local process that owns the TCP socket `peer` connected to our `local`.
///
/// The socket's uid and inode come from /proc/net/tcp{,6} of pgiam's own network namespace (a
/// loopback peer can only be there); the pid is the process holding that inode.
pub fn from_loopback_tcp(peer: SocketAddr, local: SocketAddr) -> Result<Identity, IdentityError> {
    let (uid, inode) = find_tcp_socket(peer, local)?;
    let pid = match find_socket_owner(inode) {
        // Answered, it would log in upstream again, be sent back again, and so on until the
        // startup timeout ends the chain: refused at once instead.
        Some(Owner::Pgiam) => return Err(IdentityError::OwnConnection),
        Some(Owner::Process(pid)) => Some(pid),
        None => None,
    };
    let gid = pid
        .and_then(|p| proc_status_gid(p).ok())
        .or_else(|| {
            nix::unistd::User::from_uid(uid.into())
                .ok()
                .flatten()
                .map(|u| u.gid.as_raw())
        })
        .unwrap_or(u32::MAX);
    Ok(Identity::from_kernel_facts(
        Source::LoopbackProc,
        uid,
        gid,
        pid,
    ))
}

fn find_tcp_socket(peer: SocketAddr, local: SocketAddr) -> Result<(u32, u64), IdentityError> {
    // An IPv4 peer of a dual-stack listener appears as ::ffff:a.b.c.d; the kernel lists that
    // socket in the v6 table, so look in the table of the address family we were given first.
    let tables: &[&'static str] = match peer.ip() {
        IpAddr::V4(_) => &["/proc/net/tcp", "/proc/net/tcp6"],
        IpAddr::V6(_) => &["/proc/net/tcp6", "/proc/net/tcp"],
    };
    for &path in tables {
        let table = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(IdentityError::Proc { path, source }),
        };
        let found = parse_tcp_table(std::io::BufReader::new(table), peer, local)
            .map_err(|source| IdentityError::Proc { path, source })?;
        if let Some(found) = found {
            return Ok(found);
        }
    }
    Err(IdentityError::NoSuchSocket { peer, local })
}

/// Finds the row whose local address is `peer` and remote address is `local`: `(uid, inode)`.
/// Read a line at a time: the table has a row per socket of the host, TIME_WAIT ones
/// included (tens of thousands after a burst of short connections), and every login looks
/// it up, a few at once; read whole, each lookup held all of it (a login burst took pgiam's
/// heap past 100 MB).
fn parse_tcp_table(
    table: impl std::io::BufRead,
    peer: SocketAddr,
    local: SocketAddr,
) -> std::io::Result<Option<(u32, u64)>> {
    for line in table.lines().skip(1) {
        let line = line?;
        let mut cols = line.split_whitespace();
        let (Some(_), Some(laddr), Some(raddr)) = (cols.next(), cols.next(), cols.next()) else {
            continue;
        };
        if parse_proc_addr(laddr) != Some(peer) || parse_proc_addr(raddr) != Some(local) {
            continue;
        }
        // st, tx:rx, tr:when, retrnsmt, uid, timeout, inode
        let mut rest = cols.skip(4);
        let uid = rest.next().and_then(|c| c.parse().ok());
        let inode = rest.nth(1).and_then(|c| c.parse().ok());
        return Ok(uid.zip(inode));
    }
    Ok(None)
}

/// Parses `0100007F:1F90` (v4) or a 32-digit v6 address: each 32-bit word in host order.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::from(u32::from_str_radix(ip, 16).ok()?.swap_bytes().to_be_bytes()),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                chunk.copy_from_slice(&word.swap_bytes().to_be_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(bytes);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Who holds a client's socket.
enum Owner {
    Process(i32),
    Pgiam,
}

/// The process holding socket `inode`, by scanning /proc/*/fd. Several processes can share one
/// socket after fork; any of them answers for it, and they share uid and cgroup in practice.
/// pgiam itself is looked at last: it holds the client's socket only when it is the client.
fn find_socket_owner(inode: u64) -> Option<Owner> {
    let target = format!("socket:[{inode}]");
    let me = std::process::id() as i32;
    let holds = |fd_dir: std::path::PathBuf| -> bool {
        let Ok(fds) = std::fs::read_dir(fd_dir) else {
            return false;
        };
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()))
    };
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid != me && holds(entry.path().join("fd")) {
            return Some(Owner::Process(pid));
        }
    }
    holds(std::path::PathBuf::from("/proc/self/fd")).then_some(Owner::Pgiam)
}

fn proc_status_gid(pid: i32) -> std::io::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Gid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::other("no effective gid in status"))
}

/// The process's cgroup v2 path: the `0::` line of /proc/PID/cgroup (present on unified and
/// hybrid hosts alike).
pub fn read_cgroup_v2_path(pid: i32) -> std::io::Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or_else(|| std::io::Error::other("no cgroup v2 entry"))
}

/// The cgroup v2 path whose directory has inode `id` (on cgroup v2 the id is that inode).
/// Results are cached; a miss walks the hierarchy once more, since cgroups come and go.
pub fn cgroup_path_by_id(id: u64) -> Option<String> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static CACHE: Mutex<Option<HashMap<u64, String>>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cache.as_ref().and_then(|c| c.get(&id)) {
        return Some(p.clone());
    }
    let root = cgroup2_mount()?;
    let mut found = HashMap::new();
    walk_cgroups(&root, &root, &mut found, 0);
    let path = found.get(&id).cloned();
    *cache = Some(found);
    path
}

fn walk_cgroups(
    root: &Path,
    dir: &Path,
    out: &mut std::collections::HashMap<u64, String>,
    depth: usize,
) {
    use std::os::unix::fs::MetadataExt;
    // cgroup trees are shallow; the bound only guards against a pathological hierarchy.
    if depth > 32 {
        return;
    }
    if let Ok(meta) = std::fs::metadata(dir) {
        let rel = dir.strip_prefix(root).unwrap_or(dir);
        out.insert(meta.ino(), format!("/{}", rel.display()));
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk_cgroups(root, &e.path(), out, depth + 1);
        }
    }
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones. Read from /proc/mounts rather than assumed.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    cgroup2_mount_in(&mounts)
}

fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// The innermost systemd unit named in a cgroup path.
pub fn unit_from_cgroup_path(path: &str) -> Option<String> {
    Path::new(path)
        .components()
        .rev()
        .filter_map(|c| c.as_os_str().to_str())
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

/// A container id from the runtimes' cgroup naming: `docker-<id>.scope`,
/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`, or cgroupfs-driver
/// paths `/docker/<id>` and `/kubepods/.../<id>`.
pub fn container_from_cgroup_path(path: &str) -> Option<String> {
    let is_id = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    for (i, c) in comps.iter().enumerate().rev() {
        if let Some(stem) = c.strip_suffix(".scope") {
            for prefix in ["docker-", "cri-containerd-", "crio-", "libpod-"] {
                if let Some(id) = stem.strip_prefix(prefix) {
                    if is_id(id) {
                        return Some(id.to_owned());
                    }
                }
            }
        }
        if is_id(c) && i > 0 && (comps[0] == "docker" || comps[0].starts_with("kubepods")) {
            return Some((*c).to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_addresses() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("0000000000000000FFFF00000100007F:0050"),
            Some("127.0.0.1:80".parse().unwrap()),
            "v4-mapped addresses compare as v4"
        );
        assert_eq!(parse_proc_addr("zz:1"), None);
    }

    #[test]
    fn tcp_table_row() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   106        0 31337 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:D431 0100007F:1920 01 00000000:00000000 00:00000000 00000000  1001        0 424242 1 0000000000000000 20 4 30 10 -1\n";
        let peer = "127.0.0.1:54321".parse().unwrap();
        let local = "127.0.0.1:6432".parse().unwrap();
        assert_eq!(
            parse_tcp_table(table.as_bytes(), peer, local).unwrap(),
            Some((1001, 424242))
        );
        assert_eq!(
            parse_tcp_table(table.as_bytes(), local, peer).unwrap(),
            None
        );
    }

    #[test]
    fn units_and_containers() {
        assert_eq!(
            unit_from_cgroup_path("/system.slice/billing-api.service").as_deref(),
            Some("billing-api.service")
        );
        assert_eq!(
            unit_from_cgroup_path("/user.slice/user-1000.slice/session-4.scope").as_deref(),
            Some("session-4.scope")
        );
        assert_eq!(unit_from_cgroup_path("/"), None);
        let id = "a".repeat(64);
        assert_eq!(
            container_from_cgroup_path(&format!("/system.slice/docker-{id}.scope")),
            Some(id.clone())
        );
        assert_eq!(
            container_from_cgroup_path(&format!(
                "/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope"
            )),
            Some(id.clone())
        );
        assert_eq!(
            container_from_cgroup_path(&format!("/docker/{id}")),
            Some(id)
        );
        assert_eq!(
            container_from_cgroup_path("/system.slice/cron.service"),
            None
        );
    }

    #[test]
    fn cgroup2_mount_detection() {
        let hybrid = "cgroup /sys/fs/cgroup/memory cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount_in("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_mount_in("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn a_recorded_executable_counts_only_while_its_path_names_that_file() {
        use std::os::unix::fs::MetadataExt;
        let me = std::env::current_exe().unwrap();
        let meta = std::fs::metadata(&me).unwrap();
        let kernel_dev = (libc::major(meta.dev()) << 20) | libc::minor(meta.dev());
        assert!(is_recorded_file(&me, kernel_dev, meta.ino()));
        assert!(
            !is_recorded_file(&me, kernel_dev, meta.ino() + 1),
            "another inode"
        );
        assert!(
            !is_recorded_file(&me, kernel_dev + 1, meta.ino()),
            "another device"
        );
        assert!(!is_recorded_file(&me, kernel_dev, 0), "nothing recorded");
        assert!(!is_recorded_file(
            Path::new("/nonexistent/pgiam"),
            kernel_dev,
            meta.ino()
        ));
    }

    #[test]
    fn own_process_identity() {
        let me = std::process::id() as i32;
        let id = Identity::from_kernel_facts(
            Source::UnixPeerCred,
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
            Some(me),
        );
        assert_eq!(
            id.exe,
            std::env::current_exe().ok().map(Executable::Reported)
        );
        let principals = id.principals();
        assert!(principals.contains(&format!("uid:{}", id.uid)));
        // What /proc says after the fact is not a credential.
        assert!(!principals.iter().any(|p| p.starts_with("exe:")));
        let recorded = Identity {
            exe: id
                .exe
                .as_ref()
                .map(|e| Executable::Recorded(e.path().to_owned())),
            ..id
        };
        assert!(recorded.principals().iter().any(|p| p.starts_with("exe:")));
    }

    /// A connection pgiam made itself, sent back to it (an interception left attached by an
    /// earlier run): refused, not answered with a login upstream that would come back too.
    #[tokio::test]
    async fn a_connection_from_pgiam_itself_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let looked_up = from_loopback_tcp(peer, stream.local_addr().unwrap());
        assert!(
            matches!(looked_up, Err(IdentityError::OwnConnection)),
            "{looked_up:?}"
        );
    }

    #[tokio::test]
    async fn loopback_peer_is_found_in_proc() {
        // A child process connects to us; /proc must name it, not us.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut child = std::process::Command::new("bash")
            .args([
                "-c",
                &format!("exec 3<>/dev/tcp/127.0.0.1/{}; exec sleep 5", addr.port()),
            ])
            .spawn()
            .expect("bash");
        let (stream, peer) = listener.accept().await.unwrap();
        let id = from_loopback_tcp(peer, stream.local_addr().unwrap()).unwrap();
        child.kill().ok();
        child.wait().ok();
        assert_eq!(id.pid, Some(child.id() as i32));
        assert_eq!(id.uid, nix::unistd::getuid().as_raw());
        assert!(id.exe.as_ref().is_some_and(|e| ["sleep", "bash"]
            .iter()
            .any(|n| e.path().to_string_lossy().contains(n))));
        assert!(id.exe.as_ref().and_then(Executable::credential).is_none());
    }
}
