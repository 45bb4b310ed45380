// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0
//
// dmfabric's XDP program: hand dmfabric frames (EtherType 0x88B5) to the
// AF_XDP socket bound to the receiving queue, pass everything else to the
// kernel stack, so ARP, IPv6 neighbour discovery, SSH and the control
// panel's TCP keep working on the interface the data plane serves.
//
// A 0x88B5 frame is redirected whatever follows its Ethernet header: too
// short or malformed ones reach the socket too, where the receive path
// counts and drops them. A frame without a whole Ethernet header has no
// EtherType and is passed (the stack drops it). A queue with no socket in
// the map passes its frames (bpf_redirect_map's fallback action).
//
// Built by dataplane/build.rs with `clang -target bpf`. Self-contained: the
// few UAPI definitions it needs are spelled out below, so building it needs
// only clang (no kernel or libbpf headers).

typedef unsigned int __u32;

// <linux/bpf.h>
struct xdp_md {
	__u32 data;
	__u32 data_end;
	__u32 data_meta;
	__u32 ingress_ifindex;
	__u32 rx_queue_index;
	__u32 egress_ifindex;
};
enum { XDP_ABORTED = 0, XDP_DROP = 1, XDP_PASS = 2, XDP_TX = 3, XDP_REDIRECT = 4 };
enum { BPF_MAP_TYPE_XSKMAP = 17 };

// <bpf/bpf_helpers.h>
#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name
static long (*bpf_redirect_map)(void *map, __u32 key, unsigned long long flags) = (void *)51;

// <xdp/xdp_helpers.h>: run before libxdp's default priority (50) in a
// dispatcher, and let the next program see what this one passes.
#define XDP_RUN_CONFIG(f) _##f SEC(".xdp_run_config")

#define ETH_HLEN 14
#define ETHERTYPE_DMFABRIC 0x88B5
#define QUEUES 64 // resized at load time to cover the bound queue

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

struct {
	__uint(priority, 20);
	__uint(XDP_PASS, 1);
} XDP_RUN_CONFIG(dmfabric_xsk);

SEC("xdp")
int dmfabric_xsk(struct xdp_md *ctx)
{
	const unsigned char *data = (const unsigned char *)(unsigned long)ctx->data;
	const unsigned char *end = (const unsigned char *)(unsigned long)ctx->data_end;

	if (data + ETH_HLEN > end)
		return XDP_PASS;
	// EtherType, bytes 12..14, network order.
	if (data[12] != (ETHERTYPE_DMFABRIC >> 8) || data[13] != (ETHERTYPE_DMFABRIC & 0xff))
		return XDP_PASS;
	return bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS);
}

char _license[] SEC("license") = "Dual MIT/GPL";
