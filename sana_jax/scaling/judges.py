"""Judges for best-of-N sampling: (images, prompt) -> one yes/no verdict with scores per image.

Every judge implements `Judge.judge(images, prompt) -> list[Verdict]`, batched: `images`
is a list of uint8 arrays of shape (H, W, 3) (RGB, any H, W), `prompt` is the text-to-image
prompt the images were generated for. A `Verdict` carries what the pairwise rule of the
official `nvila_sana_pick.py` needs (REFERENCE.md section 9): `yes`, the score of "yes" and
the score of "no" of the first generated token. Verdicts depend only on the image and the
prompt, never on the opponent, so the tournament (`best_of_n.tournament`) asks the judge
once per candidate.

Backends (heavy dependencies imported lazily, so `import sana_jax` stays JAX-only):

- `NvilaSubprocessJudge`: the NVILA verifier (remote code pinned to transformers 4.46) run
  by `nvila_worker.py` in the verifier's own Python executable; a line protocol over
  stdin/stdout carries base64 PNG bytes and JSON scores. See docs/best_of_n.md.
- `TransformersJudge`: any transformers image-text-to-text model in this environment,
  scored on the logits of the first generated token through the model's chat template.
- `ShapesJudge`: the ShapesEval programmatic evaluator (`sana_jax.eval.shapes.evaluate`).

`make_judge(name, ...)` builds one by name and checks paths before anything is loaded.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import io
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# The official question (tools/inference_scaling/nvila_sana_pick.py), byte for byte:
# no space after "is:", and a trailing newline.
OFFICIAL_QUESTION = (
  "You are an AI assistant specializing in image analysis and ranking. Your task is to "
  "analyze and compare image based on how well they match the given prompt.\n"
  "The given prompt is:{prompt}. Please consider the prompt and the image to make a "
  "decision and response directly with 'yes' or 'no'.\n"
)

JUDGE_NAMES = ("nvila", "transformers", "shapes")


def official_question(prompt: str) -> str:
  """The verifier question for a text-to-image `prompt` (REFERENCE.md section 9)."""
  return OFFICIAL_QUESTION.format(prompt=prompt)


class JudgeError(RuntimeError):
  """A judge failed while judging (crash, timeout, unreadable answer)."""


@dataclasses.dataclass(frozen=True)
class Verdict:
  """One judged image.

  yes: the judge's answer is "yes".
  yes_score: score of "yes" (first-token logit for VLM judges; higher is better).
  no_score: score of "no" (first-token logit for VLM judges; lower is better).
  """

  yes: bool
  yes_score: float
  no_score: float

  def __post_init__(self):
    if not isinstance(self.yes, (bool, np.bool_)):
      raise ValueError(f"Verdict.yes must be a bool, got {type(self.yes).__name__}")
    for name in ("yes_score", "no_score"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise ValueError(f"Verdict.{name} must be a number, got {v!r}")
      if not math.isfinite(float(v)):
        raise ValueError(f"Verdict.{name} must be finite, got {v!r}")
    object.__setattr__(self, "yes", bool(self.yes))
    object.__setattr__(self, "yes_score", float(self.yes_score))
    object.__setattr__(self, "no_score", float(self.no_score))


def check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Validates a batch: a list of uint8 arrays (H, W, 3). Returns it as a list."""
  images = list(images)
  for i, im in enumerate(images):
    if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
      desc = f"{type(im).__name__} {getattr(im, 'dtype', '')} {getattr(im, 'shape', '')}"
      raise ValueError(f"image {i}: expected a uint8 array of shape (H, W, 3), got {desc}")
  return images


def png_bytes(image: np.ndarray) -> bytes:
  """uint8 (H, W, 3) -> PNG file bytes (lossless)."""
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(image, mode="RGB").save(buf, format="PNG")
  return buf.getvalue()


class Judge:
  """Interface: `judge(images, prompt) -> list[Verdict]`, one verdict per image, in order."""

  name = "judge"

  def judge(self, images: Sequence[np.ndarray], prompt: str) -> list[Verdict]:
    raise NotImplementedError

  def close(self) -> None:
    """Releases resources (worker processes, models). Idempotent."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _check_dir(path, what: str) -> Path:
  p = Path(os.path.expanduser(str(path)))
  if not p.is_dir():
    raise ValueError(
      f"{what}: expected an existing folder, got {str(path)!r} (does not exist"
      f"{' or is not a folder' if p.exists() else ''})"
    )
  return p


# --------------------------------------------------------------------------------------
# transformers image-text-to-text judge
# --------------------------------------------------------------------------------------


class TransformersJudge(Judge):
  """Any transformers image-text-to-text model as a yes/no judge.

  For each image the chat `[user: <image>, official_question(prompt)]` goes through the
  processor's chat template (with the generation prompt), and the first generated
  token's raw logits are read (greedy `generate(max_new_tokens=1, output_logits=True)`,
  batched with left padding). yes_score / no_score are the logits of the first token of
  `tokenizer.encode(yes_word)` / `encode(no_word)` (as the official script reads its ids),
  and yes = yes_score > no_score (the answer restricted to the two words).

  model_path: a local folder loadable by AutoProcessor / AutoModelForImageTextToText.
  model, processor: already-built objects instead of loading (model_path then optional).
  """

  name = "transformers"

  def __init__(
    self,
    model_path=None,
    *,
    model=None,
    processor=None,
    device: str | None = None,
    dtype: str = "float32",
    batch_size: int = 8,
    yes_word: str = "yes",
    no_word: str = "no",
    trust_remote_code: bool = False,
  ):
    if (model is None) != (processor is None):
      raise ValueError("pass both model and processor, or neither (then model_path)")
    if model is None:
      if model_path is None:
        raise ValueError("TransformersJudge needs model_path (a local model folder)")
      self.model_path = _check_dir(model_path, "TransformersJudge model_path")
    else:
      self.model_path = model_path
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self._model, self._processor = model, processor
    self.device, self.dtype, self.batch_size = device, dtype, batch_size
    self.yes_word, self.no_word = yes_word, no_word
    self.trust_remote_code = trust_remote_code
    self._ids = None

  def _load(self):
    import torch

    if self._model is None:
      from transformers import AutoModelForImageTextToText, AutoProcessor

      self._processor = AutoProcessor.from_pretrained(
        str(self.model_path), trust_remote_code=self.trust_remote_code
      )
      self._model = AutoModelForImageTextToText.from_pretrained(
        str(self.model_path),
        dtype=getattr(torch, self.dtype),
        trust_remote_code=self.trust_remote_code,
      )
      device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
      self._model.to(device).eval()
    if self._ids is None:
      tok = getattr(self._processor, "tokenizer", self._processor)
      if (
        getattr(self._processor, "chat_template", None) is None
        and getattr(tok, "chat_template", None) is None
      ):
        raise ValueError(f"{self.model_path}: the processor has no chat template")
      ids = []
      for word in (self.yes_word, self.no_word):
        enc = tok.encode(word, add_special_tokens=False)
        if not enc:
          raise ValueError(f"the tokenizer encodes {word!r} to no tokens")
        ids.append(int(enc[0]))
      if ids[0] == ids[1]:
        raise ValueError(
          f"{self.yes_word!r} and {self.no_word!r} start with the same "
          f"token {ids[0]}; pick other answer words"
        )
      tok.padding_side = "left"
      self._ids = tuple(ids)

  def chat_text(self, prompt: str) -> str:
    """The templated text (image placeholder + official question + generation prompt)."""
    self._load()
    messages = [
      {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": official_question(prompt)}],
      }
    ]
    return self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

  def first_token_logits(self, images: Sequence[np.ndarray], prompt: str) -> np.ndarray:
    """float32 (B, vocab): raw logits of the first generated token, per image."""
    import torch
    from PIL import Image

    images = check_images(images)
    text = self.chat_text(prompt)
    out = []
    for s in range(0, len(images), self.batch_size):
      chunk = [Image.fromarray(im, mode="RGB") for im in images[s : s + self.batch_size]]
      inputs = self._processor(
        text=[text] * len(chunk), images=chunk, return_tensors="pt", padding=True
      )
      inputs = inputs.to(self._model.device)
      if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
      with torch.inference_mode():
        gen = self._model.generate(
          **inputs,
          max_new_tokens=1,
          do_sample=False,
          output_logits=True,
          return_dict_in_generate=True,
        )
      out.append(gen.logits[0].float().cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)

  def judge(self, images, prompt):
    logits = self.first_token_logits(images, prompt)
    yes_id, no_id = self._ids or (None, None)
    verdicts = []
    for row in logits:
      y, n = float(row[yes_id]), float(row[no_id])
      verdicts.append(Verdict(yes=y > n, yes_score=y, no_score=n))
    return verdicts

  def close(self):
    if self.model_path is not None:  # loaded here: free it (reloads on the next call)
      self._model = self._processor = None


# --------------------------------------------------------------------------------------
# NVILA verifier in its own Python environment
# --------------------------------------------------------------------------------------

WORKER_PATH = Path(__file__).with_name("nvila_worker.py")
PROTOCOL_VERSION = 1


class NvilaSubprocessJudge(Judge):
  """The NVILA verifier, run by `nvila_worker.py` under another Python executable.

  model_path: local folder of NVILA-Lite-2B-Verifier (config.json + remote code + weights).
  python: the verifier environment's Python executable (e.g. ~/nvila-env/bin/python).
  timeout_s: limit for one request (one batch of images) before the worker is killed.
  load_timeout_s: limit for the worker to import torch and load the model.
  batch_size: images per request.
  worker_args: extra command-line arguments for the worker (e.g. ["--device_map", "cuda"]).

  The worker answers per image {"response", "yes_score", "no_score"}; yes is
  `response == "yes"`, exactly the official comparison. Paths are checked here; the
  worker starts at the first `judge` call (or `start()`) and lives until `close()`.
  """

  name = "nvila"

  def __init__(
    self,
    model_path,
    python,
    *,
    timeout_s: float = 300.0,
    load_timeout_s: float = 1800.0,
    batch_size: int = 16,
    worker_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
  ):
    self.model_path = _check_dir(model_path, "NVILA judge model folder")
    if not (self.model_path / "config.json").is_file():
      raise ValueError(f"NVILA judge model folder {str(self.model_path)!r} has no config.json")
    exe = shutil.which(str(python)) if python is not None else None
    if exe is None:
      raise ValueError(
        f"NVILA judge python: expected the verifier environment's Python "
        f"executable, got {python!r} (not found or not executable)"
      )
    self.python = exe
    if timeout_s <= 0 or load_timeout_s <= 0:
      raise ValueError("timeouts must be > 0")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.timeout_s, self.load_timeout_s = float(timeout_s), float(load_timeout_s)
    self.batch_size = batch_size
    self.worker_args = list(worker_args)
    self.env = dict(env) if env is not None else None
    self._proc = None
    self._lines: queue.Queue | None = None
    self._stderr: collections.deque = collections.deque(maxlen=60)
    self._next_id = 0
    self.info: dict[str, Any] = {}

  # -- process management --------------------------------------------------------------

  def _stderr_tail(self) -> str:
    tail = "".join(self._stderr).strip()
    return tail[-3000:] if tail else "(empty)"

  def _fail(self, what: str, detail: str = "") -> JudgeError:
    code = self._proc.poll() if self._proc is not None else None
    self._kill()
    msg = f"NVILA judge worker ({self.python} {WORKER_PATH.name}, model {self.model_path}): {what}"
    if detail:
      msg += f"\n{detail}"
    if code is not None:
      msg += f"\nworker exit code: {code}"
    msg += f"\nworker stderr (tail):\n{self._stderr_tail()}"
    return JudgeError(msg)

  def start(self) -> None:
    """Starts the worker and waits for it to load the model."""
    if self._proc is not None and self._proc.poll() is None:
      return
    cmd = [self.python, "-u", str(WORKER_PATH), "--model", str(self.model_path), *self.worker_args]
    env = dict(os.environ if self.env is None else self.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    self._stderr.clear()
    # own session: on failure the worker and anything it started are killed together
    self._proc = subprocess.Popen(
      cmd,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      env=env,
      start_new_session=True,
    )
    self._lines = queue.Queue()
    threading.Thread(
      target=_pump_lines, args=(self._proc.stdout, self._lines.put), daemon=True
    ).start()
    threading.Thread(
      target=_pump_lines,
      args=(
        self._proc.stderr,
        lambda b: self._stderr.append(b.decode("utf-8", "replace")) if b is not None else None,
      ),
      daemon=True,
    ).start()
    msg = self._read(self.load_timeout_s, "loading the model")
    if msg.get("ready") is not True or msg.get("protocol") != PROTOCOL_VERSION:
      raise self._fail(
        f"unexpected first message (expected a ready message, protocol {PROTOCOL_VERSION})",
        f"got: {str(msg)[:500]}",
      )
    self.info = msg

  def _kill(self) -> None:
    proc, self._proc = self._proc, None
    if proc is None:
      return
    try:  # the worker's process group (its own session, see start)
      os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover
      pass
    try:  # stdout / stderr are closed by their reader threads at end of file
      proc.stdin.close()
    except Exception:  # noqa: BLE001
      pass

  def close(self) -> None:
    proc = self._proc
    if proc is not None and proc.poll() is None:
      try:
        proc.stdin.write(b'{"op": "shutdown"}\n')
        proc.stdin.flush()
        proc.wait(timeout=10)
      except Exception:  # noqa: BLE001
        pass
    self._kill()

  def __del__(self):
    try:
      self._kill()
    except Exception:  # noqa: BLE001
      pass

  # -- protocol ------------------------------------------------------------------------

  def _read(self, timeout: float, doing: str) -> dict:
    deadline = time.monotonic() + timeout
    try:
      line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
      raise self._fail(f"no answer within {timeout:g} s while {doing} (killed; hung?)") from None
    if line is None:  # EOF: the worker died
      try:
        self._proc.wait(timeout=5)
      except Exception:  # noqa: BLE001
        pass
      time.sleep(0.2)  # let the stderr pump drain
      raise self._fail(f"the worker exited (crashed) while {doing}")
    try:
      msg = json.loads(line)
      if not isinstance(msg, dict):
        raise ValueError("not a JSON object")
    except ValueError as e:
      raise self._fail(
        f"unreadable answer while {doing} ({e})", f"got line: {line[:300]!r}"
      ) from None
    return msg

  def _request(self, images: list[np.ndarray], question: str) -> list[dict]:
    rid = self._next_id
    self._next_id += 1
    req = {
      "id": rid,
      "question": question,
      "images": [base64.b64encode(png_bytes(im)).decode("ascii") for im in images],
    }
    try:
      self._proc.stdin.write(json.dumps(req).encode("utf-8") + b"\n")
      self._proc.stdin.flush()
    except (BrokenPipeError, OSError, ValueError):
      time.sleep(0.2)
      raise self._fail("could not send a request (the worker is gone)") from None
    msg = self._read(self.timeout_s, f"judging {len(images)} image(s)")
    if "error" in msg and msg.get("id") == rid:  # the worker is fine: keep it
      raise JudgeError(
        f"NVILA judge worker (model {self.model_path}) reported an error:\n"
        f"{str(msg['error'])[-3000:]}"
      )
    results = msg.get("results")
    if msg.get("id") != rid or not isinstance(results, list) or len(results) != len(images):
      raise self._fail(
        "malformed answer",
        f"expected id {rid} with {len(images)} results, got: {json.dumps(msg)[:500]}",
      )
    return results

  def judge(self, images, prompt):
    images = check_images(images)
    if not images:
      return []
    self.start()
    question = official_question(prompt)
    verdicts = []
    for s in range(0, len(images), self.batch_size):
      for r in self._request(images[s : s + self.batch_size], question):
        try:
          response = r["response"]
          if not isinstance(response, str):
            raise ValueError(f"response must be a string, got {response!r}")
          verdicts.append(
            Verdict(yes=response == "yes", yes_score=r["yes_score"], no_score=r["no_score"])
          )
        except (KeyError, TypeError, ValueError) as e:
          raise self._fail("malformed result", f"{e}; got: {str(r)[:300]}") from None
    return verdicts


def _pump_lines(stream, put: Callable[[Any], None]) -> None:
  """Reads `stream` line by line into `put` (decoded for stdout), then puts None at EOF."""
  try:
    for raw in iter(stream.readline, b""):
      put(raw)
  except (OSError, ValueError):
    pass
  finally:
    put(None)
    try:
      stream.close()
    except Exception:  # noqa: BLE001
      pass


# --------------------------------------------------------------------------------------
# ShapesEval programmatic judge
# --------------------------------------------------------------------------------------


class ShapesJudge(Judge):
  """The ShapesEval evaluator as a judge: yes = result.correct, yes_score = result.score,
  no_score = 1 - result.score (score in [0, 1]).

  spec: the ShapesEval specification used for every prompt, or
  specs: a mapping prompt -> specification, or a callable prompt -> specification.
  evaluate: the evaluator (defaults to `sana_jax.eval.shapes.evaluate`, imported lazily).
  """

  name = "shapes"

  def __init__(
    self, spec=None, *, specs: Mapping | Callable | None = None, evaluate: Callable | None = None
  ):
    if (spec is None) == (specs is None):
      raise ValueError("ShapesJudge needs exactly one of spec or specs")
    self._spec, self._specs, self._evaluate = spec, specs, evaluate

  def _spec_for(self, prompt):
    if self._spec is not None:
      return self._spec
    if callable(self._specs):
      return self._specs(prompt)
    if prompt not in self._specs:
      raise ValueError(f"ShapesJudge: no specification for prompt {prompt!r}")
    return self._specs[prompt]

  def judge(self, images, prompt):
    images = check_images(images)
    evaluate = self._evaluate
    if evaluate is None:
      try:
        from sana_jax.shapes_eval.evaluator import evaluate
      except ImportError as e:
        raise ImportError(
          "ShapesJudge needs sana_jax.eval.shapes.evaluate "
          f"(ShapesEval), which could not be imported: {e}"
        ) from e
    spec = self._spec_for(prompt)
    out = []
    for im in images:
      res = evaluate(im, spec)
      score = float(res.score)
      if not 0.0 <= score <= 1.0:
        raise ValueError(f"ShapesEval score must be in [0, 1], got {score}")
      out.append(Verdict(yes=bool(res.correct), yes_score=score, no_score=1.0 - score))
    return out


# --------------------------------------------------------------------------------------


def make_judge(name: str, *, path=None, python=None, spec=None, **kwargs) -> Judge:
  """Builds a judge by name, checking its paths now (before any sampling).

  name: "nvila" (needs path and python), "transformers" (needs path) or "shapes"
    (needs spec: a ShapesEval specification, or specs=... in kwargs).
  """
  if name not in JUDGE_NAMES:
    raise ValueError(f"unknown judge {name!r}; expected one of {', '.join(JUDGE_NAMES)}")
  if name == "nvila":
    if path is None or python is None:
      raise ValueError(
        "the nvila judge needs path (the verifier folder) and python "
        "(the verifier environment's Python executable)"
      )
    return NvilaSubprocessJudge(path, python, **kwargs)
  if name == "transformers":
    if path is None:
      raise ValueError("the transformers judge needs path (a local model folder)")
    return TransformersJudge(path, **kwargs)
  return ShapesJudge(spec, **kwargs)


__all__ = [
  "JUDGE_NAMES",
  "Judge",
  "JudgeError",
  "NvilaSubprocessJudge",
  "OFFICIAL_QUESTION",
  "ShapesJudge",
  "TransformersJudge",
  "Verdict",
  "check_images",
  "make_judge",
  "official_question",
  "png_bytes",
]
