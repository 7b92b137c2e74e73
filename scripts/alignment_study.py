"""The L_ta / L_pa investigation of issue 13: why the paper-literal token-level alignment collapses, and
what keeps it alive (numbers in docs/METHOD_DEVIATIONS.md).

Two experiments, each printing Markdown tables and writing the raw numbers as JSON:

``text``: the text side alone, on cached frozen image features (CoOp on features: no image encoder, so
ViT-B/16-sized text towers run on a CPU). The soft prompts learn with
``L_vt + beta (ta_weight L_ta + pa_weight L_pa)`` where ``L_vt`` is the cross-entropy of
``cos(z, θ(t_c)) / tau_cls`` over the cached features ``z``. For ``--clip tiny`` (the shipped
``mpafer-face-tiny``) ``z`` are the frozen features of the demo faces (``--data``); for ``--clip vitb16``
(``ViT-B-16``, random weights, so its image features mean nothing) ``z`` are drawn around one random
direction per class (cosine to the class direction about 0.3). Logged every few steps: L_ta, the
gradient norm of the weighted L_ta on the context, the context row norms, test accuracy on held-out ``z``.

``train``: full training of MPA-FER (text + visual prompts, L_v, CGLA; the demo's sizes: ``n_ctx`` 4,
4 visual tokens, top-k 4) on the 64-px demo faces with the shipped ``mpafer-face-tiny``, with per-epoch
diagnostics from :mod:`mpafer.train.diagnostics` and test accuracy. ``--data gray`` converts the same
faces to grey levels (their colours are what the tiny CLIP learnt from: zero-shot drops from 79.5 % to
26 %), a domain gap that learning can close.

Candidates are named sets of ``model.*`` overrides (:data:`CANDIDATES`); ``--set`` adds overrides to all.

    .venv/bin/python scripts/alignment_study.py text --clip tiny --candidates literal,output --steps 300
    .venv/bin/python scripts/alignment_study.py train --data gray --candidates literal,output --seeds 1,2
    .venv/bin/python scripts/alignment_study.py table results.json   # the tables of a saved --out file
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from mpafer.artifacts import atomic_write_json
from mpafer.clip import load_backbone
from mpafer.clip.prototypes import build_prototypes, load_prototypes
from mpafer.clip.text_features import build_text_features, load_text_features
from mpafer.config import ClipConfig, ModelConfig, apply_overrides, demo_config, paper_literal_overrides
from mpafer.data.images import decode_to_uint8_cache, gpu_augment, normalize_uint8
from mpafer.data.manifest import build_manifest, load_manifest
from mpafer.data.synthetic import generate_dataset
from mpafer.describe.generate import get_descriptions
from mpafer.model import MPAFER, MPAOutput
from mpafer.train.diagnostics import find_warnings, no_information_values, term_gradients
from mpafer.train.loop import learning_rate

#: Named candidate readings: ``model.*`` overrides on top of the paper-literal reading (configs/readings/paper_literal.yaml).
PAPER_LITERAL = [o.removeprefix("model.") for o in paper_literal_overrides()]
OC = ["align_tokens=output", "align_centre=true"]  # the token-output, class-centred reading of L_ta
CANDIDATES: dict[str, list[str]] = {
    # readings of L_ta (L_pa as in the paper-literal reading)
    "literal": [],
    "literal-ta0.1": ["ta_weight=0.1"],
    "literal-ta0.01": ["ta_weight=0.01"],
    "token-l2": ["align_token_norm=true"],
    "class-ctx": ["class_specific_ctx=true"],
    "class-ctx-pool": ["class_specific_ctx=true", "align_pool=context"],
    "input-centre": ["align_centre=true"],
    "output": ["align_tokens=output"],
    "output-l2": ["align_tokens=output", "align_token_norm=true"],
    "output-centre": OC,
    "output-centre-ta0.1": [*OC, "ta_weight=0.1"],
    # L_pa's form and scale, on the output-centre L_ta
    "oc+pa-sum-w0.1": [*OC, "pa_weight=0.1"],
    "oc+pa-mean": [*OC, "pa_reduction=mean"],
    "oc+pa-mean-w25": [*OC, "pa_reduction=mean", "pa_weight=25"],
    "oc+pa-cos": [*OC, "prompt_align=cosine"],
    "oc+pa-cos-w8": [*OC, "prompt_align=cosine", "pa_weight=8"],
    "oc+pa-off": [*OC, "pa_weight=0"],
    # L_pa's scale alone, on the literal L_ta, and with the other readings
    "pa-mean": ["pa_reduction=mean"],
    "token-l2+pa-mean": ["align_token_norm=true", "pa_reduction=mean"],
    "oc+pa-mean-ta0.1": [*OC, "pa_reduction=mean", "ta_weight=0.1"],
    # baselines (other variants; the alignment switches do not apply to them)
    "no-align": ["beta=0"],
    "no-align-no-proto": ["beta=0", "gamma=0"],
    "soft+visual+proto": ["variant=soft+visual+proto"],
    "vpt": ["variant=vpt"],
    "coop": ["variant=coop"],
    "soft+visual": ["variant=soft+visual"],
}

DEMO = {"classes": ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger"],
        "train_per_class": 60, "test_per_class": 30, "image_size": 64, "seed": 0}
SHIFTS = {"demo": None, "gray": lambda im: ImageOps.grayscale(im).convert("RGB")}


def model_overrides(candidate: str, extra: Sequence[str]) -> list[str]:
    if candidate not in CANDIDATES:
        raise SystemExit(f"error: unknown candidate {candidate!r}; known: {', '.join(CANDIDATES)}")
    return [f"model.{o}" for o in [*PAPER_LITERAL, *CANDIDATES[candidate]]] + list(extra)


def model_config(base: dict[str, Any], candidate: str, extra: Sequence[str]) -> ModelConfig:
    data = apply_overrides({"model": base}, model_overrides(candidate, extra))
    return ModelConfig.model_validate(data["model"])


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class Inputs:
    backbone: Any
    classes: list[str]
    targets: Any
    prototypes: torch.Tensor | None
    train: tuple[torch.Tensor, torch.Tensor]  # uint8 images, labels
    test: tuple[torch.Tensor, torch.Tensor]


def face_tree(work: Path, shift: str) -> Path:
    """The demo's faces (``configs/demo.yaml`` sizes), optionally shifted, as a class-folder tree."""
    demo = generate_dataset(work / "faces-demo", DEMO["classes"], DEMO["train_per_class"], 0,
                            DEMO["test_per_class"], DEMO["image_size"], DEMO["seed"])
    fn = SHIFTS[shift]
    if fn is None:
        return Path(demo)
    root = work / f"faces-{shift}"
    if (root / "DONE").is_file():
        return root
    for src in sorted(Path(demo).glob("*/*/*.png")):
        dst = root / src.relative_to(demo)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fn(Image.open(src).convert("RGB")).save(dst)
    (root / "DONE").write_text("ok\n")
    return root


def load_inputs(work: Path, clip: ClipConfig, shift: str | None, with_prototypes: bool) -> Inputs:
    cfg = demo_config()
    classes = list(DEMO["classes"])
    backbone = load_backbone(clip)
    tag = f"{clip.model}-{clip.pretrained}"
    desc = get_descriptions(classes, cfg.llm, work / "descriptions", work / "llm-cache")
    tf = build_text_features(backbone, desc.path, classes, ["coarse", "task", "fine"], work / f"text-{tag}")
    targets = load_text_features(tf, classes)
    if shift is None:
        return Inputs(backbone, classes, targets, None, (torch.empty(0), torch.empty(0)),
                      (torch.empty(0), torch.empty(0)))
    root = face_tree(work, shift)
    data_cfg = cfg.data.model_copy(update={"dataset": "folder", "root": root})
    manifest_res = build_manifest(data_cfg, work / "manifests", progress=False)
    manifest = load_manifest(manifest_res.path)
    if list(manifest.classes) != classes:
        raise SystemExit(f"error: manifest classes {manifest.classes} differ from {classes}")
    prototypes = None
    if with_prototypes:
        pp = build_prototypes(backbone, manifest_res.path, None, 0, work / f"protos-{tag}-{shift}",
                              num_workers=0, progress=False)
        prototypes = load_prototypes(pp, classes)[0]
    size = int(backbone.image_size)
    train = decode_to_uint8_cache(manifest.items("train"), size)
    test = decode_to_uint8_cache(manifest.items("test"), size)
    return Inputs(backbone, classes, targets, prototypes, train, test)


# ------------------------------------------------------------------------------------------ helpers
def ctx_row_norm(model: MPAFER) -> float:
    assert model.text is not None
    return float(model.text.learner.ctx.detach().norm(dim=-1).mean())


def by_candidate(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The runs (``<candidate>/seed<k>``) grouped by candidate, in the order they ran."""
    groups: dict[str, list[dict[str, Any]]] = {c: [] for c in results.get("order", CANDIDATES)}
    for key, res in results["runs"].items():  # (a saved file's runs may come back sorted by key)
        groups.setdefault(key.rsplit("/", 1)[0], []).append(res)
    return {c: runs for c, runs in groups.items() if runs}


def row(line: str) -> None:
    """Print a Markdown table row; a number a candidate does not have (no L_ta in CoOp, ...) shows as –."""
    print(re.sub(r"\bnan\b", "–", line))


def mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


# ------------------------------------------------------------------------------------------ text study
def class_features(n_classes: int, dim: int, per_class: int, seed: int, cos: float = 0.3) -> tuple[torch.Tensor, ...]:
    """Random stand-in image features: ``cos`` to one random direction per class, the rest noise."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    noise = F.normalize(torch.randn(len(labels), dim, generator=g), dim=-1)
    z = F.normalize(cos * centres[labels] + math.sqrt(1 - cos**2) * noise, dim=-1)
    return z, labels


@torch.no_grad()
def frozen_features(backbone: Any, images: torch.Tensor) -> torch.Tensor:
    x = normalize_uint8(images, backbone.mean, backbone.std)
    return torch.cat([F.normalize(backbone.model.encode_image(x[i:i + 128]), dim=-1)
                      for i in range(0, len(x), 128)])


def run_text(inputs: Inputs, cfg: ModelConfig, feats: dict[str, torch.Tensor], *, steps: int, lr: float,
             batch: int, seed: int, every: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = MPAFER(inputs.backbone, inputs.classes, cfg, inputs.targets, None)
    assert model.text is not None
    ctx = model.text.learner.ctx
    opt = torch.optim.SGD([ctx], lr=lr, momentum=0.9, weight_decay=5e-4)
    z_train, y_train, z_test, y_test = feats["z_train"], feats["y_train"], feats["z_test"], feats["y_test"]
    g = torch.Generator().manual_seed(seed)
    trace = []
    for step in range(steps + 1):
        for group in opt.param_groups:  # cosine over the run (nanoGPT-style pure function of the step)
            group["lr"] = lr * (1 + math.cos(math.pi * step / steps)) / 2
        idx = torch.randint(0, len(z_train), (batch,), generator=g)
        text_feats, soft = model.text()
        logits = z_train[idx] @ text_feats.t() / model.tau_cls
        out = MPAOutput(logits=logits, global_features=z_train[idx], text_features=text_feats,
                        aux={"soft_token_vectors": soft})
        parts = model.loss(out, y_train[idx])
        weights = model.loss_weights()
        if step % every == 0 or step == steps:
            row: dict[str, Any] = {"step": step, "ctx_norm": ctx_row_norm(model)}
            for term, w in weights.items():
                gr = torch.autograd.grad(w * parts[term], ctx, retain_graph=True)[0] if w > 0 else None
                row[f"loss_{term}"] = float(parts[term].detach())
                row[f"grad_{term}"] = float(gr.norm()) if gr is not None else 0.0
            with torch.no_grad():
                row["test_acc"] = float(((z_test @ text_feats.t()).argmax(1) == y_test).float().mean())
            trace.append(row)
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        parts["total"].backward()
        opt.step()
    return {"trace": trace}


def save(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Write the numbers so far (after every run: a long study interrupted keeps what it measured)."""
    if args.out:
        atomic_write_json(Path(args.out), {**results, "command": command_line(args)})


def command_line(args: argparse.Namespace) -> str:
    return " ".join(["scripts/alignment_study.py", *args.argv])


def cmd_text(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    if args.clip == "tiny":
        clip = ClipConfig(model="mpafer-face-tiny", pretrained="synthetic-faces", device="cpu")
        inputs = load_inputs(work, clip, args.data, with_prototypes=False)
        z_train = frozen_features(inputs.backbone, inputs.train[0])
        z_test = frozen_features(inputs.backbone, inputs.test[0])
        feats = {"z_train": z_train, "y_train": inputs.train[1], "z_test": z_test, "y_test": inputs.test[1]}
        base = {"variant": "soft+visual+proto+align", "n_ctx": 4, "gamma": 0}
    else:
        clip = ClipConfig(model="ViT-B-16", pretrained="none", device="cpu")
        inputs = load_inputs(work, clip, None, with_prototypes=False)
        dim = int(inputs.backbone.embed_dim)
        z, y = class_features(len(inputs.classes), dim, 120, seed=0)
        test = torch.arange(len(y)) % 4 == 0
        feats = {"z_train": z[~test], "y_train": y[~test], "z_test": z[test], "y_test": y[test]}
        base = {"variant": "soft+visual+proto+align", "n_ctx": 10, "gamma": 0}
    results: dict[str, Any] = {"clip": args.clip, "data": args.data, "lr": args.lr, "steps": args.steps,
                               "ln_c": math.log(len(inputs.classes)), "order": args.candidates.split(","),
                               "runs": {}}
    for cand in args.candidates.split(","):
        cfg = model_config(base, cand, args.sets)
        for seed in args.seeds:
            t0 = time.perf_counter()
            res = run_text(inputs, cfg, feats, steps=args.steps, lr=args.lr, batch=32, seed=seed,
                           every=args.every)
            res["seconds"] = round(time.perf_counter() - t0, 1)
            results["runs"][f"{cand}/seed{seed}"] = res
            save(args, results)
            tr = res["trace"]
            print(f"{cand} seed {seed}: L_ta " + " ".join(f"{r.get('loss_ta', float('nan')):.2f}" for r in tr)
                  + f" | |g_ta| {tr[0].get('grad_ta', 0):.3g} -> {tr[-1].get('grad_ta', 0):.3g}"
                  + f" | ctx norm {tr[-1]['ctx_norm']:.2f} | acc {100 * tr[-1]['test_acc']:.1f} % "
                  + f"({res['seconds']} s)", flush=True)
    print_text_table(results)
    return results


def print_text_table(results: dict[str, Any]) -> None:
    ln_c = results["ln_c"]
    print(f"\n`text --clip {results['clip']}`: lr {results['lr']}, {results['steps']} steps; ln C = {ln_c:.3f}\n")
    print("| candidate | L_ta start → min → end | end / ln C | ‖∇ctx β·L_ta‖ start → end | "
          "‖∇ctx L_vt‖ end | ‖∇ctx β·L_pa‖ end | ctx row norm end | test acc % |")
    print("|---|---|---|---|---|---|---|---|")
    for cand, runs in by_candidate(results).items():
        def avg(field: str, i: int, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.mean(r["trace"][i].get(field, float("nan")) for r in runs)
        ta_min = statistics.mean(min(x.get("loss_ta", float("nan")) for x in r["trace"]) for r in runs)
        accs = [100 * r["trace"][-1]["test_acc"] for r in runs]
        row(f"| {cand} | {avg('loss_ta', 0):.2f} → {ta_min:.2f} → {avg('loss_ta', -1):.2f} | "
              f"{avg('loss_ta', -1) / ln_c:.2f} | {avg('grad_ta', 0):.3g} → {avg('grad_ta', -1):.3g} | "
              f"{avg('grad_vt', -1):.3g} | {avg('grad_pa', -1):.3g} | {avg('ctx_norm', -1):.2f} | "
              f"{mean_std(accs)} |")


# ------------------------------------------------------------------------------------------ train study
def run_train(inputs: Inputs, cfg: ModelConfig, *, epochs: int, lr: float, batch: int, seed: int) -> dict[str, Any]:
    """Train like ``mpafer train`` (SGD momentum 0.9, wd 5e-4, 1 warm-up epoch at 1e-5 then cosine,
    RandomResizedCrop 0.8-1 + flip + RandomErasing 0.25 on the device) with diagnostics every epoch."""
    bb = inputs.backbone
    torch.manual_seed(seed)
    model = MPAFER(bb, inputs.classes, cfg, inputs.targets, inputs.prototypes)
    params = [p for _, p in model.trainable_named_parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = demo_config().train.model_copy(update={"lr": lr, "epochs": epochs, "batch_size": batch})
    images, labels = inputs.train
    reference = no_information_values(model)
    g = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    for epoch in range(epochs):
        for group in opt.param_groups:  # the loop's lr (1 warm-up epoch at 1e-5, then cosine)
            group["lr"] = learning_rate(schedule, epoch)
        model.train()
        order = torch.randperm(len(labels), generator=g)
        sums: dict[str, float] = {}
        seen = correct = 0
        x = y = None
        for start in range(0, len(order) - batch + 1, batch):  # drop_last, as the loop does
            idx = order[start:start + batch]
            x = gpu_augment(images[idx], bb.mean, bb.std, 0.8, 0.25, generator=g)
            y = labels[idx]
            out = model(x)
            parts = model.loss(out, y)
            opt.zero_grad(set_to_none=True)
            parts["total"].backward()
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(y)
            seen += len(y)
            correct += int((out.logits.argmax(1) == y).sum())
        assert x is not None and y is not None
        row: dict[str, Any] = {"epoch": epoch + 1, **{f"loss_{k}": v / seen for k, v in sums.items()},
                               "train_acc": correct / seen}
        if model.text is not None:
            row["ctx_norm"] = ctx_row_norm(model)
        row.update(term_gradients(model, x, y).row())  # the epoch's last batch, as the loop would
        history.append(row)
    warnings = [w.message for w in find_warnings(history, reference)]
    model.eval()
    with torch.no_grad():
        text = model.class_text_features()
        test_x, test_y = inputs.test
        preds = torch.cat([model(normalize_uint8(test_x[i:i + 128], bb.mean, bb.std), text_features=text)
                           .logits.argmax(1) for i in range(0, len(test_y), 128)])
    return {"history": history, "reference": reference, "warnings": warnings,
            "test_acc": float((preds == test_y).float().mean())}


@torch.no_grad()
def zeroshot_accuracy(inputs: Inputs) -> float:
    z = frozen_features(inputs.backbone, inputs.test[0])
    targets = F.normalize(inputs.targets.class_targets, dim=-1)
    return float(((z @ targets.t()).argmax(1) == inputs.test[1]).float().mean())


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    clip = ClipConfig(model="mpafer-face-tiny", pretrained="synthetic-faces", device="cpu")
    inputs = load_inputs(work, clip, args.data, with_prototypes=True)
    demo_model = demo_config().model.model_dump()
    results: dict[str, Any] = {"data": args.data, "epochs": args.epochs, "lr": args.lr,
                               "ln_c": math.log(len(inputs.classes)), "zeroshot": zeroshot_accuracy(inputs),
                               "order": args.candidates.split(","), "runs": {}}
    print(f"zero-shot test accuracy on {args.data}: {100 * results['zeroshot']:.1f} %", flush=True)
    for cand in args.candidates.split(","):
        cfg = model_config({**demo_model, "variant": args.variant}, cand, args.sets)
        for seed in args.seeds:
            t0 = time.perf_counter()
            res = run_train(inputs, cfg, epochs=args.epochs, lr=args.lr, batch=32, seed=seed)
            res["seconds"] = round(time.perf_counter() - t0, 1)
            results["runs"][f"{cand}/seed{seed}"] = res
            save(args, results)
            h = res["history"]
            ta = " ".join(f"{r.get('diag_loss', {}).get('ta', float('nan')):.2f}" for r in h)
            print(f"{cand} seed {seed}: test {100 * res['test_acc']:.1f} % | L_ta {ta} | "
                  f"{'; '.join(res['warnings']) or 'no warnings'} ({res['seconds']} s)", flush=True)
    print_train_table(results)
    return results


def _grad(row: dict[str, Any], term: str, tensor: str = "text.learner.ctx") -> float:
    return float(row.get("grad_norm", {}).get(term, {}).get(tensor, float("nan")))


def print_train_table(results: dict[str, Any]) -> None:
    ln_c = results["ln_c"]
    print(f"\n`train --data {results['data']}`: {results['epochs']} epochs, lr {results['lr']}; "
          f"ln C = {ln_c:.3f}; zero-shot {100 * results['zeroshot']:.1f} %\n")
    print("| candidate | test acc % | L_ta ep1 → last | last / ln C | ‖∇ctx L_ta‖ ep1 → last | "
          "‖∇ctx L_vt‖ last | ‖∇ctx L_pa‖ last | L_pa last | ctx row norm | warnings (seeds) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cand, runs in by_candidate(results).items():
        def avg(fn: Any, i: int, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.mean(fn(r["history"][i]) for r in runs)
        accs = [100 * r["test_acc"] for r in runs]
        ta = lambda r: r.get("diag_loss", {}).get("ta", float("nan"))  # noqa: E731
        pa = lambda r: r.get("diag_loss", {}).get("pa", float("nan"))  # noqa: E731
        warns = sorted({w.split(":")[0] for r in runs for w in r["warnings"]})
        row(f"| {cand} | {mean_std(accs)} | {avg(ta, 0):.2f} → {avg(ta, -1):.2f} | {avg(ta, -1) / ln_c:.2f} | "
              f"{avg(lambda r: _grad(r, 'ta'), 0):.3g} → {avg(lambda r: _grad(r, 'ta'), -1):.3g} | "
              f"{avg(lambda r: _grad(r, 'vt'), -1):.3g} | {avg(lambda r: _grad(r, 'pa'), -1):.3g} | "
              f"{avg(pa, -1):.3g} | {avg(lambda r: r.get('ctx_norm', float('nan')), -1):.2f} | "
              f"{'; '.join(warns) or '-'} |")


# ------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("text", "train"):
        p = sub.add_parser(name)
        p.add_argument("--work", default="mpafer_work/alignment_study", help="cache folder (faces, artifacts)")
        p.add_argument("--candidates", default="literal,output")
        p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1])
        p.add_argument("--set", dest="sets", action="append", default=[], help="extra model.key=value")
        p.add_argument("--out", help="write the raw numbers as JSON here")
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads (1: on a shared CPU, more threads of these small ops mostly wait)")
    t = sub.choices["text"]
    t.add_argument("--clip", choices=["tiny", "vitb16"], default="tiny")
    t.add_argument("--data", choices=sorted(SHIFTS), default="gray")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--every", type=int, default=25)
    t.add_argument("--lr", type=float, default=0.032)
    r = sub.choices["train"]
    r.add_argument("--data", choices=sorted(SHIFTS), default="gray")
    r.add_argument("--variant", default="mpa")
    r.add_argument("--epochs", type=int, default=10)
    r.add_argument("--lr", type=float, default=0.01)
    tab = sub.add_parser("table", help="print the tables of a saved --out JSON again")
    tab.add_argument("json")
    args = parser.parse_args(argv)
    if args.cmd == "table":
        saved = json.loads(Path(args.json).read_text())
        print(f"(from: {saved.get('command', '?')})")
        (print_text_table if "steps" in saved else print_train_table)(saved)
        return
    args.argv = list(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    results = cmd_text(args) if args.cmd == "text" else cmd_train(args)
    save(args, results)


if __name__ == "__main__":
    main()
