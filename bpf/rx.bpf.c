/* Receive path of traced pods: irq -> softirq -> host_rx -> pod_rx -> sock_ready -> app_read.
 *
 * netif_receive_skb runs for every packet on every device; it is the one place that tells host side
 * from pod side. Outside traced namespaces a packet is ours when its destination is a traced pod's IP
 * (one map lookup); inside one, by the namespace inode of its device (one map lookup). The same skb
 * crosses the veth into the pod, so the skb address joins the host and pod sightings. sk_data_ready
 * carries only the socket: the skb is the one this CPU is processing in the pod, or the socket's
 * receive queue tail when TCP processes its backlog later in process context. The read ends the
 * journey: for TCP skb_copy_datagram_iovec names the skb; UDP copies without it, so its packets move to
 * a per-socket queue at sk_data_ready and the n-th datagram read (sock_recv_length) is the n-th queued.
 */
#include "latencytrace.h"

#define LT_MSG_PEEK 2
#define LT_IPPROTO_UDP 17

static __always_inline void lt_rx_start(struct lt_target *t, u32 slot, struct lt_cpu_ctx *c,
                                        struct lt_skb_view *v, struct lt_addrs *addr, u64 key, u32 boundary,
                                        u64 now)
{
    struct lt_flight nf = {};
    nf.addr = *addr;
    nf.slot = slot;
    nf.cpu = bpf_get_smp_processor_id();
    nf.len = v->len;
    if (c->t_softirq) {
        nf.ts[LT_B_RX_IRQ] = c->t_irq;
        nf.ts[LT_B_RX_SOFTIRQ] = c->t_softirq;
    }
    nf.ts[boundary] = now;
    nf.ifindex[boundary == LT_B_RX_HOST_RX ? 0 : 1] = lt_dev_ifindex(v->dev);
    lt_record(t, slot, LT_SEG_RX_IRQ, nf.ts[LT_B_RX_IRQ], nf.ts[LT_B_RX_SOFTIRQ]);
    lt_record(t, slot, LT_SEG_RX_DRIVER, nf.ts[LT_B_RX_SOFTIRQ], now);
    lt_rx_flight.update(&key, &nf);
}

/* Host side: a packet addressed to traced pod `slot`. */
static __always_inline void lt_rx_host(struct lt_cpu_ctx *c, struct lt_skb_view *v, struct lt_addrs *addr, u64 key,
                                       u32 slot)
{
    struct lt_target *t = lt_target(slot);
    if (!t || !lt_wants(t, LT_DIR_RX))
        return;
    u64 now = bpf_ktime_get_ns();
    struct lt_flight *f = lt_rx_flight.lookup(&key);
    if (f) {
        if (!f->ts[LT_B_RX_POD_RX] && now - lt_first(f) < LT_STALE_NS)
            return; /* already seen on an earlier host device (e.g. the NIC before the bridge) */
        lt_count(LT_C_STALE);
    }
    lt_rx_start(t, slot, c, v, addr, key, LT_B_RX_HOST_RX, now);
}

/* Pod side: the packet reached a device inside a traced pod. */
static __always_inline void lt_rx_pod(struct lt_cpu_ctx *c, struct lt_skb_view *v, struct lt_addrs *addr, u64 key,
                                      u32 slot, u32 inum, u64 now)
{
    struct lt_target *t = lt_target(slot);
    if (!t || !lt_wants(t, LT_DIR_RX))
        return;
    struct lt_flight *f = lt_rx_flight.lookup(&key);
    if (f && f->slot == slot && !f->ts[LT_B_RX_SOCK_READY] && now - lt_first(f) < LT_STALE_NS) {
        if (!f->ts[LT_B_RX_POD_RX]) {
            f->ts[LT_B_RX_POD_RX] = now;
            f->ifindex[1] = lt_dev_ifindex(v->dev);
            lt_record(t, slot, LT_SEG_RX_HOST_TO_POD, f->ts[LT_B_RX_HOST_RX], now);
        }
        /* else: a further device inside the pod; the first sighting stands */
    } else {
        if (f)
            lt_count(LT_C_STALE);
        /* No host-side sighting: sent from the host itself, or from an address we do not know. */
        lt_rx_start(t, slot, c, v, addr, key, LT_B_RX_POD_RX, now);
    }
    c->rx_skb = key;
    c->rx_netns = inum;
}

int lt_netif_receive_skb(struct bpf_raw_tracepoint_args *ctx)
{
    void *skb = (void *)ctx->args[0];
    u64 key = (u64)skb;
    struct lt_skb_view v;
    lt_skb_read(skb, &v);
    if (!lt_is_ip(&v))
        return 0;
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c)
        return 0;
    u32 inum;
    s32 slot = lt_dev_slot(c, v.dev, &inum);
    /* At netif_receive_skb the link header is pulled: data points at the network header. */
    struct lt_addrs addr;
    lt_ip_hdr(&v, v.data, &addr);
    struct lt_flight *tf = NULL;
    if (lt_addr_slot(&addr, 0) >= 0)
        tf = lt_tx_flight.lookup(&key); /* only a traced pod's packets can be in transmit flight */
    if (slot >= 0) {
        u64 now = bpf_ktime_get_ns();
        lt_rx_pod(c, &v, &addr, key, slot, inum, now);
        if (tf)
            lt_tx_arrive(c, tf, key, skb, v.dev, slot, now);
        return 0;
    }
    if (tf)
        lt_tx_arrive(c, tf, key, skb, v.dev, -1, bpf_ktime_get_ns());
    s32 dst = lt_addr_slot(&addr, 1); /* host side: is it addressed to a traced pod? */
    if (dst >= 0)
        lt_rx_host(c, &v, &addr, key, dst);
    return 0;
}

/* The end of a received packet's journey: the application read it. */
static __always_inline void lt_rx_read(struct lt_flight *f, void *skb, u64 now)
{
    struct lt_target *t = lt_target(f->slot);
    if (!t || !lt_wants(t, LT_DIR_RX))
        return;
    f->ts[LT_B_RX_APP_READ] = now;
    u64 first = lt_first(f);
    lt_record(t, f->slot, LT_SEG_RX_SOCKET_QUEUE, f->ts[LT_B_RX_SOCK_READY], now);
    lt_record(t, f->slot, LT_SEG_RX_TOTAL, first, now);
    lt_emit(t, f, LT_DIR_RX, 0, now - first, skb, 0);
}

/* UDP: move a readied packet to its socket's queue (see lt_sockq_val). f may be NULL for a packet we
 * did not follow: it still takes a place, so that the reads that follow stay matched. */
static __always_inline void lt_sockq_push(void *sk, struct lt_flight *f, u64 skb)
{
    u64 sk_key = (u64)sk;
    struct lt_sockq_pos *pos = lt_sockq_pos.lookup(&sk_key);
    if (!pos) {
        if (!f)
            return;
        /* First packet of ours on this socket: reads first drain what was queued before it. */
        struct lt_sockq_pos np = {};
        u32 queued = 0, reader = 0;
        bpf_probe_read_kernel(&queued, sizeof(queued), sk + LT_OFF_SK_RXQ_QLEN);
        bpf_probe_read_kernel(&reader, sizeof(reader), sk + LT_OFF_UDP_READER_QLEN);
        np.skip = queued + reader > 0 ? queued + reader - 1 : 0;
        lt_sockq_pos.update(&sk_key, &np);
        pos = lt_sockq_pos.lookup(&sk_key);
        if (!pos)
            return;
    }
    struct lt_sockq_key k = {.sk = sk_key, .seq = pos->tail};
    pos->tail++;
    struct lt_sockq_val val = {};
    if (f) {
        val.f = *f;
        val.skb = skb;
    }
    lt_sockq.update(&k, &val);
}

int lt_sk_data_ready(struct bpf_raw_tracepoint_args *ctx)
{
    void *sk = (void *)ctx->args[0];
    u64 tail = (u64)lt_read_ptr(sk, LT_OFF_SK_RXQ_PREV);
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c)
        return 0;
    if (tail && tail == c->tx_skb) {
        c->tx_skb = 0;
        /* A traced pod's packet delivered to a socket on the host. (If its flight is gone, it went
         * on into another pod, which may be traced too: go on with the receive side.) */
        struct lt_flight *tf = lt_tx_flight.lookup(&tail);
        if (tf) {
            lt_tx_finish(tail, tf, bpf_ktime_get_ns(), (void *)tail);
            return 0;
        }
    }
    u32 inum = lt_sk_netns(sk);
    if (lt_netns_slot(inum) < 0)
        return 0; /* a socket outside traced pods */
    u64 now = bpf_ktime_get_ns();
    u64 key = 0;
    struct lt_flight *f = NULL;
    if (tail && tail == c->rx_skb) {
        key = tail;
    } else {
        struct lt_flight *tf = tail ? lt_rx_flight.lookup(&tail) : NULL;
        if (tf && tf->ts[LT_B_RX_POD_RX] && !tf->ts[LT_B_RX_SOCK_READY])
            key = tail; /* TCP processing its backlog in process context */
        else if (c->rx_skb && inum == c->rx_netns)
            key = c->rx_skb; /* TCP coalesced this CPU's skb into the tail of the queue */
    }
    if (key)
        f = lt_rx_flight.lookup(&key);
    if (key == c->rx_skb)
        c->rx_skb = 0;
    u16 protocol = 0;
    bpf_probe_read_kernel(&protocol, sizeof(protocol), sk + LT_OFF_SK_PROTOCOL);
    if (!f || !f->ts[LT_B_RX_POD_RX] || f->ts[LT_B_RX_SOCK_READY]) {
        if (protocol == LT_IPPROTO_UDP && tail)
            lt_sockq_push(sk, NULL, tail); /* keeps this socket's reads matched, if we follow it */
        return 0;
    }
    f->ts[LT_B_RX_SOCK_READY] = now;
    struct lt_target *t = lt_target(f->slot);
    if (t && lt_wants(t, LT_DIR_RX))
        lt_record(t, f->slot, LT_SEG_RX_POD_STACK, f->ts[LT_B_RX_POD_RX], now);
    if (protocol == LT_IPPROTO_UDP) {
        lt_sockq_push(sk, f, key);
        lt_rx_flight.delete(&key);
    } else if (key != tail) {
        lt_rx_flight.delete(&key); /* its data will be read through the tail skb */
    }
    return 0;
}

/* TCP reads name the skb they copy from. */
int lt_skb_copy_datagram_iovec(struct bpf_raw_tracepoint_args *ctx)
{
    void *skb = (void *)ctx->args[0];
    u64 key = (u64)skb;
    struct lt_flight *f = lt_rx_flight.lookup(&key);
    if (!f)
        return 0;
    if (f->ts[LT_B_RX_SOCK_READY])
        lt_rx_read(f, skb, bpf_ktime_get_ns());
    lt_rx_flight.delete(&key);
    return 0;
}

/* UDP reads: one datagram per successful, non-peeking recvmsg. */
int lt_sock_recv_length(struct bpf_raw_tracepoint_args *ctx)
{
    u64 sk_key = ctx->args[0];
    if ((int)ctx->args[1] < 0 || ((int)ctx->args[2] & LT_MSG_PEEK))
        return 0;
    u32 inum = lt_sk_netns((void *)sk_key);
    if (lt_netns_slot(inum) < 0)
        return 0; /* a socket outside traced pods */
    struct lt_sockq_pos *pos = lt_sockq_pos.lookup(&sk_key);
    if (!pos)
        return 0;
    if (pos->skip) {
        pos->skip--;
        return 0;
    }
    if (pos->head >= pos->tail)
        return 0;
    struct lt_sockq_key k = {.sk = sk_key, .seq = pos->head};
    pos->head++;
    struct lt_sockq_val *val = lt_sockq.lookup(&k);
    if (!val)
        return 0;
    if (val->f.ts[LT_B_RX_SOCK_READY])
        lt_rx_read(&val->f, (void *)val->skb, bpf_ktime_get_ns());
    lt_sockq.delete(&k);
    return 0;
}
