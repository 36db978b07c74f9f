// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * Transparent interception of PostgreSQL connections.
 *
 *   cgroup/connect4|6     record who connects where, rewrite the destination to pgiam
 *   sockops               publish the record under the app socket's address; join SOCKHASH
 *   cgroup/getpeername4|6 the application sees the destination it asked for
 *   sk_msg                bytes between the app socket and pgiam's socket skip TCP/IP
 *   sk_skb/stream_verdict pass-through: keeps FIONREAD and wake-ups right on redirected sockets
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#include "pgiam.h"

#define SYS_PROCEED 1
#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#define SOCK_STREAM 1

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/*
 * The kernel types the caller's executable is read through, with only the fields read.
 * preserve_access_index makes every access a CO-RE relocation, resolved against the running
 * kernel's BTF when the object is loaded: no vmlinux.h, and no build-time tie to the build
 * host's kernel. Read only when user space sets PGIAM_F_EXE (it does when the kernel has BTF);
 * without BTF the accesses are never executed.
 */
struct super_block {
	__u32 s_dev;
} __attribute__((preserve_access_index));

struct inode {
	unsigned long i_ino;
	struct super_block *i_sb;
} __attribute__((preserve_access_index));

struct file {
	struct inode *f_inode;
} __attribute__((preserve_access_index));

struct mm_struct {
	struct file *exe_file;
} __attribute__((preserve_access_index));

struct task_struct {
	struct mm_struct *mm;
} __attribute__((preserve_access_index));

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pgiam_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pgiam_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pgiam_endpoint_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pgiam_endpoints SEC(".maps");

/* Socket cookie -> origin, for getpeername and sockops. LRU: a record outlives its socket only
 * until space is needed. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct pgiam_origin);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pgiam_origins SEC(".maps");

/* App socket address -> origin; pgiam deletes the entry once it has accepted the connection. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pgiam_peer_key);
	__type(value, struct pgiam_origin);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pgiam_peers SEC(".maps");

/*
 * pgiam's accepted socket (its cookie) -> origin. The record moves here from pgiam_peers during
 * the handshake, so it belongs to exactly the connection that was intercepted: a later
 * connection from the same address and port, even to pgiam's listener directly, never finds it
 * (cookies are never reused while the system runs).
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct pgiam_origin);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pgiam_accepted SEC(".maps");

/*
 * Both ends of every intercepted connection, for the sk_msg fast path. aya's SockHash wants a
 * 4-byte value. A socket leaves on its own: close() unlinks it first thing (sock_map_close),
 * and TCP's move to CLOSE does too (sock_map_unhash: a reset, a timeout). An entry is a socket
 * its owner still holds and may still read: delivering into it is what TCP would do.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct pgiam_sock_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pgiam_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PGIAM_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pgiam_stats SEC(".maps");

/*
 * Context fields allow only 4-byte loads, but clang fuses neighbouring 4-byte loads into one
 * 8-byte load that the verifier rejects ("invalid bpf_context access"): read them one by one.
 */
#define CTX_U32(field) (*(volatile __u32 *)&(field))

static __always_inline void ctx_ip6(__u32 out[4], const __u32 *field)
{
	out[0] = CTX_U32(field[0]);
	out[1] = CTX_U32(field[1]);
	out[2] = CTX_U32(field[2]);
	out[3] = CTX_U32(field[3]);
}

static __always_inline struct pgiam_config *config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&pgiam_config, &zero);
}

static __always_inline void count(__u32 stat)
{
	__u64 *c = bpf_map_lookup_elem(&pgiam_stats, &stat);

	if (c)
		__sync_fetch_and_add(c, 1);
}

static __always_inline void v4_mapped(__u8 addr[16], __u32 ip4)
{
	__builtin_memset(addr, 0, 10);
	addr[10] = 0xff;
	addr[11] = 0xff;
	__builtin_memcpy(&addr[12], &ip4, 4);
}

static __always_inline int is_v4_mapped(const __u32 ip6[4])
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0x0000ffff);
}

/*
 * The executable of the process calling connect(), as the kernel holds it: unlike
 * /proc/<pid>/exe read later, it cannot be swapped by an exec() between connect() and pgiam's
 * accept(). bpf_get_current_task and bpf_probe_read_kernel are base helpers for programs
 * loaded with CAP_PERFMON (which bpf_get_current_comm already needs here). A kernel thread,
 * or a read that fails, leaves exe_ino 0: user space then grants no exe: principal.
 */
static __always_inline void read_exe(struct pgiam_origin *origin)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct inode *inode = BPF_CORE_READ(task, mm, exe_file, f_inode);

	if (!inode)
		return;
	origin->exe_ino = BPF_CORE_READ(inode, i_ino);
	origin->exe_dev = BPF_CORE_READ(inode, i_sb, s_dev);
}

/*
 * Decides whether this connect() is one pgiam takes, and if so records its origin. The caller
 * rewrites the destination.
 */
static __always_inline int take(struct bpf_sock_addr *ctx, const struct pgiam_config *cfg,
				const __u8 addr[16], __u32 user_port)
{
	struct pgiam_endpoint_key key = {};
	struct pgiam_origin origin = {};
	struct bpf_sock *sk = ctx->sk;
	__u64 pid_tgid, uid_gid, cookie;

	if (ctx->type != SOCK_STREAM || !sk)
		return 0;
	/* pgiam's own upstream connections: never loop back into the proxy. */
	if (sk->mark == cfg->mark)
		return 0;
	if (sk->bound_dev_if && !(cfg->flags & PGIAM_F_BOUND_DEV))
		return 0;
	if (bpf_get_netns_cookie(ctx) != cfg->netns_cookie)
		return 0;

	key.prefixlen = 32 + 128;
	key.port = (__u16)user_port;
	__builtin_memcpy(key.addr, addr, 16);
	if (!bpf_map_lookup_elem(&pgiam_endpoints, &key))
		return 0;

	__builtin_memcpy(origin.addr, addr, 16);
	origin.port = (__u16)user_port;
	origin.family = ctx->family;
	pid_tgid = bpf_get_current_pid_tgid();
	uid_gid = bpf_get_current_uid_gid();
	origin.pid = (__u32)pid_tgid;
	origin.tgid = pid_tgid >> 32;
	origin.uid = (__u32)uid_gid;
	origin.gid = uid_gid >> 32;
	origin.cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(origin.comm, sizeof(origin.comm));
	if (cfg->flags & PGIAM_F_EXE)
		read_exe(&origin);
	cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&pgiam_origins, &cookie, &origin, BPF_ANY))
		return 0;
	count(PGIAM_STAT_CONNECT);
	return 1;
}

SEC("cgroup/connect4")
int pgiam_connect4(struct bpf_sock_addr *ctx)
{
	struct pgiam_config *cfg = config();
	__u8 addr[16];

	if (!cfg || !(cfg->flags & PGIAM_F_ENABLED))
		return SYS_PROCEED;
	v4_mapped(addr, ctx->user_ip4);
	if (take(ctx, cfg, addr, ctx->user_port)) {
		ctx->user_ip4 = cfg->proxy_ip4;
		ctx->user_port = cfg->proxy_port4;
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect6")
int pgiam_connect6(struct bpf_sock_addr *ctx)
{
	struct pgiam_config *cfg = config();
	__u32 ip6[4];
	__u8 addr[16];

	if (!cfg || !(cfg->flags & PGIAM_F_ENABLED))
		return SYS_PROCEED;
	ctx_ip6(ip6, ctx->user_ip6);
	__builtin_memcpy(addr, ip6, 16);
	if (is_v4_mapped(ip6)) {
		/* A dual-stack socket reaching an IPv4 database: send it to the IPv4 listener,
		 * still v4-mapped. */
		if (!take(ctx, cfg, addr, ctx->user_port))
			return SYS_PROCEED;
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = cfg->proxy_ip4;
		ctx->user_port = cfg->proxy_port4;
		return SYS_PROCEED;
	}
	if (!cfg->proxy_port6)
		return SYS_PROCEED;
	if (take(ctx, cfg, addr, ctx->user_port)) {
		ctx->user_ip6[0] = cfg->proxy_ip6[0];
		ctx->user_ip6[1] = cfg->proxy_ip6[1];
		ctx->user_ip6[2] = cfg->proxy_ip6[2];
		ctx->user_ip6[3] = cfg->proxy_ip6[3];
		ctx->user_port = cfg->proxy_port6;
	}
	return SYS_PROCEED;
}

SEC("cgroup/getpeername4")
int pgiam_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct pgiam_origin *o = bpf_map_lookup_elem(&pgiam_origins, &cookie);
	__u32 ip4;

	if (!o)
		return SYS_PROCEED;
	__builtin_memcpy(&ip4, &o->addr[12], 4);
	ctx->user_ip4 = ip4;
	ctx->user_port = o->port;
	count(PGIAM_STAT_GETPEERNAME);
	return SYS_PROCEED;
}

SEC("cgroup/getpeername6")
int pgiam_getpeername6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct pgiam_origin *o = bpf_map_lookup_elem(&pgiam_origins, &cookie);
	__u32 ip6[4];

	if (!o)
		return SYS_PROCEED;
	__builtin_memcpy(ip6, o->addr, 16);
	ctx->user_ip6[0] = ip6[0];
	ctx->user_ip6[1] = ip6[1];
	ctx->user_ip6[2] = ip6[2];
	ctx->user_ip6[3] = ip6[3];
	ctx->user_port = o->port;
	count(PGIAM_STAT_GETPEERNAME);
	return SYS_PROCEED;
}

/* The bpf_sock_ops and sk_msg_md address fields, normalised to 16 bytes. */
static __always_inline void ops_addr(__u8 out[16], __u32 family, __u32 ip4, const __u32 ip6[4])
{
	if (family == AF_INET)
		v4_mapped(out, ip4);
	else
		__builtin_memcpy(out, ip6, 16);
}

/*
 * remote_port is in network order; older kernels put it in the upper 16 bits of the field,
 * newer ones in the lower 16 (the upper half is zero there).
 */
static __always_inline __u32 remote_port_host(__u32 field)
{
	if (field > 0xffff)
		field >>= 16;
	return bpf_ntohs((__u16)field);
}

static __always_inline void sockops_key(struct bpf_sock_ops *skops, struct pgiam_sock_key *key)
{
	__u32 l6[4], r6[4];

	ctx_ip6(l6, skops->local_ip6);
	ctx_ip6(r6, skops->remote_ip6);
	ops_addr(key->local, CTX_U32(skops->family), CTX_U32(skops->local_ip4), l6);
	ops_addr(key->remote, CTX_U32(skops->family), CTX_U32(skops->remote_ip4), r6);
	key->local_port = CTX_U32(skops->local_port);
	key->remote_port = remote_port_host(CTX_U32(skops->remote_port));
}

SEC("sockops")
int pgiam_sockops(struct bpf_sock_ops *skops)
{
	struct pgiam_config *cfg = config();
	struct pgiam_sock_key key = {};
	struct pgiam_peer_key peer = {};
	struct pgiam_origin *o;
	__u64 cookie;

	if (!cfg)
		return SYS_PROCEED;
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		/* The application's socket: publish its origin under its own address, which is
		 * the peer address pgiam's side sees. This runs before the final ACK is sent, so
		 * the record exists when pgiam's side completes the handshake (below). */
		cookie = bpf_get_socket_cookie(skops);
		o = bpf_map_lookup_elem(&pgiam_origins, &cookie);
		if (!o)
			return SYS_PROCEED;
		sockops_key(skops, &key);
		__builtin_memcpy(peer.addr, key.local, 16);
		peer.port = (__u16)key.local_port;
		bpf_map_update_elem(&pgiam_peers, &peer, o, BPF_ANY);
		count(PGIAM_STAT_ESTABLISHED);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		/* pgiam's side of an intercepted connection: bind the record to this socket. Only
		 * sockets of pgiam's own listener qualify. */
		sockops_key(skops, &key);
		if (key.local_port != bpf_ntohs((__u16)cfg->proxy_port4) &&
		    key.local_port != bpf_ntohs((__u16)cfg->proxy_port6))
			return SYS_PROCEED;
		__builtin_memcpy(peer.addr, key.remote, 16);
		peer.port = (__u16)key.remote_port;
		o = bpf_map_lookup_elem(&pgiam_peers, &peer);
		if (!o)
			return SYS_PROCEED;
		cookie = bpf_get_socket_cookie(skops);
		bpf_map_update_elem(&pgiam_accepted, &cookie, o, BPF_ANY);
		bpf_map_delete_elem(&pgiam_peers, &peer);
		break;
	default:
		return SYS_PROCEED;
	}
	/*
	 * Both ends join the SOCKHASH at establishment, before either can have data queued:
	 * a socket's reader takes redirected data before its TCP receive queue, so a socket that
	 * joined with bytes already queued could see them out of order.
	 */
	if (cfg->flags & PGIAM_F_FAST_PATH)
		bpf_sock_hash_update(skops, &pgiam_socks, &key, BPF_NOEXIST);
	return SYS_PROCEED;
}

/*
 * The fast path never fails a send that TCP would take, and never takes one TCP would fail.
 *
 * - Only an ESTABLISHED sender is redirected. In CLOSE_WAIT the other end has sent its FIN (it
 *   half-closed, or closed and is gone); after the sender's own shutdown(SHUT_WR) TCP answers
 *   EPIPE, which tcp_bpf_sendmsg does not check on a redirect. Either way TCP decides.
 *   Switching keeps the byte order: it is one-way (a sender never returns to ESTABLISHED, a
 *   socket never rejoins the SOCKHASH), a redirect is queued on the reader's psock before
 *   send() returns, and bytes that arrive later by TCP join that queue behind it (the
 *   stream_verdict program below).
 * - The other end's presence is decided by bpf_msg_redirect_hash itself, under RCU, so there
 *   is no gap between a check and the redirect. When it finds no socket it returns SK_DROP and
 *   leaves msg->sk_redir NULL; returning that SK_DROP would fail the send with EACCES
 *   (tcp_bpf_send_verdict), but an SK_PASS with no sk_redir is a plain TCP send
 *   (sk_psock_map_verd), which is what the sender would have seen without pgiam: its peer has
 *   closed, so the first write is taken and the reset that answers it fails the next.
 *
 * Left to the kernel: a peer whose close() drops its psock between the helper's lookup and
 * tcp_bpf_sendmsg_redir() makes that one send fail with EPIPE (tcp_bpf.c, "if (!psock)
 * return -EPIPE"); no program can see that window.
 */
SEC("sk_msg")
int pgiam_sk_msg(struct sk_msg_md *msg)
{
	struct pgiam_config *cfg = config();
	struct pgiam_sock_key peer = {};
	struct bpf_sock *sk = msg->sk;
	__u32 l6[4], r6[4];

	if (!cfg || !(cfg->flags & PGIAM_F_FAST_PATH))
		return SK_PASS;
	if (!sk || sk->state != BPF_TCP_ESTABLISHED)
		return SK_PASS;
	ctx_ip6(l6, msg->local_ip6);
	ctx_ip6(r6, msg->remote_ip6);
	/* The other end's key is this end's key reversed. */
	ops_addr(peer.local, CTX_U32(msg->family), CTX_U32(msg->remote_ip4), r6);
	ops_addr(peer.remote, CTX_U32(msg->family), CTX_U32(msg->local_ip4), l6);
	peer.local_port = remote_port_host(CTX_U32(msg->remote_port));
	peer.remote_port = CTX_U32(msg->local_port);
	/* The other end never joined (pgiam outside the attached cgroup, the fast path switched
	 * on mid-connection) or has closed: plain TCP. */
	if (bpf_msg_redirect_hash(msg, &pgiam_socks, &peer, BPF_F_INGRESS) != SK_PASS) {
		count(PGIAM_STAT_FALLBACK);
		return SK_PASS;
	}
	count(PGIAM_STAT_REDIRECT);
	return SK_PASS;
}

SEC("sk_skb/stream_verdict")
int pgiam_stream_verdict(struct __sk_buff *skb)
{
	return SK_PASS;
}
