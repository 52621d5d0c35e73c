"""Best-of-N sampling: N candidates per prompt, a knock-out tournament judged by a VLM.

The tournament is the official one (`tools/inference_scaling/nvila_sana_pick.py`,
REFERENCE.md section 9), as a pure function of per-candidate verdicts:

- Pairwise rule (`pairwise_winner(a, b)`): one "yes" and one "no" -> the "yes" wins; both
  "yes" -> the higher yes score wins; both "no" -> the lower no score wins. Ties go to the
  second candidate `b` (the official code compares with strict `>` / `<` and otherwise
  returns the second file).
- Rounds pair neighbours (0, 1), (2, 3), ... of the surviving list, in order; winners keep
  their order; rounds continue until `k` candidates (`pick`, 4 in the official script)
  remain.
- Byes (our definition; the official script requires N = k * 2^R): with R the smallest
  integer such that k * 2^R >= N, the first round plays only `m = N - k * 2^(R-1)` matches,
  between candidates 0..2m-1, and the last `k * 2^R - N` candidates get a bye (they advance
  unjudged, after the match winners). Every later round is a full pairing, so exactly k
  remain after R rounds. For N = k * 2^R there are no byes and the bracket is the official
  one. N == k: no rounds; every candidate is kept.
- A verdict depends only on the image and the prompt, so every candidate is judged once
  (the official script re-judges survivors each round with the same deterministic model:
  same answers, more calls).

`run_best_of_n` generates N candidates with a `generate_fn(prompt, seeds) -> images`
(the pipeline's; called in batches of seeds, so it can shard each batch over devices),
saves every candidate (PNG + seed + prompt JSON) before any judging, judges, runs the
tournament, and writes the verdicts, the bracket (JSON and a picture) and the winners.
Command line: `python -m sana_jax.scaling.best_of_n --help` (see best_of_n_cli.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sana_jax.scaling.judges import Judge, JudgeError, Verdict, check_images

GenerateFn = Callable[[str, list], list]
"""generate_fn(prompt: str, seeds: list[int]) -> list of uint8 (H, W, 3) arrays, one per seed."""


# --------------------------------------------------------------------------------------
# the tournament (pure)
# --------------------------------------------------------------------------------------


def pairwise_winner(a: Verdict, b: Verdict) -> int:
  """0 if `a` wins, 1 if `b` wins, by the official rule (ties: `b`)."""
  if a.yes != b.yes:
    return 0 if a.yes else 1
  if a.yes:
    return 0 if a.yes_score > b.yes_score else 1
  return 0 if a.no_score < b.no_score else 1


@dataclasses.dataclass(frozen=True)
class Match:
  """One pairing of a round: candidates `a` and `b` (None: `a` has a bye) and the winner."""

  a: int
  b: int | None
  winner: int


@dataclasses.dataclass(frozen=True)
class Tournament:
  """A played bracket. Indices refer to the candidate list given to `tournament`.

  rounds: per round, its matches in bracket order (byes last in the first round).
  winners: the k survivors, in bracket order.
  """

  n: int
  k: int
  rounds: tuple[tuple[Match, ...], ...]
  winners: tuple[int, ...]

  def survivors(self, r: int) -> list[int]:
    """Candidates alive after round r (r = 0: before the first round)."""
    if r == 0:
      return list(range(self.n))
    return [m.winner for m in self.rounds[r - 1]]

  def to_json(self) -> dict:
    return {
      "n": self.n,
      "k": self.k,
      "winners": list(self.winners),
      "rounds": [[dataclasses.asdict(m) for m in rnd] for rnd in self.rounds],
    }


def check_n_k(n: int, k: int) -> None:
  """Clear errors for a bad request: n >= 1 and 1 <= k <= n, integers."""
  for name, v in (("n", n), ("k", k)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise ValueError(f"{name} must be an integer, got {v!r}")
  if n < 1:
    raise ValueError(f"n (candidates per prompt) must be >= 1, got {n}")
  if not 1 <= k <= n:
    raise ValueError(f"k (candidates kept) must satisfy 1 <= k <= n = {n}, got {k}")


def num_rounds(n: int, k: int) -> int:
  """Smallest R with k * 2^R >= n (0 when n == k)."""
  check_n_k(n, k)
  r = 0
  while k << r < n:
    r += 1
  return r


def tournament(verdicts: Sequence[Verdict], k: int) -> Tournament:
  """Plays the knock-out bracket over `verdicts` (one per candidate) down to `k`."""
  n = len(verdicts)
  check_n_k(n, k)
  for i, v in enumerate(verdicts):
    if not isinstance(v, Verdict):
      raise ValueError(f"verdict {i}: expected a Verdict, got {type(v).__name__}")
  alive = list(range(n))
  rounds = []
  rounds_left = num_rounds(n, k)
  while rounds_left:
    target = k << (rounds_left - 1)
    m = len(alive) - target  # matches this round; the rest get byes
    matches = []
    for j in range(m):
      a, b = alive[2 * j], alive[2 * j + 1]
      w = (a, b)[pairwise_winner(verdicts[a], verdicts[b])]
      matches.append(Match(a, b, w))
    matches += [Match(a, None, a) for a in alive[2 * m :]]
    rounds.append(tuple(matches))
    alive = [mt.winner for mt in matches]
    rounds_left -= 1
  return Tournament(n=n, k=k, rounds=tuple(rounds), winners=tuple(alive))


# --------------------------------------------------------------------------------------
# candidates on disk, bracket picture
# --------------------------------------------------------------------------------------


def _write_json(path: Path, obj) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  os.replace(tmp, path)


def candidate_file(i: int) -> str:
  return f"candidates/{i:05d}.png"


def save_candidates(
  out_dir, prompt: str, seeds: Sequence[int], images: Sequence[np.ndarray], start: int = 0
) -> list[Path]:
  """Writes images as out_dir/candidates/{index:05d}.png (index = start + i) and
  (re)writes out_dir/candidates.json = {"prompt", "candidates": [{"index", "seed", "file"}]}
  listing every candidate saved so far. Returns the PNG paths."""
  from PIL import Image

  out_dir = Path(out_dir)
  (out_dir / "candidates").mkdir(parents=True, exist_ok=True)
  images = check_images(images)
  if len(images) != len(seeds):
    raise ValueError(f"{len(seeds)} seeds but {len(images)} images")
  paths = []
  for j, (seed, im) in enumerate(zip(seeds, images)):
    p = out_dir / candidate_file(start + j)
    Image.fromarray(im, mode="RGB").save(p)
    paths.append(p)
  meta_path = out_dir / "candidates.json"
  entries = []
  if start and meta_path.exists():
    entries = [e for e in json.loads(meta_path.read_text())["candidates"] if e["index"] < start]
  entries += [
    {"index": start + j, "seed": int(s), "file": candidate_file(start + j)}
    for j, s in enumerate(seeds)
  ]
  _write_json(meta_path, {"prompt": prompt, "candidates": entries})
  return paths


_WON, _LOST, _BYE, _KEPT = (40, 170, 60), (200, 50, 50), (70, 120, 220), (240, 190, 0)


def bracket_picture(
  images: Sequence[np.ndarray],
  result: Tournament,
  verdicts: Sequence[Verdict] | None = None,
  seeds: Sequence[int] | None = None,
  *,
  thumb: int = 96,
  cols: int | None = None,
  title: str = "",
):
  """A PIL image of the bracket: the candidates in a grid (index order), each with one
  box per round below it: green = won its match, red = lost it, blue = bye, empty = out
  earlier. The k kept candidates get a gold frame. Optional label: seed and Y/N score."""
  from PIL import Image, ImageDraw

  n = result.n
  if len(images) != n:
    raise ValueError(f"{len(images)} images for a bracket of {n}")
  cols = cols or max(1, math.ceil(math.sqrt(n)))
  rows = math.ceil(n / cols)
  nr = len(result.rounds)
  box, pad, label_h = 10, 6, 24
  cell_w, cell_h = thumb + 2 * pad, thumb + 2 * pad + box + 4 + label_h
  head = 40
  canvas = Image.new("RGB", (cols * cell_w, head + rows * cell_h), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  draw.text((pad, 3), title, fill=(0, 0, 0))
  draw.text(
    (pad, 14),
    f"best {result.k} of {n}, {nr} round(s): green won, red lost, blue bye",
    fill=(0, 0, 0),
  )
  draw.text((pad, 25), f"kept (gold): {list(result.winners)}", fill=(0, 0, 0))
  status = np.zeros((n, nr), np.int8)  # 0 out, 1 won, 2 lost, 3 bye
  for r, rnd in enumerate(result.rounds):
    for m in rnd:
      if m.b is None:
        status[m.a, r] = 3
      else:
        status[m.winner, r] = 1
        status[m.b if m.winner == m.a else m.a, r] = 2
  kept = set(result.winners)
  for i, im in enumerate(check_images(images)):
    x0, y0 = (i % cols) * cell_w, head + (i // cols) * cell_h
    t = Image.fromarray(im, mode="RGB")
    t.thumbnail((thumb, thumb))
    canvas.paste(t, (x0 + pad + (thumb - t.width) // 2, y0 + pad + (thumb - t.height) // 2))
    if i in kept:
      draw.rectangle(
        [x0 + 1, y0 + 1, x0 + cell_w - 2, y0 + thumb + 2 * pad - 2], outline=_KEPT, width=4
      )
    by = y0 + thumb + 2 * pad
    bw = max(2, min(box, (thumb - 2 * (nr - 1)) // max(nr, 1)))
    for r in range(nr):
      bx = x0 + pad + r * (bw + 2)
      color = {1: _WON, 2: _LOST, 3: _BYE}.get(int(status[i, r]))
      draw.rectangle([bx, by, bx + bw - 1, by + box - 1], fill=color, outline=(150, 150, 150))
    label = f"#{i}" + (f" s{seeds[i]}" if seeds is not None else "")
    draw.text((x0 + pad, by + box + 2), label, fill=(0, 0, 0))
    if verdicts is not None:
      v = verdicts[i]
      draw.text(
        (x0 + pad, by + box + 13),
        f"{'Y' if v.yes else 'N'} {v.yes_score:.2f}/{v.no_score:.2f}",
        fill=(0, 0, 0),
      )
  return canvas


# --------------------------------------------------------------------------------------
# the whole run
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class BestOfNResult:
  prompt: str
  seeds: list[int]
  verdicts: list[Verdict]
  tournament: Tournament
  out_dir: Path
  winner_paths: list[Path]

  @property
  def winner_seeds(self) -> list[int]:
    return [self.seeds[i] for i in self.tournament.winners]


def check_request(
  n: int, k: int, seeds: Sequence[int] | None = None, batch_size: int | None = None
) -> list[int] | None:
  """All checks on a best-of-N request that need no model; returns the seeds as ints."""
  check_n_k(n, k)
  if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if seeds is None:
    return None
  seeds = [int(s) for s in seeds]
  if len(seeds) != n:
    raise ValueError(f"expected n = {n} seeds, got {len(seeds)}")
  if len(set(seeds)) != n:
    raise ValueError("seeds must be distinct")
  return seeds


def run_best_of_n(
  prompt: str,
  generate_fn: GenerateFn,
  judge: Judge,
  out_dir,
  *,
  n: int,
  k: int = 1,
  seeds: Sequence[int] | None = None,
  seed: int = 0,
  batch_size: int | None = None,
  judge_batch: int | None = None,
  picture: bool = True,
) -> BestOfNResult:
  """Generates n candidates for `prompt`, saves them, judges them, keeps the best k.

  generate_fn(prompt, seeds) -> list of uint8 (H, W, 3), called with batches of at most
    `batch_size` seeds (default: all n at once); use a multiple of the device count.
  seeds: the n seeds (default: seed, seed + 1, ..., seed + n - 1).
  judge_batch: images per judge call (default: all n at once).
  Writes into out_dir: candidates/{i:05d}.png and candidates.json (before any judging),
  verdicts.json, tournament.json, bracket.png, best/{rank}_{i:05d}.png.
  If judging fails, the candidates stay on disk and a JudgeError names their folder.
  """
  seeds = check_request(n, k, seeds, batch_size)
  if seeds is None:
    seeds = [int(seed) + i for i in range(n)]
  if judge_batch is not None and judge_batch < 1:
    raise ValueError(f"judge_batch must be >= 1, got {judge_batch}")
  if not isinstance(judge, Judge):
    raise ValueError(f"judge must be a sana_jax.scaling.judges.Judge, got {type(judge).__name__}")
  if not isinstance(prompt, str) or not prompt:
    raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
  out_dir = Path(out_dir)
  bs = batch_size or n

  images: list[np.ndarray] = []
  for s in range(0, n, bs):
    batch_seeds = seeds[s : s + bs]
    got = list(generate_fn(prompt, list(batch_seeds)))
    if len(got) != len(batch_seeds):
      raise ValueError(f"generate_fn returned {len(got)} images for {len(batch_seeds)} seeds")
    got = [np.asarray(g) for g in got]
    save_candidates(out_dir, prompt, batch_seeds, got, start=s)
    images += got

  jb = judge_batch or n
  verdicts: list[Verdict] = []
  try:
    for s in range(0, n, jb):
      chunk = judge.judge(images[s : s + jb], prompt)
      if len(chunk) != len(images[s : s + jb]):
        raise JudgeError(
          f"judge returned {len(chunk)} verdicts for {len(images[s : s + jb])} images"
        )
      verdicts += chunk
  except Exception as e:
    raise JudgeError(
      f"judging failed; all {n} candidates are saved in "
      f"{out_dir / 'candidates'} (seeds in {out_dir / 'candidates.json'}): "
      f"{type(e).__name__}: {e}"
    ) from e
  _write_json(
    out_dir / "verdicts.json",
    {
      "prompt": prompt,
      "judge": judge.name,
      "verdicts": [
        dict(index=i, seed=seeds[i], **dataclasses.asdict(v)) for i, v in enumerate(verdicts)
      ],
    },
  )

  result = tournament(verdicts, k)
  _write_json(
    out_dir / "tournament.json",
    {"prompt": prompt, **result.to_json(), "winner_seeds": [seeds[i] for i in result.winners]},
  )
  best = out_dir / "best"
  if best.exists():
    shutil.rmtree(best)
  best.mkdir()
  winner_paths = []
  for rank, i in enumerate(result.winners):
    p = best / f"{rank}_{i:05d}.png"
    shutil.copyfile(out_dir / candidate_file(i), p)
    winner_paths.append(p)
  if picture:
    bracket_picture(images, result, verdicts, seeds, title=prompt[:80]).save(
      out_dir / "bracket.png"
    )
  return BestOfNResult(prompt, seeds, verdicts, result, out_dir, winner_paths)


if __name__ == "__main__":
  # `python -m sana_jax.scaling.best_of_n` still runs the command, which lives in best_of_n_cli
  # (it imports this module; running it by name keeps the library free of an upward import).
  import runpy

  runpy.run_module("sana_jax.scaling.best_of_n_cli", run_name="__main__", alter_sys=True)
