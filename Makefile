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
# make image: deploy/Dockerfile built with podman and tagged as deploy/kube-proxy.yaml's
# DaemonSet names it (localhost/kubeproxy:0.1.0 in podman's storage). No registry is
# reachable here, so the base (debian:bookworm-slim) is made from Debian packages by
# tools/image-base (mmdebstrap, cached in ~/.cache/kubeproxy-image). Every podman call
# reads src/kubeproxy/lab/containers.conf: runc, and no network unless asked for (docs/deploy.md).
IMAGE := $(shell sed -n 's/^ *image: *//p' deploy/kube-proxy.yaml)
IMAGE_APT_PKGS := podman runc mmdebstrap
PODMAN := CONTAINERS_CONF=$(CURDIR)/src/kubeproxy/lab/containers.conf podman
# pip in the build trusts what this machine trusts (a TLS-inspecting proxy's CA, say):
# the host's CA bundle, mounted read-only into RUN steps under /dev (a tmpfs there, so
# not even the mount point lands in a layer).
IMAGE_CA := -v /etc/ssl/certs/ca-certificates.crt:/dev/host-ca.crt:ro \
	--build-arg PIP_CERT=/dev/host-ca.crt

.PHONY: demo test test-ipvs lint deps apt venv bpf vm image bench-render bench-nft bench-daemon clean

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

# --network host: RUN steps use this machine's own network stack (apt and pip reach the
# archives; podman writes no NAT rule). --pull=never: the base comes from tools/image-base.
image:
	@missing=""; \
	for c in podman runc mmdebstrap; do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages for the image build: $(IMAGE_APT_PKGS)"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -q --no-install-recommends $(IMAGE_APT_PKGS); \
	  else echo "make image: missing$$missing (run as root to install them)"; exit 1; fi; \
	fi
	python3 tools/image-base
	$(PODMAN) build --network host --pull=never $(IMAGE_CA) -f deploy/Dockerfile -t $(IMAGE) .
	@$(PODMAN) images --filter reference=$(IMAGE)

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

# The image first: the lab runs deploy/'s Pods from it (tests/kernel: KUBEPROXY_TEST_PROXIES
# image, test_lab_deploy). As non-root there is none, and its tests skip.
test: deps vm lint
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory image; \
	else echo "note: not root: no image built (its lab tests skip)"; fi
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
