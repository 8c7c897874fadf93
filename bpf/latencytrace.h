/* Shared maps, types and helpers of the latencytrace probes.
 *
 * Compiled by BCC at agent start. Everything that depends on the running kernel's layout comes in as
 * -D macros resolved from its BTF (LT_OFF_*: byte offsets of the struct members we read), never from
 * kernel headers, so no kernel header is included here. Segment and boundary ids (LT_SEG_*, LT_B_*)
 * come from node_agent/segments.py, counter and event kind ids (LT_C_*, LT_EV_*) from the tables in
 * node_agent/collectors.py and node_agent/events.py, sizes (LT_MAX_TARGETS, LT_*_BITS, ...) from the
 * agent's config.
 *
 * Cost rules followed by every probe: filter first (the softirq vector, IRQ number or syscall number;
 * then a per-CPU cache of the device's or namespace's verdict; a read of the packet only once the answer
 * can matter); reads of kernel memory as plain loads where typed tracepoints allow (LT_TYPED, below),
 * else by helper calls that read a struct's window at once; no branch where arithmetic will do (the
 * verifier follows both sides of each, see lt_gt); no hash map on the per-packet path: in-flight state lives in arrays the verifier inlines
 * (direct-mapped, two ways per set, checked by skb address, skb->head and age; per-CPU slots for what
 * stays on one CPU), so that a lookup is a multiply and a load, and losing a completion can neither
 * grow memory nor produce a wrong number (an entry taken by another packet costs that packet's sample
 * and is counted); aggregate in per-CPU maps; free in-flight entries on every exit path seen.
 */
#ifndef LATENCYTRACE_H
#define LATENCYTRACE_H

#define LT_NET_RX_SOFTIRQ 3
#define LT_ETH_P_IP 0x0008   /* htons(0x0800) on little-endian */
#define LT_ETH_P_IPV6 0xDD86 /* htons(0x86DD) */
#define LT_IPPROTO_TCP 6
#define LT_IPPROTO_UDP 17
#define LT_IPV6_FRAGMENT 44 /* IPv6's fragment header, as a next header */
#define LT_AF_INET 2
#define LT_AF_INET6 10
#define LT_LOOPBACK_IFINDEX 1
#define LT_DIR_RX 0
#define LT_DIR_TX 1
/* A flight older than this when its skb address shows up again belongs to a freed skb. */
#define LT_STALE_NS 1000000000ULL

/* lt_flight.flags */
#define LT_F_EGRESS_HOST 1 /* queued on a device outside the pod after reaching the host */
#define LT_F_XMITTED 2     /* the host egress driver accepted it; ts[done] holds that time */
#define LT_F_NODATA 4      /* no socket will read it (a bare TCP ACK, ICMP, a fragment: lt_ip_hdr): its flight ends in the pod */
#define LT_F_UNTIMED 8     /* not chosen for timing (lt_count_packet): the flight only follows the packet to its end,
                            * so that it is counted once and its drop attributed; no clock read, segment or event */
#define LT_F_FIN 16        /* a TCP segment with FIN (its sequence numbers end one past its data) */
#define LT_F_FRAG 32       /* a fragment (with LT_F_NODATA): the host's reassembly may free its skb or give it another
                            * data buffer on its way (lt_host_reassembled) */
#define LT_F_FRAG_FIRST 64 /* with LT_F_FRAG: its datagram's first fragment (offset 0) */
#define LT_F_GRO_SPLIT 128 /* RX, UDP: a GRO skb whose first datagram UDP has queued, the rest to follow (f->segs) */

struct lt_target {
    u64 slow_ns;       /* emit an event when the packet's total is at least this; 0: never */
    u32 sample_one_in; /* and for 1 in N of the others; 0: none */
    u32 seg_mask;      /* bit per segment id to record */
    u32 dir_mask;      /* bit 0: receive, bit 1: transmit; 0: slot unused */
    u32 events_per_sec; /* per CPU cap on events of this target */
    u64 time_below;     /* time 1 packet in N, chosen at its first boundary: when a random u32 is below this
                         * (2^32 / N, from user space); 2^32, every packet, draws no random number */
};

struct lt_in6 {
    u32 a[4];
};

#define LT_DEV_CACHE 8 /* a packet crosses about four devices on its way into a pod (veths, bridge); twice that
                        * keeps the answers of a busy node's other devices too */
#define LT_NET_CACHE 4 /* namespaces of the devices above, of sockets and of threads: a pod's, a client's, the host's */

struct lt_dev_ent {
    u64 dev;
    u32 ifindex;
    s32 slot; /* target slot of the device's namespace, -1: untraced */
};

struct lt_net_ent {
    u64 net;
    s64 slot; /* target slot of the namespace, -1: untraced */
};

/* Quiet NET_RX runs. A pod's send over its veth raises NET_RX on its own CPU, and the run that follows
 * delivers it; that run's times (two clock reads: the raise and the run's start) serve only a packet
 * into a traced pod. So when the packet a pod queues (net_dev_queue, just before the veth's raise) is not
 * addressed to a traced pod, the raise it causes is marked quiet and its run reads no clock: an untraced
 * pod's packet pays for no timing. A packet into a traced pod that such a run carries anyway (sent to a
 * Service's virtual IP that the node then DNATs to the pod) cannot be timed: it is counted (LT_C_QUIET_MISS)
 * and followed untimed, and its sender's address is made loud (lt_loud), never quiet again.
 * Untimed raises. A pod's send into a traced pod that times 1 packet in N is drawn for timing where it is
 * queued (lt_record_send_into), before the raise that is its first boundary: an untimed one's raise reads
 * no clock either, and its run reads one, at its start, for the ages of the packets it carries (no
 * rx_irq time: a timed packet queued before that run starts makes it timed). Values of
 * lt_cpu_ctx.t_pending below LT_PEND_TIMED: */
#define LT_PEND_QUIET 1        /* NET_RX pending, raised by a quiet send: its run reads no clock */
#define LT_PEND_QUIET_NEXT 2   /* not pending; the packet just queued on this CPU is quiet, so is its raise */
#define LT_PEND_UNTIMED 3      /* NET_RX pending, raised by an untimed send into a traced pod: no irq time */
#define LT_PEND_UNTIMED_NEXT 4 /* not pending; the packet just queued on this CPU is such a send */
#define LT_PEND_TIMED 5        /* and above: the time NET_RX became pending */
#define LT_LOUD_SIZE 256     /* lt_loud: direct-mapped, a collision only makes another sender loud */

struct lt_cpu_ctx {
    u64 t_pending; /* NET_RX became pending on this CPU (NIC hardirq or softirq raise); 0: not pending; below
                    * LT_PEND_TIMED: quiet (see above) */
    u64 t_irq;     /* pending time of the NET_RX run now executing; LT_PEND_QUIET: the run is quiet */
    u64 t_softirq; /* entry of the NET_RX run now executing; 0 outside NET_RX, and in a quiet run */
    u64 rx_skb;    /* skb in a traced pod's stack on this CPU, awaiting sk_data_ready */
    u64 tx_skb;    /* skb of a traced pod that just reached the host, for local delivery */
    s32 rx_slot;   /* target slot of rx_skb's pod */
    u32 quiet_src; /* source address (lt_src_fold) of the packet that made this CPU's pending NET_RX quiet */
    u64 tcp_sk;    /* the socket whose established receive processing (tcp_rcv_established) ran last on this */
    u64 tcp_skb;   /* CPU, and the skb it processed: what its sk_data_ready announces (softirq or backlog) */
    u64 quiet_skb; /* the skb whose send made this CPU's pending NET_RX quiet (see lt_quiet_pkt) */
    u64 pre_skb;   /* the last packet into a traced pod drawn for timing where it was queued, | 1 if timed */
    u64 rng;       /* lt_rand's state (0: not seeded yet) */
    /* Send starts: a send syscall and the TCP socket it (or an earlier call of it) filled stay on the
     * CPU until the skb is queued on the pod's device, unless the thread migrates (a lost sample). */
    u64 send_ts;   /* start of the send syscall of thread send_tid (0: none pending) */
    u64 sock_ts;   /* start of the pending send on TCP socket send_sk (0: none pending) */
    u64 send_sk;
    u32 send_tid;
    u32 cache_gen; /* the caches below hold answers for this generation of the target set */
    u32 want_gen;  /* the generation user space last wrote (through mmap, lt_cache_check): one store, no
                    * line of its own to load in every filter */
    u16 dev_next;  /* the entry to replace next */
    u16 net_next;
    struct lt_dev_ent devs[LT_DEV_CACHE]; /* the last devices seen on this CPU and their answers */
    struct lt_net_ent nets[LT_NET_CACHE]; /* the last namespaces (struct net *) and their answers */
    u64 udp_counted; /* the last UDP socket in counted mode (lt_sockq_pos.counted) seen on this CPU: its untimed
                      * datagrams look up nothing */
    u64 pad[7];
};
/* CPUs' entries of lt_cpu sit side by side in one array: each a whole number of cache lines (its values
 * start on a page), so that no two CPUs write one line. */
_Static_assert(sizeof(struct lt_cpu_ctx) % 64 == 0, "pad struct lt_cpu_ctx to whole cache lines");

struct lt_addrs {
    u32 saddr[4];
    u32 daddr[4];
    u16 sport; /* network byte order */
    u16 dport;
    u8 proto;
    u8 family;   /* 4 or 6; 0: addresses unknown */
    u16 frag_id; /* a fragment's datagram identification (IPv4's; the low half of IPv6's), else 0 */
};

/* One packet in flight, in a direct-mapped array entry (see lt_flights). */
struct lt_flight {
    u64 skb;           /* key: the skb's address; 0: the entry is free */
    u64 ts[LT_NBOUND]; /* boundary timestamps (bpf_ktime_get_ns), 0: not seen */
    u32 head;          /* low bits of skb->head when first seen: a recycled skb address has another */
    u32 slot;
    u32 len;
    u32 ifindex[3];    /* RX: host device, pod device; TX: pod device, host device, egress device */
    u16 cpu;           /* CPU of the first boundary */
    u8 flags;
    u8 segs;           /* RX, UDP: datagrams of a GRO skb that UDP has still to queue (lt_record_gro, rx.bpf.c) */
    struct lt_addrs addr; /* RX: read with the addresses that identified the packet, at no extra cost; TX, timed:
                           * as the host's receive read them (its emit reads the skb, if it still may) */
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

/* A packet waiting in its socket's receive queue. No read path names the skb it copies from in every
 * case (UDP never does; TCP's splice and zero-copy reads do not), so reads are matched otherwise: for
 * UDP by order, the n-th packet queued on a socket is its n-th datagram read (sock_recv_length; timing
 * 1 in N, only timed datagrams take numbers, from the reads so far and their place in the queue); for
 * TCP by byte sequence number, a packet is read once the socket's read position (copied_seq) reaches
 * the end of its data. Each socket's queue is a ring in the shared array lt_sockq starting at the
 * socket's hash: entry (hash + seq) mod size, tagged with the socket and sequence number, so a read
 * finds its packet or nothing, never another's. */
struct lt_sockq_ent {
    /* What a read needs comes first, 56 bytes in the entry's first cache line (LT_LINE_ALIGNED: entries
     * start on a line), so that a read on another CPU than the write (the usual case: the application
     * reads on its own CPU) takes one line from the writer instead of three. */
    u64 sk;  /* 0: free (read, or never written) */
    u64 seq;
    u64 first; /* the journey's first boundary (lt_first(&f)) */
    u64 ready; /* its sock_ready boundary */
    u32 end_seq; /* TCP: the byte sequence number after its data (rcv_nxt at its wakeup; its own end when it
                  * was queued out of order) */
    u32 slot;
    u64 skb;      /* UDP, counted (lt_sockq_pos.counted): the skb's address, to see whether it left the queue */
    u32 skb_head; /* and the low bits of its skb->head, and its skb->len then (a freed skb's address soon */
    u32 skb_len;  /* carries another packet) */
    u64 ino;      /* UDP, counted: its socket's inode number (a socket at a closed one's address has another) */
    struct lt_flight f; /* the journey so far: read only to send it (a slow or sampled packet), 128 bytes */
};
_Static_assert(sizeof(struct lt_sockq_ent) == 192, "lt_sockq_ent: 3 cache lines, its header in the first");

struct lt_sockq_pos {
    u64 sk;   /* key; 0: free */
    u64 head; /* next sequence number a read takes */
    u64 tail; /* next sequence number a queued packet gets */
    u32 skip; /* UDP: reads still due to packets queued before we saw the socket */
    u32 tcp;  /* a TCP socket (its reads are matched by byte sequence number, not by order) */
    u32 peer; /* TCP: its peer (lt_tcp_peer): another one at this address is a new connection */
    u32 counted; /* UDP, first seen while its target timed 1 packet in N: only timed datagrams take numbers,
                  * their reads' (lt_udp_push_counted); lt_sockq_tag says which numbers are taken */
    u64 late;   /* counted mode: 1 + the number of an entry whose read came later than its number said
                 * (lt_udp_due), 0: none */
    u64 ino;    /* counted mode: the socket's inode number (a socket at a closed one's address has another) */
    u64 pad;
};
_Static_assert(sizeof(struct lt_sockq_pos) == 64, "lt_sockq_pos: one cache line a socket");

/* One segment of one target, per CPU: its figures and its histogram in one value, so that recording a
 * latency looks up one map value (a per-CPU array's lookup loads the value's per-CPU address from the
 * map: with the histogram a map of its own, indexed by bucket, that was a line picked at random from an
 * array of LT_MAX_TARGETS * LT_NSEG * LT_NB addresses for every latency recorded). */
struct lt_seg_stat {
    u64 count;
    u64 sum_ns;
    u64 max_ns;
    u64 zero;
    u32 hist[LT_NB]; /* latencies per bucket (lt_bucket); zero ones are counted in `zero` only */
};
_Static_assert((LT_NB & (LT_NB - 1)) == 0, "lt_record masks a bucket with LT_NB - 1");

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
BPF_ARRAY(lt_nic_irq, u8, LT_MAX_IRQ);                 /* 1 at the IRQ numbers of physical NIC queues */
BPF_ARRAY(lt_hostdev, u64, LT_HOSTDEV_KINDS * LT_HOSTDEV_WORDS); /* per kind, a bit per host ifindex (lt_filter_hostdev) */
BPF_ARRAY(lt_loud, u32, LT_LOUD_SIZE); /* written by the probes: senders whose packets reached a traced pod
                                        * in a quiet run (lt_src_fold; 0: empty) */

/* An array whose values start on a page, so that an entry of a whole number of cache lines (or of a
 * power of two below one) never shares a line with another, nor straddles two: a plain array's values
 * start where struct bpf_array ends, 56 bytes into a line on 6.18, which made every 128-byte in-flight
 * entry three lines and put the ends of neighbouring entries (one packet's and another's, written on
 * two CPUs) in one line. A mapped array (BPF_F_MMAPABLE) starts its values on a page; the programs'
 * lookups are inlined the same way. */
#define LT_LINE_ALIGNED(name, leaf, n) BPF_F_TABLE("array", u32, leaf, name, n, BPF_F_MMAPABLE)

/* Each CPU's state and caches, indexed by the CPU's number: a plain array that user space maps
 * (BPF_F_MMAPABLE), not a per-CPU one, so that it can store one field of a CPU's entry (want_gen) while
 * that CPU's programs write the others; a per-CPU array's update from user space writes whole values. */
BPF_F_TABLE("array", u32, struct lt_cpu_ctx, lt_cpu, LT_NCPU, BPF_F_MMAPABLE);

/* In-flight packets: 2^LT_RX_BITS + 2^LT_TX_BITS entries, two ways per set (lt_set()), and their tags. */
struct lt_tags {
    u64 skb[2]; /* the skb addresses of a set's two entries; 0: free */
};
/* One table for both directions: receive sets are [0, LT_RX_SETS), transmit sets follow them (so
 * receive entries are [0, 2*LT_RX_SETS), transmit entries the 2*LT_TX_SETS after). */
#define LT_RX_SETS (1u << (LT_RX_BITS - 1))
#define LT_TX_SETS (1u << (LT_TX_BITS - 1))
LT_LINE_ALIGNED(lt_tagsets, struct lt_tags, LT_RX_SETS + LT_TX_SETS);
LT_LINE_ALIGNED(lt_flights, struct lt_flight, 2 * (LT_RX_SETS + LT_TX_SETS));
LT_LINE_ALIGNED(lt_sockq_pos, struct lt_sockq_pos, 1 << LT_SOCK_BITS); /* socket -> its queue, direct-mapped */
LT_LINE_ALIGNED(lt_sockq, struct lt_sockq_ent, 1 << LT_SOCKQ_BITS);    /* the queued packets (lt_sockq_ent) */
/* Beside each entry of lt_sockq, the sequence number + 1 of the timed packet it holds, written last, on
 * counted sockets only (lt_sockq_pos.counted): 8 to a cache line, so that a read of an untimed packet
 * (7 in 8 when timing 1 in 8) costs a load from a line it has used before instead of a miss on the
 * entry's lines. (64-bit: BCC's compiler has no 32-bit atomic exchange.) */
LT_LINE_ALIGNED(lt_sockq_tag, u64, 1 << LT_SOCKQ_BITS);
/* Programs that go on in a fresh run of themselves (a tail call) when one run's bounded loop has more
 * to do; filled by the loader (the table: program.py TAIL_CALLS). */
BPF_PROG_ARRAY(lt_tail, LT_TAIL_SLOTS);

/* Results. */
BPF_PERCPU_ARRAY(lt_stat, struct lt_seg_stat, LT_MAX_TARGETS * LT_NSEG);
BPF_PERCPU_HASH(lt_drops, struct lt_drop_key, u64, LT_MAX_TARGETS * 32);
BPF_PERCPU_ARRAY(lt_counters, u64, LT_NCOUNTERS);
BPF_PERCPU_ARRAY(lt_packets, u64, LT_MAX_TARGETS * 2); /* packets per target and direction at their first boundary */
BPF_PERCPU_ARRAY(lt_rate, struct lt_rate, LT_MAX_TARGETS);
BPF_RINGBUF_OUTPUT(lt_events, LT_RINGBUF_PAGES);

/* Position of a pointer-sized key in a table of 2^bits entries (Fibonacci hashing: the top bits of
 * the product, where slab addresses that differ in a few middle bits spread out). */
static __always_inline u32 lt_hash64(u64 key, u32 bits)
{
    return (u32)((key * 0x9E3779B97F4A7C15ULL) >> (64 - bits));
}

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

static __always_inline void lt_count_add(u32 which, u64 n)
{
    u64 *c = lt_counters.lookup(&which);
    if (c)
        *c += n;
}

static __always_inline void lt_count(u32 which)
{
    lt_count_add(which, 1);
}

/* A random u32 from this CPU's xorshift64* generator (Marsaglia; Vigna's multiplier), seeded by the kernel's
 * at its first use. The same kind of per-CPU generator as bpf_get_prandom_u32() (a Tausworthe one), in
 * a few inlined instructions instead of a helper call (about 40 ns a call on a VM with this kernel's
 * return-thunk mitigations): it is drawn once for every packet into or out of a target that times 1 in N. */
static __always_inline u32 lt_rand(struct lt_cpu_ctx *c)
{
    u64 x = c->rng;
    if (!x)
        x = ((u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32() | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    c->rng = x;
    return (u32)((x * 0x2545F4914F6CDD1DULL) >> 32);
}

/* Does target t time every packet (no draw)? time_below is 2^32 then, above every random u32. */
static __always_inline int lt_times_every_packet(struct lt_target *t)
{
    return t->time_below > 0xffffffffULL;
}

/* record: a packet of target `slot` at its first boundary (exact, timed or not); 1 if it is to be timed.
 * The choice is random (lt_rand, compared with a threshold: no divide), not every N-th packet of a CPU:
 * a per-CPU counter locks onto periodic traffic (a request/response protocol alternating data and ACKs
 * on one CPU would time only one of the two). */
static __always_inline int lt_draw(struct lt_cpu_ctx *c, struct lt_target *t)
{
    return lt_times_every_packet(t) || lt_rand(c) < t->time_below;
}

static __always_inline void lt_count_packets(u32 slot, u32 dir, u32 n)
{
    u32 i = slot * 2 + dir;
    u64 *p = lt_packets.lookup(&i);
    if (p)
        *p += n;
}

static __always_inline void lt_count_only(u32 slot, u32 dir)
{
    lt_count_packets(slot, dir, 1);
}

static __always_inline int lt_count_packet(struct lt_cpu_ctx *c, struct lt_target *t, u32 slot, u32 dir)
{
    lt_count_only(slot, dir);
    return lt_draw(c, t);
}

static __always_inline int lt_timed(struct lt_flight *f)
{
    return !(f->flags & LT_F_UNTIMED);
}

/* Reading kernel memory. Typed tracepoints (LT_TYPED, node_agent/kernel/progload.py) see their
 * arguments as typed kernel pointers: a read through one is a plain load that the JIT guards against
 * faults (a fault reads 0), checked against BTF by the verifier, a few ns. Raw tracepoints read with the
 * bpf_probe_read_kernel() helper, about 30 ns a call whatever its size, so there one read of a window
 * of a struct (below) serves several fields. */
#if LT_TYPED
/* In assembly: BCC's rewriter turns some plain loads from kernel pointers into helper calls (it did so
 * for every 16-bit one here, costing 70 ns a packet in two hooks) and leaves assembly alone. */
static __always_inline void *lt_ld_ptr(const void *base, u32 off)
{
    void *v;
    asm volatile("%0 = *(u64 *)(%1 + 0)" : "=r"(v) : "r"((const char *)base + off));
    return v;
}
static __always_inline u32 lt_ld32(const void *base, u32 off)
{
    u32 v;
    asm volatile("%0 = *(u32 *)(%1 + 0)" : "=r"(v) : "r"((const char *)base + off));
    return v;
}
static __always_inline u16 lt_ld16(const void *base, u32 off)
{
    u16 v;
    asm volatile("%0 = *(u16 *)(%1 + 0)" : "=r"(v) : "r"((const char *)base + off));
    return v;
}
static __always_inline u8 lt_ld8(const void *base, u32 off)
{
    u8 v;
    asm volatile("%0 = *(u8 *)(%1 + 0)" : "=r"(v) : "r"((const char *)base + off));
    return v;
}
/* A member of struct tcp_sock, past struct sock (which is all the verifier knows a socket argument to
 * be): through the socket as a TCP socket (a helper that only checks its type); 0 if it is not one. */
static __always_inline u32 lt_tcp_ld32(void *sk, u32 off)
{
    void *tp = bpf_skc_to_tcp_sock(sk);
    return tp ? lt_ld32(tp, off) : 0;
}
/* Any other member past struct sock (rarely read): with the helper, as raw tracepoints do. */
static __always_inline u32 lt_sk_ld32(void *sk, u32 off)
{
    u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (const char *)sk + off);
    return v;
}
static __always_inline void *lt_sk_ld_ptr(void *sk, u32 off)
{
    void *v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (const char *)sk + off);
    return v;
}
#else
static __always_inline void *lt_ld_ptr(const void *base, u32 off)
{
    void *v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (const char *)base + off);
    return v;
}
static __always_inline u32 lt_ld32(const void *base, u32 off)
{
    u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (const char *)base + off);
    return v;
}
static __always_inline u16 lt_ld16(const void *base, u32 off)
{
    u16 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (const char *)base + off);
    return v;
}
static __always_inline u8 lt_ld8(const void *base, u32 off)
{
    u8 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (const char *)base + off);
    return v;
}
#define lt_tcp_ld32 lt_ld32
#define lt_sk_ld32 lt_ld32
#define lt_sk_ld_ptr lt_ld_ptr
#endif

/* n 32-bit words of packet data at src (skb->head and an offset) into h; 0, or -1 if unreadable (raw). */
static __always_inline int lt_pkt_read(u32 *h, u32 n, const void *src)
{
#if LT_TYPED
#pragma unroll
    for (u32 i = 0; i < n; i++)
        h[i] = lt_ld32(src, 4 * i);
    return 0;
#else
    return bpf_probe_read_kernel(h, 4 * n, src) < 0 ? -1 : 0;
#endif
}

/* A kernel pointer as a number: a key, or a hash's input. Raw tracepoints read pointers as numbers.
 * Typed tracepoints' pointers may be loaded through, stored and compared, but the verifier refuses
 * arithmetic on them beyond adding an offset; the difference of two pointers is a number, though: the
 * pointer's distance from one map value, the same in every program and on every CPU, is the key (the
 * address itself less a constant, never compared with an address read as a number; NULL's is 0). The
 * map value's address is an immediate in the program: no load. (Adding the address back, held in the
 * value, cost a load of a line of its own, first in most programs: 6% of lt_net_dev_queue's samples.) */
#if LT_TYPED
BPF_ARRAY(lt_anchor, u64, 1);
static __always_inline u64 lt_key(const void *p)
{
    u32 zero = 0;
    u64 *a = lt_anchor.lookup(&zero);
    if (!a)
        return 0;
    return p ? (u64)((const char *)p - (const char *)a) : 0;
}
#define LT_KEY(p) lt_key((const void *)(p))
/* The key of an address read as a number (by a helper): less the anchor's address, which the anchor
 * holds once a program has stored it there (rarely used: a load of the anchor's line). */
static __always_inline u64 lt_key_of_addr(u64 addr)
{
    u32 zero = 0;
    u64 *a = lt_anchor.lookup(&zero);
    if (!a)
        return 0;
    if (!*a)
        *a = (u64)a;
    return addr ? addr - *(volatile u64 *)a : 0;
}
#else
#define LT_KEY(p) ((u64)(p))
#define lt_key_of_addr(addr) ((u64)(addr))
#endif

/* The current task, as a pointer the probes can read through (typed) or as a number (raw). */
#if LT_TYPED
#define LT_CURRENT_TASK() ((void *)bpf_get_current_task_btf())
#else
#define LT_CURRENT_TASK() ((void *)bpf_get_current_task())
#endif

static __always_inline void *lt_read_ptr(void *base, u32 off)
{
    return lt_ld_ptr(base, off);
}

/* Reads size bytes at offset off of skb_shinfo(skb) (the skb's data buffer `head` holds it at skb->end)
 * into dst: a helper's read, as the verifier lets no plain load through a data pointer. */
static __always_inline void lt_shinfo_read(void *skb, const void *head, u32 off, void *dst, u32 size)
{
    u32 end = lt_ld32(skb, LT_OFF_SKB_END);
    bpf_probe_read_kernel(dst, size, (const char *)head + end + off);
}

static __always_inline u32 lt_net_inum(void *net)
{
    return lt_ld32(net, LT_OFF_NET_INUM);
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
    return lt_ld32(dev, LT_OFF_DEV_IFINDEX);
}

/* A device's namespace (struct net *) and ifindex: one read of the window of struct net_device that
 * holds both where they are close (they are 40 bytes apart on 6.x), else two. */
#define LT_DEV_WIN_START (LT_OFF_DEV_IFINDEX < LT_OFF_DEV_NET ? LT_OFF_DEV_IFINDEX : LT_OFF_DEV_NET)
#define LT_DEV_WIN_LEN ((LT_OFF_DEV_IFINDEX < LT_OFF_DEV_NET ? LT_OFF_DEV_NET : LT_OFF_DEV_IFINDEX) + 8 - LT_DEV_WIN_START)
static __always_inline void *lt_dev_read(void *dev, u32 *ifindex)
{
#if LT_DEV_WIN_LEN <= 128 && !LT_TYPED
    u8 w[LT_DEV_WIN_LEN];
    if (bpf_probe_read_kernel(w, sizeof(w), dev + LT_DEV_WIN_START) < 0) {
        *ifindex = 0;
        return NULL;
    }
    *ifindex = *(u32 *)(w + LT_OFF_DEV_IFINDEX - LT_DEV_WIN_START);
    return *(void **)(w + LT_OFF_DEV_NET - LT_DEV_WIN_START);
#else
    *ifindex = lt_dev_ifindex(dev);
    return lt_read_ptr(dev, LT_OFF_DEV_NET);
#endif
}

/* filter: host device `ifindex` is of this kind (bitmaps in lt_hostdev, filled by user space): an uplink
 * (LT_HOSTDEV_UPLINK: a NIC, or what is stacked on one), or the host side of a traced pod's veth
 * (LT_HOSTDEV_POD). One inlined array load, before anything reads the packet. */
static __always_inline int lt_filter_hostdev(u32 kind, s32 ifindex)
{
    u32 w = (u32)ifindex >> 6;
    if (w >= LT_HOSTDEV_WORDS)
        return 0;
    w += kind * LT_HOSTDEV_WORDS;
    u64 *bits = lt_hostdev.lookup(&w);
    return bits && (*bits >> (ifindex & 63) & 1);
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
/* 1 if a > b, without a branch, for a, b < 2^63 or both >= 2^63 (their difference then fits in 63
 * bits). BPF has no set-on-compare: a C comparison is a jump, and the verifier follows each side with
 * its own constant; six of them in lt_fls64 and eight in lt_bucket made every recorded latency 2^6 * 9
 * paths, which bounded loops that record several (lt_tcp_rcv_space_adjust) multiplied past the
 * verifier's limit. Arithmetic keeps one path. */
static __always_inline u64 lt_gt(u64 a, u64 b)
{
    return (b - a) >> 63;
}

static __always_inline u32 lt_fls64(u64 v)
{
    u32 k, b;
    k = (u32)(((v >> 32) + 0xFFFFFFFFULL) >> 32) << 5; /* v >> 32 is nonzero */
    v >>= k;
    b = (u32)lt_gt(v, 0xFFFF) << 4;
    v >>= b;
    k |= b;
    b = (u32)lt_gt(v, 0xFF) << 3;
    v >>= b;
    k |= b;
    b = (u32)lt_gt(v, 0xF) << 2;
    v >>= b;
    k |= b;
    b = (u32)lt_gt(v, 0x3) << 1;
    v >>= b;
    k |= b;
    return k | (u32)(v >> 1);
}

/* Histogram position of a latency of ns > 0: the OpenTelemetry scale-3 bucket index of ns/1e9 seconds,
 * minus LT_INDEX_MIN, without a divide. Every octave [2^o, 2^(o+1)) of ns holds exactly eight bucket
 * boundaries 1e9 * 2^(i/8) (log2(1e9) is irrational), and normalised to the top bit they are the same
 * eight numbers LT_M0..LT_M7 in every octave (floor of the exact value, computed in
 * node_agent/histogram.py). With m = ns shifted so that its top bit is bit 63 (exact), ns is above a
 * boundary exactly when m is above its normalised floor, so the index is 8*o + LT_OCTAVE_BASE plus the
 * number of those m exceeds (strictly: buckets are upper-inclusive, and the one boundary of an octave
 * that is an integer, 1e9 * 2^k ns, is LT_M7 exactly). node_agent/histogram.py mirrors this and the
 * tests check both agree. */
static __always_inline u32 lt_bucket(u64 ns)
{
    u32 o = lt_fls64(ns);
    u64 m = ns << (63 - o);
    s32 idx = 8 * (s32)o + LT_OCTAVE_BASE - LT_INDEX_MIN;
    idx += lt_gt(m, LT_M0) + lt_gt(m, LT_M1) + lt_gt(m, LT_M2) + lt_gt(m, LT_M3) + lt_gt(m, LT_M4) +
           lt_gt(m, LT_M5) + lt_gt(m, LT_M6) + lt_gt(m, LT_M7); /* m and LT_M* are all >= 2^63 */
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
    u32 b = lt_bucket(ns);
    asm volatile("" : "+r"(b)); /* the compiler knows b < LT_NB, the verifier would not: keep the mask */
    st->hist[b & (LT_NB - 1)]++;
}

/* Clocks. A boundary of a timed packet is read with bpf_ktime_get_ns(), the dearest thing most hooks do
 * (the TSC read behind it; in this VM, sparing untimed packets the one in netif_receive_skb saved 46 ns a
 * run). A flight's age, and the marks an untimed packet's flight keeps of where it has been, need no such
 * precision: in a NET_RX run (where packets are received and forwarded) they take the run's start, which
 * lt_softirq_entry has read already; elsewhere the clock. (bpf_ktime_get_coarse_ns is not offered to
 * tracing programs.) Ages are compared with LT_STALE_NS (1 s) and a run lasts a few ms at most, so a
 * difference of two such times is compared signed (lt_within). */
static __always_inline u64 lt_age(struct lt_cpu_ctx *c)
{
    return c->t_softirq ? c->t_softirq : bpf_ktime_get_ns();
}

/* The clock now, given `age` from lt_age just before (which is the clock outside a NET_RX run). */
static __always_inline u64 lt_clock(struct lt_cpu_ctx *c, u64 age)
{
    return c->t_softirq ? bpf_ktime_get_ns() : age;
}

/* A boundary's time for flight f: the clock if its packet is timed, else `age`. */
static __always_inline u64 lt_stamp(struct lt_flight *f, struct lt_cpu_ctx *c, u64 age)
{
    return (f->flags & LT_F_UNTIMED) ? age : lt_clock(c, age);
}

/* `then` is less than `ns` before `now` (or after it: clocks of two resolutions). */
static __always_inline int lt_within(u64 now, u64 then, u64 ns)
{
    return (s64)(now - then) < (s64)ns;
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
    u32 data_len;     /* not 0: paged data or a chain (a GRO skb's are) */
    s32 iif;          /* skb_iif: the device it was received on; 0 for a packet this host's stack made */
    u16 protocol;
    u16 network_header;
    u16 transport_header;
};

static __always_inline void lt_skb_read(void *skb, struct lt_skb_view *v)
{
#if LT_TYPED
    v->dev = lt_ld_ptr(skb, LT_OFF_SKB_DEV);
    v->sk = lt_ld_ptr(skb, LT_OFF_SKB_SK);
    v->data = lt_ld_ptr(skb, LT_OFF_SKB_DATA);
    v->head = lt_ld_ptr(skb, LT_OFF_SKB_HEAD);
    v->len = lt_ld32(skb, LT_OFF_SKB_LEN);
    v->data_len = lt_ld32(skb, LT_OFF_SKB_DATA_LEN);
    v->iif = (s32)lt_ld32(skb, LT_OFF_SKB_IIF);
    v->protocol = lt_ld16(skb, LT_OFF_SKB_PROTOCOL);
    v->network_header = lt_ld16(skb, LT_OFF_SKB_NETWORK_HEADER);
    v->transport_header = lt_ld16(skb, LT_OFF_SKB_TRANSPORT_HEADER);
#else
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
    v->data_len = *(u32 *)(w + LT_OFF_SKB_DATA_LEN - LT_SKB_WIN_START);
    v->iif = *(s32 *)(w + LT_OFF_SKB_IIF - LT_SKB_WIN_START);
    v->protocol = *(u16 *)(w + LT_OFF_SKB_PROTOCOL - LT_SKB_WIN_START);
    v->network_header = *(u16 *)(w + LT_OFF_SKB_NETWORK_HEADER - LT_SKB_WIN_START);
    v->transport_header = *(u16 *)(w + LT_OFF_SKB_TRANSPORT_HEADER - LT_SKB_WIN_START);
#endif
}

static __always_inline int lt_is_ip(struct lt_skb_view *v)
{
    return v->protocol == LT_ETH_P_IP || v->protocol == LT_ETH_P_IPV6;
}

/* The packet's addresses from its network header at nh, and its ports from the same read (assuming no
 * IP options or IPv6 extension headers; else they stay 0), so that a packet followed from here carries
 * its addresses without reading them again. The same read says whether a socket will read it (*tcpf:
 * LT_F_NODATA for a bare ACK; for a packet of neither TCP nor UDP, which the stack takes itself: ICMP,
 * IGMP, IPv6's MLD behind a hop-by-hop header; and for a fragment, of which reassembly keeps one skb and
 * frees the rest, with LT_F_FRAG (and LT_F_FRAG_FIRST for its datagram's first) and its datagram's id in
 * a->frag_id. LT_F_FIN for a segment that ends the stream, whose FIN takes a sequence number no read
 * passes). 0, or -1 when it is not IP or cannot be read (`a` is then all zero: family 0). */
static __always_inline int lt_ip_hdr(struct lt_skb_view *v, void *nh, struct lt_addrs *a, u8 *tcpf)
{
    __builtin_memset(a, 0, sizeof(*a));
    *tcpf = 0;
    if (v->protocol == LT_ETH_P_IP) {
        u32 h[9]; /* the 20-byte header without options, then the ports and the TCP header to its offset */
        if (lt_pkt_read(h, sizeof(h) / 4, nh) < 0)
            return -1;
        a->family = 4;
        a->proto = (h[2] >> 8) & 0xff; /* byte 9 */
        a->saddr[0] = h[3];
        a->daddr[0] = h[4];
        if ((h[1] >> 16) & 0xff3f) { /* bytes 6-7: the more-fragments flag and the fragment offset */
            *tcpf = LT_F_NODATA | LT_F_FRAG | ((h[1] >> 16) & 0xff1f ? 0 : LT_F_FRAG_FIRST);
            a->frag_id = h[1] & 0xffff; /* bytes 4-5 */
        } else if (a->proto != LT_IPPROTO_TCP && a->proto != LT_IPPROTO_UDP)
            *tcpf = LT_F_NODATA;
        else if ((h[0] & 0xf) == 5) {
            a->sport = h[5] & 0xffff;
            a->dport = h[5] >> 16;
            if (a->proto == LT_IPPROTO_TCP) {
                u32 tot = ((h[0] >> 8) & 0xff00) | (h[0] >> 24); /* bytes 2-3, network order */
                u32 doff = (h[8] >> 4) & 0xf;                  /* byte 32: TCP data offset */
                *tcpf = (tot == 20 + 4 * doff ? LT_F_NODATA : 0) | ((h[8] >> 8) & 1 ? LT_F_FIN : 0); /* byte 33: flags */
            }
        }
        return 0;
    }
    if (v->protocol == LT_ETH_P_IPV6) {
        u32 h[14]; /* the 40-byte header, then the ports and the TCP header to its offset */
        if (lt_pkt_read(h, sizeof(h) / 4, nh) < 0)
            return -1;
        a->family = 6;
        a->proto = (h[1] >> 16) & 0xff; /* byte 6: next header */
#pragma unroll
        for (int i = 0; i < 4; i++) {
            a->saddr[i] = h[2 + i];
            a->daddr[i] = h[6 + i];
        }
        if (a->proto == LT_IPV6_FRAGMENT) { /* its bytes 2-3 (the packet's 42-43): the offset, then flags */
            *tcpf = LT_F_NODATA | LT_F_FRAG | ((h[10] >> 16) & 0xf8ff ? 0 : LT_F_FRAG_FIRST);
            a->frag_id = h[11] >> 16; /* the packet's bytes 46-47: the half that changes from one datagram to the next */
        } else if (a->proto != LT_IPPROTO_TCP && a->proto != LT_IPPROTO_UDP) {
            *tcpf = LT_F_NODATA; /* ICMPv6, or an extension header (hop-by-hop) first */
        } else {
            a->sport = h[10] & 0xffff;
            a->dport = h[10] >> 16;
            if (a->proto == LT_IPPROTO_TCP) {
                u32 plen = ((h[1] << 8) & 0xff00) | ((h[1] >> 8) & 0xff); /* bytes 4-5 */
                u32 doff = (h[13] >> 4) & 0xf;                          /* byte 52 */
                *tcpf = (plen == 4 * doff ? LT_F_NODATA : 0) | ((h[13] >> 8) & 1 ? LT_F_FIN : 0); /* byte 53: flags */
            }
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

/* A source address (four words, an IPv4 one in the first with the rest 0) in 32 bits: lt_loud's key, and
 * the peer part of lt_tcp_peer. */
static __always_inline u32 lt_src_fold(const u32 *saddr)
{
    return saddr[0] ^ saddr[1] ^ saddr[2] ^ saddr[3];
}

static __always_inline u32 lt_loud_idx(u32 src)
{
    return (src * 2654435769u) >> 24; /* LT_LOUD_SIZE: 2^8 */
}

/* filter: a packet another (untraced) pod queues on its device, whose raise of NET_RX will follow on this
 * CPU: is it quiet, addressed to no traced pod and from a sender not made loud (see LT_PEND_QUIET)? Two
 * loads of its header and two array lookups; its source (lt_src_fold) in *src, and in *dst the slot of
 * the traced pod it is addressed to (-1: none). */
static __always_inline int lt_quiet_send(struct lt_skb_view *v, u32 *src, s32 *dst)
{
    if (v->network_header == 0xffff)
        return 0;
    void *nh = v->head + v->network_header;
    if (v->protocol == LT_ETH_P_IP) {
        u32 h[2]; /* bytes 12-19: source and destination */
        if (lt_pkt_read(h, 2, nh + 12) < 0)
            return 0;
        *dst = lt_ip4_slot(h[1]);
        if (*dst >= 0)
            return 0;
        *src = h[0]; /* lt_src_fold of the address */
    } else {
        u32 h[8]; /* bytes 8-39 */
        if (lt_pkt_read(h, 8, nh + 8) < 0)
            return 0;
        *dst = lt_ip6_slot((struct lt_in6 *)&h[4]);
        if (*dst >= 0)
            return 0;
        *src = lt_src_fold(h);
    }
    u32 i = lt_loud_idx(*src);
    u32 *loud = lt_loud.lookup(&i);
    return !loud || *loud != *src;
}

/* record: the packet a pod queues (`quiet` from lt_quiet_send for an untraced pod's, 0 for a traced pod's)
 * decides whether the NET_RX raise that follows on this CPU is quiet. One that needs times also gives
 * them to a quiet NET_RX already pending for another packet, or running, as that run carries this one
 * too: the moment it was queued is then its irq and softirq boundary (a packet sent from within a run:
 * a reply the kernel sends itself, one released when neighbour resolution completes). */
static __always_inline void lt_record_send_quiet(struct lt_cpu_ctx *c, int quiet, u32 src, u64 key)
{
    u64 p = c->t_pending;
    if (p >= LT_PEND_TIMED)
        return;
    if (quiet) {
        if (p == 0 && c->t_irq != LT_PEND_QUIET) { /* sent from within a quiet run, it raises nothing */
            c->t_pending = LT_PEND_QUIET_NEXT;
            c->quiet_src = src;
            c->quiet_skb = key;
        }
        return;
    }
    if (p == LT_PEND_QUIET_NEXT || p == LT_PEND_UNTIMED_NEXT) {
        c->t_pending = 0;
        c->quiet_skb = 0;
    } else if (p == LT_PEND_QUIET || p == LT_PEND_UNTIMED) {
        c->t_pending = bpf_ktime_get_ns();
    } else if (c->t_irq == LT_PEND_QUIET) {
        u64 now = bpf_ktime_get_ns();
        c->t_irq = now;
        c->t_softirq = now;
        c->quiet_skb = 0; /* it may have taken the quiet packet's freed skb */
    }
}

/* record: another pod queues a packet into traced pod `dst`, whose raise of NET_RX follows on this CPU.
 * Timing 1 in N, the packet is drawn for timing here (its run takes the draw, lt_record_rx_start), and an
 * untimed one raises NET_RX untimed (see LT_PEND_UNTIMED). */
static __always_inline void lt_record_send_into(struct lt_cpu_ctx *c, s32 dst, u64 key)
{
    struct lt_target *t = lt_target(dst);
    if (!t || lt_times_every_packet(t)) {
        lt_record_send_quiet(c, 0, 0, 0); /* every packet timed */
        return;
    }
    int timed = lt_draw(c, t);
    c->pre_skb = key | timed;
    if (c->quiet_skb == key)
        c->quiet_skb = 0; /* (a quiet run's packet freed, its skb taken by this one) */
    if (timed) {
        lt_record_send_quiet(c, 0, 0, 0);
        return;
    }
    u64 p = c->t_pending;
    /* (Sent from within a quiet run, it raises nothing: that run's hooks read the clock for its age.) */
    if (p == LT_PEND_QUIET_NEXT || (p == 0 && c->t_irq != LT_PEND_QUIET)) {
        c->t_pending = LT_PEND_UNTIMED_NEXT;
        c->quiet_skb = 0;
    } else if (p == LT_PEND_QUIET) {
        c->t_pending = LT_PEND_UNTIMED; /* the quiet run pending carries it: that run reads its start */
    }
}

/* filter: the packet `key` is the one whose send makes this CPU's NET_RX quiet, from its queueing to the
 * end of the quiet run that delivers it (lt_softirq_exit forgets it; so does a timed run, or a packet
 * that needs times queued before the raise): addressed to no traced pod, from an untraced pod, no
 * traced pod's packet in transmit flight, so that the devices it crosses need not look it up. (Unless a
 * packet of a traced pod turns up in the run, which may take its freed skb: lt_record_rx_start forgets
 * it then.) */
static __always_inline int lt_quiet_pkt(struct lt_cpu_ctx *c, u64 key)
{
    return c->quiet_skb == key;
}

/* record: a packet the host queues is no pod's send: the raise it may cause is not quiet. */
static __always_inline void lt_record_host_send(struct lt_cpu_ctx *c)
{
    if (c->t_pending == LT_PEND_QUIET_NEXT || c->t_pending == LT_PEND_UNTIMED_NEXT) {
        c->t_pending = 0;
        c->quiet_skb = 0;
    }
}

/* Fill the packet's addresses from the skb's network and transport headers (set by then): one read of
 * the skb, one of the IP header, one of the ports. */
static __always_inline void lt_fill_addrs(struct lt_addrs *e, void *skb)
{
    struct lt_skb_view v;
    lt_skb_read(skb, &v);
    if (!v.head || v.network_header == 0xffff)
        return;
    u8 tcpf;
    if (lt_ip_hdr(&v, v.head + v.network_header, e, &tcpf) < 0)
        return;
    /* The transport header is known here: its ports, not the guess after a fixed-size IP header. */
    e->sport = 0;
    e->dport = 0;
    if (v.transport_header != 0xffff && v.transport_header != v.network_header && (e->proto == 6 || e->proto == 17)) {
        u32 ports;
        if (lt_pkt_read(&ports, 1, v.head + v.transport_header) == 0) {
            e->sport = ports & 0xffff;
            e->dport = ports >> 16;
        }
    }
}

/* The kind of event a packet's journey of `total` ns makes: slow, sampled, or 0 for none. */
static __always_inline u8 lt_emit_kind(struct lt_target *t, u64 total)
{
    if (t->slow_ns && total >= t->slow_ns)
        return LT_EV_SLOW;
    if (t->sample_one_in && bpf_get_prandom_u32() % t->sample_one_in == 0)
        return LT_EV_SAMPLED;
    return 0;
}

/* Send the journey of a packet whose kind (slow, sampled, dropped) is decided, within the rate cap. */
static __always_inline void lt_emit_as(struct lt_target *t, struct lt_flight *f, u32 dir, u8 kind, void *skb,
                                       u32 drop_reason)
{
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
    e->skb = f->skb;
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
    /* A transmitted packet's are read when it is emitted, from its skb (after the host's NAT), else (its skb
     * may be gone) as the host's receive read them; a received packet's as its first sighting read them. */
    if (skb && (dir == LT_DIR_TX || !f->addr.family))
        lt_fill_addrs((struct lt_addrs *)&e->saddr, skb);
    else if (f->addr.family)
        __builtin_memcpy(&e->saddr, &f->addr, sizeof(f->addr));
    lt_events.ringbuf_submit(e, 0);
}

/* Send the packet's journey to user space if it is slow, sampled or dropped (kind), within the rate cap.
 * skb: the packet, read for its addresses if its flight has none (NULL when it may be gone). */
static __always_inline void lt_emit(struct lt_target *t, struct lt_flight *f, u32 dir, u8 kind, u64 total,
                                    void *skb, u32 drop_reason)
{
    if (!kind)
        kind = lt_emit_kind(t, total);
    if (kind)
        lt_emit_as(t, f, dir, kind, skb, drop_reason);
}

static __always_inline struct lt_cpu_ctx *lt_this_cpu(void)
{
    u32 cpu = bpf_get_smp_processor_id();
    return lt_cpu.lookup(&cpu);
}

/* record: the handoffs to this CPU's socket wakeups (rx_skb: a traced pod's packet in its stack; tx_skb: one
 * that reached the host) end where the CPU receives its next packet. Each is taken by a wakeup its packet
 * causes while it is being received (netif_receive_skb's delivery runs its socket's sk_data_ready), and
 * lt_softirq_exit ends both with the run. Without that hook (no trace asks for rx_irq or rx_driver) a
 * packet that no socket took (a closed port, a drop) left its handoff behind, for a later wakeup on the
 * CPU to take for its own packet, had that packet's skb come to the freed one's address. Read first: the
 * line is the one sk_data_ready reads at every wakeup, and an untraced pod's packets write nothing. */
static __always_inline void lt_handoffs_end(struct lt_cpu_ctx *c)
{
    if (c->rx_skb | c->tx_skb) {
        c->rx_skb = 0;
        c->tx_skb = 0;
    }
}

/* The per-CPU caches below hold answers for one generation of the target set: forget them when user
 * space has changed it. It writes the new generation into every CPU's entry after the lookup tables
 * (node_agent/tracer.py forget_devices), into the line the caches' first test reads anyway. It does so
 * also when the host has a device it did not have: a device at a freed one's address would inherit its
 * answer (Agent.refresh_host_devices, every interval; until then it does). The word's top bit
 * (LT_GEN_QUIET_RUNS) says whether NET_RX runs may be quiet: only while lt_softirq_exit, which ends each
 * run's quiet state, is attached (node_agent/program.py). */
static __always_inline void lt_cache_check(struct lt_cpu_ctx *c)
{
    u32 gen = *(volatile u32 *)&c->want_gen;
    if (c->cache_gen != gen) {
        if ((c->cache_gen ^ gen) & LT_GEN_QUIET_RUNS) {
            /* Quiet runs switched on or off: no quiet state from before stays (the hook that ended it may
             * have been gone meanwhile). */
            c->quiet_skb = 0;
            if (c->t_pending < LT_PEND_TIMED)
                c->t_pending = 0;
        }
#pragma unroll
        for (int i = 0; i < LT_DEV_CACHE; i++) {
            c->devs[i].dev = 0;
            c->devs[i].slot = -1; /* an empty entry answers "untraced" to a device pointer of 0 */
        }
#pragma unroll
        for (int i = 0; i < LT_NET_CACHE; i++)
            c->nets[i].net = 0;
        c->cache_gen = gen;
    }
}

/* filter: target slot of a network namespace (struct net *): LT_SLOT_HOST for the host's, -1 for another
 * untraced one; cached per CPU like devices. */
static __always_inline s32 lt_filter_net(struct lt_cpu_ctx *c, void *net)
{
    if (!net)
        return -1; /* a failed read: no namespace (an empty cache entry holds 0, with an old answer) */
    lt_cache_check(c);
#pragma unroll
    for (int i = 0; i < LT_NET_CACHE; i++) {
        if (c->nets[i].net == (u64)net)
            return (s32)c->nets[i].slot;
    }
    u32 inum = lt_net_inum(net);
    s32 slot = inum == LT_HOST_NETNS ? LT_SLOT_HOST : lt_netns_slot(inum);
    u32 i = c->net_next++ & (LT_NET_CACHE - 1);
    c->nets[i].net = (u64)net;
    c->nets[i].slot = slot;
    return slot;
}

/* filter: target slot of the namespace a device is in (LT_SLOT_HOST: the host's; -1: another untraced
 * one), and its ifindex. Each CPU
 * remembers the last few devices it saw (a packet into a pod crosses the NIC or a veth, the bridge, the
 * pod's veth) and skips the reads and the lookup; a device not cached costs one read (its namespace's
 * answer is usually cached). */
static __always_inline s32 lt_filter_dev(struct lt_cpu_ctx *c, void *dev, u32 *ifindex)
{
    lt_cache_check(c);
#pragma unroll
    for (int i = 0; i < LT_DEV_CACHE; i++) {
        if (c->devs[i].dev == (u64)dev) {
            *ifindex = c->devs[i].ifindex;
            return c->devs[i].slot;
        }
    }
    u32 ifi;
    s32 slot = lt_filter_net(c, lt_dev_read(dev, &ifi));
    u32 i = c->dev_next++ & (LT_DEV_CACHE - 1);
    c->devs[i].dev = (u64)dev;
    c->devs[i].ifindex = ifi;
    c->devs[i].slot = slot;
    *ifindex = ifi;
    return slot;
}

/* filter: target slot of a socket's namespace: one read (sk->sk_net), then the cache. */
static __always_inline s32 lt_filter_sock(struct lt_cpu_ctx *c, void *sk)
{
    return lt_filter_net(c, lt_read_ptr(sk, LT_OFF_SK_NET));
}

/* In-flight table, one part per direction (LT_DIR_RX, LT_DIR_TX). Set lt_set(dir, skb) has two
 * entries, 2*set and 2*set+1, whose skb addresses are also kept together in a small tag array (16
 * bytes a set): a packet that is not in flight, the common case on a node, costs one load from it,
 * and only a hit touches the entry. A new packet takes the entry holding the same skb, else a free
 * one, else the older, counting LT_C_COLLISION when that one was still young (its packet loses the
 * rest of its journey; nothing is misattributed, since every later boundary checks the skb address).
 * (The direction is a parameter, not a macro: BCC rewrites map calls only in plain code; callers pass
 * a constant, so each inlined copy computes its set as the two-table version did.) */
static __always_inline u32 lt_set(u32 dir, u64 skb)
{
    if (dir == LT_DIR_TX)
        return LT_RX_SETS + lt_hash64(skb, LT_TX_BITS - 1);
    return lt_hash64(skb, LT_RX_BITS - 1);
}

static __always_inline int lt_young(struct lt_flight *f, u64 now)
{
    return lt_within(now, lt_first(f), LT_STALE_NS);
}

/* Which way of a set holds skb: 0 or 1, -1: neither. */
static __always_inline int lt_way_of(struct lt_tags *k, u64 skb)
{
    if (k->skb[0] == skb)
        return 0;
    if (k->skb[1] == skb)
        return 1;
    return -1;
}

/* The way a new packet takes, or -1 when both hold other packets (then the caller evicts). */
static __always_inline int lt_way_for(struct lt_tags *k, u64 skb)
{
    int w = lt_way_of(k, skb);
    if (w >= 0)
        return w;
    if (!k->skb[0])
        return 0;
    if (!k->skb[1])
        return 1;
    return -1;
}

/* A flight of direction dir left behind by a first fragment whose skb the host's reassembly freed (a
 * receive flight's before it reached the pod: pod_rx 0; a transmit flight's before the host sent it on),
 * its data gone on in another skb (lt_host_reassembled, lt_tx_reassembled). */
static __always_inline int lt_left_by_reassembly(u32 dir, u8 flags, u64 pod_rx)
{
    return (flags & LT_F_FRAG_FIRST) && (dir == LT_DIR_TX ? !(flags & LT_F_XMITTED) : !pod_rx);
}

/* Of two flights of a full set, the one to evict (0 or 1), counting a collision if it was young (else, a
 * fragment's flight left by the host's reassembly, as such). */
static __always_inline u32 lt_victim(u32 dir, struct lt_flight *a, struct lt_flight *b, u64 now)
{
    u64 fa = lt_first(a), fb = lt_first(b);
    u32 way = fb < fa;
    if (lt_within(now, way ? fb : fa, LT_STALE_NS))
        lt_count(LT_C_COLLISION); /* (a young fragment's may still be on its way) */
    else if (lt_left_by_reassembly(dir, way ? b->flags : a->flags, way ? b->ts[LT_B_RX_POD_RX] : a->ts[LT_B_RX_POD_RX]))
        lt_count(LT_C_HOST_REASM);
    return way;
}

/* The flight of skb in direction dir, NULL if it has none. */
static __always_inline struct lt_flight *lt_get(u32 dir, u64 skb)
{
    u32 s = lt_set(dir, skb);
    struct lt_tags *k = lt_tagsets.lookup(&s);
    if (!k)
        return NULL;
    int w = lt_way_of(k, skb);
    if (w < 0)
        return NULL;
    u32 i = 2 * s + w;
    struct lt_flight *f = lt_flights.lookup(&i);
    if (f && f->skb == skb)
        return f;
    return NULL;
}

/* The entry a new packet's flight in direction dir goes to (its tag set; the caller fills it), NULL
 * if none. */
static __always_inline struct lt_flight *lt_take(u32 dir, u64 skb, u64 now)
{
    u32 s = lt_set(dir, skb);
    struct lt_tags *k = lt_tagsets.lookup(&s);
    if (!k)
        return NULL;
    int w = lt_way_for(k, skb);
    if (w < 0) {
        u32 i = 2 * s, j = i + 1;
        struct lt_flight *a = lt_flights.lookup(&i);
        struct lt_flight *b = lt_flights.lookup(&j);
        if (!a || !b)
            return NULL;
        w = lt_victim(dir, a, b, now);
    }
    k->skb[w & 1] = skb;
    u32 i = 2 * s + (w & 1);
    return lt_flights.lookup(&i);
}

/* A new flight of skb `key` in direction dir for target `slot`: its entry, cleared, with the packet's
 * identity (address, data buffer) set; NULL if none. */
static __always_inline struct lt_flight *lt_flight_new(u32 dir, u64 key, struct lt_skb_view *v, u32 slot, u64 now)
{
    struct lt_flight *f = lt_take(dir, key, now);
    if (!f)
        return NULL;
    __builtin_memset(f, 0, sizeof(*f));
    f->skb = key;
    f->head = (u32)(u64)v->head;
    f->slot = slot;
    return f;
}

/* Free a flight's entry of direction dir (its journey ended, or it was dropped). */
static __always_inline void lt_free(u32 dir, struct lt_flight *f)
{
    u64 skb = f->skb;
    f->skb = 0;
    u32 s = lt_set(dir, skb);
    struct lt_tags *k = lt_tagsets.lookup(&s);
    if (!k)
        return;
    if (k->skb[0] == skb)
        k->skb[0] = 0;
    if (k->skb[1] == skb)
        k->skb[1] = 0;
}

/* A flight found by skb address is this packet's when it is young and (where skb->head is known)
 * its skb has the same data buffer: a freed skb's address soon carries another packet. */
static __always_inline int lt_same_packet(struct lt_flight *f, struct lt_skb_view *v, u64 now)
{
    return f->head == (u32)(u64)v->head && lt_young(f, now);
}

/* filter: receive flight f, found at its skb's address with another data buffer, is still its packet's, a
 * fragment (tcpf, proto: the packet's lt_ip_hdr) whose skb completed the host's reassembly of its datagram.
 * The node's conntrack reassembles what it tracks before it sends it on fragmented again (bridged
 * traffic too, with br_netfilter, as on a kube-proxy node); the skb that completes a datagram takes over
 * the first fragment's data buffer (skb_morph), the first fragment's skb is freed (its flight is left:
 * lt_count_left) and the completing one's own data goes on in a clone, which starts its flight where the
 * host queues it on the pod's veth. So the skb goes on as a fragment of the same protocol, before it
 * reached the pod and within the flight's age, once a later fragment, now the first (the clone, at the
 * first fragment's freed address often enough, is the other way round: lt_count_left); its times are its
 * own arrival's on the host. */
static __always_inline int lt_host_reassembled(struct lt_flight *f, u8 tcpf, u8 proto, u64 age)
{
    return (f->flags & (LT_F_FRAG | LT_F_FRAG_FIRST)) == LT_F_FRAG &&
           (tcpf & (LT_F_FRAG | LT_F_FRAG_FIRST)) == (LT_F_FRAG | LT_F_FRAG_FIRST) && proto == f->addr.proto &&
           !f->ts[LT_B_RX_POD_RX] && lt_young(f, age);
}

/* filter: flight f, found at the packet's skb address with its data buffer, is the packet's own, as far as
 * fragments go: a first fragment's flight is only if the packet, its IP header at nh, is its datagram's
 * first fragment (the host's reassembly may have left the flight, and another packet taken both its skb
 * and its data buffer: a neighbour solicitation, another datagram's fragment). The header is read only
 * for such a flight. */
static __always_inline int lt_same_datagram(struct lt_flight *f, struct lt_skb_view *v, void *nh)
{
    if (!(f->flags & LT_F_FRAG_FIRST))
        return 1;
    struct lt_addrs addr;
    u8 tcpf;
    return lt_ip_hdr(v, nh, &addr, &tcpf) == 0 && (tcpf & LT_F_FRAG_FIRST) && addr.frag_id == f->addr.frag_id;
}

/* filter: f is a later fragment's flight (not its datagram's first), young at age, and its skb, its IP
 * header at nh, now carries its datagram's first fragment, whose protocol goes to *proto: the host's
 * reassembly completed the datagram with this skb (the receive side's story: lt_host_reassembled; the
 * transmit side's: lt_tx_reassembled). The header is read only for such a flight. */
static __always_inline int lt_filter_now_first(struct lt_flight *f, struct lt_skb_view *v, void *nh, u64 age,
                                               u8 *proto)
{
    if ((f->flags & (LT_F_FRAG | LT_F_FRAG_FIRST)) != LT_F_FRAG || !lt_young(f, age))
        return 0;
    struct lt_addrs addr;
    u8 tcpf;
    if (lt_ip_hdr(v, nh, &addr, &tcpf) < 0 || !(tcpf & LT_F_FRAG_FIRST))
        return 0;
    *proto = addr.proto;
    return 1;
}

/* filter: transmit flight f ended (consumed, or its skb's address carries another packet) with no sighting
 * of the host's receive. A pod's packet leaves through its veth into the host, so the host received it
 * unseen: as a member of a chain the host's GRO built at the pod's host-side veth (rx-udp-gro-forwarding,
 * rx-gro-list: only the chain's head passes netif_receive_skb), or, on the VMs the tests run on, in a
 * softirq that ran while a thread of the VM's init was current, where no BPF program runs (measured:
 * tests/blindspot.py; in one run 62 flights ended here, the 62 datagrams of the one chain the host
 * received there, and its frees there were unseen too). Counted as chained on the host. */
static __always_inline int lt_filter_tx_host_unseen(struct lt_flight *f)
{
    return !f->ts[LT_B_TX_HOST_RX];
}

/* count: flight f of direction dir, which nothing ended, gives way to another packet at its skb's address:
 * a fragment the host's reassembly freed (LT_C_HOST_REASM: counted here, when its address carries the next
 * packet, at no cost to the packets that have no fragments), a sent packet the host received and freed
 * unseen (LT_C_HOST_CHAIN, lt_filter_tx_host_unseen), else a stale flight. */
static __always_inline void lt_count_left(u32 dir, struct lt_flight *f)
{
    if (lt_left_by_reassembly(dir, f->flags, f->ts[LT_B_RX_POD_RX]))
        lt_count(LT_C_HOST_REASM);
    else if (dir == LT_DIR_TX && lt_filter_tx_host_unseen(f))
        lt_count(LT_C_HOST_CHAIN);
    else
        lt_count(LT_C_STALE);
}

/* record: the end of a transmitted packet's journey (shared by the transmit probes, the receive probe
 * that sees it arrive in another namespace, and sk_data_ready for delivery to a host socket). */
static __always_inline void lt_record_tx_done(struct lt_flight *f, u64 done, void *skb)
{
    struct lt_target *t = lt_target(f->slot);
    if (t && lt_wants(t, LT_DIR_TX) && lt_timed(f)) {
        f->ts[LT_B_TX_DONE] = done;
        if (f->flags & LT_F_EGRESS_HOST) {
            lt_record(t, f->slot, LT_SEG_TX_QDISC, f->ts[LT_B_TX_EGRESS_QUEUE], f->ts[LT_B_TX_EGRESS_XMIT]);
            lt_record(t, f->slot, LT_SEG_TX_DRIVER, f->ts[LT_B_TX_EGRESS_XMIT], done);
        }
        u64 first = lt_first(f);
        lt_record(t, f->slot, LT_SEG_TX_TOTAL, first, done);
        lt_emit(t, f, LT_DIR_TX, 0, done - first, skb, 0);
    }
    lt_free(LT_DIR_TX, f);
}

/* record: the skb of a traced pod shows up in netif_receive_skb outside the pod (slot_here: the traced
 * namespace it arrived in, or -1 for an untraced one such as the host's). */
static __always_inline void lt_record_tx_arrival(struct lt_cpu_ctx *c, struct lt_flight *f, void *skb,
                                                 u32 ifindex, s32 slot_here, u64 age)
{
    if (f->flags & LT_F_XMITTED) {
        /* Transmitted by a host device into another namespace (veth to another pod): the driver's
         * return was the completion. */
        lt_record_tx_done(f, f->ts[LT_B_TX_DONE], skb);
        return;
    }
    if (slot_here == (s32)f->slot)
        return; /* still inside the sending pod */
    if (!f->ts[LT_B_TX_HOST_RX]) {
        u64 now = lt_stamp(f, c, age);
        f->ts[LT_B_TX_HOST_RX] = now;
        f->ifindex[1] = ifindex;
        struct lt_target *t = lt_target(f->slot);
        if (t && lt_wants(t, LT_DIR_TX) && lt_timed(f))
            lt_record(t, f->slot, LT_SEG_TX_POD_TO_HOST, f->ts[LT_B_TX_POD_DEV_QUEUE], now);
    }
    c->tx_skb = f->skb;
}

/* record: a new receive flight at its first sighting (boundary host_rx or pod_rx): the packet is
 * counted, and timed or not (lt_count_packet); an untimed one keeps only what follows it to its end.
 * With `irq`, the packet came in through this CPU's NET_RX run, whose times are its irq and softirq
 * boundaries; a packet the host sends has none (the NET_RX run it may be sent from is another packet's). */
static __always_inline void lt_record_rx_start(struct lt_target *t, u32 slot, struct lt_cpu_ctx *c,
                                               struct lt_skb_view *v, struct lt_addrs *addr, u8 tcpf,
                                               u64 key, u32 ifindex, u32 boundary, u8 irq, u64 age)
{
    int timed;
    u64 pre = c->pre_skb;
    if (irq && (pre & ~1ULL) == key) {
        /* drawn where its sender queued it (lt_record_send_into): a timed one made its run timed */
        c->pre_skb = 0;
        lt_count_only(slot, LT_DIR_RX);
        timed = pre & 1;
    } else {
        timed = lt_count_packet(c, t, slot, LT_DIR_RX);
        if (irq && c->t_irq == LT_PEND_QUIET) {
            /* Carried by a quiet run, which has no times for its irq and softirq boundaries: followed
             * untimed, and if it was to be timed, its sender (the one that made the run quiet) is never
             * quiet again. */
            c->quiet_skb = 0;
            if (timed) {
                lt_count(LT_C_QUIET_MISS);
                u32 i = lt_loud_idx(c->quiet_src);
                u32 *loud = lt_loud.lookup(&i);
                if (loud)
                    *loud = c->quiet_src;
                timed = 0;
            }
        }
    }
    u64 now = timed ? lt_clock(c, age) : age;
    struct lt_flight *f = lt_flight_new(LT_DIR_RX, key, v, slot, now);
    if (!f)
        return;
    f->addr.proto = addr->proto; /* the UDP read side follows by protocol */
    f->addr.frag_id = addr->frag_id; /* a fragment's sightings compare it (lt_record_host_rx) */
    f->flags = tcpf | (timed ? 0 : LT_F_UNTIMED);
    f->ts[boundary] = now;
    if (!timed)
        return;
    f->addr = *addr;
    f->cpu = bpf_get_smp_processor_id();
    f->len = v->len;
    if (irq && c->t_softirq) {
        f->ts[LT_B_RX_IRQ] = c->t_irq;
        f->ts[LT_B_RX_SOFTIRQ] = c->t_softirq;
    }
    f->ifindex[boundary == LT_B_RX_HOST_RX ? 0 : 1] = ifindex;
    lt_record(t, slot, LT_SEG_RX_IRQ, f->ts[LT_B_RX_IRQ], f->ts[LT_B_RX_SOFTIRQ]);
    lt_record(t, slot, LT_SEG_RX_DRIVER, f->ts[LT_B_RX_SOFTIRQ], now);
}

/* record: host side, a packet addressed to traced pod `slot`: received by the host (netif_receive_skb,
 * irq 1), or sent by the host itself (its first net_dev_queue, irq 0). */
static __always_inline void lt_record_host_rx(struct lt_cpu_ctx *c, struct lt_skb_view *v, struct lt_addrs *addr,
                                              u8 tcpf, u64 key, u32 ifindex, u32 slot, u8 irq)
{
    struct lt_target *t = lt_target(slot);
    if (!t || !lt_wants(t, LT_DIR_RX))
        return;
    u64 age = lt_age(c);
    struct lt_flight *f = lt_get(LT_DIR_RX, key);
    if (f) {
        /* Already seen on an earlier host device (the NIC before the bridge, the bridge before its port); a
         * fragment of another datagram may come with a freed one's skb and data buffer (the host's
         * reassembly frees a datagram's first fragment before it reaches the pod, and leaves its flight). */
        if (!f->ts[LT_B_RX_POD_RX] && lt_same_packet(f, v, age) && f->addr.frag_id == addr->frag_id)
            return;
        if (lt_host_reassembled(f, tcpf, addr->proto, age)) {
            f->head = (u32)(u64)v->head; /* seen on its way in, before the host's reassembly gave it another */
            return;
        }
        lt_count_left(LT_DIR_RX, f);
    }
    lt_record_rx_start(t, slot, c, v, addr, tcpf, key, ifindex, LT_B_RX_HOST_RX, irq, age);
}

#endif /* LATENCYTRACE_H */
