# Entry points. `make help` lists them.

HYPERVISOR ?= qemu
CARGO      ?= cargo
GUEST_DIR  ?= $(CURDIR)/.cache/guest
# Debian's packaged kernel with its modules: what the benchmarks compare the built kernel
# with, and what the tests of module loading boot.
GUEST_DEBIAN_DIR ?= $(CURDIR)/.cache/guest-debian

ifeq ($(HYPERVISOR),qemu)
  FEATURES := qemu
else ifeq ($(HYPERVISOR),dragonball)
  FEATURES := dragonball
else ifeq ($(HYPERVISOR),all)
  FEATURES := qemu,dragonball
else
  $(error HYPERVISOR must be qemu, dragonball or all, not "$(HYPERVISOR)")
endif
SHIM_FEATURES := --no-default-features --features $(FEATURES)

# Feature sets `make check` lints: each library alone, and every shim combination.
LIB_CRATES    := hypervisor netdev endpoint hypervisor-qemu hypervisor-dragonball guest-agent workspace-tests
SHIM_FEATSETS := "" "--features qemu" "--features dragonball" "--features qemu,dragonball"

export GUEST_DIR GUEST_DEBIAN_DIR

.PHONY: help build install test check demo bench soak footprint guest-assets guest-assets-debian test-guest deps tools clean

help: ## Show the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  HYPERVISOR=qemu|dragonball|all picks the shim's backends (default: qemu)"

build: ## Build the shim (release) with HYPERVISOR's backends
	$(CARGO) build --release -p containerd-shim-kata-v2 $(SHIM_FEATURES)
	@echo "built target/release/containerd-shim-kata-v2 with: $(FEATURES)"

install: build guest-assets ## Install the shim, the guest and a default configuration in Kata's places (DESTDIR, PREFIX)
	@HYPERVISOR=$(HYPERVISOR) scripts/install.sh

deps: ## Install the Debian packages the tests and demo need
	@scripts/install-deps.sh

tools: ## Install the cargo tools `make check` runs (cargo-deny, pinned)
	@scripts/install-tools.sh

guest-assets: deps ## Build the guest (a kernel for the job from Debian's linux-source, ~6 min the first time; initramfs with the agent) into .cache/guest
	@scripts/guest-assets.sh

guest-assets-debian: deps ## The same guest on Debian's packaged cloud kernel and its modules, into .cache/guest-debian
	@GUEST_KERNEL=debian GUEST_DIR=$(GUEST_DEBIAN_DIR) scripts/guest-assets.sh

test-guest: deps ## Build the freestanding test guest into .cache/testguest (Dragonball VM tests)
	$(MAKE) -C guest/testguest OUT=$(CURDIR)/.cache/testguest

test: deps guest-assets guest-assets-debian test-guest ## Run every test: unit, privileged (root), boundaries, VMs
	$(CARGO) test --workspace --all-features --no-fail-fast
	$(CARGO) test -p containerd-shim-kata-v2 --no-default-features --features qemu --test cli
	$(CARGO) test -p containerd-shim-kata-v2 --no-default-features --features dragonball --test cli
	@if grep -qwE 'vmx|svm' /proc/cpuinfo && \
	    grep -qs '^CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y' $${GUEST_KERNEL_CONFIG:-$(GUEST_DIR)/config}; then \
		$(CARGO) test -p workspace-tests --all-features --test dragonball_conformance -- --ignored; \
	else \
		echo "== SKIPPED: Dragonball Linux scenarios (tests/tests/dragonball_conformance.rs): they need vmx/svm and a guest kernel with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y"; \
	fi
	@echo "== dependency graphs (crates per root):"
	@$(CARGO) test -q -p workspace-tests --all-features --test dependency_boundaries -- --show-output \
		| grep -E '^[a-z].*: [0-9]+ crates$$'

check: tools ## fmt, clippy -D warnings on every feature combination, docs -D warnings, cargo deny
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	@set -e; for c in $(LIB_CRATES); do \
		echo "clippy -p $$c (default features)"; \
		$(CARGO) clippy -q -p $$c --all-targets -- -D warnings; \
	done
	@set -e; for f in $(SHIM_FEATSETS); do \
		echo "clippy shim --no-default-features $$f"; \
		$(CARGO) clippy -q -p containerd-shim-kata-v2 --all-targets --no-default-features $$f -- -D warnings; \
	done
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --all-features --no-deps
# deny.toml's offline checks (drop --hide-inclusion-graph to see who brings a crate).
# `advisories` is left out: it fetches the advisory database over the network.
	$(CARGO) deny --offline check --hide-inclusion-graph bans licenses sources

demo: deps guest-assets ## Boot a sandbox, ping it, hotplug a NIC, tear down
	@scripts/demo.sh

SOAK_TAPS      ?= 1000
SOAK_SANDBOXES ?= 200
soak: deps guest-assets ## TAP and sandbox cycles in one process: fds, threads, RSS first vs last
	$(CARGO) run --profile bench -p workspace-tests --example soak -- $(SOAK_TAPS) $(SOAK_SANDBOXES)

footprint: ## Shim size, crate count, clean build time per backend set -> BENCHMARKS.md
	@scripts/footprint.sh

bench: deps guest-assets guest-assets-debian test-guest ## Run the benchmarks (results go in BENCHMARKS.md by hand)
	$(CARGO) bench --workspace --all-features

clean: ## Remove build outputs and the guest cache
	$(CARGO) clean
	rm -rf .cache
