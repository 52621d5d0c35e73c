"""Command line for best-of-N sampling with a judge tournament.

    python -m sana_jax.scaling.best_of_n --prompt "a red cube left of a blue ball" \
        --n 32 --k 4 --judge nvila --judge_path ~/models/NVILA-Lite-2B-Verifier \
        --judge_python ~/nvila-env/bin/python --config configs/... --out_dir out/bon

Every request check (n, k, judge name, judge folder, judge python, prompts) runs before the
generator is built or any image is sampled. Output: OUT/{prompt index:05d}/ as written by
`run_best_of_n`, and OUT/summary.json. See docs/best_of_n.md.

Generation goes through one seam, `generate_fn(prompt, seeds) -> list of uint8 (H, W, 3)`:
`--generate_fn module:function` names any such callable; without it the sana_jax pipeline
is asked for one with `sana_jax.pipeline.make_generate_fn(model=...)` (`--model FOLDER`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from sana_jax.scaling.best_of_n import GenerateFn, check_request, run_best_of_n
from sana_jax.scaling.judges import JUDGE_NAMES, ShapesJudge, make_judge


def pipeline_generate_fn(model: str | None) -> GenerateFn:
    """The sana_jax pipeline's generate_fn over a model folder (default: the embedded one)."""
    from sana_jax.pipeline import make_generate_fn
    return make_generate_fn(model=model)


def load_callable(spec: str) -> GenerateFn:
    """'package.module:function' -> the callable."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"--generate_fn must look like package.module:function, got {spec!r}")
    fn = getattr(importlib.import_module(mod), attr, None)
    if not callable(fn):
        raise ValueError(f"--generate_fn {spec!r}: {attr!r} is not a callable in {mod}")
    return fn


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sana_jax.scaling.best_of_n",
                                 description="Best-of-N sampling with a judge tournament.")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--prompts_file", help="text file, one prompt per line")
    ap.add_argument("--n", type=int, required=True, help="candidates per prompt")
    ap.add_argument("--k", type=int, default=1, help="candidates kept per prompt (official: 4)")
    ap.add_argument("--seed", type=int, default=0, help="first seed; candidates use seed..seed+n-1")
    ap.add_argument("--batch_size", type=int, default=None,
                    help="seeds per generate_fn call (a multiple of the device count; default n)")
    ap.add_argument("--judge", required=True, help=f"one of {', '.join(JUDGE_NAMES)}")
    ap.add_argument("--judge_path", help="local model folder (nvila, transformers)")
    ap.add_argument("--judge_python", help="nvila: the verifier environment's Python executable")
    ap.add_argument("--judge_timeout", type=float, default=300.0, help="nvila: seconds per request")
    ap.add_argument("--judge_batch", type=int, default=None, help="images per judge call")
    ap.add_argument("--judge_cuda_devices",
                    help="nvila: CUDA_VISIBLE_DEVICES for the worker only (e.g. '1')")
    ap.add_argument("--judge_yes_word", default="yes", help="transformers: the 'yes' answer word")
    ap.add_argument("--judge_no_word", default="no", help="transformers: the 'no' answer word")
    ap.add_argument("--shapes_metadata",
                    help="shapes: JSON-lines file of ShapesEval specifications with a 'prompt' "
                         "field each; its prompts are used when no --prompt is given")
    ap.add_argument("--model", help="model folder for the pipeline (default: the embedded model)")
    ap.add_argument("--generate_fn", help="package.module:function with generate_fn's signature")
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--no_picture", action="store_true", help="skip bracket.png")
    return ap.parse_args(argv)


def _shapes_specs(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--shapes_metadata: no such file {path!r}")
    specs = {}
    for ln, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            obj = json.loads(line)
            if "prompt" not in obj:
                raise ValueError(f"{path}:{ln}: no 'prompt' field")
            specs[obj["prompt"]] = obj
    return specs


def build(args):
    """Checks everything and builds (prompts, judge). No model is loaded, nothing sampled."""
    check_request(args.n, args.k, batch_size=args.batch_size)
    if args.judge not in JUDGE_NAMES:
        raise ValueError(f"unknown judge {args.judge!r}; expected one of {', '.join(JUDGE_NAMES)}")
    prompts = list(args.prompt)
    if args.prompts_file:
        pf = Path(args.prompts_file)
        if not pf.is_file():
            raise ValueError(f"--prompts_file: no such file {args.prompts_file!r}")
        prompts += [ln.strip() for ln in pf.read_text().splitlines() if ln.strip()]
    if args.judge == "shapes":
        if not args.shapes_metadata:
            raise ValueError("the shapes judge needs --shapes_metadata")
        specs = _shapes_specs(args.shapes_metadata)
        prompts = prompts or list(specs)
        missing = [p for p in prompts if p not in specs]
        if missing:
            raise ValueError(f"no ShapesEval specification for prompts {missing[:5]}")
        judge = ShapesJudge(specs=specs)
    else:
        if args.judge == "nvila":
            kw = {"timeout_s": args.judge_timeout}
            if args.judge_cuda_devices is not None:
                kw["env"] = dict(os.environ, CUDA_VISIBLE_DEVICES=args.judge_cuda_devices)
        else:
            kw = {"yes_word": args.judge_yes_word, "no_word": args.judge_no_word}
        if args.judge_batch:
            kw["batch_size"] = args.judge_batch
        judge = make_judge(args.judge, path=args.judge_path, python=args.judge_python, **kw)
    if not prompts:
        raise ValueError("no prompts: give --prompt or --prompts_file")
    return prompts, judge


def main(argv=None, generate_fn: GenerateFn | None = None) -> int:
    args = parse_args(argv)
    try:
        prompts, judge = build(args)
        if generate_fn is None:
            generate_fn = (load_callable(args.generate_fn) if args.generate_fn
                           else pipeline_generate_fn(args.model))
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    summary = []
    with judge:
        for idx, prompt in enumerate(prompts):
            res = run_best_of_n(prompt, generate_fn, judge, out / f"{idx:05d}", n=args.n, k=args.k,
                                seed=args.seed, batch_size=args.batch_size,
                                judge_batch=args.judge_batch, picture=not args.no_picture)
            summary.append({"index": idx, "prompt": prompt, "winners": list(res.tournament.winners),
                            "winner_seeds": res.winner_seeds,
                            "winner_files": [str(p.relative_to(out)) for p in res.winner_paths]})
            print(f"[{idx}] {prompt!r}: kept {res.winner_seeds}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
