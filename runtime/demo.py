"""`make demo`: the stock model and HiRED side by side on one image, with counts, timings and the kept picture.

    python -m runtime.demo --artifacts artifacts/tiny --image assets/demo.png --prompt "What is this?" --budget 0.2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.errors import HiredError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.demo", description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", default="artifacts/tiny", help="bundle folder (default artifacts/tiny)")
    p.add_argument("--image", default="assets/demo.png", help="image file (default: the bundled scene)")
    p.add_argument("--prompt", default="What is in this picture?")
    p.add_argument("--budget", type=float, default=0.2, help="HiRED budget to compare with the stock model")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--show-kept", default="out/demo-kept.png", help="where to write the kept-token picture")
    args = p.parse_args(argv)

    from runtime.pipeline import Pipeline, Trace
    from runtime.visualize import render_kept

    try:
        pipe = Pipeline.load(args.artifacts)
        m = pipe.manifest
        print(f"bundle {args.artifacts}: model {m.model.name} ({m.model.dtype}, {pipe.provider})")
        if m.model.random_weights:
            print(
                "note: this model has RANDOM weights, so its text is not meaningful; it shows the pipeline works.\n"
                "      For real answers export a real checkpoint: `make export MODEL=llava-next-7b` (downloads "
                "llava-hf/llava-v1.6-vicuna-7b-hf when it is not on disk; add QUANT=int4 for an 8-16 GB device), "
                "then `make demo ARTIFACTS=artifacts/llava-next-7b` (`artifacts/llava-next-7b-int4` with QUANT=int4)."
            )
        rows = []
        for budget in (1.0, args.budget):
            trace = Trace()
            r = pipe.generate(args.image, args.prompt, budget=budget, max_new_tokens=args.max_new_tokens, trace=trace)
            rows.append(r)
            print(f"\n--- budget {budget} ---")
            print(f"answer: {r.text!r}")
            v, t = r.visual_tokens, r.timings_ms
            print(f"visual tokens fed to the LLM: {v['kept']} of {v['before']} (per image {list(v['per_image'])})")
            print("timings ms: " + ", ".join(f"{k} {val:.1f}" for k, val in t.items()))
        out = Path(args.show_kept)
        out.parent.mkdir(parents=True, exist_ok=True)
        render_kept(trace, m.image_processor, rows[-1]).save(out)
        full, pruned = rows
        print(
            f"\nprefill {full.timings_ms['prefill']:.1f} ms -> {pruned.timings_ms['prefill']:.1f} ms with "
            f"{full.visual_tokens['kept']} -> {pruned.visual_tokens['kept']} visual tokens"
        )
        print(f"kept-token picture: {out}")
        pipe.close()
    except HiredError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
