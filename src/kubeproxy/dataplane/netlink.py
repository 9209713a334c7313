"""nf_tables over netlink: the nftables data plane's transport to the kernel.

Theory of operation
-------------------
A transaction (a list of :mod:`.nft_ops` operations) is encoded into nft's own netlink
messages (render/nft_wire.py), framed by BATCH_BEGIN / BATCH_END and sent on a
NETLINK_NETFILTER socket in one ``sendmsg``. The kernel runs the whole batch inside that
call, all-or-nothing, and queues one error per refused message; a GETGEN request sent
right after it marks the end of what the batch produced, so the replies are read up to
its answer. Refusals come back as a :class:`~.nft_ops.TransactionError` carrying the
kernel's errno and naming each refused message.

The batch is written straight into anonymous memory (``_Batch``): a full sync at 10,000
Services is ~25 MB of messages, and only the pages written are ever resident.

Why netlink and not ``nft`` (or a long-lived libnftables session): measured at 10,000
Services, nft 1.0.6 lists every chain of the table before running any command, even one
``add element`` (~40 ms at our 10,000 chains; with upstream's 110,000 the one-Service
change of the benchmark took 2.9 s), and a libnftables context does not keep that cache
across commands, since each commit changes the generation it checks. Building the batch
ourselves leaves only the kernel's work: a one-Service endpoint change is a handful of
messages (3.3 ms at 10,000 x 10, 1.7 ms of it in the kernel), a change that rewrites a
chain ~29 ms (mostly the kernel re-validating the chain graph), the full sync 5.1 s (1.3 s
in the kernel, the rest rendering and encoding in Python). The messages are nft's own
(the kernel tests compare the kernel's dump of both), so ``nft list`` reads the table as
the renderer wrote it; ``nft`` stays the tool to *read* it.

Flush detection reads the ruleset generation (``generation``: one GETGEN, ~0.02 ms) and,
when it moved, our fixed chains' rule counts (``rule_counts``: a GETRULE dump filtered
by table and chain, so the kernel walks only that chain).

Safety: the socket is opened in the network namespace the Runner's commands run in
(:func:`find_netns` finds it by inode under /run/netns when it differs from ours), on a
throwaway thread (kubeproxy.util.netns_thread), never anywhere else. A socket keeps the
namespace it was created in, so every later transaction goes there too.
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import assert_never

from kubeproxy.dataplane.base import Runner
from kubeproxy.dataplane.nft_ops import (
    AddChain,
    AddElements,
    AddRule,
    AddSet,
    AddTable,
    DeleteChain,
    DeleteElements,
    DeleteSet,
    DeleteTable,
    FlushChain,
    FlushSet,
    Listing,
    Op,
    TransactionError,
)
from kubeproxy.errors import DataPlaneError, NetnsError
from kubeproxy.render import nft_wire as wire
from kubeproxy.render.nft_ir import Item, SetDef
from kubeproxy.render.nftables import TABLE, TABLE_COMMENT
from kubeproxy.util.netns_thread import call_at

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFTA_GEN_ID = 1
_HDR = struct.Struct("=IHHII")


def find_netns(runner: Runner) -> str | None:
    """The /run/netns path of the namespace the runner's commands run in, or None when
    that is our own namespace. Raises DataPlaneError when it cannot be found."""
    mine = os.stat("/proc/self/ns/net").st_ino
    res = runner.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"])
    try:
        theirs = int(res.stdout.strip())
    except ValueError:
        raise DataPlaneError(f"cannot tell the runner's network namespace: {res.stderr!r}"
                             ) from None
    if theirs == mine:
        return None
    try:
        names = os.listdir("/run/netns")
    except OSError:
        names = []
    for name in names:
        path = os.path.join("/run/netns", name)
        try:
            if os.stat(path).st_ino == theirs:
                return path
        except OSError:
            continue
    raise DataPlaneError("the runner's network namespace is not ours and has no name "
                         "under /run/netns: refusing to guess where to write")


class NetlinkTransport:
    """nf_tables over a NETLINK_NETFILTER socket, in a given network namespace (a path
    such as /run/netns/NAME; None: ours)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sock: socket.socket | None = None
        self._seq = 0
        # Seconds the last transaction spent being encoded, and in the kernel.
        self.encode_seconds = 0.0
        self.kernel_seconds = 0.0

    def _socket(self) -> socket.socket:
        if self._sock is None:
            if self.netns is None:
                self._sock = _open()
            else:
                try:
                    self._sock = call_at(self.netns, _open)
                except NetnsError as err:
                    raise DataPlaneError(f"cannot open netlink in {self.netns}: {err}"
                                         ) from err
        return self._sock

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        return self._seq

    def commit(self, ops: Iterable[Op]) -> None:
        if isinstance(ops, Sequence) and not ops:
            return
        sock = self._socket()
        batch = _Batch()
        what: dict[int, str | wire.RuleWhat] = {}
        subsys = wire.NFNL_SUBSYS_NFTABLES
        start = time.perf_counter()
        try:
            begin = self._next_seq()
            batch.put(wire.MSG_BATCH_BEGIN, wire.F_REQUEST, begin, 0, b"",
                      socket.htons(subsys))
            what[begin] = "the transaction"
            for msg in encode(ops):
                seq = self._next_seq()
                batch.put(subsys << 8 | msg.type, wire.F_REQUEST | msg.flags, seq,
                          msg.family, msg.payload)
                what[seq] = msg.what
            batch.put(wire.MSG_BATCH_END, wire.F_REQUEST, self._next_seq(), 0, b"",
                      socket.htons(subsys))
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, batch.size + 65536)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, batch.size + 65536)
            # The kernel runs the whole batch inside sendmsg and queues its errors; a
            # GETGEN request sent after it marks the end of what the batch produced.
            probe = self._next_seq()
            getgen = _HDR.pack(20, subsys << 8 | wire.GETGEN, wire.F_REQUEST, probe, 0) + \
                struct.pack("BBH", 0, 0, 0)
            sent = time.perf_counter()
            self.encode_seconds = sent - start
            with batch.view() as data:
                sock.sendall(data)
            sock.sendall(getgen)
        except OSError as err:
            raise DataPlaneError(f"nftables transaction not sent: {err}") from err
        finally:
            batch.close()
        errors = [(str(what.get(seq, f"message {seq}")), code)
                  for seq, code in self._replies(probe) if code]
        self.kernel_seconds = time.perf_counter() - sent
        if errors:
            raise TransactionError(errors, "nftables transaction failed, nothing changed: ")

    def _replies(self, until: int) -> Iterator[tuple[int, int]]:
        """(seq, errno) of error messages, until the reply to ``until`` arrives."""
        sock = self._socket()
        while True:
            try:
                data = sock.recv(1 << 20)
            except OSError as err:
                raise DataPlaneError(f"reading nftables replies: {err}") from err
            for msg_type, seq, body in _messages(data):
                if msg_type == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code:
                        yield seq, code
                    if seq == until:
                        return
                elif seq == until:
                    return

    def listing(self, family: str) -> Listing | None:
        fam = wire.FAMILIES[family]
        tables = {wire.parse_attrs(b)[1].rstrip(b"\0").decode()
                  for b in self.dump(wire.GETTABLE, fam)}
        if TABLE not in tables:
            return None
        chains = frozenset(
            a[3].rstrip(b"\0").decode() for b in self.dump(wire.GETCHAIN, fam)
            if (a := wire.parse_attrs(b)).get(1, b"").rstrip(b"\0").decode() == TABLE)
        sets = frozenset(
            a[2].rstrip(b"\0").decode() for b in self.dump(wire.GETSET, fam)
            if (a := wire.parse_attrs(b)).get(1, b"").rstrip(b"\0").decode() == TABLE)
        return Listing(chains, sets)

    def generation(self) -> int:
        """The ruleset generation id (NFT_MSG_GETGEN; one small request and reply)."""
        sock = self._socket()
        seq = self._next_seq()
        try:
            sock.sendall(_HDR.pack(20, wire.NFNL_SUBSYS_NFTABLES << 8 | wire.GETGEN,
                                   wire.F_REQUEST, seq, 0) + struct.pack("BBH", 0, 0, 0))
            while True:
                for kind, got_seq, body in _messages(sock.recv(65536)):
                    if got_seq != seq:
                        continue  # a late reply to an earlier request
                    if kind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", body)[0]
                        raise TransactionError([("reading the nftables generation", code)])
                    gen_id = wire.parse_attrs(body[4:]).get(NFTA_GEN_ID)
                    if gen_id is None or len(gen_id) < 4:
                        raise DataPlaneError("nftables generation reply without an id")
                    value: int = struct.unpack(">I", gen_id[:4])[0]
                    return value
        except OSError as err:
            raise DataPlaneError(f"reading the nftables generation: {err}") from err

    def rule_counts(self, family: str, chains: Iterable[str]) -> dict[str, int] | None:
        fam = wire.FAMILIES[family]
        tables = {wire.parse_attrs(b).get(1, b"").rstrip(b"\0").decode()
                  for b in self.dump(wire.GETTABLE, fam)}
        if TABLE not in tables:
            return None
        # A dump filtered by table and chain: the kernel walks that one chain only.
        return {name: len(self.dump(wire.GETRULE, fam,
                                    wire.strz(1, TABLE) + wire.strz(2, name)))
                for name in chains}

    def dump(self, msg_type: int, family: int, payload: bytes = b"") -> list[bytes]:
        """The bodies (attributes) of the objects a GET* dump returns (none if the
        kernel has none: ENOENT)."""
        sock = self._socket()
        seq = self._next_seq()
        req = _HDR.pack(20 + len(payload), wire.NFNL_SUBSYS_NFTABLES << 8 | msg_type,
                        wire.F_REQUEST | wire.F_DUMP, seq, 0) + \
            struct.pack("BBH", family, 0, 0) + payload
        sock.sendall(req)
        out: list[bytes] = []
        while True:
            data = sock.recv(1 << 20)
            for kind, got_seq, body in _messages(data):
                if got_seq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code in (0, errno.ENOENT):
                        return out
                    raise TransactionError([("listing nftables objects", code)])
                out.append(body[4:])  # skip the nfgenmsg header

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _open() -> socket.socket:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as err:
        raise DataPlaneError(f"cannot open a netfilter netlink socket: {err}") from err
    sock.bind((0, 0))
    sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
    sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    return sock


class _Batch:
    """A netlink batch written straight into anonymous memory."""

    def __init__(self, capacity: int = 1 << 24) -> None:
        # Private: a shared anonymous mapping cannot grow (SIGBUS past its first size).
        self.buf = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.size = 0

    def put(self, msg_type: int, flags: int, seq: int, family: int, payload: bytes,
            res_id: int = 0) -> None:
        length = 20 + len(payload)
        end = self.size + ((length + 3) & ~3)
        if end > len(self.buf):
            self.buf.resize(max(end, 2 * len(self.buf)))
        _HDR.pack_into(self.buf, self.size, length, msg_type, flags, seq, 0)
        struct.pack_into("BBH", self.buf, self.size + 16, family, 0, res_id)
        self.buf[self.size + 20:self.size + length] = payload
        self.size = end

    def view(self) -> memoryview:
        return memoryview(self.buf)[:self.size]

    def close(self) -> None:
        if not self.buf.closed:
            self.buf.close()


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, seq, body) of each netlink message in ``data``."""
    i = 0
    while i + 16 <= len(data):
        length, kind, _, seq, _ = _HDR.unpack_from(data, i)
        if length < 16:
            break
        yield kind, seq, data[i + 16:i + length]
        i += (length + 3) & ~3


def encode(ops: Iterable[Op]) -> Iterator[wire.Message]:
    """The netlink messages of a transaction, in order."""
    codecs: dict[tuple[str, str], wire.ElementCodec] = {}
    items: dict[tuple[str, Item], bytes] = {}  # expressions already encoded, by item

    def codec(family: str, sdef: SetDef) -> wire.ElementCodec:
        found = codecs.get((family, sdef.name))
        if found is None or found.sdef != sdef:
            found = codecs[(family, sdef.name)] = wire.ElementCodec(sdef)
        return found

    set_id = 0
    for op in ops:
        match op:
            case AddTable(family):
                yield wire.table_msg(family, TABLE, TABLE_COMMENT)
            case DeleteTable(family):
                yield wire.del_table_msg(family, TABLE)
            case AddChain(family, chain):
                yield wire.chain_msg(family, TABLE, chain)
            case FlushChain(family, name):
                yield wire.chain_ref_msg(wire.DELRULE, family, TABLE, name)
            case DeleteChain(family, name):
                yield wire.chain_ref_msg(wire.DELCHAIN, family, TABLE, name)
            case AddRule(family, chain_name, rule):
                yield wire.rule_msg(family, TABLE, chain_name, rule, items)
            case AddSet(family, sdef):
                set_id += 1
                yield wire.set_msg(family, TABLE, sdef, set_id)
            case FlushSet(family, name):
                yield wire.set_ref_msg(wire.DELSETELEM, family, TABLE, name)
            case DeleteSet(family, name):
                yield wire.set_ref_msg(wire.DELSET, family, TABLE, name)
            case AddElements(family, sdef, elements):
                yield from wire.element_msgs(wire.NEWSETELEM, family, TABLE,
                                             codec(family, sdef), elements)
            case DeleteElements(family, sdef, elements):
                yield from wire.element_msgs(wire.DELSETELEM, family, TABLE,
                                             codec(family, sdef), elements)
            case _:
                assert_never(op)
