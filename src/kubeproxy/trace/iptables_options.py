"""What the tracer knows about iptables options: which exist, who owns them, what they mean.

Module-level tables list every option of every match module and target the tracer
models (a rule using anything else is refused, never guessed at), and the builders turn
one module's collected options into :mod:`~kubeproxy.trace.iptables_rules` objects. The
builders also enforce the checks the kernel or iptables would (``-m tcp`` needs ``-p tcp``,
``--mode nth`` needs ``--every``, ...), raising :class:`OptionError`, which the parser
turns into a ``RulesetParseError`` naming the line. ``split_arguments`` splits a rule
line into arguments the way iptables-restore does, before any of that.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from kubeproxy.errors import KubeProxyError
from kubeproxy.trace.iptables_rules import (
    AddrTypeLocalMatch,
    ChanceMatch,
    CtStateMatch,
    Dnat,
    Jump,
    MarkMatch,
    Match,
    MultiportMatch,
    NoOp,
    PortMatch,
    PortRange,
    SetMark,
    SourceNat,
    Standard,
    Target,
    Tri,
)
from kubeproxy.trace.result import IPAddress

_MARK_BITS = 0xFFFFFFFF


class OptionError(KubeProxyError, ValueError):
    """An option or its value is wrong; the parser adds the line."""


# --- option tables -------------------------------------------------------------------------


@dataclass(frozen=True)
class Opt:
    takes_value: bool
    negatable: bool


_V, _VN, _F, _FN = Opt(True, False), Opt(True, True), Opt(False, False), Opt(False, True)

# Options every rule has, whatever modules it loads: spelling -> canonical name.
GENERIC_OPTIONS: Mapping[str, str] = MappingProxyType(
    {
        "-s": "src", "--source": "src", "--src": "src",
        "-d": "dst", "--destination": "dst", "--dst": "dst",
        "-p": "proto", "--protocol": "proto",
        "-i": "in", "--in-interface": "in",
        "-o": "out", "--out-interface": "out",
        "-m": "match", "--match": "match",
        "-j": "jump", "--jump": "jump",
        "-g": "goto", "--goto": "goto",
    }
)  # fmt: skip
NEGATABLE_GENERIC = frozenset({"src", "dst", "proto", "in", "out"})

PORT_OPTIONS = MappingProxyType({"--dport": _VN, "--sport": _VN})
# Match modules the tracer models, and the options each accepts.
MATCH_OPTIONS: Mapping[str, Mapping[str, Opt]] = MappingProxyType(
    {
        "comment": {"--comment": _V},
        "tcp": PORT_OPTIONS,
        "udp": PORT_OPTIONS,
        "sctp": PORT_OPTIONS,
        "multiport": {"--dports": _VN, "--sports": _VN, "--ports": _VN},
        "addrtype": {"--src-type": _VN, "--dst-type": _VN},
        "conntrack": {"--ctstate": _VN},
        "state": {"--state": _VN},
        "mark": {"--mark": _VN},
        "statistic": {"--mode": _V, "--probability": _VN, "--every": _VN, "--packet": _V},
        "recent": {
            "--set": _FN, "--rcheck": _FN, "--update": _FN, "--remove": _FN,
            "--seconds": _V, "--reap": _F, "--hitcount": _V, "--rttl": _F,
            "--name": _V, "--mask": _V, "--rsource": _F, "--rdest": _F,
        },
    }
)  # fmt: skip
OPTION_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "--destination-port": "--dport",
        "--source-port": "--sport",
        "--destination-ports": "--dports",
        "--source-ports": "--sports",
    }
)
# Targets the tracer models, and the options each accepts.
TARGET_OPTIONS: Mapping[str, Mapping[str, Opt]] = MappingProxyType(
    {
        "ACCEPT": {},
        "DROP": {},
        "RETURN": {},
        "REJECT": {"--reject-with": _V},
        "DNAT": {"--to-destination": _V, "--random": _F, "--persistent": _F},
        "SNAT": {"--to-source": _V, "--random": _F, "--random-fully": _F, "--persistent": _F},
        "MASQUERADE": {"--to-ports": _V, "--random": _F, "--random-fully": _F},
        "MARK": {
            "--set-xmark": _V, "--set-mark": _V, "--or-mark": _V, "--and-mark": _V,
            "--xor-mark": _V,
        },
        "LOG": {
            "--log-level": _V, "--log-prefix": _V, "--log-tcp-sequence": _F,
            "--log-tcp-options": _F, "--log-ip-options": _F, "--log-uid": _F,
            "--log-macdecode": _F,
        },
        "NFLOG": {
            "--nflog-group": _V, "--nflog-prefix": _V, "--nflog-range": _V,
            "--nflog-size": _V, "--nflog-threshold": _V,
        },
    }
)  # fmt: skip
_STANDARD_TARGETS: Mapping[str, Literal["ACCEPT", "DROP", "REJECT", "RETURN"]] = MappingProxyType(
    {"ACCEPT": "ACCEPT", "DROP": "DROP", "REJECT": "REJECT", "RETURN": "RETURN"}
)
NAT_TARGETS = frozenset({"DNAT", "SNAT", "MASQUERADE"})  # the kernel allows them in nat only
_PROTOCOLS = frozenset(
    {"tcp", "udp", "sctp", "icmp", "icmpv6", "ipv6-icmp", "udplite", "dccp", "esp", "ah",
     "gre", "all"}
)  # fmt: skip
_PROTOCOL_NUMBERS: Mapping[str, str] = MappingProxyType(
    {"0": "all", "1": "icmp", "6": "tcp", "17": "udp", "58": "ipv6-icmp", "132": "sctp"}
)
_PORT_PROTOCOLS = frozenset({"tcp", "udp", "sctp", "udplite", "dccp"})  # for multiport
_CONNTRACK_STATES = frozenset(
    {"INVALID", "NEW", "ESTABLISHED", "RELATED", "UNTRACKED", "SNAT", "DNAT"}
)
_STATE_STATES = frozenset({"INVALID", "NEW", "ESTABLISHED", "RELATED", "UNTRACKED"})

Options = dict[str, tuple[str, bool]]  # option -> (value, negated); flags have value ""


def normalize_protocol(text: str) -> str:
    """``-p`` value in canonical form: lower case, well-known numbers named."""
    name = text.lower()
    if name.isdigit():
        return _PROTOCOL_NUMBERS.get(str(int(name)), f"protocol {int(name)}")
    if name not in _PROTOCOLS:
        raise OptionError(f"unknown protocol {text!r}")
    return name


# --- tokenizing ----------------------------------------------------------------------------


def split_arguments(line: str) -> list[str]:
    """Split a rule line the way iptables-restore does.

    Whitespace separates arguments; a double quote opens a quoted part, inside which a
    backslash escapes the next character; the closing quote ends the argument. Outside
    quotes a backslash is an ordinary character. Raises ValueError on an open quote.
    """
    if '"' not in line:
        return line.split()
    if "\\" not in line:  # the usual case: whole quoted arguments without escapes
        parts = line.split('"')
        if _quotes_are_whole(parts):
            args: list[str] = []
            for i, part in enumerate(parts):
                if i % 2:
                    args.append(part)
                else:
                    args.extend(part.split())
            return args
    return _split_slowly(line)


def _quotes_are_whole(parts: list[str]) -> bool:
    """True if every quoted part (odd index) is a whole argument, between whitespace."""
    if len(parts) % 2 == 0:
        return False  # an open quote: let the slow path say so
    last = len(parts) - 1
    for i in range(1, last, 2):
        before, after = parts[i - 1], parts[i + 1]
        if not (before[-1:].isspace() or (i == 1 and not before)):
            return False
        if not (after[:1].isspace() or (i + 1 == last and not after)):
            return False
    return True


def _split_slowly(line: str) -> list[str]:
    args: list[str] = []
    buf: list[str] = []
    quoted = escaped = False
    for ch in line:
        if quoted:
            if escaped:
                buf.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                args.append("".join(buf))
                buf.clear()
                quoted = False
            else:
                buf.append(ch)
        elif ch == '"':
            quoted = True
        elif ch in " \t\r\n":
            if buf:
                args.append("".join(buf))
                buf.clear()
        else:
            buf.append(ch)
    if quoted:
        raise ValueError("unterminated quote")
    if buf:
        args.append("".join(buf))
    return args


# --- value parsers -------------------------------------------------------------------------


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise OptionError(f"bad port {text!r}")
    return int(text)


def _port_range(text: str) -> PortRange:
    low, colon, high = text.partition(":")
    if not colon:
        port = _port(text)
        return port, port
    result = (_port(low) if low else 0, _port(high) if high else 65535)
    if result[0] > result[1]:
        raise OptionError(f"bad port range {text!r}")
    return result


def _u32(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise OptionError(f"bad number {text!r}") from None
    if not 0 <= value <= _MARK_BITS:
        raise OptionError(f"{text!r} does not fit in 32 bits")
    return value


def _value_mask(text: str) -> tuple[int, int]:
    value, slash, mask = text.partition("/")
    return _u32(value), (_u32(mask) if slash else _MARK_BITS)


def _nat_destination(text: str) -> tuple[IPAddress | None, int | None]:
    """``IP``, ``IP:PORT``, ``[IPv6]``, ``[IPv6]:PORT``, bare IPv6 or ``:PORT``."""
    if text.startswith("["):
        address, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise OptionError(f"bad address {text!r}")
        port = rest[1:] if rest else None
    elif text.count(":") > 1:
        address, port = text, None
    else:
        address, colon, port_text = text.partition(":")
        port = port_text if colon else None
    if "-" in address or (port is not None and "-" in port):
        raise OptionError(f"NAT ranges are not modelled: {text!r}")
    try:
        parsed = ipaddress.ip_address(address) if address else None
    except ValueError:
        raise OptionError(f"bad address {text!r}") from None
    number = None if port is None else _port(port)
    if number == 0 or (parsed is None and number is None):
        raise OptionError(f"bad NAT destination {text!r}")
    return parsed, number


# --- match and target builders -------------------------------------------------------------


@dataclass
class RuleContext:
    """What builders need to know about the rule beyond their own options."""

    proto: str | None  # the rule's `-p`, if given and not negated
    comments: list[str]


def _build_comment(opts: Options, ctx: RuleContext) -> list[Match]:
    if "--comment" not in opts:
        raise OptionError("-m comment needs --comment")
    ctx.comments.append(opts["--comment"][0])
    return []


def _build_ports(module: str) -> Callable[[Options, RuleContext], list[Match]]:
    def build(opts: Options, ctx: RuleContext) -> list[Match]:
        if ctx.proto != module:
            raise OptionError(f"-m {module} needs -p {module}")
        dport, dneg = opts.get("--dport", ("", False))
        sport, sneg = opts.get("--sport", ("", False))
        dports = _port_range(dport) if dport else None
        sports = _port_range(sport) if sport else None
        return [PortMatch(module, dports, dneg, sports, sneg)]

    return build


def _build_multiport(opts: Options, ctx: RuleContext) -> list[Match]:
    if ctx.proto not in _PORT_PROTOCOLS:
        raise OptionError("-m multiport needs -p tcp, udp, sctp, udplite or dccp")
    if len(opts) != 1:
        raise OptionError("-m multiport needs exactly one of --dports, --sports, --ports")
    ((option, (value, negated)),) = opts.items()
    ranges = tuple(_port_range(part) for part in value.split(","))
    if len(ranges) > 15:
        raise OptionError("-m multiport takes at most 15 ports")
    which: Literal["dports", "sports", "ports"] = (
        "dports" if option == "--dports" else "sports" if option == "--sports" else "ports"
    )
    return [MultiportMatch(which, ranges, negated)]


def _build_addrtype(opts: Options, ctx: RuleContext) -> list[Match]:
    if not opts:
        raise OptionError("-m addrtype needs --src-type or --dst-type")
    matches: list[Match] = []
    for option, (value, negated) in opts.items():
        if value.upper() != "LOCAL":
            raise OptionError(f"addrtype {value} is not modelled (only LOCAL)")
        matches.append(AddrTypeLocalMatch("src" if option == "--src-type" else "dst", negated))
    return matches


def _build_ctstate(opts: Options, ctx: RuleContext) -> list[Match]:
    if not opts:
        raise OptionError("the state match needs --ctstate or --state")
    ((option, (value, negated)),) = opts.items()
    known = _CONNTRACK_STATES if option == "--ctstate" else _STATE_STATES
    states = frozenset(value.upper().split(","))
    if not states <= known:
        raise OptionError(f"unknown {option} {','.join(sorted(states - known))}")
    return [CtStateMatch(option[2:], states, negated)]


def _build_mark(opts: Options, ctx: RuleContext) -> list[Match]:
    if "--mark" not in opts:
        raise OptionError("-m mark needs --mark")
    value, negated = opts["--mark"]
    mark, mask = _value_mask(value)
    return [MarkMatch(mark, mask, negated)]


def _build_statistic(opts: Options, ctx: RuleContext) -> list[Match]:
    mode = opts.get("--mode", ("", False))[0]
    if mode == "random":
        if "--probability" not in opts or {"--every", "--packet"} & opts.keys():
            raise OptionError("--mode random takes --probability only")
        text, negated = opts["--probability"]
        try:
            probability = float(text)
        except ValueError:
            raise OptionError(f"bad probability {text!r}") from None
        if not 0.0 <= probability <= 1.0:
            raise OptionError(f"probability {text} is not in [0, 1]")
        # Below 1 either outcome is possible (the contract explores both, even for 0).
        answer = Tri.YES if probability >= 1.0 else Tri.MAYBE
        return [ChanceMatch(answer, f"random probability {text}", negated)]
    if mode == "nth":
        if "--every" not in opts or "--probability" in opts:
            raise OptionError("--mode nth takes --every and --packet")
        every_text, negated = opts["--every"]
        every, packet = _u32(every_text), _u32(opts.get("--packet", ("0", False))[0])
        if every == 0 or packet >= every:
            raise OptionError("--mode nth needs --every N > 0 and --packet below N")
        answer = Tri.YES if every == 1 else Tri.MAYBE
        return [ChanceMatch(answer, f"nth every {every} packet {packet}", negated)]
    raise OptionError("-m statistic needs --mode random or --mode nth")


def _build_recent(opts: Options, ctx: RuleContext) -> list[Match]:
    commands = [c for c in ("--set", "--rcheck", "--update", "--remove") if c in opts]
    if len(commands) != 1:
        raise OptionError("-m recent needs exactly one of --set, --rcheck, --update, --remove")
    command = commands[0]
    negated = opts[command][1]
    if command in ("--set", "--remove") and {"--seconds", "--hitcount", "--reap"} & opts.keys():
        raise OptionError(f"--seconds, --hitcount and --reap do not go with {command}")
    if "--reap" in opts and "--seconds" not in opts:
        raise OptionError("--reap needs --seconds")
    if "--rsource" in opts and "--rdest" in opts:
        raise OptionError("--rsource and --rdest exclude each other")
    if "--seconds" in opts:
        _u32(opts["--seconds"][0])
    if "--mask" in opts:
        try:
            ipaddress.ip_address(opts["--mask"][0])
        except ValueError:
            raise OptionError(f"bad --mask {opts['--mask'][0]!r}") from None
    name = opts.get("--name", ("DEFAULT", False))[0]
    if command == "--set":
        return [ChanceMatch(Tri.YES, f"recent set {name}", negated)]
    seconds = f" within {opts['--seconds'][0]}s" if "--seconds" in opts else ""
    text = f"recent {command[2:]} {name}{seconds} (client may or may not be in the list)"
    return [ChanceMatch(Tri.MAYBE, text, negated)]


MATCH_BUILDERS: Mapping[str, Callable[[Options, RuleContext], list[Match]]] = MappingProxyType(
    {
        "comment": _build_comment,
        "tcp": _build_ports("tcp"),
        "udp": _build_ports("udp"),
        "sctp": _build_ports("sctp"),
        "multiport": _build_multiport,
        "addrtype": _build_addrtype,
        "conntrack": _build_ctstate,
        "state": _build_ctstate,
        "mark": _build_mark,
        "statistic": _build_statistic,
        "recent": _build_recent,
    }
)
assert MATCH_BUILDERS.keys() == MATCH_OPTIONS.keys()


def _build_mark_target(opts: Options) -> SetMark:
    if len(opts) != 1:
        raise OptionError("MARK needs exactly one of --set-xmark, --set-mark, --or-mark, ...")
    ((option, (value, _)),) = opts.items()
    text = f"{option[2:]} {value}"
    if option in ("--set-xmark", "--set-mark"):
        bits, mask = _value_mask(value)
        keep = ~mask & _MARK_BITS
        if option == "--set-xmark":
            return SetMark(keep, 0, bits, text)
        return SetMark(keep, bits, 0, text)
    bits = _u32(value)
    if option == "--or-mark":
        return SetMark(_MARK_BITS, bits, 0, text)
    if option == "--and-mark":
        return SetMark(bits, 0, 0, text)
    return SetMark(_MARK_BITS, 0, bits, text)


def build_target(name: str, goto: bool, opts: Options) -> Target:
    if name not in TARGET_OPTIONS:
        return Jump(name, goto)
    if goto:
        raise OptionError(f"-g needs a user-defined chain, not {name}")
    detail = " ".join(f"{o} {v}".rstrip() for o, (v, _) in opts.items())
    standard = _STANDARD_TARGETS.get(name)
    if standard is not None:
        return Standard(standard, detail)
    if name == "DNAT":
        if "--to-destination" not in opts:
            raise OptionError("DNAT needs --to-destination")
        address, port = _nat_destination(opts["--to-destination"][0])
        return Dnat(address, port, opts["--to-destination"][0])
    if name == "SNAT":
        if "--to-source" not in opts:
            raise OptionError("SNAT needs --to-source")
        _nat_destination(opts["--to-source"][0])
        return SourceNat("SNAT", detail)
    if name == "MASQUERADE":
        return SourceNat("MASQUERADE", detail)
    if name == "MARK":
        return _build_mark_target(opts)
    return NoOp(name, detail)
