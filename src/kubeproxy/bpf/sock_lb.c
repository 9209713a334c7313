// SPDX-License-Identifier: GPL-2.0
/* Socket-level load balancing for kubeproxy's ebpf mode (Cilium's "socket LB").
 *
 * Theory of operation: cgroup programs run when a process in the attached cgroup calls
 * connect() / sendmsg() / recvmsg() / getpeername() on an IPv4 or IPv6 socket. connect
 * and sendmsg look the destination up in the service map; a hit has its destination
 * rewritten to one backend before any packet exists, so no per-packet NAT happens.
 * The kernel maps are in Cilium's layout (see render/ebpf.py, which packs them):
 *
 *   kp_svcN   (frontend addr, port, proto, slot) -> slot 0: count, flags, rev-NAT index,
 *             affinity timeout; slots 1..count: a backend id
 *   kp_beN    backend id -> backend addr, port
 *   kp_rnatN  rev-NAT index -> the frontend (to answer recvmsg / getpeername)
 *   kp_sknatN LRU (socket cookie, backend addr, port) -> frontend, written here
 *   kp_aff    LRU (client netns cookie, rev-NAT index) -> backend id, last use (ClientIP)
 *   kp_rr     rev-NAT index -> round-robin counter
 *
 * The backend lists are the node view's decision; nothing here re-decides policy. A
 * service that must refuse (no endpoints) fails connect()/sendmsg() with ECONNREFUSED
 * via bpf_set_retval (Linux >= 5.18); one whose traffic policy drops is left alone for
 * the nftables rules to drop.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#define ECONNREFUSED 111
#define MAX_BACKENDS 65536
#define NSEC_PER_SEC 1000000000ULL

#define F_AFFINITY 0x01   /* ClientIP session affinity, timeout in slot 0's backend_id */
#define F_ROUND_ROBIN 0x02 /* pick slots in turn (per-service counter), else at random */
#define F_REJECT 0x04     /* no usable endpoints: refuse with ECONNREFUSED */
#define F_PASS 0x08       /* policy drop: leave the socket to the nftables rules */

struct svc4_key { __be32 addr; __be16 port; __u16 slot; __u8 proto; __u8 pad[3]; };
struct svc6_key { __be32 addr[4]; __be16 port; __u16 slot; __u8 proto; __u8 pad[3]; };
struct svc_val { __u32 backend_id; __u16 count; __u16 rev_nat; __u8 flags; __u8 pad[3]; };
struct be4 { __be32 addr; __be16 port; __u8 proto; __u8 flags; };
struct be6 { __be32 addr[4]; __be16 port; __u8 proto; __u8 flags; };
struct rnat4 { __be32 addr; __be16 port; __u16 rev_nat; };
struct rnat6 { __be32 addr[4]; __be16 port; __u16 rev_nat; };
struct sknat4_key { __u64 cookie; __be32 addr; __be16 port; __u16 pad; };
struct sknat6_key { __u64 cookie; __be32 addr[4]; __be16 port; __u16 pad; };
struct aff_key { __u64 client; __u32 rev_nat; __u32 pad; };
struct aff_val { __u32 backend_id; __u32 pad; __u64 last_used; };

#define MAP(name_, type_, key_, val_, max_)                                          \
	struct {                                                                     \
		__uint(type, type_);                                                 \
		__type(key, key_);                                                   \
		__type(value, val_);                                                 \
		__uint(max_entries, max_);                                           \
		__uint(pinning, LIBBPF_PIN_BY_NAME);                                 \
	} name_ SEC(".maps")

MAP(kp_svc4, BPF_MAP_TYPE_HASH, struct svc4_key, struct svc_val, 1 << 20);
MAP(kp_svc6, BPF_MAP_TYPE_HASH, struct svc6_key, struct svc_val, 1 << 20);
MAP(kp_be4, BPF_MAP_TYPE_HASH, __u32, struct be4, 1 << 20);
MAP(kp_be6, BPF_MAP_TYPE_HASH, __u32, struct be6, 1 << 20);
MAP(kp_rnat4, BPF_MAP_TYPE_HASH, __u32, struct rnat4, MAX_BACKENDS);
MAP(kp_rnat6, BPF_MAP_TYPE_HASH, __u32, struct rnat6, MAX_BACKENDS);
MAP(kp_sknat4, BPF_MAP_TYPE_LRU_HASH, struct sknat4_key, struct rnat4, 1 << 18);
MAP(kp_sknat6, BPF_MAP_TYPE_LRU_HASH, struct sknat6_key, struct rnat6, 1 << 18);
MAP(kp_aff, BPF_MAP_TYPE_LRU_HASH, struct aff_key, struct aff_val, 1 << 18);
MAP(kp_rr, BPF_MAP_TYPE_ARRAY, __u32, __u32, MAX_BACKENDS);

/* Which backend id serves this connection, or 0 (leave the socket alone). */
static __always_inline __u32 pick(void *ctx, const struct svc_val *svc, void *svc_map,
				  void *key, __u16 *slot, void *be_map)
{
	struct aff_key akey = { .client = bpf_get_netns_cookie(ctx), .rev_nat = svc->rev_nat };
	__u64 now = bpf_ktime_get_ns();
	struct svc_val *chosen;
	__u32 n;

	if (svc->flags & F_AFFINITY) {
		struct aff_val *a = bpf_map_lookup_elem(&kp_aff, &akey);
		/* A remembered backend counts only while it is still a backend. */
		if (a && now - a->last_used <= (__u64)svc->backend_id * NSEC_PER_SEC &&
		    bpf_map_lookup_elem(be_map, &a->backend_id)) {
			a->last_used = now;
			return a->backend_id;
		}
	}
	if (svc->flags & F_ROUND_ROBIN) {
		__u32 idx = svc->rev_nat;
		__u32 *counter = bpf_map_lookup_elem(&kp_rr, &idx);
		n = counter ? __sync_fetch_and_add(counter, 1) : bpf_get_prandom_u32();
	} else {
		n = bpf_get_prandom_u32();
	}
	*slot = (n % svc->count) + 1;
	chosen = bpf_map_lookup_elem(svc_map, key);
	if (!chosen)
		return 0;
	if (svc->flags & F_AFFINITY) {
		struct aff_val v = { .backend_id = chosen->backend_id, .last_used = now };
		bpf_map_update_elem(&kp_aff, &akey, &v, BPF_ANY);
	}
	return chosen->backend_id;
}

static __always_inline int xlate4(struct bpf_sock_addr *ctx)
{
	struct svc4_key key = { .addr = ctx->user_ip4, .port = (__be16)ctx->user_port,
				.proto = (__u8)ctx->protocol };
	struct svc_val *svc = bpf_map_lookup_elem(&kp_svc4, &key);
	struct be4 *be;
	__u32 id;

	if (!svc || (svc->flags & F_PASS))
		return 1;
	if ((svc->flags & F_REJECT) || svc->count == 0) {
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	struct svc_val master = *svc;
	id = pick(ctx, &master, &kp_svc4, &key, &key.slot, &kp_be4);
	be = id ? bpf_map_lookup_elem(&kp_be4, &id) : 0;
	if (!be)
		return 1;
	struct sknat4_key sk = { .cookie = bpf_get_socket_cookie(ctx), .addr = be->addr,
				 .port = be->port };
	struct rnat4 front = { .addr = ctx->user_ip4, .port = (__be16)ctx->user_port,
			       .rev_nat = master.rev_nat };
	bpf_map_update_elem(&kp_sknat4, &sk, &front, BPF_ANY);
	ctx->user_ip4 = be->addr;
	ctx->user_port = be->port;
	return 1;
}

static __always_inline void rev4(struct bpf_sock_addr *ctx)
{
	struct sknat4_key sk = { .cookie = bpf_get_socket_cookie(ctx), .addr = ctx->user_ip4,
				 .port = (__be16)ctx->user_port };
	struct rnat4 *front = bpf_map_lookup_elem(&kp_sknat4, &sk);
	struct rnat4 *now;
	__u32 idx;

	if (!front)
		return;
	idx = front->rev_nat;
	now = bpf_map_lookup_elem(&kp_rnat4, &idx);
	/* The service may be gone or its index reused: answer only for the same frontend. */
	if (!now || now->addr != front->addr || now->port != front->port) {
		bpf_map_delete_elem(&kp_sknat4, &sk);
		return;
	}
	ctx->user_ip4 = front->addr;
	ctx->user_port = front->port;
}

static __always_inline int xlate6(struct bpf_sock_addr *ctx)
{
	struct svc6_key key = { .port = (__be16)ctx->user_port, .proto = (__u8)ctx->protocol };
	struct svc_val *svc;
	struct be6 *be;
	__u32 id;

	key.addr[0] = ctx->user_ip6[0];
	key.addr[1] = ctx->user_ip6[1];
	key.addr[2] = ctx->user_ip6[2];
	key.addr[3] = ctx->user_ip6[3];
	svc = bpf_map_lookup_elem(&kp_svc6, &key);
	if (!svc || (svc->flags & F_PASS))
		return 1;
	if ((svc->flags & F_REJECT) || svc->count == 0) {
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	struct svc_val master = *svc;
	id = pick(ctx, &master, &kp_svc6, &key, &key.slot, &kp_be6);
	be = id ? bpf_map_lookup_elem(&kp_be6, &id) : 0;
	if (!be)
		return 1;
	struct sknat6_key sk = { .cookie = bpf_get_socket_cookie(ctx), .port = be->port };
	struct rnat6 front = { .port = (__be16)ctx->user_port, .rev_nat = master.rev_nat };
	for (int i = 0; i < 4; i++) {
		sk.addr[i] = be->addr[i];
		front.addr[i] = key.addr[i];
	}
	bpf_map_update_elem(&kp_sknat6, &sk, &front, BPF_ANY);
	ctx->user_ip6[0] = be->addr[0];
	ctx->user_ip6[1] = be->addr[1];
	ctx->user_ip6[2] = be->addr[2];
	ctx->user_ip6[3] = be->addr[3];
	ctx->user_port = be->port;
	return 1;
}

static __always_inline void rev6(struct bpf_sock_addr *ctx)
{
	struct sknat6_key sk = { .cookie = bpf_get_socket_cookie(ctx),
				 .port = (__be16)ctx->user_port };
	struct rnat6 *front, *now;
	__u32 idx;

	sk.addr[0] = ctx->user_ip6[0];
	sk.addr[1] = ctx->user_ip6[1];
	sk.addr[2] = ctx->user_ip6[2];
	sk.addr[3] = ctx->user_ip6[3];
	front = bpf_map_lookup_elem(&kp_sknat6, &sk);
	if (!front)
		return;
	idx = front->rev_nat;
	now = bpf_map_lookup_elem(&kp_rnat6, &idx);
	if (!now || now->port != front->port || now->addr[0] != front->addr[0] ||
	    now->addr[1] != front->addr[1] || now->addr[2] != front->addr[2] ||
	    now->addr[3] != front->addr[3]) {
		bpf_map_delete_elem(&kp_sknat6, &sk);
		return;
	}
	ctx->user_ip6[0] = front->addr[0];
	ctx->user_ip6[1] = front->addr[1];
	ctx->user_ip6[2] = front->addr[2];
	ctx->user_ip6[3] = front->addr[3];
	ctx->user_port = front->port;
}

SEC("cgroup/connect4") int kp_connect4(struct bpf_sock_addr *ctx) { return xlate4(ctx); }
SEC("cgroup/sendmsg4") int kp_sendmsg4(struct bpf_sock_addr *ctx) { return xlate4(ctx); }
SEC("cgroup/recvmsg4") int kp_recvmsg4(struct bpf_sock_addr *ctx) { rev4(ctx); return 1; }
SEC("cgroup/getpeername4")
int kp_getpeername4(struct bpf_sock_addr *ctx) { rev4(ctx); return 1; }
SEC("cgroup/connect6") int kp_connect6(struct bpf_sock_addr *ctx) { return xlate6(ctx); }
SEC("cgroup/sendmsg6") int kp_sendmsg6(struct bpf_sock_addr *ctx) { return xlate6(ctx); }
SEC("cgroup/recvmsg6") int kp_recvmsg6(struct bpf_sock_addr *ctx) { rev6(ctx); return 1; }
SEC("cgroup/getpeername6")
int kp_getpeername6(struct bpf_sock_addr *ctx) { rev6(ctx); return 1; }

char LICENSE[] SEC("license") = "GPL";
