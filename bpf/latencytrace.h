/* Shared maps, types and helpers of the latencytrace probes.
 *
 * Compiled by BCC at agent start. Everything that depends on the running kernel's layout comes in as
 * -D macros resolved from its BTF (LT_OFF_*: byte offsets of the struct members we read), never from
 * kernel headers, so no kernel header is included here. Segment and boundary ids (LT_SEG_*, LT_B_*)
 * come from node_agent/segments.py, sizes (LT_MAX_TARGETS, LT_*_INFLIGHT, ...) from the agent's config.
 *
 * Cost rules followed by every probe: leave at the first instruction that can tell the event is not
 * ours (softirq vector, IRQ number, namespace, map miss); keep per-packet state in LRU maps so that lost
 * completions cannot grow memory; aggregate in per-CPU maps; delete in-flight state on every exit path.
 */
#ifndef LATENCYTRACE_H
#define LATENCYTRACE_H

#define LT_NET_RX_SOFTIRQ 3
#define LT_ETH_P_IP 0x0008   /* htons(0x0800) on little-endian */
#define LT_ETH_P_IPV6 0xDD86 /* htons(0x86DD) */
#define LT_DIR_RX 0
#define LT_DIR_TX 1
/* A flight older than this when its skb address shows up again belongs to a freed skb. */
#define LT_STALE_NS 1000000000ULL

/* Event kinds (lt_event.kind) */
#define LT_EV_SLOW 1
#define LT_EV_SAMPLED 2
#define LT_EV_DROP 3

/* lt_flight.flags */
#define LT_F_EGRESS_HOST 1 /* queued on a device outside the pod after reaching the host */
#define LT_F_XMITTED 2     /* the host egress driver accepted it; ts[done] holds that time */

/* Counters (lt_counters index) */
#define LT_C_EVENTS_LOST 0   /* ring buffer full */
#define LT_C_RATE_LIMITED 1  /* slow packets over the per-target event rate */
#define LT_C_STALE 2         /* flights of freed skbs replaced */
#define LT_C_CLAMPED 3       /* latencies above the histogram range */
#define LT_C_NEGATIVE 4      /* end before start (should not happen; counted, not recorded) */
#define LT_NCOUNTERS 8

struct lt_target {
    u64 slow_ns;       /* emit an event when the packet's total is at least this; 0: never */
    u32 sample_one_in; /* and for 1 in N of the others; 0: none */
    u32 seg_mask;      /* bit per segment id to record */
    u32 dir_mask;      /* bit 0: receive, bit 1: transmit; 0: slot unused */
    u32 events_per_sec; /* per CPU cap on events of this target */
};

struct lt_in6 {
    u32 a[4];
};

#define LT_DEV_CACHE 4 /* a packet crosses about four devices on its way into a pod (veths, bridge) */

struct lt_dev_ent {
    u64 dev;
    u32 inum;
    s32 slot; /* target slot of the device's namespace, -1: untraced */
};

struct lt_cpu_ctx {
    u64 t_pending; /* NET_RX became pending on this CPU (NIC hardirq or softirq raise); 0: not pending */
    u64 t_irq;     /* pending time of the NET_RX run now executing */
    u64 t_softirq; /* entry of the NET_RX run now executing; 0 outside NET_RX */
    u64 rx_skb;    /* skb in a traced pod's stack on this CPU, awaiting sk_data_ready */
    u64 tx_skb;    /* skb of a traced pod that just reached the host, for local delivery */
    u32 rx_netns;  /* namespace of rx_skb */
    struct lt_dev_ent devs[LT_DEV_CACHE]; /* the last devices seen on this CPU and their answers, */
    u32 dev_gen;   /* while the target set was at this generation */
    u32 dev_next;  /* the entry to replace next */
};

struct lt_addrs {
    u32 saddr[4];
    u32 daddr[4];
    u16 sport; /* network byte order */
    u16 dport;
    u8 proto;
    u8 family; /* 4 or 6; 0: addresses unknown */
    u16 pad;
};

struct lt_flight {
    u64 ts[LT_NBOUND]; /* boundary timestamps (bpf_ktime_get_ns), 0: not seen */
    u32 slot;
    u32 len;
    u32 ifindex[3];    /* RX: host device, pod device; TX: pod device, host device, egress device */
    u16 cpu;           /* CPU of the first boundary */
    u8 flags;
    u8 pad;
    struct lt_addrs addr; /* RX: read with the addresses that identified the packet, at no extra cost */
};

struct lt_event {
    u64 ts[LT_NBOUND];
    u64 skb;
    u32 slot;
    u32 len;
    u32 ifindex[3];
    u32 drop_reason;
    u16 cpu_first;
    u16 cpu_last;
    u8 dir;
    u8 kind;
    u16 pad;
    /* struct lt_addrs, spelled out: BCC's event decoder does not take nested structs */
    u32 saddr[4];
    u32 daddr[4];
    u16 sport;
    u16 dport;
    u8 proto;
    u8 family;
    u16 pad2;
};

/* A UDP packet waiting in its socket's queue. UDP copies data out without a tracepoint that names the
 * skb, so the read side is matched by order instead: the n-th packet queued on a socket is its n-th
 * datagram read (sock_recv_length). */
struct lt_sockq_key {
    u64 sk;
    u64 seq;
};

struct lt_sockq_val {
    struct lt_flight f;
    u64 skb;
};

struct lt_sockq_pos {
    u64 head; /* next sequence number a read takes */
    u64 tail; /* next sequence number a queued packet gets */
    u64 skip; /* reads still due to packets queued before we saw the socket */
};

struct lt_seg_stat {
    u64 count;
    u64 sum_ns;
    u64 max_ns;
    u64 zero;
};

struct lt_drop_key {
    u32 slot;
    u32 reason;
    u32 dir;
};

struct lt_rate {
    u64 window;
    u64 n;
};

/* Target lookup tables: arrays laid out as open-addressing hash tables by node_agent/lookup.py (the
 * verifier inlines array lookups; a hash map would cost a helper call on every packet of the node).
 * A key is at one of LT_TBL_PROBES positions from lt_hash32(key); key 0 marks an empty position. */
struct lt_ent1 {
    u32 key;
    s32 slot;
};

struct lt_ent4 {
    u32 key[4];
    s32 slot;
};

/* Targets: written by user space at run time, read by every probe. */
BPF_ARRAY(lt_targets, struct lt_target, LT_MAX_TARGETS);
BPF_ARRAY(lt_netns, struct lt_ent1, LT_TBL_SIZE);      /* netns inode -> slot */
BPF_ARRAY(lt_ip4, struct lt_ent1, LT_TBL_SIZE);        /* pod IPv4 address -> slot */
BPF_ARRAY(lt_ip6, struct lt_ent4, LT_TBL_SIZE);        /* pod IPv6 address -> slot */
BPF_HASH(lt_nic_irq, u32, u8, 1024);                   /* IRQ numbers of physical NIC queues */
BPF_ARRAY(lt_gen, u32, 1);                             /* bumped by user space at every target change */

/* In-flight packets and pending sends. */
BPF_PERCPU_ARRAY(lt_cpu, struct lt_cpu_ctx, 1);
BPF_TABLE("lru_hash", u64, struct lt_flight, lt_rx_flight, LT_RX_INFLIGHT);
BPF_TABLE("lru_hash", u64, struct lt_flight, lt_tx_flight, LT_TX_INFLIGHT);
BPF_TABLE("lru_hash", u64, u64, lt_tx_sock, LT_SEND_INFLIGHT);   /* sock -> start of the pending send */
BPF_TABLE("lru_hash", u32, u64, lt_tx_thread, LT_SEND_INFLIGHT); /* thread -> start of its send syscall */
BPF_TABLE("lru_hash", u64, struct lt_sockq_pos, lt_sockq_pos, LT_SEND_INFLIGHT); /* UDP socket -> its queue */
BPF_TABLE("lru_hash", struct lt_sockq_key, struct lt_sockq_val, lt_sockq, LT_RX_INFLIGHT);

/* Results. */
BPF_PERCPU_ARRAY(lt_hist, u32, LT_MAX_TARGETS * LT_NSEG * LT_NB);
BPF_PERCPU_ARRAY(lt_stat, struct lt_seg_stat, LT_MAX_TARGETS * LT_NSEG);
BPF_PERCPU_HASH(lt_drops, struct lt_drop_key, u64, LT_MAX_TARGETS * 32);
BPF_PERCPU_ARRAY(lt_counters, u64, LT_NCOUNTERS);
BPF_PERCPU_ARRAY(lt_rate, struct lt_rate, LT_MAX_TARGETS);
BPF_RINGBUF_OUTPUT(lt_events, LT_RINGBUF_PAGES);

static __always_inline u32 lt_hash32(u32 x)
{
    return (x * 2654435769u) >> (32 - LT_TBL_BITS);
}

/* (Spelled out per table: BCC rewrites map calls only in plain code, not through map pointers or macros.) */
static __always_inline s32 lt_netns_slot(u32 inum)
{
    u32 h = lt_hash32(inum);
#pragma unroll
    for (int p = 0; p < LT_TBL_PROBES; p++) {
        u32 pos = (h + p) & (LT_TBL_SIZE - 1);
        struct lt_ent1 *e = lt_netns.lookup(&pos);
        if (!e || !e->key)
            return -1;
        if (e->key == inum)
            return e->slot;
    }
    return -1;
}

static __always_inline s32 lt_ip4_slot(u32 addr)
{
    u32 h = lt_hash32(addr);
#pragma unroll
    for (int p = 0; p < LT_TBL_PROBES; p++) {
        u32 pos = (h + p) & (LT_TBL_SIZE - 1);
        struct lt_ent1 *e = lt_ip4.lookup(&pos);
        if (!e || !e->key)
            return -1;
        if (e->key == addr)
            return e->slot;
    }
    return -1;
}

static __always_inline s32 lt_ip6_slot(struct lt_in6 *a)
{
    u32 h = lt_hash32(a->a[0] ^ a->a[1] ^ a->a[2] ^ a->a[3]);
#pragma unroll
    for (int p = 0; p < LT_TBL_PROBES; p++) {
        u32 pos = (h + p) & (LT_TBL_SIZE - 1);
        struct lt_ent4 *e = lt_ip6.lookup(&pos);
        if (!e || !(e->key[0] | e->key[1] | e->key[2] | e->key[3]))
            return -1;
        if (e->key[0] == a->a[0] && e->key[1] == a->a[1] && e->key[2] == a->a[2] && e->key[3] == a->a[3])
            return e->slot;
    }
    return -1;
}

static __always_inline void lt_count(u32 which)
{
    u64 *c = lt_counters.lookup(&which);
    if (c)
        (*c)++;
}

static __always_inline void *lt_read_ptr(void *base, u32 off)
{
    void *p = NULL;
    bpf_probe_read_kernel(&p, sizeof(p), base + off);
    return p;
}

static __always_inline u32 lt_net_inum(void *net)
{
    u32 inum = 0;
    bpf_probe_read_kernel(&inum, sizeof(inum), net + LT_OFF_NET_INUM);
    return inum;
}

static __always_inline u32 lt_dev_netns(void *dev)
{
    return lt_net_inum(lt_read_ptr(dev, LT_OFF_DEV_NET));
}

static __always_inline u32 lt_sk_netns(void *sk)
{
    return lt_net_inum(lt_read_ptr(sk, LT_OFF_SK_NET));
}

static __always_inline u32 lt_dev_ifindex(void *dev)
{
    u32 ifindex = 0;
    bpf_probe_read_kernel(&ifindex, sizeof(ifindex), dev + LT_OFF_DEV_IFINDEX);
    return ifindex;
}

/* Callers test `t && lt_wants(t, dir)` instead of getting NULL back for an unwanted direction: a
 * pointer chosen by a condition compiles to a branchless select, which the verifier refuses. */
static __always_inline struct lt_target *lt_target(u32 slot)
{
    return lt_targets.lookup(&slot);
}

static __always_inline int lt_wants(struct lt_target *t, u32 dir)
{
    return t->dir_mask & (1u << dir);
}

/* Index of the highest set bit, without branches: every branch here would multiply the verifier's
 * states at each of the several places a latency is recorded. */
static __always_inline u32 lt_fls64(u64 v)
{
    u32 k, b;
    k = (v > 0xFFFFFFFFULL) << 5;
    v >>= k;
    b = (v > 0xFFFF) << 4;
    v >>= b;
    k |= b;
    b = (v > 0xFF) << 3;
    v >>= b;
    k |= b;
    b = (v > 0xF) << 2;
    v >>= b;
    k |= b;
    b = (v > 0x3) << 1;
    v >>= b;
    k |= b;
    return k | (u32)(v >> 1);
}

/* Histogram position of a latency of ns > 0: the OpenTelemetry scale-3 bucket index of ns/1e9 seconds,
 * minus LT_INDEX_MIN. With 1e9 = 2^9 * 5^9 and ns shifted left by s until its top bit is bit 63,
 * z = (ns << s) / 5^9 = seconds * 2^(s+9) exactly up to truncation of a 43-bit quotient, so the index
 * computed on z is the index in seconds plus 8(s+9). Within an octave the 7 thresholds LT_T1..LT_T7 =
 * floor(2^(j/8) * 2^63) split the normalised mantissa logarithmically. Buckets are upper-inclusive: an
 * exact power of two (nothing truncated) goes one bucket down. node_agent/histogram.py mirrors this
 * and the tests check both agree. */
static __always_inline u32 lt_bucket(u64 ns)
{
    u32 s = 63 - lt_fls64(ns);
    u64 x = ns << s;
    u64 z = x / 1953125ULL;
    u32 k = 42 + (u32)(z >> 43); /* x is in [2^63, 2^64): z in [2^42.1, 2^43.1) */
    u64 m = z << (63 - k);
    s32 idx = 8 * k;
    idx += (m > LT_T1) + (m > LT_T2) + (m > LT_T3) + (m > LT_T4) + (m > LT_T5) + (m > LT_T6) + (m > LT_T7);
    idx -= (m == (1ULL << 63)) & (z * 1953125ULL == x);
    idx -= 8 * (s + 9) + LT_INDEX_MIN;
    if (idx < 0)
        idx = 0;
    if (idx > LT_NB - 1) {
        idx = LT_NB - 1;
        lt_count(LT_C_CLAMPED);
    }
    return (u32)idx;
}

/* Record one latency of segment `seg` for target `slot`. */
static __always_inline void lt_record(struct lt_target *t, u32 slot, u32 seg, u64 start, u64 end)
{
    if (!start || !end || !(t->seg_mask & (1u << seg)))
        return;
    if (end < start) {
        lt_count(LT_C_NEGATIVE);
        return;
    }
    u64 ns = end - start;
    u32 sidx = slot * LT_NSEG + seg;
    struct lt_seg_stat *st = lt_stat.lookup(&sidx);
    if (!st)
        return;
    st->count++;
    st->sum_ns += ns;
    if (ns > st->max_ns)
        st->max_ns = ns;
    if (ns == 0) {
        st->zero++;
        return;
    }
    u32 hidx = sidx * LT_NB + lt_bucket(ns);
    u32 *c = lt_hist.lookup(&hidx);
    if (c)
        (*c)++;
}

static __always_inline u64 lt_first(struct lt_flight *f)
{
#pragma unroll
    for (int i = 0; i < LT_NBOUND; i++) {
        if (f->ts[i])
            return f->ts[i];
    }
    return 0;
}

/* The skb fields the probes need, fetched with one read of the window of struct sk_buff that holds
 * them all (LT_SKB_WIN_*, computed from BTF) instead of one read each. */
struct lt_skb_view {
    void *dev;
    void *sk;
    void *data;
    void *head;
    u32 len;
    u16 protocol;
    u16 network_header;
    u16 transport_header;
};

static __always_inline void lt_skb_read(void *skb, struct lt_skb_view *v)
{
    u8 w[LT_SKB_WIN_LEN];
    if (bpf_probe_read_kernel(w, sizeof(w), skb + LT_SKB_WIN_START) < 0) {
        __builtin_memset(v, 0, sizeof(*v));
        return;
    }
    v->dev = *(void **)(w + LT_OFF_SKB_DEV - LT_SKB_WIN_START);
    v->sk = *(void **)(w + LT_OFF_SKB_SK - LT_SKB_WIN_START);
    v->data = *(void **)(w + LT_OFF_SKB_DATA - LT_SKB_WIN_START);
    v->head = *(void **)(w + LT_OFF_SKB_HEAD - LT_SKB_WIN_START);
    v->len = *(u32 *)(w + LT_OFF_SKB_LEN - LT_SKB_WIN_START);
    v->protocol = *(u16 *)(w + LT_OFF_SKB_PROTOCOL - LT_SKB_WIN_START);
    v->network_header = *(u16 *)(w + LT_OFF_SKB_NETWORK_HEADER - LT_SKB_WIN_START);
    v->transport_header = *(u16 *)(w + LT_OFF_SKB_TRANSPORT_HEADER - LT_SKB_WIN_START);
}

static __always_inline int lt_is_ip(struct lt_skb_view *v)
{
    return v->protocol == LT_ETH_P_IP || v->protocol == LT_ETH_P_IPV6;
}

/* The packet's addresses from its network header at nh, and its ports from the same read (assuming no
 * IP options or IPv6 extension headers; else they stay 0), so that a packet followed from here carries
 * its addresses without reading them again. 0, or -1 when it is not IP or cannot be read (`a` is then
 * all zero: family 0). */
static __always_inline int lt_ip_hdr(struct lt_skb_view *v, void *nh, struct lt_addrs *a)
{
    __builtin_memset(a, 0, sizeof(*a));
    if (v->protocol == LT_ETH_P_IP) {
        u32 h[6]; /* the 20-byte header without options, then the ports */
        if (bpf_probe_read_kernel(h, sizeof(h), nh) < 0)
            return -1;
        a->family = 4;
        a->proto = (h[2] >> 8) & 0xff; /* byte 9 */
        a->saddr[0] = h[3];
        a->daddr[0] = h[4];
        if ((h[0] & 0xf) == 5 && (a->proto == 6 || a->proto == 17)) {
            a->sport = h[5] & 0xffff;
            a->dport = h[5] >> 16;
        }
        return 0;
    }
    if (v->protocol == LT_ETH_P_IPV6) {
        u32 h[11]; /* the 40-byte header, then the ports */
        if (bpf_probe_read_kernel(h, sizeof(h), nh) < 0)
            return -1;
        a->family = 6;
        a->proto = (h[1] >> 16) & 0xff; /* byte 6: next header */
#pragma unroll
        for (int i = 0; i < 4; i++) {
            a->saddr[i] = h[2 + i];
            a->daddr[i] = h[6 + i];
        }
        if (a->proto == 6 || a->proto == 17) {
            a->sport = h[10] & 0xffff;
            a->dport = h[10] >> 16;
        }
        return 0;
    }
    return -1;
}

/* Slot of the traced pod whose IP is the packet's source (dst 0) or destination (dst 1), -1 if none:
 * a lookup in a small, hot table, the cheap test that lets everything else skip the larger in-flight
 * maps, whose cache misses are what a probe mostly costs. */
static __always_inline s32 lt_addr_slot(struct lt_addrs *a, int dst)
{
    if (a->family == 4)
        return lt_ip4_slot(dst ? a->daddr[0] : a->saddr[0]);
    if (a->family == 6)
        return lt_ip6_slot((struct lt_in6 *)(dst ? a->daddr : a->saddr));
    return -1;
}

/* Fill the packet's addresses from the skb's network and transport headers (set by then): one read of
 * the skb, one of the IP header, one of the ports. */
static __always_inline void lt_fill_addrs(struct lt_addrs *e, void *skb)
{
    struct lt_skb_view v;
    lt_skb_read(skb, &v);
    if (!v.head || v.network_header == 0xffff)
        return;
    if (lt_ip_hdr(&v, v.head + v.network_header, e) < 0)
        return;
    /* The transport header is known here: its ports, not the guess after a fixed-size IP header. */
    e->sport = 0;
    e->dport = 0;
    if (v.transport_header != 0xffff && v.transport_header != v.network_header && (e->proto == 6 || e->proto == 17)) {
        u16 ports[2];
        if (bpf_probe_read_kernel(ports, sizeof(ports), v.head + v.transport_header) == 0) {
            e->sport = ports[0];
            e->dport = ports[1];
        }
    }
}

/* Send the packet's journey to user space if it is slow, sampled or dropped, within the rate cap. */
static __always_inline void lt_emit(struct lt_target *t, struct lt_flight *f, u32 dir, u8 kind, u64 total,
                                    void *skb, u32 drop_reason)
{
    if (!kind) {
        if (t->slow_ns && total >= t->slow_ns)
            kind = LT_EV_SLOW;
        else if (t->sample_one_in && bpf_get_prandom_u32() % t->sample_one_in == 0)
            kind = LT_EV_SAMPLED;
        else
            return;
    }
    u32 slot = f->slot;
    struct lt_rate *r = lt_rate.lookup(&slot);
    if (!r)
        return;
    u64 window = bpf_ktime_get_ns() >> 30; /* ~1.07 s */
    if (r->window != window) {
        r->window = window;
        r->n = 0;
    }
    if (r->n >= t->events_per_sec) {
        lt_count(LT_C_RATE_LIMITED);
        return;
    }
    r->n++;
    struct lt_event *e = lt_events.ringbuf_reserve(sizeof(struct lt_event));
    if (!e) {
        lt_count(LT_C_EVENTS_LOST);
        return;
    }
    __builtin_memset(e, 0, sizeof(*e));
#pragma unroll
    for (int i = 0; i < LT_NBOUND; i++)
        e->ts[i] = f->ts[i];
    e->skb = (u64)skb;
    e->slot = slot;
    e->len = f->len;
    e->ifindex[0] = f->ifindex[0];
    e->ifindex[1] = f->ifindex[1];
    e->ifindex[2] = f->ifindex[2];
    e->drop_reason = drop_reason;
    e->cpu_first = f->cpu;
    e->cpu_last = bpf_get_smp_processor_id();
    e->dir = dir;
    e->kind = kind;
    if (f->addr.family)
        __builtin_memcpy(&e->saddr, &f->addr, sizeof(f->addr));
    else
        lt_fill_addrs((struct lt_addrs *)&e->saddr, skb); /* transmitted packets: read only when emitted */
    lt_events.ringbuf_submit(e, 0);
}

static __always_inline struct lt_cpu_ctx *lt_this_cpu(void)
{
    u32 zero = 0;
    return lt_cpu.lookup(&zero);
}

/* Target slot of the namespace a device is in (-1: untraced). Each CPU remembers the answers for the
 * last few devices it saw (a packet into a pod crosses the NIC or a veth, the bridge, the pod's veth)
 * and skips the pointer chase and the lookup while the target set is unchanged. (A device freed and its
 * memory reused for another would inherit the answer until it leaves the cache or the targets change.) */
static __always_inline s32 lt_dev_slot(struct lt_cpu_ctx *c, void *dev, u32 *inum_out)
{
    u32 zero = 0;
    u32 *genp = lt_gen.lookup(&zero);
    u32 gen = genp ? *genp : 0;
    if (c->dev_gen != gen) {
#pragma unroll
        for (int i = 0; i < LT_DEV_CACHE; i++)
            c->devs[i].dev = 0;
        c->dev_gen = gen;
    }
#pragma unroll
    for (int i = 0; i < LT_DEV_CACHE; i++) {
        if (c->devs[i].dev == (u64)dev) {
            *inum_out = c->devs[i].inum;
            return c->devs[i].slot;
        }
    }
    u32 inum = lt_dev_netns(dev);
    s32 slot = lt_netns_slot(inum);
    u32 i = c->dev_next++ & (LT_DEV_CACHE - 1);
    c->devs[i].dev = (u64)dev;
    c->devs[i].inum = inum;
    c->devs[i].slot = slot;
    *inum_out = inum;
    return slot;
}

#endif /* LATENCYTRACE_H */
