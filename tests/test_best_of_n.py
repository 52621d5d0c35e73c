"""Best-of-N tournament: exactness against a brute-force official bracket, determinism,
the binomial model of accuracy vs N, files on disk, bad input before any sampling."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from sana_jax.scaling import best_of_n_cli
from sana_jax.scaling.best_of_n import (
  Tournament,
  bracket_picture,
  num_rounds,
  pairwise_winner,
  run_best_of_n,
  tournament,
)
from sana_jax.scaling.judges import Judge, ShapesJudge, Verdict

# ----------------------------------------------------------------------------------------
# An independent oracle: the official nvila_sana_pick.py loop, literally, on string answers
# and (1, vocab) score tensors, run on a bracket padded to k * 2^R slots where a bye is a
# phantom opponent that always loses (our documented bye rule: the last k*2^R - N candidates
# get byes in the first round).
# ----------------------------------------------------------------------------------------

YES_ID, NO_ID = 3, 7
BYE = "BYE"


def official_compare(answers, f0, f1):
  """The official nvila_compare on precomputed (response, scores) answers."""
  if f1 == BYE:
    return f0
  r1, scores1 = answers[f0]
  r2, scores2 = answers[f1]
  if r1 == r2:
    if r1 == "yes":
      if scores1[0][0, YES_ID] > scores2[0][0, YES_ID]:
        return f0
      else:
        return f1
    else:
      if scores1[0][0, NO_ID] < scores2[0][0, NO_ID]:
        return f0
      else:
        return f1
  else:
    if r1 == "yes":
      return f0
    else:
      return f1


def oracle(answers, pick):
  n = len(answers)
  size = pick
  while size < n:
    size *= 2
  n_byes = size - n
  files = [f"cand{i}" for i in range(n - n_byes)]
  for i in range(n - n_byes, n):
    files += [f"cand{i}", BYE]
  named = {f"cand{i}": a for i, a in enumerate(answers)}
  history = []
  while len(files) > pick:
    _files = []
    for idx in range(0, len(files), 2):
      _files.append(official_compare(named, files[idx], files[idx + 1]))
    files = _files
    history.append([int(f[4:]) for f in files])
  return [int(f[4:]) for f in files], history, size


def random_answers(rng, n):
  p_yes = rng.choice([0.0, 0.3, 0.7, 1.0])
  answers = []
  for _ in range(n):
    scores = rng.normal(size=(1, 10)).astype(np.float32)
    # few distinct values: ties are frequent
    scores[0, YES_ID] = rng.integers(0, 3)
    scores[0, NO_ID] = rng.integers(0, 3)
    answers.append(("yes" if rng.random() < p_yes else "no", (scores,)))
  return answers


def to_verdicts(answers):
  return [
    Verdict(yes=r == "yes", yes_score=float(s[0][0, YES_ID]), no_score=float(s[0][0, NO_ID]))
    for r, s in answers
  ]


def test_tournament_matches_official_oracle_for_n_1_to_64():
  rng = np.random.default_rng(0)
  checked = 0
  for n in range(1, 65):
    for k in sorted({1, 2, 3, 4, 5, n // 2 or 1, n}):
      if k > n:
        continue
      for _ in range(4):
        answers = random_answers(rng, n)
        verdicts = to_verdicts(answers)
        res = tournament(verdicts, k)
        want, history, size = oracle(answers, k)
        assert list(res.winners) == want, (n, k)
        assert len(res.rounds) == len(history) == num_rounds(n, k)
        for r, survivors in enumerate(history):
          assert res.survivors(r + 1) == survivors, (n, k, r)
        # every candidate is in exactly one first-round match; byes = size - n
        if res.rounds:
          first = res.rounds[0]
          seen = sorted([m.a for m in first] + [m.b for m in first if m.b is not None])
          assert seen == list(range(n))
          assert sum(m.b is None for m in first) == size - n
        # deterministic: same answers, same bracket
        assert tournament(verdicts, k) == res
        checked += 1
  assert checked > 1000


def test_pairwise_rule_and_ties_go_to_the_second():
  Y = lambda y, n: Verdict(True, y, n)  # noqa: E731
  N = lambda y, n: Verdict(False, y, n)  # noqa: E731
  assert pairwise_winner(Y(-5, 9), N(9, -5)) == 0
  assert pairwise_winner(N(9, -5), Y(-5, 9)) == 1
  assert pairwise_winner(Y(2, 0), Y(1, 0)) == 0
  assert pairwise_winner(Y(1, 0), Y(2, 0)) == 1
  assert pairwise_winner(Y(1, 0), Y(1, -3)) == 1  # tie on yes score: second
  assert pairwise_winner(N(0, 1), N(0, 2)) == 0
  assert pairwise_winner(N(0, 2), N(0, 1)) == 1
  assert pairwise_winner(N(5, 1), N(0, 1)) == 1  # tie on no score: second


def test_byes_example_and_power_of_two_is_official():
  v = [Verdict(False, 0.0, float(i)) for i in range(6)]  # lower no score wins: lower index
  res = tournament(v, 4)
  assert [(m.a, m.b) for m in res.rounds[0]] == [(0, 1), (2, 3), (4, None), (5, None)]
  assert res.winners == (0, 2, 4, 5)
  res = tournament(v[:5], 1)  # size 8: 3 byes, then full rounds
  assert [(m.a, m.b) for m in res.rounds[0]] == [(0, 1), (2, None), (3, None), (4, None)]
  assert [(m.a, m.b) for m in res.rounds[1]] == [(0, 2), (3, 4)]
  assert res.winners == (0,)
  assert tournament(v[:4], 4) == Tournament(4, 4, (), (0, 1, 2, 3))


# ----------------------------------------------------------------------------------------
# Accuracy vs N: the ShapesEval judge (with a synthetic evaluator) on candidates of known
# correctness follows the binomial model of independent candidates.
# ----------------------------------------------------------------------------------------


class _Result:
  def __init__(self, correct, score):
    self.correct, self.score, self.reason = correct, score, "synthetic"


def synthetic_evaluate(image, spec):
  """Reads what the synthetic candidate encodes: the judge's answer and a score."""
  return _Result(
    bool(image[0, 0, 1] == 255), (int(image[0, 1, 0]) * 256 + int(image[0, 1, 1])) / 65535
  )


def make_candidates(rng, n, p, q1, q0):
  """n candidates: truly correct with prob p; the evaluator says correct with prob q1 if
  correct, q0 if not; scores i.i.d. uniform (independent of correctness)."""
  truth = rng.random(n) < p
  said = np.where(truth, rng.random(n) < q1, rng.random(n) < q0)
  score = rng.integers(0, 65536, n)
  ims = np.zeros((n, 2, 2, 3), np.uint8)
  ims[:, 0, 0, 0] = truth * 255
  ims[:, 0, 0, 1] = said * 255
  ims[:, 0, 1, 0], ims[:, 0, 1, 1] = score // 256, score % 256
  return list(ims), truth


def binom(n, c, p):
  return math.comb(n, c) * p**c * (1 - p) ** (n - c)


def predicted_accuracy(s, p, q1, q0):
  """P(the best of s candidates is correct): the winner is uniform among the 'yes' ones if
  any, else uniform among all (i.i.d. scores)."""
  total = 0.0
  for c in range(s + 1):
    for y1 in range(c + 1):
      for y0 in range(s - c + 1):
        w = binom(s, c, p) * binom(c, y1, q1) * binom(s - c, y0, q0)
        total += w * (y1 / (y1 + y0) if y1 + y0 else c / s)
  return total


def subbracket_sizes(n, k):
  """Candidates under each survivor: slots of the padded bracket, minus phantom byes."""
  size = k
  while size < n:
    size *= 2
  slots = list(range(n - (size - n))) + [x for i in range(n - (size - n), n) for x in (i, None)]
  block = size // k
  return [sum(s is not None for s in slots[j * block : (j + 1) * block]) for j in range(k)]


@pytest.mark.parametrize("q1,q0", [(1.0, 0.0), (0.8, 0.1)])
def test_accuracy_rises_with_n_as_the_binomial_model_predicts(q1, q0):
  rng = np.random.default_rng(1)
  judge = ShapesJudge(spec={"synthetic": True}, evaluate=synthetic_evaluate)
  p, trials = 0.3, 1500
  emp_by_n = {}
  for n, k in [
    (1, 1),
    (2, 1),
    (3, 1),
    (4, 1),
    (6, 1),
    (8, 1),
    (16, 1),
    (32, 1),
    (4, 4),
    (8, 4),
    (13, 4),
    (32, 4),
  ]:
    hits = []
    for _ in range(trials):
      ims, truth = make_candidates(rng, n, p, q1, q0)
      res = tournament(judge.judge(ims, "a prompt"), k)
      hits.append(truth[list(res.winners)].mean())
    emp = float(np.mean(hits))
    sizes = subbracket_sizes(n, k)
    pred = float(np.mean([predicted_accuracy(s, p, q1, q0) for s in sizes]))
    if q1 == 1.0 and q0 == 0.0:  # perfect judge: 1 - (1 - p)^s
      assert pred == pytest.approx(np.mean([1 - (1 - p) ** s for s in sizes]), abs=1e-12)
    sd = math.sqrt(max(pred * (1 - pred), 1e-4) / trials / k)
    assert abs(emp - pred) < 5 * sd + 1e-3, (n, k, emp, pred)
    if k == 1:
      emp_by_n[n] = emp
  ns = sorted(emp_by_n)
  assert emp_by_n[32] > emp_by_n[4] > emp_by_n[1] + 0.2
  if q1 == 1.0:
    assert emp_by_n[1] == pytest.approx(p, abs=0.05) and emp_by_n[32] > 0.99
  assert all(emp_by_n[b] >= emp_by_n[a] - 0.04 for a, b in zip(ns, ns[1:]))


# ----------------------------------------------------------------------------------------
# The run: files on disk, batches, bracket picture
# ----------------------------------------------------------------------------------------


def fake_generate(prompt, seeds):
  """Deterministic images from seeds (uint8, 12 x 10 x 3)."""
  return [np.random.default_rng(s).integers(0, 256, (12, 10, 3), dtype=np.uint8) for s in seeds]


class MeanJudge(Judge):
  """yes if the mean red value is > 127; scores from the image means."""

  name = "mean"

  def __init__(self):
    self.calls = 0

  def judge(self, images, prompt):
    self.calls += 1
    out = []
    for im in images:
      r = float(im[..., 0].mean())
      out.append(Verdict(r > 127, r, float(im[..., 1].mean())))
    return out


def test_run_writes_everything_and_picks_the_tournament_winners(tmp_path):
  calls = []

  def gen(prompt, seeds):
    calls.append(list(seeds))
    return fake_generate(prompt, seeds)

  judge = MeanJudge()
  res = run_best_of_n("a cat", gen, judge, tmp_path, n=11, k=2, seed=100, batch_size=4)
  assert calls == [[100, 101, 102, 103], [104, 105, 106, 107], [108, 109, 110]]
  meta = json.loads((tmp_path / "candidates.json").read_text())
  assert meta["prompt"] == "a cat"
  assert [c["seed"] for c in meta["candidates"]] == list(range(100, 111))
  images = fake_generate("a cat", list(range(100, 111)))
  for c, im in zip(meta["candidates"], images):
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / c["file"])), im)
  verdicts = judge.judge(images, "a cat")
  assert res.verdicts == verdicts
  assert res.tournament == tournament(verdicts, 2)
  saved = json.loads((tmp_path / "tournament.json").read_text())
  assert saved["winners"] == list(res.tournament.winners)
  assert saved["winner_seeds"] == [100 + i for i in res.tournament.winners] == res.winner_seeds
  v = json.loads((tmp_path / "verdicts.json").read_text())["verdicts"]
  assert [Verdict(e["yes"], e["yes_score"], e["no_score"]) for e in v] == verdicts
  for p, i in zip(res.winner_paths, res.tournament.winners):
    np.testing.assert_array_equal(np.asarray(Image.open(p)), images[i])
  pic = np.asarray(Image.open(tmp_path / "bracket.png"))
  assert pic.ndim == 3 and pic.shape[0] > 100
  assert (pic == (240, 190, 0)).all(-1).any()  # kept frames
  # deterministic
  res2 = run_best_of_n(
    "a cat", gen, MeanJudge(), tmp_path / "again", n=11, k=2, seed=100, batch_size=4
  )
  assert res2.tournament == res.tournament


def test_bracket_picture_marks_each_round():
  v = [Verdict(False, 0.0, float(i)) for i in range(5)]
  res = tournament(v, 1)
  ims = fake_generate("", range(5))
  pic = np.asarray(bracket_picture(ims, res, v, list(range(5)), thumb=32, cols=5))
  colors = {
    name: (pic == c).all(-1).sum()
    for name, c in [
      ("won", (40, 170, 60)),
      ("lost", (200, 50, 50)),
      ("bye", (70, 120, 220)),
      ("kept", (240, 190, 0)),
    ]
  }
  # round 1: match (0,1), byes 2,3,4; round 2: (0,2) (3,4); round 3: (0,3)
  # won boxes: 0,0,0,3 = 4 boxes; lost: 1,2,4,3 = 4 boxes; bye: 3 boxes
  box_area = colors["bye"] / 3
  assert box_area > 0
  assert colors["won"] == pytest.approx(4 * box_area)
  assert colors["lost"] == pytest.approx(4 * box_area)
  assert colors["kept"] > 0


# ----------------------------------------------------------------------------------------
# Bad input: clear errors before any sampling
# ----------------------------------------------------------------------------------------


def _never(prompt, seeds):
  raise AssertionError("generate_fn must not be called")


@pytest.mark.parametrize(
  "n,k,msg",
  [
    (0, 1, "n .* must be >= 1"),
    (-3, 1, "n .* must be >= 1"),
    (4, 5, "1 <= k <= n = 4"),
    (4, 0, "1 <= k <= n"),
  ],
)
def test_bad_n_k_before_sampling(tmp_path, n, k, msg):
  with pytest.raises(ValueError, match=msg):
    run_best_of_n("x", _never, MeanJudge(), tmp_path, n=n, k=k)
  with pytest.raises(ValueError, match=msg):
    tournament([Verdict(True, 0.0, 0.0)] * max(n, 0), k)
  assert not any(tmp_path.iterdir())


def test_bad_seeds_and_judge_before_sampling(tmp_path):
  with pytest.raises(ValueError, match="expected n = 3 seeds"):
    run_best_of_n("x", _never, MeanJudge(), tmp_path, n=3, seeds=[1, 2])
  with pytest.raises(ValueError, match="distinct"):
    run_best_of_n("x", _never, MeanJudge(), tmp_path, n=2, seeds=[1, 1])
  with pytest.raises(ValueError, match="must be a sana_jax.scaling.judges.Judge"):
    run_best_of_n("x", _never, object(), tmp_path, n=2)


def test_generate_fn_returning_wrong_images_is_caught(tmp_path):
  with pytest.raises(ValueError, match="returned 1 images for 2 seeds"):
    run_best_of_n("x", lambda p, s: fake_generate(p, s[:1]), MeanJudge(), tmp_path, n=2)
  with pytest.raises(ValueError, match=r"uint8 array of shape \(H, W, 3\)"):
    run_best_of_n(
      "x", lambda p, s: [np.zeros((4, 4), np.float32)] * len(s), MeanJudge(), tmp_path, n=2
    )


# (n, k, sampling options, judge name, prompts, model and output folders: one contract case
# each in tests/test_scaling_cli_contract.py)
@pytest.mark.parametrize(
  "extra,msg",
  [
    (
      ["--n", "2", "--judge", "transformers", "--judge_path", "/no/such/folder"],
      "expected an existing folder, got '/no/such/folder'",
    ),
    (
      [
        "--n",
        "2",
        "--judge",
        "nvila",
        "--judge_path",
        "/no/such/nvila",
        "--judge_python",
        "python3",
      ],
      "NVILA judge model folder: expected an existing folder",
    ),
    (["--n", "2", "--judge", "nvila", "--judge_path", "."], "needs path .* and python"),
    (["--n", "2", "--judge", "shapes"], "needs --shapes_metadata"),
  ],
)
def test_cli_bad_judge_before_sampling(tmp_path, capsys, extra, msg):
  argv = ["--prompt", "a cat", "--out_dir", str(tmp_path / "out"), *extra]
  with pytest.raises(ValueError, match=msg):
    best_of_n_cli.build(best_of_n_cli.parse_args(argv))
  assert best_of_n_cli.main(argv, generate_fn=_never) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "--judge" in err
  assert not (tmp_path / "out").exists()


def test_cli_nvila_python_missing(tmp_path):
  (tmp_path / "v").mkdir()
  (tmp_path / "v" / "config.json").write_text("{}")
  argv = [
    "--prompt",
    "a",
    "--n",
    "2",
    "--judge",
    "nvila",
    "--judge_path",
    str(tmp_path / "v"),
    "--judge_python",
    str(tmp_path / "nope" / "python"),
    "--out_dir",
    str(tmp_path / "o"),
  ]
  with pytest.raises(ValueError, match="Python executable.*not found or not executable"):
    best_of_n_cli.build(best_of_n_cli.parse_args(argv))


def test_cli_generate_fn_seam(tmp_path, monkeypatch, capsys):
  meta = tmp_path / "meta.jsonl"
  meta.write_text(json.dumps({"prompt": "two red squares", "synthetic": True}) + "\n")
  base = [
    "--n",
    "5",
    "--k",
    "2",
    "--judge",
    "shapes",
    "--shapes_metadata",
    str(meta),
    "--out_dir",
    str(tmp_path / "out"),
  ]
  # the seam: --generate_fn module:function, and the shapes judge with a synthetic evaluator
  (tmp_path / "my_gen.py").write_text(
    "import numpy as np\n"
    "def gen(prompt, seeds):\n"
    "    return [np.full((8, 8, 3), s * 40 % 256, np.uint8) for s in seeds]\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))

  def evaluate(image, spec):
    assert spec == {"prompt": "two red squares", "synthetic": True}
    return _Result(bool(image[0, 0, 0] >= 80), float(image[0, 0, 0]) / 255)

  monkeypatch.setattr(
    best_of_n_cli, "ShapesJudge", lambda specs: ShapesJudge(specs=specs, evaluate=evaluate)
  )
  monkeypatch.setattr(best_of_n_cli, "pipeline_generate_fn", _never)  # not the pipeline
  assert best_of_n_cli.main(base + ["--generate_fn", "my_gen:gen", "--seed", "1"]) == 0
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  # values 40, 80, 120, 160, 200: yes for 80..200; bracket of 8 with 3 byes, pick 2:
  # round 1: (0,1) -> 1; byes 2,3,4; round 2: (1,2) -> 2 (120 > 80), (3,4) -> 4 (200 > 160)
  assert summary == [
    {
      "index": 0,
      "prompt": "two red squares",
      "winners": [2, 4],
      "winner_seeds": [3, 5],
      "winner_files": ["00000/best/0_00002.png", "00000/best/1_00004.png"],
    }
  ]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.jsonl", "my_gen.py", "out"]

  # an existing output: refused, then replaced whole with --overwrite (nothing left beside)
  (tmp_path / "out" / "stale.txt").write_text("from an earlier run")
  assert best_of_n_cli.main(base + ["--generate_fn", "my_gen:gen"]) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert best_of_n_cli.main(base + ["--generate_fn", "my_gen:gen", "--overwrite"]) == 0
  assert not (tmp_path / "out" / "stale.txt").exists()
  assert json.loads((tmp_path / "out" / "summary.json").read_text())[0]["winner_seeds"] == [2, 4]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.jsonl", "my_gen.py", "out"]


def test_cli_judge_failure_keeps_candidates_and_writes_no_output(tmp_path, monkeypatch, capsys):
  """A failing judge: exit 1 with an error naming the partial folder, which holds every
  candidate; --out_dir itself never appears half-written."""
  meta = tmp_path / "meta.jsonl"
  meta.write_text(json.dumps({"prompt": "a cat", "synthetic": True}) + "\n")

  def evaluate(image, spec):
    raise RuntimeError("the judge broke")

  monkeypatch.setattr(
    best_of_n_cli, "ShapesJudge", lambda specs: ShapesJudge(specs=specs, evaluate=evaluate)
  )
  out = tmp_path / "out"
  rc = best_of_n_cli.main(
    ["--n", "3", "--judge", "shapes", "--shapes_metadata", str(meta), "--out_dir", str(out)],
    generate_fn=fake_generate,
  )
  assert rc == 1
  err = capsys.readouterr().err
  assert err.startswith("error: judging failed") and "the judge broke" in err
  assert not out.exists()
  (partial,) = tmp_path.glob("out.partial-*")
  assert str(partial) in err
  meta_saved = json.loads((partial / "00000" / "candidates.json").read_text())
  assert [c["seed"] for c in meta_saved["candidates"]] == [0, 1, 2]
  for c, im in zip(meta_saved["candidates"], fake_generate("a cat", [0, 1, 2])):
    np.testing.assert_array_equal(np.asarray(Image.open(partial / "00000" / c["file"])), im)


def test_cli_default_path_runs_the_pipeline(tmp_path, monkeypatch):
  """No --generate_fn: pipeline_generate_fn -> SanaPipeline over the embedded ShapesEval
  model (--steps 4). The candidates equal the pipeline's own images for the same seeds
  (a separate SanaPipeline), the verdicts the real ShapesEval evaluator's on them, and
  the kept candidates the tournament's winners."""
  from sana_jax.shapes_eval import task as shapes
  from sana_jax.shapes_eval import evaluator as evaluator
  from sana_jax.pipeline import SamplingOptions, SanaPipeline
  from sana_jax.shapes_eval.model import DEFAULT_MODEL

  spec = next(s for s in shapes.eval_prompts() if s["tag"] == "color_attr")
  meta = tmp_path / "meta.jsonl"
  meta.write_text(json.dumps(spec) + "\n")
  calls = []
  real = best_of_n_cli.pipeline_generate_fn

  def spy(model, **options):
    calls.append((model, options))
    return real(model, **options)

  monkeypatch.setattr(best_of_n_cli, "pipeline_generate_fn", spy)
  out = tmp_path / "out"
  assert (
    best_of_n_cli.main(
      [
        "--n",
        "3",
        "--k",
        "1",
        "--seed",
        "7",
        "--steps",
        "4",
        "--judge",
        "shapes",
        "--shapes_metadata",
        str(meta),
        "--out_dir",
        str(out),
        "--no_picture",
      ]
    )
    == 0
  )
  assert calls == [(DEFAULT_MODEL, {"steps": 4})]
  want = SanaPipeline.from_folder(DEFAULT_MODEL).generate(
    [spec["prompt"]] * 3, [7, 8, 9], SamplingOptions(steps=4)
  )
  got = [np.asarray(Image.open(out / "00000" / f"candidates/{i:05d}.png")) for i in range(3)]
  np.testing.assert_array_equal(np.stack(got), want)
  results = [evaluator.evaluate(im, spec) for im in want]
  saved = json.loads((out / "00000" / "verdicts.json").read_text())["verdicts"]
  assert [(v["yes"], v["yes_score"]) for v in saved] == [(r.correct, r.score) for r in results]
  winner = tournament([Verdict(r.correct, r.score, 1 - r.score) for r in results], 1).winners[0]
  summary = json.loads((out / "summary.json").read_text())
  assert summary[0]["winner_seeds"] == [7 + winner]
  np.testing.assert_array_equal(
    np.asarray(Image.open(out / summary[0]["winner_files"][0])), want[winner]
  )
