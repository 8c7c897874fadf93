/* Drops: kfree_skb with the kernel's drop reason, counted per traced pod, direction and reason.
 * A packet in flight is attributed to its flight's pod (and its journey sent as a drop event);
 * another one by the namespace of its device (received) or of its socket (sent). */
#include "latencytrace.h"

static __always_inline void lt_count_drop(u32 slot, u32 dir, u32 reason)
{
    struct lt_drop_key k = {.slot = slot, .reason = reason, .dir = dir};
    u64 *n = lt_drops.lookup(&k);
    if (n) {
        (*n)++;
    } else {
        u64 one = 1;
        lt_drops.update(&k, &one);
    }
}

/* record: a packet in flight dropped: counted for its flight's pod, its journey sent as a drop event. */
static __always_inline void lt_record_drop(struct lt_flight *f, u32 dir, void *skb, u32 reason)
{
    lt_count_drop(f->slot, dir, reason);
    struct lt_target *t = lt_target(f->slot);
    if (t && lt_wants(t, dir) && lt_timed(f))
        lt_emit(t, f, dir, LT_EV_DROP, 0, skb, reason); /* an untimed packet is counted, with no journey to send */
}

/* filter: receive flight f, found at a dropped skb's address with its data buffer (v), is the dropped
 * packet's as far as fragments go. A first fragment's flight the host's reassembly left is not when
 * another packet took both its skb and its data buffer (freed meanwhile with the datagram), a packet the
 * node then dropped: the header, read only for such a flight, says (lt_same_datagram). */
static __always_inline int lt_filter_dropped_datagram(struct lt_flight *f, struct lt_skb_view *v)
{
    /* no header set: ours only if the flight has no datagram to compare (lt_same_datagram's own test) */
    return v->network_header == 0xffff ? !(f->flags & LT_F_FRAG_FIRST)
                                       : lt_same_datagram(f, v, v->head + v->network_header);
}

/* filter: a sent packet's skb freed by the host's GRO, not dropped. Fraglist GRO (rx-udp-gro-forwarding
 * on a pod's host-side veth) chains packets of one flow behind the first one's skb, each pulled to its
 * payload; UDP copies the chain into new skbs for a host socket and, consuming the head, frees the
 * members with no drop reason (skb_release_data -> kfree_skb_list_reason). Such a member's data is past
 * its transport header, where no drop of a packet still on its way leaves it. */
static __always_inline int lt_filter_chained(struct lt_skb_view *v, u32 reason)
{
#ifdef LT_REASON_NOT_SPECIFIED
    return reason == LT_REASON_NOT_SPECIFIED && v->transport_header != 0xffff &&
           (u64)v->data > (u64)v->head + v->transport_header;
#else
    return 0;
#endif
}

/* record: skb (v) dropped with flight f of direction dir at its address; 1 if f was its packet's. A
 * flight left there by a freed skb (a first fragment the host's reassembly freed, which no probe sees go)
 * has another data buffer, or, receive side, another datagram in it: it is counted as left
 * (lt_count_left), not as its pod's drop; a sent packet the host's GRO chained and freed (its data gone
 * on) is counted as such. f ends either way. */
static __always_inline int lt_record_flight_drop(struct lt_flight *f, u32 dir, void *skb, struct lt_skb_view *v,
                                                 u32 reason)
{
    int ours = f->head == (u32)(u64)v->head && (dir != LT_DIR_RX || lt_filter_dropped_datagram(f, v));
    if (ours && dir == LT_DIR_TX && lt_filter_chained(v, reason))
        lt_count(LT_C_HOST_CHAIN);
    else if (ours)
        lt_record_drop(f, dir, skb, reason);
    else
        lt_count_left(dir, f);
    lt_free(dir, f);
    return ours;
}

int lt_kfree_skb(struct bpf_raw_tracepoint_args *ctx)
{
    void *skb = (void *)ctx->args[0];
#ifdef LT_KFREE_REASON_ARG
    u32 reason = (u32)ctx->args[LT_KFREE_REASON_ARG];
#else
    u32 reason = 0;
#endif
    u64 key = LT_KEY(skb);
    struct lt_skb_view v;
    lt_skb_read(skb, &v);
    /* A packet in flight (in both directions when it goes from one traced pod to another). */
    struct lt_flight *rf = lt_get(LT_DIR_RX, key), *tf = lt_get(LT_DIR_TX, key);
    int in_flight = 0; /* (not `rf || tf`: clang may OR the two pointers, which the verifier refuses) */
    if (rf)
        in_flight |= lt_record_flight_drop(rf, LT_DIR_RX, skb, &v, reason);
    if (tf)
        in_flight |= lt_record_flight_drop(tf, LT_DIR_TX, skb, &v, reason);
    if (in_flight)
        return 0;
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c)
        return 0;
    u32 ifindex;
    s32 slot = v.dev ? lt_filter_dev(c, v.dev, &ifindex) : -1;
    u32 dir = LT_DIR_RX;
    if (slot < 0) {
        if (!v.sk)
            return 0;
        slot = lt_filter_sock(c, v.sk);
        dir = LT_DIR_TX;
    }
    if (slot >= 0) {
        struct lt_target *t = lt_target(slot);
        if (t && lt_wants(t, dir))
            lt_count_drop(slot, dir, reason);
    }
    return 0;
}
