"""Packet tracers over rendered rules: "where does this packet go, and why".

A tracer reads what a renderer produced (iptables-save text, an nftables script) and
follows one packet through it the way the kernel would, so flow tests can assert
behaviour ("pod 10.0.0.2 -> 172.30.0.41:80 reaches {10.180.0.1:80}, not masqueraded")
instead of rule text. The packet's way through netfilter's hooks is one module
(:mod:`.netfilter`); each mode adds only the walker of its own chains.
"""
