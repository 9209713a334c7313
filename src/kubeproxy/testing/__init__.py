"""Strict fakes the package ships for tests, as knftables ships its Fake.

Each fake stands in for one kernel interface behind a data plane's seam and refuses
what the kernel refuses, so a test that passes against it proves something:
``testing.nftables`` (an nf_tables transport), ``testing.iptables`` (a Runner for
``iptables``, ``iptables-save`` and ``iptables-restore``).
"""
