.PHONY: setup demo test bench bench-decode
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
