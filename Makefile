# The two commands a person needs: `make demo` and `make test` (see README.md).
# Both install what they need (Debian packages as root, a virtualenv) idempotently.

VENV   ?= .venv
PY     := $(VENV)/bin/python
APT_PKGS := iptables nftables conntrack iproute2 ipset clang llvm libbpf-dev bpftool openssl
# ebpf mode: the socket load-balancing programs, compiled for the kernel's BPF target.
BPF_OBJ := src/kubeproxy/bpf/sock_lb.o
BPF_CFLAGS := -target bpf -mcpu=v3 -O2 -g -Wall -I/usr/include/$(shell uname -m)-linux-gnu
# tools/vmrun: tests that need a kernel feature this machine lacks (IPVS) run in a QEMU
# guest booting Debian's 6.1 kernel; the guest image is cached on first use (docs/vm.md).
VM_APT_PKGS := qemu-system-x86 kmod cpio  # cpio: tests check the initramfs reads back

.PHONY: demo test test-ipvs lint deps apt venv bpf vm bench-render bench-nft bench-daemon clean

deps: apt venv bpf

apt:
	@missing=""; \
	for c in iptables-legacy-restore iptables-nft-restore nft conntrack ip ipset clang bpftool openssl; do \
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

vm:
	@if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || ! command -v cpio >/dev/null 2>&1 || \
	    ! PATH="$$PATH:/usr/sbin:/sbin" command -v depmod >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages for the test guest: $(VM_APT_PKGS)"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -q --no-install-recommends $(VM_APT_PKGS); \
	  else echo "note: qemu-system-x86_64 or depmod missing (run as root; guest tests will skip)"; fi; \
	fi
	@if command -v qemu-system-x86_64 >/dev/null 2>&1; then python3 tools/vmrun --build; fi

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

test: deps vm lint
	$(VENV)/bin/pytest -q

# The IPVS kernel tests in one guest boot (make test runs them too, via tests/vm).
test-ipvs: deps vm
	$(VENV)/bin/pytest -q tests/vm/test_ipvs_in_guest.py

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
