/* Transmit path of traced pods: app_send -> pod_dev_queue -> host_rx -> egress_queue -> egress_xmit -> done.
 *
 * The skb that TCP builds at sendmsg time is not the one transmitted (TCP transmits clones), so the
 * start of a send is kept in per-CPU slots, per socket (tcp_sendmsg_locked) and per thread (send
 * syscalls, for UDP and raw sockets), and joined to the skb at its first net_dev_queue inside the pod,
 * which runs on the same CPU in the same syscall; from there on the skb address is the key. The host
 * side arrival is handled in rx.bpf.c's netif_receive_skb program and local delivery in its
 * sk_data_ready program, with the helpers in latencytrace.h. The host side of net_dev_queue also starts
 * the receive flight of a packet the host itself sends into a traced pod, and of one it forwards into a
 * traced pod after de-NATing it, from an uplink or from another pod to a Service (lt_record_host_queue).
 */
#include "latencytrace.h"

/* Send syscalls of threads inside traced pods. raw_syscalls:sys_enter runs for every syscall of the
 * machine, so the syscall number is the first test (write and writev included: connected UDP sockets
 * are often written to, and a classic tracepoint per syscall would cost every syscall as much). */
int lt_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
    long id = (long)ctx->args[1];
    if (id != LT_NR_SENDTO && id != LT_NR_SENDMSG && id != LT_NR_SENDMMSG && id != LT_NR_WRITE && id != LT_NR_WRITEV)
        return 0;
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c)
        return 0;
    void *nsproxy = lt_read_ptr(LT_CURRENT_TASK(), LT_OFF_TASK_NSPROXY);
    if (lt_filter_net(c, lt_read_ptr(nsproxy, LT_OFF_NSPROXY_NET)) < 0)
        return 0;
    c->send_tid = (u32)bpf_get_current_pid_tgid();
    c->send_ts = bpf_ktime_get_ns();
    return 0;
}

/* Called once per skb a TCP send fills: the socket's pending send starts at this thread's send
 * syscall if one is pending (a new send), else at the earliest call for the same socket. */
int lt_tcp_sendmsg_locked(struct bpf_raw_tracepoint_args *ctx)
{
    void *sk = (void *)ctx->args[0];
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c || lt_filter_sock(c, sk) < 0)
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    if (c->send_ts && c->send_tid == tid) {
        c->sock_ts = c->send_ts; /* (no clock here: lt_send_start, which has it, drops a stale one) */
        c->send_sk = (u64)sk;
        c->send_ts = 0;
    } else if (c->send_sk != (u64)sk || !c->sock_ts) {
        c->sock_ts = bpf_ktime_get_ns();
        c->send_sk = (u64)sk;
    }
    return 0;
}

/* The start of the send that produced a skb queued on the pod's device by this CPU, 0 if unknown. */
static __always_inline u64 lt_send_start(struct lt_cpu_ctx *c, void *sk, u64 now)
{
    u64 start = 0;
    if (sk && c->sock_ts && c->send_sk == (u64)sk) {
        start = c->sock_ts;
        c->sock_ts = 0;
        /* (a syscall's start long gone: a write() to a file, then a sendfile() of the socket) */
        return lt_within(now, start, LT_STALE_NS) ? start : 0;
    }
    if (!c->send_ts || c->send_tid != (u32)bpf_get_current_pid_tgid())
        return 0;
    if (sk) {
        /* A TCP skb without a pending send is a retransmit or ACK-clocked data sent from softirq,
         * where the current thread says nothing about it. */
        if (lt_ld16(sk, LT_OFF_SK_PROTOCOL) == LT_IPPROTO_TCP)
            return 0;
    }
    start = c->send_ts;
    c->send_ts = 0;
    return lt_within(now, start, LT_STALE_NS) ? start : 0;
}

/* record: a traced pod's packet queued on a further device (its last one is the egress device). */
static __always_inline void lt_record_egress_queue(struct lt_flight *f, u32 ifindex, u64 now)
{
    f->ts[LT_B_TX_EGRESS_QUEUE] = now;
    if (f->ts[LT_B_TX_HOST_RX]) {
        f->flags |= LT_F_EGRESS_HOST;
        f->ifindex[2] = ifindex;
    }
}

/* record: a packet of traced pod `slot` queued on the pod's own device: a new transmit flight. */
static __always_inline void lt_record_pod_dev_queue(struct lt_cpu_ctx *c, struct lt_target *t, u32 slot,
                                                    struct lt_skb_view *v, u64 key, u32 ifindex, u64 age)
{
    int timed = lt_count_packet(c, t, slot, LT_DIR_TX);
    u64 now = timed ? lt_clock(c, age) : age;
    u64 start = lt_send_start(c, v->sk, now); /* taken either way: a pending start belongs to this packet */
    struct lt_flight *f = lt_flight_new(LT_DIR_TX, key, v, slot, now);
    if (!f)
        return;
    f->ts[LT_B_TX_POD_DEV_QUEUE] = now;
    f->ts[LT_B_TX_EGRESS_QUEUE] = now;
    f->ifindex[0] = ifindex; /* (untimed too: lt_filter_further_dev) */
    if (!timed) {
        f->flags = LT_F_UNTIMED;
        return;
    }
    f->cpu = bpf_get_smp_processor_id();
    f->len = v->len;
    f->ts[LT_B_TX_APP_SEND] = start;
    lt_record(t, slot, LT_SEG_TX_APP_TO_DEV, f->ts[LT_B_TX_APP_SEND], now);
}

/* record: the host queues a packet on one of its devices toward a traced pod, and this is the first
 * place the host sees it addressed to that pod (its host-side boundary), either because
 * - the host's own stack sent it (iif 0: hostNetwork pods, the kubelet's probes, node-local DNS): it
 *   never passes netif_receive_skb on the host (irq 0: the NET_RX run it may be sent from is another
 *   packet's); or
 * - it came in on an uplink addressed to the node and conntrack rewrote its destination to the pod's
 *   (the reply to a pod's connection masqueraded behind the node's address, a NodePort or Service
 *   DNAT) in PREROUTING, after netif_receive_skb: this is the forward from that same NET_RX run, whose
 *   times are its irq and softirq boundaries (irq 1); or
 * - it came from another pod on this node to a Service's virtual IP, which the node's DNAT (kube-proxy)
 *   rewrote to the pod's: it has no flight when the host queues it on the pod's own veth (irq 1).
 * A packet that was already addressed to the pod at netif_receive_skb has its flight and keeps it. */
static __always_inline void lt_record_host_queue(struct lt_cpu_ctx *c, struct lt_skb_view *v, u64 key,
                                                 u32 ifindex, u8 irq)
{
    if (v->network_header == 0xffff)
        return;
    struct lt_addrs addr;
    u8 tcpf;
    if (lt_ip_hdr(v, v->head + v->network_header, &addr, &tcpf) < 0)
        return;
    s32 dst = lt_addr_slot(&addr, 1);
    if (dst >= 0)
        lt_record_host_rx(c, v, &addr, tcpf, key, ifindex, dst, irq);
}

/* filter: transmit flight f, found at its skb's address with another data buffer where the host queues it,
 * is still its packet's: a later fragment whose skb completed the host's reassembly of its datagram and
 * now carries the first fragment (lt_host_reassembled tells the receive side's story; a transmit flight
 * learns it is a fragment where the host receives it). Its data buffer is taken as its own from here.
 * One read of the IP header, only for such a flight. */
static __always_inline int lt_tx_reassembled(struct lt_flight *f, struct lt_skb_view *v, u64 age)
{
    u8 proto;
    if (v->network_header == 0xffff || !lt_filter_now_first(f, v, v->head + v->network_header, age, &proto))
        return 0;
    f->head = (u32)(u64)v->head;
    return 1;
}

/* filter: the packet queued on a traced pod's veth may have no receive flight of its own yet: none at its
 * address, or one whose data buffer is another (a freed skb's left there, or its own after the host's
 * reassembly: lt_record_host_rx tells them apart, and checks the age), or a first fragment's, which the
 * host's reassembly may have left there, and whose skb and data buffer another packet may have taken
 * (both freed, both taken again: lt_record_host_rx compares the datagram's id; a later fragment's flight
 * goes on with its own skb, whose id the host may change when it fragments the datagram again). */
static __always_inline int lt_filter_rx_unseen(struct lt_skb_view *v, u64 key)
{
    struct lt_flight *f = lt_get(LT_DIR_RX, key);
    return !f || f->head != (u32)(u64)v->head || (f->flags & LT_F_FRAG_FIRST);
}

/* filter: transmit flight f, found at the skb's address where a traced pod queues it on device ifindex, is
 * the packet's own, queued on a further device inside the pod (a bridge's port, a VLAN's parent): unsent,
 * with the same data buffer, young, and not on its first device. A freed skb's flight may be left at the
 * address, and a pod's next packet may take both its skb and its data buffer: the host's GRO frees a
 * datagram merged into another's pages with no tracepoint (and on the test VMs a host receive and free may
 * run where no BPF program runs, lt_filter_tx_host_unseen), and the pod's next datagram of that size is
 * queued on the same device. */
static __always_inline int lt_filter_further_dev(struct lt_flight *f, struct lt_skb_view *v, u32 ifindex, u64 age)
{
    return !(f->flags & LT_F_XMITTED) && f->ifindex[0] != ifindex && lt_same_packet(f, v, age);
}

int lt_net_dev_queue(struct bpf_raw_tracepoint_args *ctx)
{
    void *skb = (void *)ctx->args[0];
    u64 key = LT_KEY(skb);
    struct lt_skb_view v;
    lt_skb_read(skb, &v);
    if (!lt_is_ip(&v))
        return 0;
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c)
        return 0;
    u32 ifindex;
    s32 slot = lt_filter_dev(c, v.dev, &ifindex);
    if (slot == -1) {
        /* Another pod's device: a traced pod's packet that got there has ended (delivered). Its own packet
         * may make the NET_RX run its veth raises quiet (nothing to decide when NET_RX is already pending
         * with a time, or running with one, or when no hook ends runs: LT_GEN_QUIET_RUNS). */
        if ((c->cache_gen & LT_GEN_QUIET_RUNS) && c->t_pending < LT_PEND_TIMED && !c->t_softirq) {
            u32 src = 0;
            s32 dst = -1;
            int quiet = lt_quiet_send(&v, &src, &dst);
            if (dst >= 0)
                lt_record_send_into(c, dst, key);
            else
                lt_record_send_quiet(c, quiet, src, key);
        }
        return 0;
    }
    if (slot < 0) {
        lt_record_host_send(c);
        /* On the host only a traced pod's packets can be in transmit flight: one tag lookup says (none
         * for a quiet one, which may still be forwarded to a traced pod after DNAT: below). */
        struct lt_flight *f = lt_quiet_pkt(c, key) ? NULL : lt_get(LT_DIR_TX, key);
        if (f) {
            u64 age = lt_age(c);
            if (!(f->flags & LT_F_XMITTED) && (lt_same_packet(f, &v, age) || lt_tx_reassembled(f, &v, age)))
                lt_record_egress_queue(f, ifindex, lt_stamp(f, c, age));
            /* A traced pod's packet to a Service the node DNATed to another traced pod: its receive
             * flight starts here too (addressed to the Service, it had none at netif_receive_skb). */
            if (lt_filter_hostdev(LT_HOSTDEV_POD, ifindex) && lt_filter_rx_unseen(&v, key))
                lt_record_host_queue(c, &v, key, ifindex, 1);
        } else if (!v.iif) {
            lt_record_host_queue(c, &v, key, ifindex, 0); /* sent by the host itself */
        } else if (lt_filter_hostdev(LT_HOSTDEV_UPLINK, v.iif)) {
            lt_record_host_queue(c, &v, key, ifindex, 1); /* forwarded from an uplink: maybe de-NATed */
        } else if (lt_filter_hostdev(LT_HOSTDEV_POD, ifindex) && lt_filter_rx_unseen(&v, key)) {
            lt_record_host_queue(c, &v, key, ifindex, 1); /* onto a traced pod's veth, not seen on its way to it */
        }
        return 0;
    }
    lt_record_send_quiet(c, 0, 0, 0);
    if (ifindex == LT_LOOPBACK_IFINDEX)
        return 0; /* the pod's loopback: traffic that never leaves the pod */
    struct lt_target *t = lt_target(slot);
    if (!t || !lt_wants(t, LT_DIR_TX))
        return 0;
    u64 age = lt_age(c);
    struct lt_flight *f = lt_get(LT_DIR_TX, key);
    if (f) {
        if (lt_filter_further_dev(f, &v, ifindex, age)) {
            lt_record_egress_queue(f, ifindex, lt_stamp(f, c, age)); /* a further device inside the pod */
            return 0;
        }
        /* (a first fragment's that the host's reassembly freed, when consume_skb is not attached; one the
         * host received and freed unseen) */
        lt_count_left(LT_DIR_TX, f);
    }
    lt_record_pod_dev_queue(c, t, slot, &v, key, ifindex, age);
    return 0;
}

int lt_net_dev_start_xmit(struct bpf_raw_tracepoint_args *ctx)
{
    u64 key = LT_KEY(ctx->args[0]);
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c || lt_quiet_pkt(c, key))
        return 0;
    struct lt_flight *f = lt_get(LT_DIR_TX, key);
    if (f && lt_timed(f))
        f->ts[LT_B_TX_EGRESS_XMIT] = bpf_ktime_get_ns();
    return 0;
}

int lt_net_dev_xmit(struct bpf_raw_tracepoint_args *ctx)
{
    if ((int)ctx->args[1] != 0)
        return 0;
    u64 key = LT_KEY(ctx->args[0]);
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c || lt_quiet_pkt(c, key))
        return 0;
    struct lt_flight *f = lt_get(LT_DIR_TX, key);
    if (!f || !(f->flags & LT_F_EGRESS_HOST))
        return 0;
    /* The driver took it. A physical NIC completes it later (consume_skb); a veth hands it to the
     * peer namespace, where netif_receive_skb finishes the flight with this time. */
    if (lt_timed(f))
        f->ts[LT_B_TX_DONE] = bpf_ktime_get_ns();
    f->flags |= LT_F_XMITTED;
    return 0;
}

/* filter: a datagram a UDP socket has read, freed now, which has no transmit flight left: a traced pod's
 * datagram ended at its delivery, into another namespace at netif_receive_skb, to a socket of the host at
 * sk_data_ready (lt_record_host_delivery). Told by its device word, which UDP took over while the datagram
 * waited in the queue (skb->dev_scratch, a union with dev: its size state, length and two flags, the top
 * byte 0 or 1), where a device is a kernel pointer (top byte all ones on x86-64 and arm64) or NULL (a first
 * fragment the host's reassembly consumed: the word was the reassembly tree's rb_left). One load from the
 * skb's first line, which its free has just touched, instead of the flight table's tag line, which in a
 * ping-pong is cold (RESULTS.md: "consume_skb"). */
static __always_inline int lt_filter_read_datagram(void *skb)
{
    u64 word = (u64)lt_ld_ptr(skb, LT_OFF_SKB_DEV);
    return word && (word >> 56) < 2;
}

/* filter: the head of a chain the host's fraglist GRO made (see lt_filter_chained, drops.bpf.c), consumed
 * once UDP has copied the chain for a host socket: its data goes on in the copies. It still holds the
 * chain (skb_shinfo(skb)->frag_list). Asked only of a transmit flight that ends here unsent. */
static __always_inline int lt_filter_chain_head(void *skb)
{
    void *head = lt_ld_ptr(skb, LT_OFF_SKB_HEAD), *frag_list = NULL;
    lt_shinfo_read(skb, head, LT_OFF_SHINFO_FRAG_LIST, &frag_list, sizeof(frag_list));
    return frag_list != NULL;
}

int lt_consume_skb(struct bpf_raw_tracepoint_args *ctx)
{
    void *skb = (void *)ctx->args[0];
#if LT_TYPED
    /* (With raw tracepoints the device word would be a helper call of its own, dearer than the lookup.) */
    if (lt_filter_read_datagram(skb))
        return 0;
#endif
    struct lt_flight *f = lt_get(LT_DIR_TX, LT_KEY(skb));
    if (!f)
        return 0;
    if (f->flags & LT_F_XMITTED) {
        lt_record_tx_done(f, lt_timed(f) ? bpf_ktime_get_ns() : 0, skb); /* it frees either way */
        return 0;
    }
    if (lt_left_by_reassembly(LT_DIR_TX, f->flags, 0))
        lt_count(LT_C_HOST_REASM); /* a first fragment whose skb the host's reassembly freed */
    else if (lt_filter_tx_host_unseen(f) || lt_filter_chain_head(skb))
        lt_count(LT_C_HOST_CHAIN);
    lt_free(LT_DIR_TX, f);
    return 0;
}
