//! The identity of a loopback TCP client (no eBPF record of it): the socket the client holds,
//! its uid and inode, then the process holding that inode.
//!
//! The socket is asked of the kernel's socket diagnostics ([`diag`]): one exact lookup of the
//! connection's addresses. /proc/net/tcp, read only when that finds nothing, lists every
//! socket of the host (TIME_WAIT ones included), so that every login walked all of them.

pub mod diag;

use std::net::{IpAddr, SocketAddr};

use super::{Identity, IdentityError, Source};

/// Identity of the local process that owns the TCP socket `peer` connected to our `local`.
///
/// The socket's uid and inode are those of pgiam's own network namespace (a loopback peer can
/// only be there); the pid is the process holding that inode.
pub fn from_loopback_tcp(peer: SocketAddr, local: SocketAddr) -> Result<Identity, IdentityError> {
    let (uid, inode) = find_tcp_socket(peer, local)?;
    let pid = match find_socket_owner(inode, uid) {
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
    let found = match diag::tcp_socket(peer, local) {
        Some(found) => Some(found),
        None => walk_tcp_tables(peer, local)?,
    };
    match found {
        // A socket no process holds any more (its client closed it: FIN_WAIT2, TIME_WAIT)
        // reads uid 0 and inode 0. It is nobody's, least of all root's.
        Some((_, 0)) | None => Err(IdentityError::NoSuchSocket { peer, local }),
        Some(found) => Ok(found),
    }
}

/// The client's socket found by reading /proc/net/tcp{,6} (every socket of the host).
fn walk_tcp_tables(
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<Option<(u32, u64)>, IdentityError> {
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
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
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

/// The process holding socket `inode`, by looking through /proc/*/fd. Several processes can
/// share one socket after fork; any of them answers for it, and they share uid and cgroup in
/// practice. Most of a login's cost is here (a read of every descriptor of the processes looked
/// at), so the likeliest holders go first: the processes that held the last clients' sockets
/// (an application's pool, a script's loop: the same process again and again), then those of
/// the socket's uid (its creator's), then the rest (a process that changed its uid after
/// creating the socket, or was handed it). pgiam itself is looked at last: it holds the
/// client's socket only when it is the client.
fn find_socket_owner(inode: u64, uid: u32) -> Option<Owner> {
    use std::os::unix::fs::MetadataExt;
    let target = format!("socket:[{inode}]");
    let me = std::process::id() as i32;
    let recent = recent_owners().clone();
    for &pid in recent.iter().rev() {
        if holds(pid, &target) {
            remember_owner(pid);
            return Some(Owner::Process(pid));
        }
    }
    let mut others = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me || recent.contains(&pid) {
            continue;
        }
        // (A process that is gone by now holds nothing.)
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if meta.uid() != uid {
            others.push(pid);
        } else if holds(pid, &target) {
            remember_owner(pid);
            return Some(Owner::Process(pid));
        }
    }
    for pid in others {
        if holds(pid, &target) {
            remember_owner(pid);
            return Some(Owner::Process(pid));
        }
    }
    holds(me, &target).then_some(Owner::Pgiam)
}

/// Whether process `pid` has a descriptor for `target` (`socket:[inode]`). Each link is read
/// relative to the open fd directory: one path component resolved per descriptor, not the
/// whole /proc path again. The highest descriptors are read first: a process that opens
/// connection after connection (a pool filling up, pgbench) holds its newest socket at its
/// highest descriptor, so a client with 10,000 connections costs a login one link read, not
/// 10,000 (listing the directory is cheap next to reading its links).
fn holds(pid: i32, target: &str) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(mut dir) = nix::dir::Dir::open(
        format!("/proc/{pid}/fd").as_str(),
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) else {
        return false;
    };
    let fd = dir.as_raw_fd();
    let mut descriptors: Vec<u32> = dir
        .iter()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().ok()?.parse().ok())
        .collect();
    descriptors.sort_unstable_by(|a, b| b.cmp(a));
    descriptors.into_iter().any(|n| {
        nix::fcntl::readlinkat(Some(fd), n.to_string().as_str())
            .is_ok_and(|link| link.as_os_str() == target)
    })
}

/// How many of the last clients' processes are looked at first.
const RECENT_OWNERS: usize = 16;

fn recent_owners() -> std::sync::MutexGuard<'static, std::collections::VecDeque<i32>> {
    static RECENT: std::sync::Mutex<std::collections::VecDeque<i32>> =
        std::sync::Mutex::new(std::collections::VecDeque::new());
    RECENT.lock().unwrap_or_else(|e| e.into_inner())
}

/// Puts `pid` last (the first looked at), forgetting the one looked at least recently.
fn remember_owner(pid: i32) {
    let mut recent = recent_owners();
    recent.retain(|&p| p != pid);
    if recent.len() == RECENT_OWNERS {
        recent.pop_front();
    }
    recent.push_back(pid);
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

#[cfg(test)]
mod tests {
    use super::super::Executable;
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

    /// A client that closed its end before pgiam looked (its socket orphaned in FIN_WAIT2:
    /// inode 0, held by no process) is nobody's: refused, not taken for the uid the kernel
    /// still shows (0 for a TIME_WAIT one) without a process.
    #[test]
    fn a_client_gone_before_the_lookup_is_no_one() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut accepted, peer) = listener.accept().unwrap();
        let local = accepted.local_addr().unwrap();
        drop(client);
        // Its FIN has arrived: pgiam's end reads the end of the stream.
        assert_eq!(accepted.read(&mut [0u8; 1]).unwrap(), 0);
        let asked = diag::tcp_socket(peer, local);
        assert!(matches!(asked, Some((_, 0))), "{asked:?}");
        let looked_up = from_loopback_tcp(peer, local);
        assert!(
            matches!(looked_up, Err(IdentityError::NoSuchSocket { .. })),
            "{looked_up:?}"
        );
    }

    /// The kernel's socket diagnostics and /proc/net/tcp name the same socket, uid and inode:
    /// the lookup a login makes answers from the kernel's socket table, not by walking it.
    #[test]
    fn the_socket_diagnostics_answer_as_the_tcp_table_does() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, peer) = listener.accept().unwrap();
        let local = accepted.local_addr().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let walked = ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .find_map(|path| {
                let table = std::fs::File::open(path).ok()?;
                parse_tcp_table(std::io::BufReader::new(table), peer, local).unwrap()
            })
            .expect("the client's socket in /proc/net/tcp");
        let asked = diag::tcp_socket(peer, local);
        assert_eq!(asked, Some(walked));
        // A connection that does not exist is not found, by either.
        drop((client, accepted));
        let gone: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(diag::tcp_socket(gone, local), None);
        assert!(matches!(
            from_loopback_tcp(gone, local),
            Err(IdentityError::NoSuchSocket { .. })
        ));
    }
}
