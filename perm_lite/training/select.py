"""Train several configs side by side, score each on the *validation* splits, keep the best.

    python -m perm_lite.training.select CONFIG [CONFIG ...] --out DIR [--device cuda] [--parallel]

Each config trains as its own process (in parallel with `--parallel`, e.g. on one GPU),
then every final checkpoint is evaluated on validation data only: held-out mint and iEval
validation splits, the older sources' validation splits and the robustness suite on the
mint and iEval validation contexts, and the hand-written validation contrasts
(`written/val.jsonl`: warm, specific replies above generic ones above dismissive and
off-topic ones). The contrastive check set and the test splits are never used to choose.
`DIR/selection.json` holds every figure and the choice;
`DIR/selected/` the chosen weights (optionally as fp16 shards small enough to copy).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _get(d: dict, *keys, default=float("nan")) -> float:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return float(d)


def validation_report(folder: Path, data_dir: Path, device: str, seed: int = 13) -> dict:
    """Validation figures of one checkpoint (PyTorch, `device`)."""
    from perm_lite.training import robustness, written
    from perm_lite.training.chatbot_eval import chatbot_evaluation
    from perm_lite.training.data import build_corpus
    from perm_lite.training.evaluate import checkpoint_predictor, evaluate

    predict = checkpoint_predictor(str(folder), device=device, batch_size=64)
    chat = chatbot_evaluation(data_dir, {"m": predict}, "val")["m"]
    corpus = build_corpus(
        data_dir,
        seed=seed,
        sources=tuple(
            s for s in ("epitome", "condolence", "esconv", "failedesconv", "counselchat", "weak", "counterfactual")
        ),
    )
    older = evaluate(corpus, {"m": predict}, split="val", seed=seed)["m"]
    sets = robustness.load_sets(data_dir, "val", ("mint", "ieval"))
    robust = robustness.run_suite(predict, sets)
    items = written.load_written("val")
    hand = written.written_eval(items, predict([d for item in items for d in written.dialogues(item)])) if items else {}
    summary = {
        "mint_reception": _get(chat, "mint", "aggregated", "all", "reception", "accuracy"),
        "mint_combined": _get(chat, "mint", "aggregated", "all", "combined", "accuracy"),
        "mint_length_matched": _get(chat, "mint", "aggregated", "length_matched", "combined", "accuracy"),
        "ieval_combined": _get(chat, "ieval", "pairs", "reception", "combined", "accuracy"),
        "epitome_resonation": _get(older, "correlation", "resonation/epitome", "pearson"),
        "counselchat": _get(older, "pairs", "bystander/counselchat", "accuracy"),
        "robust_worst": max(r["worst"][o] for r in robust.values() for o in r["worst"]),
        "ladder_real>generic": _get(older, "pairs", "reception/cf:ladder_real>generic", "accuracy"),
        "ladder_generic>dismissive": _get(older, "pairs", "reception/cf:ladder_generic>dismissive", "accuracy"),
        "ladder_generic>offtopic": _get(older, "pairs", "reception/cf:ladder_generic>offtopic", "accuracy"),
        "written_warm>generic": _get(hand, "rates", "combined", "warm>generic"),
        "written_generic>bad": _get(hand, "rates", "combined", "generic>bad"),
    }
    return {"summary": summary, "chatbot": chat, "older": older, "robustness": robust, "written": hand}


def selection_score(s: dict) -> float:
    """One number to choose by: robustness first (the worst rewrite's share above the
    original, weighted 3x), then agreement with people and the judge, and the old sources."""
    parts = [
        3 * (1 - s["robust_worst"]),
        s["mint_combined"],
        s["mint_length_matched"],
        s["ieval_combined"],
        s["counselchat"],
        0.5 + s["epitome_resonation"],
        s["ladder_real>generic"],
        s.get("written_warm>generic", float("nan")),
        s.get("written_generic>bad", float("nan")),
    ]
    return float(np.nansum(parts))


def save_shards(folder: Path, out: Path, max_bytes: int = 15 * 2**20) -> list[Path]:
    """The checkpoint's weights as fp16 safetensors shards of at most `max_bytes`."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in state.items():
        t = tensor.half().contiguous()
        rows = max(1, max_bytes // max(1, t[0].numel() * 2)) if t.dim() else 1
        pieces = [t] if t.numel() * 2 <= max_bytes else list(t.split(rows))
        for k, piece in enumerate(pieces):
            key = name if len(pieces) == 1 else f"{name}::{k:03d}"
            if shards[-1] and size + piece.numel() * 2 > max_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = piece.contiguous()
            size += piece.numel() * 2
    paths = []
    for k, shard in enumerate(shards):
        paths.append(out / f"weights-{k:02d}.fp16.safetensors")
        save_file(shard, str(paths[-1]))
    return paths


def join_shards(folder: Path, out: Path) -> Path:
    """fp16 shards (save_shards) back into one fp32 `model.safetensors` in `out`."""
    import torch
    from safetensors.torch import load_file, save_file

    parts: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for path in sorted(folder.glob("weights-*.fp16.safetensors")):
        for key, value in load_file(str(path)).items():
            name = key.split("::")[0]
            parts.setdefault(name, []).append((key, value.float()))
    state = {name: torch.cat([v for _, v in sorted(p)]) if len(p) > 1 else p[0][1] for name, p in parts.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    return out / "model.safetensors"


def _validate(name: str, final: Path, out: Path, args) -> dict:
    """Validate one run's final checkpoint, print its summary and keep the report in `out`."""
    started = time.time()
    report = validation_report(final, Path(args.data), args.device)
    report["score"] = selection_score(report["summary"])
    print(
        name,
        json.dumps(report["summary"]),
        "score",
        round(report["score"], 4),
        f"({time.time() - started:.0f} s)",
        flush=True,
    )
    (out / f"{name}.val.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parallel", action="store_true")
    parser.add_argument("--shards", action="store_true", help="write the chosen weights as fp16 shards")
    parser.add_argument("--skip-train", action="store_true", help="evaluate finished runs only")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for path in args.configs:
        cfg = json.loads(Path(path).read_text())
        runs[Path(path).stem] = Path(cfg["out_dir"])
    if not args.skip_train:
        procs = []
        for path in args.configs:
            cmd = [
                sys.executable,
                "-c",
                f"from perm_lite.training.train import TrainConfig, train; train(TrainConfig.from_file({path!r}))",
            ]
            log = open(out / f"{Path(path).stem}.log", "w")  # noqa: SIM115 - closed with the process
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, path))
            if not args.parallel:
                procs[-1][0].wait()
        for proc, log, path in procs:
            code = proc.wait()
            log.close()
            print(f"{path}: exit {code}", flush=True)
    figures = {}
    for name, run in runs.items():
        final = run / "final"
        if not (final / "model.safetensors").exists():
            figures[name] = {"error": "no final checkpoint"}
            continue
        figures[name] = _validate(name, final, out, args)
    scored = {n: r["score"] for n, r in figures.items() if "score" in r}
    chosen = max(scored, key=scored.get) if scored else None
    (out / "selection.json").write_text(
        json.dumps(
            {"chosen": chosen, "scores": scored, "summaries": {n: r.get("summary") for n, r in figures.items()}},
            indent=1,
        )
    )
    if chosen:
        final = runs[chosen] / "final"
        if args.shards:
            save_shards(final, out / "selected")
        else:
            shutil.copytree(final, out / "selected", dirs_exist_ok=True)
        for extra in ("train_config.json", "encoder_config.json"):
            if (final / extra).exists():
                shutil.copy(final / extra, out / "selected" / extra)
        finds = runs[chosen] / "redteam_finds.jsonl"
        if finds.exists():
            shutil.copy(finds, out / "selected" / "redteam_finds.jsonl")
    print("chosen:", chosen, flush=True)


if __name__ == "__main__":
    main()
