.PHONY: setup demo test bench bench-decode bench-front
setup:
	bash scripts/setup.sh
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench:
	bash scripts/setup.sh && .venv/bin/python scripts/bench_export.py
bench-decode:
	bash scripts/setup.sh && .venv/bin/python -m pip install -q -e ".[bench]" && .venv/bin/python scripts/bench_decode.py
bench-front:
	bash scripts/setup.sh && .venv/bin/python -m pip install -q -e ".[bench]" && \
	  .venv/bin/python scripts/bench_front.py --work .bench-front --plot docs/benchmarks/front.svg
