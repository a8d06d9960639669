"""What int8 costs in report quality: decode the same studies with each variant of an export and score them.

:func:`compare_variants` decodes up to ``limit`` studies of one split with the fp32 and int8 graphs (and,
optionally, the source checkpoint in PyTorch), then reports per variant BLEU-4, ROUGE-L, CIDEr and the
clinical-efficacy F1 (labeler on generated vs reference reports), the change against fp32, and how many
studies got exactly the same tokens as fp32. ``ifnet export --int8 --compare N`` and
``benchmarks/bench_latency.py`` call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ifnet.errors import IFNetError
from ifnet.io_utils import PathLike

__all__ = ["compare_variants", "REPORTED_METRICS"]

#: The scores shown per variant (keys of :func:`ifnet.metrics.scoring.score_reports`).
REPORTED_METRICS = ("BLEU_4", "ROUGE_L", "CIDEr", "CE_F1_micro", "CE_F1_macro")


def compare_variants(export_dir: PathLike, *, annotation: Optional[PathLike] = None,
                     image_root: Optional[PathLike] = None, split: str = "test", limit: int = 20,
                     variants: Sequence[str] = ("fp32", "int8"), checkpoint: Optional[PathLike] = None,
                     beam_size: Optional[int] = None, max_len: Optional[int] = None,
                     threads: Optional[int] = None) -> dict:
    """Scores per variant on ``limit`` studies of ``split``; ``annotation``/``image_root`` default to the
    training data recorded in the manifest. ``checkpoint`` adds the PyTorch model as variant ``"pytorch"``."""
    from ifnet.data.annotation import load_annotation
    from ifnet.data.dataset import ReportDataset
    from ifnet.export.runtime import OnnxModel, read_manifest, torch_single_thread
    from ifnet.metrics.scoring import score_reports

    manifest = read_manifest(export_dir, check_files=False)
    data = manifest["data_config"]
    annotation = Path(annotation or data["annotation"])
    image_root = Path(image_root or data["image_root"])
    if not annotation.is_file():
        raise IFNetError(f"{annotation}: annotation not found (pass --compare-annotation and --compare-images)")
    ann = load_annotation(annotation, image_root, check_images=True, splits=(split,),
                          max_views=manifest["model"]["max_views"])
    studies = ann.split(split)[:limit]
    if not studies:
        raise IFNetError(f"{annotation}: split {split!r} is empty")
    models = {v: OnnxModel(export_dir, variant=v, threads=threads) for v in variants}
    tokenizer = next(iter(models.values())).tokenizer
    ds = ReportDataset(studies, image_root, tokenizer, next(iter(models.values())).image_config,
                       data.get("max_tokens", 60), None, train=False)
    beam_size = beam_size or manifest["decoding"]["beam_size"]
    max_len = max_len or manifest["decoding"]["max_len"]
    # every variant decodes with the checkpoint's guidance weight (IFNet.generate's own default is 0)
    guidance = float(manifest["decoding"].get("guidance", 0.0))
    decoders = {v: (lambda m: lambda images, mask: m.generate(images, mask, beam_size=beam_size, max_len=max_len,
                                                              guidance=guidance))(m) for v, m in models.items()}
    if checkpoint is not None:
        from ifnet.models.checkpoint import load_checkpoint

        torch_model = load_checkpoint(checkpoint)[0]
        decoders["pytorch"] = lambda images, mask: torch_model.generate(images, mask, beam_size=beam_size,
                                                                        max_len=max_len, guidance=guidance)
    tokens: dict[str, dict[str, list[int]]] = {v: {} for v in decoders}
    refs: dict[str, str] = {}
    with torch.no_grad(), torch_single_thread():  # quality, not speed: no OpenMP waits on a busy machine
        for item in ds:
            images, mask = item["images"][None], item["view_mask"][None]
            refs[item["id"]] = item["report"]
            for name, decode in decoders.items():
                tokens[name][item["id"]] = decode(images, mask)[0].tolist()
    cleaner = data.get("cleaner", "iu_xray")
    result: dict = {"split": split, "studies": len(refs), "annotation": str(annotation), "beam_size": beam_size,
                    "max_len": max_len, "guidance": guidance, "variants": {}}
    base = "fp32" if "fp32" in tokens else next(iter(tokens))
    for name, toks in tokens.items():
        hyps = {sid: tokenizer.decode(t) or "." for sid, t in toks.items()}
        scores = score_reports(refs, hyps, cleaner=cleaner, metrics=("BLEU", "ROUGE_L", "CIDEr", "CE")).scores
        row = {k: round(float(scores[k]), 4) for k in REPORTED_METRICS if k in scores}
        row["same_tokens_as_" + base] = round(sum(toks[s] == tokens[base][s] for s in toks) / len(toks), 4)
        result["variants"][name] = row
    for name, row in result["variants"].items():
        if name != base:
            row["change_vs_" + base] = {k: round(row[k] - result["variants"][base][k], 4)
                                        for k in REPORTED_METRICS if k in row}
    return result
