"""One process of a multi-process CPU training run (tests/test_multiprocess.py).

  python tests/multiprocess_worker.py --reads FILE [--stall_batch N] -- TRAIN.PY ARGS...

runs `train.main(TRAIN.PY ARGS)`, the real command, in a process the parent started with
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID / JAX_NUM_CPU_DEVICES set (so
train.py joins jax.distributed itself). Test instruments only: --reads appends one JSON
line per global batch this process reads ({"batch": index, "texts": [...]}, the records'
"text" field), --stall_batch makes reading that global batch wait 60 s (so the parent can
kill the run at a known point after a checkpoint).
"""

import argparse
import json
import pathlib
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
  argv = sys.argv[1:]
  split = argv.index("--")
  ap = argparse.ArgumentParser()
  ap.add_argument("--reads", required=True)
  ap.add_argument("--stall_batch", type=int, default=-1)
  args = ap.parse_args(argv[:split])

  import jax

  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  from sana_jax.data import input_pipeline

  original = input_pipeline.BatchPlanSource.__getitem__
  lock = threading.Lock()

  def recording(self, index):
    index = int(index)
    if index == args.stall_batch:
      time.sleep(60)
    split_name, idx = self.record_indices(index)
    src = self._sources[split_name]  # pylint: disable=protected-access
    texts = [bytes(src[int(i)]["text"]).decode() for i in idx[self.rows[0] : self.rows[1]]]
    with lock, open(args.reads, "a") as f:
      f.write(json.dumps({"batch": index, "rows": list(self.rows), "texts": texts}) + "\n")
    return original(self, index)

  input_pipeline.BatchPlanSource.__getitem__ = recording
  sys.argv = [str(REPO / "train.py"), *argv[split + 1 :]]
  import train

  return train.main(argv[split + 1 :])


if __name__ == "__main__":
  sys.exit(main())
