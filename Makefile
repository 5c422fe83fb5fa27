# obdtrace: eBPF-assisted trace record and replay for overlaybd images.
# `make help` lists the targets.

GO        ?= go
BIN       := bin
TOOLS     := $(BIN)/tools
FUZZTIME  ?= 30s
BENCHTIME ?= 1s
PKGS      := ./...

.PHONY: all help deps build test test-short generate lint fuzz bench bench-coldstart demo clean

all: build

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

deps: ## install every system dependency (idempotent; quick when present)
	scripts/install-deps.sh

build: ## build the commands into bin/
	$(GO) build -o $(BIN)/ ./cmd/...

test: deps ## run every test, as CI does (needs root for the kernel tests)
	$(GO) test -count=1 -timeout 40m $(PKGS)

test-short: ## unit tests only, no dependencies installed
	$(GO) test -short $(PKGS)

generate: deps ## regenerate committed code (bpf2go objects, protobuf)
	PATH="$(CURDIR)/$(TOOLS):$$PATH" $(GO) generate ./...

lint: deps ## gofmt, go vet, staticcheck
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(TOOLS)/staticcheck $(PKGS)

fuzz: ## run each fuzz target for FUZZTIME (default 30s)
	scripts/fuzz.sh $(FUZZTIME)

bench: ## run the Go benchmarks
	$(GO) test -run '^$$' -bench . -benchmem -benchtime $(BENCHTIME) $(PKGS)

bench-coldstart: deps build ## cold start through a 25 Mbit/s, 40 ms link: no prefetch, replay, full prefetch, warm (ROUNDS=3)
	scripts/bench-coldstart.sh --rounds $(or $(ROUNDS),3)

demo: deps build ## the main job end to end on the embedded hello-world image
	scripts/demo.sh

clean:
	rm -rf $(BIN)
