/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Types shared by pgiam's eBPF programs and user space. pgiam-common/src/lib.rs mirrors every
 * struct here field for field; a test compares both against this object's BTF.
 *
 * Addresses are 16 bytes everywhere: IPv4 is stored v4-mapped (::ffff:a.b.c.d), so one key
 * shape serves connect4, connect6 and dual-stack sockets.
 */
#ifndef PGIAM_H
#define PGIAM_H

#include <linux/types.h>

#define PGIAM_COMM_LEN 16

/* pgiam_config.flags */
#define PGIAM_F_ENABLED   (1U << 0) /* intercept at all (cleared on a fail-open shutdown) */
#define PGIAM_F_FAST_PATH (1U << 1) /* sk_msg socket-to-socket redirect */
#define PGIAM_F_BOUND_DEV (1U << 2) /* also intercept sockets bound to a device */
#define PGIAM_F_EXE       (1U << 3) /* record the caller's executable (the kernel has BTF) */

/* pgiam_stats indexes */
#define PGIAM_STAT_CONNECT      0 /* connect() rewritten to the proxy */
#define PGIAM_STAT_ESTABLISHED  1 /* intercepted connection established, record published */
#define PGIAM_STAT_GETPEERNAME  2 /* getpeername() answered with the original destination */
#define PGIAM_STAT_REDIRECT     3 /* sk_msg messages redirected socket to socket */
#define PGIAM_STAT_FALLBACK     4 /* sk_msg messages sent by TCP: other end not in SOCKHASH */
#define PGIAM_STAT_MAX          8

/* The single entry of the pgiam_config array, written by user space. */
struct pgiam_config {
	__u32 proxy_ip4;     /* network order */
	__u32 proxy_port4;   /* network order in the low 16 bits, as bpf_sock_addr.user_port */
	__u32 proxy_ip6[4];  /* network order; all zero: no IPv6 listener */
	__u32 proxy_port6;   /* like proxy_port4 */
	__u32 mark;          /* SO_MARK of pgiam's own upstream sockets: never intercepted */
	__u32 flags;         /* PGIAM_F_* */
	__u32 _pad;
	__u64 netns_cookie;  /* only sockets of this network namespace are intercepted */
};

/* LPM trie key of an intercepted endpoint: port first, so a prefix always covers it. */
struct pgiam_endpoint_key {
	__u32 prefixlen;     /* 32 (port + pad) + address prefix bits (96 + n for IPv4) */
	__u16 port;          /* network order */
	__u16 _pad;
	__u8 addr[16];
};

/* What the kernel knew about the caller at connect() time. */
struct pgiam_origin {
	__u8 addr[16];       /* original destination */
	__u16 port;          /* original destination port, network order */
	__u16 family;        /* AF_INET or AF_INET6 of the socket */
	__u32 pid;           /* thread that called connect() */
	__u32 tgid;          /* its process */
	__u32 uid;
	__u32 gid;
	__u32 _pad;
	__u64 cgroup_id;     /* cgroup v2 id: the inode of the cgroup directory */
	char comm[PGIAM_COMM_LEN];
	__u64 exe_ino;       /* the caller's executable (mm->exe_file): its inode; 0: not read */
	__u32 exe_dev;       /* and its filesystem's device, kernel encoding (major << 20 | minor) */
	__u32 _pad2;
};

/* The application socket's own address: the peer address pgiam sees on accept(). */
struct pgiam_peer_key {
	__u8 addr[16];
	__u16 port;          /* host order */
	__u16 _pad;
};

/* A SOCKHASH key: one end of a connection, seen from that end. */
struct pgiam_sock_key {
	__u8 local[16];
	__u8 remote[16];
	__u32 local_port;    /* host order */
	__u32 remote_port;   /* host order */
};

#endif /* PGIAM_H */
