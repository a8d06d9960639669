"""Tables of the quality benchmark: console summary and the generated part of docs/RESULTS.md."""

from __future__ import annotations

import math
import re
from pathlib import Path

from .truths import view_lines

BEGIN, END = "<!-- bench-quality:begin -->", "<!-- bench-quality:end -->"
NLG = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
CE = ("CE_F1_macro", "CE_F1_micro_13", "CE_F1_micro")
BOLD_LINE = "**These are synthetic-image results, not IU-Xray results.**"


def _f(v: object) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _decoding(job: dict) -> str:
    """The decoding a job's test reports were made with: the guidance weight, and MBR where it was kept."""
    mbr = job.get("mbr_samples", 0)
    return f"{job.get('guidance', 0):g}" + (f", findings-preserving MBR over {mbr} samples" if mbr else "")


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def systems_table(result: dict) -> list[str]:
    cols = [m for m in NLG + CE if any(m in s for s in result["systems"].values())]
    lines = [_row(["system"] + cols + ["label mean AUC"]), _row(["---"] + ["---:"] * (len(cols) + 1))]
    for name, s in result["systems"].items():
        job = result.get("ifnet_jobs", {}).get(name, {})
        auc = job.get("label_head_test", {}).get("mean_auc")
        lines.append(_row([name] + [_f(s.get(m)) for m in cols] + [_f(auc)]))
    key = result.get("probe_for_goals", result["iec_for_ifnet"])
    probe = result["probe"][key]["test"]
    probe_cells = {"CE_F1_macro": probe["F1_macro"], "CE_F1_micro_13": probe["F1_micro_13"]}
    lines.append(_row([f"probe: labels directly (iec={result['iec_for_ifnet']}"
                       + (", top-tuned CNN)" if key == "tuned" else ")")]
                      + [_f(probe_cells[m]) if m in probe_cells else "" for m in cols] + [_f(probe["mean_auc"])]))
    return lines


def goals_table(result: dict) -> list[str]:
    lines = [_row(["goal", "measured", "target", "met"]), _row(["---", "---:", "---:", "---"])]
    for name, g in result.get("goals", {}).items():
        lines.append(_row([name, _f(g["value"]), _f(g["target"]), "yes" if g["met"] else "**no**"]))
    return lines


def iec_tables(parts: dict) -> list[str]:
    """Probe per IEC variant (always in the run) and IFNet per IEC variant (main + ablations)."""
    res = parts.get("all") or parts.get("main") or parts.get("ablations")
    lines = ["Label probe (logistic regression on the pooled features; the 14 labels scored directly):", "",
             _row(["IEC", "val mean AUC", "test macro-F1", "test micro-F1 (13)", "test mean AUC",
                   "low-quality macro-F1", "low-quality micro-F1 (13)", "low-quality mean AUC",
                   "normal macro-F1", "normal mean AUC"]),
             _row(["---"] + ["---:"] * 9)]
    for kind, p in res["probe"].items():
        lq, nq = p["test_low_quality"], p["test_normal_quality"]
        label = f"{res['iec_for_ifnet']} + top tuning" if kind == "tuned" else kind
        lines.append(_row([label, _f(p["val"]["mean_auc"]), _f(p["test"]["F1_macro"]), _f(p["test"]["F1_micro_13"]),
                           _f(p["test"]["mean_auc"]), _f(lq["F1_macro"]), _f(lq["F1_micro_13"]), _f(lq["mean_auc"]),
                           _f(nq["F1_macro"]), _f(nq["mean_auc"])]))
    rows = []
    for part in ("all", "main", "ablations"):
        r = parts.get(part)
        if not r:
            continue
        for name, s in r["systems"].items():
            if not name.startswith("IFNet") or "softmax" in name:
                continue
            job = r["ifnet_jobs"][name]
            kind = (job["iec"], job.get("feature_kind") == "tuned")
            if any(k == kind for k, _ in rows):
                continue
            rows.append((kind, s))
    if rows:
        lines += ["", "IFNet (linear attention), generated reports:", "",
                  _row(["IEC", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "CE macro-F1", "CE micro-F1 (13)",
                        "low-quality BLEU_4", "low-quality CE macro-F1", "low-quality CE micro-F1 (13)",
                        "normal CE micro-F1 (13)"]),
                  _row(["---"] + ["---:"] * 10)]
        order = {"none": 0, "clahe": 1, "adaptive": 2}
        for (kind, tuned), s in sorted(rows, key=lambda r: (order[r[0][0]], r[0][1])):
            lq, nq = s.get("low_quality", {}), s.get("normal_quality", {})
            lines.append(_row([kind + (" + top tuning" if tuned else ""), _f(s["BLEU_4"]), _f(s.get("METEOR")), _f(s["ROUGE_L"]), _f(s["CIDEr"]),
                               _f(s["CE_F1_macro"]), _f(s["CE_F1_micro_13"]), _f(lq.get("BLEU_4")),
                               _f(lq.get("CE_F1_macro")), _f(lq.get("CE_F1_micro_13")), _f(nq.get("CE_F1_micro_13"))]))
    return lines


def attention_table(parts: dict) -> list[str]:
    found = {}
    for part in ("all", "main", "ablations"):
        r = parts.get(part)
        if not r:
            continue
        for name, s in r["systems"].items():
            if name == "IFNet" or name == "IFNet softmax attention":
                job = r["ifnet_jobs"][name]
                found["softmax" if "softmax" in name else "linear"] = (s, job)
    if len(found) < 1:
        return []
    lines = [_row(["attention", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "CE macro-F1", "CE micro-F1 (13)",
                   "train s", "best epoch"]), _row(["---"] + ["---:"] * 8)]
    for kind in ("linear", "softmax"):
        if kind in found:
            s, job = found[kind]
            lines.append(_row([kind, _f(s["BLEU_4"]), _f(s.get("METEOR")), _f(s["ROUGE_L"]), _f(s["CIDEr"]),
                               _f(s["CE_F1_macro"]), _f(s["CE_F1_micro_13"]), f"{job['seconds']['train']:.0f}",
                               job["best_epoch"]]))
    return lines


SEED_METRICS = ("BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "CE_F1_macro", "CE_F1_micro_13")


def seeds_tables(parts: dict) -> list[str]:
    """Part ``seeds``: IFNet per seed, mean +- std, and the goals judged on the mean (targets from part main)."""
    r = parts.get("seeds")
    if not r or "seeds" not in r:
        return []
    summary = r["seeds"]["metrics"]
    cols = [m for m in SEED_METRICS if m in summary]
    lines = [f"Part `seeds`: measured {r['date']}, git `{r['git_revision']}`, wall time **{r['wall_seconds'] / 60:.1f} "
             f"min**; the same config and features, {r['seeds']['runs']} seeds.", "",
             _row(["run"] + cols + ["best epoch", "condition", "guidance"]), _row(["---"] + ["---:"] * (len(cols) + 3))]
    for name, s in r["systems"].items():
        if name.startswith("IFNet seed="):
            job = r["ifnet_jobs"].get(name, {})
            lines.append(_row([name.removeprefix("IFNet ")] + [_f(s.get(m)) for m in cols]
                              + [job.get("best_epoch", "-"), job.get("condition_mode", "-"), _decoding(job)]))
    lines.append(_row(["**mean +- std**"] + [f"**{summary[m]['mean']:.3f} +- {summary[m]['std']:.3f}**" for m in cols]
                      + ["", "", ""]))
    main = parts.get("all") or parts.get("main")
    if main and main.get("goals"):
        lines += ["", "Goals judged on the mean over seeds (targets from the floors and probe of part "
                  f"`{main['part']}`):", "", _row(["goal", "mean +- std", "target", "met by the mean", "seeds meeting it"]),
                  _row(["---", "---:", "---:", "---", "---:"])]
        for goal, g in main["goals"].items():
            m = summary.get(g.get("metric", ""))
            if m is None:
                continue
            hits = sum(v >= g["target"] for v in m["values"])
            lines.append(_row([goal, f"{m['mean']:.3f} +- {m['std']:.3f}", _f(g["target"]),
                               "yes" if m["mean"] >= g["target"] else "**no**", f"{hits} of {len(m['values'])}"]))
    return lines


def console_table(result: dict) -> str:
    out = [BOLD_LINE, "", *systems_table(result)]
    if result.get("goals"):
        out += ["", *goals_table(result)]
    if result.get("seeds"):
        out += ["", *seeds_tables({"seeds": result})]
    return "\n".join(out)


def tuning_lines(r: dict) -> list[str]:
    """One paragraph on the top tuning of the run (ifnet.models.tuning), or nothing when it was off."""
    t = r.get("top_tuning")
    if not t:
        return []
    hist = ", ".join(f"{h['val_mean_auc']:.3f}" for h in t["history"])
    frozen, tuned = r["probe"][r["iec_for_ifnet"]]["val"]["mean_auc"], r["probe"]["tuned"]["val"]["mean_auc"]
    return [f"Top tuning (`ifnet.models.tuning`): EfficientNet-Lite0's stride-32 stage and head conv trained on "
            f"the {r['iec_for_ifnet']} images' cached activations against the training labels (labeler on the "
            f"findings + CheXbert), {len(t['history'])} epochs in {t['seconds'] / 60:.1f} min"
            + (" (loaded from the cache of an earlier run)" if t.get("cached") else "")
            + f"; validation mean AUC of its head on the findings labels per epoch {hist}, epoch "
            f"{t['best_epoch']} kept. Probe validation mean AUC: frozen {frozen:.3f}, tuned {tuned:.3f}, so IFNet, "
            f"retrieval and the goals' probe use the **{'tuned' if t['used'] else 'frozen'}** features.", ""]


def truths_lines(r: dict) -> list[str]:
    """The validation two-truth view (benchmarks/quality/truths.py), or nothing for runs that predate it."""
    view = r.get("val_truths")
    if not view:
        return []
    return ["### Validation: CE against the findings text and against the labels the images were drawn from", "",
            f"A diagnostic, never used for a choice ({view['studies']} validation studies; macro-F1 over the 14 "
            "labels / micro-F1 over the 13 findings). The first column is the benchmark's CE (the labeler on the "
            "reference findings text); the second scores the same reports against the CheXbert labels of the "
            "impression, from which the images were rendered (withheld for test). Each system's IFNet reports are "
            "those of its chosen validation setting. \"Retrieval with the true labels\" takes the train study "
            "whose drawn labels are nearest.", "", *view_lines(view), ""]


def generated_section(merged: dict) -> str:
    parts = merged["parts"]
    main = parts.get("all") or parts.get("main")
    out = [BOLD_LINE, ""]
    if main:
        feats = main["data"]["features"]
        out += [f"Part `{main['part']}`: measured {main['date']}, git `{main['git_revision']}`, wall time "
                f"**{main['wall_seconds'] / 60:.1f} min** ({main['cpu_seconds'] / 60:.1f} CPU-min; "
                f"{main['machine']['cpus']} CPUs, {main['machine']['jobs']} jobs, load average at the end "
                f"{main['machine']['load_average_at_end'][0]:.1f}). IFNet uses IEC `{main['iec_for_ifnet']}` "
                f"(best validation mean AUC of the probe). Config `{main['config']['file']}`"
                + (f" with `--set {' '.join(main['config']['overrides'])}`" if main['config']['overrides'] else "")
                + f" ({main['config']['resolved']['optim']['epochs']} epochs). Image features "
                + ("were loaded from the cache of an earlier run (the wall time excludes computing them)."
                   if feats.get("cached") else f"were computed in this run ({sum(feats['shard_seconds']):.0f} "
                                                f"job-seconds)."), "",
                *tuning_lines(main),
                "### Systems on the test split (590 studies)", "", *systems_table(main), "",
                "### Goals", "", *goals_table(main), ""]
        ifnet = main["ifnet_jobs"].get("IFNet")
        if ifnet:
            monitor = ifnet.get("monitor", "BLEU_4")
            out += [f"IFNet: best epoch {ifnet['best_epoch']} of {ifnet['epochs_run']} (validation {monitor}); "
                    f"decoded with the **{ifnet['condition_mode']}** label predictions as the condition and "
                    f"guidance weight **{_decoding(ifnet)}**, chosen on validation by the same monitor "
                    "from these (validation CE macro-F1 / BLEU_4 / distinct reports):", ""]
            out += [f"* {m}: {v['CE_F1_macro']:.3f} / {v['BLEU_4']:.3f} / {int(v.get('distinct_reports', 0))}"
                    for m, v in ifnet["val_condition_modes"].items()]
            diag = ifnet.get("val_oracle_condition_diagnostic") or {}
            if "CE_F1_macro" in diag:  # older runs: one entry without guidance
                diag = {"guidance=0": diag}
            if diag:
                out += ["", "Diagnostic on validation, never used for a choice: conditioned on the validation "
                        "*reference* labels, the decoder reaches " + "; ".join(
                            f"CE macro-F1 {d['CE_F1_macro']:.3f} with {int(d['distinct_reports'])} distinct reports "
                            f"at {k}" for k, d in diag.items())
                        + ". This bounds what better label predictions could give this decoder."]
            checks = [(split, ifnet[f"{split}_consistency"]) for split in ("val", "test")
                      if ifnet.get(f"{split}_consistency")]
            if checks:
                out += ["", "Report vs its condition (reference-free, `ifnet.metrics.consistency`; the same check "
                        "`ifnet evaluate` writes to consistency.json): " + "; ".join(
                            f"{'validation' if split == 'val' else 'test'}: {c['consistent_reports']} of {c['studies']} "
                            f"reports say exactly the findings they were decoded from, {c['reports_with_unsaid']} leave "
                            f"one unsaid, {c['reports_with_unsupported']} say one not in the condition (F1 macro "
                            f"{c['F1_macro']:.3f}, micro {c['F1_micro']:.3f})" for split, c in checks) + "."]
            out += [""]
        out += truths_lines(main)
    out += ["### IEC: none vs CLAHE vs adaptive, overall and on the low-quality subset", "", *iec_tables(parts), ""]
    att = attention_table(parts)
    if att:
        out += ["### Linear vs softmax attention (same config otherwise)", "", *att, ""]
    seeds = seeds_tables(parts)
    if seeds:
        out += ["### Seeds: IFNet's spread", "", *seeds, ""]
    abl = parts.get("ablations")
    if abl:
        out += [f"Part `ablations`: measured {abl['date']}, wall time **{abl['wall_seconds'] / 60:.1f} min**.", ""]
    return "\n".join(out).rstrip() + "\n"


def update_results_md(path: Path, merged: dict) -> None:
    section = generated_section(merged)
    text = path.read_text(encoding="utf-8") if path.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: f"{BEGIN}\n{section}{END}", text, flags=re.S)
    path.write_text(text, encoding="utf-8")
