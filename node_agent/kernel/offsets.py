"""The kernel struct members the probes read, resolved to byte offsets from BTF (-D LT_OFF_* macros)."""

from __future__ import annotations

from .btf import BTFError, KernelBTF

# macro -> (struct, member path). Every member a probe reads is listed here and nowhere else.
MEMBERS: dict[str, tuple[str, str]] = {
    "LT_OFF_SKB_DEV": ("sk_buff", "dev"),
    "LT_OFF_SKB_SK": ("sk_buff", "sk"),
    "LT_OFF_SKB_LEN": ("sk_buff", "len"),
    "LT_OFF_SKB_DATA_LEN": ("sk_buff", "data_len"),  # not 0: paged data or a chain (a GRO skb's are)
    "LT_OFF_SKB_DATA": ("sk_buff", "data"),
    "LT_OFF_SKB_HEAD": ("sk_buff", "head"),
    "LT_OFF_SKB_PREV": ("sk_buff", "prev"),  # NULL once unlinked from a queue (__skb_unlink)
    "LT_OFF_SKB_PROTOCOL": ("sk_buff", "protocol"),
    "LT_OFF_SKB_IIF": ("sk_buff", "skb_iif"),
    "LT_OFF_SKB_NETWORK_HEADER": ("sk_buff", "network_header"),
    "LT_OFF_SKB_TRANSPORT_HEADER": ("sk_buff", "transport_header"),
    "LT_OFF_SKB_CB": ("sk_buff", "cb"),  # TCP's struct tcp_skb_cb lives there
    "LT_OFF_SKB_END": ("sk_buff", "end"),  # an offset from head on 64-bit kernels: skb_shinfo() is there
    "LT_OFF_SHINFO_FRAG_LIST": ("skb_shared_info", "frag_list"),
    "LT_OFF_SHINFO_GSO_SEGS": ("skb_shared_info", "gso_segs"),  # the packets a GRO skb merged
    "LT_OFF_TCP_CB_SEQ": ("tcp_skb_cb", "seq"),
    "LT_OFF_TCP_CB_END_SEQ": ("tcp_skb_cb", "end_seq"),
    "LT_OFF_DEV_NET": ("net_device", "nd_net.net"),
    "LT_OFF_DEV_IFINDEX": ("net_device", "ifindex"),
    "LT_OFF_NET_INUM": ("net", "ns.inum"),
    "LT_OFF_SK_NET": ("sock", "__sk_common.skc_net.net"),
    "LT_OFF_SK_FAMILY": ("sock", "__sk_common.skc_family"),
    "LT_OFF_SK_PROTOCOL": ("sock", "sk_protocol"),
    "LT_OFF_SK_RXQ_PREV": ("sock", "sk_receive_queue.prev"),
    "LT_OFF_SK_RXQ_QLEN": ("sock", "sk_receive_queue.qlen"),
    "LT_OFF_SK_SHUTDOWN": ("sock", "sk_shutdown"),
    "LT_OFF_SK_SOCKET": ("sock", "sk_socket"),
    "LT_OFF_SOCKET_INO": ("socket_alloc", "vfs_inode.i_ino"),  # a socket's inode follows its struct socket
    "LT_OFF_UDP_READER_QLEN": ("udp_sock", "reader_queue.qlen"),
    "LT_OFF_UDP_READER_PREV": ("udp_sock", "reader_queue.prev"),
    "LT_OFF_TCP_RCV_NXT": ("tcp_sock", "rcv_nxt"),
    "LT_OFF_TCP_COPIED_SEQ": ("tcp_sock", "copied_seq"),
    "LT_OFF_TASK_NSPROXY": ("task_struct", "nsproxy"),
    "LT_OFF_NSPROXY_NET": ("nsproxy", "net_ns"),
}


# Fields of struct sk_buff read together in one probe read (lt_skb_read): the window spans them all.
SKB_WINDOW = ("LT_OFF_SKB_DEV", "LT_OFF_SKB_SK", "LT_OFF_SKB_DATA", "LT_OFF_SKB_HEAD", "LT_OFF_SKB_LEN",
              "LT_OFF_SKB_DATA_LEN", "LT_OFF_SKB_PROTOCOL", "LT_OFF_SKB_IIF", "LT_OFF_SKB_NETWORK_HEADER", "LT_OFF_SKB_TRANSPORT_HEADER")
SKB_WINDOW_MAX = 256  # bytes of BPF stack we allow it


def resolve(btf: KernelBTF) -> dict[str, int]:
    """All LT_OFF_* macros for this kernel, plus the sk_buff read window; raises BTFError naming the
    member that is missing."""
    out = {macro: btf.offset(struct, path) for macro, (struct, path) in MEMBERS.items()}
    start = min(out[m] for m in SKB_WINDOW)
    end = max(out[m] + 8 for m in SKB_WINDOW)
    if end - start > SKB_WINDOW_MAX:
        raise BTFError(f"struct sk_buff fields we read span {end - start} bytes here (more than {SKB_WINDOW_MAX}); "
                       "this kernel's layout is not supported")
    out["LT_SKB_WIN_START"] = start
    out["LT_SKB_WIN_LEN"] = end - start
    return out
