# ShotStream for ComfyUI: common tasks.
PYTHON ?= .venv/bin/python

.PHONY: test test-all train-tiny status-tiny train-micro

test:  ## the default test suite (slow tests excluded)
	$(PYTHON) -m pytest -q -m "not slow"

test-all:
	$(PYTHON) -m pytest -q

train-tiny:  ## the embedded tiny model, all stages (skips finished ones, resumes a cut one)
	$(PYTHON) -m training.pipeline --preset tiny $(if $(NPROC),--nproc $(NPROC))

status-tiny:  ## where a train-tiny run stands (done stages, the step a cut one resumes from); runs nothing
	$(PYTHON) -m training.pipeline --preset tiny --status

train-micro:  ## the whole pipeline at unit-test size
	$(PYTHON) -m training.pipeline --preset micro --no-eval
