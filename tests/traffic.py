"""Small traffic programs run inside the lab's pods: `python tests/traffic.py <command> ...`.

Each one is bounded in time (--timeout) and prints one JSON line with what it did, so that tests can
compare what the kernel probes counted with what the sockets really sent and read.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import time

RCVBUF = 8 << 20  # room for every datagram a test sends, whatever the scheduler does to the reader
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; Python's socket module does not name it
UDP_GRO = getattr(socket, "UDP_GRO", 104)  # linux/udp.h: the socket takes GRO-merged datagrams whole

def family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def kernel_address(proto: str, port: int, peer_port: int = 0) -> str:
    """The kernel's address of this namespace's socket on `port` (and `peer_port`), hashed as
    /proc/net/<proto> shows it: two sockets show the same only if the later one took the earlier's memory."""
    with open(f"/proc/self/net/{proto}") as f:
        for line in f.readlines()[1:]:
            col = line.split()
            ports = int(col[1].rsplit(":", 1)[1], 16), int(col[2].rsplit(":", 1)[1], 16)
            if ports[0] == port and (not peer_port or ports[1] == peer_port):
                return col[11]
    raise SystemExit(f"no {proto} socket on port {port} in /proc/self/net/{proto}")


def udp_bound(a) -> socket.socket:
    s = socket.socket(family(a.bind), socket.SOCK_DGRAM)
    # SO_RCVBUF is capped by net.core.rmem_max (about 200 KiB: a few thousand small datagrams, less than
    # a second at the tests' rates while the reader is not scheduled); root may force a size past it.
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    if s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < RCVBUF:
        raise SystemExit(f"udp-recv: receive buffer not raised to {RCVBUF} bytes")
    s.bind((a.bind, a.port))
    return s


def udp_discard(a, s: socket.socket) -> tuple[socket.socket, str]:
    """--discard: a socket closed with the sender's datagrams unread (the kernel throws them away), and a
    new one bound in its place; then the sender is told to go on. The closed socket's kernel address."""
    s.settimeout(a.timeout)
    _, sender = s.recvfrom(1, socket.MSG_PEEK)
    time.sleep(0.1)  # the rest of the round's datagrams, sent back to back, are queued by now
    address = kernel_address("udp", a.port)
    s.close()
    time.sleep(0.05)  # a UDP socket's memory is freed after an RCU grace period: then the next may take it
    s = udp_bound(a)
    with socket.socket(family(a.bind), socket.SOCK_DGRAM) as ack:
        ack.sendto(b"next", sender)
    return s, address


def udp_recv(a) -> dict:
    s = udp_bound(a)
    others = [socket.socket(family(a.bind), socket.SOCK_DGRAM) for _ in range(a.others)]
    for k, o in enumerate(others, 1):  # never read: they only get a datagram each round (udp-send --others)
        o.bind((a.bind, a.port + k))
    print(json.dumps({"ready": True}), flush=True)
    discarded = []
    for _ in range(a.discard):
        s, address = udp_discard(a, s)
        discarded.append(address)
    s.settimeout(0.0 if a.spin else a.timeout)
    hold(a)
    if a.gro:
        s.setsockopt(socket.IPPROTO_UDP, UDP_GRO, 1)
    got = reads = 0
    times = []  # --times: (datagram size, CLOCK_MONOTONIC ns when its recv returned), the probes' clock
    deadline = time.monotonic() + a.timeout
    try:
        while got < a.count:
            if a.spin:  # never sleeps: it takes each datagram as soon as the kernel has queued it
                try:
                    data = s.recv(65535)
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break
                    continue
            elif a.gro:  # one read may return several datagrams the kernel kept merged: counted each
                data, anc, _, _ = s.recvmsg(65535, socket.CMSG_SPACE(4))
                seg = next((int.from_bytes(d[:4], sys.byteorder) for lvl, typ, d in anc
                            if (lvl, typ) == (socket.IPPROTO_UDP, UDP_GRO)), 0)
                reads += 1
                got += -(-len(data) // seg) - 1 if seg else 0
            else:
                data = s.recv(65535)
            if a.times:
                times.append((len(data), time.monotonic_ns()))
            got += 1
            if a.pause_every and got % a.pause_every == 0:
                time.sleep(a.pause_ms / 1000)  # a reader that falls behind: packets wait in the socket
    except socket.timeout:
        pass
    if a.discard:
        return {"received": got, "reused": kernel_address("udp", a.port) in discarded}
    if a.gro:
        return {"received": got, "reads": reads}
    return {"received": got, "times": times} if a.times else {"received": got}


def udp_send(a) -> dict:
    """--rounds R: R sockets one after another, each sending --count datagrams; before the next, the
    receiver's word that it has taken them (udp-recv --discard)."""
    out = {}
    for i in range(a.rounds):
        s = socket.socket(family(a.to), socket.SOCK_DGRAM)
        out = udp_send_from(a, s)
        if i < a.rounds - 1:
            s.settimeout(a.timeout)
            s.recv(16)
            for k in range(1, a.others + 1):  # between this round's socket and the next one
                s.sendto(b"o", (a.to, a.port + k))
        out["sport"] = s.getsockname()[1]
        s.close()
    if a.rounds == 1:
        del out["sport"]
    return out


def udp_send_from(a, s: socket.socket) -> dict:
    if a.write:  # a connected socket written to with write(2), as iperf3 and many clients do
        s.connect((a.to, a.port))
    payload = b"x" * a.size
    sizes = [b"x" * (a.size + i % 1024) for i in range(min(a.count, 1024))] if a.vary_size else []
    gap = 1.0 / a.rate if a.rate else 0.0
    start = time.monotonic()
    sent = 0
    for i in range(a.count):
        if gap:
            target = start + i * gap
            while time.monotonic() < target:
                pass
        if sizes:
            payload = sizes[i % 1024]
        try:
            if a.write:
                os.write(s.fileno(), payload)
            else:
                s.sendto(payload, (a.to, a.port))
            sent += 1
        except (ConnectionRefusedError, BlockingIOError):
            pass
    return {"sent": sent, "seconds": round(time.monotonic() - start, 3)}


def ping(a) -> dict:
    """ICMP echo requests to --to, one after another, each answered before the next (as ping(8) sends
    them; from a raw socket, root in the lab: the image has no ping)."""
    v6 = family(a.to) == socket.AF_INET6
    s = socket.socket(family(a.to), socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    s.settimeout(a.timeout)
    ident = os.getpid() & 0xFFFF
    request, reply = (128, 129) if v6 else (8, 0)
    replies = 0
    for seq in range(a.count):
        msg = struct.pack("!BBHHH", request, 0, 0, ident, seq) + bytes(a.size)
        if not v6:  # the kernel sums ICMPv6 itself, not ICMP
            total = sum(struct.unpack(f"!{len(msg) // 2}H", msg))
            total = (total & 0xFFFF) + (total >> 16)
            msg = msg[:2] + struct.pack("!H", ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF) + msg[4:]
        if a.hop_by_hop:  # an empty hop-by-hop options header first (PadN), as MLD carries one
            s.sendmsg([msg], [(socket.IPPROTO_IPV6, socket.IPV6_HOPOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))], 0, (a.to, 0))
        else:
            s.sendto(msg, (a.to, 0))
        while True:
            data = s.recv(2048)
            icmp = data if v6 else data[4 * (data[0] & 0xF):]  # IPv4 raw sockets read the IP header too
            if icmp[0] == reply and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
                replies += 1
                break
        if a.rate:
            time.sleep(1.0 / a.rate)
    return {"replies": replies}


def hold(a) -> None:
    """A reader that does not read until told (the file --hold-until names appears): everything waits."""
    deadline = time.monotonic() + a.timeout
    while a.hold_until and not os.path.exists(a.hold_until) and time.monotonic() < deadline:
        time.sleep(0.01)


def peek_all(conn: socket.socket, need: int, timeout: float) -> None:
    """Wait until `need` bytes have arrived on conn, leaving them unread. (MSG_WAITALL does not wait on a
    socket with a Python timeout, which is non-blocking underneath: it returned what had arrived, the
    close that followed reset the connection while its sender was still sending.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = conn.recv(need, socket.MSG_PEEK)
        if not got or len(got) >= need:
            return
        time.sleep(0.001)


def tcp_sink(a) -> dict:
    srv = socket.create_server((a.bind, a.port), family=family(a.bind))
    if a.hold_until:  # room for all that is sent while it holds off: nothing waits in the sender or backlog
        srv.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    srv.settimeout(a.timeout)
    print(json.dumps({"ready": True}), flush=True)
    discarded = []
    for _ in range(a.discard):  # connections closed once --count x --size bytes arrived, all unread
        conn, peer = srv.accept()
        conn.settimeout(a.timeout)
        discarded.append(kernel_address("tcp", a.port, peer[1]))
        peek_all(conn, a.count * a.size, a.timeout)
        conn.close()
    conn, peer = srv.accept()
    reused = bool(a.discard) and kernel_address("tcp", a.port, peer[1]) in discarded
    conn.settimeout(a.timeout)
    hold(a)
    total = 0
    pipe = os.pipe() if a.splice else None
    try:
        while True:
            if pipe:  # splice(2) into a pipe, as proxies (and Go's io.Copy between sockets) read
                if not select.select([conn], [], [], a.timeout)[0]:
                    break
                n = os.splice(conn.fileno(), pipe[1], 1 << 16, flags=os.SPLICE_F_NONBLOCK)
                data = os.read(pipe[0], n) if n else b""
            else:
                data = conn.recv(a.chunk or 1 << 16)
            if not data:
                break
            total += len(data)
            if a.echo:
                conn.sendall(data)
    except (socket.timeout, TimeoutError):
        pass
    if a.discard:
        return {"received_bytes": total, "reused": reused}
    return {"received_bytes": total}


def tcp_send(a) -> dict:
    """--rounds R: R connections one after another; each but the last waits for the server's close
    (tcp-sink --discard)."""
    for i in range(a.rounds):
        c = socket.create_connection((a.to, a.port), timeout=a.timeout)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        chunk = b"y" * a.size
        for _ in range(a.count):
            c.sendall(chunk)
            if a.echo:
                need = a.size
                while need:
                    need -= len(c.recv(need))
        if i < a.rounds - 1:
            try:
                c.recv(1)
            except ConnectionResetError:  # its data unread, the server's close is a reset
                pass
        sport = c.getsockname()[1]
        c.close()
    if a.rounds > 1:
        return {"sent_bytes": a.size * a.count, "sport": sport}
    return {"sent_bytes": a.size * a.count}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="traffic.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("udp-recv", udp_recv), ("udp-send", udp_send), ("tcp-sink", tcp_sink), ("tcp-send", tcp_send),
                     ("ping", ping)):
        sp = sub.add_parser(name)
        sp.set_defaults(fn=fn)
        sp.add_argument("--port", type=int, required=name != "ping")
        sp.add_argument("--timeout", type=float, default=20.0)
        sp.add_argument("--count", type=int, default=100)
        sp.add_argument("--size", type=int, default=64)
        sp.add_argument("--rate", type=float, default=0.0, help="packets per second (0: as fast as possible)")
        sp.add_argument("--bind", default="0.0.0.0")
        sp.add_argument("--to", default="")
        sp.add_argument("--echo", action="store_true")
        sp.add_argument("--write", action="store_true", help="udp-send: connect, then write(2)")
        sp.add_argument("--pause-every", type=int, default=0, help="udp-recv: pause after every N datagrams")
        sp.add_argument("--pause-ms", type=float, default=0.0, help="udp-recv: for this long")
        sp.add_argument("--hold-until", default="", help="udp-recv, tcp-sink: read nothing until this file exists")
        sp.add_argument("--splice", action="store_true", help="tcp-sink: read with splice(2) into a pipe")
        sp.add_argument("--chunk", type=int, default=0, help="tcp-sink: read at most this many bytes at a time")
        sp.add_argument("--spin", action="store_true", help="udp-recv: poll the socket without blocking")
        sp.add_argument("--gro", action="store_true",
                        help="udp-recv: take datagrams GRO merged as one read (UDP_GRO), each counted")
        sp.add_argument("--times", action="store_true", help="udp-recv: report each datagram's size and read time")
        sp.add_argument("--vary-size", action="store_true", help="udp-send: datagram i is --size + i %% 1024 bytes")
        sp.add_argument("--cpu", type=int, default=-1, help="run on this CPU only")
        sp.add_argument("--hop-by-hop", action="store_true", help="ping, IPv6: behind a hop-by-hop options header")
        sp.add_argument("--discard", type=int, default=0,
                        help="udp-recv, tcp-sink: first close this many sockets with what was sent to them unread")
        sp.add_argument("--rounds", type=int, default=1, help="udp-send, tcp-send: this many sockets in turn")
        sp.add_argument("--others", type=int, default=0,
                        help="udp-recv: also bind the next N ports; udp-send: after each round, a datagram to each")
    a = p.parse_args(argv)
    if a.cpu >= 0:
        os.sched_setaffinity(0, {a.cpu})
    print(json.dumps(a.fn(a)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
