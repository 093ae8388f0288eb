# The two set-up commands of the README's Quick start:
#   make serve   create .venv, install cxrnode into it, start the node on its embedded defaults
#   make test    the same install, plus DCMTK / dicom3tools / Orthanc via apt when missing, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve test tools lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/cxrnode serve

# Real peers for the integration tests: DCMTK (storescu, storescp, echoscu, dcmsend), dicom3tools (dciodvfy), Orthanc,
# Chromium + chromedriver (status page), openssl (test certificates), Orthanc's DICOMweb plugin (STOW-RS peer).
TOOLS := storescu dciodvfy Orthanc chromium chromedriver openssl
FILES := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
tools:
	@missing=$$(for t in $(TOOLS); do command -v $$t >/dev/null || echo $$t; done; \
	  for f in $(FILES); do [ -e $$f ] || echo $$f; done); [ -z "$$missing" ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends \
	    dcmtk dicom3tools orthanc orthanc-dicomweb chromium chromium-driver openssl; }

test: $(STAMP) tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)
