# The two commands a person needs: `make demo` and `make test` (see README.md).
# Both install what they need (Debian packages as root, a virtualenv) idempotently.

VENV   ?= .venv
PY     := $(VENV)/bin/python
APT_PKGS := iptables nftables conntrack iproute2 ipset clang llvm libbpf-dev bpftool
# ebpf mode: the socket load-balancing programs, compiled for the kernel's BPF target.
BPF_OBJ := src/kubeproxy/bpf/sock_lb.o
BPF_CFLAGS := -target bpf -mcpu=v3 -O2 -g -Wall -I/usr/include/$(shell uname -m)-linux-gnu

.PHONY: demo test lint deps apt venv bpf bench-render bench-nft bench-daemon clean

deps: apt venv bpf

apt:
	@missing=""; \
	for c in iptables-legacy-restore iptables-nft-restore nft conntrack ip ipset clang bpftool; do \
	  command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	[ -f /usr/include/bpf/bpf_helpers.h ] || missing="$$missing libbpf-dev"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages for:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PKGS); \
	  else echo "note: missing$$missing (run as root to install; kernel tests will skip)"; fi; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

bpf: $(BPF_OBJ)

$(BPF_OBJ): src/kubeproxy/bpf/sock_lb.c
	@if command -v clang >/dev/null 2>&1 && [ -f /usr/include/bpf/bpf_helpers.h ]; then \
	  clang $(BPF_CFLAGS) -c $< -o $@; \
	else echo "note: clang/libbpf-dev missing: $@ not built (ebpf mode unavailable)"; fi

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

test: deps lint
	$(VENV)/bin/pytest -q

demo: deps
	$(VENV)/bin/python -m kubeproxy.lab.demo

bench-render: venv
	$(PY) bench/render.py

bench-nft: deps
	$(PY) bench/nft.py

bench-daemon: deps
	$(PY) bench/daemon.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
