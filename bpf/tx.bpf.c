/* Transmit path of traced pods: app_send -> pod_dev_queue -> host_rx -> egress_queue -> egress_xmit -> done.
 *
 * The skb that TCP builds at sendmsg time is not the one transmitted (TCP transmits clones), so the
 * start of a send is kept per socket (tcp_sendmsg_locked) and per thread (send syscalls, for UDP and
 * raw sockets) and joined to the skb at its first net_dev_queue inside the pod; from there on the skb
 * address is the key. The host side arrival is handled in rx.bpf.c's netif_receive_skb program, which
 * calls lt_tx_arrive(), and local delivery in its sk_data_ready program.
 */
#include "latencytrace.h"

static __always_inline void lt_tx_finish(u64 key, struct lt_flight *f, u64 done, void *skb)
{
    struct lt_target *t = lt_target(f->slot);
    if (t && lt_wants(t, LT_DIR_TX)) {
        f->ts[LT_B_TX_DONE] = done;
        if (f->flags & LT_F_EGRESS_HOST) {
            lt_record(t, f->slot, LT_SEG_TX_QDISC, f->ts[LT_B_TX_EGRESS_QUEUE], f->ts[LT_B_TX_EGRESS_XMIT]);
            lt_record(t, f->slot, LT_SEG_TX_DRIVER, f->ts[LT_B_TX_EGRESS_XMIT], done);
        }
        u64 first = lt_first(f);
        lt_record(t, f->slot, LT_SEG_TX_TOTAL, first, done);
        lt_emit(t, f, LT_DIR_TX, 0, done - first, skb, 0);
    }
    lt_tx_flight.delete(&key);
}

/* The skb of a traced pod shows up in netif_receive_skb outside the pod (slot_here: the traced
 * namespace it arrived in, or -1 for an untraced one such as the host's). */
static __always_inline void lt_tx_arrive(struct lt_cpu_ctx *c, struct lt_flight *f, u64 key, void *skb,
                                         void *dev, s64 slot_here, u64 now)
{
    if (f->flags & LT_F_XMITTED) {
        /* Transmitted by a host device into another namespace (veth to another pod): the driver's
         * return was the completion. */
        lt_tx_finish(key, f, f->ts[LT_B_TX_DONE], skb);
        return;
    }
    if (slot_here == f->slot)
        return; /* still inside the sending pod */
    if (!f->ts[LT_B_TX_HOST_RX]) {
        f->ts[LT_B_TX_HOST_RX] = now;
        f->ifindex[1] = lt_dev_ifindex(dev);
        struct lt_target *t = lt_target(f->slot);
        if (t && lt_wants(t, LT_DIR_TX))
            lt_record(t, f->slot, LT_SEG_TX_POD_TO_HOST, f->ts[LT_B_TX_POD_DEV_QUEUE], now);
    }
    c->tx_skb = key;
}

/* Send syscalls of threads inside traced pods. raw_syscalls:sys_enter runs for every syscall of the
 * machine, so the syscall number is the first test (write and writev included: connected UDP sockets
 * are often written to, and a classic tracepoint per syscall would cost every syscall as much). */
int lt_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
    long id = (long)ctx->args[1];
    if (id != LT_NR_SENDTO && id != LT_NR_SENDMSG && id != LT_NR_SENDMMSG && id != LT_NR_WRITE && id != LT_NR_WRITEV)
        return 0;
    void *task = (void *)bpf_get_current_task();
    void *nsproxy = lt_read_ptr(task, LT_OFF_TASK_NSPROXY);
    u32 inum = lt_net_inum(lt_read_ptr(nsproxy, LT_OFF_NSPROXY_NET));
    if (lt_netns_slot(inum) < 0)
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 now = bpf_ktime_get_ns();
    lt_tx_thread.update(&tid, &now);
    return 0;
}

int lt_tcp_sendmsg_locked(struct bpf_raw_tracepoint_args *ctx)
{
    void *sk = (void *)ctx->args[0];
    u32 inum = lt_sk_netns(sk);
    if (lt_netns_slot(inum) < 0)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 start = now;
    u64 *st = lt_tx_thread.lookup(&tid);
    if (st) {
        if (now - *st < LT_STALE_NS)
            start = *st;
        lt_tx_thread.delete(&tid);
    }
    u64 key = (u64)sk;
    /* Called once per skb the send fills: keep the earliest pending start. */
    lt_tx_sock.insert(&key, &start);
    return 0;
}

static __always_inline u64 lt_send_start(void *sk, u64 now)
{
    u64 start = 0;
    if (sk) {
        u64 sk_key = (u64)sk;
        u64 *st = lt_tx_sock.lookup(&sk_key);
        if (st) {
            start = *st;
            lt_tx_sock.delete(&sk_key);
            return start;
        }
        /* A TCP skb without a pending send is a retransmit or ACK-clocked data sent from softirq,
         * where the current thread says nothing about it. */
        u16 protocol = 0;
        bpf_probe_read_kernel(&protocol, sizeof(protocol), sk + LT_OFF_SK_PROTOCOL);
        if (protocol == 6)
            return 0;
    }
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 *st = lt_tx_thread.lookup(&tid);
    if (st) {
        if (now - *st < LT_STALE_NS)
            start = *st;
        lt_tx_thread.delete(&tid);
    }
    return start;
}

int lt_net_dev_queue(struct bpf_raw_tracepoint_args *ctx)
{
    void *skb = (void *)ctx->args[0];
    u64 key = (u64)skb;
    struct lt_skb_view v;
    lt_skb_read(skb, &v);
    void *dev = v.dev;
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c)
        return 0;
    u32 inum;
    s32 slot = lt_dev_slot(c, dev, &inum);
    if (slot < 0) {
        /* Outside traced pods only a traced pod's packets can be in flight. */
        struct lt_addrs addr;
        lt_ip_hdr(&v, v.head + v.network_header, &addr);
        if (lt_addr_slot(&addr, 0) < 0)
            return 0;
    }
    u64 now = bpf_ktime_get_ns();
    struct lt_flight *f = lt_tx_flight.lookup(&key);
    if (f && !(f->flags & LT_F_XMITTED) && now - lt_first(f) < LT_STALE_NS) {
        /* A further device on its way out; the last one is the egress device. */
        f->ts[LT_B_TX_EGRESS_QUEUE] = now;
        if (f->ts[LT_B_TX_HOST_RX]) {
            f->flags |= LT_F_EGRESS_HOST;
            f->ifindex[2] = lt_dev_ifindex(dev);
        }
        return 0;
    }
    if (slot < 0)
        return 0;
    struct lt_target *t = lt_target(slot);
    if (!t || !lt_wants(t, LT_DIR_TX))
        return 0;
    u32 ifindex = lt_dev_ifindex(dev);
    if (ifindex == 1)
        return 0; /* the pod's loopback: traffic that never leaves the pod */
    if (f)
        lt_count(LT_C_STALE);
    struct lt_flight nf = {};
    nf.slot = slot;
    nf.cpu = bpf_get_smp_processor_id();
    nf.len = v.len;
    nf.ifindex[0] = ifindex;
    nf.ts[LT_B_TX_APP_SEND] = lt_send_start(v.sk, now);
    nf.ts[LT_B_TX_POD_DEV_QUEUE] = now;
    nf.ts[LT_B_TX_EGRESS_QUEUE] = now;
    lt_record(t, slot, LT_SEG_TX_APP_TO_DEV, nf.ts[LT_B_TX_APP_SEND], now);
    lt_tx_flight.update(&key, &nf);
    return 0;
}

int lt_net_dev_start_xmit(struct bpf_raw_tracepoint_args *ctx)
{
    u64 key = (u64)ctx->args[0];
    struct lt_flight *f = lt_tx_flight.lookup(&key);
    if (f)
        f->ts[LT_B_TX_EGRESS_XMIT] = bpf_ktime_get_ns();
    return 0;
}

int lt_net_dev_xmit(struct bpf_raw_tracepoint_args *ctx)
{
    u64 key = (u64)ctx->args[0];
    struct lt_flight *f = lt_tx_flight.lookup(&key);
    if (!f || !(f->flags & LT_F_EGRESS_HOST) || (int)ctx->args[1] != 0)
        return 0;
    /* The driver took it. A physical NIC completes it later (consume_skb); a veth hands it to the
     * peer namespace, where netif_receive_skb finishes the flight with this time. */
    f->ts[LT_B_TX_DONE] = bpf_ktime_get_ns();
    f->flags |= LT_F_XMITTED;
    return 0;
}

int lt_consume_skb(struct bpf_raw_tracepoint_args *ctx)
{
    void *skb = (void *)ctx->args[0];
    u64 key = (u64)skb;
    struct lt_flight *f = lt_tx_flight.lookup(&key);
    if (!f)
        return 0;
    if (f->flags & LT_F_XMITTED)
        lt_tx_finish(key, f, bpf_ktime_get_ns(), skb);
    else
        lt_tx_flight.delete(&key);
    return 0;
}
