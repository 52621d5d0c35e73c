#!/usr/bin/env python
"""NVILA verifier worker: runs in the verifier's own Python environment, not in sana_jax's.

Started by `sana_jax.scaling.judges.NvilaSubprocessJudge` as
`<verifier python> nvila_worker.py --model FOLDER [--device_map auto]`. It imports only the
standard library, torch, transformers and PIL (never sana_jax), so it runs under the
verifier's pinned transformers (4.46) and its extra packages.

It loads FOLDER with `AutoModel.from_pretrained(FOLDER, trust_remote_code=True)`, reads the
ids of "yes" and "no" as the official `nvila_sana_pick.py` does
(`model.tokenizer.encode(word, add_special_tokens=False)[0]`), and judges each image with
`model.generate_content([PIL image, question])`, which for the Verifier's remote code returns
`(response, scores)`, `scores[0]` being the first generated token's scores, shape (1, vocab).

Line protocol (one JSON object per line, UTF-8):
  worker -> {"ready": true, "protocol": 1, "yes_id": int, "no_id": int, "model_class": str}
  judge  -> {"id": int, "question": str, "images": [base64 PNG bytes, ...]}
  worker -> {"id": int, "results": [{"response": str, "yes_score": float,
                                     "no_score": float}, ...]}
         or {"id": int, "error": str}                (the worker stays alive)
  judge  -> {"op": "shutdown"}  or end of input       (the worker exits 0)
The protocol channel is a private copy of the original stdout; file descriptor 1 is pointed
at stderr, so anything the model or libraries print cannot corrupt the channel.
"""

import argparse
import base64
import io
import json
import os
import sys
import traceback

PROTOCOL_VERSION = 1


def _protocol_channel():
  """Returns a text stream on the original stdout; fd 1 becomes a copy of stderr."""
  sys.stdout.flush()
  fd = os.dup(1)
  os.dup2(2, 1)
  return os.fdopen(fd, "w", encoding="utf-8", buffering=1)


def _send(chan, msg):
  chan.write(json.dumps(msg) + "\n")
  chan.flush()


def load(model_path, device_map):
  """Loads the verifier; returns (model, yes_id, no_id)."""
  from transformers import AutoModel

  kwargs = {"trust_remote_code": True}
  if device_map:
    kwargs["device_map"] = device_map
  model = AutoModel.from_pretrained(model_path, **kwargs)
  tok = getattr(model, "tokenizer", None)
  if tok is None:
    raise TypeError(f"{type(model).__name__} has no .tokenizer; expected the NVILA remote code")
  if not callable(getattr(model, "generate_content", None)):
    raise TypeError(
      f"{type(model).__name__} has no generate_content(); expected the NVILA remote code"
    )
  yes_id = int(tok.encode("yes", add_special_tokens=False)[0])
  no_id = int(tok.encode("no", add_special_tokens=False)[0])
  return model, yes_id, no_id


def judge_one(model, yes_id, no_id, image, question):
  """One image -> {"response", "yes_score", "no_score"} from the first token's scores."""
  out = model.generate_content([image, question])
  if not (isinstance(out, (tuple, list)) and len(out) == 2):
    raise TypeError(
      f"generate_content returned {type(out).__name__}; expected (response, "
      "scores) as the NVILA-Lite-2B-Verifier remote code returns"
    )
  response, scores = out
  try:
    first = scores[0]
    if tuple(first.shape[:1]) != (1,):
      raise ValueError(f"scores[0] has shape {tuple(first.shape)}, expected (1, vocab)")
    yes_score, no_score = float(first[0, yes_id]), float(first[0, no_id])
  except (IndexError, TypeError, AttributeError) as e:
    raise TypeError(
      f"generate_content scores: expected scores[0] of shape (1, vocab), "
      f"got {type(scores).__name__} ({e})"
    ) from e
  return {"response": str(response), "yes_score": yes_score, "no_score": no_score}


def serve(model, yes_id, no_id, lines, chan):
  """Answers requests from `lines` on `chan` until shutdown or end of input."""
  from PIL import Image

  for line in lines:
    line = line.strip()
    if not line:
      continue
    rid = None
    try:
      req = json.loads(line)
      if req.get("op") == "shutdown":
        return
      rid = req["id"]
      results = []
      for b64 in req["images"]:
        image = Image.open(io.BytesIO(base64.b64decode(b64)))
        image.load()
        results.append(judge_one(model, yes_id, no_id, image.convert("RGB"), req["question"]))
      _send(chan, {"id": rid, "results": results})
    except Exception:  # noqa: BLE001  (report and keep serving)
      _send(chan, {"id": rid, "error": traceback.format_exc()})


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", required=True, help="local NVILA verifier folder")
  ap.add_argument(
    "--device_map",
    default=None,
    help="from_pretrained device_map (default: 'auto' when CUDA is available)",
  )
  args = ap.parse_args(argv)
  chan = _protocol_channel()
  import torch

  device_map = args.device_map
  if device_map is None and torch.cuda.is_available():
    device_map = "auto"
  if device_map == "none":
    device_map = None
  model, yes_id, no_id = load(args.model, device_map)
  _send(
    chan,
    {
      "ready": True,
      "protocol": PROTOCOL_VERSION,
      "yes_id": yes_id,
      "no_id": no_id,
      "model_class": type(model).__name__,
    },
  )
  serve(model, yes_id, no_id, sys.stdin, chan)
  return 0


if __name__ == "__main__":
  sys.exit(main())
