"""Training logs: a CSV file (one row per epoch), TensorBoard scalars, and a PNG of the curves."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Mapping

from ifnet.io_utils import atomic_write_bytes, atomic_write_text


class MetricsLog:
    """Append-only epoch log kept in memory and rewritten atomically as CSV after each epoch.

    Rewriting (not appending) keeps the file consistent with a resumed run: rows after the
    resumed epoch are dropped rather than duplicated.
    """

    def __init__(self, csv_path: Path, tensorboard_dir: Path | None = None) -> None:
        self.csv_path = Path(csv_path)
        self.rows: list[dict[str, float]] = []
        self._tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def load(self, upto_epoch: int) -> None:
        """Reload rows with epoch <= ``upto_epoch`` from an existing CSV (for --resume)."""
        if not self.csv_path.exists():
            return
        with open(self.csv_path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                parsed = {k: _number(v) for k, v in row.items()}
                if parsed.get("epoch", math.inf) <= upto_epoch:
                    self.rows.append(parsed)

    def log(self, row: Mapping[str, float]) -> None:
        self.rows.append(dict(row))
        if self._tb is not None:
            step = int(row.get("epoch", len(self.rows)))
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k.replace("_", "/", 1) if k.startswith(("train_", "val_")) else k, v, step)
            self._tb.flush()
        self._write_csv()

    def _write_csv(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys.extend(k for k in r if k not in keys)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: r.get(k, "") for k in keys})
        atomic_write_text(self.csv_path, buf.getvalue())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _number(text: str | None) -> float:
    """A CSV cell back as the number it was written from: ``1`` stays an int (so a resumed run rewrites
    ``1``, not ``1.0``), an empty cell is NaN."""
    if text in ("", None):
        return math.nan
    try:
        return int(text)
    except ValueError:
        return float(text)


def plot_curves(rows: list[Mapping[str, float]], out_png: Path, *, title: str = "training curves") -> None:
    """Loss (left) and validation metrics (right) per epoch, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11.5, 4))
    for key in ("train_loss", "train_report_loss", "train_label_loss", "val_loss"):
        ys = [r.get(key, math.nan) for r in rows]
        if any(math.isfinite(y) for y in ys):
            ax_loss.plot(epochs, ys, marker="o", label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    for key in ("val_BLEU_4", "val_METEOR", "val_ROUGE_L", "val_CIDEr", "val_CE_F1_macro", "val_label_auc",
                "val_head_label_auc"):
        ys = [r.get(key, math.nan) for r in rows]
        if any(math.isfinite(y) for y in ys):
            ax_metric.plot(epochs, ys, marker="o", label=key[4:])
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel("validation score")
    ax_metric.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: the AUCs sit at the top
    ax_metric.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
