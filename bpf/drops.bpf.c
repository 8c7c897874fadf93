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

int lt_kfree_skb(struct bpf_raw_tracepoint_args *ctx)
{
    void *skb = (void *)ctx->args[0];
#ifdef LT_KFREE_REASON_ARG
    u32 reason = (u32)ctx->args[LT_KFREE_REASON_ARG];
#else
    u32 reason = 0;
#endif
    u64 key = (u64)skb;
    u32 dir = LT_DIR_RX;
    struct lt_flight *f = lt_rx_flight.lookup(&key);
    if (!f) {
        f = lt_tx_flight.lookup(&key);
        dir = LT_DIR_TX;
    }
    if (f) {
        lt_count_drop(f->slot, dir, reason);
        struct lt_target *t = lt_target(f->slot);
        if (t && lt_wants(t, dir))
            lt_emit(t, f, dir, LT_EV_DROP, 0, skb, reason);
        if (dir == LT_DIR_RX)
            lt_rx_flight.delete(&key);
        else
            lt_tx_flight.delete(&key);
        return 0;
    }
    s32 slot = lt_netns_slot(lt_dev_netns(lt_read_ptr(skb, LT_OFF_SKB_DEV)));
    dir = LT_DIR_RX;
    if (slot < 0) {
        void *sk = lt_read_ptr(skb, LT_OFF_SKB_SK);
        if (!sk)
            return 0;
        slot = lt_netns_slot(lt_sk_netns(sk));
        dir = LT_DIR_TX;
    }
    if (slot >= 0) {
        struct lt_target *t = lt_target(slot);
        if (t && lt_wants(t, dir))
            lt_count_drop(slot, dir, reason);
    }
    return 0;
}
