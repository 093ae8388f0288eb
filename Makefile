# The two set-up commands of the README's Quick start:
#   make serve   create .venv, install cxrnode into it (no test extras), start the node on its embedded defaults
#   make test    the same install plus the test extras (pytest, selenium, ruff), the real peers via apt when missing
#                (make tools), then the whole test suite
# Every pip install is pinned by constraints.txt (exact versions): a fresh machine gets what the suite passed with.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PIP_INSTALL := $(BIN)/pip install --quiet -c constraints.txt

.PHONY: serve test tools constraints

# cxrnode and what it runs with: what `make serve` and docker/Dockerfile install.
$(STAMP): pyproject.toml constraints.txt
	@echo "Installing cxrnode into $(VENV): about 5.8 GB (PyTorch with its CUDA libraries, used or not), a few minutes."
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e .
	touch $(STAMP)

# The test extras on top, for `make test` only.
$(TEST_STAMP): $(STAMP)
	$(PIP_INSTALL) -e '.[test]'
	touch $(TEST_STAMP)

serve: $(STAMP)
	$(BIN)/cxrnode serve

# Write constraints.txt again from what .venv holds (after a change to pyproject.toml's dependencies), keeping its
# comment lines.
constraints: $(TEST_STAMP)
	{ grep '^#' constraints.txt; $(BIN)/pip freeze --exclude cxrnode; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# Real peers for the integration tests: DCMTK (storescu, storescp, echoscu, dcmsend), dicom3tools (dciodvfy),
# Orthanc and its DICOMweb plugin, PostgreSQL's server (initdb, postgres), PixelMed, Chromium + chromedriver (status
# page), openssl (test certificates). Commands are looked up on the PATH; what Debian puts elsewhere (Orthanc in
# /usr/sbin, which a user's PATH lacks; the plugin, PostgreSQL's server binaries, PixelMed's jar) by its file.
TOOLS := storescu dciodvfy chromium chromedriver openssl
TOOL_FILES := /usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so \
  /usr/lib/postgresql/*/bin/initdb /usr/share/java/pixelmed.jar
APT_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb chromium chromium-driver openssl postgresql pixelmed-apps
tools:
	@missing=$$(for t in $(TOOLS); do command -v $$t >/dev/null || echo $$t; done; \
	  for f in $(TOOL_FILES); do ls -d $$f >/dev/null 2>&1 || echo $$f; done); [ -z "$$missing" ] || { \
	  echo "missing:" $$missing; SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends \
	    $(APT_PACKAGES); }

test: $(TEST_STAMP) tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)
