"""Config models, YAML composition and ``--set`` overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mpafer.cli import main
from mpafer.config import CONFIG_DIR, Config, apply_overrides, demo_config, load_config, parse_override
from mpafer.errors import ConfigError

SHIPPED = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def test_every_required_config_ships() -> None:
    for ds in ("rafdb", "ferplus", "affectnet7", "affectnet8"):
        for bb in ("vitb16", "vitl14"):
            assert f"{ds}_{bb}.yaml" in SHIPPED
    assert "demo.yaml" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIG_DIR / name)
    assert isinstance(cfg, Config)


def test_composition_merges_dataset_and_backbone() -> None:
    cfg = load_config("rafdb_vitl14")
    assert cfg.data.dataset == "rafdb"
    assert cfg.clip.model == "ViT-L-14"
    assert cfg.clip.pretrained == "openai"
    assert str(cfg.pipeline.project_dir).endswith("rafdb_vitl14")
    # docs/METHOD.md §5 defaults survive composition
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (120, 32, 0.032)
    assert cfg.model.n_ctx == 10 and cfg.model.n_visual_tokens == 8 and cfg.model.topk == 16


def test_affectnet_configs_use_balanced_sampler() -> None:
    assert load_config("affectnet8_vitb16").train.sampler == "balanced"


def test_set_overrides_with_yaml_typing() -> None:
    cfg = load_config(
        "demo",
        ["data.dataset=folder", "data.root=/my/faces", "train.epochs=3", "model.vpt_depth=4",
         "train.grad_clip=1.5", "model.granularities=[coarse, fine]", "train.seeds=[1,2,3]"],
    )
    assert cfg.data.root == Path("/my/faces")
    assert cfg.train.epochs == 3
    assert cfg.model.vpt_depth == 4
    assert cfg.train.grad_clip == 1.5
    assert cfg.model.granularities == ["coarse", "fine"]
    assert cfg.train.seeds == [1, 2, 3]


def test_invalid_literal_names_field_and_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["model.variant=bogus"])
    msg = str(err.value)
    assert "model.variant" in msg and "bogus" in msg and "coop" in msg and "mpa" in msg
    assert "\n" not in msg


def test_unknown_field_is_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown field"):
        load_config("demo", ["train.epoch=3"])


def test_out_of_range_value() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config("demo", ["train.batch_size=0"])


def test_question_needs_placeholder() -> None:
    with pytest.raises(ConfigError, match="class_name"):
        load_config("demo", ["llm.question=What is this face?"])


def test_warmup_longer_than_training_fails() -> None:
    with pytest.raises(ConfigError, match="warmup_epochs"):
        load_config("demo", ["train.epochs=1", "train.warmup_epochs=2"])


def test_variant_components() -> None:
    rows = {
        "zeroshot": (False, False, False, False, False),
        "coop": (True, False, False, False, False),
        "vpt": (False, True, False, False, False),
        "soft+visual": (True, True, False, False, False),
        "soft+visual+proto": (True, True, True, False, False),
        "soft+visual+proto+align": (True, True, True, True, False),
        "mpa": (True, True, True, True, True),
    }
    for variant, expected in rows.items():
        m = load_config("demo", [f"model.variant={variant}"]).model
        got = (m.use_text_prompts, m.use_visual_prompts, m.use_prototype_loss, m.use_alignment_loss, m.use_cgla)
        assert got == expected, variant


def test_large_batch_lr_rule() -> None:
    t = load_config(None, ["train.batch_size=256", "train.lr_scaling=linear"]).train
    assert t.effective_lr == pytest.approx(0.032 * 8)
    t = load_config(None, ["train.batch_size=128", "train.lr_scaling=sqrt"]).train
    assert t.effective_lr == pytest.approx(0.032 * 2)


def test_extends_cycle_and_bad_yaml(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_set_parsing_errors() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("train..epochs=3")
    with pytest.raises(ConfigError, match="not a group"):
        apply_overrides({"train": {"epochs": 3}}, ["train.epochs.x=1"])


def test_demo_config_is_cpu_and_offline() -> None:
    cfg = demo_config()
    assert cfg.llm.model == "cached"
    assert cfg.clip.device == "cpu" and cfg.train.device == "cpu"
    assert cfg.data.root is None


# -------------------------------------------------------------------------------- property tests
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_set_string_is_parsed_or_rejected_cleanly(item: str) -> None:
    try:
        path, _ = parse_override(item)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert all(path)


_SET_KEYS = st.sampled_from(
    ["train.epochs", "train.lr", "model.variant", "data.dataset", "clip.precision", "model.topk", "x.y",
     "train", "model.granularities", "pipeline.refresh"]
)
_SET_VALUES = st.one_of(
    st.integers(-5, 500), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(),
    st.lists(st.integers(), max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_SET_KEYS, _SET_VALUES), max_size=4))
def test_any_override_combination_validates_or_fails_with_one_line(pairs: list[tuple[str, object]]) -> None:
    items = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in pairs]
    try:
        load_config(None, items)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_yaml_file_fails_cleanly(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_cli_invalid_config_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  variant: nope\n")
    from mpafer.config import load_config as _lc

    with pytest.raises(ConfigError):
        _lc(bad)
    rc = main(["manifest", "--dataset", "folder", "--root", str(tmp_path), "--config", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error:") and "model.variant" in err[0]


def _float_fields(model: type, prefix: str = "") -> list[str]:
    """Dotted names of every float field (``float`` or ``float | None``) of ``model`` and its groups."""
    import typing

    from pydantic import BaseModel

    out: list[str] = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        args = typing.get_args(ann) or (ann,)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _float_fields(ann, f"{prefix}{name}.")
        elif float in args:
            out.append(f"{prefix}{name}")
    return out


FLOAT_FIELDS = _float_fields(Config)


def test_every_float_field_is_found() -> None:
    assert {"train.lr", "train.warmup_lr", "train.weight_decay", "llm.temperature", "model.tau_cls",
            "data.val_fraction", "train.grad_clip"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan", "1e400"])
def test_non_finite_values_are_refused_naming_the_field(field: str, value: str) -> None:
    """``lr: inf`` used to train to a model whose every prompt value was inf, and exit 0 (issue 14, item 3)."""
    with pytest.raises(ConfigError, match=rf"invalid config: {field}: "):
        load_config(None, [f"{field}={value}"])


def test_non_finite_value_on_the_command_line_is_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["manifest", "--root", str(tmp_path), "--set", "train.lr=inf"]) == 2
    assert capsys.readouterr().err.strip() == "error: invalid config: train.lr: Input should be a finite number"


@pytest.mark.parametrize(("seeds", "ok"), [("[1,2,3]", True), ("[1,1]", False), ("[3,1,3,1]", False), ("[]", False)])
def test_seeds_must_be_distinct(seeds: str, ok: bool) -> None:
    if ok:
        assert load_config(None, [f"train.seeds={seeds}"]).train.seeds == [1, 2, 3]
    else:
        with pytest.raises(ConfigError, match=r"train.seeds: (seeds must be distinct; repeated: 1|give at least)"):
            load_config(None, [f"train.seeds={seeds}"])


@pytest.mark.parametrize(("url", "ok"), [
    ("http://localhost:11434/v1", True), ("https://my-resource.openai.azure.com/openai/v1/", True),
    ("http://[::1]:8000/v1", True), ("http://10.0.0.7:8000/v1", True), ("https://api.openai.com/v1", True),
    ("http://[::1", False), ("http://256.256.256.256/v1", False), ("http://127.0.0.1:99999/v1", False),
    ("http://127.0.0.1:0/v1", False), ("http://h:port/v1", False), ("localhost:8000", False),
    ("http:///v1", False), ("http://a b/v1", False), ("http://[1.2.3.4]/v1", False),
])
def test_base_url_is_validated(url: str, ok: bool) -> None:
    if ok:
        assert load_config(None, [f"llm.base_url={url}"]).llm.base_url == url
    else:
        with pytest.raises(ConfigError, match=r"llm.base_url: .* is not a usable server URL: "):
            load_config(None, [f"llm.base_url={url}"])


def test_port_out_of_range_is_reported_with_its_port() -> None:
    with pytest.raises(ConfigError, match="port 99999 is not a number from 1 to 65535"):
        load_config(None, ["llm.base_url=http://127.0.0.1:99999/v1"])


@pytest.mark.parametrize(("name", "ok"), [("auto", True), ("none", True), ("VLLM_API_KEY", True),
                                          ("A-B", False), ("1KEY", False), ("$HOME", False)])
def test_api_key_env_must_name_a_variable(name: str, ok: bool) -> None:
    if ok:
        assert load_config(None, [f"llm.api_key_env={name}"]).llm.api_key_env == name
    else:
        with pytest.raises(ConfigError, match="llm.api_key_env"):
            load_config(None, [f"llm.api_key_env={name}"])
