"""Quality benchmark: IFNet against three floors and a label probe, on IU-Xray reports with synthetic images.

    .venv/bin/python benchmarks/bench_quality.py                    # part "main" (make bench-quality)
    .venv/bin/python benchmarks/bench_quality.py --part ablations   # IEC none/clahe/adaptive, linear vs softmax
    .venv/bin/python benchmarks/bench_quality.py --part seeds       # IFNet with 4 seeds: mean +- std per metric
    .venv/bin/python benchmarks/bench_quality.py --smoke            # tiny subset, under a minute, nothing in docs
    .venv/bin/python benchmarks/bench_quality.py --docs-only        # rewrite docs/RESULTS.md from quality.json

**These are synthetic-image results, not IU-Xray results.** The reports, the R2Gen split and the train/val
labels are the real IU-Xray ones; the images are rendered by ``../shared/tools/synth_cxr.py`` from each
study's labels (train and val here, into the cache folder; the test images are pre-rendered in
``../shared/data/iu_xray_synth/images`` and their labels are withheld).

What one run does (every choice on validation only; the test split is decoded once per system, at the end):

1. Renders the train/val images if the cache lacks them and links the test images beside them.
2. Frozen pretrained EfficientNet-Lite0 features of every study, with and without CLAHE (the adaptive IEC's
   features are composed from the two: it leaves images judged normal unchanged), cached on disk.
3. Label probe per IEC variant (logistic regression on the pooled features, L2 and thresholds on
   validation), scored on the 14 labels directly. Test truth = the project's labeler run on the test
   reference reports, which is also how clinical efficacy (CE) labels references. The IEC variant with the
   best validation mean AUC of the probe is the one IFNet uses in part "main".
4. Floors: (a) the most frequent train report, (b) the train report of the nearest image (cosine on centred
   pooled features), (c) the same IFNet config trained and decoded with blanked images (text only).
5. IFNet (configs/iu_synth_cpu.yaml) trained on the cached features, two jobs at a time, one thread each.
6. Scores on the test split: BLEU-1..4, METEOR, ROUGE-L, CIDEr, CE (14-label macro/micro F1, micro-F1 over
   the 13 findings), also on the low-quality subset (``quality.json``); goals checked; results written to
   bench-results/quality.json and the tables of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from quality import report as report_mod  # noqa: E402
from quality.floors import constant_floor, retrieval_floor, run_probe  # noqa: E402
from quality.systems import JobSpec, train_and_decode  # noqa: E402
from quality.truths import findings_labels, two_truth_view  # noqa: E402  (at the top: a run must not import code changed mid-run)

DEFAULT_SHARED = Path(os.environ.get("IFNET_SHARED", REPO.parent / "shared"))
IEC_KINDS = ("none", "clahe", "adaptive")
SMOKE_SIZES = {"train": 32, "val": 12, "test": 12}
SMOKE_OVERRIDES = ["model.num_memory_slots=16", "model.memory_top_k=4", "model.memory_heads=2",
                   "model.transformer={d_model: 32, num_heads: 2, num_encoder_layers: 1, num_decoder_layers: 1, d_ff: 64}",
                   "data.image_size=64", "optim.epochs=1", "eval.beam_size=1", "eval.max_len=20"]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("main", "ablations", "all", "seeds"), default="main",
                   help="main: floors, probes, IFNet, text-only floor; ablations: the other IEC variants and softmax "
                        "attention; all: both; seeds: IFNet trained with --seeds seeds (config seed, +1, ...), "
                        "mean +- std per metric (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=4, help="IFNet runs of part seeds (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="tiny subset and model, < 1 min; writes only under the cache")
    p.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the read-only shared/ folder")
    p.add_argument("--cache-dir", type=Path, default=REPO / "bench-results" / "tmp" / "quality",
                   help="rendered images, feature caches and runs (git-ignored; default: %(default)s)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "iu_synth_cpu.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every IFNet job (e.g. optim.epochs=4)")
    p.add_argument("--jobs", type=int, default=2, help="parallel single-threaded jobs (default: 2, one per core)")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: bench-results/quality.json)")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "RESULTS.md")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite the tables in --docs")
    p.add_argument("--top-tuning", choices=("on", "off"), default="off",
                   help="on: fine-tune the top stage of the CNN on the training labels (ifnet.models.tuning, epoch "
                        "chosen on validation) and give IFNet, retrieval and the probe its features when a probe on "
                        "them beats the frozen features' probe on validation. Off by default: over four seeds it "
                        "left IFNet's validation monitor unchanged (docs/RESULTS.md) (default: %(default)s)")
    p.add_argument("--mbr-samples", type=int, default=32, metavar="N",
                   help="also try findings-preserving MBR decoding over N samples (ifnet.decoding.mbr) on validation, "
                        "at each system's chosen condition mode and guidance, and decode test with it where it "
                        "raises the validation monitor (it did for IFNet on all four seeds, docs/RESULTS.md); "
                        "0 = beam search only (default: %(default)s)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java)")
    p.add_argument("--docs-only", action="store_true",
                   help="only regenerate the tables in --docs from the existing --out JSON (no computation)")
    return p.parse_args(argv)


class Clock:
    """Wall time per stage, in order."""

    def __init__(self) -> None:
        self.start = time.time()
        self.stages: dict[str, float] = {}
        self._t = self.start

    def lap(self, name: str) -> None:
        now = time.time()
        self.stages[name] = round(now - self._t, 1)
        self._t = now
        print(f"[{now - self.start:7.1f} s] {name} done ({self.stages[name]:.1f} s)", flush=True)


# -- data ---------------------------------------------------------------------------------------------

def prepare_images(shared: Path, cache: Path, studies: dict[str, list], jobs: int, smoke: bool) -> dict:
    """Render missing train/val studies with synth_cxr.py; symlink the pre-rendered test studies."""
    root = cache / "images"
    root.mkdir(parents=True, exist_ok=True)
    tool = shared / "tools" / "synth_cxr.py"
    missing = {split: [s for s in studies[split] if not all((root / p).exists() for p in s.image_paths)]
               for split in ("train", "val")}
    rendered = {split: len(m) for split, m in missing.items()}
    whole = [split for split in ("train", "val") if missing[split] and len(missing[split]) == len(studies[split])
             and not smoke]
    for split in whole:  # a whole split: the renderer's own split selection
        subprocess.run([sys.executable, str(tool), "--out", str(root), "--workers", str(jobs), "--split", split,
                        "--meta", f"synth_meta_{split}.jsonl"], check=True)
    rest = [s.id for split in ("train", "val") if split not in whole for s in missing[split]]
    if rest:  # a subset (smoke) or a partly rendered cache: by id, in one call (one CT set-up)
        subprocess.run([sys.executable, str(tool), "--out", str(root), "--workers", str(jobs), "--ids", ",".join(rest),
                        "--meta", "synth_meta_ids.jsonl"], check=True)
    test_src = shared / "data" / "iu_xray_synth" / "images"
    for s in studies["test"]:
        link = root / s.id
        if not link.exists():
            link.symlink_to((test_src / s.id).resolve(), target_is_directory=True)
    return {"rendered": rendered, "image_root": str(root)}


def write_subset_annotation(src: Path, dst: Path, sizes: dict[str, int]) -> Path:
    data = json.loads(src.read_text())
    json.dump({k: v[: sizes[k]] for k, v in data.items() if k in sizes}, open(dst, "w"))
    return dst


def feature_folder(studies: list, image_root: Path, image_cfg: Any, cache: Path, jobs: int, pool: Any,
                   with_clahe: bool) -> tuple[Path, dict]:
    from quality.features import compute_shard, fingerprint

    key = fingerprint(studies, image_root, image_cfg, "efficientnet_lite0")
    folder = cache / f"features-{key}"
    done = folder / "done.json"
    if done.exists():
        return folder, {"fingerprint": key, "cached": True}
    folder.mkdir(parents=True, exist_ok=True)
    shards = [studies[i::jobs] for i in range(jobs)]
    args = [(shard, image_root, image_cfg, folder / f"shard{i}", with_clahe) for i, shard in enumerate(shards)]
    seconds = pool.starmap(compute_shard, args)
    done.write_text(json.dumps({"shards": jobs, "kinds": ["none", "clahe"] if with_clahe else ["none"]}))
    return folder, {"fingerprint": key, "cached": False, "shard_seconds": seconds}


#: Label file of the top tuning's second set of targets: the CheXbert labels the images were rendered from
#: (train and val studies only; the tuning reads the train rows).
CHEXBERT_LABELS = Path("data") / "iu_xray" / "labels_14.json"


def top_tuned_folder(studies: list, ids: dict[str, list[str]], image_root: Path, image_cfg: Any, iec: str,
                     cache: Path, jobs: int, pool: Any, targets: dict, select_val: np.ndarray, low: dict,
                     tuning_cfg: Any) -> tuple[Path, dict]:
    """Bottom activations of the pretrained trunk (cached per image set and IEC), the top tuned on the train
    studies' ``targets`` with the epoch chosen on ``select_val`` (validation labels of the head's first 14
    outputs), and the tuned features of every study + the tuned trunk, in a folder keyed by all inputs."""
    import hashlib
    from dataclasses import asdict, replace

    import torch
    from safetensors.torch import load_file, save_file

    from quality.features import compute_mid_shard, fingerprint
    from ifnet.models.tuning import apply_per_study, tune_top
    from ifnet.models.visual import create_extractor

    cfg = replace(image_cfg, iec=iec)
    key = fingerprint(studies, image_root, cfg, "efficientnet_lite0")
    mid_dir = cache / f"mid-{key}-{iec}"
    info: dict = {"mid_folder": mid_dir.name}
    if not (mid_dir / "done.json").exists():
        mid_dir.mkdir(parents=True, exist_ok=True)
        shards = [studies[i::jobs] for i in range(jobs)]
        seconds = pool.starmap(compute_mid_shard, [(shard, image_root, cfg, mid_dir / f"shard{i}.safetensors")
                                                   for i, shard in enumerate(shards)])
        (mid_dir / "done.json").write_text(json.dumps({"shards": jobs, "iec": iec}))
        info["mid_shard_seconds"] = seconds
    h = hashlib.sha256(json.dumps({"mid": mid_dir.name, "tuning": asdict(tuning_cfg),
                                   "targets": [np.asarray(targets[i]).tolist() for i in ids["train"]],
                                   "select_val": select_val.tolist()}, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache / f"tuned-{h}"
    record = folder / "tuning.json"
    if record.exists():
        return folder, dict(info, **json.loads(record.read_text()), cached=True)
    mids: dict = {}
    for shard in sorted(mid_dir.glob("shard*.safetensors")):
        mids.update(load_file(str(shard)))
    net = create_extractor("efficientnet_lite0", pretrained=True, freeze=True)
    torch.set_num_threads(jobs)  # the pool is idle meanwhile
    try:
        result = tune_top(net, [mids[i] for i in ids["train"]], np.stack([targets[i] for i in ids["train"]]),
                          [mids[i] for i in ids["val"]], select_val, select=list(range(select_val.shape[1])),
                          views=image_cfg.max_views, config=tuning_cfg, log=lambda m: print(m, flush=True))
        _, top = net.split()
        feats = apply_per_study(top.eval(), mids.items(), batch_size=32)
    finally:
        torch.set_num_threads(1)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(feats, str(folder / "shard0-tuned.safetensors"))
    (folder / "shard0-low.json").write_text(json.dumps(low))
    save_file(net.trunk_state_dict(), str(folder / "trunk.safetensors"))
    out = {"iec": iec, "best_epoch": result.best_epoch, "best_val_mean_auc": result.best_val_mean_auc,
           "history": result.history, "config": result.config, "seconds": result.seconds,
           "trunk": str(folder / "trunk.safetensors")}
    record.write_text(json.dumps(out, indent=1))
    return folder, dict(info, **out, cached=False)


def _init_pool_worker() -> None:
    import torch

    torch.set_num_threads(1)


# -- scoring ------------------------------------------------------------------------------------------

def score_system(refs: dict, hyps: dict, ref_codes: np.ndarray, subsets: dict[str, np.ndarray],
                 meteor: bool) -> dict:
    """NLG + CE on the test split (and NLG/CE without METEOR on each subset), micro-F1 over 13 findings."""
    from ifnet.baselines import label_scores
    from ifnet.labels import to_binary
    from ifnet.metrics.scoring import score_reports

    metrics = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "CE") if meteor else ("BLEU", "ROUGE_L", "CIDEr", "CE")
    rep = score_reports(refs, {k: hyps[k] for k in refs}, metrics=metrics, ref_labels=ref_codes)
    from ifnet.labels import OBSERVATIONS

    hyp_codes = np.array([[row["hyp_labels"][o] for o in OBSERVATIONS] for row in rep.per_study])
    labels = label_scores(to_binary(ref_codes), to_binary(hyp_codes))
    out = {k: v for k, v in rep.scores.items()}
    out["CE_F1_micro_13"] = labels["F1_micro_13"]
    out["CE_per_observation"] = labels["per_observation"]
    ids = list(refs)
    for name, mask in subsets.items():
        sub_ids = [i for i, m in zip(ids, mask) if m]
        sub = score_reports({i: refs[i] for i in sub_ids}, {i: hyps[i] for i in sub_ids},
                            metrics=("BLEU", "ROUGE_L", "CIDEr", "CE"), ref_labels=ref_codes[mask])
        sub_codes = np.array([[row["hyp_labels"][o] for o in OBSERVATIONS] for row in sub.per_study])
        s = {k: v for k, v in sub.scores.items() if isinstance(v, float)}
        s["CE_F1_micro_13"] = label_scores(to_binary(ref_codes[mask]), to_binary(sub_codes))["F1_micro_13"]
        s["n"] = len(sub_ids)
        out[name] = s
    return out


def check_goals(systems: dict, probe: dict) -> dict:
    """The issue's goals, each with the metric it reads, the measured value, the target and whether it is met."""
    ifnet = systems.get("IFNet")
    if ifnet is None:
        return {}
    floors = {k: v for k, v in systems.items() if k.startswith("floor:")}
    best_floor_f1 = max(v["CE_F1_macro"] for v in floors.values())
    targets = {
        "CE_F1_macro >= 3x best floor": ("CE_F1_macro", 3 * best_floor_f1),
        "CE_F1_macro >= 0.9x probe macro-F1": ("CE_F1_macro", 0.9 * probe["test"]["F1_macro"]),
        "BLEU_4 >= 0.165": ("BLEU_4", 0.165),
        "moonshot CE_F1_macro >= 0.60": ("CE_F1_macro", 0.60),
    }
    for metric in ("METEOR", "ROUGE_L", "CIDEr"):
        if metric in ifnet:
            targets[f"{metric} not below any floor"] = (metric, max(v[metric] for v in floors.values()))
    goals = {name: {"metric": metric, "value": ifnet[metric], "target": target,
                    "met": bool(ifnet[metric] >= target)} for name, (metric, target) in targets.items()}
    return goals


def seed_summary(runs: dict[str, dict]) -> dict:
    """Mean, sample standard deviation, min and max over the seed runs of each scalar test metric."""
    out: dict = {"runs": len(runs), "metrics": {}}
    keys = [k for k in report_mod.NLG + report_mod.CE if runs and all(k in s for s in runs.values())]
    for k in keys:
        vals = np.array([float(s[k]) for s in runs.values()])
        out["metrics"][k] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                             "min": float(vals.min()), "max": float(vals.max()), "values": vals.tolist()}
    return out


# -- main ---------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.docs_only:
        path = args.out or REPO / "bench-results" / "quality.json"
        report_mod.update_results_md(args.docs, json.loads(path.read_text()))
        print(f"updated {args.docs} from {path}")
        return 0
    clock = Clock()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the spawned jobs
    import torch

    torch.set_num_threads(1)
    from ifnet.config import resolve
    from ifnet.data.annotation import load_annotation
    from ifnet.labels import to_binary
    from ifnet.metrics.scoring import reference_labels
    from ifnet.train.config import TrainConfig
    from ifnet.train.data import image_config
    from ifnet.train.runinfo import git_revision
    from ifnet.train.trainer import study_labels

    revision = git_revision(REPO)  # the code that runs: recorded at the start, not when the results are written

    cache = args.cache_dir / ("smoke" if args.smoke else "")
    cache.mkdir(parents=True, exist_ok=True)
    out_path = args.out or (cache / "quality-smoke.json" if args.smoke else REPO / "bench-results" / "quality.json")
    overrides = (SMOKE_OVERRIDES if args.smoke else []) + list(args.overrides)
    meteor = not (args.no_meteor or args.smoke)

    ann_path = args.shared / "data" / "iu_xray" / "annotation.json"
    if args.smoke:
        ann_path = write_subset_annotation(ann_path, cache / "annotation.json", SMOKE_SIZES)
    ann = load_annotation(ann_path, None, check_images=False)
    studies = {s: ann.split(s) for s in ("train", "val", "test")}
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(args.jobs, initializer=_init_pool_worker)
    try:
        data_info = prepare_images(args.shared, cache, studies, args.jobs, args.smoke)
        image_root = Path(data_info["image_root"])
        clock.lap("images")

        cfg = resolve(TrainConfig, args.config, overrides + [f"data.annotation={ann_path}",
                                                             f"data.image_root={image_root}"])
        all_studies = studies["train"] + studies["val"] + studies["test"]
        feat_dir, feat_info = feature_folder(all_studies, image_root, image_config(cfg.data), cache, args.jobs, pool,
                                             with_clahe=True)
        clock.lap("features")

        from quality.features import load_sets

        sets, low = load_sets(feat_dir)
        ids = {s: [x.id for x in studies[s]] for s in studies}
        train_reports = [x.report for x in studies["train"]]
        test_refs = {x.id: x.report for x in studies["test"]}
        val_refs = {x.id: x.report for x in studies["val"]}
        test_codes = reference_labels(test_refs, cleaner=cfg.data.cleaner)
        val_codes = reference_labels(val_refs, cleaner=cfg.data.cleaner)
        train_label_map = study_labels(studies["train"], cfg.data.labels)  # what IFNet's label head trains on
        y_train = np.stack([train_label_map[i] for i in ids["train"]]).astype(int)
        quality = json.loads((args.shared / "data" / "iu_xray_synth" / "quality.json").read_text())["quality"]
        lowq_mask = np.array([quality.get(i) is not None for i in ids["test"]])
        subsets = {"low_quality": lowq_mask, "normal_quality": ~lowq_mask}

        # Probes, one per IEC variant; the best validation mean AUC picks IFNet's IEC.
        probes = {}
        for kind in IEC_KINDS:
            pooled = {s: sets[kind].pooled(ids[s]) for s in ids}
            probes[kind] = run_probe(pooled["train"], y_train, pooled["val"], to_binary(val_codes),
                                     pooled["test"], to_binary(test_codes), subsets)
        main_iec = max(IEC_KINDS, key=lambda k: probes[k]["val"]["mean_auc"])
        clock.lap("probes")

        # Top tuning of the CNN on the main IEC's images; its features replace the frozen ones for IFNet,
        # retrieval and the goals' probe only if a probe on them is better on validation.
        main_source = {"features_dir": str(feat_dir), "feature_kind": None, "overrides": []}
        main_set = sets[main_iec]
        probe_key = main_iec
        tuning_info = None
        if args.top_tuning == "on":
            from ifnet.data.annotation import load_label_file
            from ifnet.models.tuning import TopTuningConfig

            chexbert = load_label_file(str(args.shared / CHEXBERT_LABELS))
            targets = {i: np.concatenate([train_label_map[i], np.asarray(chexbert[i], dtype=np.float32)])
                       for i in ids["train"]}
            tcfg = TopTuningConfig(epochs=1 if args.smoke else TopTuningConfig().epochs)
            tuned_dir, tuning_info = top_tuned_folder(all_studies, ids, image_root, image_config(cfg.data), main_iec,
                                                      cache, args.jobs, pool, targets, to_binary(val_codes), low, tcfg)
            tuned_set = load_sets(tuned_dir, ("tuned",))[0]["tuned"]
            pooled = {s: tuned_set.pooled(ids[s]) for s in ids}
            probes["tuned"] = run_probe(pooled["train"], y_train, pooled["val"], to_binary(val_codes),
                                        pooled["test"], to_binary(test_codes), subsets)
            tuning_info["used"] = probes["tuned"]["val"]["mean_auc"] > probes[main_iec]["val"]["mean_auc"]
            if tuning_info["used"]:
                main_source = {"features_dir": str(tuned_dir), "feature_kind": "tuned",
                               "overrides": [f"model.weights_path={tuning_info['trunk']}"]}
                main_set, probe_key = tuned_set, "tuned"
            clock.lap("top tuning")

        # Floors (a) and (b).
        hyps: dict[str, dict[str, str]] = {}
        constant_hyps, constant_text = constant_floor(train_reports, ids["test"])
        pooled_main = {s: main_set.pooled(ids[s]) for s in ("train", "test")}
        hyps["floor: constant report"] = constant_hyps
        hyps["floor: nearest-neighbour retrieval"] = retrieval_floor(pooled_main["train"], train_reports,
                                                                    pooled_main["test"], ids["test"])
        del sets
        clock.lap("floors a, b")

        # IFNet jobs.
        parts = (("main", "ablations", "seeds") if args.smoke  # smoke: all plumbing
                 else ("main", "ablations") if args.part == "all" else (args.part,))
        specs = []
        base = dict(config_path=str(args.config), overrides=overrides, features_dir=str(feat_dir),
                    test_ids=ids["test"], annotation=str(ann_path), image_root=str(image_root),
                    mbr_samples=args.mbr_samples)
        # IFNet's own features (frozen or top-tuned); the IEC ablation compares the three IEC variants on
        # frozen features, where each has its own cached set.
        main = dict(base, features_dir=main_source["features_dir"], feature_kind=main_source["feature_kind"],
                    overrides=overrides + main_source["overrides"])
        tuned = main_source["feature_kind"] is not None
        runs = cache / "runs"
        if "main" in parts:
            specs.append(JobSpec(name="IFNet", iec=main_iec, out_dir=str(runs / "ifnet"), **main))
            # The text-only floor keeps its epoch on plain beam search: guided validation decoding (the
            # config's eval.guidance) degenerates for a model that sees no findings. Its test decode still
            # picks the condition mode and guidance weight on validation, as IFNet's does.
            specs.append(JobSpec(name="floor: text-only (blank images)", iec="none", blank=True,
                                 out_dir=str(runs / "text_only"),
                                 **dict(main, overrides=main["overrides"] + ["eval.guidance=0"])))
        if "ablations" in parts:
            for kind in IEC_KINDS:
                if kind != main_iec or tuned:
                    name = f"IFNet iec={kind}" + (" (frozen CNN)" if tuned else "")
                    specs.append(JobSpec(name=name, iec=kind, out_dir=str(runs / f"ifnet_iec_{kind}"), **base))
            soft = dict(main, overrides=main["overrides"] + ["model.transformer.attention=softmax"])
            specs.append(JobSpec(name="IFNet softmax attention", iec=main_iec, out_dir=str(runs / "ifnet_softmax"),
                                 **soft))
        if "seeds" in parts:
            for seed in range(cfg.seed, cfg.seed + (2 if args.smoke else args.seeds)):
                specs.append(JobSpec(name=f"IFNet seed={seed}", iec=main_iec, out_dir=str(runs / f"ifnet_seed{seed}"),
                                     **dict(main, overrides=main["overrides"] + [f"seed={seed}"])))
        jobs = pool.map(train_and_decode, specs, chunksize=1)
        clock.lap("IFNet jobs")
    finally:
        pool.close()
        pool.join()

    job_info = {}
    val_hyps = {}
    for spec, res in zip(specs, jobs):
        hyps[spec.name] = res.pop("test_hyps")
        val_hyps[spec.name] = res.pop("val_hyps")
        job_info[spec.name] = res
    systems = {}
    for name, h in hyps.items():
        systems[name] = score_system(test_refs, h, test_codes, subsets if name.startswith("IFNet") else {}, meteor)
        print(f"scored {name}: BLEU_4 {systems[name]['BLEU_4']:.3f}  CE_F1_macro {systems[name]['CE_F1_macro']:.3f}",
              flush=True)
    clock.lap("scoring")

    # Validation CE against two truths (a diagnostic, never used for a choice): the findings text, as CE
    # everywhere else, and the CheXbert labels the images were drawn from (given for train and val only).
    from ifnet.data.annotation import load_label_file

    drawn = load_label_file(str(args.shared / CHEXBERT_LABELS))
    label_fn = functools.partial(findings_labels, cleaner=cfg.data.cleaner)

    val_truths = two_truth_view(
        train_reports=train_reports, y_train=label_fn(dict(zip(ids["train"], train_reports))),
        drawn_train=np.stack([drawn[i] for i in ids["train"]]), y_val=to_binary(val_codes),
        drawn_val=np.stack([drawn[i] for i in ids["val"]]), x_train=main_set.pooled(ids["train"]),
        x_val=main_set.pooled(ids["val"]), val_ids=ids["val"], generated=val_hyps, label_fn=label_fn)
    clock.lap("two-truth view")

    # Label-head view of each IFNet job, scored like the probe (thresholds from validation).
    from ifnet.baselines import apply_thresholds, label_scores

    for name, info in job_info.items():
        th = np.array([info["thresholds"][o]["threshold"] for o in info["thresholds"]])
        pt = np.array(info.pop("test_label_probs"))
        info.pop("val_label_probs", None)
        info.pop("val_ids", None)
        info["label_head_test"] = {k: v for k, v in label_scores(to_binary(test_codes), apply_thresholds(pt, th), pt)
                                   .items() if k != "per_observation"}

    ru_self, ru_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    part_key = "smoke" if args.smoke else args.part
    result = {
        "part": part_key,
        "note": "These are synthetic-image results, not IU-Xray results: real IU-Xray reports and split, images "
                "rendered from labels by shared/tools/synth_cxr.py.",
        "git_revision": revision,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "jobs": args.jobs, "load_average_at_end": os.getloadavg()},
        "wall_seconds": round(time.time() - clock.start, 1),
        "cpu_seconds": round(ru_self.ru_utime + ru_self.ru_stime + ru_children.ru_utime + ru_children.ru_stime, 1),
        "stages_seconds": clock.stages,
        "data": {"annotation": str(ann_path), "studies": {k: len(v) for k, v in studies.items()},
                 **data_info, "features": feat_info,
                 "test_low_quality_studies": int(lowq_mask.sum()),
                 "val_images_judged_low_quality": int(sum(sum(low[i]) for i in ids["val"])),
                 "test_truth": "ifnet.labeler on the cleaned test reference reports (as CE labels references)"},
        "config": {"file": str(args.config.relative_to(REPO)) if args.config.is_relative_to(REPO) else str(args.config),
                   "overrides": overrides, "resolved": json.loads(json.dumps(_to_dict(cfg)))},
        "iec_for_ifnet": main_iec,
        "top_tuning": tuning_info,
        "probe_for_goals": probe_key,
        "constant_report": constant_text,
        "probe": probes,
        "systems": systems,
        "ifnet_jobs": job_info,
        "goals": check_goals(systems, probes[probe_key]) if "main" in parts else {},
        "val_truths": val_truths,
    }
    if "seeds" in parts:
        result["seeds"] = seed_summary({n: s for n, s in systems.items() if n.startswith("IFNet seed=")})
    merged = _merge(out_path, part_key, result)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(merged, indent=1, default=_json_default) + "\n")
    print(report_mod.console_table(result))
    print(f"wrote {out_path}  (wall {result['wall_seconds']:.0f} s, cpu {result['cpu_seconds']:.0f} s)")
    if not args.smoke and not args.no_docs:
        report_mod.update_results_md(args.docs, merged)
        print(f"updated {args.docs}")
    return 0


def _merge(path: Path, part: str, result: dict) -> dict:
    """quality.json keeps one entry per part, so main and ablations can run separately."""
    merged: dict = {"parts": {}}
    if path.exists():
        try:
            merged = json.loads(path.read_text())
        except json.JSONDecodeError:
            merged = {"parts": {}}
    merged.setdefault("parts", {})
    if part == "all":
        merged["parts"].pop("main", None)
        merged["parts"].pop("ablations", None)
    elif part in ("main", "ablations"):
        merged["parts"].pop("all", None)
    merged["parts"][part] = result
    merged["note"] = result["note"]
    return merged


def _to_dict(cfg: Any) -> Any:
    from ifnet.config import to_dict

    return to_dict(cfg)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


if __name__ == "__main__":
    sys.exit(main())
