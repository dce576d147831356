# dl-study: one command to set up and run a chapter, one to run the tests.
#   make run                                   # 01_mnist/train.py with its default config
#   make run CHAPTER=02b_fruit_cnn_aug ARGS="--epochs 5"
#   make run CHAPTER=04_semantic_bg SCRIPT=composite.py ARGS="--foreground me.jpg --background sea.jpg"
#   make test                                  # the whole pytest suite, offline
# Both create .venv (Python 3.11) and install requirements.txt first if needed.

PYTHON  ?= $(shell command -v python3.11 || command -v python3)
VENV    ?= .venv
CHAPTER ?= 01_mnist
SCRIPT  ?= train.py
ARGS    ?=
PYTEST_ARGS ?=
# Tests run in parallel (pytest-xdist), one worker per core up to 4 (each worker's chapter
# runs need 1-3 GB of memory); JOBS=0 runs them in one process. tests/conftest.py pins each
# worker to its own cores; --dist loadfile keeps each test file (and its shared smoke run)
# on one worker.
JOBS    ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
XDIST   := $(if $(filter 0,$(JOBS)),,-n $(JOBS) --dist loadfile --no-loadscope-reorder)
MIRROR  ?=
STAMP   := $(VENV)/.installed

.PHONY: venv run test smoke lint download clean-runs

# Re-installs only when requirements.txt or pyproject.toml changed since the last install.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install -r requirements.txt
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	@test -f $(CHAPTER)/$(SCRIPT) || { echo "error: no script $(CHAPTER)/$(SCRIPT) (chapters: $$(ls -d [0-9]*_*/ | tr -d / | tr '\n' ' '))"; exit 2; }
	$(VENV)/bin/python $(CHAPTER)/$(SCRIPT) $(ARGS)

# pytest exits 5 when it collected no tests; say so plainly instead of a bare failure.
test: $(STAMP)
	@status=0; $(VENV)/bin/python -m pytest $(XDIST) $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "error: pytest collected no tests"; fi; exit $$status

# The quick loop: every chapter's smoke run and learning test, its failed starts and its units;
# not the real-data runs, the pretrained stand-in runs, or the slow ones (a killed run and its
# resume, several processes): `make test` runs those too.
smoke: $(STAMP)
	$(VENV)/bin/python -m pytest $(XDIST) -m "not real_data and not pretrained and not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

download: $(STAMP)
	$(VENV)/bin/python data/download.py all $(if $(MIRROR),--mirror $(MIRROR))

clean-runs:
	rm -rf runs/
