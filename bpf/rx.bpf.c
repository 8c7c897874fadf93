/* Receive path of traced pods: irq -> softirq -> host_rx -> pod_rx -> sock_ready -> app_read.
 *
 * netif_receive_skb runs for every packet on every device; it is the one place that tells host side
 * from pod side. Inside a traced namespace a packet is ours by its device (a per-CPU cache answers);
 * in the host's namespace, when its destination is a traced pod's IP (one read of the IP header, one
 * inlined array lookup; a packet de-NATed to a pod is addressed to the node here, and starts where the
 * host forwards it, in tx.bpf.c); in another pod's, never (only a traced pod's packet arriving there
 * matters). The same skb crosses the veth into the pod, so the skb address (with skb->head and age)
 * joins the host and pod sightings. sk_data_ready carries only the socket: for TCP the skb is the one
 * tcp_probe (the start of tcp_rcv_established) last named for that socket on this CPU, in NET_RX or from
 * the backlog a reader left; otherwise the one this CPU is processing in the pod, or the socket's receive
 * queue tail. There a packet moves to a per-socket ring (lt_sockq_ent) to wait for its read, which
 * ends the journey: the n-th datagram a UDP socket returns (sock_recv_length) is its n-th queued (timing
 * 1 in N, a timed datagram counts its place in the queue instead: lt_udp_push_counted); a TCP
 * packet is read when the socket's read position passes its data (tcp_rcv_space_adjust, run by every
 * TCP read path: recvmsg, splice, zero-copy receive). Helpers shared with the transmit side (which
 * starts the flights of packets the host itself sends, or forwards de-NATed, into a pod) are in
 * latencytrace.h.
 */
#include "latencytrace.h"

#define LT_MSG_PEEK 2
#define LT_RCV_SHUTDOWN 1 /* sk_shutdown: the peer's FIN is in */

/* filter: lt_host_reassembled for the packet at netif_receive_skb (its IP header at data), read only when
 * f is a later fragment's flight (lt_filter_now_first). */
static __always_inline int lt_reassembled_here(struct lt_flight *f, struct lt_skb_view *v, u64 age)
{
    u8 proto;
    return lt_filter_now_first(f, v, v->data, age, &proto) &&
           lt_host_reassembled(f, LT_F_FRAG | LT_F_FRAG_FIRST, proto, age);
}

/* record: a UDP skb at its first sighting in the pod, which GRO made of several datagrams (the host's, with
 * rx-udp-gro-forwarding or rx-gro-list on the device it came in on): gso_segs of them, each a packet of
 * the pod's, counted here. The pod's UDP splits the skb up again before it queues them, and
 * lt_sk_data_ready follows each from there (f->segs), with the skb's times up to the pod. Asked only of
 * a nonlinear skb (data_len): a linear one is one datagram. */
static __always_inline void lt_record_gro(u32 slot, struct lt_flight *f, void *skb, struct lt_skb_view *v)
{
    if (!v->data_len || f->addr.proto != LT_IPPROTO_UDP)
        return;
    u16 segs = 0;
    lt_shinfo_read(skb, v->head, LT_OFF_SHINFO_GSO_SEGS, &segs, sizeof(segs));
    if (segs < 2)
        return;
    u32 more = segs > 255 ? 254 : segs - 1;
    f->segs = more + 1;
    lt_count_packets(slot, LT_DIR_RX, more);
    lt_count_add(LT_C_GRO_MERGED, more);
}

/* record: pod side, the packet reached a device inside traced pod `slot`. */
static __always_inline void lt_record_pod_rx(struct lt_cpu_ctx *c, void *skb, struct lt_skb_view *v, u64 key,
                                             u32 ifindex, u32 slot, u64 age)
{
    struct lt_target *t = lt_target(slot);
    if (!t || !lt_wants(t, LT_DIR_RX))
        return;
    struct lt_flight *f = lt_get(LT_DIR_RX, key);
    if (f && f->slot == slot && !f->ts[LT_B_RX_SOCK_READY] &&
        ((lt_same_packet(f, v, age) && lt_same_datagram(f, v, v->data)) || lt_reassembled_here(f, v, age))) {
        if (!f->ts[LT_B_RX_POD_RX]) {
            u64 now = lt_stamp(f, c, age);
            f->ts[LT_B_RX_POD_RX] = now;
            f->ifindex[1] = ifindex;
            if (lt_timed(f))
                lt_record(t, slot, LT_SEG_RX_HOST_TO_POD, f->ts[LT_B_RX_HOST_RX], now);
            lt_record_gro(slot, f, skb, v);
        }
        /* else: a further device inside the pod; the first sighting stands */
    } else {
        if (f)
            lt_count_left(LT_DIR_RX, f);
        /* No host-side sighting: sent from the host itself, or from an address we do not know. */
        struct lt_addrs addr;
        u8 tcpf;
        lt_ip_hdr(v, v->data, &addr, &tcpf);
        lt_record_rx_start(t, slot, c, v, &addr, tcpf, key, ifindex, LT_B_RX_POD_RX, 1, age);
        f = lt_get(LT_DIR_RX, key);
        if (!f)
            return;
        lt_record_gro(slot, f, skb, v);
    }
    if (f->flags & LT_F_NODATA) {
        lt_free(LT_DIR_RX, f); /* an ACK: its journey ends in the pod's stack, with nothing to read */
        return;
    }
    c->rx_skb = key;
    c->rx_slot = slot;
}

int lt_netif_receive_skb(struct bpf_raw_tracepoint_args *ctx)
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
    lt_handoffs_end(c);
    u32 ifindex;
    s32 slot = lt_filter_dev(c, v.dev, &ifindex);
    if (slot >= 0) {
        /* Inside a traced pod: received by it, or (pod to pod) the arrival of another pod's packet. */
        u64 age = lt_age(c);
        struct lt_flight *tf = lt_get(LT_DIR_TX, key);
        if (tf && lt_same_packet(tf, &v, age))
            lt_record_tx_arrival(c, tf, skb, ifindex, slot, age);
        lt_record_pod_rx(c, skb, &v, key, ifindex, slot, age);
        return 0;
    }
    if (lt_quiet_pkt(c, key))
        return 0; /* an untraced pod's packet to an untraced address (the node may still DNAT it: that is
                   * seen where the host queues it) */
    if (slot != LT_SLOT_HOST) {
        /* Another (untraced) pod's device: nothing here is on its way into a traced pod, but a traced
         * pod's packet may arrive (pod to pod), which one tag lookup tells. */
        struct lt_flight *tf = lt_get(LT_DIR_TX, key);
        if (tf) {
            u64 age = lt_age(c);
            if (lt_same_packet(tf, &v, age))
                lt_record_tx_arrival(c, tf, skb, ifindex, -1, age);
        }
        return 0;
    }
    /* The host side: at netif_receive_skb the link header is pulled, data points at the network header. */
    struct lt_addrs addr;
    u8 tcpf;
    if (lt_ip_hdr(&v, v.data, &addr, &tcpf) < 0)
        return 0;
    if (lt_addr_slot(&addr, 0) >= 0) { /* only a traced pod's packets can be in transmit flight */
        struct lt_flight *tf = lt_get(LT_DIR_TX, key);
        u64 age = lt_age(c);
        if (tf && lt_same_packet(tf, &v, age)) {
            if (tcpf & LT_F_FRAG)
                tf->flags |= tcpf & (LT_F_FRAG | LT_F_FRAG_FIRST); /* (the host's reassembly: lt_tx_reassembled) */
            if (lt_timed(tf))
                tf->addr = addr; /* for a journey that ends where its skb may be gone (lt_record_host_delivery) */
            lt_record_tx_arrival(c, tf, skb, ifindex, -1, age);
        }
    }
    s32 dst = lt_addr_slot(&addr, 1); /* host side: is it addressed to a traced pod? */
    if (dst >= 0)
        lt_record_host_rx(c, &v, &addr, tcpf, key, ifindex, dst, 1);
    return 0;
}

/* record: the end of a received packet's journey, the application read it: packet f of target slot,
 * readied at `ready`, first seen at `first`. f's lines are touched only to send a slow or sampled
 * journey (a ring entry's reader finds the rest in the entry's header). */
static __always_inline void lt_record_read(struct lt_flight *f, u32 slot, u64 ready, u64 first, u64 now)
{
    struct lt_target *t = lt_target(slot);
    if (!t || !lt_wants(t, LT_DIR_RX))
        return;
    lt_record(t, slot, LT_SEG_RX_SOCKET_QUEUE, ready, now);
    lt_record(t, slot, LT_SEG_RX_TOTAL, first, now);
    u8 kind = lt_emit_kind(t, now - first);
    if (kind) {
        f->ts[LT_B_RX_APP_READ] = now;
        lt_emit_as(t, f, LT_DIR_RX, kind, NULL, 0); /* read: the skb may be gone */
    }
}

/* record: the read of a packet still in its flight entry (read before it reached its socket's ring). */
static __always_inline void lt_record_read_flight(struct lt_flight *f, u64 now)
{
    lt_record_read(f, f->slot, f->ts[LT_B_RX_SOCK_READY], lt_first(f), now);
}

/* record: the read of a packet waiting in its socket's ring. */
static __always_inline void lt_record_read_ent(struct lt_sockq_ent *e, u64 now)
{
    lt_record_read(&e->f, e->slot, e->ready, e->first, now);
}

/* The socket's ring position, if we follow the socket. */
static __always_inline struct lt_sockq_pos *lt_sockq_find(u64 sk)
{
    u32 i = lt_hash64(sk, LT_SOCK_BITS);
    struct lt_sockq_pos *pos = lt_sockq_pos.lookup(&i);
    if (pos && pos->sk == sk)
        return pos;
    return NULL;
}

/* The position entry of a socket seen for the first time, or of a new socket at a freed one's address
 * (it replaces whichever socket held the entry), NULL if none. The packets the entry's socket left
 * unread lose their reads, counted. Reads start `ahead` numbers on.
 * A socket's numbers start at the clock's nanoseconds: no socket gets numbers faster than one a
 * nanosecond, so every earlier socket at the same address numbered below this one's start, and no entry
 * or tag it left in the ring (a closed socket's unread datagrams) can match a read of this one, also when
 * the position entry went to another socket in between (direct-mapped: sockets whose addresses share it
 * take it in turn). Numbering on from the entry's tail did that only while the entry stayed the
 * address's: a socket that restarted at 0 took such a datagram's entry and tag for its own read. */
static __always_inline struct lt_sockq_pos *lt_sockq_open(u64 sk_key, u32 ahead, u32 skip, u32 tcp, u32 peer,
                                                         u32 counted, u64 ino)
{
    u32 i = lt_hash64(sk_key, LT_SOCK_BITS);
    struct lt_sockq_pos *pos = lt_sockq_pos.lookup(&i);
    if (!pos)
        return NULL;
    if (pos->sk && pos->head < pos->tail)
        lt_count_add(LT_C_COLLISION, pos->tail - pos->head);
    u64 base = bpf_ktime_get_ns();
    /* The key is written last, after a free mark, each with a full barrier: a reader on another CPU that
     * finds its socket's key finds that socket's numbers, never the previous socket's (a number taken
     * from those would be overwritten here, and the read lost). */
    __sync_lock_test_and_set(&pos->sk, 0);
    pos->head = base + ahead;
    pos->tail = base;
    pos->skip = skip;
    pos->tcp = tcp;
    pos->peer = peer;
    pos->counted = counted;
    pos->late = 0;
    pos->ino = ino;
    __sync_lock_test_and_set(&pos->sk, sk_key);
    return pos;
}

/* Is the packet at seq of socket sk still waiting for its read (not read, not given up)? */
static __always_inline int lt_sockq_live(u64 sk, u64 seq)
{
    struct lt_sockq_pos *pos = lt_sockq_find(sk);
    return pos && seq >= pos->head;
}

/* The position in the ring (lt_sockq, lt_sockq_tag) of sequence number seq of a socket. */
static __always_inline u32 lt_sockq_idx(u64 sk_key, u64 seq)
{
    return (lt_hash64(sk_key, LT_SOCKQ_BITS) + (u32)seq) & ((1u << LT_SOCKQ_BITS) - 1);
}

/* The ring entry of sequence number seq of a socket. */
static __always_inline struct lt_sockq_ent *lt_sockq_at(u64 sk_key, u64 seq)
{
    u32 i = lt_sockq_idx(sk_key, seq);
    return lt_sockq.lookup(&i);
}

/* record: a readied packet f (timed) into ring entry e, at position seq of its socket's ring; e, NULL if
 * none. The socket is written last; `shared` (UDP, whose reads run on other CPUs at the same time)
 * atomically, a full barrier: a reader that finds it finds the rest. TCP's socket lock orders its writes
 * and reads. */
static __always_inline struct lt_sockq_ent *lt_sockq_fill(struct lt_sockq_ent *e, u64 sk_key, u64 seq,
                                                          struct lt_flight *f, u32 end_seq, u64 now, int shared)
{
    if (!e)
        return NULL;
    u64 was = e->sk;
    if (was && now - e->first < LT_STALE_NS && lt_sockq_live(was, e->seq))
        lt_count(LT_C_COLLISION); /* an unread packet (this socket's, a ring's length ago, or another's) */
    e->sk = 0;
    e->seq = seq;
    e->end_seq = end_seq;
    e->f = *f;
    e->first = lt_first(f);
    e->ready = f->ts[LT_B_RX_SOCK_READY];
    e->slot = f->slot;
    if (shared)
        __sync_lock_test_and_set(&e->sk, sk_key);
    else
        e->sk = sk_key;
    return e;
}

/* record: a readied packet f (timed) at position seq of its socket's ring (lt_sockq_fill). */
static __always_inline struct lt_sockq_ent *lt_sockq_put(u64 sk_key, u64 seq, struct lt_flight *f, u32 end_seq,
                                                         u64 now, int shared)
{
    return lt_sockq_fill(lt_sockq_at(sk_key, seq), sk_key, seq, f, end_seq, now, shared);
}

/* UDP: the read of entry e, taken by whichever of the reader and sk_data_ready's program claims it first
 * (they may run at once on two CPUs); 1 for the one that did. */
static __always_inline int lt_sockq_claim(struct lt_sockq_ent *e, u64 sk_key)
{
    return __sync_val_compare_and_swap(&e->sk, sk_key, 0) == sk_key;
}

/* UDP: the datagrams the socket holds, unread (its receive queue and the reader's queue it splices into). */
static __always_inline u32 lt_udp_queued(void *sk)
{
    return lt_ld32(sk, LT_OFF_SK_RXQ_QLEN) + lt_sk_ld32(sk, LT_OFF_UDP_READER_QLEN);
}

/* UDP: a read between the count that opened a socket's position and the position's publication found no
 * position and took no number (lt_sock_recv_length). When the socket holds nothing now and no read has
 * taken a number since, every datagram the count saw was read, the one being numbered too: its number is
 * marked read (and nothing is left to skip), so that its push ends its journey as an early read. Left
 * alone, its number waited for a read that had come already, and the next read gave it up (counted as a
 * collision): a socket's first datagram, with its reader waiting for it on another CPU. */
static __always_inline void lt_udp_read_before_open(void *sk, struct lt_sockq_pos *pos)
{
    u64 tail = pos->tail;
    if (lt_udp_queued(sk) == 0 && __sync_val_compare_and_swap(&pos->head, tail, tail + 1) == tail)
        pos->skip = 0;
}

/* UDP, counted mode: has the datagram of entry e left its socket's queues? A queued skb links to the one
 * before it (skb->prev, the queue's head for the first); the dequeue (__skb_unlink) clears the link. A
 * freed skb's address soon carries another packet: one with another data buffer (skb->head) or length is
 * not ours, and ours is gone. */
static __always_inline int lt_udp_gone(struct lt_sockq_ent *e)
{
    void *prev = NULL, *head = NULL;
    u32 len = 0;
    if (bpf_probe_read_kernel(&prev, sizeof(prev), (void *)(e->skb + LT_OFF_SKB_PREV)) < 0 || !prev)
        return 1;
    if (bpf_probe_read_kernel(&head, sizeof(head), (void *)(e->skb + LT_OFF_SKB_HEAD)) < 0 ||
        bpf_probe_read_kernel(&len, sizeof(len), (void *)(e->skb + LT_OFF_SKB_LEN)) < 0)
        return 1;
    return (u32)(u64)head != e->skb_head || len != e->skb_len;
}

/* UDP, counted mode: the inode number of socket sk: a socket at a closed one's address has another, and
 * the closed one's unread datagrams' entries are not its own. */
static __always_inline u64 lt_udp_ino(void *sk)
{
    void *sock = lt_read_ptr(sk, LT_OFF_SK_SOCKET);
    u64 ino = 0;
    if (sock)
        bpf_probe_read_kernel(&ino, sizeof(ino), (const char *)sock + LT_OFF_SOCKET_INO);
    return ino;
}

/* UDP, counted mode: the entry of number seq waits for a later read no more. */
static __always_inline void lt_udp_unlate(struct lt_sockq_pos *pos, u64 seq)
{
    if (pos->late == seq + 1)
        __sync_val_compare_and_swap(&pos->late, seq + 1, 0);
}

/* UDP, counted mode: a read has taken entry e's number, seq. If e's datagram left the queue, that read
 * was its own: the read is recorded (once: the reader and the writer may both get here), at `now` if
 * the writer's (its wakeup: the read was before it, as an early read), else now. If it is still queued,
 * the number was too low (a read ahead of it was under way when it was counted): it waits for a later
 * read (pos->late; one at a time, a second is given up, counted). */
static __always_inline void lt_udp_due(struct lt_sockq_pos *pos, struct lt_sockq_ent *e, u64 sk_key, u64 seq,
                                       u64 now)
{
    if (lt_udp_gone(e)) {
        if (lt_sockq_claim(e, sk_key)) {
            if (now)
                lt_count(LT_C_EARLY_READ);
            lt_record_read_ent(e, now ? now : bpf_ktime_get_ns());
        }
        lt_udp_unlate(pos, seq);
        return;
    }
    u64 late = pos->late;
    if (late == seq + 1 || (late == 0 && __sync_val_compare_and_swap(&pos->late, 0, seq + 1) == 0))
        return;
    if (lt_sockq_claim(e, sk_key))
        lt_count(LT_C_COLLISION);
}

/* record: UDP, counted mode (a socket first seen while its target timed 1 packet in N): the timed
 * datagram f, just queued on socket sk, takes its read's number: the reads counted so far (the head)
 * and the datagrams the socket holds, this one last. Untimed datagrams take none (lt_record_udp_push:
 * no line the reader writes is touched for them), and nothing queued before needs following: each
 * timed datagram counts afresh. The head is read before the queues: a read under way in between
 * (dequeued, not yet counted) makes the number too low, never too high, and lt_udp_due puts that right
 * at the read. A datagram queued behind this one before its count (it is no longer the queue's tail)
 * makes the count useless: this one's read is given up, counted. */
static __always_inline void lt_udp_push_counted(void *sk, struct lt_sockq_pos *pos, struct lt_flight *f, u64 now,
                                                u64 ino)
{
    u64 sk_key = LT_KEY(sk);
    u64 head = *(volatile u64 *)&pos->head;
    /* The reader's queue before the receive queue: a reader moving the receive queue onto its own adds
     * the receive queue's count to its own before it empties the receive queue, and read the other way
     * round the moving datagrams counted twice, the number one too high. This way they may be missed:
     * the number one too low, or none queued at all, when the reader's queue is looked at again. */
    u32 queued = lt_sk_ld32(sk, LT_OFF_UDP_READER_QLEN);
    queued += lt_ld32(sk, LT_OFF_SK_RXQ_QLEN);
    void *tail = lt_read_ptr(sk, LT_OFF_SK_RXQ_PREV);
    if (LT_KEY(tail) != f->skb) {
        u32 reader = lt_sk_ld32(sk, LT_OFF_UDP_READER_QLEN);
        if (!queued && !reader) {
            /* Read already: its reader ran ahead of this program on another CPU. */
            lt_count(LT_C_EARLY_READ);
            lt_record_read_flight(f, now);
            return;
        }
        /* Moved to the reader's queue with the rest (a reader waiting for it on another CPU): still the
         * last, if nothing was queued since. */
        tail = lt_sk_ld_ptr(sk, LT_OFF_UDP_READER_PREV);
        if (lt_key_of_addr((u64)tail) != f->skb || lt_ld32(sk, LT_OFF_SK_RXQ_QLEN)) {
            lt_count(LT_C_COLLISION); /* not the last queued: no number to take */
            return;
        }
        queued = reader;
    }
    if (!queued)
        queued = 1; /* (missed while it moved; the tail is still this one: it is queued) */
    u64 seq = head + queued - 1;
    /* A number a timed datagram of this socket took already (its entry carries it; another socket's carry
     * their own) is too low: reads were counted between the head's load and the queues' (one under way,
     * or more: an interrupt). Taking it overwrote the other's entry, also while a read claimed it (that
     * read then recorded this one's times, and this one waited for a number already read: lost, and not
     * counted). The next one is taken: still too low, if at all, which lt_udp_due puts right. */
    u32 i = lt_sockq_idx(sk_key, seq);
    struct lt_sockq_ent *e = lt_sockq.lookup(&i);
    if (e && e->seq == seq) {
        i = lt_sockq_idx(sk_key, ++seq);
        e = lt_sockq.lookup(&i);
    }
    if (!e)
        return;
    lt_sockq_fill(e, sk_key, seq, f, 0, now, 1);
    e->skb = (u64)tail;
    e->skb_head = f->head;
    e->skb_len = 0;
    bpf_probe_read_kernel(&e->skb_len, sizeof(e->skb_len), (const char *)tail + LT_OFF_SKB_LEN);
    e->ino = ino;
    u64 *tag = lt_sockq_tag.lookup(&i);
    if (tag)
        __sync_lock_test_and_set(tag, seq + 1); /* after the entry; a full barrier before the head's load */
    /* A reader that took this number before the tag was out did not see it: it is seen to here. */
    if (seq < pos->head)
        lt_udp_due(pos, e, sk_key, seq, now);
}

/* UDP: socket sk_key is numbered from now on (its position was just opened so): no CPU may take it for
 * a counted one any more (lt_cpu_ctx.udp_counted: its datagrams without a timed flight would take no
 * number, and every later read would take an earlier datagram's). Runs where a socket is first seen. */
static __always_inline void lt_udp_uncount(u64 sk_key)
{
    for (u32 i = 0; i < LT_NCPU; i++) {
        struct lt_cpu_ctx *o = lt_cpu.lookup(&i);
        if (o && o->udp_counted == sk_key)
            o->udp_counted = 0;
    }
}

/* record: UDP, move a readied packet to its socket's ring. f is NULL for a packet we did not follow or
 * time: on a socket of a target that times every packet it still takes a sequence number, so that the
 * reads that follow stay matched; on one in counted mode (c->udp_counted answers for the last one seen
 * on this CPU) nothing. A socket's mode is chosen when it is first seen; a new socket at a closed
 * counted one's address (another inode number, looked up for every timed datagram of a counted socket)
 * is first seen at its first timed datagram: it chooses afresh. (It kept the closed one's mode: timing
 * every packet in counted mode gives up each datagram with another queued behind it before its wakeup's
 * count, 3.5% of a flood's.) */
static __always_inline void lt_record_udp_push(struct lt_cpu_ctx *c, void *sk, struct lt_flight *f, u64 now)
{
    u64 sk_key = LT_KEY(sk);
    if (!f && c->udp_counted == sk_key)
        return;
    struct lt_sockq_pos *pos = lt_sockq_find(sk_key);
    u64 ino = 0;
    if (f && pos && pos->counted) { /* (never a TCP position: those open uncounted) */
        ino = lt_udp_ino(sk);
        if (ino != pos->ino)
            pos = NULL; /* a new socket at a closed one's address */
    }
    if (!pos || pos->tcp) {
        if (!f)
            return;
        struct lt_target *t = lt_target(f->slot);
        if (t && !lt_times_every_packet(t)) {
            if (!ino)
                ino = lt_udp_ino(sk);
            pos = lt_sockq_open(sk_key, 0, 0, 0, 0, 1, ino);
            if (!pos)
                return;
        } else {
            /* First packet of ours on this socket: reads first drain what was queued before it. None
             * queued at all: its reader ran ahead of this program, the packet was read already (see below). */
            u32 before = lt_udp_queued(sk);
            pos = lt_sockq_open(sk_key, before ? 0 : 1, before ? before - 1 : 0, 0, 0, 0, 0);
            if (!pos)
                return;
            lt_udp_uncount(sk_key);
            if (before)
                lt_udp_read_before_open(sk, pos);
        }
    }
    if (pos->counted) {
        c->udp_counted = sk_key;
        if (f)
            lt_udp_push_counted(sk, pos, f, now, ino);
        return;
    }
    /* Atomic: packets for one socket may be readied on several CPUs at once. */
    u64 seq = __sync_fetch_and_add(&pos->tail, 1);
    if (!f)
        return;
    u64 head = pos->head;
    if (seq < head) {
        /* Its number was read: its reader ran ahead of this program on another CPU (lt_sock_recv_length),
         * and the read was between the queueing and now: it ends here, the socket queue's time 0. Unless
         * the packet is still the queue's tail (one read, only here): then that read was another's, one
         * too many was counted (a datagram read that no sk_data_ready announced), and it is taken back. */
        if (head != seq + 1 || LT_KEY(lt_read_ptr(sk, LT_OFF_SK_RXQ_PREV)) != f->skb ||
            __sync_val_compare_and_swap(&pos->head, head, seq) != head) {
            lt_count(LT_C_EARLY_READ);
            lt_record_read_flight(f, now);
            return;
        }
    }
    struct lt_sockq_ent *e = lt_sockq_put(sk_key, seq, f, 0, now, 1);
    /* A reader that took this number while the entry was being written found nothing: it is ours. */
    if (e && seq < pos->head && lt_sockq_claim(e, sk_key)) {
        lt_count(LT_C_EARLY_READ);
        lt_record_read_flight(f, now);
    }
}

/* The peer a TCP packet came from: a connection at a freed socket's address has another. */
static __always_inline u32 lt_tcp_peer(struct lt_addrs *a)
{
    return lt_src_fold(a->saddr) * 2654435761u + a->sport;
}

/* record: TCP, move a readied, timed packet to its socket's ring with the sequence number that ends
 * its data (lt_tcp_ready_end, or its own for a packet queued out of order). Its read is when the
 * socket's read position reaches that, whichever read path moves it (lt_tcp_rcv_space_adjust). The
 * socket's lock serialises its sk_data_ready and its reads. */
static __always_inline void lt_record_tcp_push(void *sk, struct lt_flight *f, u32 end_seq, u64 now)
{
    u64 sk_key = LT_KEY(sk);
    u32 peer = lt_tcp_peer(&f->addr);
    struct lt_sockq_pos *pos = lt_sockq_find(sk_key);
    if (!pos || !pos->tcp || pos->peer != peer)
        pos = lt_sockq_open(sk_key, 0, 0, 1, peer, 0, 0); /* also a new connection at a closed one's address */
    if (!pos)
        return;
    u64 seq = pos->tail++;
    lt_sockq_put(sk_key, seq, f, end_seq, now, 0);
}

/* TCP: where the data of a packet the socket was just woken for ends: rcv_nxt, the end of the socket's
 * in-order data (this packet's included, also when it was merged into the queue's tail skb), less the
 * FIN's sequence number once the peer's FIN is in (no read ever passes it; the FIN may have come out of
 * order, before this packet filled the hole in front of it). */
static __always_inline u32 lt_tcp_ready_end(void *sk)
{
    u32 end = lt_tcp_ld32(sk, LT_OFF_TCP_RCV_NXT);
    return end - (lt_ld8(sk, LT_OFF_SK_SHUTDOWN) & LT_RCV_SHUTDOWN);
}

/* record: the socket has the timed packet f to read (its sock_ready boundary) at now. */
static __always_inline void lt_record_sock_ready(struct lt_flight *f, u64 now)
{
    f->ts[LT_B_RX_SOCK_READY] = now;
    struct lt_target *t = lt_target(f->slot);
    if (t && lt_wants(t, LT_DIR_RX))
        lt_record(t, f->slot, LT_SEG_RX_POD_STACK, f->ts[LT_B_RX_POD_RX], now);
}

/* filter: which packet a socket was told about; 0 for none of ours. */
static __always_inline u64 lt_filter_ready_skb(struct lt_cpu_ctx *c, u64 tail, s32 slot)
{
    if (tail && tail == c->rx_skb)
        return tail;
    struct lt_flight *tf = tail ? lt_get(LT_DIR_RX, tail) : NULL;
    if (tf && tf->ts[LT_B_RX_POD_RX] && !tf->ts[LT_B_RX_SOCK_READY])
        return tail; /* TCP processing its backlog in process context */
    if (c->rx_skb && slot == c->rx_slot)
        return c->rx_skb; /* TCP coalesced this CPU's skb into the tail of the queue */
    return 0;
}

/* record: a traced pod's packet delivered to a socket of the host, the end of its transmit journey: the last
 * one that reached the host on this CPU (c->tx_skb), at the wakeup of socket sk, whose queue's tail skb
 * (tail_skb, tail as a key) it is. Or whose queue is empty: a reader on another CPU took the datagram
 * before this program ran (as a UDP read runs ahead of its wakeup on the receive side); then its skb is
 * not read, since the reader may have freed it (an emitted journey has the addresses the host's receive
 * read), and a packet the host sent on (to another pod, whose netif_receive_skb ends it) is not taken for
 * it. 1 if a journey ended here. (If the packet's flight is gone, it went on into another pod, which may
 * be traced too: the receive side goes on.) */
static __always_inline int lt_record_host_delivery(struct lt_cpu_ctx *c, void *sk, void *tail_skb, u64 tail)
{
    u64 key = c->tx_skb;
    if (tail != key) {
        if (lt_ld32(sk, LT_OFF_SK_RXQ_QLEN))
            return 0; /* another packet at the tail */
        tail_skb = NULL;
    }
    c->tx_skb = 0;
    struct lt_flight *tf = lt_get(LT_DIR_TX, key);
    if (!tf || (!tail_skb && (tf->flags & LT_F_XMITTED)))
        return 0;
    lt_record_tx_done(tf, lt_timed(tf) ? bpf_ktime_get_ns() : 0, tail_skb);
    return 1;
}

/* record: the segments up to the pod of timed flight f once more, for another datagram of its GRO skb. */
static __always_inline void lt_record_rx_host_part(struct lt_flight *f)
{
    struct lt_target *t = lt_target(f->slot);
    if (!t || !lt_wants(t, LT_DIR_RX))
        return;
    u64 host = f->ts[LT_B_RX_HOST_RX], pod = f->ts[LT_B_RX_POD_RX];
    lt_record(t, f->slot, LT_SEG_RX_IRQ, f->ts[LT_B_RX_IRQ], f->ts[LT_B_RX_SOFTIRQ]);
    lt_record(t, f->slot, LT_SEG_RX_DRIVER, f->ts[LT_B_RX_SOFTIRQ], host ? host : pod);
    lt_record(t, f->slot, LT_SEG_RX_HOST_TO_POD, host, pod);
}

/* filter: is the datagram queued (tail, tail_skb) one that UDP split off the GRO skb of flight key (its
 * datagrams follow in turn), not the GRO skb itself queued whole (a socket with UDP_GRO reads it so)?
 * A split-off datagram is another skb, or (fraglist GRO) the first one, in the GRO skb's own, that no
 * longer holds the rest (data_len 0). */
static __always_inline int lt_filter_gro_split(u64 key, u64 tail, void *tail_skb)
{
    return tail != key || !tail_skb || !lt_ld32(tail_skb, LT_OFF_SKB_DATA_LEN);
}

int lt_sk_data_ready(struct bpf_raw_tracepoint_args *ctx)
{
    void *sk = (void *)ctx->args[0];
#if LT_TYPED
    /* sk_data_ready runs for every socket's wakeup on the node, unix and netlink ones too (the node's
     * runtime, its agents' gRPC, its logs): the family, a plain load from the line the filter below
     * reads anyway, turns them away before this CPU's entry is looked up. (With raw tracepoints it would
     * be a helper call of its own, dearer than the filter.) */
    u16 family = lt_ld16(sk, LT_OFF_SK_FAMILY);
    if (family != LT_AF_INET && family != LT_AF_INET6)
        return 0;
#endif
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c)
        return 0;
    void *tail_skb = NULL;
    u64 tail = 0;
    if (c->tx_skb) {
        tail_skb = lt_read_ptr(sk, LT_OFF_SK_RXQ_PREV);
        tail = LT_KEY(tail_skb);
        if (lt_record_host_delivery(c, sk, tail_skb, tail))
            return 0;
    }
    s32 slot = lt_filter_sock(c, sk);
    if (slot < 0)
        return 0; /* a socket outside traced pods */
    if (!tail) {
        tail_skb = lt_read_ptr(sk, LT_OFF_SK_RXQ_PREV);
        tail = LT_KEY(tail_skb);
    }
    u64 key = 0;
    struct lt_flight *f = NULL;
    u64 sk_key = LT_KEY(sk);
    if (c->tcp_sk == sk_key) {
        /* TCP named the segment it processed for this socket (lt_tcp_probe), also from the backlog a
         * reader left; a bare ACK has no flight, and what follows finds the packet otherwise. */
        c->tcp_sk = 0;
        f = lt_get(LT_DIR_RX, c->tcp_skb);
        if (f && f->ts[LT_B_RX_POD_RX] && !f->ts[LT_B_RX_SOCK_READY])
            key = c->tcp_skb;
        else
            f = NULL;
    }
    if (!f) {
        key = lt_filter_ready_skb(c, tail, slot);
        f = key ? lt_get(LT_DIR_RX, key) : NULL;
    }
    if (key == c->rx_skb)
        c->rx_skb = 0;
    if (!f || !f->ts[LT_B_RX_POD_RX] || f->ts[LT_B_RX_SOCK_READY]) {
        if (tail)
            lt_record_udp_push(c, sk, NULL, 0); /* keeps a followed UDP socket's reads matched */
        return 0;
    }
    /* A timed packet's wakeup is its sock_ready boundary, and it moves to its socket's ring to wait for
     * its read; an untimed one (no clock read) only keeps a UDP socket's reads matched. Either way its
     * in-flight entry ends here. */
    struct lt_flight *timed = lt_timed(f) ? f : NULL;
    u64 now = 0;
    if (timed) {
        now = bpf_ktime_get_ns();
        lt_record_sock_ready(f, now);
    }
    if (f->addr.proto == LT_IPPROTO_UDP) {
        if (timed && (f->flags & LT_F_GRO_SPLIT))
            lt_record_rx_host_part(f); /* a later datagram of a GRO skb: the skb's times are its own too */
        lt_record_udp_push(c, sk, timed, now);
        if (f->segs > 1 && lt_filter_gro_split(key, tail, tail_skb)) {
            /* One datagram of a GRO skb: UDP queues the next ones on this CPU, in this same call. */
            f->segs--;
            f->flags |= LT_F_GRO_SPLIT;
            f->ts[LT_B_RX_SOCK_READY] = 0;
            c->rx_skb = key;
            return 0;
        }
    } else {
        if (key != tail)
            lt_count(LT_C_COALESCED); /* merged into the queue's tail skb: read with its data */
        if (timed)
            lt_record_tcp_push(sk, timed, lt_tcp_ready_end(sk), now);
    }
    lt_free(LT_DIR_RX, f);
    return 0;
}

/* record: TCP segment skb, key, of a traced pod's socket sk, if TCP is about to queue it out of order
 * (its data starts past rcv_nxt: a segment before it was lost or reordered). No reader is woken for it,
 * and when the hole fills, the one wakeup is the filling segment's, the ones queued behind it merged
 * into each other or moved to the receive queue unannounced (and freed, when merged, with no trace).
 * So it moves to its socket's ring here, where TCP queues it: that is its sock_ready boundary, and its
 * socket-queue time, to the read of its data, includes the wait for the data before it (head-of-line
 * blocking: what the application waits for). Left in flight, each was found stale later. */
static __always_inline void lt_record_tcp_ofo(struct lt_cpu_ctx *c, void *sk, void *skb, u64 key)
{
    u32 seq = lt_ld32(skb, LT_OFF_SKB_CB + LT_OFF_TCP_CB_SEQ);
    u32 end_seq = lt_ld32(skb, LT_OFF_SKB_CB + LT_OFF_TCP_CB_END_SEQ);
    if (seq == end_seq || (s32)(seq - lt_tcp_ld32(sk, LT_OFF_TCP_RCV_NXT)) <= 0)
        return; /* nothing to read, or in order: its wakeup follows (sk_data_ready) */
    struct lt_flight *f = lt_get(LT_DIR_RX, key);
    if (!f || !f->ts[LT_B_RX_POD_RX] || f->ts[LT_B_RX_SOCK_READY])
        return;
    if (c->rx_skb == key)
        c->rx_skb = 0;
    lt_count(LT_C_OUT_OF_ORDER);
    if (lt_timed(f)) {
        u64 now = bpf_ktime_get_ns();
        lt_record_sock_ready(f, now);
        lt_record_tcp_push(sk, f, end_seq - ((f->flags & LT_F_FIN) ? 1 : 0), now); /* a FIN is never read */
    }
    lt_free(LT_DIR_RX, f);
}

/* TCP's processing of a segment for an established socket starts here (tcp_rcv_established), in a
 * NET_RX run or, when the application held the socket, later in process context from its backlog,
 * where nothing else says which skb the socket's sk_data_ready is about: remember it, cheaply (two
 * stores; sk_data_ready checks the socket). A traced pod's segment (in a NET_RX run, the one this CPU
 * saw reach the pod last; from a backlog, outside NET_RX, one for a traced pod's socket) is checked for
 * being out of order. */
int lt_tcp_probe(struct bpf_raw_tracepoint_args *ctx)
{
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c)
        return 0;
    void *sk = (void *)ctx->args[0];
    u64 key = LT_KEY(ctx->args[1]);
    c->tcp_sk = LT_KEY(sk);
    c->tcp_skb = key;
    if (key == c->rx_skb || (!c->t_softirq && !c->t_irq && lt_filter_sock(c, sk) >= 0))
        lt_record_tcp_ofo(c, sk, (void *)ctx->args[1], key);
    return 0;
}

/* TCP reads: every read path (recvmsg, splice, zero-copy receive) moves the socket's read position
 * (copied_seq) and then runs tcp_rcv_space_adjust. The packets whose data ends at or before that
 * position have been read: in sequence order, so the first one still unread stops the walk. One run
 * records at most LT_TCP_READS_PER_RUN (what the verifier takes); a read of more (one skb into which
 * TCP merged many small packets, a splice of many skbs) goes on in a fresh run of this program, a tail
 * call (up to the kernel's 33: over 500 packets per read; the rest at the socket's next read). */
#define LT_TCP_READS_PER_RUN 16
int lt_tcp_rcv_space_adjust(struct bpf_raw_tracepoint_args *ctx)
{
    void *sk = (void *)ctx->args[0];
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c || lt_filter_sock(c, sk) < 0)
        return 0; /* a socket outside traced pods */
    u64 sk_key = LT_KEY(sk);
    struct lt_sockq_pos *pos = lt_sockq_find(sk_key);
    if (!pos || !pos->tcp || pos->head >= pos->tail)
        return 0;
    u32 copied = lt_tcp_ld32(sk, LT_OFF_TCP_COPIED_SEQ);
    u64 now = bpf_ktime_get_ns();
    u32 base = lt_hash64(sk_key, LT_SOCKQ_BITS);
    for (int k = 0; k < LT_TCP_READS_PER_RUN; k++) {
        u64 seq = pos->head;
        if (seq >= pos->tail)
            return 0; /* all read */
        u32 i = (base + (u32)seq) & ((1u << LT_SOCKQ_BITS) - 1);
        struct lt_sockq_ent *e = lt_sockq.lookup(&i);
        if (!e)
            return 0;
        if (e->sk == sk_key && e->seq == seq) {
            if ((s32)(e->end_seq - copied) > 0)
                return 0; /* not read yet, nor anything queued after it */
            lt_record_read_ent(e, now);
            e->sk = 0;
        }
        /* else: its entry was taken by a later packet (counted then): its read is lost, not misattributed */
        pos->head = seq + 1;
    }
    if (pos->head >= pos->tail)
        return 0; /* all read: exactly this run's share */
    /* Only here, with this run's share recorded and more packets waiting, does a fresh run go on: a
     * tail call whenever the ring held unread packets (a bulk reader's usual state) ran the program
     * again up to the kernel's limit at every read, each run stopping at the same unread packet. */
    lt_count(LT_C_READ_CONTINUED);
    lt_tail.call(ctx, LT_TAIL_TCP_READS); /* returns only if there is no program to go on in */
    return 0;
}

/* UDP: packets in the ring that the socket no longer holds (a closed socket's unread datagrams, at an
 * address a new socket took; a datagram the kernel dropped at its read, a bad checksum): each would
 * shift every later read by one. Checked only when more than this read's datagram waits in the ring
 * (two reads of the socket's queue lengths); the oldest surplus entries are given up, counted. */
static __always_inline void lt_udp_resync(void *sk, struct lt_sockq_pos *pos)
{
    u64 head = pos->head, tail = pos->tail;
    if (head > tail || tail - head < 2)
        return;
    u64 due = (u64)lt_udp_queued(sk) + 1; /* still queued, and the one this read returned */
    if (tail - head > due && __sync_val_compare_and_swap(&pos->head, head, tail - due) == head)
        lt_count_add(LT_C_COLLISION, tail - due - head);
}

/* UDP reads, counted mode: entry e, of socket sk's address, is due at this read (number seq): seen to
 * (lt_udp_due) if it is this socket's, else given up (a closed socket's, at the same address, its
 * datagram never read), counted. ino: this socket's inode number, 0 until looked up. */
static __always_inline u64 lt_udp_due_read(void *sk, struct lt_sockq_pos *pos, struct lt_sockq_ent *e, u64 sk_key,
                                           u64 seq, u64 ino)
{
    if (!ino)
        ino = lt_udp_ino(sk);
    if (e->ino == ino) {
        lt_udp_due(pos, e, sk_key, seq, 0);
    } else {
        if (lt_sockq_claim(e, sk_key))
            lt_count(LT_C_COLLISION);
        lt_udp_unlate(pos, seq);
    }
    return ino;
}

/* UDP reads, counted mode: the read takes the next number (the head). An entry waiting for a later read
 * than its number (pos->late) and the entry of this number, if a timed datagram took it (its tag says
 * so; the entry's own line is not touched for the others), are seen to. */
static __always_inline void lt_udp_read_counted(void *sk, struct lt_sockq_pos *pos, u64 sk_key)
{
    u64 seq = __sync_fetch_and_add(&pos->head, 1); /* threads may read one socket at once */
    u64 late = pos->late, ino = 0;
    if (late) {
        struct lt_sockq_ent *l = lt_sockq_at(sk_key, late - 1);
        if (l && l->sk == sk_key && l->seq == late - 1)
            ino = lt_udp_due_read(sk, pos, l, sk_key, late - 1, 0);
        else
            lt_udp_unlate(pos, late - 1); /* its entry was taken meanwhile (counted then) */
    }
    u32 i = lt_sockq_idx(sk_key, seq);
    u64 *tag = lt_sockq_tag.lookup(&i);
    if (!tag || *tag != seq + 1)
        return; /* no timed datagram's number, or one being written (its push sees to the read) */
    struct lt_sockq_ent *e = lt_sockq.lookup(&i);
    if (e && e->sk == sk_key && e->seq == seq)
        lt_udp_due_read(sk, pos, e, sk_key, seq, ino);
}

/* UDP reads: one datagram per successful, non-peeking recvmsg. sock_recv_length runs for every
 * socket's recvmsg on the node (TCP, unix, netlink): with typed tracepoints the socket's protocol, a
 * plain load, turns the others away before this CPU's entry is looked up (with raw tracepoints it
 * would be a helper call of its own, dearer than the namespace filter). */
int lt_sock_recv_length(struct bpf_raw_tracepoint_args *ctx)
{
    void *sk = (void *)ctx->args[0];
    u64 sk_key = LT_KEY(sk);
    if ((int)ctx->args[1] < 0 || ((int)ctx->args[2] & LT_MSG_PEEK))
        return 0;
#if LT_TYPED
    if (lt_ld16(sk, LT_OFF_SK_PROTOCOL) != LT_IPPROTO_UDP)
        return 0;
#endif
    struct lt_cpu_ctx *c = lt_this_cpu();
    if (!c || lt_filter_sock(c, sk) < 0)
        return 0; /* a socket outside traced pods */
    struct lt_sockq_pos *pos = lt_sockq_find(sk_key);
    if (!pos || pos->tcp)
        return 0; /* not followed, or TCP (sock_recv_length runs for every socket's recvmsg) */
    if (pos->counted) {
        lt_udp_read_counted(sk, pos, sk_key);
        return 0;
    }
    if (pos->skip) {
        pos->skip--;
        return 0;
    }
    lt_udp_resync(sk, pos);
    if (pos->head > pos->tail)
        return 0; /* one ahead already: a read with no datagram of ours to match must not move the reads further */
    u64 seq = __sync_fetch_and_add(&pos->head, 1); /* threads may read one socket at once */
    if (seq >= pos->tail) {
        /* The reader ran ahead of sk_data_ready's program on another CPU: the datagram was queued and
         * read before the program numbered it. Its number is taken all the same, so that the reads after
         * it stay matched (without it, each later read would take the previous datagram's entry); the
         * program, when it runs, ends the datagram's journey there (lt_record_udp_push). The tail is
         * read after the number is taken (a full barrier): a program that numbered the datagram after a
         * look at the tail before it may also have looked at the head before it, and left the read to
         * this one, which lost it when it returned here on the older tail. */
        return 0;
    }
    u32 i = lt_sockq_idx(sk_key, seq);
    struct lt_sockq_ent *e = lt_sockq.lookup(&i);
    /* Not there yet: sk_data_ready's program is writing it, and takes the read itself (it sees the head
     * past its number). Another socket's or a later packet's: that one counted the collision. */
    if (!e || e->seq != seq || !lt_sockq_claim(e, sk_key))
        return 0;
    if (e->ready)
        lt_record_read_ent(e, bpf_ktime_get_ns());
    return 0;
}
