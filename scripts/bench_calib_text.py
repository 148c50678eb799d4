#!/usr/bin/env python
"""Does calibration text of more than one domain carry int4's accuracy to text of another domain?

Builds host int4 forms of smollm2-135m (bench_front's FORMS) with each calibration text given, and scores each on
bench_front's two texts (the built-in evaluation half, Python documentation, and the licence texts in
/usr/share/common-licenses) against PyTorch float32: perplexity change and mean KL. Accuracy only, no timing,
so it may share the machine. A calibration text is ``builtin`` (the built-in calibration half), a file, or
``builtin+FILE`` (the two joined).

    python scripts/bench_calib_text.py --work DIR --forms "int4 g32 hot" --texts builtin,builtin+sampled.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_decode import export, ours
from bench_front import FORMS, Reference, texts


def calib_file(spec: str, work: Path) -> str | None:
    """The --calib-data path of a text spec (a joined text is written into ``work``)."""
    if spec == "builtin":
        return None
    if spec.startswith("builtin+"):
        from slm_export.text import builtin_split

        extra = Path(spec.split("+", 1)[1])
        joined = work / f"builtin+{extra.name}"
        joined.write_text(builtin_split("calibration").text + "\n\n" + extra.read_text(encoding="utf-8"),
                          encoding="utf-8")
        return str(joined)
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--forms", default="int4 g32 hot")
    ap.add_argument("--texts", default="builtin")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from slm_export.models import load_model

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    built = []
    for form in [f.strip() for f in args.forms.split(",")]:
        for spec in [t.strip() for t in args.texts.split(",")]:
            options = {**FORMS[form]}
            data = calib_file(spec, args.work)
            if data:
                options["calib_data"] = data
            label = spec if spec == "builtin" else ("builtin+" if spec.startswith("builtin+") else "") + \
                Path(spec.split("+", 1)[-1]).name
            name = "".join(c if c.isalnum() else "_" for c in f"{form}@{label}")
            built.append((form, spec, *export(args.work, name, options, args.threads)))
    model = load_model("smollm2-135m")
    ref = Reference(model.torch_module(), texts(model.tokenizer, None, args.windows))
    rows = {}
    print("| form | calibration text | ppl change, python docs | mean KL, python docs | ppl change, other domain "
          "| mean KL, other domain |\n|---|---|---|---|---|---|")
    for form, spec, out, report in built:
        _, dec, _ = ours(out, report, [1, 2], 1, args.threads)
        acc = ref.score(dec)
        rows[f"{form}@{spec}"] = acc
        d, o = acc["python docs"], acc["other domain"]
        print(f"| {form} | {spec} | {d['ppl']:+.2f}% +-{d['ppl_se']:.2f} | {d['kl']:.4f} +-{d['kl_se']:.4f} | "
              f"{o['ppl']:+.2f}% +-{o['ppl_se']:.2f} | {o['kl']:.4f} +-{o['kl_se']:.4f} |", flush=True)
    (args.work / "calib_text.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
