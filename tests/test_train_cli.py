"""train.py's command-line contract: bad input -> `error: ...`, exit 2, nothing written;
what it prints; its exit status after a SIGTERM save.

Refusals run `train.main(argv)` in this process (they end before any compile); one
subprocess case proves the real entry point, one the SIGTERM exit status.
"""

import contextlib
import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import train
from sana_jax.configs import tiny
from sana_jax.models import dit
from sana_jax.models.dit_config import DiTConfig
from tests import cli_contract, train_fixtures
from tests.cli_contract import assert_refused, assert_unchanged, run_command, snapshot

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/tiny.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return train_fixtures.write_tiny_dataset(tmp_path_factory.mktemp("data"))


def _main(argv, capsys) -> subprocess.CompletedProcess:
  """train.main(argv) in-process (tests.cli_contract.call_main)."""
  return cli_contract.call_main(train.main, argv, capsys)


def _other_depth_folder(root: pathlib.Path) -> str:
  from sana_jax.weights import dit as dit_weights
  import jax
  import numpy as np

  cfg = DiTConfig.coerce(tiny.get_config().model).replace(depth=2)
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), dit.abstract_params(cfg))
  dit_weights.save_flax(root / "depth2", params, cfg)
  return str(root / "depth2")


def _fake_checkpoint(workdir: pathlib.Path, data_dir: str) -> None:
  """A workdir whose checkpoint at step 5 was written by the tiny config (depth 3): what
  the resume check reads (the saved config), without training."""
  config = tiny.get_config()
  config.data.dir = data_dir
  meta = workdir / "checkpoints" / "5" / "config" / "metadata"
  meta.parent.mkdir(parents=True)
  meta.write_text(json.dumps(config.to_dict()))


def _case(tmp, data_dir, name):
  """(argv, fragments the error must name) for each bad input."""
  wd = str(tmp / "run")
  base = ["--config", CONFIG, "--workdir", wd, f"--config.data.dir={data_dir}", "--no_progress"]
  if name == "no_config":
    return ["--workdir", wd], ["--config"]
  if name == "no_workdir":
    return ["--config", CONFIG], ["--workdir"]
  if name == "unknown_flag":
    return base + ["--bogus"], ["--bogus"]
  if name == "missing_config_file":
    return ["--config", str(tmp / "nowhere.py"), "--workdir", wd], ["nowhere.py"]
  if name == "config_not_python":
    (tmp / "c.json").write_text("{}")
    return ["--config", str(tmp / "c.json"), "--workdir", wd], ["c.json", "Python file"]
  if name == "config_without_get_config":
    (tmp / "c.py").write_text("x = 1\n")
    return ["--config", str(tmp / "c.py"), "--workdir", wd], ["c.py", "get_config"]
  if name == "config_with_syntax_error":
    (tmp / "c.py").write_text("def get_config(:\n")
    return ["--config", str(tmp / "c.py"), "--workdir", wd], ["c.py", "SyntaxError"]
  if name == "unknown_override":
    return base + ["--config.model.depht=4"], ["model.depht", "depth"]
  if name == "unknown_section":
    return base + ["--config.trian.steps=4"], ["trian.steps"]
  if name == "override_without_value":
    return base + ["--config.train.steps"], ["train.steps", "FIELD=VALUE"]
  if name == "override_of_a_section":
    return base + ["--config.train=3"], ["train", "section"]
  if name == "bad_int":
    return base + ["--config.train.steps=abc"], ["train.steps", "int", "abc"]
  if name == "bad_float":
    return base + ["--config.train.lr=fast"], ["train.lr", "float", "fast"]
  if name == "bad_bool":
    return base + ["--config.train.async_checkpoints=3"], ["train.async_checkpoints", "bool"]
  if name == "bool_for_int":
    return base + ["--config.train.steps=True"], ["train.steps", "True"]
  if name == "mesh_not_dividing":
    return base + ["--config.mesh.fsdp=3"], ["do not divide", "fsdp"]
  if name == "mesh_too_many_devices":
    return base + ["--config.mesh.num_devices=99"], ["mesh.num_devices=99"]
  if name == "mesh_zero_axis":
    return base + ["--config.mesh.data=0"], ["mesh", "positive"]
  if name == "mesh_product_wrong":
    return base + ["--config.mesh.data=2", "--config.mesh.fsdp=2"], ["mesh", "8"]
  if name == "batch_not_divisible":
    return base + ["--config.train.global_batch=4"], ["train.global_batch=4", "data*fsdp"]
  if name == "zero_steps":
    return base + ["--config.train.steps=0"], ["train.steps=0"]
  if name == "zero_log_every":
    return base + ["--config.train.log_every=0"], ["train.log_every=0"]
  if name == "zero_checkpoint_every":
    return base + ["--config.train.checkpoint_every=0"], ["train.checkpoint_every=0"]
  if name == "ema_decay_above_1":
    return base + ["--config.train.ema_decay=1.5"], ["train.ema_decay=1.5"]
  if name == "unknown_optimizer":
    return base + ["--config.train.optimizer=sgd"], ["train.optimizer", "sgd"]
  if name == "unknown_timestep_sampler":
    return base + ["--config.train.timestep_sampler=cosine"], [
      "train.timestep_sampler",
      "cosine",
      "logit_normal",
    ]
  if name == "max_steps_zero":
    return base + ["--max_steps", "0"], ["--max_steps", "0"]
  if name == "max_steps_not_int":
    return base + ["--max_steps", "x"], ["--max_steps", "'x'"]
  if name == "no_data_dir":
    return base[:4] + ["--no_progress"], ["data.dir"]
  if name == "missing_dataset":
    return base + [f"--config.data.dir={tmp / 'nodata'}"], ["nodata"]
  if name == "not_a_dataset":
    (tmp / "empty").mkdir()
    return base + [f"--config.data.dir={tmp / 'empty'}"], ["empty", "latent dataset"]
  if name == "batch_larger_than_dataset":
    return base + ["--config.train.global_batch=16"], ["train.global_batch=16", "full"]
  if name == "too_few_epochs":
    return base + ["--config.data.num_epochs=1", "--config.train.steps=5"], [
      "train.steps=5",
      "data.num_epochs",
    ]
  if name == "channels_mismatch":
    return base + ["--config.model.in_channels=3"], ["model.in_channels=3"]
  if name == "workdir_is_a_file":
    (tmp / "run").write_text("not a folder")
    return base, ["--workdir", "not a directory"]
  if name == "init_from_other_depth":
    return base + [f"--config.train.init_from={_other_depth_folder(tmp)}"], [
      "train.init_from",
      "model.depth: 2 -> 3",
    ]
  if name == "init_from_not_a_model":
    return base + [f"--config.train.init_from={tmp / 'nothing'}"], ["train.init_from", "nothing"]
  if name == "resume_with_other_depth":
    _fake_checkpoint(tmp / "run", data_dir)
    return base + ["--config.model.depth=4"], [
      "step 5",
      "model.depth: 3 -> 4",
      "Nothing was changed",
    ]
  if name == "resume_with_other_optimizer":
    _fake_checkpoint(tmp / "run", data_dir)
    return base + ["--config.train.optimizer=adamw"], ["train.optimizer: 'came_8bit' -> 'adamw'"]
  raise KeyError(name)


CASES = [
  "no_config",
  "no_workdir",
  "unknown_flag",
  "missing_config_file",
  "config_not_python",
  "config_without_get_config",
  "config_with_syntax_error",
  "unknown_override",
  "unknown_section",
  "override_without_value",
  "override_of_a_section",
  "bad_int",
  "bad_float",
  "bad_bool",
  "bool_for_int",
  "mesh_not_dividing",
  "mesh_too_many_devices",
  "mesh_zero_axis",
  "mesh_product_wrong",
  "batch_not_divisible",
  "zero_steps",
  "zero_log_every",
  "zero_checkpoint_every",
  "ema_decay_above_1",
  "unknown_optimizer",
  "unknown_timestep_sampler",
  "max_steps_zero",
  "max_steps_not_int",
  "no_data_dir",
  "missing_dataset",
  "not_a_dataset",
  "batch_larger_than_dataset",
  "too_few_epochs",
  "channels_mismatch",
  "workdir_is_a_file",
  "init_from_other_depth",
  "init_from_not_a_model",
  "resume_with_other_depth",
  "resume_with_other_optimizer",
]


@pytest.mark.contract
@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_refused_and_nothing_is_written(name, data_dir, tmp_path, capsys):
  argv, fragments = _case(tmp_path, data_dir, name)
  before = snapshot(tmp_path, data_dir)
  result = _main(argv, capsys)
  assert_refused(result, *fragments, max_seconds=30)
  assert_unchanged(before)  # in particular: no empty workdir or checkpoints/ left behind


@pytest.mark.contract
def test_real_entry_point_refuses(data_dir, tmp_path):
  """issue 16: init_from a folder of another depth left an empty checkpoints/ behind."""
  folder = _other_depth_folder(tmp_path)
  before = snapshot(tmp_path)
  result = run_command(
    [
      "train.py",
      "--config",
      CONFIG,
      "--workdir",
      str(tmp_path / "run"),
      f"--config.data.dir={data_dir}",
      f"--config.train.init_from={folder}",
    ]
  )
  assert_refused(result, "train.init_from", "depth")
  assert_unchanged(before)
  assert "model.depth: 2 -> 3" in result.stderr


def test_every_option_has_help_with_its_default():
  for action in train._parser()._actions:  # pylint: disable=protected-access
    if action.dest == "help":
      continue
    assert action.help and "default" in action.help, action.option_strings


def test_sigterm_saves_says_so_and_exits_143(data_dir, tmp_path):
  """Prints what it starts; on SIGTERM saves at the next step, says where, exits 143 (what
  a scheduler requeues); the saved step is below train.steps."""
  wd = tmp_path / "run"
  cmd = [
    sys.executable,
    str(REPO / "train.py"),
    "--config",
    CONFIG,
    "--workdir",
    str(wd),
    f"--config.data.dir={data_dir}",
    "--config.train.steps=1000",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=1000",
    "--config.mesh.num_devices=1",
    "--config.mesh.data=1",
    "--no_progress",
  ]
  proc = subprocess.Popen(
    cmd,
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    stdin=subprocess.DEVNULL,
  )
  with contextlib.ExitStack() as stack:
    stack.callback(lambda: proc.poll() is None and proc.kill())
    deadline = time.time() + 400
    metrics = wd / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
      assert proc.poll() is None and time.time() < deadline, proc.communicate()
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
  assert proc.returncode == train.EXIT_PREEMPTED == 143, err[-3000:]
  lines = out.splitlines()
  assert lines[0].startswith("train.py: config ") and "tiny.py" in lines[0]
  assert lines[1].startswith("train: tiny") and "1 cpu devices" in lines[1]
  assert "'data': 1, 'fsdp': 1, 'tensor': 1" in lines[1] and str(wd) in lines[1]
  assert lines[2] == "starting from step 0 (no checkpoint in the workdir)"
  saved = [l for l in lines if l.startswith("SIGTERM: saved a checkpoint at step ")]
  assert saved, out
  step = int(saved[0].split("step ")[1].split()[0])
  assert 1 <= step < 1000
  from sana_jax.train import checkpoint

  assert checkpoint.saved_steps(wd) == [step]
  assert lines[-1].startswith(f"stopped at step {step}: checkpoints {wd / 'checkpoints'}")
  assert "metrics.jsonl" in lines[-1] and "tensorboard" in lines[-1]
