"""Tests for YAML config loading (dreamr_jax.config): presets, inheritance, overrides, errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from dreamr_jax.config import (
    Config,
    ConfigError,
    ModelConfig,
    TextConfig,
    config_to_dict,
    load_config,
    save_config,
)
from dreamr_jax.config.schema import ServeConfig

MODELS_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
TINY = MODELS_DIR / "tiny.yaml"
PRESETS = ["tiny", "qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b", "qwen3_vl_32b"]

# (text hidden, intermediate, layers, heads, kv heads, tie,
#  vision depth, hidden, intermediate, out_hidden, deepstack) per Hugging Face config.json.
QWEN_DIMS = {
    "qwen3_vl_2b": (2048, 6144, 28, 16, 8, True, 24, 1024, 4096, 2048, (5, 11, 17)),
    "qwen3_vl_4b": (2560, 9728, 36, 32, 8, True, 24, 1024, 4096, 2560, (5, 11, 17)),
    "qwen3_vl_8b": (4096, 12288, 36, 32, 8, False, 27, 1152, 4304, 4096, (8, 16, 24)),
    "qwen3_vl_32b": (5120, 25600, 64, 64, 8, False, 27, 1152, 4304, 5120, (8, 16, 24)),
}


def write_yaml(path: Path, data: dict) -> Path:
    """Write `data` to `path` (creating folders) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_tiny(*overrides: str) -> Config:
    return load_config(str(TINY), overrides)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_validates(name):
    cfg = load_config(str(MODELS_DIR / f"{name}.yaml"))
    assert isinstance(cfg, Config)
    cfg.validate()


@pytest.mark.parametrize("name", sorted(QWEN_DIMS))
def test_qwen_preset_dimensions(name):
    m = load_config(str(MODELS_DIR / f"{name}.yaml")).model
    t, v = m.text, m.vision
    got = (
        t.hidden_size,
        t.intermediate_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_key_value_heads,
        m.tie_word_embeddings,
        v.depth,
        v.hidden_size,
        v.intermediate_size,
        v.out_hidden_size,
        v.deepstack_visual_indexes,
    )
    assert got == QWEN_DIMS[name]
    # Keys shared through qwen3_vl_base.yaml.
    assert (t.vocab_size, t.head_dim, t.rms_norm_eps) == (151936, 128, 1e-6)
    assert (t.rope_theta, t.mrope_section, t.max_position_embeddings) == (5e6, (24, 20, 20), 262144)
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size) == (16, 2, 2)
    assert (v.num_position_embeddings, v.num_heads, v.hidden_act) == (2304, 16, "gelu_pytorch_tanh")
    assert (m.image_token_id, m.video_token_id) == (151655, 151656)
    assert (m.vision_start_token_id, m.vision_end_token_id) == (151652, 151653)
    assert (m.eos_token_ids, m.pad_token_id) == ((151645, 151643), 151643)


def test_tiny_preset_is_small():
    t, v = load_tiny().model.text, load_tiny().model.vision
    text_params = t.vocab_size * t.hidden_size * 2 + t.num_hidden_layers * (
        2 * t.hidden_size * t.num_attention_heads * t.head_dim
        + 2 * t.hidden_size * t.num_key_value_heads * t.head_dim
        + 3 * t.hidden_size * t.intermediate_size
    )
    vision_params = v.patch_dim * v.hidden_size + v.depth * (
        4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    )
    assert text_params + vision_params < 1_000_000


def test_types_are_converted():
    cfg = load_tiny()
    assert isinstance(cfg.model.text.rope_theta, float)
    assert isinstance(cfg.model.text.mrope_section, tuple)
    assert isinstance(cfg.model.eos_token_ids, tuple)


# ---------------------------------------------------------------------------------------------
# Inheritance and overrides
# ---------------------------------------------------------------------------------------------


def test_no_path_means_defaults_plus_overrides():
    # The schema's default special tokens lie outside its default 512-token vocabulary.
    cfg = load_config(None, ["model.text.vocab_size=151936", "seed=3"])
    assert cfg == Config(model=ModelConfig(text=TextConfig(vocab_size=151936)), seed=3)


def test_defaults_validate_and_bad_token_id_is_reported():
    assert load_config(None) == Config()
    with pytest.raises(ConfigError, match="model.image_token_id"):
        load_config(None, ["model.image_token_id=151655"])


def test_base_config_inheritance_and_precedence(tmp_path, monkeypatch):
    write_yaml(
        tmp_path / "bases" / "base.yaml",
        {
            "base_config": str(TINY),  # absolute paths work too
            "seed": 1,
            "dtype": "bfloat16",
            "model": {"text": {"num_hidden_layers": 3, "intermediate_size": 256}},
        },
    )
    child = write_yaml(
        tmp_path / "child.yaml",
        {
            "base_config": "bases/base.yaml",
            "seed": 2,
            "model": {"text": {"num_hidden_layers": 5}},
        },
    )
    # base_config resolves against the file naming it, not the working directory.
    monkeypatch.chdir(MODELS_DIR)
    cfg = load_config(str(child), ["seed=7"])
    assert cfg.seed == 7  # override beats child
    assert cfg.model.text.num_hidden_layers == 5  # child beats base
    assert cfg.model.text.intermediate_size == 256  # siblings in base survive (deep merge)
    assert cfg.dtype == "bfloat16"  # base beats tiny.yaml / defaults
    assert cfg.model.text.vocab_size == 512  # from tiny.yaml, two levels up
    assert cfg.model.image_token_id == 508


def test_a_list_of_bases_applies_in_order(tmp_path):
    """A model preset, then a judge format, then the run's keys: later bases beat earlier ones,
    the file beats them all, and an error names the base that set the bad value."""
    write_yaml(tmp_path / "judge.yaml", {"seed": 3, "prompt": {"positive_words": ["Yes"]}})
    write_yaml(tmp_path / "run.yaml", {"seed": 4, "dtype": "bfloat16"})
    pair = write_yaml(
        tmp_path / "pair.yaml",
        {"base_config": [str(TINY), "judge.yaml", "run.yaml"], "dtype": "float16"},
    )
    cfg = load_config(str(pair))
    assert cfg.model.text.vocab_size == 512  # the first base
    assert cfg.prompt.positive_words == ("Yes",) and cfg.seed == 4  # run.yaml beats judge.yaml
    assert cfg.dtype == "float16"  # the file beats its bases
    write_yaml(tmp_path / "run.yaml", {"mesh": {"fsdp": 0}})
    with pytest.raises(ConfigError, match=r"mesh\.fsdp: .*\(value from .*run\.yaml\)"):
        load_config(str(pair))
    write_yaml(tmp_path / "bad.yaml", {"base_config": ["judge.yaml", 3]})
    with pytest.raises(ConfigError, match="base_config: expected a path"):
        load_config(str(tmp_path / "bad.yaml"))


def test_later_override_wins():
    cfg = load_tiny("mesh.fsdp=2", "mesh.fsdp=4", "model.vision.deepstack_visual_indexes=[0,1]")
    assert cfg.mesh.fsdp == 4
    assert cfg.model.vision.deepstack_visual_indexes == (0, 1)


def test_override_values_are_parsed_as_yaml():
    cfg = load_tiny(
        "model.tie_word_embeddings=true",
        "model.text.rope_theta=10000",  # int accepted for a float field
        "model.text.rms_norm_eps=1e-5",  # YAML 1.1 reads this as a string; still a float
        "output_dir=runs/a b",
        "dtype=bfloat16",
    )
    assert cfg.model.tie_word_embeddings is True
    assert cfg.model.text.rope_theta == 10000.0 and isinstance(cfg.model.text.rope_theta, float)
    assert cfg.model.text.rms_norm_eps == 1e-5
    assert cfg.output_dir == "runs/a b"
    assert cfg.dtype == "bfloat16"


def test_override_can_set_a_whole_section_as_a_mapping():
    cfg = load_tiny("mesh={data: 2, fsdp: 1}")
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (2, 1, 1)


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load_config(str(path), ["model.text.vocab_size=151936"]).seed == 0


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_unknown_key_in_file_names_key_file_and_valid_keys(tmp_path):
    path = write_yaml(
        tmp_path / "bad.yaml", {"base_config": str(TINY), "model": {"text": {"num_layers": 4}}}
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert "model.text.num_layers" in message
    assert "bad.yaml" in message
    assert "num_hidden_layers" in message  # the valid keys at that level are listed


def test_unknown_key_in_base_file_names_the_base(tmp_path):
    write_yaml(tmp_path / "base.yaml", {"model": {"vision": {"depht": 2}}})
    child = write_yaml(tmp_path / "child.yaml", {"base_config": "base.yaml", "seed": 1})
    with pytest.raises(ConfigError, match=r"base\.yaml.*model\.vision\.depht"):
        load_config(str(child))


def test_unknown_top_level_key_in_file(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"sede": 1})
    with pytest.raises(ConfigError, match=r"bad\.yaml: sede: unknown key.*seed"):
        load_config(str(path))


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.vision.dept=3", "model.vision.dept"),
        ("model.txt.num_hidden_layers=3", "model.txt.num_hidden_layers"),
        ("nonsense=1", "nonsense"),
    ],
)
def test_unknown_key_in_override(override, key):
    with pytest.raises(ConfigError) as info:
        load_tiny(override)
    assert key in str(info.value)
    assert "command line" in str(info.value)


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("model.text.num_hidden_layers=abc", "model.text.num_hidden_layers", "int"),
        ("seed=1.5", "seed", "int"),
        ("seed=true", "seed", "int"),
        ("model.tie_word_embeddings='yes'", "model.tie_word_embeddings", "bool"),
        ("model.tie_word_embeddings=1", "model.tie_word_embeddings", "bool"),
        ("model.text.attention_bias=maybe", "model.text.attention_bias", "bool"),
        ("model.text.rms_norm_eps=tiny", "model.text.rms_norm_eps", "float"),
        ("dtype=16", "dtype", "str"),
        ("model.eos_token_ids=5", "model.eos_token_ids", "tuple[int, ...]"),
        ("model.vision.deepstack_visual_indexes=[0, x]", "deepstack_visual_indexes[1]", "int"),
        ("model.text=5", "model.text", "TextConfig"),
        ("model.text.head_dim=null", "model.text.head_dim", "int"),
    ],
)
def test_wrong_type_in_override(override, key, expected):
    with pytest.raises(ConfigError) as info:
        load_tiny(override)
    message = str(info.value)
    assert key in message
    assert expected in message
    assert "command line" in message


def test_wrong_type_in_file_names_file_and_value(tmp_path):
    path = write_yaml(tmp_path / "typo.yaml", {"mesh": {"fsdp": "two"}})
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert "typo.yaml" in message and "mesh.fsdp" in message
    assert "int" in message and "'two'" in message


@pytest.mark.parametrize("override", ["seed", "=3", " =3", "model..text=1", "model.=1", ""])
def test_bad_override_syntax(override):
    with pytest.raises(ConfigError) as info:
        load_tiny(override)
    assert repr(override) in str(info.value)


def test_base_config_cannot_be_overridden():
    with pytest.raises(ConfigError, match="base_config"):
        load_tiny("base_config=other.yaml")


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.text.num_key_value_heads=3", "model.text.num_key_value_heads"),
        ("model.text.mrope_section=[1,1,1]", "model.text.mrope_section"),
        ("model.vision.deepstack_visual_indexes=[5]", "model.vision.deepstack_visual_indexes"),
        ("model.vision.out_hidden_size=32", "model.vision.out_hidden_size"),
        ("mesh.data=0", "mesh.data"),
        ("dtype=int8", "dtype"),
    ],
)
def test_impossible_value_in_override(override, key):
    with pytest.raises(ConfigError) as info:
        load_tiny(override)
    message = str(info.value)
    assert key in message
    assert "tiny.yaml" in message  # the config being loaded
    assert "command line" in message  # where the offending value came from


def test_impossible_value_in_file_names_file(tmp_path):
    path = write_yaml(
        tmp_path / "heads.yaml",
        {"base_config": str(TINY), "model": {"text": {"num_key_value_heads": 3}}},
    )
    with pytest.raises(ConfigError, match=r"heads\.yaml: model\.text\.num_key_value_heads"):
        load_config(str(path))


def test_base_config_cycle(tmp_path):
    write_yaml(tmp_path / "a.yaml", {"base_config": "b.yaml"})
    write_yaml(tmp_path / "b.yaml", {"base_config": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_base_config_self_cycle(tmp_path):
    write_yaml(tmp_path / "self.yaml", {"base_config": "./self.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "self.yaml"))


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml.*not found"):
        load_config(str(tmp_path / "nope.yaml"))
    child = write_yaml(tmp_path / "child.yaml", {"base_config": "gone.yaml"})
    with pytest.raises(ConfigError, match=r"gone\.yaml.*not found.*child\.yaml"):
        load_config(str(child))


def test_malformed_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        load_config(str(path))
    path.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml.*mapping"):
        load_config(str(path))


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_save_load_round_trip(name, tmp_path):
    cfg = load_config(
        str(MODELS_DIR / f"{name}.yaml"), ["seed=42", "mesh.fsdp=2", "output_dir=runs/x y"]
    )
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, path)
    assert load_config(str(path)) == cfg
    saved = yaml.safe_load(path.read_text())
    assert "base_config" not in saved  # the saved file is fully resolved
    assert saved["model"]["text"]["mrope_section"] == list(cfg.model.text.mrope_section)


def test_round_trip_of_awkward_strings(tmp_path):
    # Strings YAML would otherwise read as numbers, bools or null must stay strings.
    for output_dir in ("123", "yes", "null", "1e-6", "a: b"):
        cfg = dataclasses.replace(load_tiny(), output_dir=output_dir)
        save_config(cfg, tmp_path / "c.yaml")
        assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_config_to_dict_uses_plain_types():
    d = config_to_dict(load_tiny())
    assert d["model"]["eos_token_ids"] == [498, 496]
    assert d["model"]["vision"]["deepstack_visual_indexes"] == [0]
    assert d["mesh"] == {"data": 1, "fsdp": -1, "tensor": 1, "device_memory_gib": 0.0}
    assert set(d) == {f.name for f in dataclasses.fields(Config)}


# ---------------------------------------------------------------------------------------------
# Generality: sections added later (as new dataclasses) need no loader changes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Optim:
    name: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class _Train:
    steps: int = 10
    resume_from: str | None = None
    eval_every: int | None = None
    optim: _Optim = field(default_factory=_Optim)
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Root:
    train: _Train = field(default_factory=_Train)
    extra: _Optim | None = None


def test_custom_root_class_with_optionals_and_nesting(tmp_path):
    path = write_yaml(tmp_path / "train.yaml", {"train": {"steps": 5, "tags": ["a", "b"]}})
    cfg = load_config(
        str(path),
        ["train.resume_from=ckpt/3", "train.optim.betas=[0.8, 0.9]", "extra={lr: 1}"],
        cls=_Root,
    )
    assert cfg.train.steps == 5 and cfg.train.tags == ("a", "b")
    assert cfg.train.resume_from == "ckpt/3" and cfg.train.eval_every is None
    assert cfg.train.optim.betas == (0.8, 0.9)
    assert cfg.extra == _Optim(lr=1.0)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(str(tmp_path / "saved.yaml"), cls=_Root) == cfg


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.eval_every=soon", "train.eval_every"),
        ("train.optim.betas=[0.9]", "train.optim.betas"),
        ("extra={lrr: 1}", "extra.lrr"),
    ],
)
def test_custom_root_class_errors(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override], cls=_Root)


@pytest.mark.parametrize(
    "cls, override, key",
    [
        (Config, "train.batch_size=1000000", "train.batch_size"),
        (Config, "eval.batch_size=0", "eval.batch_size"),
        (Config, "eval.max_new_tokens=10000000", "eval.max_new_tokens"),
        (Config, "data.seq_len=10000000", "data.seq_len"),
        (Config, "data.max_image_patches=0", "data.max_image_patches"),
        (Config, "data.judge_branches=65", "data.judge_branches"),
        (ServeConfig, "spec.window=1000000000", "spec.window"),
        (ServeConfig, "spec.max_step_tokens=8193", "spec.max_step_tokens"),
        (ServeConfig, "spec.max_new_tokens=262145", "spec.max_new_tokens"),
        (ServeConfig, "spec.sd_tokens=100000", "spec.sd_tokens"),
        (ServeConfig, "data.max_image_pixels=0", "data.max_image_pixels"),
        (ServeConfig, "data.max_images=257", "data.max_images"),
        (ServeConfig, "data.digitmath_problems=100000000", "data.digitmath_problems"),
        (ServeConfig, "warmup=101", "warmup"),
    ],
)
def test_values_that_size_memory_are_bounded(cls, override, key):
    with pytest.raises(ConfigError, match=rf"command line: {key.replace('.', '[.]')}: must be in"):
        load_config(None, [override], cls=cls)
    value = int(override.split("=")[1])
    load_config(None, [f"{key}={min(max(value, 1), 8)}"], cls=cls)  # a small value passes


def test_one_verification_pass_is_bounded_as_a_whole():
    load_config(None, ["spec.window=64", "spec.max_step_tokens=4096"], cls=ServeConfig)
    with pytest.raises(ConfigError, match=r"spec\.window: 64 steps .* exceed 262,144 tokens"):
        load_config(None, ["spec.window=64", "spec.max_step_tokens=8192"], cls=ServeConfig)


def test_a_config_path_that_is_a_folder_names_it(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a YAML config file"):
        load_config(str(tmp_path))


def test_exact_is_greedy():
    load_config(None, ["spec.mode=exact"], cls=ServeConfig)
    load_config(None, ["spec.mode=dreamr", "spec.temperature=1.0"], cls=ServeConfig)
    with pytest.raises(ConfigError, match=r"spec\.temperature: mode exact is greedy"):
        load_config(None, ["spec.mode=exact", "spec.temperature=1.0"], cls=ServeConfig)


def test_every_committed_config_loads():
    configs = sorted((MODELS_DIR.parent).rglob("*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        # raises, naming the file and key, on any invalid value
        load_config(str(path), cls=ServeConfig if path.name.startswith("serve_") else Config)


def test_the_shipped_sapo_draft_was_trained_by_its_committed_config():
    """draft-sapo was trained with overrides on sapo.yaml; sapo_kept.yaml, committed after,
    must load to the config its export recorded, output folders aside."""
    root = MODELS_DIR.parents[1]
    shipped = load_config(str(root / "checkpoints/digitmath/draft-sapo/dreamr_train_config.yaml"))
    committed = load_config(str(root / "configs/digitmath/sapo_kept.yaml"))
    assert committed.export_dir == "checkpoints/digitmath/draft-sapo"
    folders = {"output_dir": shipped.output_dir, "export_dir": shipped.export_dir}
    assert dataclasses.replace(committed, **folders) == shipped
