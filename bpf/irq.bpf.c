/* Interrupt context of received packets (segment rx_irq, start of rx_driver).
 *
 * Per CPU: when NET_RX became pending (a physical NIC's hardirq, else the softirq raise, which is all a
 * veth delivery does) and when the NET_RX softirq run that processes it started. Packets first seen
 * during that run take both times as their irq and softirq boundaries. Other IRQs and softirq vectors
 * leave at the first comparison. A run raised by an untraced pod's send of a packet addressed to no
 * traced pod is quiet and reads no clock (LT_PEND_QUIET, latencytrace.h).
 */
#include "latencytrace.h"

int lt_irq_handler_entry(struct bpf_raw_tracepoint_args *ctx)
{
    u32 irq = (u32)ctx->args[0];
    u8 *nic = lt_nic_irq.lookup(&irq); /* an array: inlined, no helper call on every IRQ of the node */
    if (!nic || !*nic)
        return 0;
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (c && c->t_pending < LT_PEND_TIMED)
        c->t_pending = bpf_ktime_get_ns(); /* a NIC's packets: never quiet */
    return 0;
}

int lt_softirq_raise(struct bpf_raw_tracepoint_args *ctx)
{
    if ((u32)ctx->args[0] != LT_NET_RX_SOFTIRQ)
        return 0;
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c)
        return 0;
    u64 p = c->t_pending;
    if (p >= LT_PEND_TIMED)
        return 0;
    /* The raise of the send just queued (net_dev_queue: a veth raises from its transmit), quiet or
     * untimed if that was; any other raise is timed. */
    if (p == LT_PEND_QUIET_NEXT || p == LT_PEND_UNTIMED_NEXT)
        c->t_pending = p - 1; /* LT_PEND_QUIET, LT_PEND_UNTIMED */
    else
        c->t_pending = bpf_ktime_get_ns();
    return 0;
}

int lt_softirq_entry(struct bpf_raw_tracepoint_args *ctx)
{
    if ((u32)ctx->args[0] != LT_NET_RX_SOFTIRQ)
        return 0;
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c)
        return 0;
    u64 p = c->t_pending;
    c->t_pending = 0;
    if (p == LT_PEND_QUIET) {
        c->t_irq = LT_PEND_QUIET; /* a quiet run: no times (lt_age reads the clock where one is needed) */
        c->t_softirq = 0;
        return 0;
    }
    c->t_softirq = bpf_ktime_get_ns();
    c->t_irq = p >= LT_PEND_TIMED ? p : 0;
    c->quiet_skb = 0;
    return 0;
}

int lt_softirq_exit(struct bpf_raw_tracepoint_args *ctx)
{
    if ((u32)ctx->args[0] != LT_NET_RX_SOFTIRQ)
        return 0;
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c)
        return 0;
    c->t_softirq = 0;
    c->t_irq = 0;
    c->rx_skb = 0;
    c->tx_skb = 0;
    c->quiet_skb = 0;
    return 0;
}
