"""Judges: the transformers judge against a direct computation on a tiny random Llava, the
NVILA subprocess bridge end to end against a remote-code test model, its failure modes
(crash, hang, garbage) with every candidate kept on disk, and the ShapesEval judge."""

import json
import stat
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from sana_jax.scaling import best_of_n_cli
from sana_jax.scaling.best_of_n import run_best_of_n, tournament
from sana_jax.scaling.judges import (
  JudgeError,
  NvilaSubprocessJudge,
  ShapesJudge,
  TransformersJudge,
  Verdict,
  make_judge,
)

# The official question of nvila_sana_pick.py, written out here independently.
QUESTION = """You are an AI assistant specializing in image analysis and ranking. Your task is to analyze and compare image based on how well they match the given prompt.
The given prompt is:{prompt}. Please consider the prompt and the image to make a decision and response directly with 'yes' or 'no'.
"""


def random_images(seed, n, sizes=((40, 50), (31, 29), (64, 64))):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


# ----------------------------------------------------------------------------------------
# transformers judge on a tiny random LlavaForConditionalGeneration
# ----------------------------------------------------------------------------------------


def build_tiny_llava(folder):
  import torch
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
  )

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=310,
    special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(
    [QUESTION.format(prompt="a red cube and a blue ball"), "yes no"] * 4, trainer
  )
  hf_tok = PreTrainedTokenizerFast(
    tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
  )
  template = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
  )
  processor = LlavaProcessor(
    image_processor=CLIPImageProcessor(
      size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
    ),
    tokenizer=hf_tok,
    patch_size=7,
    vision_feature_select_strategy="default",
    num_additional_image_tokens=1,
    chat_template=template,
  )
  # all sizes differ: vision 24 wide, 2 heads, mlp 40; text 32 wide, 4 heads / 2 kv, mlp 56
  config = LlavaConfig(
    vision_config=CLIPVisionConfig(
      hidden_size=24,
      intermediate_size=40,
      num_hidden_layers=2,
      num_attention_heads=2,
      image_size=28,
      patch_size=7,
      projection_dim=12,
    ),
    text_config=LlamaConfig(
      hidden_size=32,
      intermediate_size=56,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      vocab_size=len(hf_tok),
      pad_token_id=hf_tok.pad_token_id,
      bos_token_id=1,
      eos_token_id=2,
    ),
    image_token_id=hf_tok.convert_tokens_to_ids("<image>"),
    vision_feature_select_strategy="default",
    vision_feature_layer=-1,
  )
  torch.manual_seed(0)
  model = LlavaForConditionalGeneration(config).eval()
  model.save_pretrained(folder)
  processor.save_pretrained(folder)
  return model, processor


def test_transformers_judge_matches_direct_first_token_logits(tmp_path):
  import torch

  model, processor = build_tiny_llava(tmp_path / "llava")
  prompt = "a red cube and a blue ball"
  images = random_images(3, 5)
  judge = TransformersJudge(tmp_path / "llava", batch_size=2)  # loads from the folder
  verdicts = judge.judge(images, prompt)

  # direct: one image at a time, unpadded forward, logits at the last position
  tok = processor.tokenizer
  yes_id = tok.encode("yes", add_special_tokens=False)[0]
  no_id = tok.encode("no", add_special_tokens=False)[0]
  assert yes_id != no_id
  text = processor.apply_chat_template(
    [
      {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": QUESTION.format(prompt=prompt)}],
      }
    ],
    add_generation_prompt=True,
    tokenize=False,
  )
  assert text.startswith("USER: <image>\nYou are an AI") and text.endswith("'no'.\n\nASSISTANT:")
  assert len(verdicts) == len(images)
  for im, v in zip(images, verdicts):
    inputs = processor(text=[text], images=[Image.fromarray(im)], return_tensors="pt")
    with torch.no_grad():
      logits = model(**inputs).logits[0, -1]
    y, n = float(logits[yes_id]), float(logits[no_id])
    assert v.yes_score == pytest.approx(y, rel=1e-5, abs=1e-5)
    assert v.no_score == pytest.approx(n, rel=1e-5, abs=1e-5)
    assert v.yes == (y > n)
  assert len({round(v.yes_score, 6) for v in verdicts}) == len(images)  # depends on the image
  # the scores depend on the prompt too
  other = judge.judge(images[:1], "something else entirely")[0]
  assert other.yes_score != pytest.approx(verdicts[0].yes_score, abs=1e-6)


# ----------------------------------------------------------------------------------------
# NVILA bridge: a test model folder implementing the NVILA remote-code interface
# ----------------------------------------------------------------------------------------

CONFIG_PY = '''
from transformers import PretrainedConfig


class TinyVerifierConfig(PretrainedConfig):
    model_type = "tiny_nvila_verifier"

    def __init__(self, vocab_size=53, mode="ok", **kwargs):
        self.vocab_size = vocab_size
        self.mode = mode
        super().__init__(**kwargs)
'''

MODELING_PY = '''
import os
import time

import numpy as np
import PIL.Image
import torch
from transformers import PreTrainedModel

from .configuration_tiny_verifier import TinyVerifierConfig


class CharTokenizer:
    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [3 + ord(c) % 47 for c in text]


class TinyVerifier(PreTrainedModel):
    """NVILA-style interface: generate_content([image, text]) -> (response, scores)."""

    config_class = TinyVerifierConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(7, config.vocab_size)
        self.tokenizer = CharTokenizer()
        print("tiny verifier: loading (printed on stdout on purpose)")
        self.post_init()

    @torch.inference_mode()
    def generate_content(self, prompt):
        image, text = prompt
        assert isinstance(image, PIL.Image.Image) and isinstance(text, str)
        mode = "noscores" if "[noscores]" in text else self.config.mode
        if mode == "crash":
            print("tiny verifier: crashing now")
            os._exit(3)
        if mode == "hang":
            time.sleep(3600)
        if mode == "noscores":
            return "yes"
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
        feats = torch.stack([x[..., 0].mean(), x[..., 1].mean(), x[..., 2].mean(), x.std(),
                             torch.tensor(image.height / 64.0), torch.tensor(image.width / 64.0),
                             torch.tensor(sum(map(ord, text)) % 997 / 997.0)])
        logits = self.proj(feats)[None]
        yes_id = self.tokenizer.encode("yes", add_special_tokens=False)[0]
        no_id = self.tokenizer.encode("no", add_special_tokens=False)[0]
        response = "yes" if logits[0, yes_id] > logits[0, no_id] else "no"
        print("tiny verifier says", response)
        return response, (logits,)
'''


def build_tiny_verifier(folder, mode="ok"):
  import torch
  from safetensors.torch import save_file

  folder.mkdir(parents=True)
  (folder / "configuration_tiny_verifier.py").write_text(CONFIG_PY)
  (folder / "modeling_tiny_verifier.py").write_text(MODELING_PY)
  (folder / "config.json").write_text(
    json.dumps(
      {
        "model_type": "tiny_nvila_verifier",
        "architectures": ["TinyVerifier"],
        "mode": mode,
        "vocab_size": 53,
        "auto_map": {
          "AutoConfig": "configuration_tiny_verifier.TinyVerifierConfig",
          "AutoModel": "modeling_tiny_verifier.TinyVerifier",
        },
      }
    )
  )
  g = torch.Generator().manual_seed(7)
  save_file(
    {"proj.weight": torch.randn(53, 7, generator=g) * 3, "proj.bias": torch.randn(53, generator=g)},
    str(folder / "model.safetensors"),
  )
  return folder


@pytest.fixture(scope="module")
def verifier_dir(tmp_path_factory):
  return build_tiny_verifier(tmp_path_factory.mktemp("nvila") / "tiny-verifier")


def direct_scores(folder, images, prompt):
  """What the official script would read, in this process."""
  from transformers import AutoModel

  model = AutoModel.from_pretrained(str(folder), trust_remote_code=True)
  yes_id = model.tokenizer.encode("yes", add_special_tokens=False)[0]
  no_id = model.tokenizer.encode("no", add_special_tokens=False)[0]
  out = []
  for im in images:
    r, scores = model.generate_content([Image.fromarray(im), QUESTION.format(prompt=prompt)])
    out.append((r, float(scores[0][0, yes_id]), float(scores[0][0, no_id])))
  return out


def test_nvila_bridge_end_to_end(verifier_dir, tmp_path, monkeypatch):
  images = random_images(5, 7)
  prompt = 'a cyberpunk cat with a neon sign that says "Sana"'
  want = direct_scores(verifier_dir, images, prompt)
  assert {r for r, _, _ in want} == {"yes", "no"}  # both answers occur
  judge = NvilaSubprocessJudge(verifier_dir, sys.executable, batch_size=3, timeout_s=120)
  got = judge.judge(images, prompt)  # 3 requests: 3 + 3 + 1 images
  assert judge.info["yes_id"] != judge.info["no_id"]
  assert [(v.yes, v.yes_score, v.no_score) for v in got] == [
    (r == "yes", y, n) for r, y, n in want
  ]  # exact: PNG and JSON are lossless
  assert judge.judge(images[:2], prompt) == got[:2]  # the worker stays up across calls
  assert judge.judge(images[:1], "a dog")[0].yes_score != got[0].yes_score  # prompt reaches it
  pid = judge._proc.pid
  # an error inside generate_content comes back with the worker's traceback, and the worker
  # stays up for the next request
  with pytest.raises(
    JudgeError,
    match=r"(?s)reported an error.*TypeError: generate_content "
    r"returned str; expected \(response, scores\)",
  ):
    judge.judge(images[:2], "[noscores]")
  assert judge._proc.pid == pid
  assert judge.judge(images[:2], prompt) == got[:2]

  # the command line, on the same running worker (make_judge is checked for its arguments)
  def fake_make_judge(name, *, path, python, **kw):
    assert (name, path, python, kw) == (
      "nvila",
      str(verifier_dir),
      sys.executable,
      {"timeout_s": 77.0, "batch_size": 4},
    )
    return judge

  monkeypatch.setattr(best_of_n_cli, "make_judge", fake_make_judge)
  gen = lambda p, seeds: random_images(int(seeds[0]), len(seeds), sizes=((24, 24),))  # noqa: E731
  out = tmp_path / "out"
  rc = best_of_n_cli.main(
    [
      "--prompt",
      "a red cube",
      "--n",
      "6",
      "--k",
      "2",
      "--seed",
      "11",
      "--batch_size",
      "6",
      "--judge",
      "nvila",
      "--judge_path",
      str(verifier_dir),
      "--judge_python",
      sys.executable,
      "--judge_batch",
      "4",
      "--judge_timeout",
      "77",
      "--out_dir",
      str(out),
    ],
    generate_fn=gen,
  )
  assert rc == 0
  assert judge._proc is None  # the command line closes its judge
  want = direct_scores(verifier_dir, gen("a red cube", list(range(11, 17))), "a red cube")
  saved = json.loads((out / "00000" / "verdicts.json").read_text())["verdicts"]
  verdicts = [Verdict(e["yes"], e["yes_score"], e["no_score"]) for e in saved]
  assert [(v.yes, v.yes_score, v.no_score) for v in verdicts] == [
    (r == "yes", y, n) for r, y, n in want
  ]
  summary = json.loads((out / "summary.json").read_text())
  assert summary[0]["winners"] == list(tournament(verdicts, 2).winners)
  assert (out / "00000" / "bracket.png").is_file()


def _assert_all_candidates_on_disk(out, n):
  meta = json.loads((out / "candidates.json").read_text())
  assert [c["index"] for c in meta["candidates"]] == list(range(n))
  for c in meta["candidates"]:
    assert (out / c["file"]).is_file()


@pytest.mark.parametrize(
  "mode,timeout,msg",
  [
    ("crash", 120, r"exited \(crashed\) while judging.*exit code: 3.*tiny verifier: crashing now"),
    ("hang", 3, r"no answer within 3 s while judging 4 image\(s\) \(killed; hung\?\)"),
  ],
)
def test_nvila_worker_failures_are_clear_and_candidates_stay(tmp_path, mode, timeout, msg):
  folder = build_tiny_verifier(tmp_path / f"verifier-{mode}", mode=mode)
  judge = NvilaSubprocessJudge(folder, sys.executable, timeout_s=timeout)
  gen = lambda p, seeds: random_images(1, len(seeds))  # noqa: E731
  t0 = time.monotonic()
  with pytest.raises(JudgeError, match="(?s)" + msg) as e:
    run_best_of_n("a cat", gen, judge, tmp_path / "out", n=4, k=1)
  assert "candidates are saved in" in str(e.value)
  _assert_all_candidates_on_disk(tmp_path / "out", 4)
  assert judge._proc is None  # the worker was stopped
  if mode == "hang":
    assert time.monotonic() - t0 < 60


def _fake_python(tmp_path, body):
  """An executable standing in for the verifier's python: ignores its arguments."""
  p = tmp_path / "fake-python"
  p.write_text("#!/bin/sh\n" + textwrap.dedent(body))
  p.chmod(p.stat().st_mode | stat.S_IEXEC)
  return p


@pytest.mark.parametrize(
  "body,msg",
  [
    ("echo 'this is not json'\n", r"unreadable answer while loading the model"),
    (
      "echo '{\"ready\": true, \"protocol\": 1}'\nread line\necho 'Traceback garbage'\n",
      r"unreadable answer while judging 3 image\(s\).*Traceback garbage",
    ),
    (
      "echo '{\"ready\": true, \"protocol\": 1}'\nread line\necho '{\"id\": 0, \"results\": []}'\n",
      r"malformed answer.*expected id 0 with 3 results",
    ),
    (
      "echo '{\"ready\": true, \"protocol\": 1}'\nread line\n"
      "echo '{\"id\": 0, \"results\": [{\"response\": \"yes\", \"yes_score\": NaN, \"no_score\": 1},"
      " {}, {}]}'\n",
      r"malformed result.*yes_score must be finite",
    ),
    ("echo '{\"ready\": false}'\nsleep 30\n", r"unexpected first message"),
    (
      "echo 'model load failed: CUDA out of memory' >&2\nexit 1\n",
      r"exited \(crashed\) while loading the model.*exit code: 1.*CUDA out of memory",
    ),
  ],
)
def test_nvila_garbage_from_the_worker_is_a_clear_error(tmp_path, verifier_dir, body, msg):
  judge = NvilaSubprocessJudge(
    verifier_dir, _fake_python(tmp_path, body), timeout_s=20, load_timeout_s=20
  )
  with pytest.raises(JudgeError, match="(?s)" + msg):
    judge.judge(random_images(0, 3), "a cat")
  assert judge._proc is None


def test_nvila_bad_paths_fail_at_construction(tmp_path):
  with pytest.raises(ValueError, match="expected an existing folder, got '/no/such/dir'"):
    NvilaSubprocessJudge("/no/such/dir", sys.executable)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="has no config.json"):
    NvilaSubprocessJudge(tmp_path / "empty", sys.executable)
  (tmp_path / "empty" / "config.json").write_text("{}")
  with pytest.raises(ValueError, match="not found or not executable"):
    NvilaSubprocessJudge(tmp_path / "empty", tmp_path / "python-missing")
  with pytest.raises(ValueError, match="unknown judge 'gpt'"):
    make_judge("gpt", path=tmp_path)
  with pytest.raises(ValueError, match="expected an existing folder"):
    make_judge("transformers", path=tmp_path / "nothing")


# ----------------------------------------------------------------------------------------
# ShapesEval judge
# ----------------------------------------------------------------------------------------


def test_shapes_judge_maps_results_and_validates():
  class R:
    def __init__(self, correct, score):
      self.correct, self.score, self.reason = correct, score, "r"

  seen = []

  def evaluate(image, spec):
    seen.append(spec)
    return R(image[0, 0, 0] > 100, image[0, 0, 1] / 255)

  ims = [np.full((4, 4, 3), v, np.uint8) for v in (50, 200)]
  ims[0][0, 0, 1] = 51
  v = ShapesJudge({"s": 1}, evaluate=evaluate).judge(ims, "p")
  assert v == [Verdict(False, 51 / 255, 1 - 51 / 255), Verdict(True, 200 / 255, 1 - 200 / 255)]
  assert seen == [{"s": 1}] * 2
  judge = ShapesJudge(specs={"p": {"s": 2}}, evaluate=evaluate)
  judge.judge(ims[:1], "p")
  assert seen[-1] == {"s": 2}
  with pytest.raises(ValueError, match="no specification for prompt 'q'"):
    judge.judge(ims[:1], "q")
  with pytest.raises(ValueError, match="score must be in"):
    ShapesJudge({}, evaluate=lambda im, s: R(True, 1.5)).judge(ims[:1], "p")


def _wrong_spec(spec, colors, opposite):
  """The same prompt's spec with one GenEval constraint broken (what a bad sample shows)."""
  w = json.loads(json.dumps(spec))
  inc = w["include"]
  if spec["tag"] == "colors":
    inc[0]["color"] = next(c for c in colors if c != inc[0]["color"])
  elif spec["tag"] == "counting":
    inc[0]["count"] += 1
    w["exclude"] = [{"class": inc[0]["class"], "count": inc[0]["count"] + 1}]
  elif spec["tag"] == "position":
    inc[1]["position"][0] = opposite[inc[1]["position"][0]]
  return w


def test_shapes_judge_with_the_real_shapes_evaluator():
  """Real ShapesEval renders of known correctness, judged by the real evaluator: the
  tournament keeps a correct one as often as the binomial model 1 - (1 - p)^N says."""
  data = pytest.importorskip(
    "sana_jax.data.shapes", reason="ShapesEval (another issue) is not in this checkout yet"
  )
  shapes_eval = pytest.importorskip(
    "sana_jax.eval.shapes", reason="ShapesEval (another issue) is not in this checkout yet"
  )
  if not hasattr(shapes_eval, "evaluate") or not hasattr(data, "render"):
    pytest.skip("ShapesEval has no evaluate()/render() yet")
  specs = [
    next(s for s in data.eval_prompts() if s["tag"] == tag)
    for tag in ("colors", "counting", "position")
  ]
  judge = ShapesJudge(specs={s["prompt"]: s for s in specs})  # the real evaluator
  rng = np.random.default_rng(0)
  p, trials, pool = 0.3, 400, 24
  emp = {}
  for si, spec in enumerate(specs):
    wrong = _wrong_spec(spec, list(data.COLORS), data.OPPOSITE)
    good = [data.render(spec, 48, np.random.default_rng([si, i])) for i in range(pool)]
    bad = [data.render(wrong, 48, np.random.default_rng([si, i, 1])) for i in range(pool)]
    vg, vb = judge.judge(good, spec["prompt"]), judge.judge(bad, spec["prompt"])
    assert sum(v.yes for v in vg) >= pool - 1 and sum(v.yes for v in vb) <= 1, spec
    for n in (1, 3, 8):
      hits = 0
      for _ in range(trials):
        truth = rng.random(n) < p
        idx = rng.integers(0, pool, n)
        verdicts = [(vg if t else vb)[i] for t, i in zip(truth, idx)]
        hits += bool(truth[tournament(verdicts, 1).winners[0]])
      emp.setdefault(n, []).append(hits / trials)
  for n, accs in emp.items():
    pred = 1 - (1 - p) ** n
    acc = float(np.mean(accs))
    sd = np.sqrt(pred * (1 - pred) / (trials * len(specs)))
    assert abs(acc - pred) < 4 * sd + 0.02, (n, acc, pred)
  assert np.mean(emp[8]) > np.mean(emp[3]) > np.mean(emp[1]) + 0.2


def test_verdict_validation():
  with pytest.raises(ValueError, match="must be finite"):
    Verdict(True, float("inf"), 0.0)
  with pytest.raises(ValueError, match="must be a bool"):
    Verdict("yes", 1.0, 0.0)
  with pytest.raises(ValueError, match="must be a number"):
    Verdict(True, "1", 0.0)
  assert Verdict(np.bool_(True), np.float32(1.5), 2) == Verdict(True, 1.5, 2.0)
