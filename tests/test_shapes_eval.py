"""ShapesEval evaluator: accuracy on ground truth (clean and degraded), rejection of wrong
specs, detector checks on shapes drawn by an independent rasteriser (PIL), GenEval's
position / counting rules, the report and the command line.

Run with -s to see the measured accuracy table.
"""

import copy
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from sana_jax.shapes_eval import task as S
from sana_jax.shapes_eval import evaluator as E


def degrade(img, rng, noise, blur):
  """Gaussian blur (sigma in px) then additive gaussian noise (sigma in 0-255 units)."""
  x = ndimage.gaussian_filter(img.astype(np.float32), sigma=(blur, blur, 0))
  x = x + rng.normal(0.0, noise, x.shape)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def wrong_specs(spec, rng):
  """Deliberately wrong versions of a spec: {kind: spec}. The image rendered from `spec`
  must fail every one of them."""
  out = {}
  tag = spec["tag"]
  other = lambda pool, avoid: str(rng.choice([x for x in pool if x not in avoid]))

  def variant(kind, fn):
    s = copy.deepcopy(spec)
    fn(s)
    out[kind] = s

  inc = spec["include"]
  if tag == "single_object":
    variant(
      "wrong class", lambda s: s["include"][0].update({"class": other(S.SHAPES, [inc[0]["class"]])})
    )
    variant("count +1", lambda s: s["include"][0].update({"count": 2}))
  elif tag == "two_object":
    variant(
      "wrong class",
      lambda s: s["include"][int(rng.integers(2))].update(
        {"class": other(S.SHAPES, [inc[0]["class"], inc[1]["class"]])}
      ),
    )
    variant("count +1", lambda s: s["include"][int(rng.integers(2))].update({"count": 2}))
  elif tag == "counting":
    n = inc[0]["count"]
    for d in (-1, +1):
      variant(
        f"count {d:+d}",
        lambda s, d=d: (
          s["include"][0].update({"count": n + d}),
          s["exclude"][0].update({"count": n + d + 1}),
        ),
      )
  elif tag == "colors":
    variant(
      "wrong colour",
      lambda s: s["include"][0].update({"color": other(S.COLORS, [inc[0]["color"]])}),
    )
  elif tag == "position":
    variant(
      "swapped position",
      lambda s: s["include"][1].update({"position": [S.OPPOSITE[inc[1]["position"][0]], 0]}),
    )
  elif tag == "color_attr":
    variant(
      "swapped attributes",
      lambda s: (
        s["include"][0].update({"color": inc[1]["color"]}),
        s["include"][1].update({"color": inc[0]["color"]}),
      ),
    )
    variant(
      "wrong colour",
      lambda s: s["include"][1].update(
        {"color": other(S.COLORS, [inc[0]["color"], inc[1]["color"]])}
      ),
    )
  return out


def measure(image_size, per_category, noise, blur, seed=7):
  """Per category: accuracy on clean renders, on degraded renders, and the fraction of
  wrong specs rejected (per kind of error)."""
  table = {}
  for ci, cat in enumerate(S.CATEGORIES):
    clean = noisy = 0
    rejected, tried = {}, {}
    for i in range(per_category):
      rng = np.random.default_rng([seed, image_size, ci, i])
      spec = S.sample_spec(cat, rng)
      img = S.render(spec, image_size, rng)
      dets = E.detect(img)
      clean += E.score_detections(dets, spec).correct
      noisy += E.evaluate(degrade(img, rng, noise, blur), spec).correct
      for kind, bad in wrong_specs(spec, rng).items():
        tried[kind] = tried.get(kind, 0) + 1
        rejected[kind] = rejected.get(kind, 0) + (not E.score_detections(dets, bad).correct)
    table[cat] = {
      "clean": clean / per_category,
      "degraded": noisy / per_category,
      **{f"rejects {k}": rejected[k] / tried[k] for k in tried},
    }
  return table


def _print(title, table):
  print(f"\n{title}")
  for cat, row in table.items():
    print(f"  {cat:<14} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))


@pytest.mark.parametrize(
  "image_size,per_category,noise,blur",
  [
    (64, 200, 8.0, 0.6),
    (32, 100, 8.0, 0.5),
  ],
)
def test_accuracy_on_ground_truth_and_wrong_specs(image_size, per_category, noise, blur):
  table = measure(image_size, per_category, noise, blur)
  _print(
    f"ShapesEval evaluator at {image_size} px, {per_category}/category "
    f"(degraded: blur {blur} px, noise {noise}/255)",
    table,
  )
  for cat, row in table.items():
    for key, acc in row.items():
      assert acc >= 0.99, (cat, key, acc, table)


# ----------------------------------------------------------------------------- detector


def _pil_canvas(size=64, bg=(255, 255, 255)):
  im = Image.new("RGB", (size * 4, size * 4), bg)
  return im, ImageDraw.Draw(im)


def _pil_shape(draw, shape, box, color):
  """Draw with PIL (an independent rasteriser) at 4x; box in final pixels."""
  x0, y0, x1, y1 = [4 * v for v in box]
  if shape == "circle":
    draw.ellipse([x0, y0, x1, y1], fill=color)
  elif shape == "square":
    draw.rectangle([x0, y0, x1, y1], fill=color)
  elif shape == "triangle":
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
  elif shape == "cross":
    w = (x1 - x0) * 0.36 / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    draw.rectangle([cx - w, y0, cx + w, y1], fill=color)
    draw.rectangle([x0, cy - w, x1, cy + w], fill=color)


def _downsample(im, size):
  return np.asarray(im.resize((size, size), Image.BOX))


@pytest.mark.parametrize("shape", S.SHAPES)
@pytest.mark.parametrize("side", [8, 14, 24])
def test_detector_on_pil_drawn_shapes(shape, side):
  """Shapes drawn by PIL (not our renderer), several sizes and colours: class, colour and
  box are recovered."""
  for k, (cname, rgb) in enumerate(S.COLORS.items()):
    im, draw = _pil_canvas()
    x0, y0 = 5 + 3 * k, 30 - 2 * k
    _pil_shape(draw, shape, (x0, y0, x0 + side, y0 + side), rgb)
    dets = E.detect(_downsample(im, 64))
    assert len(dets) == 1, (shape, side, cname, dets)
    d = dets[0]
    assert (d.cls, d.color) == (shape, cname), (shape, side, cname, d)
    np.testing.assert_allclose(d.box, (x0, y0, x0 + side, y0 + side), atol=1.01)


def test_detector_ignores_noise_and_blank_images():
  rng = np.random.default_rng(0)
  blank = np.full((64, 64, 3), 255, np.uint8)
  assert E.detect(blank) == []
  assert E.detect(degrade(blank, rng, noise=12.0, blur=0.0)) == []
  speckle = blank.copy()
  speckle[rng.integers(0, 64, 20), rng.integers(0, 64, 20)] = S.COLORS["red"]  # isolated px
  assert E.detect(speckle) == []
  res = E.evaluate(blank, {"tag": "single_object", "include": [{"class": "circle", "count": 1}]})
  assert not res.correct and "circle>=1, found 0" in res.reason and res.score == 0.0


def test_detector_on_grey_background_and_shifted_colours():
  """Background is measured, not assumed; colours a bit off the palette still classify."""
  im, draw = _pil_canvas(bg=(215, 215, 215))
  _pil_shape(draw, "square", (6, 6, 24, 24), (180, 40, 40))  # darker red
  _pil_shape(draw, "triangle", (36, 30, 58, 52), (60, 90, 200))  # off blue
  dets = sorted(E.detect(_downsample(im, 64)), key=lambda d: d.box[0])
  assert [(d.cls, d.color) for d in dets] == [("square", "red"), ("triangle", "blue")]


def test_touching_different_colours_are_separate_objects():
  im, draw = _pil_canvas()
  _pil_shape(draw, "square", (10, 10, 30, 30), S.COLORS["green"])
  _pil_shape(draw, "square", (30, 10, 50, 30), S.COLORS["purple"])
  dets = E.detect(_downsample(im, 64))
  assert sorted((d.cls, d.color) for d in dets) == [("square", "green"), ("square", "purple")]


def test_input_validation():
  spec = {"tag": "single_object", "include": [{"class": "circle", "count": 1}]}
  with pytest.raises(ValueError, match="uint8"):
    E.evaluate(np.zeros((32, 32, 3), np.float32), spec)
  with pytest.raises(ValueError, match="uint8"):
    E.evaluate(np.zeros((32, 32), np.uint8), spec)
  with pytest.raises(ValueError, match="class must be one of"):
    E.evaluate(
      np.zeros((32, 32, 3), np.uint8), {"tag": "x", "include": [{"class": "dog", "count": 1}]}
    )
  with pytest.raises(ValueError, match="color must be one of"):
    E.evaluate(
      np.zeros((32, 32, 3), np.uint8),
      {"tag": "x", "include": [{"class": "circle", "count": 1, "color": "pink"}]},
    )


# ----------------------------------------------------------------------------- GenEval rules


def _geneval_relative_position(box_a, box_b, threshold=0.1):
  """GenEval's relative_position (evaluate_images.py), restated here as the oracle."""
  boxes = np.array([box_a, box_b], np.float64).reshape(2, 2, 2)
  center_a, center_b = boxes.mean(axis=-2)
  dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
  offset = center_a - center_b
  revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
  if np.all(np.abs(revised) < 1e-3):
    return set()
  dx, dy = revised / np.linalg.norm(offset)
  rel = set()
  if dx < -0.5:
    rel.add("left of")
  if dx > 0.5:
    rel.add("right of")
  if dy < -0.5:
    rel.add("above")
  if dy > 0.5:
    rel.add("below")
  return rel


def test_relation_strength_matches_geneval_rule():
  rng = np.random.default_rng(1)
  for _ in range(2000):
    a = rng.uniform(0, 60, 2)
    b = rng.uniform(0, 60, 2)
    box_a = (*a, *(a + rng.uniform(2, 20, 2)))
    box_b = (*b, *(b + rng.uniform(2, 20, 2)))
    strengths = S.relation_strength(box_a, box_b)
    ours = {r for r, s in strengths.items() if s > 0.5}
    assert ours == _geneval_relative_position(box_a, box_b), (box_a, box_b, strengths)


def _det(cls, color, box):
  return E.Detection(cls, color, tuple(float(v) for v in box), 100.0, 0.9)


def test_position_rule_with_margin():
  spec = {
    "tag": "position",
    "include": [
      {"class": "square", "count": 1},
      {"class": "circle", "count": 1, "position": ["right of", 0]},
    ],
  }
  sq = _det("square", "red", (10, 20, 20, 30))
  assert E.score_detections([sq, _det("circle", "blue", (30, 22, 40, 32))], spec).correct
  # Centres 3 px apart horizontally: inside GenEval's 0.1 x (10 + 10) px margin.
  res = E.score_detections([sq, _det("circle", "blue", (13, 40, 23, 50))], spec)
  assert not res.correct and "right of" in res.reason and 0 < res.score < 1
  # Diagonal but mostly to the right: still "right of" (GenEval allows both relations).
  assert E.score_detections([sq, _det("circle", "blue", (40, 28, 50, 38))], spec).correct
  # Target missing: no target to be right of.
  res = E.score_detections([_det("circle", "blue", (30, 22, 40, 32))], spec)
  assert not res.correct and "square>=1" in res.reason


def test_counting_penalises_extra_instances_and_two_object_does_not():
  circles = [_det("circle", c, (12 * i, 5, 12 * i + 8, 13)) for i, c in enumerate(["red"] * 4)]
  three = {
    "tag": "counting",
    "include": [{"class": "circle", "count": 3}],
    "exclude": [{"class": "circle", "count": 4}],
  }
  res = E.score_detections(circles, three)
  assert not res.correct and "circle<4, found 4" in res.reason
  assert E.score_detections(circles[:3], three).correct
  res2 = E.score_detections(circles[:2], three)
  assert not res2.correct and "circle>=3, found 2" in res2.reason
  two = {
    "tag": "two_object",
    "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
  }
  extra = circles[:2] + [_det("square", "green", (40, 40, 50, 50))]
  assert E.score_detections(extra, two).correct  # GenEval: include is ">= count"


def test_colour_rule_prefers_matching_instance():
  spec = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "green"}]}
  dets = [_det("circle", "red", (0, 0, 9, 9)), _det("circle", "green", (20, 0, 29, 9))]
  assert E.score_detections(dets, spec).correct
  res = E.score_detections(dets[:1], spec)
  assert not res.correct and "green" in res.reason


def test_score_is_fraction_of_satisfied_constraints():
  spec = {
    "tag": "color_attr",
    "include": [
      {"class": "circle", "count": 1, "color": "red"},
      {"class": "square", "count": 1, "color": "blue"},
    ],
  }
  both = [_det("circle", "red", (0, 0, 9, 9)), _det("square", "blue", (20, 0, 29, 9))]
  one_colour_wrong = [_det("circle", "red", (0, 0, 9, 9)), _det("square", "green", (20, 0, 29, 9))]
  only_circle = [_det("circle", "red", (0, 0, 9, 9))]
  s = [E.score_detections(d, spec).score for d in (both, one_colour_wrong, only_circle, [])]
  assert s[0] == 1.0
  assert s[0] > s[1] > s[2] > s[3] == 0.0
  assert s[1] == pytest.approx(3 / 4) and s[2] == pytest.approx(2 / 4)


# ----------------------------------------------------------------------------- report, CLI


def test_report_is_mean_over_categories():
  ok, bad = E.ShapesResult(True, "", 1.0), E.ShapesResult(False, "x", 0.5)
  results = (
    [({"tag": "single_object"}, ok)] * 3
    + [({"tag": "single_object"}, bad)]
    + [({"tag": "position"}, ok)]
    + [({"tag": "position"}, bad)] * 9
  )
  rep = E.report(results)
  assert rep["categories"]["single_object"] == {"accuracy": 0.75, "correct": 3, "total": 4}
  assert rep["categories"]["position"]["accuracy"] == pytest.approx(0.1)
  assert rep["overall"] == pytest.approx((0.75 + 0.1) / 2)  # not the image mean (4/14)
  assert rep["image_accuracy"] == pytest.approx(4 / 14)
  text = E.format_report(rep)
  assert "single_object" in text and "0.7500" in text and "overall" in text


def test_cli_on_geneval_folder(tmp_path, capsys):
  prompts = S.eval_prompts()
  chosen = [i for i in range(len(prompts)) if i % 50 < 2]  # two prompts per category
  meta = tmp_path / "prompts.jsonl"
  meta.write_text("".join(json.dumps(p) + "\n" for p in prompts))
  for i in chosen:
    spec = prompts[i]
    imgs = [S.render(spec, 48, np.random.default_rng([i, j])) for j in range(2)]
    if spec["tag"] == "counting":  # one sample with an extra instance: must fail
      bad = copy.deepcopy(spec)
      bad["include"][0]["count"] += 1
      imgs[1] = S.render(bad, 48, np.random.default_rng(i))
    E.save_geneval_folder(str(tmp_path / "imgs"), i, spec, imgs)
  out = tmp_path / "results.jsonl"
  rep = E.main(["--images", str(tmp_path / "imgs"), "--metadata", str(meta), "--out", str(out)])
  assert rep["images"] == 2 * len(chosen)
  for cat, row in rep["categories"].items():
    assert row["accuracy"] == (0.5 if cat == "counting" else 1.0), rep
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert len(rows) == rep["images"] and all("reason" in r for r in rows)
  assert "overall" in capsys.readouterr().out
  # Without --metadata each folder's own metadata.jsonl is used: same report.
  assert E.main(["--images", str(tmp_path / "imgs")]) == rep
