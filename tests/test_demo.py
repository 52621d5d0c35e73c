"""sana-demo (sana_jax/demo.py): its pure functions on the embedded model, the page's
build, and the command-line contract.

The embedded ShapesEval model samples with 2 steps and 4 images per call everywhere (one
compiled sampler for the file). The bracket / verdict-row logic is also checked on a fake
pipeline (no compile) against brackets worked out by hand.
"""

import socket

import numpy as np
import pytest

from sana_jax import demo
from sana_jax.scaling import best_of_n
from sana_jax.scaling.judges import Judge, ShapesJudge, Verdict
from tests import cli_contract
from tests.cli_contract import assert_refused

STEPS = 2
# A two-colour prompt the 2-step sampler gets partly wrong, so the verdicts differ.
PROMPT = "a photo of a circle that is green and a square that is red on a white background"


@pytest.fixture(scope="module")
def pipe():
  return demo.load_pipeline(demo.check_model(None))


class FakePipe:
  """generate_fn's seam only: image for seed s is filled with s (no model, no compile)."""

  settings = {"image_size": 8, "sampler": {"steps": 20, "guidance_scale": 4.5, "name": "x"}}

  def __init__(self):
    self.calls = []

  def generate_fn(self, **options):
    def gen(prompt, seeds):
      self.calls.append((prompt, list(seeds), options))
      return [np.full((8, 8, 3), s % 256, np.uint8) for s in seeds]

    return gen


class ScriptedJudge(Judge):
  """Verdicts given per image value (the seed, see FakePipe)."""

  name = "scripted"

  def __init__(self, by_seed):
    self.by_seed = by_seed

  def judge(self, images, prompt):
    return [self.by_seed[int(im[0, 0, 0])] for im in images]


# ---------------------------------------------------------------- the embedded model


def test_images_count_seeds_and_reproducibility(pipe):
  a = demo.generate(pipe, PROMPT, seed=3, steps=STEPS, num_images=4)
  assert len(a.images) == 4 and a.seeds == [3, 4, 5, 6] and a.shown == [0, 1, 2, 3]
  assert all(im.dtype == np.uint8 and im.shape == (32, 32, 3) for im in a.images)
  again = demo.generate(pipe, PROMPT, seed=3, steps=STEPS, num_images=4)
  shifted = demo.generate(pipe, PROMPT, seed=4, steps=STEPS, num_images=4)
  for k in range(4):
    np.testing.assert_array_equal(again.images[k], a.images[k])
  for k in range(3):  # image k has seed seed + k, whatever the batch
    np.testing.assert_array_equal(shifted.images[k], a.images[k + 1])
  assert not np.array_equal(a.images[0], a.images[1]), "different seeds, same image"
  # the pipeline called directly, with the same options, gives the same images
  from sana_jax.pipeline import SamplingOptions

  direct = pipe.generate(
    [PROMPT] * 4, [3, 4, 5, 6], SamplingOptions(steps=STEPS, guidance_scale=3.0)
  )
  np.testing.assert_array_equal(np.stack(a.images), direct)
  # every image judged (the prompt is a ShapesEval prompt), none dropped
  assert len(a.verdicts) == 4 and [r[-1] for r in a.verdict_rows()] == ["shown"] * 4


def test_best_of_n_verdicts_are_the_judges_and_the_tournaments(pipe, tmp_path):
  g = demo.generate(pipe, PROMPT, seed=10, steps=STEPS, num_images=2, best_of=4)
  assert len(g.candidates) == 4 and g.request.seeds == [10, 11, 12, 13]
  spec = demo.shapes_spec(PROMPT)
  assert spec is not None and spec["tag"] == "color_attr"
  direct = ShapesJudge(spec).judge(g.candidates, PROMPT)
  assert g.verdicts == direct
  played = best_of_n.tournament(direct, 2)
  assert g.tournament == played and g.shown == list(played.winners)
  assert g.winner is None  # two kept: the bracket does not rank them
  for j, i in enumerate(played.winners):
    assert g.images[j] is g.candidates[i]
  rows = g.verdict_rows()
  assert [r[0] for r in rows] == [0, 1, 2, 3] and [r[1] for r in rows] == [10, 11, 12, 13]
  assert [r[2] == "yes" for r in rows] == [v.yes for v in direct]
  assert [r[3] for r in rows] == [round(v.yes_score, 4) for v in direct]
  assert [rows[i][-1] for i in played.winners] == ["kept", "kept"]
  assert [r[-1] for r in rows].count("out in round 1") == 2
  # the best-of-N command's own path (run_best_of_n over the pipeline's generate_fn) keeps
  # the same seeds with the same verdicts
  ref = best_of_n.run_best_of_n(
    PROMPT,
    pipe.generate_fn(steps=STEPS, guidance_scale=3.0),
    ShapesJudge(spec),
    tmp_path / "bon",
    n=4,
    k=2,
    seed=10,
  )
  assert ref.winner_seeds == g.seeds and ref.verdicts == g.verdicts
  gallery, table, bracket, text = demo.page_outputs(g)
  w = played.winners[0]
  assert len(gallery) == 2 and table == rows and f"kept #{w} (seed {10 + w})" in text
  assert gallery[0][0].shape == (192, 192, 3)  # 32 px shown 6x, nearest neighbour
  np.testing.assert_array_equal(gallery[0][0][::6, ::6], g.images[0])
  assert gallery[0][1].startswith(f"#{w} seed {10 + w}")
  assert bracket.size == best_of_n.bracket_picture(g.candidates, played, direct).size


# ---------------------------------------------------------------- logic on a fake pipe


def test_rows_follow_a_bracket_worked_by_hand():
  no3, yes6, yes9, no1 = (
    Verdict(False, 0.7, 0.3),
    Verdict(True, 0.6, 0.4),
    Verdict(True, 0.9, 0.1),
    Verdict(False, 0.1, 0.9),
  )
  judge = ScriptedJudge({0: no3, 1: yes6, 2: yes9, 3: no1})
  fake = FakePipe()
  g = demo.generate(fake, "a cat", seed=0, num_images=1, best_of=4, judge=judge)
  # round 1: (0, 1) -> 1 (yes beats no), (2, 3) -> 2; round 2: (1, 2) -> 2 (higher yes)
  assert g.shown == [2] and fake.calls == [
    ("a cat", [0, 1, 2, 3], {"steps": 20, "guidance_scale": 4.5})
  ]
  rows = g.verdict_rows()
  assert g.winner == 2 and rows[2][5:] == ["beat #3; beat #1", "winner"]
  assert rows[1][5:] == ["beat #0; lost to #2", "out in round 2"]
  assert rows[0][5:] == ["lost to #1", "out in round 1"]
  assert rows[3][2:5] == ["no", 0.1, 0.9]
  # n = 3, k = 1: one first-round match (0, 1), candidate 2 advances on a bye
  judge = ScriptedJudge({7: no3, 8: yes6, 9: no1})
  g = demo.generate(
    fake, "a cat", seed=7, steps=3, guidance=0, num_images=1, best_of=3, judge=judge
  )
  rows = g.verdict_rows()
  assert rows[2][5:] == ["bye; lost to #1", "out in round 2"] and g.shown == [1]
  assert fake.calls[-1][1:] == ([7, 8, 9], {"steps": 3, "guidance_scale": 0.0})


def test_prompt_outside_the_grammar_is_sampled_not_judged():
  fake = FakePipe()
  g = demo.generate(fake, "a cat on a sofa", seed=5, num_images=2)
  assert g.verdicts is None and g.verdict_rows() == [] and g.seeds == [5, 6]
  assert "Not judged" in g.summary()
  gallery, rows, bracket, _ = demo.page_outputs(g)
  assert len(gallery) == 2 and rows == [] and bracket is None
  assert demo.shapes_spec("A Photo of Four Triangles!")["include"] == [
    {"class": "triangle", "count": 4}
  ]


@pytest.mark.parametrize(
  "kwargs,fragments",
  [
    (dict(steps=0), ["steps", "0", "1..200"]),
    (dict(num_images=0), ["number of images", "0"]),
    (dict(num_images=17), ["number of images", "17", "1..16"]),
    (dict(num_images=4, best_of=3), ["best-of-N 3", ">= the number of images (4)"]),
    (dict(best_of=65), ["best-of-N", "65"]),
    (dict(guidance=-1), ["guidance", "-1"]),
    (dict(seed=-1), ["seed", "-1"]),
    (dict(seed=1.5), ["seed", "1.5"]),
    (dict(prompt=" "), ["prompt"]),
    (dict(prompt="a cat", best_of=8), ["best-of-N", "ShapesEval", "'a cat'"]),
  ],
  ids=[
    "steps_0",
    "images_0",
    "images_17",
    "best_of_below_images",
    "best_of_65",
    "guidance_negative",
    "seed_negative",
    "seed_fraction",
    "prompt_blank",
    "best_of_without_spec",
  ],
)
def test_bad_request_named_before_sampling(kwargs, fragments):
  fake = FakePipe()
  kwargs = {"prompt": "one triangle", **kwargs}
  with pytest.raises(ValueError) as e:
    demo.generate(fake, kwargs.pop("prompt"), **kwargs)
  for f in fragments:
    assert f in str(e.value)
  assert fake.calls == []


def test_blocks_build_and_wire_generate():
  gr = pytest.importorskip("gradio", reason="gradio not installed (the [demo] extra)")
  fake = FakePipe()
  blocks = demo.build_blocks(fake, model_name="fake")
  assert isinstance(blocks, gr.Blocks)
  labels = {c.get("props", {}).get("label") for c in blocks.config["components"]}
  for want in ("prompt", "seed", "steps", "guidance", "number of images", "the judge's verdicts"):
    assert want in labels, labels
  (fn,) = [f for f in blocks.fns.values() if f.api_name == "generate"]
  gallery, rows, bracket, text = fn.fn("one triangle", 0, 5, 1.0, 1, 2)
  assert fake.calls == [("one triangle", [0, 1], {"steps": 5, "guidance_scale": 1.0})]
  assert len(gallery) == 1 and len(rows) == 2 and bracket is not None and "Best 1 of 2" in text
  with pytest.raises(gr.Error, match="best-of-N"):
    fn.fn("a cat", 0, 5, 1.0, 1, 2)


# ---------------------------------------------------------------- the command


@pytest.fixture
def no_loading(monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("the model was loaded for a bad argument")

  monkeypatch.setattr(demo, "load_pipeline", refuse)
  monkeypatch.setattr(demo, "build_blocks", refuse)


@pytest.fixture
def busy_port():
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  s.listen(1)
  yield s.getsockname()[1]
  s.close()


BAD = [
  ("model_missing", ["--model", "MISSING"], ["--model", "MISSING", "does not exist"]),
  ("model_is_file", ["--model", "FILE"], ["--model", "FILE", "is a file"]),
  ("model_not_a_model", ["--model", "DIR"], ["--model", "DIR", "pipeline.json"]),
  ("port_0", ["--port", "0"], ["--port", "'0'", "1..65535"]),
  ("port_65536", ["--port", "65536"], ["--port", "65536"]),
  ("port_not_int", ["--port", "web"], ["--port", "'web'"]),
  ("port_in_use", ["--port", "BUSY"], ["--port BUSY", "in use"]),
  ("host_empty", ["--host", ""], ["--host"]),
  ("host_not_this_machine", ["--host", "192.0.2.1"], ["--host 192.0.2.1", "cannot listen"]),
]


@pytest.mark.contract
@pytest.mark.parametrize("argv,fragments", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_argument_refused_before_loading(
  argv, fragments, tmp_path, capsys, no_loading, busy_port
):
  subs = {
    "MISSING": str(tmp_path / "nope"),
    "FILE": str(tmp_path / "file.txt"),
    "DIR": str(tmp_path / "empty"),
    "BUSY": str(busy_port),
  }
  (tmp_path / "file.txt").write_text("x")
  (tmp_path / "empty").mkdir()
  fill = lambda s: next((s.replace(k, v) for k, v in subs.items() if k in s), s)  # noqa: E731
  result = cli_contract.call_main(demo.main, [fill(a) for a in argv], capsys)
  assert_refused(result, *[fill(f) for f in fragments])


@pytest.mark.contract
def test_gradio_missing_refused_before_loading(monkeypatch, capsys, no_loading):
  real = demo.importlib.util.find_spec
  monkeypatch.setattr(
    demo.importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a)
  )
  result = cli_contract.call_main(demo.main, ["--port", "7860"], capsys)
  assert_refused(result, "gradio", "sana_jax[demo]")


@pytest.mark.contract
def test_module_entry_refuses_in_a_subprocess():
  result = cli_contract.run_command(["-m", "sana_jax.demo", "--port", "70000"], timeout=120)
  assert_refused(result, "--port", "70000")


def test_help_states_every_default(capsys):
  result = cli_contract.call_main(demo.main, ["--help"], capsys)
  assert result.returncode == 0
  for action in demo.build_parser()._actions:
    if action.option_strings and action.dest != "help":
      assert "default" in action.help, action.option_strings


def test_main_serves_on_loopback_by_default(monkeypatch, capsys):
  gr = pytest.importorskip("gradio", reason="gradio not installed (the [demo] extra)")
  launched = {}
  monkeypatch.setattr(demo, "load_pipeline", lambda model: FakePipe())
  monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw))
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  result = cli_contract.call_main(demo.main, ["--port", port], capsys)
  assert result.returncode == 0, result.stderr
  assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == port
  assert launched["share"] is False
