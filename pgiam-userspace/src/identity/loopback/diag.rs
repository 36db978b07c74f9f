//! One TCP socket looked up in the kernel's socket diagnostics (sock_diag(7), `inet_diag`):
//! its uid and inode, found by the exact four-tuple in the kernel's socket hash, the cost the
//! same with ten sockets on the host or a hundred thousand.
//!
//! The packets are the rust-netlink project's types; the netlink socket is nix's.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use nix::sys::socket::{self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol};

/// `(uid, inode)` of the socket bound to `peer` and connected to `local`, in pgiam's network
/// namespace. `None`: not found, or no answer to trust (no netlink socket, an error). The
/// caller then reads /proc/net/tcp, which also finds what an exact lookup cannot: a socket
/// bound to a device (the lookup names none), or a kernel whose TCP handler (`tcp_diag`, a
/// module on some kernels) cannot be loaded, which answers as if there were no such socket.
pub fn tcp_socket(peer: SocketAddr, local: SocketAddr) -> Option<(u32, u64)> {
    let netlink = socket::socket(
        AddressFamily::Netlink,
        socket::SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .ok()?;
    // The kernel answers while it handles the request, before `sendto` returns; the timeout
    // only keeps a kernel that does not from holding the login.
    let timeout = nix::sys::time::TimeVal::new(1, 0);
    socket::setsockopt(&netlink, socket::sockopt::ReceiveTimeout, &timeout).ok()?;
    for (family, peer, local) in candidates(peer, local) {
        match ask(&netlink, family, peer, local) {
            Ok(Some(found)) => return Some(found),
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!("sock_diag: {e}; reading /proc/net/tcp instead");
                return None;
            }
        }
    }
    None
}

/// Where the client's socket can be: an IPv4 client's in the IPv4 table, or (a v6 socket
/// that dialled a v4-mapped address) in the v6 one under mapped addresses; a listener on `::`
/// reports an IPv4 peer as v4-mapped, so addresses are first brought to their plain form.
fn candidates(peer: SocketAddr, local: SocketAddr) -> Vec<(u8, SocketAddr, SocketAddr)> {
    let plain = |a: SocketAddr| match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    };
    let mapped = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    let (peer, local) = (plain(peer), plain(local));
    if peer.is_ipv4() && local.is_ipv4() {
        vec![
            (AF_INET, peer, local),
            (AF_INET6, mapped(peer), mapped(local)),
        ]
    } else {
        vec![(AF_INET6, mapped(peer), mapped(local))]
    }
}

/// TCP_LISTEN in the kernel's numbering of TCP states.
const TCP_LISTEN: u8 = 10;

/// One exact request: `Some((uid, inode))`, or `None` when the kernel has no such socket.
fn ask(
    netlink: &OwnedFd,
    family: u8,
    peer: SocketAddr,
    local: SocketAddr,
) -> io::Result<Option<(u32, u64)>> {
    let mut header = NetlinkHeader::default();
    // An exact lookup, not a dump: the kernel looks the four-tuple up in its hash.
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: peer.port(),
                destination_port: local.port(),
                source_address: peer.ip(),
                destination_address: local.ip(),
                interface_id: 0,
                // INET_DIAG_NOCOOKIE: any socket with these addresses.
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    request.finalize();
    let mut out = vec![0u8; request.buffer_len()];
    request.serialize(&mut out);
    socket::sendto(
        std::os::fd::AsRawFd::as_raw_fd(netlink),
        &out,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut answer = [0u8; 4096];
    let n = socket::recv(
        std::os::fd::AsRawFd::as_raw_fd(netlink),
        &mut answer,
        MsgFlags::empty(),
    )?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(&answer[..n])
        .map_err(|e| io::Error::other(format!("undecodable answer: {e}")))?;
    match message.payload {
        // The exact lookup falls back to listening sockets (the kernel's `inet_lookup`): a
        // client gone by now could be answered by a listener on its port. Only the connection
        // itself counts.
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r))
            if r.header.state != TCP_LISTEN
                && r.header.socket_id.source_port == peer.port()
                && r.header.socket_id.destination_port == local.port()
                && r.header.socket_id.source_address == peer.ip()
                && r.header.socket_id.destination_address == local.ip() =>
        {
            Ok(Some((r.header.uid, u64::from(r.header.inode))))
        }
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(_)) => Ok(None),
        NetlinkPayload::Error(e) if e.raw_code() == -libc::ENOENT => Ok(None),
        NetlinkPayload::Error(e) => Err(e.to_io()),
        other => Err(io::Error::other(format!("unexpected answer: {other:?}"))),
    }
}
