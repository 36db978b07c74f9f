//! Who is calling: the kernel's facts about a client process, enriched into principal names.
//!
//! Without eBPF the facts come from the peer socket: SO_PEERCRED for a unix socket, and for a
//! loopback TCP peer the kernel's socket table (its uid and inode) and the process that holds
//! that inode ([`loopback`]). Everything a principal is built from is read from the kernel,
//! never from what the client says about itself.

mod loopback;

pub use loopback::from_loopback_tcp;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read peer credentials: {0}")]
    PeerCred(std::io::Error),
    #[error("no local process holds a socket {peer} -> {local} (the client closed it, or is not on this host)")]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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
}
