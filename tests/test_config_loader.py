"""sana_jax.config_loader: config files, packaged config names, and typed overrides."""

import pathlib

import pytest

from sana_jax import config_loader

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", config_loader.packaged_config_names())
def test_the_checkout_file_and_the_packaged_name_give_the_same_config(name):
  by_file = config_loader.load_config(str(REPO / "configs" / f"{name}.py"))
  by_name = config_loader.load_config(name)
  assert by_file.to_dict() == by_name.to_dict()


def test_every_packaged_config_has_a_checkout_file_and_no_more():
  checkout = {p.stem for p in (REPO / "configs").glob("*.py")} - {"__init__", "common"}
  assert checkout == set(config_loader.packaged_config_names())


def test_an_unknown_name_is_refused_with_the_known_ones():
  with pytest.raises(FileNotFoundError, match=r"'tinny'.*packaged: .*shapes.*tiny"):
    config_loader.load_config("tinny")


def test_a_missing_file_is_refused_by_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such config file"):
    config_loader.load_config(str(tmp_path / "nope.py"))


def test_overrides_keep_the_field_type():
  c = config_loader.load_config("tiny", ["model.depth=3", "train.lr=1"])
  assert c.model.depth == 3 and isinstance(c.train.lr, float)
  with pytest.raises(ValueError, match="model.depth is a int"):
    config_loader.load_config("tiny", ["model.depth=three"])
  with pytest.raises(ValueError, match="unknown config field 'model.dpth'"):
    config_loader.load_config("tiny", ["model.dpth=3"])


def test_a_user_config_in_a_checkout_style_folder_still_imports_configs_common(tmp_path):
  """Configs written against a checkout do `from configs import common`; configs/common.py
  re-exports sana_jax.configs.common."""
  (tmp_path / "mine.py").write_text(
    "from configs import common\n\n"
    "def get_config():\n"
    "  model = common.dit(depth=2)\n"
    "  return common.base_config(model, flow_shift=3.0, name='mine', image_size=256)\n"
  )
  import configs.common  # noqa: F401  (the checkout's thin module)

  c = config_loader.load_config(str(tmp_path / "mine.py"))
  assert c.model.depth == 2
