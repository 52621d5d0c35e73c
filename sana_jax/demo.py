"""`sana-demo`: a Gradio page that samples from a model folder, with best-of-N judging.

  sana-demo                                  # the embedded ShapesEval model, 127.0.0.1:7860
  sana-demo --model MODEL --port 8000        # any sana_jax model folder
  python -m sana_jax.demo ...                # the same without the console script

The page has a prompt, a seed, the number of denoising steps, the guidance scale, the number
of images and best-of-N. With best-of-N (N candidates, N >= the number of images) the N
candidates (seeds seed .. seed+N-1) are judged by the ShapesEval evaluator
(`scaling.judges.ShapesJudge`) and the knock-out tournament of `scaling.best_of_n` keeps the
number of images asked for; the page shows the kept images, every candidate's verdict (yes /
no, score, its matches) and the bracket picture. Without best-of-N the images use seeds
seed .. seed+num_images-1 (as `sana-sample`) and are judged all the same. The judge needs the
prompt's ShapesEval specification: any prompt of the ShapesEval grammar has one (the
evaluation prompts, and every caption the training data can produce); other prompts are
sampled but not judged, and best-of-N is refused for them.

The work is in pure functions the tests call without a server: `generate(pipe, ...)` ->
`Generation` (images, seeds, verdicts, tournament, `verdict_rows`), and `page_outputs`
(what the page shows). `build_blocks` builds the gr.Blocks; `main` checks every argument
before the model is loaded or gradio imported (bad input: `error: ...`, exit status 2) and
serves on loopback by default. Needs the `[demo]` extra (gradio). See docs/demo.md.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import importlib.util
import math
import os
import pathlib
import socket
import sys
from typing import Sequence

import numpy as np

from sana_jax.cli import CommandParser, UsageError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_IMAGES = 16  # images a request may show
MAX_BEST_OF = 64  # best-of-N candidates a request may ask for
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_SEED = 2**63 - 1
DISPLAY_PIXELS = 192  # small images are enlarged (nearest neighbour) to about this on the page
VERDICT_HEADERS = ("candidate", "seed", "verdict", "score", "no score", "matches", "result")


# --------------------------------------------------------------------------------------
# the ShapesEval specification of a prompt
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _grammar_specs() -> dict:
  """normalize_prompt(prompt) -> ShapesEval spec, for every prompt of the grammar: the
  shipped evaluation prompts first, then every frame x wording x spec that
  `data.shapes.caption` can write."""
  from sana_jax.shapes_eval import task as shapes

  table = {}
  for spec in shapes.eval_prompts():
    table.setdefault(shapes.normalize_prompt(spec["prompt"]), spec)
  for category in shapes.CATEGORIES:
    for spec in shapes.all_specs(category):
      for style in range(12):
        phrase = shapes.object_phrase(spec, style)
        for frame in shapes.FRAMES:
          prompt = frame.format(phrase)
          table.setdefault(shapes.normalize_prompt(prompt), dict(spec, prompt=prompt))
  return table


def shapes_spec(prompt: str) -> dict | None:
  """The ShapesEval specification (GenEval metadata dict) of a prompt of the ShapesEval
  grammar (compared after `data.shapes.normalize_prompt`), or None."""
  from sana_jax.shapes_eval import task as shapes

  spec = _grammar_specs().get(shapes.normalize_prompt(prompt))
  return None if spec is None else dict(spec)


def example_prompts(per_category: int = 2) -> list[str]:
  """A few ShapesEval evaluation prompts per category, for the page's examples."""
  from sana_jax.shapes_eval import task as shapes

  specs = shapes.eval_prompts()
  return [
    s["prompt"]
    for c in shapes.CATEGORIES
    for s in [x for x in specs if x["tag"] == c][:per_category]
  ]


# --------------------------------------------------------------------------------------
# a request and its result (pure: no gradio, no server)
# --------------------------------------------------------------------------------------


def _as_int(name: str, value, low: int, high: int) -> int:
  if isinstance(value, bool) or value is None:
    raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
  try:
    f = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}") from None
  if not math.isfinite(f) or f != int(f) or not low <= int(f) <= high:
    raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
  return int(f)


@dataclasses.dataclass(frozen=True)
class Request:
  """A checked request. best_of: 0 = off, else N candidates (N >= num_images)."""

  prompt: str
  seed: int
  steps: int
  guidance: float
  num_images: int
  best_of: int = 0

  @property
  def num_candidates(self) -> int:
    return self.best_of or self.num_images

  @property
  def seeds(self) -> list[int]:
    return [self.seed + i for i in range(self.num_candidates)]


def check_request(
  prompt, seed, steps, guidance, num_images, best_of=0, *, has_spec: bool = True
) -> Request:
  """Validates a page request; ValueError naming the field, the value and what is allowed."""
  if not isinstance(prompt, str) or not prompt.strip():
    raise ValueError(f"prompt must be a non-empty text, got {prompt!r}")
  steps = _as_int("steps", steps, 1, MAX_STEPS)
  num_images = _as_int("number of images", num_images, 1, MAX_IMAGES)
  best_of = _as_int("best-of-N", best_of, 0, MAX_BEST_OF)
  n = best_of or num_images
  seed = _as_int("seed", seed, 0, MAX_SEED - n + 1)
  try:
    guidance = float(guidance)
  except (TypeError, ValueError):
    guidance = math.nan
  if not 0.0 <= guidance <= MAX_GUIDANCE:
    raise ValueError(f"guidance must be a number in 0..{MAX_GUIDANCE:g}, got {guidance!r}")
  if best_of:
    if best_of < num_images:
      raise ValueError(
        f"best-of-N {best_of}: N must be >= the number of images ({num_images}), or 0 (off)"
      )
    if not has_spec:
      raise ValueError(
        f"best-of-N needs the ShapesEval judge, which has no specification for {prompt!r}: "
        "use a prompt of the ShapesEval grammar (see the examples), or best-of-N 0 (off)"
      )
  return Request(prompt.strip(), seed, steps, guidance, num_images, best_of)


@dataclasses.dataclass
class Generation:
  """What one request produced.

  candidates: every generated image, uint8 (H, W, 3), seeds `request.seeds` in order.
  shown: indices into candidates of the images to show (with best-of-N the kept ones, in
    bracket order: the tournament does not rank them among themselves; all without).
  verdicts: the ShapesEval judge's Verdict per candidate, or None (prompt without a spec).
  tournament: the played bracket (best_of_n.Tournament) with best-of-N, else None.
  """

  request: Request
  candidates: list
  shown: list
  spec: dict | None
  verdicts: list | None
  tournament: object | None

  @property
  def images(self) -> list:
    return [self.candidates[i] for i in self.shown]

  @property
  def seeds(self) -> list[int]:
    return [self.request.seeds[i] for i in self.shown]

  @property
  def winner(self) -> int | None:
    """The candidate that won the whole bracket: best-of-N keeping one image; else None."""
    t = self.tournament
    return t.winners[0] if t is not None and len(t.winners) == 1 else None

  def verdict_rows(self) -> list[list]:
    """One row per candidate, columns VERDICT_HEADERS: index, seed, yes/no, score, no score,
    its matches ('beat #1; beat #3', 'lost to #0', 'bye'), and the result ('winner' when
    one image is kept, 'kept' when several are, 'out in round r'; 'shown' without
    best-of-N)."""
    if self.verdicts is None:
      return []
    seeds = self.request.seeds
    matches = [[] for _ in seeds]
    out_round = {}
    if self.tournament is not None:
      for r, rnd in enumerate(self.tournament.rounds, 1):
        for m in rnd:
          if m.b is None:
            matches[m.a].append("bye")
            continue
          loser = m.b if m.winner == m.a else m.a
          matches[m.winner].append(f"beat #{loser}")
          matches[loser].append(f"lost to #{m.winner}")
          out_round[loser] = r
    rank = {i: k for k, i in enumerate(self.shown)}
    rows = []
    for i, (s, v) in enumerate(zip(seeds, self.verdicts)):
      if self.tournament is None:
        result = "shown"
      elif i in rank:
        result = "winner" if self.winner == i else "kept"
      else:
        result = f"out in round {out_round[i]}"
      rows.append(
        [
          i,
          s,
          "yes" if v.yes else "no",
          round(v.yes_score, 4),
          round(v.no_score, 4),
          "; ".join(matches[i]) or "-",
          result,
        ]
      )
    return rows

  def summary(self) -> str:
    """One line for the page: what was sampled, and what the judge decided."""
    r = self.request
    head = (
      f"{len(self.candidates)} image(s), seeds {r.seed}..{r.seeds[-1]}, {r.steps} steps, "
      f"guidance {r.guidance:g}"
    )
    if self.verdicts is None:
      return f"{head}. Not judged: no ShapesEval specification for this prompt."
    yes = sum(v.yes for v in self.verdicts)
    if self.tournament is None:
      return f"{head}. ShapesEval judge: {yes} of {len(self.verdicts)} correct."
    head = (
      f"{head}. Best {r.num_images} of {r.best_of} by the ShapesEval judge "
      f"({yes} of {r.best_of} candidates correct)"
    )
    w = self.winner
    if w is None:
      kept = ", ".join(f"#{i} (seed {r.seeds[i]})" for i in self.shown)
      return f"{head}: kept {kept}, in bracket order."
    v = self.verdicts[w]
    return (
      f"{head}: winner #{w} (seed {r.seeds[w]}, {'yes' if v.yes else 'no'}, "
      f"score {v.yes_score:.3f})."
    )


def generate(
  pipe,
  prompt: str,
  *,
  seed: int = 0,
  steps: int | None = None,
  guidance: float | None = None,
  num_images: int = 4,
  best_of: int = 0,
  judge=None,
) -> Generation:
  """Samples a request with `pipe` (a pipeline.SanaPipeline) and judges it.

  steps / guidance: None = the model folder's (pipeline.json). best_of: 0 = off, else N
  candidates (N >= num_images) of which the tournament keeps num_images. judge: a
  scaling.judges.Judge (default: ShapesJudge over the prompt's ShapesEval spec); it is only
  asked when the prompt has a spec. The candidates are `pipe.generate_fn(...)`'s images for
  seeds seed .. seed+N-1 (one batch), exactly what `run_best_of_n` generates.
  """
  from sana_jax.scaling import best_of_n
  from sana_jax.scaling.judges import ShapesJudge

  sampler = pipe.settings["sampler"]
  spec = shapes_spec(prompt) if isinstance(prompt, str) else None
  req = check_request(
    prompt,
    seed,
    sampler["steps"] if steps is None else steps,
    sampler["guidance_scale"] if guidance is None else guidance,
    num_images,
    best_of,
    has_spec=spec is not None or judge is not None,
  )
  if req.best_of:
    best_of_n.check_request(req.best_of, req.num_images, req.seeds)
  gen = pipe.generate_fn(steps=req.steps, guidance_scale=req.guidance)
  candidates = [np.asarray(im) for im in gen(req.prompt, req.seeds)]
  verdicts = result = None
  if judge is None and spec is not None:
    judge = ShapesJudge(spec)
  if judge is not None:
    verdicts = list(judge.judge(candidates, req.prompt))
    if len(verdicts) != len(candidates):
      raise ValueError(f"the judge returned {len(verdicts)} verdicts for {len(candidates)} images")
  shown = list(range(len(candidates)))
  if req.best_of:
    result = best_of_n.tournament(verdicts, req.num_images)
    shown = list(result.winners)
  return Generation(req, candidates, shown, spec, verdicts, result)


def enlarge(image: np.ndarray, pixels: int = DISPLAY_PIXELS) -> np.ndarray:
  """A small uint8 (H, W, 3) image repeated (nearest neighbour) to about `pixels` on its
  longer side, for display; images already that large are returned as they are."""
  f = max(1, pixels // max(image.shape[:2]))
  return image if f == 1 else np.repeat(np.repeat(image, f, axis=0), f, axis=1)


def page_outputs(gen: Generation) -> tuple[list, list[list], object, str]:
  """What the page shows for a Generation: (gallery [(image, caption)] of the shown images,
  verdict rows, the bracket picture (PIL image; None without best-of-N), summary text)."""
  from sana_jax.scaling.best_of_n import bracket_picture

  gallery = []
  for i in gen.shown:
    cap = f"#{i} seed {gen.request.seeds[i]}"
    if gen.verdicts is not None:
      v = gen.verdicts[i]
      cap += f" · {'yes' if v.yes else 'no'} {v.yes_score:.2f}"
    gallery.append((enlarge(gen.candidates[i]), cap))
  bracket = None
  if gen.tournament is not None:
    bracket = bracket_picture(
      [enlarge(c, 96) for c in gen.candidates],  # the picture's cells are 96 px
      gen.tournament,
      gen.verdicts,
      gen.request.seeds,
      title=gen.request.prompt[:80],
    )
  return gallery, gen.verdict_rows(), bracket, gen.summary()


# --------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------


def build_blocks(pipe, model_name: str = "model"):
  """The gr.Blocks page over a loaded pipeline (imports gradio)."""
  import gradio as gr

  sampler = pipe.settings["sampler"]
  size = pipe.settings["image_size"]
  examples = example_prompts()

  def run(prompt, seed, steps, guidance, num_images, best_of):
    try:
      gen = generate(
        pipe,
        prompt,
        seed=seed,
        steps=steps,
        guidance=guidance,
        num_images=num_images,
        best_of=best_of,
      )
    except ValueError as e:
      raise gr.Error(str(e)) from None
    gallery, rows, bracket, text = page_outputs(gen)
    return gallery, rows, bracket, text

  with gr.Blocks(title="sana_jax demo", analytics_enabled=False) as blocks:
    gr.Markdown(
      f"### sana_jax: {model_name}\n{size} px, {sampler['name']} solver. Best-of-N judges "
      "the candidates with the ShapesEval evaluator (prompts of the ShapesEval grammar)."
    )
    with gr.Row():
      with gr.Column(scale=1):
        prompt = gr.Textbox(
          value=examples[0] if examples else "", label="prompt", lines=2, elem_id="prompt"
        )
        example = gr.Dropdown(examples, value=None, label="ShapesEval examples")
        with gr.Row():
          seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
          num_images = gr.Slider(
            1, MAX_IMAGES, value=1, step=1, label="number of images", info="best-of-N keeps these"
          )
        with gr.Row():
          steps = gr.Slider(1, MAX_STEPS, value=sampler["steps"], step=1, label="steps")
          guidance = gr.Slider(
            0.0, MAX_GUIDANCE, value=sampler["guidance_scale"], step=0.5, label="guidance"
          )
        best_of = gr.Slider(
          0,
          MAX_BEST_OF,
          value=8,
          step=1,
          label="best-of-N (candidates judged; 0 = off)",
        )
        button = gr.Button("Generate", variant="primary", elem_id="generate")
      with gr.Column(scale=2):
        summary = gr.Markdown(elem_id="summary")
        gallery = gr.Gallery(
          label="images", columns=4, height=250, object_fit="contain", fit_columns=False
        )
        table = gr.Dataframe(headers=list(VERDICT_HEADERS), label="the judge's verdicts", wrap=True)
        bracket = gr.Image(label="bracket (gold: kept)", type="pil", show_label=True)
    example.change(lambda p: p or gr.skip(), example, prompt)
    button.click(
      run,
      [prompt, seed, steps, guidance, num_images, best_of],
      [gallery, table, bracket, summary],
      api_name="generate",
    )
  return blocks


# --------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------


def _port(text: str) -> int:
  import argparse

  try:
    v = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer in 1..65535, got {text!r}") from None
  if not 1 <= v <= 65535:
    raise argparse.ArgumentTypeError(f"expected an integer in 1..65535, got {text!r}")
  return v


def build_parser() -> CommandParser:
  import argparse

  ap = CommandParser(
    prog="sana-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument(
    "--model",
    type=pathlib.Path,
    default=None,
    help="model folder (default: the embedded ShapesEval model, sana_jax/assets/shapes_model)",
  )
  ap.add_argument(
    "--host",
    default=DEFAULT_HOST,
    help=f"address to listen on (default {DEFAULT_HOST}, this machine only; 0.0.0.0 "
    "serves every network the machine is on)",
  )
  ap.add_argument(
    "--port",
    type=_port,
    default=DEFAULT_PORT,
    help=f"port to listen on, 1..65535, must be free (default {DEFAULT_PORT})",
  )
  return ap


def check_model(model) -> pathlib.Path:
  """A sana_jax model folder (default: the embedded one), checked without loading it."""
  from sana_jax import bundle

  if model is None:
    from sana_jax.embedded import EMBEDDED_MODEL as DEFAULT_MODEL

    model = DEFAULT_MODEL
  model = pathlib.Path(model)
  if model.exists() and not model.is_dir():
    raise UsageError(f"--model {model}: is a file; expected a sana_jax model folder")
  try:
    bundle.check_folder(model)
  except (bundle.BundleError, KeyError, TypeError) as e:
    raise UsageError(f"--model {model}: {e}") from None
  return model


def check_listen(host: str, port: int) -> None:
  """The page can listen on (host, port): the address is this machine's and the port free
  (probed by binding a socket, closed at once)."""
  if not host or not host.strip() or any(c.isspace() for c in host):
    raise UsageError(f"--host {host!r}: expected an address or host name, e.g. {DEFAULT_HOST}")
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
  except (socket.gaierror, UnicodeError) as e:
    raise UsageError(f"--host {host}: not an address of this machine ({e})") from None
  family, kind, proto, _, addr = infos[0]
  with socket.socket(family, kind, proto) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(addr)
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise UsageError(
          f"--port {port}: already in use on {host}; pick a free port (1..65535)"
        ) from None
      if e.errno == errno.EACCES:
        raise UsageError(
          f"--port {port}: not allowed to listen on it here (ports below 1024 need "
          "privileges); pick another in 1024..65535"
        ) from None
      raise UsageError(f"--host {host}: cannot listen on it ({e.strerror or e})") from None


def check_args(args) -> pathlib.Path:
  """Every check that needs no model and no gradio; returns the model folder."""
  model = check_model(args.model)
  check_listen(args.host, args.port)
  if importlib.util.find_spec("gradio") is None:
    raise UsageError("sana-demo needs gradio, which is not installed: pip install 'sana_jax[demo]'")
  return model


def load_pipeline(model: pathlib.Path):
  from sana_jax.pipeline import SanaPipeline

  return SanaPipeline.from_folder(model)


def main(argv: Sequence[str] | None = None) -> int:
  """Serves the page until interrupted; 2 after an `error: ...` line for a bad argument."""
  args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
  try:
    model = check_args(args)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  print(f"loading {model} ...", flush=True)
  pipe = load_pipeline(model)
  blocks = build_blocks(pipe, model_name=model.name)
  print(f"serving http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
  blocks.queue(default_concurrency_limit=1).launch(
    server_name=args.host,
    server_port=args.port,
    share=False,
    inbrowser=False,
    show_error=True,
    ssr_mode=False,
  )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
