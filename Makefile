# keygate: `make demo` and `make test` do all of the set-up on a fresh Debian machine.
GO        ?= go
BIN       := bin
# Debian packages the tests run for real: cryptsetup for compatibility, openssl
# and python3-cryptography as independent AES-XTS references, e2fsprogs and
# dosfstools to check the filesystems go-diskfs writes, swtpm and tpm2-tools
# as real TPMs and a second opinion on them, and libssl-dev with a C compiler
# for the in-process TPM simulator (cgo); clang, llvm and libbpf-dev to build
# and check the eBPF monitor's programs, procps for its benign workload;
# clevis, clevis-tpm2, tang and socat as make bench's reference for the
# unlock latency; qemu-system-x86, ovmf and busybox-static for the measured
# test guest (testvm/; its Debian kernel is downloaded and unpacked, never
# installed, and cached in .cache/testvm); qemu-utils (qemu-img, qemu-io),
# libnbd-bin (nbdcopy, nbdinfo) and fio as real clients of the NBD export,
# nbdkit as the server to measure it against; softhsm2 as a real PKCS#11 token
# for the master key in an HSM (keysvc/masterkey/hsm); chromium for the
# dashboard's test in a real browser (keysvc/dashboard/browsertest);
# postgresql for the key service's PostgreSQL store (private clusters in
# temporary directories, internal/pgtest).
TEST_DEBS := qemu-utils libnbd-bin nbdkit fio cryptsetup-bin openssl python3-cryptography e2fsprogs dosfstools swtpm swtpm-tools tpm2-tools libssl-dev gcc libc6-dev \
	clang llvm libbpf-dev procps clevis clevis-tpm2 tang socat \
	qemu-system-x86 ovmf busybox-static softhsm2 chromium postgresql
# Tools the tests must find: a missing one fails the run instead of skipping.
export KEYGATE_REQUIRE ?= cgo,userfaultfd,go,sleep,mount,losetup,qemu-system-x86_64,cryptsetup,qemu-img,qemu-io,nbdcopy,nbdinfo,nbdkit,fio,python-cryptography,e2fsck,mkfs.ext4,debugfs,fsck.fat,swtpm,tpm2_pcrread,tpm2_createek,sim,procmem,root,loop,bpf,clang,llvm-strip,ps,top,pgrep,qemu,guest-bpf,softhsm,softhsm2-util,chromium,postgresql,setpriv

.PHONY: all build test testvm bench demo generate deps test-deps fuzz clean

all: build

build:
	$(GO) build -o $(BIN)/ ./cmd/...

deps:
	$(GO) mod download

# Installs only what is missing, so repeated runs stay fast and offline.
test-deps:
	@missing=""; for p in $(TEST_DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

test: test-deps deps
	$(GO) vet ./...
	$(GO) tool staticcheck ./...
	$(GO) test -count=1 -timeout 30m ./...

# Runs every fuzz target for FUZZTIME (default 30s) beyond its seed corpus
# (the seeds alone run in make test). Minimisation is capped: several
# targets take 16-30 KB inputs, and Go's default minimiser stalls on them.
FUZZTIME ?= 30s
FUZZ_TARGETS := ./disk/luks2:FuzzParseHeader ./disk/xts:FuzzXTS \
	./attest:FuzzCheckToken ./attest:FuzzParsePolicy ./attest:FuzzVerifyAttestation \
	./tpm:FuzzParsePublicKeyPEM ./tpm:FuzzSockConn ./keysvc/masterkey:FuzzOpenSealed \
	./keysvc:FuzzDecodeRequest ./keysvc:FuzzVMAPI ./keysvc:FuzzDashboard ./keysvc/client:FuzzDecode ./disk/nbd:FuzzParseRequest ./disk/nbd:FuzzServer \
	./keysvc/masterkey/hsm:FuzzParseURI ./disk:FuzzDirRecords ./disk/ninep:FuzzDecodeRequest ./disk/ninep:FuzzServer
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
	  pkg=$${t%%:*}; name=$${t##*:}; [ -d "$$pkg" ] || continue; \
	  echo "== $$pkg $$name"; \
	  $(GO) test $$pkg -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 10x; \
	done

# Only the measured test guest's scenarios (make test runs them too).
testvm: test-deps deps
	$(GO) test -count=1 -timeout 20m -v ./testvm/...

bench: test-deps build
	@scripts/bench.sh

demo: build
	$(BIN)/keygate demo

generate:
	$(GO) generate ./...

clean:
	rm -rf $(BIN)
