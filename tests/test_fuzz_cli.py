"""Fuzzing the command line in the spirit of issue 14's cases: file names and special files in a dataset,
LLM server replies, config values, run folders left in any state. Every run must end with exit 0 or the
exit code of the input's class and exactly one ``error:`` line: never a traceback, never exit 1 (a bug),
never a hang (each test has a timeout; hypothesis draws a bounded number of examples, about a minute in
all on two cores).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from datasets_fixtures import image_bytes, make_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from llm_fixtures import FakeLLMServer  # noqa: E402
from test_property_inputs import run_cli  # noqa: E402

FUZZ = settings(max_examples=int(os.environ.get("MPAFER_FUZZ_EXAMPLES", "60")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def assert_clean(code: int, out: str, err: str, allowed: set[int]) -> None:
    assert "Traceback" not in out + err, err
    assert code in {0} | allowed, (code, err)
    if code:
        lines = [line for line in err.splitlines() if line.strip()]
        assert sum(line.startswith("error: ") for line in lines) == 1 and lines[-1].startswith("error: "), err


# ------------------------------------------------------------------------------------------ file names
NAME_BYTES = st.binary(min_size=1, max_size=24).filter(lambda b: b"/" not in b and b"\x00" not in b
                                                       and b not in (b".", b".."))
ENTRY = st.sampled_from(["image", "random bytes", "empty", "fifo", "dev-zero link", "loop link", "dangling link",
                         "folder", "truncated"])
EXT = st.sampled_from([".png", ".jpg", ".JPEG", ".webp", ".txt", ""])


@pytest.fixture(scope="module")
def base_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("fuzz-base") / "ds", class_dirs=["happy", "sad", "angry"])


def _plant(folder: Path, name: bytes, kind: str, ext: str, seed: int) -> None:
    path = Path(os.fsdecode(os.path.join(os.fsencode(folder), name + ext.encode())))
    if os.path.lexists(path):
        return
    if kind == "image":
        path.write_bytes(image_bytes(seed, "PNG"))
    elif kind == "random bytes":
        path.write_bytes(os.urandom(64))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero link":
        os.symlink("/dev/zero", path)
    elif kind == "loop link":
        os.symlink(".", path)
    elif kind == "dangling link":
        os.symlink(folder / "nowhere", path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "truncated":
        path.write_bytes(image_bytes(seed, "JPEG")[:40])


@pytest.mark.timeout(120)
@FUZZ
@given(entries=st.lists(st.tuples(NAME_BYTES, ENTRY, EXT, st.sampled_from(["train/happy", "test/sad", "train"])),
                        min_size=1, max_size=4),
       on_bad=st.sampled_from(["error", "skip"]))
def test_manifest_with_odd_names_and_special_files(tmp_path_factory: pytest.TempPathFactory, base_tree: Path,
                                                   entries: list[tuple[bytes, str, str, str]], on_bad: str) -> None:
    work = tmp_path_factory.mktemp("fuzz-ds")
    root = work / "ds"
    shutil.copytree(base_tree, root, symlinks=True)
    for i, (name, kind, ext, where) in enumerate(entries):
        _plant(root / where, name, kind, ext, seed=500 + i)
    result = run_cli(["manifest", "--root", str(root), "--out", str(work / "m"), "--on-bad", on_bad,
                      "--no-progress"])
    assert_clean(*result, allowed={3})


# ------------------------------------------------------------------------------------------ server replies
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)


def _completion(content: object, finish: object, message_extra: dict[str, object]) -> dict[str, object]:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": content, **message_extra}}]}


REPLY = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda v: __import__("json").dumps(v).encode()),
    st.builds(_completion, st.one_of(st.text(max_size=60), JSON.map(lambda v: __import__("json").dumps(v)),
                                     st.just('{"descriptions": ["raised brows"]}'), st.none()),
              st.sampled_from(["stop", "length", "content_filter", None, 3]),
              st.sampled_from([{}, {"refusal": "no"}, {"refusal": None}])).map(lambda v: __import__("json").dumps(v).encode()),
)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as s:
        s.plan("raw")
        yield s


@pytest.mark.timeout(120)
@FUZZ
@given(status=st.sampled_from([200, 200, 200, 201, 400, 401, 403, 404, 409, 422, 429, 500, 503]),
       content_type=st.sampled_from(["application/json", "text/html", "text/plain", ""]), body=REPLY)
def test_describe_with_any_server_reply(tmp_path_factory: pytest.TempPathFactory, server: FakeLLMServer,
                                        status: int, content_type: str, body: bytes) -> None:
    server.raw_reply = (status, content_type, body)
    work = tmp_path_factory.mktemp("fuzz-llm")
    result = run_cli(["describe", "--classes", "fear", "--llm-model", "m", "--llm-base-url", server.url, "--n", "1",
                      "--out", str(work / "o"), "--cache-dir", str(work / "c"), "--set", "llm.max_retries=0",
                      "--set", "llm.timeout_s=3", "--set", "llm.max_reasks=1"])
    assert_clean(*result, allowed={4})


# ------------------------------------------------------------------------------------------ config values
FLOAT_FIELDS = ["train.lr", "train.warmup_lr", "train.weight_decay", "train.momentum", "llm.temperature",
                "llm.timeout_s", "model.tau_align", "model.tau_cls", "data.val_fraction", "train.grad_clip"]
FLOAT_TEXT = st.one_of(st.sampled_from([".inf", "-.inf", ".nan", "inf", "nan", "1e400", "-0", "1e-400", "0x10"]),
                       st.floats(allow_nan=True, allow_infinity=True).map(repr))
URL = st.one_of(st.text(max_size=30),
                st.builds(lambda s, h, p, path: f"{s}://{h}{p}{path}",
                          st.sampled_from(["http", "https", "ftp", "HTTP", ""]),
                          st.sampled_from(["[::1", "[::1]", "256.256.256.256", "127.0.0.1", "a b", "", "é.example",
                                           "[1.2.3.4]", "host_name", "-x-"]),
                          st.sampled_from(["", ":99999", ":0", ":8000", ":abc", ":"]),
                          st.sampled_from(["", "/v1", "/v1?x=1#f"])))
SET_ITEM = st.one_of(
    st.builds(lambda f, v: f"{f}={v}", st.sampled_from(FLOAT_FIELDS), FLOAT_TEXT),
    URL.map(lambda u: f"llm.base_url={u}"),
    st.lists(st.integers(-3, 3), max_size=4).map(lambda s: f"train.seeds={s}"),
    st.text(max_size=12).map(lambda v: f"llm.api_key_env={v}"),
    st.integers(-2, 10**6).map(lambda k: f"model.topk={k}"),
)


@pytest.mark.timeout(120)
@FUZZ
@given(items=st.lists(SET_ITEM, min_size=1, max_size=3))
def test_config_values_are_accepted_or_one_line(tmp_path_factory: pytest.TempPathFactory, items: list[str]) -> None:
    work = tmp_path_factory.mktemp("fuzz-set")
    argv = ["describe", "--classes", "rafdb", "--llm-model", "cached", "--out", str(work / "o"),
            "--cache-dir", str(work / "c")]
    for item in items:
        argv += ["--set", item]
    assert_clean(*run_cli(argv), allowed={2})


# ------------------------------------------------------------------------------------------ run folders
#: Each file a run folder may hold, and what a previous (crashed, foreign or damaged) run may have left there.
RUN_FOLDER = st.fixed_dictionaries({
    "run.json": st.sampled_from([None, "other key", "garbage", "not an object"]),
    "checkpoints": st.sampled_from([None, "empty folder", "a file", "damaged checkpoint", "stale temporary"]),
    "train.json": st.sampled_from([None, "garbage"]),
    "prompts.safetensors": st.sampled_from([None, "garbage"]),
    "metrics.jsonl": st.sampled_from([None, "garbage"]),
    "config.json": st.sampled_from([None, "garbage"]),
})
TRAIN_SETS = st.sampled_from([(), ("model.vpt_depth=99",), ("model.topk=100000",),
                              ("train.lr=1e30", "train.warmup_epochs=0"), ("train.epochs=0",)])


def _leave(run_dir: Path, state: dict[str, str | None]) -> None:
    import json

    run_dir.mkdir(parents=True, exist_ok=True)
    texts = {"other key": json.dumps({"config_key": "0" * 64}), "garbage": "\x00{not json", "not an object": "[1]"}
    for name in ("run.json", "train.json", "prompts.safetensors", "metrics.jsonl", "config.json"):
        if state[name] is not None:
            (run_dir / name).write_text(texts[str(state[name])])
    ckpt = state["checkpoints"]
    if ckpt == "a file":
        (run_dir / "checkpoints").write_text("not a folder")
    elif ckpt is not None:
        (run_dir / "checkpoints").mkdir()
        if ckpt == "damaged checkpoint":
            (run_dir / "checkpoints" / "ckpt-00000001.pt").write_bytes(os.urandom(100))
            (run_dir / "checkpoints" / "ckpt-00000001.pt.sha256").write_text("0" * 64 + "\n")
        elif ckpt == "stale temporary":
            (run_dir / "checkpoints" / ".tmp-ckpt-00000001.pt.x").write_bytes(b"half")


@pytest.mark.timeout(300)
@settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 5))
@given(state=RUN_FOLDER, sets=TRAIN_SETS)
def test_train_in_any_run_folder_is_clean_and_a_failed_start_writes_nothing(
    tmp_path_factory: pytest.TempPathFactory, state: dict[str, str | None], sets: tuple[str, ...]
) -> None:
    """``mpafer train`` into a folder left in any state by earlier runs, with a config that may not fit the
    CLIP or may diverge: exit 0 or the failure's class with one line; a start refused for its config (the
    model cannot be built) adds neither config.json nor run.json."""
    import yaml
    from train_fixtures import base_config, shared_inputs

    inputs = shared_inputs()
    work = tmp_path_factory.mktemp("fuzz-run")
    config = work / "tiny.yaml"
    config.write_text(yaml.safe_dump(base_config(epochs=1).model_dump(mode="json")))
    run_dir = work / "run"
    _leave(run_dir, state)
    before = {n: (run_dir / n).read_bytes() if (run_dir / n).is_file() else None for n in ("run.json", "config.json")}
    argv = ["train", "--no-progress", "--config", str(config), "--manifest", str(inputs.manifest),
            "--text-features", str(inputs.text_features), "--prototypes", str(inputs.prototypes),
            "--run-dir", str(run_dir), *[a for item in sets for a in ("--set", item)]]
    code, out, err = run_cli(argv)
    assert_clean(code, out, err, allowed={2, 3, 6})
    if sets and sets[0].startswith("model."):
        assert code != 0, err
        after = {n: (run_dir / n).read_bytes() if (run_dir / n).is_file() else None for n in before}
        assert after == before, "a start refused for its config wrote run files"
