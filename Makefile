# Set-up and the two README commands. Everything a fresh machine needs is installed from here.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
WHEELS      ?= .wheels
HOROVOD_VER := 0.28.1
export TF_CPP_MIN_LOG_LEVEL ?= 2
TF_SPEC     := tensorflow-cpu==2.17.1

# Horovod: TensorFlow + Gloo, no MPI / PyTorch / MXNet. CMAKE_POLICY_VERSION_MINIMUM lets cmake 4.x
# (pip's) configure Horovod's old CMakeLists; Debian's cmake 3.25 ignores it.
HOROVOD_ENV := HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
               HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 CMAKE_POLICY_VERSION_MINIMUM=3.5

.PHONY: setup test test-fast lint demo bench clean-venv test-tools

# What the demo and training need: the virtual environment and the reader's op. No root, no apt.
setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TF_SPEC)"
	$(PIP) install -q -e ".[dev]"
	@# Build the Horovod wheel once and keep it: later set-ups install it in seconds.
	@if ! ls $(WHEELS)/horovod-$(HOROVOD_VER)-*.whl >/dev/null 2>&1; then \
	  echo "building horovod $(HOROVOD_VER) (a few minutes, once)"; \
	  $(PIP) install -q cmake packaging && \
	  $(HOROVOD_ENV) $(PIP) wheel --no-build-isolation --no-deps --no-cache-dir -w $(WHEELS) horovod==$(HOROVOD_VER); \
	fi
	$(PIP) install -q --no-deps $(WHEELS)/horovod-$(HOROVOD_VER)-*.whl
	$(PIP) install -q cloudpickle psutil pyyaml
	$(PY) -c "import horovod.tensorflow as hvd, tensorflow as tf, tensorflow_io; print('stack ok: tf', tf.__version__)"
	@touch $@

# The reader's compiled op (pipelines/record_blocks.cc), built against the installed TensorFlow;
# a no-op once built for this source (a changed source builds anew).
.PHONY: record-reader
setup: record-reader
record-reader: $(VENV)/.stamp
	$(PY) -m pipelines.record_blocks

test: setup test-tools fonts-test onnx lint
	$(VENV)/bin/pytest -q

# ONNX export (pfc export --onnx): tf2onnx and onnxruntime in the same environment. No root.
.PHONY: onnx
onnx: $(VENV)/.onnx-stamp
$(VENV)/.onnx-stamp: $(VENV)/.stamp
	$(PIP) install -q -e ".[onnx]"
	$(PY) -c "import tf2onnx, onnxruntime, tensorflow as tf; print('onnx ok: tf2onnx', tf2onnx.__version__)"
	@touch $@

# Lint and format check (ruff, pyproject.toml): CI runs it before the tests.
.PHONY: lint
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The tests that start no process (pytest marker `slow`, pyproject.toml): a couple of minutes.
test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

# README command 1: synthetic identities, the smoke config trained by 2 workers, then verification.
DEMO_DATA := data/synth
demo: setup
	$(VENV)/bin/pfc data synth $(DEMO_DATA) --identities 200 --images-per-identity 20 --shards 4 --size 32
	rm -rf runs/smoke
	$(VENV)/bin/horovodrun -np 2 -H localhost:2 --gloo $(VENV)/bin/pfc train --config configs/smoke.yaml
	$(VENV)/bin/pfc eval --config configs/smoke.yaml

bench: setup
	bash bench/run_fc.sh

clean-venv:
	rm -rf $(VENV)


# Real data (pfc data fonts, docs/data.md): Debian's CJK typefaces, installed only when missing.
# FONTS_ALL: 23 packages, ~420 MB download; FONTS_TEST: the three the tests name (~12 MB).
FONTS_TEST := fonts-arphic-ukai fonts-wqy-microhei fonts-droid-fallback
FONTS_ALL  := $(FONTS_TEST) fonts-arphic-uming fonts-arphic-gbsn00lp fonts-arphic-gkai00mp \
              fonts-wqy-zenhei fonts-noto-cjk fonts-noto-cjk-extra fonts-lxgw-wenkai fonts-smiley-sans \
              fonts-babelstone-han fonts-hanazono fonts-ipafont-gothic fonts-ipafont-mincho \
              fonts-ipaexfont-gothic fonts-ipaexfont-mincho fonts-takao-gothic fonts-vlgothic fonts-seto \
              fonts-kiloji fonts-klee fonts-ipamj-mincho
define install_debs
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  else echo "not root: as root, install these Debian packages ($(2)): $$missing"; fi; \
	fi
endef
# The tests' tools (Debian packages, root; without root the tests that need them skip, saying so):
# Prometheus' server, promtool and the Pushgateway (the monitoring tests), and sshd (the MPIJob
# launch path in tests/test_k8s.py: horovodrun over ssh to our sshd_config).
TEST_TOOLS := prometheus prometheus-pushgateway openssh-server
test-tools:
	$(call install_debs,$(TEST_TOOLS),the monitoring and ssh-launch tests skip without them)

.PHONY: fonts fonts-test demo-fonts
fonts:
	$(call install_debs,$(FONTS_ALL),pfc data fonts)
fonts-test:
	$(call install_debs,$(FONTS_TEST),the tests that need real typefaces skip without them)

# Real data in a few minutes: 400 characters in every installed typeface style, 2 workers, then evaluation.
FONTS_DEMO := data/fonts_demo
demo-fonts: setup fonts
	rm -rf $(FONTS_DEMO) runs/fonts_demo
	$(VENV)/bin/pfc data fonts $(FONTS_DEMO) --size 48 --per-style 2 --max-classes 400 --pairs 2000
	$(VENV)/bin/horovodrun -np 2 -H localhost:2 --gloo $(VENV)/bin/pfc train --config configs/fonts_demo.yaml
	$(VENV)/bin/pfc eval --config configs/fonts_demo.yaml
