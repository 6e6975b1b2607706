"""`EvalReport`: the result of one evaluation (per-run top-1/top-5 with the protocol, storage, timings and
provenance), saved as JSON (`sfmkern.EvalReport/1`), and `markdown_table`, which keeps reference rows (the full-data
probe and inheritance with the distillation backbone: upper bounds) apart from results of the evaluated images."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sfmkern._io import atomic_write

FORMAT = "sfmkern.EvalReport/1"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return float(statistics.fmean(values)), float(statistics.pstdev(values)) if len(values) > 1 else 0.0


@dataclass
class EvalReport:
    """Result of one evaluation: per-run top-1/top-5 (percent) with the protocol, storage and timings.

    name: what was evaluated ("sfm", "random-real", "centroid", "full-data", ...); mode: "probe" | "inherit" |
    "full-data"; top5 uses k = min(5, num_classes); std is the population std over runs.
    """

    name: str
    mode: str
    backbone: str
    backbone_fingerprint: str
    num_classes: int
    num_train: int
    top1: list[float]
    top5: list[float]
    protocol: dict = field(default_factory=dict)
    storage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """"reference" for a row that is no result of the evaluated images: the full-data probe, and inheritance
        with the distillation backbone (the full-data head itself, their upper bound); "result" otherwise (the
        probe of a set, cross-backbone inheritance through a projector learnt on the images)."""
        if self.mode == "full-data":
            return "reference"
        if self.mode == "inherit" and self.provenance.get("head_backbone_fingerprint") == self.backbone_fingerprint:
            return "reference"
        return "result"

    @property
    def images_per_class(self) -> float:
        return self.num_train / max(1, self.num_classes)

    top1_mean = property(lambda self: _mean_std(self.top1)[0], doc="mean top-1 % over the runs")
    top1_std = property(lambda self: _mean_std(self.top1)[1], doc="std of top-1 % over the runs")
    top5_mean = property(lambda self: _mean_std(self.top5)[0], doc="mean top-5 % over the runs")
    top5_std = property(lambda self: _mean_std(self.top5)[1], doc="std of top-5 % over the runs")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(top1_mean=self.top1_mean, top1_std=self.top1_std, top5_mean=self.top5_mean,
                 top5_std=self.top5_std, images_per_class=self.images_per_class)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvalReport:
        d = json.loads(text)
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in keys})

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically write `to_json()` to `path` (with `format`: sfmkern.EvalReport/1)."""
        text = json.dumps({**self.to_dict(), "format": FORMAT}, indent=2, sort_keys=True)
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalReport:
        """Read a report written by `save` (or any `to_json()` text); one-line ValueError naming the file else."""
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable evaluation report ({' '.join(str(exc).split())}); re-run "
                             "`sfmkern eval --out` to write it again") from None
        found = doc.get("format", FORMAT) if isinstance(doc, dict) else None
        if found != FORMAT or "top1" not in doc:
            raise ValueError(f"{path}: not an evaluation report (format {found!r}); re-run `sfmkern eval --out` to "
                             "write it again")
        return cls.from_json(json.dumps(doc))

    def to_markdown(self) -> str:
        """A one-row accuracy table and the protocol, storage and timings as bullet points."""
        lines = [markdown_table([self]), ""]
        p = self.protocol
        proto = ", ".join(f"{k}={v}" for k, v in sorted(p.items()))
        lines.append(f"- protocol: {proto}")
        if self.storage:
            lines.append("- storage: " + ", ".join(f"{k}={_fmt_bytes(v)}" for k, v in sorted(self.storage.items())))
        if self.timings:
            lines.append("- time: " + ", ".join(f"{k}={v:.2f}s" for k, v in sorted(self.timings.items())))
        return "\n".join(lines) + "\n"


def _fmt_bytes(n) -> str:
    n = int(n)
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.2f} MiB"


def _fmt_acc(values: Sequence[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.1f}" if len(values) <= 1 else f"{mean:.1f} ± {std:.1f}"


REFERENCE_CAPTION = ("Reference rows (upper bounds, not results of the evaluated images: the full-data probe, and "
                     "inheritance with the distillation backbone, which is the full-data head itself):")


def markdown_table(reports: Sequence[EvalReport]) -> str:
    """A Markdown table with one row per report: set, mode, backbone, images/class, runs, top-1, top-5, storage.
    Reference rows (`EvalReport.kind == "reference"`) follow in a second table under `REFERENCE_CAPTION`."""
    results = [r for r in reports if r.kind == "result"]
    references = [r for r in reports if r.kind == "reference"]
    if results and references:
        return "\n".join([_table(results), "", REFERENCE_CAPTION, "", _table(references)])
    return _table(results or references)


def _table(reports: Sequence[EvalReport]) -> str:
    head = "| set | mode | backbone | img/class | runs | top-1 (%) | top-5 (%) | storage |"
    rows = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in reports:
        ipc = r.images_per_class
        ipc_s = f"{ipc:.0f}" if float(ipc).is_integer() else f"{ipc:.1f}"
        if r.mode == "full-data":
            ipc_s = f"all ({r.num_train})"
        rows.append(
            f"| {r.name} | {r.mode} | {r.backbone} | {ipc_s} | {len(r.top1)} | {_fmt_acc(r.top1)} | "
            f"{_fmt_acc(r.top5)} | {_fmt_bytes(sum(int(v) for v in r.storage.values()))} |"
        )
    return "\n".join(rows)
