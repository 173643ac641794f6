# ShotStream for ComfyUI: common tasks.
PYTHON ?= .venv/bin/python
# Exit status of make train-tiny / train-micro when a stage pauses on its sitting's time budget: the
# pipeline's own 75 (EX_TEMPFAIL), so `make train-tiny && next` stops at an unfinished model; the message
# says it is a pause. PAUSE_STATUS=0 makes a pause exit 0.
PAUSE_STATUS ?= 75

.PHONY: test test-all train-tiny status-tiny train-micro

# $(call pipeline,ARGS,TARGET): run the pipeline; a pause (exit 75) says how to go on instead of reading
# like a failure.
define pipeline
	$(info $(PYTHON) -m training.pipeline $(1))
	@$(PYTHON) -m training.pipeline $(1); rc=$$?; \
	if [ $$rc -eq 75 ]; then echo "paused: run make $(2) again to go on (finished stages are kept, the paused one resumes)"; exit $(PAUSE_STATUS); fi; \
	exit $$rc
endef

test:  ## the default test suite (slow tests excluded)
	$(PYTHON) -m pytest -q -m "not slow"

test-all:
	$(PYTHON) -m pytest -q

train-tiny:  ## the embedded tiny model, all stages (skips finished ones, resumes a cut one)
	$(call pipeline,--preset tiny $(if $(NPROC),--nproc $(NPROC)),train-tiny)

status-tiny:  ## where a train-tiny run stands (done stages, the step a cut one resumes from); runs nothing
	$(PYTHON) -m training.pipeline --preset tiny --status

train-micro:  ## the whole pipeline at unit-test size
	$(call pipeline,--preset micro --no-eval,train-micro)
