/* Test-only probes built on the product's header (bpf/latencytrace.h) and its BTF-derived macros.
 * They expose what the product's helpers compute, so that tests can hold it against the truth:
 * the namespace inodes read through skb, socket and task (vs. os.stat of /proc/<pid>/ns/net), and the
 * histogram bucket of a latency (vs. node_agent/histogram.py). */
#include "latencytrace.h"

BPF_HASH(st_dev_netns, u32, u64, 4096);
BPF_HASH(st_sk_netns, u32, u64, 4096);
BPF_HASH(st_task_netns, u32, u32, 4096); /* tgid -> netns inode of its send syscalls */
BPF_ARRAY(st_bucket_out, u32, 1);


int st_netif_receive_skb(struct bpf_raw_tracepoint_args *ctx)
{
    struct lt_skb_view v;
    lt_skb_read((void *)ctx->args[0], &v);
    u32 inum = lt_dev_netns(v.dev);
    u64 one = 1;
    u64 *n = st_dev_netns.lookup(&inum);
    if (n)
        (*n)++;
    else
        st_dev_netns.update(&inum, &one);
    return 0;
}

int st_sk_data_ready(struct bpf_raw_tracepoint_args *ctx)
{
    u32 inum = lt_sk_netns((void *)ctx->args[0]);
    u64 one = 1;
    u64 *n = st_sk_netns.lookup(&inum);
    if (n)
        (*n)++;
    else
        st_sk_netns.update(&inum, &one);
    return 0;
}

int st_sys_send(void *ctx)
{
    void *task = (void *)bpf_get_current_task();
    u32 inum = lt_net_inum(lt_read_ptr(lt_read_ptr(task, LT_OFF_TASK_NSPROXY), LT_OFF_NSPROXY_NET));
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    st_task_netns.update(&tgid, &inum);
    return 0;
}

/* Run with BPF_PROG_TEST_RUN: args[0] is a latency in ns. */
int st_bucket(struct bpf_raw_tracepoint_args *ctx)
{
    u32 zero = 0;
    u32 b = lt_bucket(ctx->args[0]);
    st_bucket_out.update(&zero, &b);
    return 0;
}
