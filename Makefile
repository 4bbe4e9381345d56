# vmshield: two commands matter, `make demo` and `make test`. Both install what is
# missing first (`make setup`), idempotently: apt packages, the venv, the Debian guest
# kernels (cached under ~/.cache/vmshield) and the guest initramfs (build/).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := build/.stamps
APT_PACKAGES := qemu-system-x86 busybox-static cpio gzip lz4 zstd xz-utils gcc libc6-dev file python3-venv postgresql chromium libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
INITRAMFS := build/initramfs.cpio.gz
GUEST_SOURCES := $(wildcard lab/image/*) $(wildcard lab/image/progs/*.c) scripts/build-initramfs.sh

.PHONY: setup apt venv kernels initramfs agent demo test lint unit integration clean

setup: apt venv kernels initramfs agent

apt: $(STAMPS)/apt
$(STAMPS)/apt: scripts/install-apt.sh
	bash scripts/install-apt.sh $(APT_PACKAGES)
	@mkdir -p $(STAMPS) && touch $@

venv: $(STAMPS)/venv
$(STAMPS)/venv: pyproject.toml | $(STAMPS)/apt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	@mkdir -p $(STAMPS) && touch $@

kernels: | $(STAMPS)/apt
	bash scripts/fetch-kernels.sh

initramfs: $(INITRAMFS)
$(INITRAMFS): $(GUEST_SOURCES) $(wildcard $(HOME)/.cache/vmshield/kernels/*/release) | $(STAMPS)/apt kernels
	bash scripts/build-initramfs.sh $@

# The in-guest agent: gcc, cached by source hash under ~/.cache/vmshield/agent.
agent: venv
	$(PY) -m vmshield.space.agent

demo: setup
	bash scripts/demo.sh

lint: venv
	$(VENV)/bin/ruff check src tests bench examples scripts
	$(VENV)/bin/ruff format --check src tests bench examples scripts
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest tests/unit -q

integration: setup
	$(VENV)/bin/pytest tests/integration -q

test: setup lint
	$(VENV)/bin/pytest tests -q

clean:
	rm -rf build $(VENV)
