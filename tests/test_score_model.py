"""sana_jax.eval.score_model end to end on the embedded ShapesEval model: its printed and
written tables equal the ShapesEval evaluator applied independently to the images it saved,
and those images are the pipeline's for the documented seeds."""

import json

import numpy as np
import pytest
from PIL import Image

from sana_jax.shapes_eval import task as shapes
from sana_jax.shapes_eval import score as score_model
from sana_jax.shapes_eval import evaluator as evaluator
from sana_jax.scaling.best_of_n import tournament
from sana_jax.scaling.judges import Verdict


def test_tables_equal_the_evaluator_on_the_saved_images(tmp_path, capsys):
  out = tmp_path / "score"
  # --ns without 1 (the one-image table is candidate 0 regardless) and N = 3, not a power
  # of two (a bye in the bracket). Batches of 3, the shape test_best_of_n's pipeline run
  # compiles too (the compiled sampler is shared in one process).
  assert (
    score_model.main(
      ["--out", str(out), "--per_category", "1", "--ns", "3,2", "--steps", "4", "--batch", "3"]
    )
    == 0
  )
  printed = capsys.readouterr().out
  assert sorted(p.name for p in tmp_path.iterdir()) == ["score"]  # no partial folder left
  assert {p.name for p in out.iterdir()} == {
    "images",
    "report.json",
    "best_of_n.png",
    "gallery.png",
  }
  report = json.loads((out / "report.json").read_text())
  assert report["prompts"] == 6 and report["settings"]["steps"] == 4
  assert sorted(report["best_of_n"]) == ["2", "3"]

  # the selection: the first evaluation prompt of every category, in category order
  want_specs = [next(p for p in shapes.eval_prompts() if p["tag"] == c) for c in shapes.CATEGORIES]
  results = []
  images = []
  for i, spec in enumerate(want_specs):
    folder = out / "images" / f"{i:05d}"
    assert json.loads((folder / "metadata.jsonl").read_text()) == spec
    ims = [np.asarray(Image.open(folder / "samples" / f"{k:04d}.png")) for k in range(3)]
    assert not (folder / "samples" / "0003.png").exists()
    images.append(ims)
    results.append([evaluator.evaluate(im, spec) for im in ims])

  single = evaluator.report([(spec, res[0]) for spec, res in zip(want_specs, results)])
  assert report["one_image"] == single
  assert evaluator.format_report(single) in printed
  for n in (2, 3):
    winners = [
      tournament([Verdict(r.correct, r.score, 1.0 - r.score) for r in res[:n]], 1).winners[0]
      for res in results
    ]
    table = evaluator.report([(spec, res[w]) for spec, res, w in zip(want_specs, results, winners)])
    assert report["best_of_n"][str(n)] == table
    row = next(line.split() for line in printed.splitlines() if line.split()[:1] == [str(n)])
    assert row == [str(n)] + [
      f"{table['categories'][c]['accuracy']:.3f}" for c in table["categories"]
    ] + [f"{table['overall']:.3f}"]

  # the images are the pipeline's, seed 1000 * prompt index + candidate
  from sana_jax.pipeline import SamplingOptions, SanaPipeline
  from sana_jax.shapes_eval.model import DEFAULT_MODEL

  flat = [(p, k) for p in range(6) for k in range(3)]
  want = SanaPipeline.from_folder(DEFAULT_MODEL).generate(
    [want_specs[p]["prompt"] for p, _ in flat],
    [1000 * p + k for p, k in flat],
    SamplingOptions(steps=4),
    batch_size=3,
  )
  np.testing.assert_array_equal(np.stack([im for ims in images for im in ims]), want)


@pytest.mark.parametrize(
  "argv,count",
  [
    (["--per_category", "2"], 12),
    (["--num_prompts", "7"], 7),
    (["--num_prompts", "60", "--per_category", "3"], 6),  # the first 60: two categories
    (["--validation", "--per_category", "2"], 12),
    (["--validation", "--per_category", "2", "--num_prompts", "5"], 5),
  ],
)
def test_prompt_selection(argv, count):
  args = score_model.build_parser().parse_args(argv)
  prompts = score_model.select_prompts(args)
  assert len(prompts) == count
  eval_set = {p["prompt"] for p in shapes.eval_prompts()}
  if "--validation" in argv:
    assert not eval_set & {p["prompt"] for p in prompts}
  else:
    assert {p["prompt"] for p in prompts} <= eval_set


class _RenderingPipeline:
  """Stands in for SanaPipeline: renders each prompt's ShapesEval specification."""

  def __init__(self, specs):
    self.specs = {s["prompt"]: s for s in specs}

  def resolve(self, options):
    return {"steps": options.steps}

  def generate(self, prompts, seeds, options):
    return np.stack(
      [shapes.render(self.specs[p], 32, np.random.default_rng(s)) for p, s in zip(prompts, seeds)]
    )


def test_out_is_replaced_whole_and_only_with_overwrite(tmp_path, monkeypatch, capsys):
  from sana_jax.pipeline import SanaPipeline

  monkeypatch.setattr(
    SanaPipeline,
    "from_folder",
    classmethod(lambda cls, folder: _RenderingPipeline(shapes.eval_prompts())),
  )
  out = tmp_path / "score"
  out.mkdir()
  (out / "stale.txt").write_text("an earlier run")
  argv = ["--out", str(out), "--num_prompts", "2", "--ns", "2"]
  assert score_model.main(argv) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert sorted(p.name for p in out.iterdir()) == ["stale.txt"]
  # a failure before the end leaves the old output as it was, and nothing beside it
  with monkeypatch.context() as m:
    m.setattr(score_model, "gallery", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
      score_model.main(argv + ["--overwrite"])
  assert sorted(p.name for p in out.iterdir()) == ["stale.txt"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["score"]
  assert score_model.main(argv + ["--overwrite"]) == 0
  assert sorted(p.name for p in out.iterdir()) == [
    "best_of_n.png",
    "gallery.png",
    "images",
    "report.json",
  ]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["score"]
  report = json.loads((out / "report.json").read_text())
  assert report["one_image"]["overall"] == 1.0  # rendered ground truth: all correct
